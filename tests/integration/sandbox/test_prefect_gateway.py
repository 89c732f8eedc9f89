"""Prefect Cloud with a managed work pool, on loopback: the real Prefect server behind the
Cloud-shaped gateway, the `managed-production` pool and its worker.

Everything goes over the real protocols: plain httpx as the Edge Function does, raw WebSockets, and
prefect's own client, `flow.from_source(...).deploy()` and event clients in subprocesses configured
only by the sandbox's `sandbox.env` (never this process's settings). The flow deployed is a tiny
probe repository served by the sandbox git server (a local bare repository when no git server is
registered); its module imports `jwt` (pyjwt: installed in this .venv but not in prefect's
dependency closure), so whether the managed runtime can import it depends on `pip_packages` only.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from dotenv import dotenv_values

from runbook_lib.core import processes as process
from runbook_sandbox import managed_runtime, manager, prefect_gateway
from runbook_sandbox.config import SandboxConfig
from tests.conftest import wait_for

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ENTRYPOINT = "src/orchestrator.py:orchestrator_main"
PROBE_FLOW = '''\
import hashlib
import os
import time

import jwt
from prefect import flow, get_run_logger


@flow
def orchestrator_main(batch_size: int = 50, expect_x_sha256: str = "", sleep_seconds: float = 0):
    """Probe: fails unless X holds the resolved secret and jwt comes from the run's pip_packages."""
    if hashlib.sha256(os.environ.get("X", "").encode()).hexdigest() != expect_x_sha256:
        raise RuntimeError("X is not the resolved secret")
    if "managed-envs" not in jwt.__file__:
        raise RuntimeError(f"jwt was imported from {jwt.__file__}, not from pip_packages")
    time.sleep(sleep_seconds)
    get_run_logger().info("probe ok, batch_size=%s", batch_size)
    return batch_size
