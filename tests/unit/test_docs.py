"""The documentation that is generated from code stays in step with it."""

from __future__ import annotations

import re
from pathlib import Path

from runbook_lib.checks import REGISTRY, catalog_markdown
from runbook_lib.steps import load_all

ROOT = Path(__file__).resolve().parents[2]


def test_readme_lists_every_check_as_runbook_checks_prints_it():
    load_all()
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- checks:begin -->\n(.*?)\n<!-- checks:end -->", readme, re.S)
    assert table, "README.md has no checks table between the markers"
    assert table.group(1).strip() == catalog_markdown().strip(), "README's table of checks is stale: paste `runbook checks`"
    listed = re.findall(r"^\| `([^`]+)` \|", table.group(1), re.M)
    assert sorted(listed) == sorted(REGISTRY) and len(listed) == len(set(listed))
    for id, definition in REGISTRY.items():
        assert definition.proves.strip(), f"check {id} does not say what it proves"
