"""Step 06, the health check, over the shared sandbox: a baseline recorded by the real steps 01, 03
and 04 (in this process, confirmed, on the flow branch), then one test per drift or fault, each made
for real (through the Prefect API, the Management API, SQL, the functions gateway's injected answers)
and undone at the end of its test; the health check must name it with the right verdict and
remediation. Last, `requeue_stuck` brings items stranded at QUEUED to IN_PROGRESS through the real
chain (Edge Function, Prefect, the managed worker, the Modal stand-in).

The healthy sandbox after a whole `make run` gives `ok` in tests/integration/runner/test_full_runbook.py
(step 06 is part of the run, and `runbook health` runs after it against the run's records)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from runbook_lib.checks.base import Check
from runbook_lib.steps.deploy import Deploy
from runbook_lib.steps.edge_secret import EdgeSecret
from runbook_lib.steps.health import HealthCheck
from runbook_lib.steps.prerequisites import Prerequisites
from runbook_lib.systems.database import TRIGGER_FUNCTION, TRIGGER_NAME, Database
from runbook_lib.systems.prefect import prefect_settings
from runbook_sandbox.faults import admin_headers
from tests.conftest import PROJECT_ROOT, SEED_CLIENT_ID, wait_for
from tests.integration.chain_helpers import FLOW_BRANCH, sandbox_settings, set_function_deployment_id
from tests.integration.steps.test_deploy import gateway, step_context

OVERRIDES = {"source.branch": FLOW_BRANCH}
STEP_SLUG = "company-firmographics"
WORKSTREAM = "company-enrichment"
FUNCTION_PATH = "/functions/v1/trigger-prefect-orchestrator"
POOL = "managed-production"
BLOCK = "modal-token-id"


# -- the baseline: steps 01, 03 and 04 as their notebooks run them ----------------------------------------


def record_baseline(sandbox, run_dir: Path) -> str:
    """Steps 01, 03, 04 into `run_dir` (confirmed); returns the deployment id."""
    ctx = step_context("01_verify_prerequisites", sandbox, run_dir, OVERRIDES, confirm=None)
    prereq = Prerequisites(ctx)
    prereq.run_all()
    prereq.verdict()
    ctx = step_context("03_deploy", sandbox, run_dir, OVERRIDES)
    deploy = Deploy(ctx)
    plan = deploy.plan()
    deploy.confirm(plan)
    deployment_id = deploy.apply(plan)
    deploy.verify(plan, deployment_id)
    ctx.finish()
    ctx = step_context("04_update_edge_function_secret", sandbox, run_dir, OVERRIDES)
    secret = EdgeSecret(ctx)
    the_plan = secret.plan()
    secret.confirm(the_plan)
    secret.apply(the_plan)
    ctx.finish()
    return deployment_id


@pytest.fixture(scope="module")
def baseline(sandbox, tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("health") / "baseline-run"
    return {"run_dir": run_dir, "deployment_id": record_baseline(sandbox, run_dir)}


@pytest.fixture(scope="module")
def settings(sandbox):
    return sandbox_settings(sandbox, OVERRIDES)


@pytest.fixture(scope="module")
def database(settings) -> Database:
    return Database.from_settings(settings)


# -- running the health check ----------------------------------------------------------------------------


@dataclass
class Health:
    verdict: str
    checks: dict[str, Check]
    step: HealthCheck

    def status(self, id: str) -> str:
        return self.checks[id].status.value

    def not_passed(self) -> dict[str, str]:
        return {i: c.status.value for i, c in self.checks.items() if c.status.value != "pass"}


def health(sandbox, baseline, tmp_path: Path, *, overrides: dict[str, Any] | None = None, requeue: bool = False,
           confirm: Any = None) -> Health:
    """Notebook 06's cells, in this process, against the recorded baseline."""
    ctx = step_context("06_health_check", sandbox, tmp_path / f"health-{uuid.uuid4().hex[:6]}",
                       {**OVERRIDES, **(overrides or {})}, confirm=confirm)
    step = HealthCheck(ctx, requeue_stuck=requeue, baseline=str(baseline["run_dir"]))
    step.show_baseline()
    step.run_all()
    step.requeue_plan()
    step.requeue()
    verdict = step.verdict(raise_on_fail=False)
    return Health(verdict, {c.id: c for c in step.report.checks}, step)


def explain(h: Health) -> str:
    return "\n".join(f"{i} {c.status.value}: {c.detail} | {c.remediation}" for i, c in h.checks.items()
                     if c.status.value != "pass")


# -- faults ------------------------------------------------------------------------------------------------


def launch(database: Database, *, items: int = 2, ui: bool = False) -> Any:
    rows = [{"company_name": f"Health {uuid.uuid4().hex[:6]}", "company_domain": "health.example"} for _ in range(items)]
    return database.launch_batch(SEED_CLIENT_ID, WORKSTREAM, [STEP_SLUG], rows, direct_pending=not ui)


