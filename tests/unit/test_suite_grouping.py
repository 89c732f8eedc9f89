"""The suite's own distribution: `make test` runs on two pytest-xdist workers with `--dist loadgroup`, and
tests/conftest.py puts each module in a group of its own (its module-scoped fixtures, a deployment or a
Prefect server, made once) unless its tests name a group (the fresh runbook's readers: one run).

xdist carries the group in the test's node id (`...::test@group`). pytest 9.2 made node ids structured and
the mutation silently stopped taking effect (pytest-dev/pytest-xdist#1386): every test became a group of
its own, modules were split over both workers, module fixtures and the fresh runbook were made twice.
This runs a small suite through the same hook, with the installed pytest and xdist, and fails when the
groups are not honoured."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

MODULE = """
import pytest
{mark}
@pytest.mark.parametrize("i", range(4))
def test_it(i):
    pass
"""


def test_loadgroup_keeps_each_module_and_each_named_group_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    for name in ("test_a", "test_b"):
        (tmp_path / f"{name}.py").write_text(MODULE.format(mark=""))
    for name in ("test_c", "test_d"):
        (tmp_path / f"{name}.py").write_text(MODULE.format(mark='pytestmark = pytest.mark.xdist_group("shared")'))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = re.findall(r"\[(gw\d+)\] \[\s*\d+%\] PASSED (\S+)", done.stdout)
    assert len(ran) == 16, done.stdout
    groups: dict[str, set[str]] = defaultdict(set)
    for worker, nodeid in ran:
        assert "@" in nodeid, f"{nodeid}: no group in the node id; xdist's loadgroup is not grouping ({done.stdout})"
        groups[nodeid.rsplit("@", 1)[1]].add(worker)
    assert set(groups) == {"test_a.py", "test_b.py", "shared"}, groups
    assert all(len(workers) == 1 for workers in groups.values()), groups
