"""The TLS contexts a process's HTTP clients share, built by the rules each client library applies.

An httpx client (Prefect's are httpx clients too) given no context builds its own, loading the CA
bundle: 20-35 ms of CPU on this machine, more than the rest of a short call's client side. A context
given to a client is used as it is, so clients that verify the same way share one here. Which
certificates verify is read at each call, by the library's own rules, and a context is kept per
setting and per file: a certificate file or directory that changed (size or modification time) is
loaded again, and a missing one raises, naming it.

The bottom layer: the standard library, and certifi's bundle when no setting names one.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading


def httpx_default() -> ssl.SSLContext:
    """The context httpx builds for a client with its defaults (`verify=True`, `trust_env=True`):
    the file `SSL_CERT_FILE` names, else the directory `SSL_CERT_DIR` names, else certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return verified(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return verified(capath=os.environ["SSL_CERT_DIR"])
    return verified()


def verified(*, cafile: str | None = None, capath: str | None = None) -> ssl.SSLContext:
    """A verifying context (hostname checked) trusting the certificates of `cafile` or `capath`; with
    neither, certifi's bundle (what httpx and Prefect's client fall back to)."""
    if not (cafile or capath):
        import certifi

        cafile = certifi.where()
    stat = os.stat(cafile or capath)  # a missing file: FileNotFoundError, naming it
    return _verified(cafile, capath, stat.st_size, stat.st_mtime_ns)


_building = threading.Lock()


def _verified(cafile: str | None, capath: str | None, *version: int) -> ssl.SSLContext:
    # Threads asking at once (`sandbox up` probes its services from one thread each) wait for one
    # build instead of each loading the bundle: lru_cache alone lets every first caller build its own.
    with _building:
        return _build_verified(cafile, capath, *version)


@functools.lru_cache(maxsize=8)
def _build_verified(cafile: str | None, capath: str | None, *_version: int) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile, capath=capath)


@functools.lru_cache(maxsize=1)
def unverified() -> ssl.SSLContext:
    """A context that verifies nothing (a setting that turns verification off)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
