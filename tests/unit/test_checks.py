"""runbook_lib.checks (the package): the catalog, every id defined once, rendered by
`catalog_markdown()` for `runbook checks` and the README."""

from __future__ import annotations

import re

from runbook_lib.checks import (
    REGISTRY,
    catalog_markdown,
    database,
    local,
    prefect,
    source,
    supabase,
)
from runbook_lib.steps import load_all

GROUPS = (source.REPOSITORY + source.PACKAGES + prefect.POOL + prefect.BLOCKS + prefect.JOB_VARIABLES
          + database.DATABASE + supabase.EDGE_FUNCTION + local.LOCAL)


def test_catalog_markdown_lists_every_registered_check_once_in_id_order():
    load_all()
    lines = catalog_markdown().splitlines()
    assert lines[:2] == ["| id | check | what it proves |", "| --- | --- | --- |"]
    ids = [re.match(r"^\| `([^`]+)` \| ", line).group(1) for line in lines[2:]]
    assert ids == sorted(REGISTRY) and len(ids) == len(set(ids))
    # the steps' own checks are in it too (defined when the step modules load)
    assert {"deploy.apply", "secret.write", "link1.trigger", "fallback.deploy", "merge.merged"} <= set(ids)
    for line, id in zip(lines[2:], ids):
        definition = REGISTRY[id]
        assert line == f"| `{id}` | {definition.title_for(None)} | {definition.proves} |"
    assert "| `source.branch` | Branch exists |" in catalog_markdown()  # a title built from settings, generic here


def test_every_check_the_catalog_groups_run_is_the_registered_definition():
    for definition in GROUPS:
        assert REGISTRY[definition.id] is definition and definition.probe is not None, definition.id
    assert len({d.id for d in GROUPS}) == len(GROUPS)
