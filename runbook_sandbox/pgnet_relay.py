"""pg_net's background worker, for the sandbox: sends what `net.http_post` queued, after commit.

pg_net exists only on Supabase; `sql/002_pg_net.sql` gives the same `net` schema and
`net.http_post`, and this process does the worker's part: LISTEN `net_http_request` (delivered
only once the inserting transaction commits) with a 1 s poll as a fallback, claim queued rows
(deleting them, `FOR UPDATE SKIP LOCKED`), send them concurrently within each request's
`timeout_milliseconds`, and write `net._http_response` as pg_net does (id = request id; libcurl's
error wording). Responses older than pg_net's TTL (6 hours) are deleted. A dropped database
connection is re-opened. Liveness: a heartbeat file touched every loop (`health`).
Each request sent is logged on one line (id, URL without query values, outcome, elapsed), never
its headers (they carry the anon key).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import psycopg
from psycopg.types.json import Jsonb

from runbook_lib.core import processes

from .config import SandboxConfig, config_from_argv
from .service import ServiceDef

CHANNEL = "net_http_request"
POLL_SECONDS = 1.0  # fallback when a notification is missed (e.g. while reconnecting)
BATCH_SIZE = 200  # pg_net's default pg_net.batch_size
TTL = "6 hours"  # pg_net's default pg_net.ttl
CLEANUP_EVERY_SECONDS = 5.0
HEARTBEAT_MAX_AGE_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 3.0
APPLICATION_NAME = "runbook-pgnet-relay"
USER_AGENT = "pg_net (runbook sandbox relay)"

CLAIM_SQL = """
DELETE FROM net.http_request_queue
 WHERE id IN (SELECT id FROM net.http_request_queue ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, method, url, headers, body, timeout_milliseconds
"""
# Idempotent, so a write retried after a lost connection never duplicates a response.
INSERT_RESPONSE_SQL = """
INSERT INTO net._http_response (id, status_code, content_type, headers, content, timed_out, error_msg)
SELECT %s, %s, %s, %s, %s, %s, %s
 WHERE NOT EXISTS (SELECT 1 FROM net._http_response WHERE id = %s)
"""
CLEANUP_SQL = f"DELETE FROM net._http_response WHERE created < now() - interval '{TTL}'"


def heartbeat_path(cfg: SandboxConfig):
    return cfg.path("run", "pgnet_relay.heartbeat.json")


def health(cfg: SandboxConfig) -> str | None:
    """Healthy when the relay's heartbeat is fresh, its process alive and its database connected."""
    try:
        beat = json.loads(heartbeat_path(cfg).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return "no heartbeat yet"
    age = time.time() - beat["at"]
    if age > HEARTBEAT_MAX_AGE_SECONDS:
        return f"last heartbeat {age:.0f}s ago"
    if not processes.is_alive(beat["pid"]):
        return f"relay process {beat['pid']} is not running"
    if beat.get("error"):
        return f"not connected to the database: {beat['error']}"
    return None


def redacted_url(url: str) -> str:
    """The URL without credentials or query values (a query may carry an API key)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def curl_error(exc: Exception) -> str:
    """libcurl's wording (curl_easy_strerror) for a transport failure, as pg_net stores it."""
    text = str(exc)
    if isinstance(exc, httpx.ConnectError):
        if any(s in text for s in ("Name or service not known", "nodename nor servname", "name resolution")):
            return "Couldn't resolve host name"
        return "Couldn't connect to server"
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending" in text:
        return "Server returned nothing (no headers, no data)"
    if isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError)):
        return "Failure when receiving data from the peer"
    if isinstance(exc, httpx.WriteError):
        return "Failed sending data to the peer"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "Unsupported protocol"
    if isinstance(exc, httpx.InvalidURL):
        return "URL using bad/illegal format or missing URL"
    return f"{type(exc).__name__}: {text}"


