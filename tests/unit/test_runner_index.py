"""The run's index.html as a reviewer reads it: facts in words from the typed outputs, the gate, the
failed and warned checks with their remediation, raw values folded. (Its look in a browser at
1300 px, links and figure: tests/browser/test_records.py.)"""

from __future__ import annotations

from datetime import datetime, timezone

from runbook_lib.checks.base import Check, CheckReport, Status
from runbook_lib.records.manifest import RunManifest, StepRecord
from runbook_lib.records.results import StepResults
from runbook_lib.runner.index import render_index, step_facts

DEPLOYMENT = "33b620f2-e36a-4774-be2e-a8f769e9ba6e"
NOW = datetime(2026, 11, 30, 11, 41, 9, tzinfo=timezone.utc)


def test_the_index_says_what_each_step_did_and_what_to_fix(tmp_path):
    results = StepResults(step="04_update_edge_function_secret", profile="sandbox", status="failed")
    results.add_checks(CheckReport(step=results.step, checks=[
        Check(id="secret.current", title="Current value", status=Status.PASS),
        Check(id="function_secrets.api_key", title="The function's PREFECT_API_KEY is the runbook's",
              status=Status.WARN, detail="differs by digest", remediation="set PREFECT_API_KEY of the function"),
        Check(id="secret.verify", title="The secret holds the deployment", status=Status.FAIL,
              detail="digest 0aec08bd0078 read back", remediation="re-run step 04"),
    ]))
    results.save(tmp_path)
    steps = [
        StepRecord(step="03_deploy", notebook="03_deploy.ipynb", status="passed", duration_seconds=10.02,
                   html="03_deploy.html", output="03_deploy.ipynb", result_files=["03_deploy.json"],
                   gate={"decision": "approved", "decided_by": "alice@host clicked Approve", "at": NOW.isoformat()},
                   results={"deployment_id": DEPLOYMENT, "deployment_name": "orchestrator_main/dep", "changed": True,
                            "commit_sha": "05c1d12645293a4051cd5b2c14a73312cbcbf78f", "branch": "main",
                            "diff": [{"field": "entrypoint", "status": "changed"},
                                     {"field": "tags", "status": "unchanged"}]}),
        StepRecord(step="04_update_edge_function_secret", notebook="04.ipynb", status="failed", duration_seconds=75,
                   error_type="StepFailed", error="secret.verify failed", result_files=[f"{results.step}.json"],
                   results={"deployment_id": DEPLOYMENT, "previous_digest": "a035021b4e408f4c0b25",
                            "new_digest": "0aec08bd00785ab825ed", "changed": True},
                   checks=[{"id": c.id, "title": c.title, "status": c.status.value} for c in results.checks]),
        StepRecord(step="05_end_to_end_test", notebook="05.ipynb"),
    ]
    manifest = RunManifest(run_id="r1", profile="sandbox", status="failed", started_at=NOW, host="h", user="u",
                           runner_pid=1, steps=steps, error="step 04 failed")
    html = render_index(manifest, tmp_path).read_text()

    assert f"updated orchestrator_main/dep: deployment id {DEPLOYMENT}, at commit 05c1d1264529 of main" in html
    assert "changed: entrypoint<" in html  # only what changed
    assert f"PREFECT_DEPLOYMENT_ID now points at deployment {DEPLOYMENT} (digest a035021b4e40 → 0aec08bd0078)" in html
    assert "alice@host clicked Approve" in html and "2026-11-30 11:41:09 UTC" in html
    assert "1 min 15 s" in html and "10.0 s" in html
    # failed first, then warned, each with its detail and fix; a passed check is only counted
    failed, warned = html.index("re-run step 04"), html.index("set PREFECT_API_KEY of the function")
    assert failed < warned and "digest 0aec08bd0078 read back" in html
    assert "3 checks: 1 passed, 1 warned, 1 failed" in html and "Current value" not in html
    # raw values folded; the run's error under the title
    assert "<details><summary>raw values (JSON)</summary>" in html
    assert html.index("step 04 failed") < html.index("<h2>Steps</h2>")
    assert 'href="03_deploy.html"' in html and 'href="03_deploy.ipynb"' in html


def test_facts_of_an_unreadable_output_are_left_out_not_guessed():
    record = StepRecord(step="03_deploy", notebook="03_deploy.ipynb", results={"deployment_id": "not-a-uuid"})
    assert step_facts(record) == []
    assert step_facts(StepRecord(step="01_verify_prerequisites", notebook="01.ipynb")) == []
