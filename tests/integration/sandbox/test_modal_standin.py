"""The Modal stand-in: token auth, the app's functions from enrichment_registry, a sender's spawn moving
a workflow state to IN_PROGRESS then (through its receiver) COMPLETED with a result row, and each
fault mode. Real HTTP against the real stand-in process and real Postgres."""

from __future__ import annotations

import functools
import time
import uuid

import httpx
import pytest
from dotenv import dotenv_values

from runbook_sandbox.config import SandboxConfig
from runbook_sandbox.faults import admin_headers
from tests import conftest
from tests.conftest import insert_batch, partial_sandbox

pytestmark = pytest.mark.timeout(120)

WORKSTREAM = "company-enrichment"
STEP = "company-firmographics"
SENDER, RECEIVER = "send_company_firmographics", "receive_company_firmographics"
APP = "data-enrichment-workers"

wait_for = functools.partial(conftest.wait_for, interval=0.05)


@pytest.fixture(scope="module")
def stack() -> SandboxConfig:
    with partial_sandbox("runbook-modal-", ["postgres", "modal_standin"]) as cfg:
        yield cfg


@pytest.fixture
def modal(stack):
    """An HTTP client with the Modal token; faults and the completion delay reset after each test."""
    headers = {"x-modal-token-id": stack.modal.token_id, "x-modal-token-secret": stack.modal.token_secret,
               **admin_headers(stack)}  # the /_sandbox/* endpoints need the admin token
    with httpx.Client(base_url=stack.modal_url, headers=headers, timeout=10) as client:
        yield client
        client.delete("/_sandbox/faults").raise_for_status()
        client.put("/_sandbox/settings", json={"complete_delay_ms": 300}).raise_for_status()


def make_state(conn, status: str = "QUEUED") -> tuple[str, str]:
    """A batch with one item whose first step's workflow state is PENDING, then moved to status."""
    batch_id, (item_id,) = insert_batch(conn, "PENDING", [STEP, "person-contact"], [("Initech", "initech.example")],
                                        workstream=WORKSTREAM)
    if status != "PENDING":
        conn.execute("UPDATE workflow_states SET status = %s WHERE item_id = %s", (status, item_id))
    return batch_id, item_id


def state(conn, item_id: str) -> dict:
    return conn.execute(
        "SELECT status::text AS status, meta, updated_at FROM workflow_states WHERE item_id = %s AND step_name = %s",
        (item_id, STEP),
    ).fetchone()


def transitions(conn, item_id: str) -> list[tuple]:
    rows = conn.execute(
        "SELECT from_status::text AS f, to_status::text AS t FROM runbook.workflow_state_transitions "
        "WHERE item_id = %s ORDER BY id",
        (item_id,),
    ).fetchall()
    return [(r["f"], r["t"]) for r in rows]


def results(conn, item_id: str) -> list[dict]:
    return conn.execute("SELECT * FROM enrichment_results WHERE batch_item_id = %s", (item_id,)).fetchall()


def spawn(modal: httpx.Client, item_id: str, fn: str = SENDER, app: str = APP, workstream: str = WORKSTREAM) -> httpx.Response:
    return modal.post(f"/v1/apps/{app}/functions/{fn}/spawn", json={"args": [item_id, workstream], "kwargs": {}})


def call_status(modal: httpx.Client, call_id: str) -> dict:
    resp = modal.get(f"/v1/function_calls/{call_id}")
    resp.raise_for_status()
    return resp.json()


def test_exports_and_health(stack):
    env = dotenv_values(stack.state / "sandbox.env")
    assert env["ENRICHMENT_DISPATCH_URL"] == stack.modal_url
    assert env["MODAL_TOKEN_ID"] == stack.modal.token_id
    assert env["MODAL_TOKEN_SECRET"] == stack.modal.token_secret
    assert httpx.get(f"{stack.modal_url}/_sandbox/health", timeout=5).status_code == 200


def test_missing_or_wrong_token_is_401(stack, conn):
    _, item_id = make_state(conn)
    url = f"{stack.modal_url}/v1/apps/{APP}/functions/{SENDER}/spawn"
    body = {"args": [item_id, WORKSTREAM], "kwargs": {}}
    for headers in (
        {},
        {"x-modal-token-id": stack.modal.token_id},
        {"x-modal-token-id": stack.modal.token_id, "x-modal-token-secret": "as-wrong"},
    ):
        resp = httpx.post(url, json=body, headers=headers, timeout=5)
        assert resp.status_code == 401
        assert resp.json() == {"error": "Token missing or invalid"}
    assert httpx.get(f"{stack.modal_url}/v1/function_calls/fc-x", timeout=5).status_code == 401
    time.sleep(0.5)
    assert state(conn, item_id)["status"] == "QUEUED"
    refused = f'"path": "/v1/apps/{APP}/functions/{SENDER}/spawn", "status": 401'
    # A request's line is written once it was answered: wait for it, with a deadline.
    log = wait_for(lambda: refused in (text := stack.request_log_path("modal").read_text()) and text, 30,
                   "the refused spawn's line in the request log")
    assert stack.modal.token_secret not in log and stack.modal.token_id not in log


