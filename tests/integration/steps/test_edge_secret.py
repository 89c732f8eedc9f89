"""Notebook 04 (the Edge Function's PREFECT_DEPLOYMENT_ID), against the sandbox: the Management API
stand-in (digests, upsert, rate limit, injected faults), the Edge Function in real Deno behind the
functions gateway, and the real Prefect server behind the Cloud-shaped gateway.

Papermill runs 03 then 04 and the function is then called as the database trigger calls it: the
flow run it creates must be of exactly the deployed id. The error paths run the notebook's calls
in-process, against a second deployment under its own name (so the secret really changes), and the
shared sandbox's secret is put back at the end of every test that changes it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from runbook_lib.core.errors import ChecksFailed, NotConfirmed, RunbookError, SupabaseApiError
from runbook_lib.steps import edge_secret
from runbook_lib.systems.supabase import SupabaseManagementApi, secret_digest
from runbook_sandbox.supabase import STALE_DEPLOYMENT_ID
from runbook_sandbox.faults import admin_headers
from tests.conftest import wait_for
from tests.integration.chain_helpers import function_secret_digest as current_digest, management
from tests.integration.chain_helpers import scripted_answer as fault, set_function_secret as set_secret
from tests.integration.notebook_runs import assert_no_secrets, run_notebook, secret_values
from tests.integration.steps.test_deploy import (
    deploy_in_process,
    deployment_writes,
    gateway,
    log_mark,
    requests_since,
    step_context,
    unique_name,
)

STEP = "04_update_edge_function_secret"
SECRET = "PREFECT_DEPLOYMENT_ID"
# For the persisting failures: the same retries as the default budget (6 attempts, ~15 s of backoff), a tenth
# of the waiting. The default itself: tests/unit/test_systems_supabase.py.
THREE_ATTEMPTS = {"supabase.max_attempts": 3}


# -- helpers -----------------------------------------------------------------------------------------


def secret_writes(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["path"].endswith("/secrets") and e["method"] in ("POST", "DELETE")]


def edge_function_flow_run(sandbox) -> dict[str, Any]:
    """Call the Edge Function as the trigger does; the flow run it created (then cancelled, so the
    worker does not run the orchestrator for nothing)."""
    r = httpx.post(sandbox.edge_function_url, json={"batch_id": str(uuid.uuid4())}, timeout=60, trust_env=False,
                   headers={"Authorization": f"Bearer {sandbox.supabase.anon_key}"})
    assert r.status_code == 200, r.text
    flow_run_id = r.json()["flow_run_id"]
    with gateway(sandbox) as client:
        run = client.get(f"flow_runs/{flow_run_id}")
        run.raise_for_status()
        client.post(f"flow_runs/{flow_run_id}/set_state",
                    json={"state": {"type": "CANCELLED", "name": "Cancelled", "message": "runbook test"}, "force": True})
    return run.json()


@pytest.fixture
def restore_secret(sandbox) -> Iterator[None]:
    """Put the shared sandbox's PREFECT_DEPLOYMENT_ID back as it was (it is one of the ids the
    tests know: the sandbox's stale one or a deployment's)."""
    before = current_digest(sandbox)
    with gateway(sandbox) as client:
        r = client.post("deployments/filter", json={})
        r.raise_for_status()
    candidates = [STALE_DEPLOYMENT_ID, *(d["id"] for d in r.json())]
    original = next((c for c in candidates if secret_digest(c) == before), None)
    yield
    if original is not None and current_digest(sandbox) != before:
        set_secret(sandbox, original)


@pytest.fixture(scope="module")
def other_deployment(sandbox, tmp_path_factory) -> tuple[dict[str, Any], str]:
    """A second deployment of the orchestrator, under its own name: (settings overrides naming it, its id)."""
    overrides = {"deployment.name": unique_name("runbook-test-edge")}
    _, _, deployment_id = deploy_in_process(sandbox, tmp_path_factory.mktemp("other-deployment"), overrides)
    return overrides, deployment_id


def secret_step(sandbox, run_dir: Path, overrides: dict[str, Any], deployment_id: Any = None, rollback: bool = False):
    """Step 04's cells in order, confirmed; returns the context."""
    ctx = step_context(STEP, sandbox, run_dir, overrides)
    step = edge_secret.EdgeSecret(ctx, deployment_id=deployment_id, rollback=rollback)
    the_plan = step.plan()
    step.confirm(the_plan)
    step.apply(the_plan)
    ctx.finish()
    return ctx


