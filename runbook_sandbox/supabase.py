"""Supabase, as the runbook sees it: the Management API's secrets endpoints and the functions
gateway in front of the Edge Function, which runs in real Deno. One process (starlette + uvicorn on
`cfg.supabase.port`); Deno is its child on `cfg.supabase.deno_port`, started with
`DENO_SERVE_ADDRESS` so the function keeps its plain `Deno.serve(handler)`. On SIGTERM uvicorn runs
the lifespan shutdown, which stops Deno; Deno also shares this process's group and sandbox marker,
so `sandbox down` reaches it even if this process dies first.

Management API (`Authorization: Bearer <cfg.supabase.access_token>`):
  GET    /v1/projects/{ref}/secrets   -> 200 [{"name", "value": sha256 hex, "updated_at"}], with the
                                         SUPABASE_* defaults
  POST   /v1/projects/{ref}/secrets   body [{"name", "value"}] -> 201, empty body (upsert)
  DELETE /v1/projects/{ref}/secrets   body ["NAME", ...] -> 200
  401 bad token, 400 malformed ref or body (nothing changed), 404 unknown ref, 429 past the rate
  limit (fixed window per token, default 120/minute). Every answer to an authenticated request
  carries `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds until
  the window resets). Secrets persist in `<state>/supabase/secrets.json` (0600).

Functions gateway: `/functions/v1/<name>[/...]`, any method. Checks the bearer JWT like Supabase's
gateway (HS256 with the project's JWT secret, role anon, authenticated or service_role; OPTIONS
preflights pass unchecked), then proxies to Deno with the current secrets as its environment.

How secret changes reach the function differs from Supabase: there, new values are said to be
visible without a redeploy, yet warm instances may keep the old ones for a while. Here a change
(POST or DELETE) restarts Deno at once (after in-flight requests finish, up to a few seconds), so
the next request always sees the new values; a runbook that verifies by behaviour must still allow
for the production delay.

Sandbox-only endpoints (`http_common`'s scripted answers, service faults and rate limit); all but the
health probe need the header `X-Sandbox-Token: <cfg.admin_token>` (401 otherwise):
  GET  /_sandbox/health
  GET|PUT|DELETE /_sandbox/service-faults[/{supabase_api|edge_function}]  cut one of the two services
                                         (`http_common.ServiceFaults`; `runbook sandbox fault`)
  GET|POST|DELETE /_sandbox/faults       list / add / clear injected answers: POST {"path", "status",
                                         "count" (null: until cleared), "method"?, "body"?, "headers"?}
                                         makes the next `count` requests to that exact path answer
                                         `status` (a 429 gets the x-ratelimit-* headers).
  GET|POST /_sandbox/rate-limit          read / set {"limit", "window_seconds"} (resets the counters)

Every request is logged as one JSON line in `cfg.request_log_path("supabase")` (`http_common`): time,
method, path, status, duration; never headers, bodies or query strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import jwt
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runbook_lib.core import processes, tls

from .config import PROJECT_ROOT, SandboxConfig, config_from_argv
from .http_common import (
    AdminTokenMiddleware,
    BadRequest,
    RateLimiter,
    RequestLog,
    RequestLogMiddleware,
    ScriptedAnswers,
    ServiceFaults,
    bearer_token,
    json_body,
    now_iso,
    same_secret,
)
from .service import ServiceDef

FUNCTIONS_DIR = PROJECT_ROOT / "supabase" / "functions"
PROJECT_REF_RE = re.compile(r"^[a-z]{20}$")
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LENGTH = 256
MAX_VALUE_LENGTH = 24576
RESERVED_PREFIX = "SUPABASE_"
JWT_ROLES = {"anon", "authenticated", "service_role"}
# The production situation: the function still holds the id of a deployment that no longer exists.
STALE_DEPLOYMENT_ID = "00000000-0000-4000-8000-00000000dead"
DENO_BOOT_TIMEOUT = 30.0
DRAIN_TIMEOUT = 5.0
GATEWAY_TIMEOUT = 150.0  # Supabase's request idle timeout
FUNCTION_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # the function decides
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def default_secrets(cfg: SandboxConfig) -> dict[str, str]:
    """The SUPABASE_* secrets every project's functions get."""
    return {
        "SUPABASE_URL": cfg.supabase_api_url,
        "SUPABASE_ANON_KEY": cfg.supabase.anon_key,
        "SUPABASE_SERVICE_ROLE_KEY": cfg.supabase.service_role_key,
        "SUPABASE_DB_URL": cfg.database_url,
    }


def deno_binary() -> str:
    beside = Path(sys.executable).parent / "deno"
    found = str(beside) if beside.exists() else shutil.which("deno")
    if not found:
        raise RuntimeError("deno not found next to the Python interpreter nor on PATH (pip install deno)")
    return found


