"""Notebook 05 (end-to-end test) through papermill, against the sandbox: after 03 and 04 it passes
and its record holds the timeline figure and the latencies; each injected fault makes it fail at the
right link, with a message naming that link, the later links skipped and the test rows cleaned up.

Faults are real: the Supabase service stopped (Edge Function down), PREFECT_DEPLOYMENT_ID pointing at
another deployment or at none, the managed worker stopped, a Modal stand-in function failing, a batch
inserted directly as PENDING. Each test undoes its fault in a finally (the sandbox is shared).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from runbook_lib.steps import e2e, fallback
from runbook_lib.systems.database import Database
from runbook_lib.systems.prefect import PrefectApi
from runbook_sandbox import manager
from tests.integration.chain_helpers import (
    FIRST_SENDER,
    LINK_IDS,
    batches_of_client,
    modal_fault,
    run_chain_notebook,
    set_function_deployment_id,
)
from tests.integration.notebook_runs import Run, assert_no_secrets_under, secret_values

STEP = "05_end_to_end_test"
FAST = {"n_items": 6, "trigger_timeout": 15, "flow_run_timeout": 120, "completion_timeout": 150}


# -- helpers -----------------------------------------------------------------------------------------


def assert_failed_at(run: Run, link: str) -> None:
    """The step failed at `link`: earlier links passed (or warned), later ones skipped, the error
    names the link, the test rows are gone."""
    assert run.error is not None, "the notebook should have failed"
    assert run.results["status"] == "failed"
    statuses = run.statuses()
    position = LINK_IDS.index(link)
    assert all(statuses[i] in ("pass", "warn") for i in LINK_IDS[:position]), statuses
    assert statuses[link] == "fail", statuses
    assert all(statuses[i] == "skip" for i in LINK_IDS[position + 1:]), statuses
    assert link in run.results["error"] and link in str(run.error)
    assert run.values["failed_link"] == link
    assert run.check(link)["remediation"]
    assert statuses["cleanup"] == "pass" and run.values["cleaned_up"] is True


def batch_gone(database: Database, batch_id: str) -> bool:
    return not database.query("SELECT 1 FROM public.batches WHERE id = %s", (batch_id,))


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(sandbox, tmp_path_factory) -> tuple[Path, str]:
    """Steps 03 and 04 through papermill in one run directory: (run_dir, deployment id)."""
    run_dir = tmp_path_factory.mktemp("nb05-chain")
    deployed = run_chain_notebook("03_deploy", sandbox, run_dir, {"confirm": True})
    assert deployed.error is None, deployed.results
    secret = run_chain_notebook("04_update_edge_function_secret", sandbox, run_dir, {"confirm": True})
    assert secret.error is None, secret.results
    return run_dir, deployed.values["deployment_id"]


@pytest.fixture
def restore_secret(settings, deployed) -> Iterator[None]:
    """Put the Edge Function's PREFECT_DEPLOYMENT_ID back to step 03's deployment afterwards."""
    yield
    set_function_deployment_id(settings, deployed[1])


# -- the chain passes --------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_03_04_05_pass_and_the_record_shows_the_figure_and_latencies(sandbox, sandbox_env, deployed, database):
    run_dir, deployment_id = deployed
    run = run_chain_notebook("05_end_to_end_test", sandbox, run_dir, {"confirm": True, **FAST})
    assert run.error is None, run.results
    assert run.results["status"] == "passed"
    assert all(run.statuses()[link] == "pass" for link in LINK_IDS), run.statuses()
    values = run.values
    assert values["deployment_id"] == deployment_id and "step 03_deploy" in values["deployment_source"]
    assert values["item_state_counts"]["COMPLETED"] == 6 and values["stuck_items"] == []
    for key in ("launch", "pg_net_response", "flow_run_created", "flow_run_running", "first_queued", "last_queued",
                "first_in_progress", "last_in_progress", "completed"):
        assert values["timeline"][key] is not None and values["timeline"][key] >= 0, key
    assert all(v is not None for v in values["latencies_ms"].values()), values["latencies_ms"]
    assert set(values["link_elapsed_ms"]) == set(LINK_IDS)
    # The record: the figure (PNG) and the table with the latencies; progress lines while waiting.
    outputs = run.outputs()
    assert any("image/png" in o.get("data", {}) for o in outputs)
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("launch_to_flow_run_created" in "".join(t) and "Latencies" in "".join(t) for t in tables)
    streams = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "link 4: flow run" in streams and "launched test batch" in streams
    assert (run_dir / f"{STEP}.timeline.png").stat().st_size > 10_000
    # Its own rows only, and they are gone.
    assert batch_gone(database, values["batch_id"])
    assert_no_secrets_under(run_dir, secret_values(sandbox, sandbox_env, service_role=False))


@pytest.mark.timeout(300)
def test_headless_without_confirm_launches_nothing(sandbox, settings, deployed, database, tmp_path):
    before = batches_of_client(database, settings.e2e.client_id)
    run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path, {"deployment_id": deployed[1], **FAST})
    assert run.error is not None and "confirm" in str(run.error)
    assert run.results["status"] == "not_confirmed" and run.results["gate"]["decision"] == "rejected"
    assert not any(c["id"] in LINK_IDS for c in run.results["checks"])
    assert batches_of_client(database, settings.e2e.client_id) == before


# -- each fault fails at its link --------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_edge_function_down_fails_at_link_2(sandbox, deployed, database, tmp_path):
    manager.stop_service("supabase", sandbox.state)
    try:
        run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path, {"confirm": True, "deployment_id": deployed[1], **FAST})
    finally:
        manager.up(sandbox.state, only=["supabase"], echo=lambda s: None)
    assert_failed_at(run, e2e.LINK_EDGE_FUNCTION)
    trigger = run.check(e2e.LINK_TRIGGER)
    assert trigger["data"]["status_code"] is None and trigger["data"]["error_msg"]  # pg_net reported why
    assert "could not be reached" in run.check(e2e.LINK_EDGE_FUNCTION)["detail"]
    assert batch_gone(database, run.values["batch_id"])


@pytest.mark.timeout(300)
def test_function_secret_naming_no_deployment_fails_at_link_2(sandbox, settings, deployed, restore_secret, tmp_path):
    set_function_deployment_id(settings, str(uuid.uuid4()))
    run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path, {"confirm": True, "deployment_id": deployed[1], **FAST})
    assert_failed_at(run, e2e.LINK_EDGE_FUNCTION)
    link = run.check(e2e.LINK_EDGE_FUNCTION)
    assert "Prefect answered 404" in link["detail"] and "stale id" in link["detail"]
    assert "step 04" in link["remediation"] and deployed[1] in link["remediation"]


@pytest.mark.timeout(300)
def test_function_secret_pointing_at_another_deployment_fails_at_link_3(sandbox, settings, deployed, restore_secret,
                                                                         tmp_path):
    api = PrefectApi.from_settings(settings)
    pool, name = f"e2e-decoy-{uuid.uuid4().hex[:6]}", f"decoy-{uuid.uuid4().hex[:6]}"
    fallback.ensure_pool(api, pool, "process")  # no worker serves it: the decoy's runs never start
    flow_id = api.read_deployment_by_id(deployed[1]).flow_id
    decoy = api.call("creating the decoy", lambda c: c.create_deployment(flow_id=flow_id, name=name, work_pool_name=pool))
    try:
        set_function_deployment_id(settings, str(decoy))
        run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path, {"confirm": True, "deployment_id": deployed[1], **FAST})
        assert_failed_at(run, e2e.LINK_FLOW_RUN)
        link = run.check(e2e.LINK_FLOW_RUN)
        assert name in link["detail"] and str(decoy) in link["detail"] and "points at another deployment" in link["detail"]
        assert deployed[1] in link["remediation"]
    finally:
        for r in api.read_flow_runs_of_deployment(decoy, limit=20):
            api.call("deleting a decoy run", lambda c, rid=r.id: c.delete_flow_run(rid))
        api.call("deleting the decoy", lambda c: c.delete_deployment(decoy))
        api.call("deleting the decoy pool", lambda c: c.delete_work_pool(pool))


@pytest.mark.timeout(500)
def test_worker_stopped_is_reported_as_never_started_within_the_timeout(sandbox, settings, deployed, database, tmp_path):
    from prefect.states import Cancelled

    manager.stop_service("managed_worker", sandbox.state)
    run = None
    try:
        run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path,
                                 {"confirm": True, "deployment_id": deployed[1], **FAST, "flow_run_timeout": 5})
    finally:
        if run is not None and run.values.get("flow_run_id"):
            PrefectApi.from_settings(settings).call("cancelling the unstarted run", lambda c: c.set_flow_run_state(
                run.values["flow_run_id"], Cancelled(message="end-to-end test: worker stopped on purpose"), force=True))
        manager.up(sandbox.state, only=["managed_worker"], echo=lambda s: None)
    assert_failed_at(run, e2e.LINK_WORK_POOL)
    link = run.check(e2e.LINK_WORK_POOL)
    assert "never started" in link["detail"] and "managed-production" in link["detail"]
    assert "worker" in link["remediation"]
    assert run.seconds < 5 + 60  # the timeout, plus the kernel and the other links: no hang


@pytest.mark.timeout(400)
def test_modal_failing_fails_at_link_5_with_the_reason(sandbox, deployed, database, tmp_path):
    modal_fault(sandbox, FIRST_SENDER, "fail")
    try:
        run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path, {"confirm": True, "deployment_id": deployed[1], **FAST})
    finally:
        modal_fault(sandbox, None)
    assert_failed_at(run, e2e.LINK_ITEMS)
    link = run.check(e2e.LINK_ITEMS)
    assert "0 of 6" in link["detail"] and "at FAILED" in link["detail"]
    stuck = run.values["stuck_items"]
    assert [g["status"] for g in stuck] == ["FAILED"] and stuck[0]["count"] == 6
    assert "FAILED:" in stuck[0]["cause"] and stuck[0]["cause"] != "FAILED: no reason recorded in meta.error"


@pytest.mark.timeout(300)
def test_batch_inserted_directly_as_pending_fails_at_link_1(sandbox, deployed, database, tmp_path):
    run = run_chain_notebook("05_end_to_end_test", sandbox, tmp_path,
                             {"confirm": True, "deployment_id": deployed[1], **FAST, "trigger_timeout": 4,
                              "launch_mode": "direct_pending"})
    assert run.check("launch")["data"]["launch_mode"] == "direct_pending"
    assert_failed_at(run, e2e.LINK_TRIGGER)
    link = run.check(e2e.LINK_TRIGGER)
    assert "inserted directly as PENDING" in link["detail"] and "INITIALIZING" in link["remediation"]
    assert batch_gone(database, run.values["batch_id"])
