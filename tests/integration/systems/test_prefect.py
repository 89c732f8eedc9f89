"""runbook_lib.systems.prefect against the sandbox's Cloud-shaped gateway: reads, a rejected key explained,
and TLS as Prefect's settings say (the gateway behind a TLS front with a certificate of its own)."""

from __future__ import annotations

import asyncio
import ssl
import threading

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    RunbookError,
)

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


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 (and its key), as PEM files: what a private CA's endpoint presents."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runbook test endpoint")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "endpoint.pem", tmp_path / "endpoint.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class _TlsFront:
    """TLS in front of the sandbox's gateway (plain HTTP on loopback): accepts TLS on a free port and
    relays the bytes, so the same Prefect API answers over HTTPS with this certificate."""

    def __init__(self, cert_file, key_file, upstream_port: int):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _relay(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.timeout(120)
def test_clients_share_one_tls_context_per_setting_and_verify_as_prefect_says(sandbox_settings, tmp_path):
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    from runbook_lib.systems.prefect import PrefectApi, tls_context

    plain = urlsplit(sandbox_settings.prefect.api_url)
    cert_file, key_file = _self_signed(tmp_path)
    front = _TlsFront(cert_file, key_file, plain.port)
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
            renewed_cert, _ = _self_signed(tmp_path / "renewed")
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
