"""The runner's warm-up thread (`runbook_lib/runner/run.py`, `_warm_up`): what it imports is there after
it, frozen out of the collector's sight, and the collector is on again, whether the warm-up worked or not.
Each case runs in an interpreter of its own (the collector's state is the process's)."""

from __future__ import annotations

from tests.conftest import PROJECT_ROOT, run_fresh

PROBE = """
import gc, json, sys, threading
from pathlib import Path
from runbook_lib.core.startup import without_iri_formats
from runbook_lib.runner.run import _warm_up
without_iri_formats()  # as `run` does before it starts the thread
thread = threading.Thread(target=_warm_up, args=(Path(sys.argv[1]),))
thread.start()
thread.join()
print(json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                  "client": "prefect.client.orchestration" in sys.modules,
                  "exporter": "nbconvert.exporters.html" in sys.modules}))
"""


def warm_up(notebook: str) -> dict:
    return run_fresh(PROBE, notebook, timeout=120)


def test_the_warm_up_imports_freezes_and_leaves_the_collector_on():
    after = warm_up(str(PROJECT_ROOT / "notebooks" / "01_verify_prerequisites.ipynb"))
    assert after["client"] and after["exporter"]
    assert after["enabled"] and after["frozen"] > 100_000


def test_a_failed_warm_up_leaves_the_collector_on():
    after = warm_up(str(PROJECT_ROOT / "notebooks" / "no-such-notebook.ipynb"))  # nbformat cannot read it
    assert after["enabled"] and not after["client"]
