"""What every HTTP stand-in of the sandbox shares: the request log, injected faults, a rate limit.

Request log (`RequestLog`): one JSON line per request in `cfg.request_log_path(<service>)`:
    {"time", "method", "path", "status", "duration_ms", ...}
plus the fields a service adds (the git server: query, authenticated, chunked, content_encoding,
user_agent; an injected answer: "fault": true). Nothing else: no headers (so never Authorization),
no bodies, no query string but git's (`service=...`); `write` refuses a field named like one of
those. Each line goes into the file with one `write` on a descriptor opened for appending (whole
lines, even across threads), before the message that completes the response is passed on, so a
client that has its answer finds its line. `RequestLogMiddleware` does it for an ASGI app (and
answers injected faults); the git server, a threaded stdlib server, calls `RequestLog.write` itself.

Faults (`/_sandbox/faults`), one table per stand-in, in one of two kinds:
- `ScriptedAnswers` (Supabase): `POST {"path", "status", "count" (null: until cleared), "method"?,
  "body"?, "headers"?}` makes the next `count` requests to that exact path (and method) answer
  `status`, from the middleware, before the app sees them (a 429 gets the rate limiter's headers);
  `GET` lists them (an array), `DELETE` clears them (`{"cleared": n}`).
- `NamedFaults` (Modal): `PUT /_sandbox/faults/{name}` sets the fault of `name`, whose meaning is the
  service's (a function's mode and delay), read by the app with `get(name)`; `GET` lists them (an
  object name -> fault), `DELETE` clears them.

Service faults (`ServiceFaults`, `/_sandbox/service-faults`): several services behind one port (the
Supabase Management API and the Edge Function) are cut one at a time by path prefix: `PUT
/_sandbox/service-faults/{name} {"mode": "down" | "reset" | "slow" | "error" | "clear", "delay_ms"?,
"status"?, "count"?}`. down: the service's own "unavailable" answer (503); reset: the headers, then
the connection is dropped before the body; slow: answered after `delay_ms`, or as soon as the fault is
lifted or replaced (a lifted fault leaves no request to be answered later, in another test's time);
error: `status`, for `count` requests (null: until cleared). `GET` lists, `DELETE` clears them all.

Admin token (`AdminTokenMiddleware`): every `/_sandbox/*` path but `/_sandbox/health` needs the header
`X-Sandbox-Token: <cfg.admin_token>` (401 otherwise). The runbook never calls these endpoints.

Rate limit (`RateLimiter`, `/_sandbox/rate-limit`): a fixed window of `limit` requests per
`window_seconds`, counted per token; `GET|POST /_sandbox/rate-limit {"limit", "window_seconds"}`
reads or sets it (and resets the counters).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SANDBOX_PREFIX = "/_sandbox/"
HEALTH_PATH = "/_sandbox/health"
ADMIN_HEADER = "x-sandbox-token"
SERVICE_FAULTS_PATH = "/_sandbox/service-faults"
SERVICE_FAULT_MODES = ("down", "reset", "slow", "error", "clear")
DEFAULT_SLOW_MS = 3000
FAULTS_PATH = "/_sandbox/faults"
RATE_LIMIT_PATH = "/_sandbox/rate-limit"
DEFAULT_RATE_LIMIT = 120
DEFAULT_RATE_WINDOW = 60.0
NEVER_LOGGED = {"headers", "authorization", "body", "token", "secret", "password", "api_key"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HTTPProblem(Exception):
    """A request the stand-in refuses: answered with `status` and the message."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(HTTPProblem, ValueError):
    """Client input the stand-in refuses with 400; the message is returned as is."""

    status = 400