def check(ctx, id: str):
    return next(c for c in ctx.results.checks if c.id == id)


# -- papermill: 03 then 04, the function uses the deployment -------------------------------------------


@pytest.mark.timeout(600)
def test_deploy_then_point_the_edge_function_at_it_and_rerun_without_writes(sandbox, sandbox_env, tmp_path, restore_secret):
    run_dir = tmp_path / "run"
    deployed = run_notebook("03_deploy", sandbox.state, run_dir, {"confirm": True})
    assert deployed.error is None, deployed.error
    deployment_id = deployed.results["values"]["deployment_id"]
    if current_digest(sandbox) == secret_digest(deployment_id):  # an earlier test pointed it there already
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    before = current_digest(sandbox)

    updated = run_notebook(STEP, sandbox.state, run_dir, {"confirm": True})
    assert updated.error is None, updated.error
    values = updated.results["values"]
    assert updated.results["status"] == "passed" and updated.results["gate"]["decision"] == "approved"
    assert values["deployment_id"] == deployment_id  # taken from step 03's results
    assert values["new_digest"] == secret_digest(deployment_id) == current_digest(sandbox)
    assert values["previous_digest"] == before and values["changed"] is True
    statuses = {c["id"]: c["status"] for c in updated.results["checks"]}
    assert statuses["function_secrets.present"] == statuses["function_secrets.workspace"] == "pass"
    assert statuses["secret.verify"] == "pass"
    history = [json.loads(line) for line in (run_dir / edge_secret.HISTORY_FILE).read_text().splitlines()]
    assert history[-1]["deployment_id"] == deployment_id and history[-1]["previous_digest"] == before

    # The trigger's call now starts a run of exactly this deployment.
    flow_run = edge_function_flow_run(sandbox)
    assert flow_run["deployment_id"] == deployment_id

    # Both steps again: no changes, same id, no write to Prefect's deployments nor to the secrets.
    prefect_mark, supabase_mark = log_mark(sandbox, "prefect"), log_mark(sandbox, "supabase")
    again_03 = run_notebook("03_deploy", sandbox.state, tmp_path / "run2")
    again_04 = run_notebook(STEP, sandbox.state, tmp_path / "run2")
    assert again_03.error is None and again_04.error is None, (again_03.error, again_04.error)
    assert again_03.results["values"]["deployment_id"] == deployment_id
    assert again_03.results["values"]["no_changes"] is True
    assert again_04.results["values"]["no_change"] is True and again_04.results["values"]["changed"] is False
    assert again_04.results["gate"] is None
    assert "no write" in next(c for c in again_04.results["checks"] if c["id"] == "secret.verify")["detail"]
    assert deployment_writes(requests_since(sandbox, "prefect", prefect_mark)) == []
    assert secret_writes(requests_since(sandbox, "supabase", supabase_mark)) == []
    assert edge_function_flow_run(sandbox)["deployment_id"] == deployment_id

    secrets = secret_values(sandbox, sandbox_env)
    for run in (deployed, updated, again_03, again_04):
        assert_no_secrets(run, secrets)


@pytest.mark.timeout(300)
def test_a_value_that_is_not_a_uuid_is_refused_and_nothing_is_written(sandbox, tmp_path):
    mark, before = log_mark(sandbox, "supabase"), current_digest(sandbox)
    run = run_notebook(STEP, sandbox.state, tmp_path / "run", {"confirm": True, "deployment_id": "not-a-uuid"})
    assert run.error is not None and run.error.ename == "ChecksFailed"
    failed = next(c for c in run.results["checks"] if c["id"] == "deployment_id.format")
    assert failed["status"] == "fail" and "is not a UUID" in failed["detail"] and failed["remediation"]
    assert secret_writes(requests_since(sandbox, "supabase", mark)) == []
    assert current_digest(sandbox) == before


# -- in-process: refusals, API failures, rollback ------------------------------------------------------


