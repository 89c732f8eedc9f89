"""The sandbox's fault switch, without processes: what each request is turned into, and where the
URLs the sandbox hands out point (through the fault proxy when it runs)."""

from __future__ import annotations

import asyncio

import pytest

from runbook_sandbox import fault_proxy, faults
from runbook_sandbox.config import SandboxConfig
from runbook_sandbox.http_common import BadRequest, HTTPProblem, ServiceFaults, bearer_token, same_secret


def test_urls_name_the_proxy_when_it_runs_and_the_services_themselves_otherwise(tmp_path):
    cfg = SandboxConfig(state_dir=str(tmp_path))
    cfg.postgres.port, cfg.prefect.gateway_port, cfg.git.port, cfg.modal.port = 5001, 5002, 5003, 5004
    assert ":5001/" in cfg.database_url and "127.0.0.1:5002" in cfg.prefect_api_url
    assert cfg.git_base_url.endswith(":5003") and cfg.modal_url.endswith(":5004")
    cfg.proxy.database_port, cfg.proxy.prefect_port, cfg.proxy.git_port, cfg.proxy.modal_port = 6001, 6002, 6003, 6004
    assert cfg.database_url == f"postgresql://postgres:{cfg.postgres.password}@127.0.0.1:6001/postgres"
    assert cfg.postgres.url() .endswith(":5001/postgres")  # the server itself, for set-up and Prefect's storage
    assert "127.0.0.1:6002/api/accounts/" in cfg.prefect_api_url
    assert cfg.prefect_client_settings()["PREFECT_CLOUD_API_URL"] == "http://127.0.0.1:6002/api"
    assert cfg.git_base_url.endswith(":6003") and cfg.modal_url.endswith(":6004")
    cfg.postgres.external_url = "postgresql://app:s3cret@db.example.com:6543/pipeline?sslmode=require"
    assert cfg.database_url == "postgresql://app:s3cret@127.0.0.1:6001/pipeline?sslmode=require"
    assert fault_proxy.ROUTES["database"][1](cfg) == ("db.example.com", 6543)


def test_proxy_faults_are_parsed_strictly():
    assert fault_proxy.parse_fault("database", {"mode": "down"}) == {"mode": "down", "delay_ms": None}
    assert fault_proxy.parse_fault("git", {"mode": "slow"}) == {"mode": "slow", "delay_ms": 3000}
    assert fault_proxy.parse_fault("modal", {"mode": "slow", "delay_ms": 0}) == {"mode": "slow", "delay_ms": 0}
    assert fault_proxy.parse_fault("prefect_api", {"mode": "clear"}) is None
    for route, spec in [("database", {"mode": "error"}), ("database", {"mode": "slow", "delay_ms": -1}),
                        ("database", {"mode": "slow", "delay_ms": True}), ("database", ["down"])]:
        with pytest.raises(BadRequest):
            fault_proxy.parse_fault(route, spec)
    with pytest.raises(HTTPProblem) as exc:
        fault_proxy.parse_fault("redis", {"mode": "down"})
    assert exc.value.status == 404
    assert set(fault_proxy.ROUTES) == set(faults.PROXIED)


def test_service_faults_match_by_prefix_and_count_down():
    sf = ServiceFaults({"api": ("/v1/",), "fn": ("/functions/v1/",)}, {"api": (503, {"message": "down"}), "fn": (503, {})})
    sf.table["api"] = sf.parse("api", {"mode": "error", "status": 500, "count": 2})
    
    def take(path):
        return asyncio.run(sf.take(path))

    assert take("/functions/v1/x") is None
    assert take("/v1/projects/x/secrets").status_code == 500
    assert take("/v1/projects/x/secrets").status_code == 500
    assert take("/v1/projects/x/secrets") is None and sf.table == {}
    sf.table["fn"] = sf.parse("fn", {"mode": "down"})
    assert take("/functions/v1/f").status_code == 503 and take("/v1/x") is None
    assert sf.parse("fn", {"mode": "clear"}) is None
    with pytest.raises(BadRequest):
        sf.parse("fn", {"mode": "error"})  # no status
    with pytest.raises(HTTPProblem):
        sf.parse("nope", {"mode": "down"})


def test_credentials_that_are_not_ascii_are_bad_credentials_not_errors():
    assert bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert bearer_token({"authorization": "Bearer tÃ¶kÃ©n"}) is None  # latin-1 decoded UTF-8, as servers see it
    assert bearer_token({"authorization": "Basic abc"}) is None and bearer_token({}) is None
    assert same_secret("abc", "abc") and not same_secret("äbc", "abc") and not same_secret("", "abc")
    assert not same_secret("\udcff", "abc")  # a lone surrogate does not raise


def test_the_switch_refuses_unknown_services_and_modes_before_any_request(tmp_path):
    with pytest.raises(faults.FaultError, match="unknown service"):
        faults.set_fault("redis", "down", state_dir=tmp_path)
    with pytest.raises(faults.FaultError, match="unknown mode"):
        faults.set_fault("git", "error", state_dir=tmp_path)
    with pytest.raises(faults.FaultError, match="no fault proxy"):
        faults.set_fault("database", "down", state_dir=tmp_path)  # a state dir with no sandbox


def test_the_prefect_gateway_answers_an_error_fault_as_cloud_does_then_lets_requests_through():
    from runbook_sandbox import prefect_gateway

    sf = prefect_gateway.service_faults()
    sf.table["prefect_api"] = sf.parse("prefect_api", {"mode": "error", "status": 503, "count": 1})
    answer = asyncio.run(sf.take("/api/accounts/a/workspaces/w/deployments/filter"))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.body == b'{"detail":"Service Unavailable"}'
    assert asyncio.run(sf.take("/api/accounts/a/workspaces/w/deployments/filter")) is None and sf.table == {}
    sf.table["prefect_api"] = sf.parse("prefect_api", {"mode": "error", "status": 500})
    answer = asyncio.run(sf.take("/api/accounts/a/workspaces/w/flows/x"))
    assert answer.status_code == 500 and "retry-after" not in answer.headers
    assert answer.body == b'{"detail":"Internal Server Error"}'
    assert asyncio.run(sf.take("/_sandbox/health")) is None
    with pytest.raises(BadRequest):
        sf.parse("prefect_api", {"mode": "down"})  # the fault proxy's, at the TCP level


def test_the_switch_takes_status_and_count_only_for_an_http_error(tmp_path):
    with pytest.raises(faults.FaultError, match="apply to the mode `error`"):
        faults.set_fault("prefect_api", "down", status=503, state_dir=tmp_path)
    with pytest.raises(faults.FaultError, match="apply to the mode `error`"):
        faults.set_fault("database", "down", count=1, state_dir=tmp_path)
    with pytest.raises(faults.FaultError, match="prefect_api: the fault switch .* did not answer"):
        faults.set_fault("prefect_api", "error", status=503, count=1, state_dir=tmp_path)  # no sandbox running
