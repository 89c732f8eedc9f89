"""runbook_lib.systems.supabase against the Management API stand-in: upsert, list, delete, retries, TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess

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


# -- TLS: the clients share one context and verify as httpx does ------------------------------------------


@pytest.mark.timeout(120)
def test_clients_share_one_tls_context_and_verify_as_httpx_does(sandbox_settings, tmp_path, monkeypatch):
    """The Management API stand-in behind a TLS front with a certificate of its own: httpx's rules pick
    what verifies it (SSL_CERT_FILE, else SSL_CERT_DIR, else certifi), every client of the process uses
    one context per setting, and a renewed certificate file is read again."""
    from urllib.parse import urlsplit

    from runbook_lib.core import tls
    from runbook_lib.systems.supabase import SupabaseManagementApi
    from tests.integration.tls_front import TlsFront, self_signed

    create_default_context = ssl.create_default_context
    cert_file, key_file = self_signed(tmp_path)
    front = TlsFront(cert_file, key_file, urlsplit(sandbox_settings.supabase.api_url).port)
    token, ref = sandbox_settings.value("supabase.access_token"), sandbox_settings.value("supabase.project_ref")

    def api() -> SupabaseManagementApi:
        return SupabaseManagementApi(f"https://127.0.0.1:{front.port}", token, ref, max_attempts=1)

    try:
        # SSL_CERT_FILE names the endpoint's certificate (and wins over SSL_CERT_DIR, here a directory without it):
        # the API answers over TLS; a second client loads nothing.
        other_dir = tmp_path / "other-certs"
        other_dir.mkdir()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        monkeypatch.setenv("SSL_CERT_DIR", str(other_dir))
        with api() as first:
            assert any(s.name == "SUPABASE_URL" for s in first.list_secrets())
        built = []
        monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(k) or create_default_context(*a, **k))
        with api() as second:
            second.list_secrets()
        assert built == [] and tls.httpx_default().verify_mode == ssl.CERT_REQUIRED
        # Without it, SSL_CERT_DIR: a directory holding the certificate (by its subject hash, as OpenSSL looks
        # it up) verifies it, one without it does not; without either, certifi's bundle does not.
        monkeypatch.delenv("SSL_CERT_FILE")
        hashed = tmp_path / "certs"
        hashed.mkdir()
        subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(cert_file)], check=True,
                                      capture_output=True, text=True).stdout.strip()
        shutil.copy(cert_file, hashed / f"{subject_hash}.0")
        monkeypatch.setenv("SSL_CERT_DIR", str(hashed))
        with api() as client:
            client.list_secrets()
        monkeypatch.setenv("SSL_CERT_DIR", str(other_dir))
        with api() as client, pytest.raises(SupabaseApiError, match="CERTIFICATE_VERIFY_FAILED"):
            client.list_secrets()
        monkeypatch.delenv("SSL_CERT_DIR")
        with api() as client, pytest.raises(SupabaseApiError, match="CERTIFICATE_VERIFY_FAILED"):
            client.list_secrets()
        # A renewed file is read again (and fails: the front still presents the first certificate).
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        (tmp_path / "renewed").mkdir()
        cert_file.write_bytes(self_signed(tmp_path / "renewed")[0].read_bytes())
        with api() as client, pytest.raises(SupabaseApiError, match="CERTIFICATE_VERIFY_FAILED"):
            client.list_secrets()
        # A missing file is named, as httpx names it.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
        with pytest.raises(FileNotFoundError, match="no-such-bundle.pem"):
            api()
    finally:
        front.close()