# -- secrets ---------------------------------------------------------------------------------------


class SecretStore:
    """The project's function secrets, persisted as JSON (mode 0600) so they survive restarts."""

    def __init__(self, path: Path, defaults: dict[str, str]):
        self.path = path
        self.defaults = defaults
        if path.exists():
            data = json.loads(path.read_text())
            self.created_at: str = data["created_at"]
            self.secrets: dict[str, dict[str, str]] = data["secrets"]
        else:
            self.created_at = now_iso()
            self.secrets = {}
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"created_at": self.created_at, "secrets": self.secrets}, f, indent=2)
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def listing(self) -> list[dict[str, str]]:
        rows = [{"name": n, "value": sha256_hex(v), "updated_at": self.created_at} for n, v in self.defaults.items()]
        rows += [{"name": n, "value": sha256_hex(s["value"]), "updated_at": s["updated_at"]} for n, s in self.secrets.items()]
        return sorted(rows, key=lambda r: r["name"])

    def env(self) -> dict[str, str]:
        """What the function sees: user secrets, then the defaults (which cannot be overridden)."""
        return {**{n: s["value"] for n, s in self.secrets.items()}, **self.defaults}

    def upsert(self, body: object) -> bool:
        """Validate the whole body first, then apply; True when anything changed."""
        items = _parse_upsert(body)
        now = now_iso()
        changed = False
        for name, value in items.items():
            changed |= self.secrets.get(name, {}).get("value") != value
            self.secrets[name] = {"value": value, "updated_at": now}
        self._save()
        return changed

    def delete(self, body: object) -> bool:
        names = _parse_delete(body)
        changed = False
        for name in names:
            changed |= self.secrets.pop(name, None) is not None
        if changed:
            self._save()
        return changed


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str):
        raise BadRequest(f"{where}: name must be a string")
    if not name:
        raise BadRequest(f"{where}: name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"{where}: name is longer than {MAX_NAME_LENGTH} characters")
    if name.startswith(RESERVED_PREFIX):
        raise BadRequest(f"{where}: name {name!r} must not start with the reserved prefix {RESERVED_PREFIX}")
    if not SECRET_NAME_RE.match(name):
        raise BadRequest(f"{where}: name {name!r} must be letters, digits and underscores, not starting with a digit")
    return name


def _parse_upsert(body: object) -> dict[str, str]:
    if not isinstance(body, list) or not body:
        raise BadRequest('Body must be a non-empty JSON array of {"name", "value"} objects')
    items: dict[str, str] = {}
    for i, item in enumerate(body):
        where = f"secret #{i}"
        if not isinstance(item, dict) or set(item) != {"name", "value"}:
            raise BadRequest(f'{where}: expected an object with exactly "name" and "value"')
        name = _check_name(item["name"], where)
        value = item["value"]
        if not isinstance(value, str):
            raise BadRequest(f"{where} ({name}): value must be a string")
        if len(value) > MAX_VALUE_LENGTH:
            raise BadRequest(f"{where} ({name}): value is longer than {MAX_VALUE_LENGTH} characters")
        if "\x00" in value:
            raise BadRequest(f"{where} ({name}): value must not contain a NUL character")
        items[name] = value
    return items


def _parse_delete(body: object) -> list[str]:
    if not isinstance(body, list) or not body:
        raise BadRequest("Body must be a non-empty JSON array of secret names")
    return [_check_name(name, f"name #{i}") for i, name in enumerate(body)]


# -- the Edge Function under Deno ------------------------------------------------------------------


class BootError(RuntimeError):
    """Deno could not start the function (syntax error, port taken, ...)."""


class EdgeRuntime:
    """The function's Deno process, (re)started whenever the secrets it was started with change."""

    def __init__(self, cfg: SandboxConfig, store: SecretStore):
        self.cfg = cfg
        self.store = store
        self.entrypoint = FUNCTIONS_DIR / cfg.supabase.function_name / "index.ts"
        self._proc: asyncio.subprocess.Process | None = None
        self._env: dict[str, str] | None = None
        self._lock = asyncio.Lock()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.boot_error: str | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def ensure_current(self) -> None:
        """Start Deno, or restart it when the secrets changed since it started."""
        async with self._lock:
            env = self.store.env()
            if self.running and env == self._env:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT)
            await self.stop()
            await self._start(env)

    @contextlib.asynccontextmanager
    async def serving(self):
        """Hold the current instance for one proxied request (a restart waits for it a while)."""
        await self.ensure_current()
        self._inflight += 1
        self._idle.clear()
        try:
            yield f"http://127.0.0.1:{self.cfg.supabase.deno_port}"
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _start(self, env: dict[str, str]) -> None:
        cfg = self.cfg
        proc_env = {
            **env,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DENO_DIR": str(cfg.path("supabase", "deno")),
            "DENO_SERVE_ADDRESS": f"tcp:127.0.0.1:{cfg.supabase.deno_port}",
            "DENO_NO_UPDATE_CHECK": "1",
            "NO_COLOR": "1",
            processes.INSTANCE_ENV: os.environ.get(processes.INSTANCE_ENV, cfg.instance_id),
        }
        argv = [deno_binary(), "run", "--allow-net", "--allow-env", "--no-prompt", "--no-config", "--no-lock",
                str(self.entrypoint)]
        log_path = cfg.log_path("edge-function")
        with open(log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} booting {self.entrypoint.name}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env=proc_env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=str(cfg.path("supabase", "deno").parent),
            )
        deadline = time.monotonic() + DENO_BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                break
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", cfg.supabase.deno_port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            self._env = env
            self.boot_error = None
            return
        await self.stop()
        self.boot_error = f"Deno did not start the function. Last lines of {log_path}:\n" + processes.log_tail(log_path, 15)
        raise BootError(self.boot_error)

    async def stop(self) -> None:
        proc, self._proc, self._env = self._proc, None, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