def test_unknown_app_or_function_is_404(modal, conn):
    _, item_id = make_state(conn)
    resp = spawn(modal, item_id, app="other-app")
    assert resp.status_code == 404
    assert resp.json() == {"error": f"Function other-app.{SENDER} not found"}
    resp = spawn(modal, item_id, fn="send_nothing")
    assert resp.status_code == 404
    assert resp.json() == {"error": f"Function {APP}.send_nothing not found"}
    assert modal.get("/v1/function_calls/fc-unknown").status_code == 404


def test_malformed_spawn_is_400_and_changes_nothing(modal, conn):
    _, item_id = make_state(conn)
    path = f"/v1/apps/{APP}/functions/{SENDER}/spawn"
    for body in ({"args": [item_id]}, {"args": ["not-a-uuid", WORKSTREAM]}, {"args": [item_id, None]}, [item_id]):
        resp = modal.post(path, json=body)
        assert resp.status_code == 400, body
        assert "error" in resp.json()
    assert modal.post(path, content=b"{not json").status_code == 400
    assert all(c["args"][0] != item_id for c in modal.get("/_sandbox/calls").json())
    assert state(conn, item_id)["status"] == "QUEUED"


@pytest.mark.parametrize("start_status", ["QUEUED", "PENDING"])
def test_sender_moves_the_state_to_in_progress_then_completed(modal, conn, start_status):
    batch_id, item_id = make_state(conn, start_status)
    resp = spawn(modal, item_id)
    assert resp.status_code == 200
    call_id = resp.json()["function_call_id"]
    assert call_id.startswith("fc-") and len(call_id) > 10
    final = wait_for(lambda: (s := state(conn, item_id))["status"] == "COMPLETED" and s, 30, "COMPLETED")
    meta = final["meta"]
    assert meta["service"] == "sandbox-enrichment"
    assert meta["sent_at"] < meta["completed_at"]
    assert meta["payload"]["item_id"] == item_id
    assert meta["payload"]["company_domain"] == "initech.example"
    expected = [(None, "PENDING")] + ([("PENDING", "QUEUED")] if start_status == "QUEUED" else [])
    assert transitions(conn, item_id) == expected + [(start_status, "IN_PROGRESS"), ("IN_PROGRESS", "COMPLETED")]
    (row,) = results(conn, item_id)
    assert row["workflow_slug"] == STEP and row["workstream_slug"] == WORKSTREAM
    assert row["data"]["input"]["company_name"] == "Initech"
    status = call_status(modal, call_id)
    assert status == {"function_call_id": call_id, "function": SENDER, "args": [item_id, WORKSTREAM], "status": "success", "error": None}
    calls = [c for c in modal.get("/_sandbox/calls").json() if c["args"][0] == item_id]
    receiver = [c for c in calls if c["function"] == RECEIVER]
    assert len(receiver) == 1 and receiver[0]["spawned_by"] == call_id and receiver[0]["status"] == "success"


def test_completion_delay_is_honoured(modal, conn):
    modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "ok", "delay_ms": 1500}).raise_for_status()
    _, item_id = make_state(conn)
    started = time.monotonic()
    spawn(modal, item_id).raise_for_status()
    wait_for(lambda: state(conn, item_id)["status"] == "IN_PROGRESS", 30, "IN_PROGRESS")
    assert "sent_at" in state(conn, item_id)["meta"]
    wait_for(lambda: state(conn, item_id)["status"] == "COMPLETED", 30, "COMPLETED")
    assert time.monotonic() - started >= 1.5
    modal.put("/_sandbox/settings", json={"complete_delay_ms": 1200}).raise_for_status()
    modal.delete("/_sandbox/faults").raise_for_status()
    _, item2 = make_state(conn)
    started = time.monotonic()
    spawn(modal, item2).raise_for_status()
    wait_for(lambda: state(conn, item2)["status"] == "COMPLETED", 30, "COMPLETED")
    assert time.monotonic() - started >= 1.2


def test_spawn_error_answers_500_and_nothing_happens(modal, conn):
    modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "spawn_error"}).raise_for_status()
    _, item_id = make_state(conn)
    resp = spawn(modal, item_id)
    assert resp.status_code == 500
    assert resp.json() == {"error": "injected spawn failure"}
    time.sleep(0.8)
    assert state(conn, item_id)["status"] == "QUEUED"
    assert all(c["args"][0] != item_id for c in modal.get("/_sandbox/calls").json())
    modal.delete("/_sandbox/faults").raise_for_status()
    assert modal.get("/_sandbox/faults").json() == {}
    spawn(modal, item_id).raise_for_status()
    wait_for(lambda: state(conn, item_id)["status"] == "COMPLETED", 30, "COMPLETED after the reset")