async def json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("Body must be valid JSON") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bearer_token(headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None. A header that is not ASCII
    (no real token is) counts as no token, so it is answered 401 like any bad credential."""
    auth = headers.get("authorization", "")
    if not auth.isascii():
        return None
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented credential (any text) with the expected one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


class AdminTokenMiddleware:
    """ASGI middleware: `/_sandbox/*` (but the health probe) needs `X-Sandbox-Token: <token>`."""

    def __init__(self, app, token: str, error_key: str = "message"):
        self.app, self.token, self.error_key = app, token.encode(), error_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(SANDBOX_PREFIX) and scope["path"] != HEALTH_PATH:
            given = b""
            for key, value in scope.get("headers") or []:
                if key.lower() == ADMIN_HEADER.encode():
                    given = value
            if not given or not hmac.compare_digest(given, self.token):
                response = JSONResponse({self.error_key: f"sandbox admin token required ({ADMIN_HEADER})"}, 401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# -- request log -----------------------------------------------------------------------------------


class RequestLog:
    """Appends one JSON line per request to `path`; thread-safe; the line is in the file on return."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, method: str, path: str, status: int, started: float, **fields: object) -> None:
        refused = NEVER_LOGGED & {k.lower() for k in fields}
        if refused:
            raise ValueError(f"the request log never holds {sorted(refused)}")
        record = {
            "time": now_iso(), "method": method, "path": path, "status": status,
            "duration_ms": round((time.monotonic() - started) * 1000, 1), **fields,
        }
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                while line:
                    line = line[os.write(fd, line):]
            finally:
                os.close(fd)


class RequestLogMiddleware:
    """ASGI middleware: answers injected faults (when given `answers`), and logs every HTTP request
    as one line, written before the message that completes the response is passed on."""

    def __init__(self, app, log: RequestLog, answers: "ScriptedAnswers | None" = None,
                 service_faults: "ServiceFaults | None" = None):
        self.app, self.log, self.answers, self.service_faults = app, log, answers, service_faults

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        method, path = scope["method"], scope["path"]
        fault = None if self.answers is None or path.startswith(SANDBOX_PREFIX) else self.answers.take(method, path)
        if fault is None and self.service_faults is not None and not path.startswith(SANDBOX_PREFIX):
            fault = await self.service_faults.take(path)
        fields = {"fault": True} if fault else {}
        seen: dict = {"status": 500, "logged": False, "length": None, "sent": 0}

        def log_once() -> None:
            if not seen["logged"]:
                seen["logged"] = True
                self.log.write(method, path, seen["status"], started, **fields)

        async def send_logged(message):
            # The client has the whole answer with the message that completes the body: the headers
            # when there is no body (HEAD, 1xx/204/304, Content-Length: 0; the server writes them at
            # once), the one reaching the Content-Length (a streamed body ends with an empty
            # message), else the last one.
            if message["type"] == "http.response.start":
                seen["status"] = status = message["status"]
                length = dict(message.get("headers") or []).get(b"content-length")
                seen["length"] = int(length) if length and length.isdigit() else None
                if method == "HEAD" or status < 200 or status in (204, 304) or seen["length"] == 0:
                    log_once()
            elif message["type"] == "http.response.body":
                seen["sent"] += len(message.get("body", b""))
                if not message.get("more_body", False) or (seen["length"] is not None and seen["sent"] >= seen["length"]):
                    log_once()
            await send(message)

        try:
            await (fault or self.app)(scope, receive, send_logged)
        finally:
            log_once()  # no complete response (an error, a dropped client): logged all the same


# -- rate limit ------------------------------------------------------------------------------------


class RateLimiter:
    """A fixed window of `limit` requests per `window` seconds, counted per token."""

    def __init__(self, limit: int = DEFAULT_RATE_LIMIT, window: float = DEFAULT_RATE_WINDOW):
        self.configure(limit, window)

    def configure(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, token: str) -> tuple[bool, dict[str, str]]:
        """Count one request; (allowed, x-ratelimit-* headers)."""
        now = time.monotonic()
        key = hashlib.sha256(token.encode()).hexdigest()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        allowed = count < self.limit
        if allowed:
            count += 1
        self._windows[key] = (start, count)
        return allowed, self.headers(self.limit - count, start + self.window - now)

    def headers(self, remaining: int, reset_seconds: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(remaining, 0)),
            "x-ratelimit-reset": str(max(math.ceil(reset_seconds), 0)),
        }

    def routes(self) -> list[Route]:
        async def endpoint(request: Request) -> Response:
            if request.method == "POST":
                try:
                    spec = await json_body(request)
                    limit = spec.get("limit", DEFAULT_RATE_LIMIT) if isinstance(spec, dict) else None
                    window = spec.get("window_seconds", DEFAULT_RATE_WINDOW) if isinstance(spec, dict) else None
                    if not _is_int(limit) or limit < 1:
                        raise BadRequest('"limit" must be a positive integer')
                    if not isinstance(window, (int, float)) or isinstance(window, bool) or window <= 0:
                        raise BadRequest('"window_seconds" must be a positive number')
                except BadRequest as exc:
                    return JSONResponse({"message": str(exc)}, 400)
                self.configure(limit, float(window))
            return JSONResponse({"limit": self.limit, "window_seconds": self.window})

        return [Route(RATE_LIMIT_PATH, endpoint, methods=["GET", "POST"])]


# -- faults ----------------------------------------------------------------------------------------