# -- HTTP ------------------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    return bearer_token(request.headers)


def _tokens_equal(a: str, b: str) -> bool:
    return same_secret(a, b)


# The two services behind this port, cut one at a time (`http_common.ServiceFaults`), with the answer
# each gives when it is down: the Management API's edge, and the functions gateway of a function
# that cannot boot.
SERVICE_PREFIXES = {"supabase_api": ("/v1/",), "edge_function": ("/functions/v1/",)}
DOWN_ANSWERS = {
    "supabase_api": (503, {"message": "Service Unavailable"}),
    "edge_function": (503, {"code": "BOOT_ERROR", "message": "Worker failed to boot (please check logs)"}),
}


def build_app(cfg: SandboxConfig) -> Starlette:
    store = SecretStore(cfg.path("supabase", "secrets.json"), default_secrets(cfg))
    limiter = RateLimiter()
    answers = ScriptedAnswers(limiter)
    service_faults = ServiceFaults(SERVICE_PREFIXES, DOWN_ANSWERS)
    runtime = EdgeRuntime(cfg, store)
    background: set[asyncio.Task] = set()
    client: dict[str, httpx.AsyncClient] = {}

    def restart_soon() -> None:
        """Bring Deno up to date with the secrets now, without holding up the Management API's answer."""
        task = asyncio.create_task(runtime.ensure_current())
        background.add(task)
        task.add_done_callback(restarted)

    def restarted(task: asyncio.Task) -> None:
        background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The boot error is kept on the runtime; the next function request answers BOOT_ERROR.
            print(f"edge function restart failed: {task.exception()}", file=sys.stderr, flush=True)

    async def secrets(request: Request) -> Response:
        token = _bearer(request)
        if token is None or not _tokens_equal(token, cfg.supabase.access_token):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        allowed, headers = limiter.hit(token)
        if not allowed:
            return JSONResponse({"message": "Too many requests"}, status_code=429, headers=headers)
        ref = request.path_params["ref"]
        if not PROJECT_REF_RE.match(ref):
            return JSONResponse({"message": "Invalid project ref: expected 20 lowercase letters"}, 400, headers)
        if ref != cfg.supabase.project_ref:
            return JSONResponse({"message": f"Project {ref} not found"}, 404, headers)
        try:
            if request.method == "GET":
                return JSONResponse(store.listing(), headers=headers)
            body = await json_body(request)
            if request.method == "POST":
                changed = store.upsert(body)
                response = Response(status_code=201, headers=headers)
            else:
                changed = store.delete(body)
                response = JSONResponse({}, headers=headers)
        except BadRequest as exc:
            return JSONResponse({"message": str(exc)}, 400, headers)
        if changed:
            restart_soon()
        return response

    async def functions(request: Request) -> Response:
        name = request.path_params["name"]
        if name != cfg.supabase.function_name:
            return JSONResponse({"code": "NOT_FOUND", "message": "Requested function was not found"}, 404)
        if request.method != "OPTIONS":
            token = _bearer(request)
            if token is None and not request.headers.get("authorization"):
                return JSONResponse({"code": 401, "message": "Missing authorization header"}, 401)
            try:
                claims = jwt.decode(token or "", cfg.supabase.jwt_secret, algorithms=["HS256"])
            except (jwt.PyJWTError, ValueError):
                claims = {}
            if claims.get("role") not in JWT_ROLES:
                return JSONResponse({"code": 401, "message": "Invalid JWT"}, 401)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            async with runtime.serving() as base:
                url = f"{base}/{name}{request.path_params['rest']}"
                if request.url.query:
                    url += "?" + request.url.query
                upstream = await client["http"].request(request.method, url, headers=headers, content=body)
        except BootError:
            return JSONResponse({"code": "BOOT_ERROR", "message": "Worker failed to boot (please check logs)"}, 503)
        except httpx.TimeoutException:
            return JSONResponse({"code": "IDLE_TIMEOUT", "message": "Function did not answer in time"}, 504)
        except httpx.TransportError:
            return JSONResponse({"code": "WORKER_ERROR", "message": "Function exited before answering"}, 502)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    async def health(request: Request) -> Response:
        state = "running" if runtime.running else ("boot_error" if runtime.boot_error else "stopped")
        return JSONResponse({"status": "ok", "edge_function": state})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client["http"] = httpx.AsyncClient(timeout=httpx.Timeout(GATEWAY_TIMEOUT, connect=5.0), trust_env=False)
        try:
            await runtime.ensure_current()
            yield
        finally:
            for task in background:
                task.cancel()
            await runtime.stop()
            await client["http"].aclose()

    return Starlette(
        routes=[
            Route("/_sandbox/health", health, methods=["GET"]),
            *answers.routes(),
            *service_faults.routes(),
            *limiter.routes(),
            Route("/v1/projects/{ref}/secrets", secrets, methods=["GET", "POST", "DELETE"]),
            Route("/functions/v1/{name}{rest:path}", functions, methods=FUNCTION_METHODS),
        ],
        middleware=[
            Middleware(RequestLogMiddleware, log=RequestLog(cfg.request_log_path("supabase")), answers=answers,
                       service_faults=service_faults),
            Middleware(AdminTokenMiddleware, token=cfg.admin_token),
        ],
        lifespan=lifespan,
    )