@pytest.mark.timeout(300)
def test_an_unknown_or_foreign_deployment_id_is_refused(sandbox, tmp_path, other_deployment):
    overrides, other_id = other_deployment
    before, mark = current_digest(sandbox), log_mark(sandbox, "supabase")
    unknown = str(uuid.uuid4())
    ctx = step_context(STEP, sandbox, tmp_path / "unknown", overrides)
    with pytest.raises(ChecksFailed) as failed:
        edge_secret.EdgeSecret(ctx, deployment_id=unknown).plan()
    assert failed.value.failed == ["deployment.exists"]
    assert f"no deployment {unknown}" in check(ctx, "deployment.exists").detail

    # An existing deployment, but not the one the profile names.
    ctx = step_context(STEP, sandbox, tmp_path / "foreign", None)
    with pytest.raises(ChecksFailed) as failed:
        edge_secret.EdgeSecret(ctx, deployment_id=other_id).plan()
    assert failed.value.failed == ["deployment.exists"]
    assert "not the orchestrator" in check(ctx, "deployment.exists").detail
    assert secret_writes(requests_since(sandbox, "supabase", mark)) == []
    assert current_digest(sandbox) == before


@pytest.mark.timeout(300)
def test_a_rejected_token_fails_the_write_and_changes_nothing(sandbox, tmp_path, other_deployment, restore_secret):
    overrides, other_id = other_deployment
    if current_digest(sandbox) == secret_digest(other_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    before = current_digest(sandbox)
    path = f"/v1/projects/{sandbox.supabase.project_ref}/secrets"
    with fault(sandbox, path=path, method="POST", status=401, count=1):
        with pytest.raises(SupabaseApiError, match="SUPABASE_ACCESS_TOKEN"):
            secret_step(sandbox, tmp_path / "run", overrides, other_id)
    saved = json.loads((tmp_path / "run" / f"{STEP}.json").read_text())
    write = next(c for c in saved["checks"] if c["id"] == "secret.write")
    assert write["status"] == "fail" and "unchanged" in write["detail"]
    assert "access token" in write["remediation"].lower()
    assert saved["status"] == "failed" and "401" in saved["error"]
    assert current_digest(sandbox) == before
    # Written ahead, then finalised: the change was not applied (the value is known unchanged).
    lines = [json.loads(line) for line in (tmp_path / "run" / edge_secret.HISTORY_FILE).read_text().splitlines()]
    assert [e["status"] for e in lines] == ["pending", "not_applied"]
    assert lines[0]["change_id"] == lines[1]["change_id"] and lines[0]["previous_digest"] == before


@pytest.mark.timeout(300)
def test_a_rate_limit_is_waited_out_and_the_write_verified(sandbox, tmp_path, other_deployment, restore_secret):
    overrides, other_id = other_deployment
    if current_digest(sandbox) == secret_digest(other_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    path = f"/v1/projects/{sandbox.supabase.project_ref}/secrets"
    mark = log_mark(sandbox, "supabase")
    with fault(sandbox, path=path, method="POST", status=429, count=1, headers={"x-ratelimit-reset": "1"}):
        ctx = secret_step(sandbox, tmp_path / "run", overrides, other_id)
    assert ctx.results.status == "passed"
    assert ctx.results.values["retries"] == 1
    verified = check(ctx, "secret.verify")
    assert verified.status.value == "pass" and "after 1 retry" in verified.detail
    assert [e["status"] for e in secret_writes(requests_since(sandbox, "supabase", mark))] == [429, 201]
    assert current_digest(sandbox) == secret_digest(other_id)


@pytest.mark.timeout(300)
def test_a_persisting_server_error_fails_the_step_and_leaves_the_secret_unchanged(sandbox, tmp_path, other_deployment,
                                                                                  restore_secret):
    overrides, other_id = other_deployment
    if current_digest(sandbox) == secret_digest(other_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    before = current_digest(sandbox)
    path = f"/v1/projects/{sandbox.supabase.project_ref}/secrets"
    mark = log_mark(sandbox, "supabase")
    with fault(sandbox, path=path, method="POST", status=500, count=None):
        with pytest.raises(SupabaseApiError, match="server error 500 after 3 attempts"):
            secret_step(sandbox, tmp_path / "run", {**overrides, **THREE_ATTEMPTS}, other_id)
    writes = secret_writes(requests_since(sandbox, "supabase", mark))
    assert len(writes) > 1 and {e["status"] for e in writes} == {500}  # retried, never accepted
    saved = json.loads((tmp_path / "run" / f"{STEP}.json").read_text())
    write = next(c for c in saved["checks"] if c["id"] == "secret.write")
    assert write["status"] == "fail" and "unchanged" in write["detail"] and "re-run" in write["remediation"]
    assert current_digest(sandbox) == before


@pytest.mark.timeout(400)
def test_rollback_restores_the_previous_deployment_id(sandbox, tmp_path, other_deployment, restore_secret):
    overrides, b_id = other_deployment
    # A: another deployment, under a name of its own; the secret goes to A, then B, then back to A.
    a_overrides = {"deployment.name": unique_name("runbook-test-edge-a")}
    _, _, a_id = deploy_in_process(sandbox, tmp_path / "deploy-a", a_overrides)
    runs = tmp_path / "runs"
    first = secret_step(sandbox, runs / "1", a_overrides, a_id)
    assert current_digest(sandbox) == secret_digest(a_id) and first.results.status == "passed"
    second = secret_step(sandbox, runs / "2", overrides, b_id)
    assert second.results.values["previous_deployment_id"] == a_id  # known from run 1's record
    assert second.results.values["previous_digest"] == secret_digest(a_id)
    assert current_digest(sandbox) == secret_digest(b_id)

    back = secret_step(sandbox, runs / "3", overrides, rollback=True)
    assert back.results.status == "passed", [(c.id, c.status, c.detail) for c in back.results.checks]
    assert back.results.values["deployment_id"] == a_id and back.results.values["rollback"] is True
    assert check(back, "rollback.record").status.value == "pass"
    assert check(back, "secret.verify").status.value == "pass"
    assert current_digest(sandbox) == secret_digest(a_id)
    assert edge_function_flow_run(sandbox)["deployment_id"] == a_id

    # Nothing recorded set the value the sandbox seeded: that cannot be rolled back to blindly.
    set_secret(sandbox, STALE_DEPLOYMENT_ID)
    ctx = step_context(STEP, sandbox, runs / "4", overrides)
    with pytest.raises(ChecksFailed) as failed:
        edge_secret.EdgeSecret(ctx, rollback=True).plan()
    assert failed.value.failed == ["rollback.record"]
    assert "-p deployment_id" in check(ctx, "rollback.record").remediation


@pytest.mark.timeout(300)
def test_without_an_id_or_without_confirm_nothing_is_written(sandbox, tmp_path, other_deployment, restore_secret):
    overrides, other_id = other_deployment
    if current_digest(sandbox) == secret_digest(other_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    before, mark = current_digest(sandbox), log_mark(sandbox, "supabase")
    # No parameter and no step 03 results in the run directory.
    ctx = step_context(STEP, sandbox, tmp_path / "empty", overrides)
    with pytest.raises(ChecksFailed):
        edge_secret.EdgeSecret(ctx).plan()
    assert "run step 03_deploy" in check(ctx, "deployment_id.format").detail
    # Headless, confirm unset: the change is planned, shown and refused.
    ctx = step_context(STEP, sandbox, tmp_path / "headless", overrides, confirm=None)
    step = edge_secret.EdgeSecret(ctx, deployment_id=other_id)
    the_plan = step.plan()
    assert not the_plan.no_change
    with pytest.raises(NotConfirmed):
        step.confirm(the_plan)
    assert ctx.results.gate.decision == "rejected" and ctx.results.status == "not_confirmed"
    assert secret_writes(requests_since(sandbox, "supabase", mark)) == []
    assert current_digest(sandbox) == before


@pytest.mark.timeout(300)
def test_a_secret_changed_after_the_plan_refuses_the_write(sandbox, tmp_path, other_deployment, restore_secret):
    """The plan was shown for one value; before apply, someone else sets another: the apply reads the
    digest again and refuses, writing nothing."""
    overrides, other_id = other_deployment
    if current_digest(sandbox) == secret_digest(other_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    ctx = step_context(STEP, sandbox, tmp_path / "run", overrides)
    step = edge_secret.EdgeSecret(ctx, deployment_id=other_id)
    the_plan = step.plan()
    step.confirm(the_plan)
    meanwhile = str(uuid.uuid4())
    set_secret(sandbox, meanwhile)  # through the Management API, as another admin would
    mark = log_mark(sandbox, "supabase")
    with pytest.raises(RunbookError, match="the live state changed since the plan was shown"):
        step.apply(the_plan)
    assert secret_writes(requests_since(sandbox, "supabase", mark)) == []
    assert current_digest(sandbox) == secret_digest(meanwhile)
    saved = json.loads((tmp_path / "run" / f"{STEP}.json").read_text())
    assert saved["status"] == "failed" and "the live state changed since the plan was shown" in saved["error"]
    assert check(ctx, "secret.write").status.value == "fail"
    assert not (tmp_path / "run" / edge_secret.HISTORY_FILE).exists()  # nothing was about to change


@pytest.mark.timeout(400)
def test_a_failed_read_back_leaves_the_change_on_record_and_rollback_restores(sandbox, tmp_path, other_deployment,
                                                                              restore_secret, monkeypatch):
    """Write-ahead: the change is recorded (pending) before the upsert. Here the upsert goes through
    and every read after it fails (the stand-in answers 500): the record shows the pending change,
    and rollback=True restores the value it replaced."""
    overrides, b_id = other_deployment
    a_overrides = {"deployment.name": unique_name("runbook-test-edge-wal")}
    _, _, a_id = deploy_in_process(sandbox, tmp_path / "deploy-a", a_overrides)
    runs = tmp_path / "runs"
    if current_digest(sandbox) == secret_digest(b_id):
        set_secret(sandbox, STALE_DEPLOYMENT_ID)
    secret_step(sandbox, runs / "1", overrides, b_id)  # B, recorded: the value the change below replaces
    assert current_digest(sandbox) == secret_digest(b_id)

    path = f"/v1/projects/{sandbox.supabase.project_ref}/secrets"
    real_upsert = SupabaseManagementApi.upsert_secrets

    def upsert_then_break_reads(self, *args, **kwargs):
        result = real_upsert(self, *args, **kwargs)
        with management(sandbox) as client:  # from now on, every list of the secrets answers 500
            client.post("/_sandbox/faults", json={"path": path, "method": "GET", "status": 500, "count": None},
                        headers=admin_headers(sandbox)).raise_for_status()
        return result

    monkeypatch.setattr(SupabaseManagementApi, "upsert_secrets", upsert_then_break_reads)
    mark = log_mark(sandbox, "supabase")
    try:
        with pytest.raises(SupabaseApiError):
            secret_step(sandbox, runs / "2", {**a_overrides, **THREE_ATTEMPTS}, a_id)
    finally:
        with management(sandbox) as client:
            client.delete("/_sandbox/faults", headers=admin_headers(sandbox)).raise_for_status()
        monkeypatch.undo()
    assert current_digest(sandbox) == secret_digest(a_id)  # the write happened
    # One read-back, retried as the client retries (supabase.max_attempts, 3 here); no second round of reads
    # to learn the state the failed read-back could not tell (a persisting failure would make the user wait
    # twice as long).
    attempts = THREE_ATTEMPTS["supabase.max_attempts"]

    def failed_reads() -> list[dict[str, Any]] | None:  # a request's line is written once it is answered
        reads = [e for e in requests_since(sandbox, "supabase", mark)
                 if e["path"] == path and e["method"] == "GET" and e["status"] == 500]
        return reads if len(reads) >= attempts else None

    assert len(wait_for(failed_reads, 30, f"{attempts} failed reads in the request log")) == attempts
    lines = [json.loads(line) for line in (runs / "2" / edge_secret.HISTORY_FILE).read_text().splitlines()]
    assert [e["status"] for e in lines] == ["pending"]
    assert lines[0]["previous_digest"] == secret_digest(b_id) and lines[0]["previous_deployment_id"] == b_id
    assert lines[0]["deployment_id"] == a_id and lines[0]["source"] == "the deployment_id parameter"
    saved = json.loads((runs / "2" / f"{STEP}.json").read_text())
    assert saved["status"] == "failed" and saved["values"]["change_status"] == "pending"
    write_detail = next(c for c in saved["checks"] if c["id"] == "secret.write")["detail"]
    assert "pending" in write_detail and "accepted the write" in write_detail and "could not be read back" in write_detail

    back = secret_step(sandbox, runs / "3", overrides, rollback=True)
    assert back.results.status == "passed", [(c.id, c.status, c.detail) for c in back.results.checks]
    assert back.results.values["deployment_id"] == b_id
    assert "never confirmed by a read-back" in check(back, "rollback.record").detail
    assert current_digest(sandbox) == secret_digest(b_id)


def test_deployment_id_parsing():
    value = str(uuid.uuid4())
    assert edge_secret.parse_deployment_id(value.upper()) == value
    with pytest.raises(Exception, match="not a UUID"):
        edge_secret.parse_deployment_id("12345")
