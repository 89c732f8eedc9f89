"""The shared TLS contexts (runbook_lib/core/tls.py): one per setting and file, however many threads ask at once."""

from __future__ import annotations

import shutil
import ssl
import threading

import certifi

from runbook_lib.core import tls


def test_threads_asking_at_once_share_one_context_built_once(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle.pem"  # a file no earlier test asked for: not built yet
    shutil.copy(certifi.where(), bundle)
    create_default_context = ssl.create_default_context
    built = []
    monkeypatch.setattr(ssl, "create_default_context",
                        lambda *a, **k: built.append(k) or create_default_context(*a, **k))
    start = threading.Barrier(8)
    got: list[ssl.SSLContext] = []

    def ask() -> None:
        start.wait()
        got.append(tls.verified(cafile=str(bundle)))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(ctx is got[0] for ctx in got)
    assert built == [{"cafile": str(bundle), "capath": None}]
    # The file changed: built again, once.
    bundle.write_text(bundle.read_text() + "\n")
    assert tls.verified(cafile=str(bundle)) is not got[0] and len(built) == 2
