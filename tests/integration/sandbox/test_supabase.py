"""The Supabase stand-in's Management API (secrets), over real HTTP: digests, upsert, delete, auth,
validation that changes nothing, rate limit, injected faults, persistence across a restart."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator

import httpx
import pytest
from dotenv import dotenv_values

from runbook_lib.core import processes as process
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig
from runbook_sandbox.faults import admin_headers
from runbook_sandbox.supabase import STALE_DEPLOYMENT_ID
from tests.conftest import partial_sandbox, wait_for

pytestmark = pytest.mark.timeout(120)


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxConfig]:
    """The Supabase stand-in alone, in its own state directory (these tests change its secrets)."""
    with partial_sandbox("runbook-supabase-mgmt-", ["supabase"]) as cfg:
        yield cfg


@pytest.fixture
def api(sb):
    with httpx.Client(
        base_url=sb.supabase_api_url, headers={"Authorization": f"Bearer {sb.supabase.access_token}"},
        timeout=20, trust_env=False,
    ) as client:
        yield client


@pytest.fixture(autouse=True)
def _clean_admin_state(sb):
    """Every test starts and ends without injected faults and with the default rate limit."""
    admin = httpx.Client(base_url=sb.supabase_api_url, headers=admin_headers(sb), timeout=10, trust_env=False)
    admin.delete("/_sandbox/faults")
    admin.post("/_sandbox/rate-limit", json={"limit": 120, "window_seconds": 60})
    yield
    admin.delete("/_sandbox/faults")
    admin.post("/_sandbox/rate-limit", json={"limit": 120, "window_seconds": 60})
    admin.close()


def secrets_path(cfg: SandboxConfig) -> str:
    return f"/v1/projects/{cfg.supabase.project_ref}/secrets"


def listing(api, cfg) -> dict[str, dict]:
    r = api.get(secrets_path(cfg))
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()}


def test_get_lists_digests_of_defaults_and_seeded_prefect_secrets(sb, api):
    r = api.get(secrets_path(sb))
    assert r.status_code == 200
    rows = {row["name"]: row for row in r.json()}
    assert {"SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_DB_URL"} <= set(rows)
    assert rows["SUPABASE_ANON_KEY"]["value"] == sha(sb.supabase.anon_key)
    assert rows["SUPABASE_DB_URL"]["value"] == sha(sb.database_url)
    # Seeded after start from the Prefect side of the config, with the stale deployment id.
    assert rows["PREFECT_API_KEY"]["value"] == sha(sb.prefect.api_key)
    assert rows["PREFECT_ACCOUNT_ID"]["value"] == sha(sb.prefect.account_id)
    assert rows["PREFECT_WORKSPACE_ID"]["value"] == sha(sb.prefect.workspace_id)
    assert rows["PREFECT_API_URL"]["value"] == sha(sb.prefect_api_url)
    assert rows["PREFECT_DEPLOYMENT_ID"]["value"] == sha(STALE_DEPLOYMENT_ID)
    assert all(row["updated_at"] for row in rows.values())
    # Never the plaintext.
    assert sb.prefect.api_key not in r.text and sb.supabase.service_role_key not in r.text
    assert int(r.headers["x-ratelimit-limit"]) == 120
    assert 0 <= int(r.headers["x-ratelimit-remaining"]) < 120
    assert 0 < int(r.headers["x-ratelimit-reset"]) <= 60


def test_post_upserts_and_delete_removes(sb, api):
    path = secrets_path(sb)
    r = api.post(path, json=[{"name": "MGMT_TEST_A", "value": "first"}, {"name": "MGMT_TEST_B", "value": "b"}])
    assert r.status_code == 201 and r.content == b""
    rows = listing(api, sb)
    assert rows["MGMT_TEST_A"]["value"] == sha("first") and rows["MGMT_TEST_B"]["value"] == sha("b")
    first_update = rows["MGMT_TEST_A"]["updated_at"]

    time.sleep(0.01)
    assert api.post(path, json=[{"name": "MGMT_TEST_A", "value": "second"}]).status_code == 201
    rows = listing(api, sb)
    assert rows["MGMT_TEST_A"]["value"] == sha("second")
    assert rows["MGMT_TEST_A"]["updated_at"] > first_update
    assert rows["MGMT_TEST_B"]["value"] == sha("b")

    r = api.request("DELETE", path, json=["MGMT_TEST_A", "MGMT_TEST_B"])
    assert r.status_code == 200
    rows = listing(api, sb)
    assert "MGMT_TEST_A" not in rows and "MGMT_TEST_B" not in rows


def test_limits_are_inclusive(sb, api):
    name = "L" * 256
    assert api.post(secrets_path(sb), json=[{"name": name, "value": "v" * 24576}]).status_code == 201
    assert listing(api, sb)[name]["value"] == sha("v" * 24576)
    assert api.request("DELETE", secrets_path(sb), json=[name]).status_code == 200


def test_secrets_file_is_private_and_persistent(sb, api):
    assert api.post(secrets_path(sb), json=[{"name": "MGMT_PERSIST", "value": "kept"}]).status_code == 201
    path = sb.state / "supabase" / "secrets.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["secrets"]["MGMT_PERSIST"]["value"] == "kept"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sbp_wrong"}, {"Authorization": "Basic abc"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_bad_token_is_401_and_changes_nothing(sb, api, headers):
    before = listing(api, sb)
    with httpx.Client(base_url=sb.supabase_api_url, headers=headers, trust_env=False, timeout=10) as anon:
        r = anon.get(secrets_path(sb))
        assert r.status_code == 401 and r.json() == {"message": "Unauthorized"}
        r = anon.post(secrets_path(sb), json=[{"name": "INTRUDER", "value": "x"}])
        assert r.status_code == 401
        r = anon.request("DELETE", secrets_path(sb), json=["PREFECT_API_KEY"])
        assert r.status_code == 401
    assert listing(api, sb) == before


def test_unknown_ref_is_404_and_malformed_ref_is_400(sb, api):
    other = "a" * 20 if sb.supabase.project_ref != "a" * 20 else "b" * 20
    r = api.get(f"/v1/projects/{other}/secrets")
    assert r.status_code == 404 and "not found" in r.json()["message"]
    for bad in ["short", "A" * 20, "abcdefghijklmnopqrs1"]:
        r = api.get(f"/v1/projects/{bad}/secrets")
        assert r.status_code == 400, bad
        assert "20 lowercase letters" in r.json()["message"]


@pytest.mark.parametrize(
    "body, message",
    [
        ([{"name": "SUPABASE_CUSTOM", "value": "x"}], "SUPABASE_"),
        ([{"name": "N" * 257, "value": "x"}], "256"),
        ([{"name": "TOO_LONG", "value": "v" * 24577}], "24576"),
        ([{"name": "", "value": "x"}], "empty"),
        ([{"name": "HAS-DASH", "value": "x"}], "letters, digits and underscores"),
        ([{"name": "NO_VALUE"}], '"value"'),
        ([{"name": "NUMBER", "value": 3}], "string"),
        ({"name": "NOT_A_LIST", "value": "x"}, "array"),
        ([], "non-empty"),
        ("not json", "valid JSON"),
        # A valid first item is not applied when a later one is refused.
        ([{"name": "MGMT_VALID", "value": "x"}, {"name": "SUPABASE_URL", "value": "y"}], "SUPABASE_"),
    ],
    ids=["reserved-prefix", "long-name", "long-value", "empty-name", "bad-chars", "missing-value",
         "non-string", "object", "empty-list", "not-json", "partly-valid"],
)
def test_invalid_post_is_400_and_changes_nothing(sb, api, body, message):
    before = listing(api, sb)
    content = body if isinstance(body, str) else json.dumps(body)
    r = api.post(secrets_path(sb), content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    assert listing(api, sb) == before


@pytest.mark.parametrize(
    "body", [["SUPABASE_URL"], [""], "PREFECT_API_KEY", [], [3]], ids=["reserved", "empty", "string", "empty-list", "number"]
)
def test_invalid_delete_is_400_and_changes_nothing(sb, api, body):
    before = listing(api, sb)
    r = api.request("DELETE", secrets_path(sb), json=body)
    assert r.status_code == 400 and r.json()["message"]
    assert listing(api, sb) == before


def test_rate_limit_answers_429_with_headers_then_recovers(sb, api):
    admin = httpx.Client(base_url=sb.supabase_api_url, headers=admin_headers(sb), timeout=10, trust_env=False)
    assert admin.post("/_sandbox/rate-limit", json={"limit": 3, "window_seconds": 1.5}).json() == {
        "limit": 3, "window_seconds": 1.5,
    }
    answers = [api.get(secrets_path(sb)) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    limited = answers[-1]
    assert limited.headers["x-ratelimit-limit"] == "3"
    assert 0 < int(limited.headers["x-ratelimit-reset"]) <= 2  # seconds, rounded up
    # A refused write is not applied.
    assert api.post(secrets_path(sb), json=[{"name": "MGMT_LIMITED", "value": "x"}]).status_code == 429
    time.sleep(1.6)  # the 1.5 s window has passed
    after = api.get(secrets_path(sb))
    assert after.status_code == 200 and "MGMT_LIMITED" not in {r["name"] for r in after.json()}
    assert admin.post("/_sandbox/rate-limit", json={"limit": 0}).status_code == 400
    admin.close()


def test_faults_script_429_then_success_and_persisting_500(sb, api):
    admin = httpx.Client(base_url=sb.supabase_api_url, headers=admin_headers(sb), timeout=10, trust_env=False)
    path = secrets_path(sb)
    r = admin.post("/_sandbox/faults", json={"path": path, "status": 429, "count": 1})
    assert r.status_code == 201
    first, second = api.get(path), api.get(path)
    assert first.status_code == 429 and first.headers["x-ratelimit-remaining"] == "0"
    assert "x-ratelimit-limit" in first.headers and "x-ratelimit-reset" in first.headers
    assert second.status_code == 200

    admin.post("/_sandbox/faults", json={"path": path, "status": 500, "count": None, "method": "POST"})
    for _ in range(3):
        assert api.post(path, json=[{"name": "MGMT_FAULTED", "value": "x"}]).status_code == 500
    assert api.get(path).status_code == 200  # only POST is faulted
    assert len(admin.get("/_sandbox/faults").json()) == 1
    assert admin.delete("/_sandbox/faults").json() == {"cleared": 1}
    assert api.post(path, json=[{"name": "MGMT_FAULTED", "value": "x"}]).status_code == 201
    assert "MGMT_FAULTED" in listing(api, sb)

    assert admin.post("/_sandbox/faults", json={"path": path, "status": 99}).status_code == 400
    assert admin.post("/_sandbox/faults", json={"path": "relative", "status": 500}).status_code == 400
    admin.close()


def test_request_log_has_one_line_per_request_and_no_secrets(sb, api):
    log = sb.request_log_path("supabase")
    before = len(log.read_text().splitlines())
    api.get(secrets_path(sb))
    api.post(secrets_path(sb), json=[{"name": "MGMT_LOGGED", "value": "plain-secret-value-123"}])

    def logged() -> list[dict] | None:
        # The stand-in writes a request's line once it has answered: wait for the POST's, with a deadline.
        lines = [json.loads(line) for line in log.read_text().splitlines()[before:]]
        ours = [line for line in lines if line["path"] == secrets_path(sb)]
        return lines if [(line["method"], line["status"]) for line in ours][-2:] == [("GET", 200), ("POST", 201)] else None

    lines = wait_for(logged, 30, "the GET's and the POST's lines in the request log")
    assert all({"time", "method", "path", "status"} <= set(line) for line in lines)
    for path in [log, sb.log_path("supabase"), sb.log_path("edge-function")]:
        text = path.read_text() if path.exists() else ""
        for secret in ["plain-secret-value-123", sb.supabase.access_token, sb.prefect.api_key]:
            assert secret not in text, f"a secret leaked into {path}"


def test_exports_in_sandbox_env(sb):
    env = dotenv_values(sb.state / "sandbox.env")
    assert env["SUPABASE_API_URL"] == sb.supabase_api_url
    assert env["SUPABASE_ACCESS_TOKEN"] == sb.supabase.access_token
    assert env["SUPABASE_PROJECT_REF"] == sb.supabase.project_ref
    assert env["SUPABASE_FUNCTIONS_URL"] == sb.functions_url
    assert env["SUPABASE_ANON_KEY"] == sb.supabase.anon_key
    assert env["SUPABASE_EDGE_FUNCTION_URL"] == sb.edge_function_url


def test_restart_keeps_secrets_written_by_the_runbook_and_leaves_nothing(sb, api):
    path = secrets_path(sb)
    written = [
        {"name": "PREFECT_DEPLOYMENT_ID", "value": "11111111-1111-4111-8111-111111111111"},
        {"name": "MGMT_PERSIST", "value": "kept"},
    ]
    assert api.post(path, json=written).status_code == 201
    old_pid = manager.read_state(sb)["services"]["supabase"]["pid"]
    # The write restarts Deno in the background: wait for the new process.
    deadline = time.monotonic() + 15
    deno_before: list[int] = []
    while not deno_before and time.monotonic() < deadline:
        deno_before = [p.pid for p in process.processes_of(sb.instance_id) if p.name() == "deno"]
        time.sleep(0.1)
    assert deno_before, "the Edge Function's Deno process should be running"

    manager.stop_service("supabase", sb.state)
    assert not process.is_alive(old_pid)
    assert [p for p in process.processes_of(sb.instance_id) if p.pid in deno_before] == []

    manager.up(sb.state, only=["supabase"], echo=lambda s: None)
    cfg = SandboxConfig.load_or_create(sb.state)  # ports may have changed
    with httpx.Client(
        base_url=cfg.supabase_api_url, headers={"Authorization": f"Bearer {cfg.supabase.access_token}"},
        timeout=20, trust_env=False,
    ) as again:
        rows = listing(again, cfg)
    assert rows["PREFECT_DEPLOYMENT_ID"]["value"] == sha("11111111-1111-4111-8111-111111111111")
    assert rows["MGMT_PERSIST"]["value"] == sha("kept")
    assert rows["PREFECT_API_KEY"]["value"] == sha(cfg.prefect.api_key)
