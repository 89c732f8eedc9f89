"""The Edge Function `trigger-prefect-orchestrator` in real Deno behind the Supabase stand-in's functions
gateway. Its upstream here is a small HTTP server of the test's own, standing where Prefect Cloud's API
would be (PREFECT_API_URL is pointed at it through the Management API)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import httpx
import jwt
import pytest

from runbook_lib.core import processes as process
from runbook_sandbox.config import SandboxConfig
from tests.conftest import partial_sandbox

pytestmark = pytest.mark.timeout(120)

DEPLOYMENT_ID = "6f1d5a4e-0000-4000-8000-0000000000aa"


class ScriptedUpstream:
    """A loopback HTTP server recording each request and answering the scripted (status, body)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status, self.body = 201, {}
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                upstream.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": json.loads(raw)}
                )
                payload = json.dumps(upstream.body).encode()
                self.send_response(upstream.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/api/accounts/acc/workspaces/ws"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxConfig]:
    with partial_sandbox("runbook-supabase-fn-", ["supabase"]) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def upstream():
    server = ScriptedUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def mgmt(sb):
    """Sets and deletes the function's secrets through the Management API."""
    url = f"{sb.supabase_api_url}/v1/projects/{sb.supabase.project_ref}/secrets"
    client = httpx.Client(headers={"Authorization": f"Bearer {sb.supabase.access_token}"}, timeout=20, trust_env=False)

    class Mgmt:
        def set(self, **values):
            r = client.post(url, json=[{"name": k, "value": v} for k, v in values.items()])
            assert r.status_code == 201, r.text

        def delete(self, *names):
            r = client.request("DELETE", url, json=list(names))
            assert r.status_code == 200, r.text

    yield Mgmt()
    client.close()


@pytest.fixture(autouse=True)
def pointed_at_upstream(mgmt, upstream, sb):
    """Each test starts with every secret set, PREFECT_API_URL on the test upstream answering 201."""
    mgmt.set(
        PREFECT_API_URL=upstream.base, PREFECT_DEPLOYMENT_ID=DEPLOYMENT_ID, PREFECT_API_KEY=sb.prefect.api_key,
        PREFECT_ACCOUNT_ID=sb.prefect.account_id, PREFECT_WORKSPACE_ID=sb.prefect.workspace_id,
    )
    upstream.requests.clear()
    upstream.status, upstream.body = 201, {}


def call(sb, *, method="POST", token="anon", body=None, name=None, headers=None):
    url = f"{sb.functions_url}/{name or sb.supabase.function_name}"
    hdrs = dict(headers or {})
    if token == "anon":
        hdrs["Authorization"] = f"Bearer {sb.supabase.anon_key}"
    elif token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    return httpx.request(method, url, json=body, headers=hdrs, timeout=30, trust_env=False)


def test_gateway_refuses_missing_and_bad_jwt(sb, upstream):
    r = call(sb, token=None, body={"batch_id": "x"})
    assert r.status_code == 401 and r.json()["message"] == "Missing authorization header"
    forged = jwt.encode({"role": "anon", "ref": sb.supabase.project_ref}, "not-the-project-secret-but-long-enough-for-hs256", algorithm="HS256")
    expired = jwt.encode({"role": "anon", "exp": int(time.time()) - 10}, sb.supabase.jwt_secret, algorithm="HS256")
    no_role = jwt.encode({"sub": "someone"}, sb.supabase.jwt_secret, algorithm="HS256")
    for token in [forged, expired, no_role, "not-a-jwt"]:
        r = call(sb, token=token, body={"batch_id": "x"})
        assert r.status_code == 401 and r.json()["message"] == "Invalid JWT", token
    assert upstream.requests == []
    # The service role key is accepted like the anon key.
    assert call(sb, token=sb.supabase.service_role_key, body={}).status_code == 400


def test_unknown_function_is_404(sb):
    r = call(sb, name="no-such-function", body={"batch_id": "x"})
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"


def test_non_post_is_405_and_options_answers_cors(sb):
    r = call(sb, method="GET")
    assert r.status_code == 405 and r.json() == {"error": "Method not allowed"}
    pre = httpx.request("OPTIONS", sb.edge_function_url, timeout=30, trust_env=False)  # no JWT on preflight
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "authorization" in pre.headers["access-control-allow-headers"]


@pytest.mark.parametrize("body", [{}, {"batch_id": ""}, {"other": 1}, [1]], ids=["empty", "blank", "other", "list"])
def test_missing_batch_id_is_400(sb, upstream, body):
    r = call(sb, body=body)
    assert r.status_code == 400 and "batch_id" in r.json()["error"]
    assert upstream.requests == []


def test_body_that_is_not_json_is_400(sb, upstream):
    r = httpx.post(
        sb.edge_function_url, content=b"batch_id=1", timeout=30, trust_env=False,
        headers={"Authorization": f"Bearer {sb.supabase.anon_key}"},
    )
    assert r.status_code == 400
    assert upstream.requests == []


@pytest.mark.parametrize("missing", ["PREFECT_DEPLOYMENT_ID", "PREFECT_API_KEY"])
def test_missing_secret_is_500_configuration_error(sb, mgmt, upstream, missing):
    mgmt.delete(missing)
    r = call(sb, body={"batch_id": "b-1"})
    assert r.status_code == 500
    assert r.json() == {"error": "Server configuration error", "missing": [missing]}
    assert upstream.requests == []
    # Restoring it (the autouse fixture does so for later tests) makes the next call work.
    mgmt.set(**{missing: DEPLOYMENT_ID if missing == "PREFECT_DEPLOYMENT_ID" else sb.prefect.api_key})
    upstream.body = {"id": str(uuid.uuid4())}
    assert call(sb, body={"batch_id": "b-1"}).status_code == 200


def test_success_creates_a_flow_run_with_the_production_request(sb, upstream):
    flow_run_id = str(uuid.uuid4())
    upstream.status = 201
    upstream.body = {"id": flow_run_id, "deployment_id": DEPLOYMENT_ID, "state": {"type": "SCHEDULED"}}
    batch_id = str(uuid.uuid4())
    r = call(sb, body={"batch_id": batch_id})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True and out["batch_id"] == batch_id and out["flow_run_id"] == flow_run_id
    assert batch_id in out["message"]

    [seen] = upstream.requests
    assert seen["path"] == f"/api/accounts/acc/workspaces/ws/deployments/{DEPLOYMENT_ID}/create_flow_run"
    assert seen["headers"]["authorization"] == f"Bearer {sb.prefect.api_key}"
    assert seen["body"] == {"state": {"type": "SCHEDULED", "message": f"Triggered by Supabase for batch {batch_id}"}}
    assert "parameters" not in seen["body"]  # production passes none


def test_prefect_error_is_500_with_its_status_and_details(sb, upstream):
    upstream.status, upstream.body = 404, {"detail": "Deployment not found"}
    r = call(sb, body={"batch_id": "b-404"})
    assert r.status_code == 500
    out = r.json()
    assert out["error"] == "Failed to trigger Prefect flow run" and out["status"] == 404
    assert "Deployment not found" in out["details"]
    assert len(upstream.requests) == 1


def test_unreachable_prefect_is_500_with_a_502_status(sb, mgmt, upstream):
    closed_port = process.free_port()
    mgmt.set(PREFECT_API_URL=f"http://127.0.0.1:{closed_port}/api")
    r = call(sb, body={"batch_id": "b-down"})
    assert r.status_code == 500
    out = r.json()
    assert out["error"] == "Failed to trigger Prefect flow run" and out["status"] == 502
    assert out["details"]
    assert upstream.requests == []


def test_a_secret_change_reaches_the_next_request(sb, mgmt, upstream):
    upstream.body = {"id": str(uuid.uuid4())}
    assert call(sb, body={"batch_id": "b-old"}).status_code == 200
    new_id, new_key = str(uuid.uuid4()), "pnu_rotated_" + uuid.uuid4().hex
    mgmt.set(PREFECT_DEPLOYMENT_ID=new_id, PREFECT_API_KEY=new_key)
    assert call(sb, body={"batch_id": "b-new"}).status_code == 200
    old, new = upstream.requests
    assert f"/deployments/{DEPLOYMENT_ID}/" in old["path"]
    assert f"/deployments/{new_id}/" in new["path"]
    assert new["headers"]["authorization"] == f"Bearer {new_key}"
    # The Management API shows the digest of what the function now uses.
    with httpx.Client(trust_env=False, timeout=20) as c:
        rows = c.get(
            f"{sb.supabase_api_url}/v1/projects/{sb.supabase.project_ref}/secrets",
            headers={"Authorization": f"Bearer {sb.supabase.access_token}"},
        ).json()
    digests = {row["name"]: row["value"] for row in rows}
    assert digests["PREFECT_DEPLOYMENT_ID"] == hashlib.sha256(new_id.encode()).hexdigest()


def test_no_secret_value_in_logs(sb):
    texts = [
        p.read_text()
        for p in [sb.log_path("supabase"), sb.log_path("edge-function"), sb.request_log_path("supabase")]
        if p.exists()
    ]
    assert texts and "Listening on" in sb.log_path("edge-function").read_text()
    for text in texts:
        for secret in [sb.prefect.api_key, sb.supabase.access_token, sb.supabase.anon_key, sb.supabase.jwt_secret]:
            assert secret not in text
