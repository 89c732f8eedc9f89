"""The sandbox's fault switch (`runbook_sandbox.faults`, `runbook sandbox fault`): each service cut
alone, over real sockets, and put back; the fault proxy's modes; the admin token on every
`/_sandbox/*` endpoint; a non-ASCII Authorization header is a 401 everywhere, as on the real services.

Every fault is set on the session's shared sandbox through the `sandbox_fault` fixture (undone
whatever happens)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import psycopg
import pytest

from runbook_sandbox import faults, prefect_gateway

NON_ASCII = "Bearer tökén-€".encode()


def db_error(sandbox) -> str | None:
    """None when the pipeline's database answers through DATABASE_URL, else the error's first line."""
    try:
        with psycopg.connect(sandbox.database_url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


def prefect_status(sandbox) -> int | str:
    with prefect_gateway.api(sandbox) as client:
        try:
            return client.get(f"work_pools/{sandbox.prefect.work_pool}").status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__


def git_refs(sandbox) -> int | str:
    try:
        return httpx.get(f"{sandbox.repo_url}/info/refs?service=git-upload-pack", timeout=10).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def modal_status(sandbox) -> int | str:
    headers = {"x-modal-token-id": sandbox.modal.token_id, "x-modal-token-secret": sandbox.modal.token_secret}
    try:
        return httpx.get(f"{sandbox.modal_url}/v1/function_calls/fc-none", headers=headers, timeout=10).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def supabase_status(sandbox) -> int | str:
    url = f"{sandbox.supabase_api_url}/v1/projects/{sandbox.supabase.project_ref}/secrets"
    try:
        return httpx.get(url, headers={"Authorization": f"Bearer {sandbox.supabase.access_token}"}, timeout=10).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def function_status(sandbox) -> int | str:
    try:
        return httpx.options(sandbox.edge_function_url, timeout=10).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def everything(sandbox) -> dict[str, object]:
    return {
        "database": db_error(sandbox) is None, "prefect_api": prefect_status(sandbox), "git": git_refs(sandbox),
        "modal": modal_status(sandbox), "supabase_api": supabase_status(sandbox),
        "edge_function": function_status(sandbox),
    }


HEALTHY = {"database": True, "prefect_api": 200, "git": 200, "modal": 404, "supabase_api": 200, "edge_function": 200}


# -- one service down, every other one up -------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("service", faults.SERVICES)
def test_one_service_down_leaves_every_other_one_up(service, sandbox, sandbox_fault):
    assert everything(sandbox) == HEALTHY
    with sandbox_fault(service, "down"):
        active = faults.active(state_dir=sandbox.state)
        assert set(active) == {service} and active[service]["mode"] == "down"
        seen = everything(sandbox)
        assert {k: v for k, v in seen.items() if k != service} == {k: v for k, v in HEALTHY.items() if k != service}
        assert seen[service] != HEALTHY[service]
        if service in faults.PROXIED and service != "database":
            assert seen[service] == "ConnectError"  # refused, as a stopped service
        if service in faults.HTTP_LEVEL:
            assert seen[service] == 503
    assert faults.active(state_dir=sandbox.state) == {}
    assert everything(sandbox) == HEALTHY


def test_database_down_is_connection_refused_and_prefect_keeps_its_own_storage(sandbox, sandbox_fault):
    """The issue's case: the pipeline's database cut, the Prefect API (whose server keeps its data in
    the same Postgres, reached directly) still reads and writes."""
    with sandbox_fault("database", "down"):
        assert "Connection refused" in db_error(sandbox)
        with prefect_gateway.api(sandbox) as client:
            r = client.post("variables/", json={"name": f"fault_probe_{os.getpid()}_{time.monotonic_ns()}", "value": "x"})
            assert r.status_code == 201, r.text  # a write to Prefect's own database
            client.delete(f"variables/name/{r.json()['name']}").raise_for_status()
    assert db_error(sandbox) is None


def test_prefect_down_leaves_the_database_up(sandbox, sandbox_fault):
    with sandbox_fault("prefect_api", "down"):
        assert prefect_status(sandbox) == "ConnectError"
        assert db_error(sandbox) is None


# -- the proxy's modes --------------------------------------------------------------------------------


def test_reset_accepts_then_resets_and_drops_open_connections(sandbox, sandbox_fault):
    conn = psycopg.connect(sandbox.database_url, autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with sandbox_fault("database", "reset"):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")  # the open connection was dropped
            error = db_error(sandbox)
            assert error is not None and "refused" not in error  # accepted, then closed
    finally:
        conn.close()
    assert db_error(sandbox) is None


def test_down_drops_open_connections_too(sandbox, sandbox_fault):
    conn = psycopg.connect(sandbox.database_url, autocommit=True)
    try:
        with sandbox_fault("database", "down"), pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()


def test_slow_delays_every_exchange_and_clear_restores_speed(sandbox, sandbox_fault):
    with sandbox_fault("prefect_api", "slow", delay_ms=700) as fault:
        assert fault == {"mode": "slow", "delay_ms": 700}
        started = time.monotonic()
        assert prefect_status(sandbox) == 200  # slow, yet answered
        assert time.monotonic() - started >= 0.7 * 2  # the new connection, then the answer
        # A client's connect timeout expires.
        with sandbox_fault("database", "slow", delay_ms=3000), pytest.raises(psycopg.OperationalError):
            psycopg.connect(sandbox.database_url, connect_timeout=2).close()
    assert faults.active(state_dir=sandbox.state) == {}
    assert prefect_status(sandbox) == 200
    assert db_error(sandbox) is None


def test_a_slow_fault_lifted_or_replaced_lets_what_it_holds_go_at_once(sandbox, sandbox_fault):
    """A request held by a slow fault (the Supabase stand-in's, HTTP; the fault proxy's, TCP) is answered
    when the fault is lifted, not a minute later (by then another test could be reading the request log),
    and under what is set then."""
    def held(probe) -> tuple[threading.Thread, list]:
        answer: list = []
        thread = threading.Thread(target=lambda: answer.append(probe(sandbox)), daemon=True)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and answer == []  # held: a request here is otherwise answered in milliseconds
        return thread, answer

    for service, probe in (("supabase_api", supabase_status), ("git", git_refs)):
        with sandbox_fault(service, "slow", delay_ms=60_000):
            thread, answer = held(probe)
        lifted = time.monotonic()
        thread.join(20)
        # Well before the fault's minute (the probes give up after 10 s), with room for a busy machine.
        assert answer == [200] and time.monotonic() - lifted < 15, (service, answer)

    with sandbox_fault("supabase_api", "slow", delay_ms=60_000):
        thread, answer = held(supabase_status)
        faults.set_fault("supabase_api", "error", state_dir=sandbox.state, status=500)
        thread.join(20)
        assert answer == [500]  # the fault set now answers it


def test_http_level_error_for_count_requests_then_fine(sandbox, sandbox_fault):
    with sandbox_fault("supabase_api", "error", status=500, count=2):
        assert [supabase_status(sandbox) for _ in range(3)] == [500, 500, 200]
        assert faults.active(state_dir=sandbox.state) == {}  # used up
    with sandbox_fault("edge_function", "reset"):
        assert function_status(sandbox) in ("RemoteProtocolError", "ReadError")
        assert supabase_status(sandbox) == 200


def test_bad_fault_requests_are_refused_and_change_nothing(sandbox):
    with pytest.raises(faults.FaultError, match="unknown service"):
        faults.set_fault("redis", "down", state_dir=sandbox.state)
    with pytest.raises(faults.FaultError, match="unknown mode"):
        faults.set_fault("database", "explode", state_dir=sandbox.state)
    with pytest.raises(faults.FaultError, match="unknown mode"):
        faults.set_fault("database", "error", state_dir=sandbox.state, status=500)
    with pytest.raises(faults.FaultError, match="400"):
        faults.set_fault("database", "slow", state_dir=sandbox.state, delay_ms=-1)
    with pytest.raises(faults.FaultError, match="400"):
        faults.set_fault("edge_function", "error", state_dir=sandbox.state)  # no status
    assert faults.active(state_dir=sandbox.state) == {}


def test_the_command_line_switch(sandbox):
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, RUNBOOK_SANDBOX_DIR=str(sandbox.state))
        return subprocess.run([sys.executable, "-m", "runbook_lib", "sandbox", *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)

    try:
        out = cli("fault", "git", "down")
        assert out.returncode == 0, out.stderr
        assert git_refs(sandbox) == "ConnectError"
        assert '"mode": "down"' in cli("faults").stdout
        assert cli("fault", "git", "sideways").returncode == 1
        assert cli("fault", "all", "clear").returncode == 0
        assert "no fault" in cli("faults").stdout
        assert git_refs(sandbox) == 200
    finally:
        faults.clear_all(state_dir=sandbox.state)


# -- the admin token and non-ASCII credentials --------------------------------------------------------


def test_sandbox_endpoints_need_the_admin_token(sandbox):
    proxy = f"http://127.0.0.1:{sandbox.proxy.control_port}"
    endpoints = [
        ("GET", f"{sandbox.supabase_api_url}/_sandbox/faults"),
        ("DELETE", f"{sandbox.supabase_api_url}/_sandbox/faults"),
        ("GET", f"{sandbox.supabase_api_url}/_sandbox/rate-limit"),
        ("GET", f"{sandbox.supabase_api_url}/_sandbox/service-faults"),
        ("GET", f"{sandbox.modal_url}/_sandbox/faults"),
        ("GET", f"{sandbox.modal_url}/_sandbox/calls"),
        ("GET", f"{proxy}/_sandbox/faults"),
    ]
    for method, url in endpoints:
        for headers in ({}, {"x-sandbox-token": "sbx_wrong"}, {"x-sandbox-token": "sbx_é".encode()},
                        {"Authorization": f"Bearer {sandbox.supabase.access_token}"}):
            assert httpx.request(method, url, headers=headers, timeout=10).status_code == 401, (method, url, headers)
        assert httpx.request(method, url, headers=faults.admin_headers(sandbox), timeout=10).status_code == 200, url
    r = httpx.post(f"{sandbox.supabase_api_url}/_sandbox/rate-limit", json={"limit": 1}, timeout=10)
    assert r.status_code == 401  # and the limit is unchanged:
    assert [supabase_status(sandbox) for _ in range(2)] == [200, 200]
    r = httpx.put(f"{sandbox.modal_url}/_sandbox/settings", json={"complete_delay_ms": 1}, timeout=10)
    assert r.status_code == 401
    for url in (f"{sandbox.supabase_api_url}/_sandbox/health", f"{sandbox.modal_url}/_sandbox/health", f"{proxy}/_sandbox/health"):
        assert httpx.get(url, timeout=10).status_code == 200  # health probes stay open


def test_a_non_ascii_authorization_header_is_401_not_500(sandbox):
    requests = {
        "prefect_api": ("GET", f"{sandbox.prefect_api_url}/work_pools/{sandbox.prefect.work_pool}", {"Authorization": NON_ASCII}),
        "supabase_api": ("GET", f"{sandbox.supabase_api_url}/v1/projects/{sandbox.supabase.project_ref}/secrets",
                         {"Authorization": NON_ASCII}),
        "edge_function": ("POST", sandbox.edge_function_url, {"Authorization": NON_ASCII}),
        "git": ("GET", f"{sandbox.repo_url}/info/refs?service=git-receive-pack", {"Authorization": "Basic ÿé€".encode()}),
        "modal": ("GET", f"{sandbox.modal_url}/v1/function_calls/fc-none",
                  {"x-modal-token-id": "ak-é".encode(), "x-modal-token-secret": "as-€".encode()}),
        "modal_half": ("GET", f"{sandbox.modal_url}/v1/function_calls/fc-none",
                       {"x-modal-token-id": sandbox.modal.token_id, "x-modal-token-secret": "as-€".encode()}),
    }
    for name, (method, url, headers) in requests.items():
        r = httpx.request(method, url, headers=headers, timeout=15)
        assert r.status_code == 401, (name, r.status_code, r.text[:200])
    # The git server's 401 is GitHub's: a Basic challenge.
    r = httpx.get(requests["git"][1], headers=requests["git"][2], timeout=15)
    assert r.headers["www-authenticate"] == 'Basic realm="GitHub"'
