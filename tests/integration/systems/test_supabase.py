"""runbook_lib.systems.supabase against the Management API stand-in: upsert, list, delete, retries."""

from __future__ import annotations

import httpx
import pytest

from runbook_lib.core.errors import (
    SupabaseApiError,
)


@pytest.mark.timeout(120)
def test_supabase_api_upserts_lists_and_deletes_secrets(sandbox_settings):
    from runbook_lib.systems.supabase import SupabaseManagementApi

    with SupabaseManagementApi.from_settings(sandbox_settings) as api:
        api.upsert_secrets({"RUNBOOK_CORE_TEST": "core-test-value"})
        try:
            listed = api.secret_digests()["RUNBOOK_CORE_TEST"]
            assert listed.matches("core-test-value") and not listed.matches("other")
        finally:
            api.delete_secrets(["RUNBOOK_CORE_TEST"])
        assert "RUNBOOK_CORE_TEST" not in api.secret_digests()
    bad = SupabaseManagementApi(sandbox_settings.supabase.api_url, "sbp_not_the_token_0", sandbox_settings.supabase.project_ref)
    with bad, pytest.raises(SupabaseApiError, match=r"rejected \(401\): check SUPABASE_ACCESS_TOKEN"):
        bad.list_secrets()

@pytest.mark.timeout(120)
def test_supabase_api_retries_rate_limits_and_server_errors(sandbox_settings, sandbox):
    from runbook_lib.systems.supabase import SupabaseManagementApi
    from runbook_sandbox.faults import admin_headers

    admin = admin_headers(sandbox)

    base = sandbox_settings.supabase.api_url
    path = f"/v1/projects/{sandbox_settings.supabase.project_ref}/secrets"
    waits: list[float] = []
    try:
        httpx.post(f"{base}/_sandbox/faults", json={"path": path, "status": 429, "count": 2}, headers=admin, timeout=10, trust_env=False).raise_for_status()
        with SupabaseManagementApi.from_settings(sandbox_settings, sleep=waits.append, max_wait=30) as api:
            assert any(s.name == "SUPABASE_URL" for s in api.list_secrets())
            assert len(waits) == 2 and all(0 < w <= 30 for w in waits)  # waited what the headers said, capped
            httpx.post(f"{base}/_sandbox/faults", json={"path": path, "status": 503, "count": None}, headers=admin, timeout=10, trust_env=False).raise_for_status()
            with pytest.raises(SupabaseApiError, match=r"server error 503 after 6 attempts"):
                api.list_secrets()
    finally:
        httpx.delete(f"{base}/_sandbox/faults", headers=admin, timeout=10, trust_env=False)