@dataclass
class Response:
    """One row of net._http_response."""

    id: int
    status_code: int | None = None
    content_type: str | None = None
    headers: Jsonb | None = None
    content: str | None = None
    timed_out: bool = False
    error_msg: str | None = None

    def insert_params(self) -> tuple:
        row = (self.id, self.status_code, self.content_type, self.headers, self.content, self.timed_out, self.error_msg)
        return (*row, self.id)


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Relay:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.stopping = asyncio.Event()
        self.inflight: set[asyncio.Task] = set()
        self.unwritten: collections.deque[Response] = collections.deque()  # survives reconnects
        self.unwritten_added = asyncio.Event()
        self.last_cleanup = 0.0
        self.client: httpx.AsyncClient | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        async with httpx.AsyncClient(headers={"User-Agent": USER_AGENT}) as self.client:
            while not self.stopping.is_set():
                try:
                    await self._serve()
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._beat(_first_line(exc))
                    _log(f"database connection lost ({_first_line(exc)}); reconnecting")
                    try:
                        await asyncio.wait_for(self.stopping.wait(), 1.0)
                    except TimeoutError:
                        pass
            if self.inflight:
                await asyncio.wait(self.inflight, timeout=SHUTDOWN_GRACE_SECONDS)
        await self._flush_on_exit()
        _log("stopped")

    async def _connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self.cfg.database_url, autocommit=True, connect_timeout=5, application_name=APPLICATION_NAME
        )

    async def _serve(self) -> None:
        """One connected session: LISTEN, claim and send until stopped or the connection drops."""
        async with await self._connect() as listen, await self._connect() as work:
            await listen.execute(f"LISTEN {CHANNEL}")
            writer = asyncio.create_task(self._write_responses(work))
            _log(f"listening on {CHANNEL}")
            try:
                while not self.stopping.is_set():
                    if writer.done():
                        writer.result()  # re-raise why the writer stopped
                    await self._claim_and_send(work)
                    await self._cleanup(work)
                    self._beat(None)
                    await self._until_notified(listen)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    async def _until_notified(self, listen: psycopg.AsyncConnection) -> None:
        """Wait for a notification, at most POLL_SECONDS, and not past a stop signal: `sandbox down`
        does not wait out the poll (up to a second) for the relay to notice it."""
        notified = asyncio.ensure_future(self._next_notification(listen))
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({notified, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not notified.done():
                notified.cancel()
                await asyncio.gather(notified, return_exceptions=True)  # the connection's lock released
        if not notified.cancelled():
            notified.result()  # a lost connection raises here, for run()'s reconnect

    @staticmethod
    async def _next_notification(listen: psycopg.AsyncConnection) -> None:
        async for _ in listen.notifies(timeout=POLL_SECONDS, stop_after=1):
            pass

    def _beat(self, error: str | None) -> None:
        path = heartbeat_path(self.cfg)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"at": time.time(), "pid": os.getpid(), "error": error}))
        tmp.replace(path)

    # -- the worker's job ------------------------------------------------------------------------

    async def _claim_and_send(self, conn: psycopg.AsyncConnection) -> None:
        while True:
            rows = await (await conn.execute(CLAIM_SQL, (BATCH_SIZE,))).fetchall()
            for row in rows:
                task = asyncio.create_task(self._send(*row))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            if len(rows) < BATCH_SIZE:
                return

    async def _send(self, req_id: int, method: str, url: str, headers: dict, body: bytes | None, timeout_ms: int) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                resp = await self.client.request(
                    method,
                    url,
                    headers={k: str(v) for k, v in (headers or {}).items()},
                    content=body,
                    timeout=timeout_ms / 1000,
                )
            merged: dict[str, str] = {}  # header names as the server sent them, like pg_net
            for raw_k, raw_v in resp.headers.raw:
                k, v = raw_k.decode("latin-1"), raw_v.decode("latin-1")
                merged[k] = f"{merged[k]}, {v}" if k in merged else v
            result = Response(
                req_id, resp.status_code, resp.headers.get("content-type"), Jsonb(merged), resp.text
            )
            outcome = str(resp.status_code)
        except (TimeoutError, httpx.TimeoutException):
            total = (time.monotonic() - started) * 1000
            result = Response(req_id, timed_out=True, error_msg=f"Timeout of {timeout_ms} ms reached. Total time: {total:.3f} ms")
            outcome = "timed out"
        except Exception as exc:  # every failure is recorded in the response row, as pg_net does
            result = Response(req_id, error_msg=curl_error(exc))
            outcome = f"error: {result.error_msg}"
        elapsed = (time.monotonic() - started) * 1000
        _log(f"request {req_id} {method} {redacted_url(url)} -> {outcome} in {elapsed:.0f} ms")
        self.unwritten.append(result)
        self.unwritten_added.set()

    async def _write_responses(self, conn: psycopg.AsyncConnection) -> None:
        while True:
            await self.unwritten_added.wait()
            self.unwritten_added.clear()
            while self.unwritten:
                r = self.unwritten[0]
                await conn.execute(INSERT_RESPONSE_SQL, r.insert_params())
                self.unwritten.popleft()

    async def _cleanup(self, conn: psycopg.AsyncConnection) -> None:
        if time.monotonic() - self.last_cleanup < CLEANUP_EVERY_SECONDS:
            return
        await conn.execute(CLEANUP_SQL)
        self.last_cleanup = time.monotonic()

    async def _flush_on_exit(self) -> None:
        if not self.unwritten:
            return
        try:
            async with await self._connect() as conn:
                while self.unwritten:
                    r = self.unwritten.popleft()
                    await conn.execute(INSERT_RESPONSE_SQL, r.insert_params())
        except psycopg.Error as exc:
            _log(f"could not write {len(self.unwritten)} response(s) on exit: {_first_line(exc)}")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(Relay(config_from_argv(argv)).run())


SERVICE = ServiceDef(
    name="pgnet_relay",
    needs=["postgres"],  # the net schema (postgres.after_start's migrations)
    health=health,
    url=lambda cfg: f"LISTEN {CHANNEL} -> net._http_response",
    prepare=lambda cfg: heartbeat_path(cfg).unlink(missing_ok=True),
    start_timeout=30,
)

if __name__ == "__main__":
    main()