def test_fail_sets_failed_with_an_error(modal, conn):
    modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "fail", "delay_ms": 100}).raise_for_status()
    _, item_id = make_state(conn)
    call_id = spawn(modal, item_id).json()["function_call_id"]
    final = wait_for(lambda: (s := state(conn, item_id))["status"] == "FAILED" and s, 30, "FAILED")
    assert final["meta"]["error"] == f"injected failure in {SENDER}"
    status = wait_for(lambda: (c := call_status(modal, call_id))["status"] == "failure" and c, 30, "a failed call")
    assert status["error"] == f"injected failure in {SENDER}"
    assert results(conn, item_id) == []
    assert transitions(conn, item_id)[-1] == ("QUEUED", "FAILED")


def test_failing_receiver_fails_an_in_progress_state(modal, conn):
    modal.put(f"/_sandbox/faults/{RECEIVER}", json={"mode": "fail"}).raise_for_status()
    _, item_id = make_state(conn)
    call_id = spawn(modal, item_id).json()["function_call_id"]
    final = wait_for(lambda: (s := state(conn, item_id))["status"] == "FAILED" and s, 30, "FAILED")
    assert final["meta"]["error"] == f"injected failure in {RECEIVER}" and "sent_at" in final["meta"]
    assert transitions(conn, item_id)[-2:] == [("QUEUED", "IN_PROGRESS"), ("IN_PROGRESS", "FAILED")]
    assert call_status(modal, call_id)["status"] == "success"
    assert results(conn, item_id) == []


def test_hang_leaves_the_state_in_progress(modal, conn):
    modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "hang"}).raise_for_status()
    _, item_id = make_state(conn)
    call_id = spawn(modal, item_id).json()["function_call_id"]
    wait_for(lambda: state(conn, item_id)["status"] == "IN_PROGRESS", 30, "IN_PROGRESS")
    time.sleep(1.2)  # four times the completion delay
    assert state(conn, item_id)["status"] == "IN_PROGRESS"
    assert call_status(modal, call_id)["status"] == "running"
    assert results(conn, item_id) == []


def test_unknown_item_or_wrong_status_fails_the_call_and_changes_nothing(modal, conn):
    call_id = spawn(modal, str(uuid.uuid4())).json()["function_call_id"]
    status = wait_for(lambda: (c := call_status(modal, call_id))["status"] == "failure" and c, 30, "a failed call")
    assert "no workflow_states row" in status["error"]
    _, item_id = make_state(conn, "COMPLETED")
    before = state(conn, item_id)
    call_id = spawn(modal, item_id).json()["function_call_id"]
    status = wait_for(lambda: (c := call_status(modal, call_id))["status"] == "failure" and c, 30, "a failed call")
    assert "is COMPLETED, expected PENDING or QUEUED" in status["error"]
    assert state(conn, item_id) == before
    call_id = spawn(modal, item_id, workstream="other-workstream").json()["function_call_id"]
    status = wait_for(lambda: (c := call_status(modal, call_id))["status"] == "failure" and c, 30, "a failed call")
    assert "no enrichment_registry row" in status["error"]


def test_fault_endpoint_rejects_bad_input(modal):
    assert modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "explode"}).status_code == 400
    assert modal.put(f"/_sandbox/faults/{SENDER}", json={"mode": "fail", "delay_ms": -1}).status_code == 400
    assert modal.put("/_sandbox/faults/send_nothing", json={"mode": "fail"}).status_code == 404
    assert modal.put("/_sandbox/settings", json={"complete_delay_ms": "soon"}).status_code == 400
    assert modal.get("/_sandbox/faults").json() == {}


def test_kept_database_connections_are_replaced_when_the_server_drops_them(modal, conn):
    """The stand-in keeps its database connections between calls; one the server dropped meanwhile
    (a restart, a `database down` fault) is replaced, and the next spawn works as before."""
    from runbook_sandbox.modal_standin import APPLICATION_NAME

    _, first = make_state(conn)
    assert spawn(modal, first).status_code == 200
    wait_for(lambda: state(conn, first)["status"] == "COMPLETED", 10, "the first item COMPLETED")
    dropped = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = %s",
        (APPLICATION_NAME,),
    ).fetchone()["n"]
    assert dropped >= 1  # kept open after the calls ended
    _, second = make_state(conn)
    resp = spawn(modal, second)
    assert resp.status_code == 200, resp.text
    wait_for(lambda: state(conn, second)["status"] == "COMPLETED", 10, "the second item COMPLETED")
    assert transitions(conn, second)[-2:] == [("QUEUED", "IN_PROGRESS"), ("IN_PROGRESS", "COMPLETED")]
