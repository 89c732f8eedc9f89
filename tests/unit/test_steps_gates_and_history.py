"""Every gate decision of a step is kept in order in its results; step 04's write-ahead change
history reads a change written ahead and finalised as one entry, and a change never finalised as
pending (rollback works from it)."""

from __future__ import annotations

import json

from runbook_lib.checks.base import CheckReport
from runbook_lib.notebook.gate import plan_digest
from runbook_lib.steps import edge_secret
from runbook_lib.systems.supabase import secret_digest


def test_every_gate_decision_is_kept_in_order(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("fallback_process_pool", profile="sandbox", confirm="true", run_dir=tmp_path,
                     environ=sandbox_environ, install_hooks=False)
    first, second = {"deploy": "fallback"}, {"secret": "PREFECT_DEPLOYMENT_ID"}
    ctx.confirm_plan("deploy the fallback", first)
    ctx.require_approved(first)
    ctx.confirm_plan("point the Edge Function at it", second)
    ctx.require_approved(second)
    interactive = ctx.confirm_plan("end-to-end test", {"batch": 3}, interactive=False)
    assert interactive.approved
    saved = json.loads((tmp_path / "fallback_process_pool.json").read_text())
    gates = saved["gates"]
    assert [g["plan_digest"] for g in gates] == [plan_digest(first), plan_digest(second), plan_digest({"batch": 3})]
    assert [g["summary"] for g in gates] == ["deploy the fallback", "point the Edge Function at it", "end-to-end test"]
    assert all(g["decision"] == "approved" and g["decided_by"] and g["at"] for g in gates)
    assert saved["gate"] == gates[-1]  # the latest, as before


def test_a_widget_gate_keeps_the_pending_decision_and_the_click(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("03_deploy", profile="sandbox", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    gate = ctx.confirm_plan("update the deployment", {"changes": ["tags"]}, interactive=True)
    gate.reject(by="alice clicked Reject")
    gate.approve(by="alice clicked Approve")
    saved = json.loads((tmp_path / "03_deploy.json").read_text())
    assert [(g["decision"], g["decided_by"]) for g in saved["gates"]] == [
        ("pending", "nobody yet: waiting for Approve in the notebook"),
        ("rejected", "alice clicked Reject"), ("approved", "alice clicked Approve")]


def _entry(change_id, status, new_id, previous_id, at):
    return {"change_id": change_id, "status": status, "at": at, "profile": "sandbox", "project_ref": "ref",
            "secret": "PREFECT_DEPLOYMENT_ID", "deployment_id": new_id, "new_digest": secret_digest(new_id),
            "previous_digest": secret_digest(previous_id), "previous_deployment_id": previous_id, "rollback": False}


def test_history_merges_a_finalised_change_and_keeps_a_pending_one(tmp_path):
    a, b, c = ("0f9d2c1e-0000-4000-8000-00000000000a", "0f9d2c1e-0000-4000-8000-00000000000b",
               "0f9d2c1e-0000-4000-8000-00000000000c")
    run = tmp_path / "outputs" / "runs" / "r1"
    run.mkdir(parents=True)
    lines = [_entry("1", "pending", b, a, "2026-01-01T00:00:00"), _entry("1", "applied", b, a, "2026-01-01T00:00:00"),
             _entry("2", "pending", c, b, "2026-01-02T00:00:00")]
    (run / edge_secret.HISTORY_FILE).write_text("".join(json.dumps(e) + "\n" for e in lines))
    entries = edge_secret.history(run, tmp_path)
    assert [(e["change_id"], e["status"]) for e in entries] == [("2", "pending"), ("1", "applied")]

    class Live:
        digest = secret_digest(c)

    report = CheckReport(step="04")
    target = edge_secret._rollback_target(report, _settings(), entries, Live())
    assert target[0] == b and target[1] == secret_digest(b)
    assert "never confirmed by a read-back" in report.checks[0].detail


def _settings():
    class Supabase:
        deployment_id_secret = "PREFECT_DEPLOYMENT_ID"

    class Settings:
        supabase = Supabase()

    return Settings()
