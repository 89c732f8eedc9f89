"""The Modal app `data-enrichment-workers`, for the sandbox: starlette + uvicorn on `cfg.modal.port`.

The protocol (fixed; the orchestrator's sandbox dispatch relies on it):
- auth: headers `x-modal-token-id` / `x-modal-token-secret` equal to the configured token, else 401;
- `POST /v1/apps/{app}/functions/{fn}/spawn` `{"args": [item_id, workstream_slug], "kwargs": {}}`
  -> 200 `{"function_call_id": "fc-<hex>"}` at once, the work runs in the background; the app's
  functions are the `modal_sender_fn` / `modal_receiver_fn` of `enrichment_registry`, others 404;
- `GET /v1/function_calls/{id}` -> function_call_id, function, args, status (pending|running|success|
  failure), error.
A sender does what the production senders do: its workflow_states row (item, step = the registry slug
of that sender and workstream) goes IN_PROGRESS with meta.sent_at/service/payload; then, after the
completion delay, its receiver runs (a call of its own): an enrichment_results row and COMPLETED.
Fault injection per function (`http_common.NamedFaults`): `PUT /_sandbox/faults/{function}`
`{"mode": "ok" | "spawn_error" | "fail" | "hang", "delay_ms"?}`, `GET|DELETE /_sandbox/faults`;
`PUT /_sandbox/settings {"complete_delay_ms"}`, `GET /_sandbox/calls`, `GET /_sandbox/health`; all but
the health probe need the header `X-Sandbox-Token: <cfg.admin_token>` (`http_common.AdminTokenMiddleware`).
Every request is one JSON line in `cfg.request_log_path("modal")` (`http_common`): time, method,
path, status, duration; never the token headers or bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import psycopg
import uvicorn
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runbook_lib.core import processes

from .config import SandboxConfig, config_from_argv
from .http_common import (
    AdminTokenMiddleware,
    BadRequest,
    HTTPProblem,
    NamedFaults,
    RequestLog,
    RequestLogMiddleware,
    json_body,
    same_secret,
)
from .service import ServiceDef

SERVICE_NAME = "sandbox-enrichment"  # meta.service of every state a sender hands off
DEFAULT_COMPLETE_DELAY_MS = 300
FAULT_MODES = ("ok", "spawn_error", "fail", "hang")
# Database connections: every call's statements take a millisecond or two, so a few serve the orchestrator's
# 16 concurrent spawns and their jobs without a noticeable wait, and the sandbox does not carry a Postgres
# backend (~15 MiB resident each) per spawn in flight. Background jobs (the senders' and receivers' work)
# use at most DB_CONCURRENCY of them, so a job that waits on a row lock held elsewhere never leaves the
# spawn calls (the registry lookup) without a connection. All are kept open between calls.
DB_CONCURRENCY = 4
DB_CONNECTIONS = DB_CONCURRENCY + 2
APPLICATION_NAME = "runbook-modal-standin"
ITEM_FIELDS = (
    "company_name", "company_domain", "company_linkedin_url", "person_first_name",
    "person_last_name", "person_linkedin_url", "person_title",
)

STATE_FOR_UPDATE_SQL = f"""
SELECT ws.id, ws.status::text AS status, {", ".join("bi." + f for f in ITEM_FIELDS)}
  FROM public.workflow_states ws JOIN public.batch_items bi ON bi.id = ws.item_id
 WHERE ws.item_id = %s AND ws.step_name = %s
   FOR UPDATE OF ws
"""
SET_STATUS_SQL = """
UPDATE public.workflow_states
   SET status = %s, meta = coalesce(meta, '{}'::jsonb) || %s, updated_at = now()
 WHERE id = %s
"""


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class JobError(Exception):
    """A function call failed; the message becomes the call's `error`."""


@dataclass
class FunctionCall:
    function_call_id: str
    function: str
    args: list
    status: str = "pending"
    error: str | None = None
    spawned_by: str | None = None  # the sender call that invoked this receiver
    created_at: str = field(default_factory=_now_iso)
    finished_at: str | None = None

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("function_call_id", "function", "args", "status", "error")}

    def finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, _now_iso()
        print(f"{self.finished_at} {self.function_call_id} {self.function} -> {status}"
              + (f": {error}" if error else ""), flush=True)


@dataclass
class Fault:
    mode: str = "ok"
    delay_ms: int | None = None