'''

DEPLOY_SCRIPT = """
import json, sys
from prefect import flow
spec = json.loads(sys.argv[1])
ids = []
for name, job_variables in spec["deployments"]:
    ids.append(str(flow.from_source(spec["source"], spec["entrypoint"]).deploy(
        name=name, work_pool_name="managed-production", job_variables=job_variables,
        print_next_steps=False)))
print("RESULT " + json.dumps(ids))
"""

EVENTS_SCRIPT = """
import asyncio, sys
from prefect.events import Event
from prefect.events.clients import get_events_client, get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

async def main(tag):
    resource = f"runbook.probe.{tag}"
    flt = EventFilter(event=EventNameFilter(name=["runbook.sandbox.probe"]), resource=EventResourceFilter(id=[resource]))
    async with get_events_subscriber(filter=flt) as subscriber:
        async with get_events_client() as client:
            await client.emit(Event(event="runbook.sandbox.probe", resource={"prefect.resource.id": resource}))
        print("CLIENTS", type(client).__name__, type(subscriber).__name__, flush=True)
        async for event in subscriber:
            print("RECEIVED", event.resource.id, flush=True)
            return

asyncio.run(asyncio.wait_for(main(sys.argv[1]), 40))
"""


# -- helpers ---------------------------------------------------------------------------------------


def make_probe_repo(bare: Path) -> None:
    """A bare git repository whose `main` holds the probe flow at the production entrypoint."""
    work = bare.parent / (bare.name.removesuffix(".git") + "-work")
    (work / "src").mkdir(parents=True)
    (work / "src" / "orchestrator.py").write_text(PROBE_FLOW)
    git = ["git", "-c", "user.name=Runbook Tests", "-c", "user.email=tests@example.invalid"]
    subprocess.run(git + ["init", "-q", "-b", "main", str(work)], check=True, timeout=30)
    subprocess.run(git + ["-C", str(work), "add", "."], check=True, timeout=30)
    subprocess.run(git + ["-C", str(work), "commit", "-q", "-m", "probe flow"], check=True, timeout=30)
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, timeout=30)


def prefect_subprocess(env_values: dict[str, str], home: Path, script: str, *args: str, timeout: float = 120):
    """Run a Python snippet with the sandbox's settings as a user would export them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(env_values)
    env["PREFECT_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def deploy(env_values, home, source: str, deployments: list) -> list[str]:
    spec = {"source": source, "entrypoint": ENTRYPOINT, "deployments": deployments}
    proc = prefect_subprocess(env_values, home, DEPLOY_SCRIPT, json.dumps(spec))
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(results[0].removeprefix("RESULT "))


def api_client(cfg: SandboxConfig) -> httpx.Client:
    return httpx.Client(
        base_url=cfg.prefect_api_url + "/", headers={"Authorization": f"Bearer {cfg.prefect.api_key}"}, timeout=30
    )


def create_flow_run(cfg: SandboxConfig, deployment_id: str, parameters: dict | None = None) -> dict:
    """What the Edge Function does: a plain POST with the API key."""
    body = {"state": {"type": "SCHEDULED", "message": "Triggered by runbook tests"}}
    if parameters:
        body["parameters"] = parameters
    r = httpx.post(
        f"{cfg.prefect_api_url}/deployments/{deployment_id}/create_flow_run",
        headers={"Authorization": f"Bearer {cfg.prefect.api_key}"},
        json=body,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()


def wait_for_state(api: httpx.Client, run_id: str, types: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = api.get(f"flow_runs/{run_id}").json()
        if run["state"]["type"] in types:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run_id} still {run['state']} after {timeout}s")
        time.sleep(0.5)


def run_logs(api: httpx.Client, run_id: str) -> str:
    r = api.post("logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"})
    r.raise_for_status()
    return "\n".join(entry["message"] for entry in r.json())


def wait_for_logs(api: httpx.Client, run_id: str, needles: list[str], timeout: float = 20) -> str:
    """Logs reach the API in batches: wait until every needle is there."""
    deadline = time.monotonic() + timeout
    while True:
        text = run_logs(api, run_id)
        if all(n in text for n in needles):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"logs of {run_id} lack {needles}:\n{text[-3000:]}")
        time.sleep(0.5)


def probe_parameters(cfg: SandboxConfig, **extra) -> dict:
    return {"expect_x_sha256": hashlib.sha256(cfg.modal.token_id.encode()).hexdigest(), **extra}


# -- fixtures --------------------------------------------------------------------------------------

SECRET_ENV = {"X": "{{ prefect.blocks.secret.modal-token-id }}"}


@pytest.fixture(scope="module")
def api(sandbox):
    with api_client(sandbox) as client:
        yield client


@pytest.fixture(scope="module")
def client_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-client-home")


@pytest.fixture(scope="module")
def probe_source(sandbox, tmp_path_factory) -> str:
    """The probe repository's clone URL (ends in .git), on the git server when it runs."""
    if "git_server" in manager.SERVICE_MODULES:
        make_probe_repo(sandbox.state / "git" / "runbook-tests" / "managed-probe.git")
        return f"{sandbox.git_base_url}/runbook-tests/managed-probe.git"
    bare = tmp_path_factory.mktemp("repos") / "managed-probe.git"
    make_probe_repo(bare)
    return f"file://{bare}"


@pytest.fixture(scope="module")
def deployments(sandbox, sandbox_env, client_home, probe_source) -> dict[str, str]:
    """The probe deployed under four job-variable sets (and `probe-ok` twice: same id)."""
    specs = [
        ("probe-ok", {"pip_packages": ["pyjwt"], "env": SECRET_ENV}),
        ("probe-no-pip", {"pip_packages": [], "env": SECRET_ENV}),
        ("probe-missing-block", {"pip_packages": ["pyjwt"], "env": {"X": "{{ prefect.blocks.secret.no-such-block }}"}}),
        ("probe-bad-package", {"pip_packages": ["pyjwt==0.0.0.1"], "env": SECRET_ENV}),
        ("probe-ok", {"pip_packages": ["pyjwt"], "env": SECRET_ENV}),
    ]
    ids = deploy(sandbox_env, client_home, probe_source, specs)
    assert ids[0] == ids[-1], "redeploying the same flow and deployment name must keep the deployment id"
    return {name: dep_id for (name, _), dep_id in zip(specs, ids)}


# -- the gateway -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_gateway_requires_the_api_key_and_logs_requests_without_it(sandbox):
    base = sandbox.prefect_api_url
    assert httpx.get(f"{base}/health", timeout=10).status_code == 401
    assert httpx.get(f"{base}/health", headers={"Authorization": "Bearer pnu_wrong"}, timeout=10).status_code == 401
    assert httpx.get(f"{base}/health", headers={"Authorization": sandbox.prefect.api_key}, timeout=10).status_code == 401
    ok = httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {sandbox.prefect.api_key}"}, timeout=10)
    assert ok.status_code == 200 and ok.json() is True
    other = base.replace(sandbox.prefect.workspace_id, "00000000-0000-4000-8000-000000000000")
    assert httpx.get(f"{other}/health", headers={"Authorization": f"Bearer {sandbox.prefect.api_key}"}, timeout=10).status_code == 404
    # An unknown deployment is a 404, as at Cloud.
    r = httpx.post(
        f"{base}/deployments/00000000-0000-4000-8000-00000000dead/create_flow_run",
        headers={"Authorization": f"Bearer {sandbox.prefect.api_key}"}, json={}, timeout=10,
    )
    assert r.status_code == 404

    log_text = sandbox.request_log_path("prefect").read_text()
    records = [json.loads(line) for line in log_text.splitlines()]
    health = [r for r in records if r["path"].endswith(f"/workspaces/{sandbox.prefect.workspace_id}/health")]
    assert [r["status"] for r in health[-4:]] == [401, 401, 401, 200]
    assert all({"time", "method", "path", "status"} <= set(r) for r in records)
    assert sandbox.prefect.api_key not in log_text


@pytest.mark.timeout(60)
def test_gateway_authenticates_websockets_like_cloud(sandbox):
    ws_base = sandbox.prefect_api_url.replace("http://", "ws://")
    key = sandbox.prefect.api_key

    async def scenario():
        # A bad bearer header is refused at the upgrade.
        with pytest.raises(websockets.InvalidStatus) as bad_header:
            async with websockets.connect(
                f"{ws_base}/events/in", additional_headers={"Authorization": "Bearer pnu_wrong"}, open_timeout=10
            ):
                pass
        assert bad_header.value.response.status_code == 401
        # No credential at all, and no auth handshake offered: refused too.
        with pytest.raises(websockets.InvalidStatus) as anonymous:
            async with websockets.connect(f"{ws_base}/events/in", open_timeout=10):
                pass
        assert anonymous.value.response.status_code == 401
        # The "prefect" subprotocol's auth message with a bad key: closed with 1008.
        async with websockets.connect(
            f"{ws_base}/events/out", subprotocols=[websockets.Subprotocol("prefect")], open_timeout=10
        ) as ws:
            await ws.send(json.dumps({"type": "auth", "token": "pnu_wrong"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 1008
        # With the key: the server's own handshake answers.
        async with websockets.connect(
            f"{ws_base}/events/out", subprotocols=[websockets.Subprotocol("prefect")], open_timeout=10
        ) as ws:
            await ws.send(json.dumps({"type": "auth", "token": key}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "auth_success"}

    asyncio.run(scenario())
    records = [json.loads(line) for line in sandbox.request_log_path("prefect").read_text().splitlines()]
    ws_statuses = [r["status"] for r in records if r["method"] == "WEBSOCKET"]
    assert 401 in ws_statuses and 101 in ws_statuses
    assert key not in sandbox.request_log_path("prefect").read_text()


def raw_get(cfg: SandboxConfig, path: str, accept_encoding: str | None) -> tuple[int, dict[str, str], bytes]:
    """GET `path` under the workspace API with http.client, sending exactly the Accept-Encoding given
    (None: no such header; http.client would add `identity` on its own). Returns status, headers
    (lower-case names) and the body as it came over the wire (only the chunked framing undone)."""
    url = urlsplit(f"{cfg.prefect_api_url}/{path}")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("GET", url.path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {cfg.prefect.api_key}")
        if accept_encoding is not None:
            conn.putheader("Accept-Encoding", accept_encoding)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


IDENTITY_ASKS = [None, "identity", "gzip;q=0", "br", "deflate, identity;q=0.5"]
GZIP_ASKS = ["gzip", "gzip, deflate", "deflate;q=0.5, gzip;q=0.8", "*"]


def test_accepts_gzip_reads_the_header_like_rfc_9110():
    for header in IDENTITY_ASKS + ["", "x-gzip;q=0", "*;q=0", "gzip;q=0, *"]:
        assert not prefect_gateway.accepts_gzip(header), header
    for header in GZIP_ASKS + ["GZIP", "x-gzip", "br, *;q=0.1", "gzip;q=0.001", "gzip; q=1.0"]:
        assert prefect_gateway.accepts_gzip(header), header


@pytest.mark.timeout(60)
def test_gateway_answers_gzip_only_to_clients_that_accept_it(sandbox):
    """Like Cloud: a client that does not ask for gzip (curl without --compressed) gets plain JSON."""
    path = f"work_pools/{sandbox.prefect.work_pool}"  # a JSON body well above the server's gzip threshold
    for accept in IDENTITY_ASKS:
        status, headers, body = raw_get(sandbox, path, accept)
        assert status == 200, (accept, status, body[:200])
        assert "content-encoding" not in headers, (accept, headers)
        assert int(headers["content-length"]) == len(body), (accept, headers)
        assert not body.startswith(b"\x1f\x8b"), accept
        assert json.loads(body)["name"] == sandbox.prefect.work_pool
    plain = json.loads(raw_get(sandbox, path, None)[2])
    for accept in GZIP_ASKS:
        status, headers, body = raw_get(sandbox, path, accept)
        assert status == 200 and headers.get("content-encoding") == "gzip", (accept, headers)
        assert body.startswith(b"\x1f\x8b") and int(headers["content-length"]) == len(body), (accept, headers)
        assert json.loads(gzip.decompress(body)) == plain


@pytest.mark.timeout(90)
def test_a_streamed_answer_stays_streamed_in_either_encoding(sandbox, api, unique):
    """The server's CSV log download is a streamed body: chunked, plain or gzip as the client asked."""
    flow_id = api.post("flows/", json={"name": f"gateway-encoding-{unique}"}).raise_for_status().json()["id"]
    run_id = api.post("flow_runs/", json={"flow_id": flow_id, "name": f"encoding-{unique}"}).raise_for_status().json()["id"]
    now = datetime.now(timezone.utc).isoformat()
    messages = [f"log line {i:04d} of the streamed download {unique} " + "x" * 40 for i in range(300)]
    logs = [{"name": "probe", "level": 20, "message": m, "timestamp": now, "flow_run_id": run_id} for m in messages]
    api.post("logs/", json=logs).raise_for_status()

    path = f"flow_runs/{run_id}/logs/download"
    status, headers, plain = raw_get(sandbox, path, None)
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers, headers
    assert "content-encoding" not in headers and not plain.startswith(b"\x1f\x8b")
    text = plain.decode()
    assert all(m in text for m in messages)

    status, headers, compressed = raw_get(sandbox, path, "gzip")
    assert status == 200 and headers.get("content-encoding") == "gzip", headers
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers, headers
    assert gzip.decompress(compressed) == plain


@pytest.mark.timeout(90)
def test_prefect_event_clients_stream_through_the_gateway(sandbox_env, client_home, unique):
    """prefect 3.9.1's own clients: events in (bearer header) and out (auth message)."""
    proc = prefect_subprocess(sandbox_env, client_home, EVENTS_SCRIPT, unique, timeout=70)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CLIENTS PrefectCloudEventsClient PrefectCloudEventSubscriber" in proc.stdout
    assert f"RECEIVED runbook.probe.{unique}" in proc.stdout


@pytest.mark.timeout(60)
def test_managed_pool_and_secret_blocks_exist_idempotently(sandbox, api):
    pool = api.get(f"work_pools/{sandbox.prefect.work_pool}").json()
    assert pool["type"] == "prefect:managed"
    variables = pool["base_job_template"]["variables"]["properties"]
    assert variables["pip_packages"]["type"] == "array"
    assert variables["pip_packages"]["items"] == {"type": "string"}
    assert {"env", "image", "pip_packages"} <= set(variables)
    assert pool["base_job_template"]["job_configuration"]["pip_packages"] == "{{ pip_packages }}"

    def blocks() -> dict[str, dict]:
        out = {}
        for name in prefect_gateway.SECRET_BLOCKS:
            r = api.get(f"block_types/slug/secret/block_documents/name/{name}", params={"include_secrets": "true"})
            assert r.status_code == 200, (name, r.text)
            out[name] = r.json()
        return out

    before = blocks()
    assert before["postgres-connection-string"]["data"]["value"] == sandbox.database_url
    assert before["modal-token-id"]["data"]["value"] == sandbox.modal.token_id
    assert before["modal-token-secret"]["data"]["value"] == sandbox.modal.token_secret
    # `sandbox up` again: same pool, same blocks, nothing duplicated.
    prefect_gateway.after_start(sandbox)
    after = blocks()
    assert {n: b["id"] for n, b in after.items()} == {n: b["id"] for n, b in before.items()}
    assert api.get(f"work_pools/{sandbox.prefect.work_pool}").json()["id"] == pool["id"]


# -- deploying and running -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_deployed_run_triggered_like_the_edge_function_completes(sandbox, api, deployments):
    run = create_flow_run(sandbox, deployments["probe-ok"], probe_parameters(sandbox))
    assert run["work_pool_name"] == "managed-production" and run["deployment_id"] == deployments["probe-ok"]
    picked = wait_for_state(api, run["id"], {"PENDING", "RUNNING"} | FINAL_STATES, timeout=15)
    assert picked["state"]["type"] != "SCHEDULED"
    final = wait_for_state(api, run["id"], FINAL_STATES, timeout=180)
    assert final["state"]["type"] == "COMPLETED", (final["state"], run_logs(api, run["id"])[-3000:])
    logs = wait_for_logs(api, run["id"], ["git_clone", "probe ok, batch_size=50"])
    assert "pip_packages ['pyjwt']" in logs
    assert sandbox.modal.token_id not in logs


@pytest.mark.timeout(120)
def test_flow_module_missing_from_pip_packages_fails_the_run(sandbox, api, deployments):
    run = create_flow_run(sandbox, deployments["probe-no-pip"], probe_parameters(sandbox))
    final = wait_for_state(api, run["id"], FINAL_STATES, timeout=90)
    assert final["state"]["type"] in {"FAILED", "CRASHED"}
    wait_for_logs(api, run["id"], ["ModuleNotFoundError", "No module named 'jwt'"])


@pytest.mark.timeout(90)
def test_missing_secret_block_crashes_the_run_naming_the_block(sandbox, api, deployments):
    run = create_flow_run(sandbox, deployments["probe-missing-block"], probe_parameters(sandbox))
    final = wait_for_state(api, run["id"], FINAL_STATES, timeout=60)
    assert final["state"]["type"] == "CRASHED"
    assert "no-such-block" in final["state"]["message"]


@pytest.mark.timeout(240)
def test_bad_pip_package_crashes_the_run_with_pips_error(sandbox, api, deployments):
    run = create_flow_run(sandbox, deployments["probe-bad-package"], probe_parameters(sandbox))
    final = wait_for_state(api, run["id"], FINAL_STATES, timeout=200)
    assert final["state"]["type"] == "CRASHED"
    pip_error = "No matching distribution found for pyjwt==0.0.0.1"
    assert pip_error in final["state"]["message"]
    wait_for_logs(api, run["id"], [pip_error])


@pytest.mark.timeout(240)
def test_paused_pool_holds_runs_until_resumed(sandbox, api, deployments):
    pool = f"work_pools/{sandbox.prefect.work_pool}"
    assert api.patch(pool, json={"is_paused": True}).status_code == 204
    try:
        assert api.get(pool).json()["status"] == "PAUSED"
        requests = sandbox.request_log_path("prefect")
        seen = len(requests.read_text().splitlines())
        run = create_flow_run(sandbox, deployments["probe-ok"], probe_parameters(sandbox))

        def polls() -> int:
            lines = [json.loads(line) for line in requests.read_text().splitlines()[seen:]]
            return sum(1 for line in lines if line["path"].endswith(f"/{pool}/get_scheduled_flow_runs"))

        # The worker asks at the run's Scheduled event, then at its fallback poll (every few seconds).
        wait_for(lambda: polls() >= 2, 60, "two requests for the paused pool's runs by the worker")
        held = api.get(f"flow_runs/{run['id']}").json()
        assert held["state"]["type"] == "SCHEDULED", held["state"]
        assert "submitting flow run" not in run_logs(api, run["id"])
    finally:
        assert api.patch(pool, json={"is_paused": False}).status_code == 204
    final = wait_for_state(api, run["id"], FINAL_STATES, timeout=180)
    assert final["state"]["type"] == "COMPLETED", final["state"]


PICKUP_SCRIPT = r"""
import asyncio, contextlib, io, json, sys
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from runbook_sandbox.managed_worker import pick_up_on_events

followed, other = sys.argv[1], sys.argv[2]


class Worker:
    # What pick_up_on_events asks of the managed worker, counted.
    asked = 0

    async def get_and_submit_flow_runs(self):
        Worker.asked += 1
        return []


async def until(predicate, what, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@flow(name="pickup-probe")
def probe():
    pass


async def main():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        follower = asyncio.create_task(pick_up_on_events(Worker(), followed))
        await until(lambda: "following" in out.getvalue(), "the subscription")
        async with get_client() as client:
            for pool in (followed, other):
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = await client.create_flow(probe)
            runs = {}
            for pool in (other, followed):
                deployment = await client.create_deployment(flow_id=flow_id, name=f"probe-{pool}", work_pool_name=pool)
                runs[pool] = str((await client.create_flow_run_from_deployment(deployment)).id)
            await until(lambda: runs[followed] in out.getvalue(), "the followed pool's run")
            paused_at = len(out.getvalue().splitlines())
            await client.update_work_pool(followed, WorkPoolUpdate(is_paused=True))
            await client.update_work_pool(followed, WorkPoolUpdate(is_paused=False))
            await until(lambda: len(out.getvalue().splitlines()) > paused_at, "the pool resumed")
            for pool in (followed, other):
                await client.delete_work_pool(pool)
        follower.cancel()
    print(json.dumps({"lines": out.getvalue().splitlines(), "runs": runs, "paused_at": paused_at,
                      "asked": Worker.asked}))


asyncio.run(main())
"""


@pytest.mark.timeout(120)
def test_the_managed_worker_asks_for_runs_on_its_pools_events_only(sandbox_env, client_home):
    """The worker's pick-up follows its pool's events through the gateway's `/events/out`: a run
    scheduled on the pool, the pool resumed; not another pool's run, not the pause itself."""
    suffix = os.urandom(3).hex()
    followed, other = f"pickup-{suffix}", f"pickup-other-{suffix}"
    proc = prefect_subprocess(sandbox_env, client_home, PICKUP_SCRIPT, followed, other, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines, runs = result["lines"], result["runs"]
    assert lines[0] == f"managed_worker: following {followed}'s events for pickups"
    asked = lines[1:]
    assert any(f"on prefect.flow-run.Scheduled (prefect.flow-run.{runs[followed]}) picked up nothing new" == line
               .removeprefix("managed_worker: ") for line in asked), lines
    assert not any(runs[other] in line for line in lines), lines
    after_pause = lines[result["paused_at"]:]
    assert after_pause and all("prefect.work-pool.not-ready" in line for line in after_pause), lines
    assert not any(word in line for line in lines for word in ("paused", "created", "deleted")), lines
    assert result["asked"] == len(asked)


@pytest.mark.timeout(120)
def test_source_without_dot_git_fails_to_deploy(sandbox, sandbox_env, client_home, probe_source, api):
    no_git = probe_source.removesuffix(".git")
    spec = {"source": no_git, "entrypoint": ENTRYPOINT, "deployments": [["probe-no-dot-git", {}]]}
    proc = prefect_subprocess(sandbox_env, client_home, DEPLOY_SCRIPT, json.dumps(spec))
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert api.get("deployments/name/orchestrator-main/probe-no-dot-git").status_code == 404


@pytest.mark.timeout(120)
def test_pip_packages_must_be_a_list(sandbox, sandbox_env, client_home, probe_source, api):
    spec = {"source": probe_source, "entrypoint": ENTRYPOINT, "deployments": [["probe-str-pip", {"pip_packages": "pyjwt"}]]}
    proc = prefect_subprocess(sandbox_env, client_home, DEPLOY_SCRIPT, json.dumps(spec))
    assert proc.returncode != 0
    assert "422" in proc.stderr and "pip_packages" in proc.stderr
    assert api.get("deployments/name/orchestrator-main/probe-str-pip").status_code == 404


def test_import_guard_hides_installed_distributions_outside_the_image(tmp_path):
    """The guard on its own: modal and psycopg2 are in this .venv but not in the managed image."""
    blocked = managed_runtime.write_blocked_modules(tmp_path / "blocked.json")
    assert {"modal", "psycopg2", "jwt"} <= set(json.loads(blocked.read_text()))
    assert not {"prefect", "dotenv", "httpx", "pydantic"} & set(json.loads(blocked.read_text()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(managed_runtime.runtime_environment(None, blocked))
    code = (
        "import importlib\n"
        "for name in ['modal', 'psycopg2', 'jwt', 'dotenv', 'prefect']:\n"
        "    try:\n"
        "        importlib.import_module(name); print(name, 'ok')\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(name, 'missing', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "modal missing No module named 'modal'" in out
    assert "psycopg2 missing" in out and "jwt missing" in out
    assert "dotenv ok" in out and "prefect ok" in out
    assert managed_runtime.split_requirements(["prefect", "python-dotenv", "psycopg2-binary", "modal"]) == (
        ["psycopg2-binary", "modal"], ["prefect", "python-dotenv"],
    )


# -- lifecycle -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_restarts_a_killed_service_and_down_leaves_no_process(tmp_path):
    """A separate sandbox (Postgres, Prefect, gateway, worker) so the shared one is not disturbed.

    Its state lives outside pytest's temporary root, which another pytest session may make private
    (mode 0700) at any moment, locking out Postgres's unprivileged user.
    """
    state = Path(tempfile.mkdtemp(prefix="runbook-sandbox-test-"))
    only = ["postgres", "prefect_server", "prefect_gateway", "managed_worker"]
    cfg = None
    try:
        manager.up(state, only=only, echo=lambda s: None)
        cfg = SandboxConfig.load_or_create(state)
        worker_pid = manager.read_state(cfg)["services"]["managed_worker"]["pid"]
        os.kill(worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process.is_alive(worker_pid) and time.monotonic() < deadline:
            process.reap(worker_pid)
            time.sleep(0.1)
        rows = {row["name"]: row for row in manager.status(state)}
        assert not rows["managed_worker"]["healthy"]
        assert "not running" in rows["managed_worker"]["reason"]
        lines: list[str] = []
        manager.up(state, only=only, echo=lines.append)
        assert any(ln.split()[0] == "managed_worker" and "restarting" in ln for ln in lines), lines
        assert all(row["healthy"] for row in manager.status(state) if row["name"] in only)

        # A long flow run in flight when the sandbox goes down.
        bare = tmp_path / "repos" / "managed-probe.git"
        make_probe_repo(bare)
        env_values = {k: v for k, v in dotenv_values(state / "sandbox.env").items() if v is not None}
        (dep_id,) = deploy(env_values, tmp_path / "home", f"file://{bare}", [["probe-sleep", {"pip_packages": ["pyjwt"], "env": SECRET_ENV}]])
        run = create_flow_run(cfg, dep_id, probe_parameters(cfg, sleep_seconds=300))
        with api_client(cfg) as api:
            wait_for_state(api, run["id"], {"RUNNING"} | FINAL_STATES, timeout=120)
            assert api.get(f"flow_runs/{run['id']}").json()["state"]["type"] == "RUNNING"
        flow_processes = [
            p for p in process.processes_of(cfg.instance_id) if "prefect" in " ".join(p.cmdline()) and "engine" in " ".join(p.cmdline())
        ]
        assert flow_processes, [p.cmdline() for p in process.processes_of(cfg.instance_id)]
        # The run's manifest (its environment, secrets included) is inside the sandbox's state.
        assert list((cfg.state / "prefect" / "worker" / "tmp").glob("prefect-workspace-attempt-*"))
    finally:
        manager.down(state, echo=lambda s: None, purge=True)
    assert cfg is not None
    assert process.processes_of(cfg.instance_id) == []