# -- ServiceDef ------------------------------------------------------------------------------------


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"{cfg.supabase_api_url}/_sandbox/health")


def prefect_secrets(cfg: SandboxConfig) -> dict[str, str]:
    """The Edge Function's secrets as the sandbox seeds them: the Prefect side, with a stale deployment id."""
    return {
        "PREFECT_API_KEY": cfg.prefect.api_key,
        "PREFECT_ACCOUNT_ID": cfg.prefect.account_id,
        "PREFECT_WORKSPACE_ID": cfg.prefect.workspace_id,
        "PREFECT_API_URL": cfg.prefect_api_url,
        "PREFECT_DEPLOYMENT_ID": STALE_DEPLOYMENT_ID,
    }


def seed_secrets(cfg: SandboxConfig) -> list[str]:
    """Set the Prefect secrets through the Management API; return the names written.

    A name already set is kept (the runbook may have written it), unless it still holds the value
    the sandbox itself seeded last time and that value is now out of date (a port changed).
    """
    seeded_path = cfg.path("supabase", "seeded.json")
    seeded: dict[str, str] = json.loads(seeded_path.read_text()) if seeded_path.exists() else {}
    url = f"{cfg.supabase_api_url}/v1/projects/{cfg.supabase.project_ref}/secrets"
    headers = {"Authorization": f"Bearer {cfg.supabase.access_token}"}
    with httpx.Client(timeout=30, trust_env=False, headers=headers, verify=tls.verified()) as http:
        r = http.get(url)
        r.raise_for_status()
        current = {row["name"]: row["value"] for row in r.json()}
        todo = {
            name: value
            for name, value in prefect_secrets(cfg).items()
            if name not in current or (current[name] == seeded.get(name) and current[name] != sha256_hex(value))
        }
        if todo:
            http.post(url, json=[{"name": n, "value": v} for n, v in todo.items()]).raise_for_status()
    seeded.update({name: sha256_hex(value) for name, value in todo.items()})
    seeded_path.write_text(json.dumps(seeded, indent=2))
    return sorted(todo)


SERVICE = ServiceDef(
    name="supabase",
    ports=["supabase.port", "supabase.deno_port"],
    health=health,
    url=lambda cfg: cfg.supabase_api_url,
    after_start=seed_secrets,
    exports=lambda cfg: {
        "SUPABASE_API_URL": cfg.supabase_api_url,
        "SUPABASE_ACCESS_TOKEN": cfg.supabase.access_token,
        "SUPABASE_PROJECT_REF": cfg.supabase.project_ref,
        "SUPABASE_FUNCTIONS_URL": cfg.functions_url,
        "SUPABASE_ANON_KEY": cfg.supabase.anon_key,
        "SUPABASE_EDGE_FUNCTION_URL": cfg.edge_function_url,
    },
    stop_signal=signal.SIGTERM,
    start_timeout=60,
)


def main() -> None:
    import uvicorn

    cfg = config_from_argv()
    uvicorn.run(
        build_app(cfg), host="127.0.0.1", port=cfg.supabase.port, log_level="warning",
        access_log=False, timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
