"""The fault proxy: loopback TCP proxies in front of the services that have a port of their own, so
each can be cut alone, as services fail one at a time in production.

    route        listens on (cfg.proxy.*)   forwards to
    database     database_port              the pipeline's Postgres (cfg.postgres: embedded or --database-url)
    prefect_api  prefect_port               the Prefect Cloud gateway (cfg.prefect.gateway_port)
    git          git_port                   the GitHub stand-in (cfg.git.port)
    modal        modal_port                 the Modal stand-in (cfg.modal.port)

Every client the sandbox configures goes through the proxy (`cfg.database_url`, `cfg.prefect_api_url`,
`cfg.git_base_url`, `cfg.modal_url` name its ports): the runbook, the Edge Function, the relay, the
worker and its flow runs. Only the sandbox's own plumbing goes direct: health probes, migrations, and
the Prefect server's own storage (a database of the same Postgres, reached directly), so cutting the
pipeline's database leaves the Prefect API answering, and the other way round.

Faults, one per route (none: bytes pass untouched):
- `down`: the port refuses connections (the listener is closed) and open connections are dropped;
- `reset`: connections are accepted, then reset (RST), open ones too;
- `slow`: every chunk, each way, and every new connection wait `delay_ms` (default 3000), or until the
  fault is lifted or replaced;
- `clear`: back to normal (the port listens again).
The upstream port is read from `config.json` at each connection, so a restarted service is found.

Control API on `cfg.proxy.control_port` (HTTP; every path but the health probe needs the header
`X-Sandbox-Token: <cfg.admin_token>`):
    GET    /_sandbox/health
    GET    /_sandbox/faults              {route: {"mode", "delay_ms"}} of the routes with a fault
    PUT    /_sandbox/faults/{route}      {"mode": "down"|"reset"|"slow"|"clear", "delay_ms"?}; in effect
                                         when answered
    DELETE /_sandbox/faults              clears every fault
Use it through `runbook_sandbox.faults` (`runbook sandbox fault <service> <mode>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runbook_lib.core import processes

from .config import SandboxConfig, config_from_argv
from .http_common import DEFAULT_SLOW_MS, AdminTokenMiddleware, BadRequest, HTTPProblem, Lifts, RequestLog, json_body
from .service import ServiceDef

MODES = ("down", "reset", "slow", "clear")
CHUNK = 64 * 1024
UPSTREAM_CONNECT_TIMEOUT = 10.0


def _database_upstream(cfg: SandboxConfig) -> tuple[str, int]:
    if cfg.postgres.external_url:
        parts = urlsplit(cfg.postgres.external_url)
        return parts.hostname or "127.0.0.1", parts.port or 5432
    return "127.0.0.1", cfg.postgres.port


# route -> (attribute of cfg.proxy it listens on, where it forwards to)
ROUTES: dict[str, tuple[str, Callable[[SandboxConfig], tuple[str, int]]]] = {
    "database": ("database_port", _database_upstream),
    "prefect_api": ("prefect_port", lambda cfg: ("127.0.0.1", cfg.prefect.gateway_port)),
    "git": ("git_port", lambda cfg: ("127.0.0.1", cfg.git.port)),
    "modal": ("modal_port", lambda cfg: ("127.0.0.1", cfg.modal.port)),
}


def parse_fault(route: str, spec: object) -> dict | None:
    """The fault a control request asks for (None: clear), or HTTPProblem."""
    if route not in ROUTES:
        raise HTTPProblem(f"unknown route {route!r}; known: {list(ROUTES)}", 404)
    if not isinstance(spec, dict):
        raise BadRequest("Body must be a JSON object")
    mode, delay = spec.get("mode"), spec.get("delay_ms")
    if mode not in MODES:
        raise BadRequest(f'"mode" must be one of {list(MODES)}')
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
        raise BadRequest('"delay_ms" must be a non-negative integer')
    if mode == "clear":
        return None
    return {"mode": mode, "delay_ms": (DEFAULT_SLOW_MS if delay is None else delay) if mode == "slow" else None}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or firewalled peer does."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self._cfg_mtime = 0.0
        self.faults: dict[str, dict] = {}
        self.servers: dict[str, asyncio.base_events.Server | None] = {name: None for name in ROUTES}
        self.connections: dict[str, set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]]] = {n: set() for n in ROUTES}
        self.lifts = Lifts()  # a lifted or replaced fault's delays end at once

    # -- configuration ---------------------------------------------------------------------------
    def upstream(self, route: str) -> tuple[str, int]:
        """Where `route` forwards to, from config.json as it is now (a restarted service may have moved)."""
        try:
            mtime = self.cfg.config_path.stat().st_mtime
            if mtime != self._cfg_mtime:
                self.cfg, self._cfg_mtime = SandboxConfig.load(self.cfg.config_path), mtime
        except (OSError, ValueError):
            pass  # keep the configuration last read
        return ROUTES[route][1](self.cfg)

    def port(self, route: str) -> int:
        return getattr(self.cfg.proxy, ROUTES[route][0])

    # -- listeners -------------------------------------------------------------------------------
    async def listen(self, route: str) -> None:
        if self.servers[route] is None:
            self.servers[route] = await asyncio.start_server(
                lambda r, w: self._serve(route, r, w), "127.0.0.1", self.port(route), reuse_address=True,
            )

    def stop_listening(self, route: str) -> None:
        server, self.servers[route] = self.servers[route], None
        if server is not None:
            server.close()

    def drop_connections(self, route: str) -> None:
        for client, upstream in list(self.connections[route]):
            _reset(client)
            upstream.transport.abort()
        self.connections[route].clear()

    async def set_fault(self, route: str, fault: dict | None) -> None:
        """Apply `fault` (None: clear) to `route`; in effect when this returns."""
        mode = fault["mode"] if fault else None
        if mode == "down":
            self.stop_listening(route)
        else:
            await self.listen(route)
        if mode in ("down", "reset"):
            self.drop_connections(route)
        if fault is None:
            self.faults.pop(route, None)
        else:
            self.faults[route] = fault
        self.lifts.lift(route)

    async def start(self) -> None:
        for route in ROUTES:
            if self.port(route):
                await self.listen(route)

    def close(self) -> None:
        for route in ROUTES:
            self.stop_listening(route)
            self.drop_connections(route)

    # -- one connection --------------------------------------------------------------------------
    def _delay(self, route: str) -> float:
        fault = self.faults.get(route)
        return fault["delay_ms"] / 1000 if fault and fault["mode"] == "slow" else 0.0

    async def _slow(self, route: str) -> None:
        """Wait out a slow fault's delay, or less: until the fault is lifted or replaced."""
        delay = self._delay(route)
        if delay:
            await self.lifts.delay(route, delay)

    async def _serve(self, route: str, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        await self._slow(route)
        fault = self.faults.get(route)  # as it is now: a slow fault may have been replaced meanwhile
        if fault and fault["mode"] in ("reset", "down"):  # down: accepted just before the listener closed
            _reset(client_w)
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream(route)), UPSTREAM_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            _reset(client_w)  # the service itself is not there: as if it refused
            return
        pair = (client_w, up_w)
        self.connections[route].add(pair)
        tasks = [asyncio.create_task(self._pipe(route, client_r, up_w)), asyncio.create_task(self._pipe(route, up_r, client_w))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.connections[route].discard(pair)
            for writer in pair:
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pipe(self, route: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                await self._slow(route)
                writer.write(data)
                await writer.drain()

    # -- control API -----------------------------------------------------------------------------
    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ok", "listening": {r: s is not None for r, s in self.servers.items()}})

        async def list_or_clear(request: Request) -> Response:
            if request.method == "DELETE":
                cleared = list(self.faults)
                for route in cleared:
                    await self.set_fault(route, None)
                return JSONResponse({"cleared": len(cleared)})
            return JSONResponse(self.faults)

        async def put(request: Request) -> Response:
            route = request.path_params["route"]
            try:
                fault = parse_fault(route, await json_body(request))
                await self.set_fault(route, fault)
            except HTTPProblem as exc:
                return JSONResponse({"message": str(exc)}, status_code=exc.status)
            except OSError as exc:  # the port could not be opened again
                return JSONResponse({"message": f"cannot listen on port {self.port(route)}: {exc}"}, status_code=409)
            return JSONResponse({"route": route, "fault": fault})

        routes = [
            Route("/_sandbox/health", health, methods=["GET"]),
            Route("/_sandbox/faults", list_or_clear, methods=["GET", "DELETE"]),
            Route("/_sandbox/faults/{route}", put, methods=["PUT"]),
        ]
        return Starlette(routes=routes)


async def serve(cfg: SandboxConfig) -> None:
    import uvicorn

    from .http_common import RequestLogMiddleware

    proxy = FaultProxy(cfg)
    await proxy.start()
    app = RequestLogMiddleware(AdminTokenMiddleware(proxy.app(), cfg.admin_token), RequestLog(cfg.request_log_path("fault_proxy")))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.proxy.control_port, log_level="warning"))
    try:
        await server.serve()
    finally:
        proxy.close()


def control_url(cfg: SandboxConfig) -> str:
    return f"http://127.0.0.1:{cfg.proxy.control_port}"


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"{control_url(cfg)}/_sandbox/health")


SERVICE = ServiceDef(
    name="fault_proxy",
    ports=["proxy.control_port", *(f"proxy.{attr}" for attr, _ in ROUTES.values())],
    health=health,
    url=control_url,
    start_timeout=30,
)


if __name__ == "__main__":
    asyncio.run(serve(config_from_argv()))