@contextlib.contextmanager
def batch(database: Database, **kwargs: Any) -> Iterator[Any]:
    launched = launch(database, **kwargs)
    try:
        yield launched
    finally:
        database.delete_batch(launched.batch_id)


def strand(db, batch_id: str, minutes: int) -> None:
    """What the production incident left: states claimed (QUEUED) long ago and never dispatched."""
    db.execute("UPDATE public.workflow_states SET status = 'QUEUED', updated_at = now() - make_interval(mins => %s) "
               "WHERE batch_id = %s", (minutes, batch_id))


@contextlib.contextmanager
def function_answers(sandbox, status: int) -> Iterator[None]:
    """The functions gateway answers every POST to the Edge Function with `status`."""
    with httpx.Client(base_url=sandbox.supabase_api_url, timeout=30, trust_env=False,
                      headers=admin_headers(sandbox)) as client:
        client.post("/_sandbox/faults", json={"path": FUNCTION_PATH, "status": status, "count": None,
                                              "method": "POST"}).raise_for_status()
        try:
            yield
        finally:
            client.delete("/_sandbox/faults").raise_for_status()


def block_id(sandbox, name: str) -> str | None:
    with gateway(sandbox) as client:
        r = client.get(f"block_types/slug/secret/block_documents/name/{name}")
    return None if r.status_code == 404 else r.raise_for_status().json()["id"]


