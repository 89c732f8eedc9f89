"""Which StepResults a step's record claims: those its own process's notebook wrote (the attempt the
runner gave that process), never the step before's, whatever the clocks say: a short step followed by a
prewarmed one can end within the same millisecond, and a clock can be set back during a run."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from runbook_lib.records.manifest import StepRecord
from runbook_lib.records.results import ATTEMPT_ENV, StepResults
from runbook_lib.runner.run import _Runner


def test_a_step_claims_only_the_results_its_process_wrote(tmp_path, monkeypatch):
    began = datetime(2026, 11, 30, 17, 0, 0, tzinfo=timezone.utc)
    # The step before wrote its results "after" this step began (the clock was set back in between) ...
    monkeypatch.setenv(ATTEMPT_ENV, "r/04_update_edge_function_secret/aaa")
    before = StepResults(step="04_update_edge_function_secret", profile="sandbox", status="passed",
                         started_at=began + timedelta(milliseconds=100))
    assert before.attempt == "r/04_update_edge_function_secret/aaa"
    before.save(tmp_path)
    # ... and this step's notebook wrote its own "before" it began.
    monkeypatch.setenv(ATTEMPT_ENV, "r/05_end_to_end_test/bbb")
    StepResults(step="05_end_to_end_test", profile="sandbox", status="passed",
                started_at=began - timedelta(seconds=2)).save(tmp_path)
    # A notebook run outside the runner (JupyterLab) carries no attempt: never claimed.
    monkeypatch.delenv(ATTEMPT_ENV)
    StepResults(step="scratch", profile="sandbox", status="failed", started_at=began).save(tmp_path)

    record = StepRecord(step="05_end_to_end_test", notebook="05_end_to_end_test.ipynb", status="passed", started_at=began)
    _Runner._collect_results(SimpleNamespace(run_dir=tmp_path), record, "r/05_end_to_end_test/bbb")
    assert record.result_files == ["05_end_to_end_test.json"]
    assert record.status == "passed" and not record.notes

    # Another attempt of the same step (a resumed run) claims nothing of the earlier one's.
    again = StepRecord(step="05_end_to_end_test", notebook="05_end_to_end_test.ipynb", status="passed", started_at=began)
    _Runner._collect_results(SimpleNamespace(run_dir=tmp_path), again, "r/05_end_to_end_test/ccc")
    assert again.result_files == [] and again.notes == ["the notebook recorded no step results"]