class Lifts:
    """What a slow fault holds, released when the fault is lifted or replaced: a delay is waited out with
    `delay(key, seconds)` (True when the fault of `key` was lifted meanwhile), and `lift(key)` ends every
    delay of `key` at once. So a lifted fault leaves nothing to be answered later, in another test's time.
    Used by `ServiceFaults` (key: a service) and the fault proxy (key: a route)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    async def delay(self, key: str, seconds: float) -> bool:
        event = self._events.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    def lift(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def lift_all(self) -> None:
        for key in list(self._events):
            self.lift(key)


class Faults:
    """The table of a stand-in's injected faults behind `/_sandbox/faults`: `GET` lists, `DELETE`
    clears; a kind adds how faults are set (`_set_routes`) and how they are listed (`listing`).
    Refusals answer `{error_key: message}` with the problem's status."""

    def __init__(self, error_key: str = "message"):
        self.table: dict[str, dict] = {}
        self.error_key = error_key

    def listing(self) -> object:
        return list(self.table.values())

    def clear(self) -> int:
        cleared, self.table = len(self.table), {}
        return cleared

    def problem(self, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({self.error_key: str(exc)}, status_code=exc.status)

    def routes(self) -> list[Route]:
        async def list_or_clear(request: Request) -> Response:
            if request.method == "DELETE":
                return JSONResponse({"cleared": self.clear()})
            return JSONResponse(self.listing())

        return [Route(FAULTS_PATH, list_or_clear, methods=["GET", "DELETE"]), *self._set_routes()]

    def _set_routes(self) -> list[Route]:
        raise NotImplementedError


class ScriptedAnswers(Faults):
    """Faults that are HTTP answers: the next `count` requests to `path` (and `method`, if given) get
    `status`; taken by `RequestLogMiddleware` before the app sees the request."""

    def __init__(self, limiter: RateLimiter | None = None):
        super().__init__()
        self.limiter = limiter
        self._next_id = 1

    def add(self, spec: object) -> dict:
        if not isinstance(spec, dict):
            raise BadRequest("Body must be a JSON object")
        path, status, count = spec.get("path"), spec.get("status"), spec.get("count", 1)
        method, headers = spec.get("method"), spec.get("headers") or {}
        if not isinstance(path, str) or not path.startswith("/") or path.startswith(SANDBOX_PREFIX):
            raise BadRequest(f'"path" must be a request path starting with "/" (not under {SANDBOX_PREFIX})')
        if not _is_int(status) or not 100 <= status <= 599:
            raise BadRequest('"status" must be an HTTP status code')
        if count is not None and (not _is_int(count) or count < 1):
            raise BadRequest('"count" must be a positive integer, or null for "until cleared"')
        if method is not None and not isinstance(method, str):
            raise BadRequest('"method" must be a string')
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise BadRequest('"headers" must be an object of strings')
        fault = {
            "id": self._next_id,
            "path": path,
            "method": method.upper() if method else None,
            "status": status,
            "count": count,
            "body": spec.get("body", {"message": f"Injected fault: status {status}"}),
            "headers": headers,
        }
        self.table[str(self._next_id)] = fault
        self._next_id += 1
        return fault

    def take(self, method: str, path: str) -> Response | None:
        """The answer for this request if a fault matches it (counting it down), else None."""
        for key, fault in self.table.items():
            if fault["path"] == path and fault["method"] in (None, method):
                if fault["count"] is not None:
                    fault["count"] -= 1
                    if fault["count"] == 0:
                        del self.table[key]
                headers = dict(fault["headers"])
                if fault["status"] == 429 and self.limiter is not None:
                    headers = {**self.limiter.headers(0, self.limiter.window), **headers}
                return JSONResponse(fault["body"], status_code=fault["status"], headers=headers)
        return None

    def _set_routes(self) -> list[Route]:
        async def add(request: Request) -> Response:
            try:
                return JSONResponse(self.add(await json_body(request)), status_code=201)
            except HTTPProblem as exc:
                return self.problem(exc)

        return [Route(FAULTS_PATH, add, methods=["POST"])]


class NamedFaults(Faults):
    """Faults the app interprets, one per name: `PUT /_sandbox/faults/{name}` with a body that
    `parse(name, body)` turns into the fault (raising HTTPProblem to refuse it); answered as
    `{name_field: name, **fault}`. Listed as an object name -> fault."""

    def __init__(
        self,
        parse: Callable[[str, object], Awaitable[dict]],
        name_field: str = "name",
        error_key: str = "message",
    ):
        super().__init__(error_key)
        self.parse, self.name_field = parse, name_field

    def get(self, name: str) -> dict | None:
        return self.table.get(name)

    def listing(self) -> object:
        return dict(self.table)

    def _set_routes(self) -> list[Route]:
        async def put(request: Request) -> Response:
            name = request.path_params["name"]
            try:
                self.table[name] = await self.parse(name, await json_body(request))
            except HTTPProblem as exc:
                return self.problem(exc)
            return JSONResponse({self.name_field: name, **self.table[name]})

        return [Route(FAULTS_PATH + "/{name}", put, methods=["PUT"])]


class _DroppedAnswer:
    """An ASGI app that starts an answer and drops the connection before its body (a reset as an
    HTTP client sees it: the server raises once the headers are out, and uvicorn closes the socket)."""

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")]})
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        raise ConnectionResetError("injected fault: connection reset")


class ServiceFaults:
    """Faults of the services behind one port, each known by its path prefixes (see the module doc).
    `down_answers` gives each service its own "unavailable" answer (status, JSON body)."""

    def __init__(self, prefixes: dict[str, tuple[str, ...]], down_answers: dict[str, tuple[int, dict]],
                 error_answers: dict[str, Callable[[int], tuple[dict, dict[str, str]]]] | None = None,
                 modes: tuple[str, ...] = SERVICE_FAULT_MODES):
        """`error_answers`: per service, the (JSON body, headers) it answers an `error` fault's status
        with (default `{"message": "Injected fault: status N"}`, no header); `modes`: what may be set."""
        self.prefixes, self.down_answers = prefixes, down_answers
        self.error_answers = error_answers or {}
        self.modes = modes
        self.table: dict[str, dict] = {}
        self.lifts = Lifts()  # a lifted or replaced fault's delays end at once: answered under what is set now

    def parse(self, name: str, spec: object) -> dict | None:
        if name not in self.prefixes:
            raise HTTPProblem(f"unknown service {name!r}; known: {sorted(self.prefixes)}", 404)
        if not isinstance(spec, dict):
            raise BadRequest("Body must be a JSON object")
        mode = spec.get("mode")
        if mode not in self.modes:
            raise BadRequest(f'"mode" must be one of {list(self.modes)}')
        delay, status, count = spec.get("delay_ms"), spec.get("status"), spec.get("count")
        if delay is not None and (not _is_int(delay) or delay < 0):
            raise BadRequest('"delay_ms" must be a non-negative integer')
        if mode == "error" and (not _is_int(status) or not 400 <= status <= 599):
            raise BadRequest('"status" must be an HTTP error status (400-599) for mode "error"')
        if count is not None and (not _is_int(count) or count < 1):
            raise BadRequest('"count" must be a positive integer, or null for "until cleared"')
        if mode == "clear":
            return None
        return {"mode": mode, "delay_ms": DEFAULT_SLOW_MS if delay is None and mode == "slow" else delay,
                "status": status if mode == "error" else None, "count": count}

    async def take(self, path: str):
        """The ASGI app answering this request when a fault of its service is set (None: no fault);
        a slow fault waits here and lets the request through. A delay ends early when the fault is
        lifted or replaced: the request is then answered as what is set now says."""
        for name, fault in list(self.table.items()):
            if not any(path.startswith(p) for p in self.prefixes[name]):
                continue
            if fault["count"] is not None:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self.table.pop(name, None)  # used up, not lifted: the requests it holds keep their delay
            if fault["delay_ms"] and await self.lifts.delay(name, fault["delay_ms"] / 1000):
                return await self.take(path)
            mode = fault["mode"]
            if mode == "down":
                status, body = self.down_answers[name]
                return JSONResponse(body, status_code=status)
            if mode == "reset":
                return _DroppedAnswer()
            if mode == "error":
                answer = self.error_answers.get(name)
                body, headers = answer(fault["status"]) if answer else (
                    {"message": f"Injected fault: status {fault['status']}"}, {})
                return JSONResponse(body, status_code=fault["status"], headers=headers)
            return None  # slow: answered by the app, late
        return None

    def routes(self) -> list[Route]:
        async def list_or_clear(request: Request) -> Response:
            if request.method == "DELETE":
                cleared, self.table = len(self.table), {}
                self.lifts.lift_all()
                return JSONResponse({"cleared": cleared})
            return JSONResponse(self.table)

        async def put(request: Request) -> Response:
            name = request.path_params["name"]
            try:
                fault = self.parse(name, await json_body(request))
            except HTTPProblem as exc:
                return JSONResponse({"message": str(exc)}, status_code=exc.status)
            if fault is None:
                self.table.pop(name, None)
            else:
                self.table[name] = fault
            self.lifts.lift(name)
            return JSONResponse({"service": name, "fault": fault})

        return [Route(SERVICE_FAULTS_PATH, list_or_clear, methods=["GET", "DELETE"]),
                Route(SERVICE_FAULTS_PATH + "/{name}", put, methods=["PUT"])]
