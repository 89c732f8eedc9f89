"""runbook_lib.systems.supabase without a server: inputs refused before any request, the retry delay from the rate-limit headers."""

from __future__ import annotations

import httpx
import pytest

from runbook_lib.core.errors import (
    SupabaseApiError,
)


def test_supabase_inputs_are_validated_before_any_request():
    from runbook_lib.systems.supabase import SupabaseManagementApi, secret_digest

    calls = []
    api = SupabaseManagementApi("http://127.0.0.1:9", "sbp_token0123456789", "abcdefghijklmnopqrst", sleep=calls.append)
    with api:
        with pytest.raises(SupabaseApiError, match="starts with SUPABASE_, which is reserved"):
            api.upsert_secrets({"PREFECT_DEPLOYMENT_ID": "x", "SUPABASE_URL": "y"})
        with pytest.raises(SupabaseApiError, match="longer than 24576"):
            api.upsert_secrets({"BIG": "x" * 24577})
        with pytest.raises(SupabaseApiError, match="invalid secret name '1BAD'"):
            api.delete_secrets(["1BAD"])
    assert calls == []  # nothing was even attempted
    with pytest.raises(SupabaseApiError, match="not 20 lowercase letters"):
        SupabaseManagementApi("http://127.0.0.1:9", "sbp_t0123", "ABC")
    assert secret_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

def test_supabase_retry_delay_honours_the_rate_limit_headers():
    import time

    from runbook_lib.systems.supabase import SupabaseManagementApi

    api = SupabaseManagementApi("http://127.0.0.1:9", "sbp_token0123456789", "abcdefghijklmnopqrst", max_wait=30)
    delay = lambda headers: api.retry_delay(httpx.Response(429, headers=headers), attempt=1)  # noqa: E731
    assert delay({"retry-after": "7"}) == 7
    assert delay({"retry-after": "120"}) == 30  # capped
    assert delay({"x-ratelimit-reset": "4"}) == 4  # seconds, as Supabase documents it
    assert delay({"x-ratelimit-reset": "4500"}) == 4.5  # no window lasts 4500 s: milliseconds
    assert 8 <= delay({"x-ratelimit-reset": str(int(time.time()) + 10)}) <= 10
    assert 8 <= delay({"x-ratelimit-reset": str(int(time.time() * 1000) + 10000)}) <= 10
    assert 0.5 <= delay({}) <= 0.6
    api.close()


def test_the_attempts_per_request_are_the_settings_unless_the_caller_sets_its_own(make_settings):
    from runbook_lib.systems.supabase import MAX_ATTEMPTS, SupabaseManagementApi

    environ = {"SUPABASE_ACCESS_TOKEN": "sbp_token0123456789", "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
               "SUPABASE_API_URL": "http://127.0.0.1:9"}  # nothing listens: every attempt is refused
    for extra, kwargs, attempts in [({}, {}, MAX_ATTEMPTS), ({"RUNBOOK_SUPABASE__MAX_ATTEMPTS": "2"}, {}, 2),
                                    ({"RUNBOOK_SUPABASE__MAX_ATTEMPTS": "2"}, {"max_attempts": 3}, 3)]:
        waits: list[float] = []
        with SupabaseManagementApi.from_settings(make_settings({**environ, **extra}), sleep=waits.append, **kwargs) as api:
            with pytest.raises(SupabaseApiError, match="cannot reach http://127.0.0.1:9"):
                api.secret_digests()
        assert len(waits) == attempts - 1, (extra, kwargs, waits)  # a wait between two attempts
