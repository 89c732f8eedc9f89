"""runbook_lib.systems.database without a database: which connect timeout a DSN gets, and that it is the one
psycopg waits for, against a local server that accepts a connection and never answers (a database too slow
to answer, as far as the client can tell)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from runbook_lib.core.errors import DatabaseError

PASSWORD = "pw-of-the-timeout-test"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port on loopback whose server accepts connections, reads, and never writes a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def dsn(port: int = 1, query: str = "") -> str:
    return f"postgresql://runbook:{PASSWORD}@127.0.0.1:{port}/postgres{query}"


def test_the_connect_timeout_is_the_dsns_then_pgconnect_timeouts_then_ten_seconds(monkeypatch):
    from runbook_lib.systems.database import CONNECT_TIMEOUT_SECONDS, Database

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    assert CONNECT_TIMEOUT_SECONDS == 10
    assert Database(dsn()).connect_timeout == 10
    assert Database(dsn(query="?connect_timeout=3")).connect_timeout == 3
    assert Database(dsn(query="?sslmode=disable&connect_timeout=25")).connect_timeout == 25
    assert Database(dsn(query="?connect_timeout=1")).connect_timeout == 2  # libpq's floor, as psycopg applies it
    assert Database(dsn(query="?connect_timeout=0")).connect_timeout == 130  # "no timeout": psycopg's own limit
    assert Database(dsn(query="?connect_timeout=3"), connect_timeout=7).connect_timeout == 7  # the caller's word
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")
    assert Database(dsn()).connect_timeout == 4
    assert Database(dsn(query="?connect_timeout=3")).connect_timeout == 3  # the DSN's before the environment's


@pytest.mark.parametrize("query, env", [("?connect_timeout=soon", None), ("", "soon")])
def test_a_connect_timeout_that_is_not_a_number_is_refused_without_quoting_the_dsn(monkeypatch, query, env):
    from runbook_lib.systems.database import Database

    if env is None:
        monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", env)
    with pytest.raises(DatabaseError, match="connect_timeout .*is not a number of seconds") as caught:
        Database(dsn(query=query))
    assert PASSWORD not in str(caught.value) and "soon" not in str(caught.value)


def connect_fails_after(db) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(DatabaseError) as caught:
        db.connect()
    return str(caught.value), time.monotonic() - started


@pytest.mark.parametrize("how", ["dsn", "environment", "caller"])
def test_psycopg_waits_for_the_chosen_timeout_and_the_error_says_which(monkeypatch, silent_server, how):
    """2 s chosen each way; the default (10 s) or a keyword overriding the DSN's would wait 10 s."""
    from runbook_lib.systems.database import Database

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    if how == "dsn":
        db = Database(dsn(silent_server, "?connect_timeout=2"))
    elif how == "environment":
        monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
        db = Database(dsn(silent_server))
    else:
        db = Database(dsn(silent_server, "?connect_timeout=30"), connect_timeout=2)
    message, waited = connect_fails_after(db)
    assert waited >= 1.9 and waited < 8, waited
    assert f"cannot connect to 127.0.0.1:{silent_server}/postgres: connection timeout expired (after 2 s" in message
    assert "PGCONNECT_TIMEOUT" in message and PASSWORD not in message