class ModalStandin:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.calls: dict[str, FunctionCall] = {}
        self.faults = NamedFaults(self._parse_fault, name_field="function", error_key="error")
        self.complete_delay_ms = DEFAULT_COMPLETE_DELAY_MS
        self.db_slots = asyncio.Semaphore(DB_CONCURRENCY)
        self.jobs: set[asyncio.Task] = set()
        self.idle: list[psycopg.AsyncConnection] = []
        self.connections = asyncio.Semaphore(DB_CONNECTIONS)

    # -- helpers ---------------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self.cfg.database_url, autocommit=True, connect_timeout=5,
            application_name=APPLICATION_NAME, row_factory=dict_row,
        )

    @asynccontextmanager
    async def _db(self):
        """A database connection for one call: an idle one kept from an earlier call (checked with a
        round trip first: a `database down` fault drops open connections), else a new one. Afterwards
        it is kept for the next call when it is healthy and outside a transaction, else closed. Opening
        a connection per call cost more than the call's own statements. At most DB_CONNECTIONS at once."""
        async with self.connections:
            async with self._connection() as conn:
                yield conn

    @asynccontextmanager
    async def _connection(self):
        conn = None
        while self.idle and conn is None:
            kept = self.idle.pop()
            try:
                await kept.execute("SELECT 1")
                conn = kept
            except psycopg.Error:
                await kept.close()
        if conn is None:
            conn = await self._connect()
        try:
            yield conn
        finally:
            if (not conn.closed and not conn.broken and len(self.idle) < DB_CONNECTIONS
                    and conn.info.transaction_status == TransactionStatus.IDLE):
                self.idle.append(conn)
            else:
                await conn.close()

    def _authorized(self, request: Request) -> bool:
        token_id = request.headers.get("x-modal-token-id", "")
        token_secret = request.headers.get("x-modal-token-secret", "")
        # Both compared (constant time), whatever the headers hold: non-ASCII text is a bad token, not a 500.
        ok_id = same_secret(token_id, self.cfg.modal.token_id)
        ok_secret = same_secret(token_secret, self.cfg.modal.token_secret)
        return ok_id and ok_secret

    async def _functions(self) -> dict[str, str]:
        """The app's functions, from enrichment_registry: name -> 'sender' | 'receiver'."""
        try:
            async with self._db() as conn:
                rows = await (await conn.execute(
                    "SELECT modal_sender_fn, modal_receiver_fn FROM public.enrichment_registry"
                )).fetchall()
        except psycopg.OperationalError as exc:
            raise HTTPProblem(f"sandbox database unavailable: {str(exc).strip().splitlines()[0]}", 503) from exc
        roles = {r["modal_receiver_fn"]: "receiver" for r in rows if r["modal_receiver_fn"]}
        roles.update({r["modal_sender_fn"]: "sender" for r in rows if r["modal_sender_fn"]})
        return roles

    def _start(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    # -- HTTP ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def spawn(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _error(401, "Token missing or invalid")
        app_name, fn = request.path_params["app_name"], request.path_params["function_name"]
        try:
            roles = await self._functions() if app_name == self.cfg.modal.app_name else {}
        except HTTPProblem as exc:
            return _error(exc.status, str(exc))
        if fn not in roles:
            return _error(404, f"Function {app_name}.{fn} not found")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body must be JSON: {\"args\": [item_id, workstream_slug], \"kwargs\": {}}")
        args = body.get("args") if isinstance(body, dict) else None
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, str) for a in args)):
            return _error(400, "args must be [item_id, workstream_slug], two strings")
        if not isinstance(body.get("kwargs", {}), dict):
            return _error(400, "kwargs must be an object")
        try:
            uuid.UUID(args[0])
        except ValueError:
            return _error(400, f"item_id {args[0]!r} is not a UUID")
        fault = self._fault(fn)
        if fault.mode == "spawn_error":
            return _error(500, "injected spawn failure")
        call = self._new_call(fn, args)
        job = self._run_sender(call, fault) if roles[fn] == "sender" else self._run_receiver(call, fault, None)
        self._start(job)
        return JSONResponse({"function_call_id": call.function_call_id})

    async def function_call(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _error(401, "Token missing or invalid")
        call = self.calls.get(request.path_params["call_id"])
        if call is None:
            return _error(404, f"Function call {request.path_params['call_id']} not found")
        return JSONResponse(call.public())

    async def _parse_fault(self, fn: str, body: object) -> dict:
        """PUT /_sandbox/faults/{fn} {"mode", "delay_ms"?}: the function's fault, or HTTPProblem."""
        mode = body.get("mode") if isinstance(body, dict) else None
        if mode not in FAULT_MODES:
            raise BadRequest(f"mode must be one of {list(FAULT_MODES)}")
        delay = body.get("delay_ms")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise BadRequest("delay_ms must be a non-negative integer")
        if fn not in await self._functions():
            raise HTTPProblem(f"Function {self.cfg.modal.app_name}.{fn} not found", 404)
        return asdict(Fault(mode, delay))

    def _fault(self, fn: str) -> Fault:
        return Fault(**(self.faults.get(fn) or {}))

    async def put_settings(self, request: Request) -> JSONResponse:
        try:
            body = await json_body(request)
        except BadRequest:
            body = None
        delay = body.get("complete_delay_ms") if isinstance(body, dict) else None
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            return _error(400, "body must be {\"complete_delay_ms\": <non-negative integer>}")
        self.complete_delay_ms = delay
        return JSONResponse({"complete_delay_ms": delay})

    async def list_calls(self, request: Request) -> JSONResponse:
        return JSONResponse([asdict(c) for c in self.calls.values()])

    # -- the functions' work ---------------------------------------------------------------------

    def _new_call(self, fn: str, args: list, spawned_by: str | None = None) -> FunctionCall:
        call = FunctionCall(f"fc-{uuid.uuid4().hex}", fn, list(args), spawned_by=spawned_by)
        self.calls[call.function_call_id] = call
        return call

    async def _registry_row(self, conn, column: str, fn: str, workstream: str) -> dict:
        row = await (await conn.execute(
            f"SELECT slug, modal_receiver_fn FROM public.enrichment_registry "
            f"WHERE {column} = %s AND workstream_slug = %s",
            (fn, workstream),
        )).fetchone()
        if row is None:
            raise JobError(f"no enrichment_registry row with {column} = {fn!r} and workstream_slug = {workstream!r}")
        return row

    async def _locked_state(self, conn, item_id: str, slug: str, expected: tuple[str, ...]) -> dict:
        state = await (await conn.execute(STATE_FOR_UPDATE_SQL, (item_id, slug))).fetchone()
        if state is None:
            raise JobError(f"no workflow_states row for item {item_id} and step {slug!r}")
        if state["status"] not in expected:
            raise JobError(f"workflow state of item {item_id} step {slug!r} is {state['status']}, expected {' or '.join(expected)}")
        return state

    async def _fail_state(self, item_id: str, slug: str, expected: tuple[str, ...], message: str) -> None:
        async with self.db_slots, self._db() as conn, conn.transaction():
            state = await self._locked_state(conn, item_id, slug, expected)
            await conn.execute(SET_STATUS_SQL, ("FAILED", Jsonb({"error": message, "failed_at": _now_iso()}), state["id"]))

    async def _guarded(self, call: FunctionCall, work) -> None:
        """Run a call's work; any failure ends the call as `failure` with a readable error."""
        call.status = "running"
        try:
            await work
        except JobError as exc:
            call.finish("failure", str(exc))
        except psycopg.Error as exc:
            call.finish("failure", f"database error: {str(exc).strip().splitlines()[0]}")
        except Exception as exc:  # a function that raises ends as a failed call, as on Modal
            call.finish("failure", f"{type(exc).__name__}: {exc}")

    async def _run_sender(self, call: FunctionCall, fault: Fault) -> None:
        await self._guarded(call, self._sender(call, fault))

    async def _sender(self, call: FunctionCall, fault: Fault) -> None:
        item_id, workstream = call.args
        delay_ms = fault.delay_ms if fault.delay_ms is not None else self.complete_delay_ms
        async with self.db_slots, self._db() as conn:
            reg = await self._registry_row(conn, "modal_sender_fn", call.function, workstream)
            if fault.mode != "fail":
                async with conn.transaction():
                    state = await self._locked_state(conn, item_id, reg["slug"], ("PENDING", "QUEUED"))
                    payload = {"item_id": item_id, "step": reg["slug"], "workstream_slug": workstream}
                    payload.update({f: state[f] for f in ITEM_FIELDS if state[f] is not None})
                    meta = {"sent_at": _now_iso(), "service": SERVICE_NAME, "payload": payload,
                            "function_call_id": call.function_call_id}
                    await conn.execute(SET_STATUS_SQL, ("IN_PROGRESS", Jsonb(meta), state["id"]))
        if fault.mode == "hang":
            return  # handed off, and nothing ever comes back: the call stays running
        await asyncio.sleep(delay_ms / 1000)
        if fault.mode == "fail":
            message = f"injected failure in {call.function}"
            await self._fail_state(item_id, reg["slug"], ("PENDING", "QUEUED"), message)
            call.finish("failure", message)
            return
        call.finish("success")
        receiver = reg["modal_receiver_fn"]
        if not receiver:
            print(f"{_now_iso()} no receiver mapped for {reg['slug']!r}; item {item_id} stays IN_PROGRESS", flush=True)
            return
        fault = self._fault(receiver)
        if fault.mode == "spawn_error":
            return  # the receiver never runs; the state stays IN_PROGRESS
        rcall = self._new_call(receiver, call.args, spawned_by=call.function_call_id)
        await self._run_receiver(rcall, fault, reg["slug"])

    async def _run_receiver(self, call: FunctionCall, fault: Fault, slug: str | None) -> None:
        await self._guarded(call, self._receiver(call, fault, slug))

    async def _receiver(self, call: FunctionCall, fault: Fault, slug: str | None) -> None:
        item_id, workstream = call.args
        if fault.mode == "hang":
            return
        await asyncio.sleep((fault.delay_ms or 0) / 1000)
        async with self.db_slots, self._db() as conn:
            if slug is None:
                slug = (await self._registry_row(conn, "modal_receiver_fn", call.function, workstream))["slug"]
            if fault.mode == "fail":
                message = f"injected failure in {call.function}"
                async with conn.transaction():
                    state = await self._locked_state(conn, item_id, slug, ("IN_PROGRESS",))
                    await conn.execute(SET_STATUS_SQL, ("FAILED", Jsonb({"error": message, "failed_at": _now_iso()}), state["id"]))
                call.finish("failure", message)
                return
            async with conn.transaction():
                state = await self._locked_state(conn, item_id, slug, ("IN_PROGRESS",))
                inputs = {f: state[f] for f in ITEM_FIELDS if state[f] is not None}
                data = {
                    "source": SERVICE_NAME,
                    "step": slug,
                    "input": inputs,
                    "fingerprint": hashlib.sha256(f"{item_id}:{slug}".encode()).hexdigest()[:16],
                }
                await conn.execute(
                    "INSERT INTO public.enrichment_results (batch_item_id, workflow_slug, workstream_slug, data) "
                    "VALUES (%s, %s, %s, %s)",
                    (item_id, slug, workstream, Jsonb(data)),
                )
                meta = {"completed_at": _now_iso(), "receiver_call_id": call.function_call_id}
                await conn.execute(SET_STATUS_SQL, ("COMPLETED", Jsonb(meta), state["id"]))
        call.finish("success")

    # -- app -------------------------------------------------------------------------------------

    def app(self) -> RequestLogMiddleware:
        routes = [
            Route("/_sandbox/health", self.health, methods=["GET"]),
            Route("/v1/apps/{app_name}/functions/{function_name}/spawn", self.spawn, methods=["POST"]),
            Route("/v1/function_calls/{call_id}", self.function_call, methods=["GET"]),
            *self.faults.routes(),
            Route("/_sandbox/settings", self.put_settings, methods=["PUT"]),
            Route("/_sandbox/calls", self.list_calls, methods=["GET"]),
        ]
        guarded = AdminTokenMiddleware(Starlette(routes=routes), self.cfg.admin_token, error_key="error")
        return RequestLogMiddleware(guarded, RequestLog(self.cfg.request_log_path("modal")))


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"http://127.0.0.1:{cfg.modal.port}/_sandbox/health")  # itself, not via the proxy


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_argv(argv)
    uvicorn.run(ModalStandin(cfg).app(), host="127.0.0.1", port=cfg.modal.port, log_level="warning")


SERVICE = ServiceDef(
    name="modal_standin",
    ports=["modal.port"],
    health=health,
    url=lambda cfg: cfg.modal_url,
    exports=lambda cfg: {
        "ENRICHMENT_DISPATCH_URL": cfg.modal_url,
        "MODAL_TOKEN_ID": cfg.modal.token_id,
        "MODAL_TOKEN_SECRET": cfg.modal.token_secret,
    },
    start_timeout=30,
)

if __name__ == "__main__":
    main()
