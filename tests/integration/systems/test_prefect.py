"""runbook_lib.systems.prefect against the sandbox's Cloud-shaped gateway: reads, a rejected key explained,
and TLS as Prefect's settings say (the gateway behind a TLS front with a certificate of its own)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    RunbookError,
)
from tests.integration.tls_front import TlsFront, self_signed

OTHER = "33333333-3333-4333-8333-333333333333"


@pytest.mark.timeout(120)
def test_prefect_api_reads_the_workspace_and_explains_a_rejected_key(sandbox_settings):
    from runbook_lib.systems.prefect import PrefectApi

    api = PrefectApi.from_settings(sandbox_settings)
    api.check_access()
    pool = api.read_work_pool("managed-production")
    assert (pool.name, pool.type) == ("managed-production", "prefect:managed")
    assert api.read_work_pool("no-such-pool") is None
    assert api.read_secret_block("modal-token-id") is not None and api.read_secret_block("no-such-block") is None
    value = api.read_secret_value("modal-token-id")
    assert value and redaction.redact(value) == "[redacted:secret block modal-token-id]"

    async def kernel_cell():  # the same client call from inside a running loop
        return api.read_work_pool("managed-production").name

    assert asyncio.run(kernel_cell()) == "managed-production"
    wrong = PrefectApi(sandbox_settings.prefect.api_url, "pnu_not_the_key_000", cloud=True)
    with pytest.raises(RunbookError, match=r"the API key was rejected \(401 Unauthorized\).*check PREFECT_API_KEY"):
        wrong.check_access()
    elsewhere = sandbox_settings.prefect.api_url.replace(sandbox_settings.prefect.workspace_id, OTHER)
    with pytest.raises(RunbookError, match=r"not found \(404\).*PREFECT_WORKSPACE_ID"):
        PrefectApi(elsewhere, sandbox_settings.value("prefect.api_key"), cloud=True).check_access()


# -- TLS: the clients' shared context follows Prefect's settings ----------------------------------------


@pytest.mark.timeout(120)
def test_clients_share_one_tls_context_per_setting_and_verify_as_prefect_says(sandbox_settings, tmp_path):
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    from runbook_lib.systems.prefect import PrefectApi, tls_context

    plain = urlsplit(sandbox_settings.prefect.api_url)
    cert_file, key_file = self_signed(tmp_path)
    front = TlsFront(cert_file, key_file, plain.port)
    try:
        api = PrefectApi(f"https://127.0.0.1:{front.port}{plain.path}", sandbox_settings.value("prefect.api_key"), cloud=True)

        # Verified against the endpoint's certificate: the real API answers over TLS; every call shares one context.
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: str(cert_file)}):
            ours = tls_context()
            assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname
            api.check_access()
            assert api.read_work_pool("managed-production").type == "prefect:managed"
            assert tls_context() is ours
        # The default bundle does not hold that certificate: the call fails, saying why.
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: None}):
            assert tls_context() is not ours
            with pytest.raises(RunbookError, match=r"cannot reach the Prefect API.*CERTIFICATE_VERIFY_FAILED"):
                api.check_access()
        # Verification off, as Prefect's setting says: it answers again.
        with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
            assert tls_context().verify_mode == ssl.CERT_NONE
            api.check_access()
        # A certificate file that changed is read again; one that is missing is named.
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: str(cert_file)}):
            (tmp_path / "renewed").mkdir()
            renewed_cert, _ = self_signed(tmp_path / "renewed")
            cert_file.write_bytes(renewed_cert.read_bytes())
            assert tls_context() is not ours
            with pytest.raises(RunbookError, match="CERTIFICATE_VERIFY_FAILED"):
                api.check_access()  # the front still presents the first certificate
        missing = tmp_path / "no-such-bundle.pem"
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: str(missing)}):
            with pytest.raises(RunbookError, match=rf"No such file or directory: '{missing}'"):
                api.check_access()
    finally:
        front.close()
