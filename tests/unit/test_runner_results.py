"""Which StepResults a step's record claims: those its own process's notebook wrote (start_step records the
attempt the runner gave that process), never the step before's, whatever the clocks say: a short step
followed by a prewarmed one can end within the same millisecond, and a clock can be set back during a run."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from runbook_lib.notebook.context import start_step
from runbook_lib.records.manifest import StepRecord
from runbook_lib.records.results import ATTEMPT_ENV, StepResults
from runbook_lib.runner.run import _Runner


def test_start_step_records_the_runners_attempt_and_only_a_started_step_gets_one(sandbox_environ, tmp_path):
    ctx = start_step("fast", profile="sandbox", run_dir=tmp_path, environ={**sandbox_environ, ATTEMPT_ENV: "r/01_fast/abc"},
                     install_hooks=False)
    ctx.finish()
    assert json.loads((tmp_path / "fast.json").read_text())["attempt"] == "r/01_fast/abc"
    start_step("lab", profile="sandbox", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False).finish()
    assert StepResults.load(tmp_path, "lab").attempt is None  # JupyterLab, papermill by hand: no runner
    # A results file read back keeps what it was written with, whatever the reader's environment.
    assert StepResults.model_validate_json('{"step": "old", "profile": "sandbox"}').attempt is None


def test_a_step_claims_only_the_results_its_process_wrote(tmp_path):
    began = datetime(2026, 11, 30, 17, 0, 0, tzinfo=timezone.utc)
    # The step before wrote its results "after" this step began (the clock was set back in between) ...
    StepResults(step="04_update_edge_function_secret", profile="sandbox", status="passed",
                started_at=began + timedelta(milliseconds=100), attempt="r/04_update_edge_function_secret/aaa").save(tmp_path)
    # ... and this step's notebook wrote its own "before" it began.
    StepResults(step="05_end_to_end_test", profile="sandbox", status="passed", started_at=began - timedelta(seconds=2),
                attempt="r/05_end_to_end_test/bbb").save(tmp_path)
    # A notebook run outside the runner (JupyterLab) carries no attempt: never claimed.
    StepResults(step="scratch", profile="sandbox", status="failed", started_at=began).save(tmp_path)

    record = StepRecord(step="05_end_to_end_test", notebook="05_end_to_end_test.ipynb", status="passed", started_at=began)
    _Runner._collect_results(SimpleNamespace(run_dir=tmp_path), record, "r/05_end_to_end_test/bbb")
    assert record.result_files == ["05_end_to_end_test.json"]
    assert record.status == "passed" and not record.notes

    # Another attempt of the same step (a resumed run) claims nothing of the earlier one's.
    again = StepRecord(step="05_end_to_end_test", notebook="05_end_to_end_test.ipynb", status="passed", started_at=began)
    _Runner._collect_results(SimpleNamespace(run_dir=tmp_path), again, "r/05_end_to_end_test/ccc")
    assert again.result_files == [] and again.notes == ["the notebook recorded no step results"]
