"""The pg_net relay: the trigger's request is sent only after commit, and its outcome lands in
net._http_response as pg_net writes it. Real Postgres, the real relay process, a real HTTP receiver
on loopback standing in for the Edge Function."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runbook_lib.core import processes as process
from runbook_sandbox import manager, pgnet_relay, postgres
from runbook_sandbox.config import SandboxConfig
from tests.conftest import insert_batch, partial_sandbox, wait_for

pytestmark = pytest.mark.timeout(180)

BLUEPRINT = ["company-firmographics", "person-contact"]


class Receiver:
    """A loopback HTTP server standing in for the Edge Function; records every request.
    Paths: /echo -> 200 JSON; /sleep/<ms> -> 200 after ms; /status/<code> -> that status."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append({"path": self.path, "headers": self.headers, "body": body})
                parts = self.path.split("?")[0].strip("/").split("/")
                status = 200
                if parts[0] == "sleep":
                    time.sleep(int(parts[1]) / 1000)
                elif parts[0] == "status":
                    status = int(parts[1])
                payload = json.dumps({"received": True, "path": parts[0]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("X-Receiver", "test")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the relay gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["body"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack() -> SandboxConfig:
    with partial_sandbox("runbook-pgnet-", ["postgres", "pgnet_relay"]) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@contextmanager
def trigger_posting_to(cfg: SandboxConfig, url: str):
    """Point the production trigger at url; re-install the real one afterwards."""
    with postgres.connect(cfg, autocommit=True) as c:
        c.execute(postgres.render_trigger_sql(url, cfg.supabase.anon_key))
    try:
        yield
    finally:
        postgres.install_trigger(cfg)


def ui_batch(conn, status: str, n_items: int = 2) -> str:
    """The UI's inserts (conftest.insert_batch) of a batch of `n_items` companies; its id."""
    batch_id, _ = insert_batch(conn, status, BLUEPRINT, [(f"Company {i}", f"company{i}.example") for i in range(n_items)])
    return batch_id


def launch_batch(conn) -> str:
    batch_id = ui_batch(conn, "INITIALIZING")
    conn.execute("UPDATE batches SET status = 'PENDING' WHERE id = %s", (batch_id,))
    return batch_id


def responses_of_batch(conn, batch_id: str) -> list[dict]:
    return conn.execute(
        "SELECT r.* FROM runbook.trigger_requests t JOIN net._http_response r ON r.id = t.request_id "
        "WHERE t.batch_id = %s",
        (batch_id,),
    ).fetchall()


def response(conn, request_id: int) -> dict | None:
    return conn.execute("SELECT * FROM net._http_response WHERE id = %s", (request_id,)).fetchone()


def http_post(conn, url: str, *, timeout_ms: int = 5000, params: dict | None = None, headers: dict | None = None) -> int:
    return conn.execute(
        "SELECT net.http_post(url := %s, body := '{\"probe\": true}'::jsonb, params := %s::jsonb, "
        "headers := %s::jsonb, timeout_milliseconds := %s) AS id",
        (url, json.dumps(params or {}), json.dumps(headers or {"Content-Type": "application/json"}), timeout_ms),
    ).fetchone()["id"]


def test_ui_launch_sends_the_batch_id_once_with_the_anon_key(stack, conn, receiver):
    with trigger_posting_to(stack, f"{receiver.url}/echo"):
        batch_id = launch_batch(conn)
        rows = wait_for(lambda: responses_of_batch(conn, batch_id), 30, "the trigger's pg_net response")
    assert len(rows) == 1
    row = rows[0]
    assert row["status_code"] == 200
    assert row["timed_out"] is False and row["error_msg"] is None
    assert row["content_type"] == "application/json"
    assert row["headers"]["X-Receiver"] == "test"
    assert json.loads(row["content"]) == {"received": True, "path": "echo"}
    sent = [r for r in receiver.requests if r["body"] and json.loads(r["body"]).get("batch_id") == batch_id]
    assert len(sent) == 1
    assert json.loads(sent[0]["body"]) == {"batch_id": batch_id}
    assert sent[0]["headers"]["Authorization"] == f"Bearer {stack.supabase.anon_key}"
    assert sent[0]["headers"]["Content-Type"] == "application/json"
    # Claimed requests leave the queue, as with pg_net.
    assert conn.execute("SELECT count(*) AS n FROM net.http_request_queue").fetchone()["n"] == 0
    # The relay's log names the request, never the anon key.
    log = stack.log_path("pgnet_relay").read_text()
    assert f"request {row['id']} POST {receiver.url}/echo -> 200" in log
    assert stack.supabase.anon_key not in log


def test_direct_pending_insert_and_rolled_back_launch_send_nothing(stack, conn, receiver):
    with trigger_posting_to(stack, f"{receiver.url}/echo"):
        direct = ui_batch(conn, "PENDING")
        with conn.transaction(force_rollback=True):  # the whole launch, then ROLLBACK
            rolled_back = ui_batch(conn, "INITIALIZING")
            conn.execute("UPDATE batches SET status = 'PENDING' WHERE id = %s", (rolled_back,))
            queued_id = conn.execute(
                "SELECT request_id FROM runbook.trigger_requests WHERE batch_id = %s", (rolled_back,)
            ).fetchone()["request_id"]
        # A later, committed launch is sent; once its response is in, anything the two earlier
        # batches could have caused would have been sent as well.
        barrier = launch_batch(conn)
        wait_for(lambda: responses_of_batch(conn, barrier), 30, "the committed launch's response")
    assert conn.execute("SELECT count(*) AS n FROM runbook.trigger_requests WHERE batch_id = %s", (direct,)).fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM batches WHERE id = %s", (rolled_back,)).fetchone()["n"] == 0
    assert response(conn, queued_id) is None
    sent_ids = {b.get("batch_id") for b in receiver.bodies()}
    assert barrier in sent_ids
    assert direct not in sent_ids and rolled_back not in sent_ids


def test_nothing_listening_records_the_connection_error(stack, conn):
    dead_url = f"http://127.0.0.1:{process.free_port()}/functions/v1/trigger-prefect-orchestrator"
    with trigger_posting_to(stack, dead_url):
        batch_id = launch_batch(conn)
        rows = wait_for(lambda: responses_of_batch(conn, batch_id), 30, "the failed request's response row")
    assert len(rows) == 1
    assert rows[0]["status_code"] is None
    assert rows[0]["timed_out"] is False
    assert rows[0]["error_msg"] == "Couldn't connect to server"


def test_slow_receiver_beyond_the_timeout_is_timed_out(stack, conn, receiver):
    started = time.monotonic()
    req_id = http_post(conn, f"{receiver.url}/sleep/4000", timeout_ms=400)
    row = wait_for(lambda: response(conn, req_id), 30, "the timed-out response row")
    assert time.monotonic() - started < 3.5, "the relay waited for the slow receiver instead of timing out"
    assert row["timed_out"] is True
    assert row["status_code"] is None
    assert row["error_msg"].startswith("Timeout of 400 ms reached")


def test_error_status_is_recorded_and_requests_run_concurrently(stack, conn, receiver):
    failing = http_post(conn, f"{receiver.url}/status/503")
    started = time.monotonic()
    slow = [http_post(conn, f"{receiver.url}/sleep/1500") for _ in range(4)]
    rows = wait_for(lambda: all(response(conn, i) for i in slow) and [response(conn, i) for i in slow], 30, "4 slow responses")
    assert time.monotonic() - started < 4.5, "four 1.5 s requests were not sent concurrently"
    assert all(r["status_code"] == 200 and r["timed_out"] is False for r in rows)
    row = wait_for(lambda: response(conn, failing), 30, "the 503 response")
    assert row["status_code"] == 503 and row["error_msg"] is None
    assert json.loads(row["content"]) == {"received": True, "path": "status"}


def test_query_values_are_not_logged(stack, conn, receiver):
    req_id = http_post(conn, f"{receiver.url}/echo", params={"apikey": "query-secret-value"})
    wait_for(lambda: response(conn, req_id), 30, "the response")
    assert any(r["path"] == "/echo?apikey=query-secret-value" for r in receiver.requests)
    log = stack.log_path("pgnet_relay").read_text()
    assert f"request {req_id} POST {receiver.url}/echo?apikey=*** -> 200" in log
    assert "query-secret-value" not in log


def test_responses_past_the_ttl_are_deleted(stack, conn):
    conn.execute(
        "INSERT INTO net._http_response (id, status_code, timed_out, created) VALUES "
        "(-7, 200, false, now() - interval '7 hours'), (-5, 200, false, now() - interval '5 hours')"
    )
    wait_for(lambda: response(conn, -7) is None, pgnet_relay.CLEANUP_EVERY_SECONDS + 10, "the expired response's deletion")
    assert response(conn, -5) is not None
    conn.execute("DELETE FROM net._http_response WHERE id = -5")


def test_reconnects_after_the_database_drops_its_connections(stack, conn, receiver):
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = %s",
        (pgnet_relay.APPLICATION_NAME,),
    ).fetchone()["n"]
    assert killed == 2  # the LISTEN connection and the work connection
    req_id = http_post(conn, f"{receiver.url}/echo")
    row = wait_for(lambda: response(conn, req_id), 30, "a response after the relay reconnected")
    assert row["status_code"] == 200
    wait_for(lambda: pgnet_relay.health(stack) is None, 30, "the relay to report healthy again")


def test_requests_queued_while_the_relay_is_down_are_sent_when_it_returns(stack, conn, receiver):
    manager.stop_service("pgnet_relay", stack.state)
    try:
        req_id = http_post(conn, f"{receiver.url}/echo")
        wait_for(lambda: pgnet_relay.health(stack) is not None, 30, "the stopped relay to report unhealthy")
        assert response(conn, req_id) is None
        assert conn.execute("SELECT count(*) AS n FROM net.http_request_queue WHERE id = %s", (req_id,)).fetchone()["n"] == 1
    finally:
        manager.up(stack.state, only=["pgnet_relay"], echo=lambda s: None)
    row = wait_for(lambda: response(conn, req_id), 30, "the queued request's response after restart")
    assert row["status_code"] == 200
    assert {r["name"]: r["healthy"] for r in manager.status(stack.state)}["pgnet_relay"] is True
