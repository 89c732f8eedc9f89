"""The chain, proven (issue 4), against the sandbox: the orchestrator deployed from the sandbox git
server to `managed-production` (pip_packages, Secret block placeholders and ENRICHMENT_DISPATCH_URL in
env), the Edge Function's PREFECT_DEPLOYMENT_ID set through the Management API stand-in, and a batch
launched the UI's way, followed with runbook_lib.steps.e2e (the code notebook 05 runs).

Every assertion reads a real service: pg_net's response rows, the Prefect API, the database's
recorded transitions (runbook.workflow_state_transitions). The helpers shared with test_nb05_e2e
and test_fallback are in tests/chain_helpers.py; the `settings`, `managed` and `database` fixtures
in tests/conftest.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from runbook_lib.steps import e2e
from runbook_lib.systems.database import Database
from runbook_lib.systems.prefect import PrefectApi
from tests.integration.chain_helpers import FIRST_SENDER, batches_of_client, modal_fault

# -- helpers -----------------------------------------------------------------------------------------


def recorded_paths(db: Database, batch_id: str, step: str) -> dict[str, list[str]]:
    paths: dict[str, list[str]] = {}
    for t in db.transitions(batch_id):
        if t["step_name"] == step:
            paths.setdefault(str(t["item_id"]), []).append(t["to_status"])
    return paths


def new_test(settings, deployment_id: str, **params: Any) -> e2e.ChainTest:
    api = PrefectApi.from_settings(settings)
    options = e2e.E2EOptions.from_settings(settings, **params)
    return e2e.ChainTest(settings, options, e2e.resolve_deployment(settings, api, deployment_id=deployment_id),
                            api=api, progress=e2e.Progress(options.item_count, interactive=False))


# -- tests -------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_batch_of_120_items_goes_through_every_link(settings, managed, database):
    test = new_test(settings, managed, n_items=120, completion_timeout=300, cleanup=False)
    result = test.run()
    try:
        assert result.ok, "\n".join(f"{c.id} {c.status.value}: {c.detail}" for c in result.report.checks)
        # One pg_net response, 200, carrying the flow run id.
        responses = database.http_responses(database.trigger_request_ids(result.batch_id))
        assert len(responses) == 1
        assert responses[0]["status_code"] == 200 and not responses[0]["timed_out"] and not responses[0]["error_msg"]
        body = json.loads(responses[0]["content"])
        assert body["success"] is True and body["batch_id"] == result.batch_id
        assert body["flow_run_id"] == result.flow_run_id
        # That flow run belongs to the deployment and ran on managed-production.
        run = PrefectApi.from_settings(settings).read_flow_run(result.flow_run_id)
        assert str(run.deployment_id) == managed
        assert run.work_pool_name == "managed-production" and run.state.type.value == "COMPLETED"
        # Every item went PENDING -> QUEUED -> IN_PROGRESS -> COMPLETED, as recorded; none left QUEUED.
        paths = recorded_paths(database, result.batch_id, "company-firmographics")
        assert len(paths) == 120
        assert all(p == ["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"] for p in paths.values()), \
            {tuple(p) for p in paths.values()}
        counts = database.state_counts(result.batch_id)
        assert counts == {("company-firmographics", "COMPLETED"): 120}
        # The timeline and latencies are filled, in the order the chain runs.
        t = result.timeline_ms
        assert 0 < t["flow_run_created"] <= t["flow_run_running"] <= t["first_queued"] <= t["last_in_progress"]
        assert t["last_in_progress"] <= t["completed"] and t["pg_net_response"] > 0
        assert all(v is not None and v >= 0 for v in result.latencies_ms.values()), result.latencies_ms
    finally:
        database.delete_batch(result.batch_id)
    assert not database.state_counts(result.batch_id)


@pytest.mark.timeout(400)
def test_modal_spawn_failures_leave_items_pending_for_retry_or_failed_never_queued(sandbox, settings, managed, database):
    modal_fault(sandbox, FIRST_SENDER, "spawn_error")
    try:
        result = new_test(settings, managed, n_items=6, completion_timeout=120, cleanup=False).run()
        try:
            states = database.query(
                "SELECT item_id, status::text AS status, meta FROM public.workflow_states WHERE batch_id = %s",
                (result.batch_id,),
            )
            assert len(states) == 6
            assert not [s for s in states if s["status"] == "QUEUED"]
            for s in states:
                meta = s["meta"] or {}
                if s["status"] == "PENDING":
                    assert meta.get("last_dispatch_error"), meta  # for a retry, with the reason
                else:
                    assert s["status"] == "FAILED" and meta.get("error"), s
            # Claimed (QUEUED) then handed back, as recorded.
            paths = recorded_paths(database, result.batch_id, "company-firmographics")
            assert all(p[:3] == ["PENDING", "QUEUED", p[2]] and p[2] in ("PENDING", "FAILED") for p in paths.values())
            # The test says which link broke and why.
            assert result.failed_link == e2e.LINK_ITEMS
            assert result.report.get(e2e.LINK_WORK_POOL).status.value in ("warn", "fail")
            items = result.report.get(e2e.LINK_ITEMS)
            assert "dispatch failed" in items.detail or "FAILED" in items.detail
            assert "QUEUED" not in {g["status"] for g in result.stuck}
        finally:
            database.delete_batch(result.batch_id)
    finally:
        modal_fault(sandbox, None)


@pytest.mark.timeout(120)
def test_bad_parameters_are_refused_before_anything_is_launched(settings, managed, database):
    before = batches_of_client(database, settings.e2e.client_id)
    for params, needle in (
        ({"n_items": 0}, "n_items must be greater than 0"),
        ({"n_items": "many"}, "n_items must be an integer"),
        ({"launch_mode": "sideways"}, "launch_mode must be one of"),
        ({"blueprint": []}, None),  # empty: the profile's blueprint
        ({"flow_run_timeout": -1}, "flow_run_timeout must be greater than 0"),
        ({"cleanup": "maybe"}, "cleanup must be true or false"),
    ):
        if needle is None:
            assert e2e.E2EOptions.from_settings(settings, **params).blueprint == settings.e2e.blueprint
            continue
        with pytest.raises(e2e.E2EError, match=needle):
            e2e.E2EOptions.from_settings(settings, **params)
    api = PrefectApi.from_settings(settings)
    with pytest.raises(e2e.E2EError, match="is not a UUID"):
        e2e.resolve_deployment(settings, api, deployment_id="not-a-uuid")
    with pytest.raises(e2e.E2EError, match="does not exist"):
        e2e.resolve_deployment(settings, api, deployment_id="00000000-0000-4000-8000-00000000beef")
    # Without a parameter or step 03's results, the profile's deployment is found by name.
    found = e2e.resolve_deployment(settings, api)
    assert found.id == managed and "looked up by name" in found.source
    assert batches_of_client(database, settings.e2e.client_id) == before


@pytest.mark.timeout(120)
def test_a_launch_the_database_refuses_fails_the_launch_and_skips_every_link(settings, managed, database):
    test = new_test(settings, managed, n_items=2)
    test.options.client_id = "99999999-9999-4999-8999-999999999999"  # no such client: the insert is refused
    result = test.run()
    launch = result.report.get("launch")
    assert launch.status.value == "fail" and "inserting the batch failed" in launch.detail and launch.remediation
    assert [result.report.get(link).status.value for link in e2e.LINKS] == ["skip"] * 5
    assert "the launch failed" in result.report.get(e2e.LINK_TRIGGER).detail
    assert result.batch_id is None and not batches_of_client(database, test.options.client_id)


def test_recorded_paths_must_follow_the_pipeline_in_order():
    expected = ["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"]
    assert e2e.follows(["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"], expected)
    assert e2e.follows(["PENDING", "QUEUED", "PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"], expected)  # a retry
    assert not e2e.follows(["PENDING", "IN_PROGRESS", "COMPLETED"], expected)  # QUEUED not recorded
    assert not e2e.follows(["QUEUED", "IN_PROGRESS", "COMPLETED"], expected)  # not inserted PENDING
    assert not e2e.follows(["PENDING", "QUEUED", "IN_PROGRESS"], expected)


@pytest.mark.timeout(180)
def test_orphaned_test_batches_are_found_by_their_marker_and_only_they_are_deleted(settings, managed, database):
    """What a killed step 05 leaves is found in the database (the items' marker), whoever launched it:
    a batch whose process on this host is gone, or launched elsewhere and past its deadline, is
    deleted and named; a live test's, one kept on purpose (cleanup=False), one still within its
    deadline and a batch of the test client without the marker are left alone."""
    import os
    import socket
    import subprocess
    import sys

    import psutil

    from runbook_lib.checks.base import CheckReport
    from runbook_lib.steps.e2e.options import batch_items_for_test

    test = new_test(settings, managed)
    o = test.options
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    gone_started = psutil.Process(gone.pid).create_time()
    gone.wait()
    here = socket.gethostname()

    def launch(launched_by, items=None) -> str:
        items = items or batch_items_for_test("orphan-test", 1, launched_by)
        return database.launch_batch(o.client_id, o.workstream, o.blueprint, items, direct_pending=True).batch_id

    batches = {
        "dead": launch({"host": here, "pid": gone.pid, "pid_started": gone_started, "max_seconds": 3600}),
        "live": launch({"host": here, "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
                        "max_seconds": 0.001}),
        "kept": launch({"host": "elsewhere", "pid": 1, "max_seconds": 0.001, "keep": True}),
        "late": launch({"host": "elsewhere", "pid": 1, "max_seconds": 0.001}),
        "recent": launch({"host": "elsewhere", "pid": 1, "max_seconds": 3600}),
        "older_runbook": launch(None),  # no launcher recorded: orphaned only past this test's own deadline
        "unmarked": launch(None, [{"company_name": "Not a test item", "original_data": {"runbook_e2e": False}}]),
    }
    try:
        result = e2e.E2EResult(o, test.deployment, CheckReport(step="05_end_to_end_test"))
        check = test._delete_orphans(result)
        assert check.status.value == "pass", check.detail
        assert sorted(result.orphans_deleted) == sorted([batches["dead"], batches["late"]])
        assert f"process {gone.pid} on this host, which is gone" in check.detail
        assert "launched on elsewhere" in check.detail and "past its test's deadline" in check.detail
        remaining = batches_of_client(database, o.client_id)
        assert batches["dead"] not in remaining and batches["late"] not in remaining
        for name in ("live", "kept", "recent", "older_runbook", "unmarked"):
            assert batches[name] in remaining, name
        assert "kept on purpose (cleanup=False)" in check.detail and "still running" in check.detail
        assert batches["unmarked"] not in check.detail
    finally:
        for batch_id in batches.values():
            database.delete_batch(batch_id)
