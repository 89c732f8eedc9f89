"""Which StepResults a step's record claims: those its notebook started, never the step before's,
even when that one ended within the same second (a short step followed by a prewarmed one)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from runbook_lib.records.manifest import StepRecord
from runbook_lib.records.results import StepResults
from runbook_lib.runner.run import _Runner


def test_a_step_claims_only_the_results_started_during_it(tmp_path):
    second = datetime(2026, 11, 30, 17, 0, 0, tzinfo=timezone.utc)
    before = StepResults(step="04_update_edge_function_secret", profile="sandbox", status="passed", started_at=second + timedelta(milliseconds=100))
    before.save(tmp_path)
    began = second + timedelta(milliseconds=900)  # the next step starts in the same second
    mine = StepResults(step="05_end_to_end_test", profile="sandbox", status="passed", started_at=began + timedelta(milliseconds=50))
    mine.save(tmp_path)

    record = StepRecord(step="05_end_to_end_test", notebook="05_end_to_end_test.ipynb", status="passed", started_at=began)
    _Runner._collect_results(SimpleNamespace(run_dir=tmp_path), record, began)

    assert record.result_files == ["05_end_to_end_test.json"]
    assert record.status == "passed" and not record.notes