# -- the tests ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_the_healthy_chain_is_ok_in_the_notebook_and_on_the_command_line(sandbox, baseline, tmp_path):
    h = health(sandbox, baseline, tmp_path)
    assert h.verdict == "ok", explain(h)
    assert "recorded" in h.checks["health.deployment"].detail
    assert "as recorded by run baseline-run" in h.checks["health.trigger_function"].detail
    record = json.loads((h.step.ctx.run_dir / "health.json").read_text())
    assert record["verdict"] == "ok" and record["baseline"]["deployment_id"] == baseline["deployment_id"]

    outputs = tmp_path / "outputs"
    env = {**os.environ, "RUNBOOK_SANDBOX_DIR": str(sandbox.state), "RUNBOOK_SOURCE__BRANCH": FLOW_BRANCH}
    proc = subprocess.run([sys.executable, "-m", "runbook_lib", "health", "--profile", "sandbox", "--json",
                           "--baseline", str(baseline["run_dir"]), "--outputs-dir", str(outputs)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed["verdict"] == "ok" and {c["id"] for c in printed["checks"]} == set(h.checks)
    [record_dir] = (outputs / "health").iterdir()
    assert {"health.json", "index.html", "06_health_check.json"} <= {p.name for p in record_dir.iterdir()}
    assert "Detail" in proc.stderr  # the table went to stderr, the JSON alone to stdout


@pytest.mark.timeout(300)
def test_an_edited_trigger_function_is_drift(sandbox, baseline, tmp_path, db):
    source = db.execute(f"SELECT pg_get_functiondef('{TRIGGER_FUNCTION}'::regproc)").fetchone()[0]
    db.execute(source.replace("RETURN NEW;", "RETURN NEW; -- edited by a migration", 1))
    try:
        h = health(sandbox, baseline, tmp_path)
    finally:
        db.execute(source)
    assert h.verdict == "drift", explain(h)
    assert h.not_passed() == {"health.trigger_function": "warn"}
    assert "was changed since" in h.checks["health.trigger_function"].detail
    assert "pg_get_functiondef" in h.checks["health.trigger_function"].remediation
    assert health(sandbox, baseline, tmp_path).status("health.trigger_function") == "pass"


@pytest.mark.timeout(300)
def test_a_deployment_edited_in_the_ui_is_drift_field_by_field_with_job_variables_masked(sandbox, baseline, tmp_path):
    plaintext = f"pasted-in-the-ui-{uuid.uuid4().hex}"
    with gateway(sandbox) as client:
        before = client.get(f"deployments/{baseline['deployment_id']}").raise_for_status().json()
        edited = {**before["job_variables"], "env": {**before["job_variables"]["env"], "MODAL_TOKEN_SECRET": plaintext}}
        client.patch(f"deployments/{baseline['deployment_id']}",
                     json={"job_variables": edited, "paused": True}).raise_for_status()
        try:
            h = health(sandbox, baseline, tmp_path)
        finally:
            client.patch(f"deployments/{baseline['deployment_id']}",
                         json={"job_variables": before["job_variables"], "paused": False}).raise_for_status()
    assert h.verdict == "drift", explain(h)
    assert h.not_passed() == {"health.deployment_drift": "warn"}
    check = h.checks["health.deployment_drift"]
    assert check.data["changed"] == ["job_variables"]
    assert "- job_variables.env.MODAL_TOKEN_SECRET: recorded" in check.detail and "- paused:" in check.detail
    assert plaintext not in check.detail and "[plaintext secret withheld]" in check.detail
    assert "--from 03" in check.remediation
    assert health(sandbox, baseline, tmp_path).verdict == "ok"


@pytest.mark.timeout(300)
def test_an_edge_secret_pointing_elsewhere_fails(sandbox, baseline, settings, tmp_path):
    elsewhere = str(uuid.uuid4())
    set_function_deployment_id(settings, elsewhere)
    try:
        h = health(sandbox, baseline, tmp_path)
    finally:
        set_function_deployment_id(settings, baseline["deployment_id"])
    assert h.verdict == "fail"
    assert h.not_passed() == {"health.edge_secret": "fail"}, explain(h)
    check = h.checks["health.edge_secret"]
    assert "names no deployment the record knows" in check.detail and "changed since" in check.detail
    assert f"--only 04 -p deployment_id={baseline['deployment_id']}" in check.remediation


@pytest.mark.timeout(300)
def test_a_disabled_trigger_fails(sandbox, baseline, tmp_path, db):
    db.execute(f"ALTER TABLE public.batches DISABLE TRIGGER {TRIGGER_NAME}")
    try:
        h = health(sandbox, baseline, tmp_path)
    finally:
        db.execute(f"ALTER TABLE public.batches ENABLE TRIGGER {TRIGGER_NAME}")
    assert h.verdict == "fail"
    assert h.not_passed() == {"database.trigger": "fail"}, explain(h)
    assert "disabled" in h.checks["database.trigger"].detail
    assert f"ENABLE TRIGGER {TRIGGER_NAME}" in h.checks["database.trigger"].remediation


@pytest.mark.timeout(300)
def test_a_paused_pool_fails(sandbox, baseline, tmp_path):
    with gateway(sandbox) as client:
        client.patch(f"work_pools/{POOL}", json={"is_paused": True}).raise_for_status()
        try:
            h = health(sandbox, baseline, tmp_path)
        finally:
            client.patch(f"work_pools/{POOL}", json={"is_paused": False}).raise_for_status()
    assert h.verdict == "fail"
    assert h.not_passed() == {"prefect.work_pool_active": "fail"}, explain(h)
    assert f"prefect work-pool resume {POOL}" in h.checks["prefect.work_pool_active"].remediation


@pytest.mark.timeout(300)
def test_a_deleted_secret_block_fails(sandbox, baseline, settings, tmp_path):
    with gateway(sandbox) as client:
        client.delete(f"block_documents/{block_id(sandbox, BLOCK)}").raise_for_status()
    try:
        h = health(sandbox, baseline, tmp_path)
    finally:
        from prefect.blocks.system import Secret

        with prefect_settings(settings):
            Secret(value=settings.value("modal.token_id")).save(BLOCK, overwrite=True)
    assert block_id(sandbox, BLOCK) is not None
    assert h.verdict == "fail"
    assert h.not_passed() == {"blocks.referenced": "fail"}, explain(h)
    assert f"missing Secret block(s) {BLOCK}" in h.checks["blocks.referenced"].detail
    assert f"{BLOCK} from MODAL_TOKEN_ID" in h.checks["blocks.referenced"].remediation


@pytest.mark.timeout(300)
def test_pending_items_whose_trigger_never_fired_fail(sandbox, baseline, database, tmp_path, db):
    with batch(database) as launched:  # the UI path that inserts PENDING at once: no trigger
        db.execute("UPDATE public.workflow_states SET updated_at = now() - interval '30 seconds' WHERE batch_id = %s",
                   (launched.batch_id,))
        h = health(sandbox, baseline, tmp_path, overrides={"health.pending_threshold_seconds": 10})
    assert h.verdict == "fail"
    assert h.not_passed() == {"health.items_pending": "fail"}, explain(h)
    check = h.checks["health.items_pending"]
    assert launched.batch_id in check.detail and "2 state(s)" in check.detail and "with no flow run since" in check.detail
    assert "INITIALIZING" in check.remediation


@pytest.mark.timeout(300)
def test_items_stranded_at_queued_fail_and_the_requeue_fails_closed_without_confirm(sandbox, baseline, database, tmp_path,
                                                                                     db):
    with batch(database, items=3) as launched:
        strand(db, launched.batch_id, minutes=20)
        h = health(sandbox, baseline, tmp_path, requeue=True)  # headless, no confirm
        states = database.state_counts(launched.batch_id)
    assert h.verdict == "fail"
    assert h.not_passed() == {"health.items_queued": "fail"}, explain(h)
    check = h.checks["health.items_queued"]
    assert "3 state(s), the oldest 20 min old, in 1 batch(es)" in check.detail and launched.batch_id in check.detail
    assert "no flow run of the deployment was running when the oldest was claimed" in check.detail  # the evidence
    assert "--requeue-stuck --confirm" in check.remediation
    # the plan was shown, refused, and nothing changed
    gate = h.step.ctx.results.gate
    assert gate.decision == "rejected" and gate.mode == "headless"
    assert h.step.ctx.results.status == "failed"  # the verdict (fail) is the step's outcome
    assert len(h.step.ctx.results.values["requeue_plan"]) == 3 and "requeued" not in h.step.ctx.results.values
    assert states == {(STEP_SLUG, "QUEUED"): 3}


@pytest.mark.timeout(300)
def test_pg_net_answering_401_fails(sandbox, baseline, database, tmp_path):
    with function_answers(sandbox, 401), batch(database, ui=True) as launched:
        wait_for(lambda: database.http_responses(launched.trigger_request_ids), 60, "pg_net's response")
        h = health(sandbox, baseline, tmp_path)
    database.query("DELETE FROM net._http_response WHERE id = ANY(%s) RETURNING id", (launched.trigger_request_ids,))
    assert h.verdict == "fail"
    assert h.not_passed() == {"health.pg_net_responses": "fail"}, explain(h)
    check = h.checks["health.pg_net_responses"]
    assert "status 401" in check.detail and launched.batch_id in check.detail
    assert "anon key" in check.remediation


@pytest.mark.timeout(600)
def test_a_deleted_then_recreated_deployment_is_named(sandbox, baseline, tmp_path):
    old = baseline["deployment_id"]
    with gateway(sandbox) as client:
        client.delete(f"deployments/{old}").raise_for_status()
    try:
        deleted = health(sandbox, baseline, tmp_path)
        ctx = step_context("03_deploy", sandbox, tmp_path / "redeploy", OVERRIDES)
        step = Deploy(ctx)
        plan = step.plan()
        step.confirm(plan)
        new = step.apply(plan)
        recreated = health(sandbox, baseline, tmp_path)
    finally:  # undo: a passing record of the deployment as it now is, and the secret pointing at it
        baseline["deployment_id"] = record_baseline(sandbox, baseline["run_dir"])
    assert deleted.verdict == "fail" and deleted.status("health.deployment") == "fail", explain(deleted)
    assert "no longer exists, and no deployment of that name does" in deleted.checks["health.deployment"].detail
    assert "--from 03" in deleted.checks["health.deployment"].remediation

    assert new != old and baseline["deployment_id"] == new
    assert recreated.verdict == "fail"
    assert {"health.deployment", "health.edge_secret"} <= set(recreated.not_passed()), explain(recreated)
    dep = recreated.checks["health.deployment"]
    assert f"was re-created as {new}" in dep.detail and f"-p deployment_id={new}" in dep.remediation
    assert f"still names {old}" in recreated.checks["health.edge_secret"].detail
    assert health(sandbox, baseline, tmp_path).verdict == "ok"


@pytest.mark.timeout(600)
def test_requeue_brings_stranded_items_to_in_progress_through_the_chain(sandbox, baseline, database, tmp_path, db):
    with batch(database, items=3) as launched:
        strand(db, launched.batch_id, minutes=20)
        h = health(sandbox, baseline, tmp_path, requeue=True, confirm=True)
        check = h.checks["health.requeue"]
        assert check.status.value == "pass", check.detail
        assert "reset 3 of 3 state(s) to PENDING" in check.detail and "started flow run" in check.detail
        assert h.status("health.items_queued") == "pass"  # checked again after the requeue
        values = h.step.ctx.results.values
        assert len(values["requeued"]) == 3 and values["requeue_flow_run_id"] == check.data["flow_run_id"]
        assert h.step.ctx.results.gate.decision == "approved"

        rows = database.query("SELECT meta FROM public.workflow_states WHERE batch_id = %s", (launched.batch_id,))
        assert all("lease" in r["meta"]["requeued"]["reason"] for r in rows)
        reasons = database.transition_reasons([s["state_id"] for s in values["requeued"]])
        assert len(reasons) == 3 and all(r["from_status"] == "QUEUED" and "runbook health" in r["reason"] for r in reasons)

        def moved() -> bool:
            statuses = {r["status"] for r in database.item_states(launched.batch_id, STEP_SLUG)}
            return statuses <= {"IN_PROGRESS", "COMPLETED"} and statuses
        wait_for(moved, 300, "the requeued items to reach IN_PROGRESS", interval=1)
        path = [t["to_status"] for t in database.transitions(launched.batch_id)]
        assert path.count("IN_PROGRESS") == 3 and path.index("PENDING", 3) < path.index("IN_PROGRESS")
