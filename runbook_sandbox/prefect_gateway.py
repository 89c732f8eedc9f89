"""Prefect Cloud's API surface, on loopback: a gateway with Cloud's URL shape and bearer auth in
front of the real Prefect server (`prefect_server`).

    {cfg.prefect_api_url} = http://127.0.0.1:<port>/api/accounts/<account id>/workspaces/<workspace id>

Every HTTP request under that base needs `Authorization: Bearer <cfg.prefect.api_key>` (401
otherwise; 404 for another account or workspace) and is passed through to `<server>/api/...`
(the key is not forwarded). Response bodies honour the client's `Accept-Encoding`, as Cloud does: gzip
(passed through from the server, with `Content-Encoding: gzip`) only to a client whose header allows
it, else identity (no `Content-Encoding`, the `Content-Length` of the plain body; a streamed body stays
streamed); `accepts_gzip`. WebSocket upgrades under it (`/events/in`, `/events/out`, `/logs/out`,
`/task_runs/subscriptions/scheduled`, `/work_pools/<pool>/workers/connect`) are proxied too,
authenticated as Cloud authenticates them with prefect 3.9.1's clients:

- a bearer `Authorization` header on the upgrade (the Cloud events client sends one; a bad key is a
  401 answer to the upgrade), or
- for the `prefect` subprotocol, the first message `{"type": "auth", "token": <api key>}` (event and
  log subscribers, the worker channel): a bad token closes the socket with 1008.

The clients pick their Cloud classes (which send the key at all on WebSockets) only when
PREFECT_API_URL starts with PREFECT_CLOUD_API_URL, so the sandbox exports PREFECT_CLOUD_API_URL
= `http://127.0.0.1:<port>/api` next to PREFECT_API_URL and PREFECT_API_KEY.

Faults (`/_sandbox/service-faults/prefect_api`, admin token; `runbook sandbox fault prefect_api error
--status 503 --count 1`): the TCP-level modes (down, reset, slow) belong to the fault proxy in front of
this gateway; the gateway answers the HTTP-level one, `error` (`http_common.ServiceFaults`): the next
`count` requests under `/api/` (or all, until cleared) get `status` as Cloud answers it, FastAPI's
`{"detail": <reason>}`, with `Retry-After: 1` on 429 and 503 (Cloud's rate limit and maintenance
answers carry one; Prefect's client waits that long, then retries 408/429/502/503 up to
PREFECT_CLIENT_MAX_RETRIES times). Such answers are logged with `"fault": true`.

Each request is one JSON line in `cfg.request_log_path("prefect")` (`http_common.RequestLog`): time,
method (`WEBSOCKET` for upgrades, logged once refused or connected through), path, status, duration;
never headers, bodies, query strings or the key.

After start, idempotently: the work pool `managed-production` (type `prefect:managed`, with the
managed worker's base job template: the process template plus `pip_packages` and `image`; Prefect's
CLI refuses that type on a server, its API does not) and the Secret blocks
`postgres-connection-string`, `modal-token-id` and `modal-token-secret`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import httpx
import websockets
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from runbook_lib.core import processes, tls

from .config import SandboxConfig, config_from_argv
from .http_common import AdminTokenMiddleware, RequestLog, RequestLogMiddleware, ServiceFaults, bearer_token
from .service import ServiceDef

WORKSPACE_PATH = "/api/accounts/{account_id}/workspaces/{workspace_id}/{path:path}"
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}
AUTH_MESSAGE_TIMEOUT = 10.0
GZIP_CODINGS = {"gzip", "x-gzip"}
SECRET_BLOCKS = ("postgres-connection-string", "modal-token-id", "modal-token-secret")


def exports(cfg: SandboxConfig) -> dict[str, str]:
    return {
        **cfg.prefect_client_settings(),
        "PREFECT_ACCOUNT_ID": cfg.prefect.account_id,
        "PREFECT_WORKSPACE_ID": cfg.prefect.workspace_id,
    }


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an `Accept-Encoding` header allows gzip (RFC 9110 12.5.3): `gzip` (or `x-gzip`) with a
    q-value above 0, or else `*` with one. No header, `identity`, `gzip;q=0`: no."""
    named: float | None = None
    star: float | None = None
    for item in (accept_encoding or "").split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if not coding:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        coding = coding.lower()
        if coding in GZIP_CODINGS:
            named = q if named is None else max(named, q)
        elif coding == "*":
            star = q
    if named is not None:
        return named > 0
    return star is not None and star > 0


# -- faults ----------------------------------------------------------------------------------------

FAULT_SERVICE = "prefect_api"
FAULT_MODES = ("error", "clear")  # down, reset, slow: the fault proxy's (TCP level)
RETRY_AFTER_STATUSES = (429, 503)


def cloud_error(status: int) -> tuple[dict, dict[str, str]]:
    """The (body, headers) of Cloud's answer with `status`: FastAPI's `{"detail": ...}`."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return {"detail": reason}, ({"Retry-After": "1"} if status in RETRY_AFTER_STATUSES else {})


def service_faults() -> ServiceFaults:
    return ServiceFaults({FAULT_SERVICE: ("/api/",)}, {FAULT_SERVICE: (503, cloud_error(503)[0])},
                         error_answers={FAULT_SERVICE: cloud_error}, modes=FAULT_MODES)


# -- the gateway -----------------------------------------------------------------------------------


class Gateway:
    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.upstream = cfg.prefect_server_api_url  # http://127.0.0.1:<server>/api
        self.log = RequestLog(cfg.request_log_path("prefect"))
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=200))

    def public_base(self) -> str:
        return self.cfg.prefect_api_url

    def valid_key(self, token: object) -> bool:
        return isinstance(token, str) and bool(token) and hmac.compare_digest(
            token.encode(), self.cfg.prefect.api_key.encode()
        )

    def check_header(self, headers) -> int | None:
        """None when the bearer header carries the API key, else the status to answer (401)."""
        if not self.valid_key(bearer_token(headers)):  # None for a missing, malformed or non-ASCII header
            return 401
        return None

    def check_workspace(self, params: dict) -> bool:
        p = self.cfg.prefect
        return params["account_id"] == p.account_id and params["workspace_id"] == p.workspace_id

    # -- HTTP (logged by RequestLogMiddleware) -------------------------------------------------
    async def http_proxy(self, request: Request) -> Response:
        if self.check_header(request.headers):
            detail = "Invalid API key" if request.headers.get("authorization") else "Missing API key"
            return JSONResponse({"detail": detail}, status_code=401)
        if not self.check_workspace(request.path_params):
            return JSONResponse({"detail": "Workspace not found"}, status_code=404)
        url = f"{self.upstream}/{request.path_params['path']}"
        if request.url.query:
            url += "?" + request.url.query
        # The server compresses whenever "gzip" appears in the header (and httpx would ask for it on
        # its own): it is asked for gzip only when the client's header allows it, else for identity.
        gzip_ok = accepts_gzip(request.headers.get("accept-encoding"))
        headers = [
            (k, v) for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP | {"authorization", "accept-encoding"}
        ]
        headers.append(("accept-encoding", "gzip" if gzip_ok else "identity"))
        upstream_request = self.http.build_request(request.method, url, headers=headers, content=await request.body())
        try:
            upstream = await self.http.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"detail": f"Prefect server unavailable: {type(exc).__name__}"}, status_code=502)
        encoding = upstream.headers.get("content-encoding", "").strip().lower()
        decode = encoding not in ("", "identity") and not (gzip_ok and encoding in GZIP_CODINGS)
        out_headers = {}
        for k, v in upstream.headers.multi_items():
            lk = k.lower()
            if lk in HOP_BY_HOP - {"content-length"} or lk in {"date", "server"}:
                continue
            if decode and lk in {"content-encoding", "content-length"}:
                continue
            if lk == "location" and v.startswith(self.upstream):
                v = self.public_base() + v[len(self.upstream):]
            out_headers[k] = v
        if decode and "content-length" in upstream.headers and request.method != "HEAD":
            # An encoding the client did not accept, on a whole body: decoded, with its own length.
            try:
                body = await upstream.aread()
            finally:
                await upstream.aclose()
            return Response(body, status_code=upstream.status_code, headers=out_headers)
        return StreamingResponse(
            upstream.aiter_bytes() if decode else upstream.aiter_raw(),  # a streamed body: decoded as it goes
            status_code=upstream.status_code, headers=out_headers,
            background=BackgroundTask(upstream.aclose),
        )

    # -- WebSocket -----------------------------------------------------------------------------
    async def ws_proxy(self, websocket: WebSocket) -> None:
        """Logged when decided (refused, or connected through), not when the socket ends."""
        started = time.monotonic()
        path = websocket.url.path
        status = await self._ws_proxy(websocket, lambda code: self.log.write("WEBSOCKET", path, code, started))
        if status != 101:
            self.log.write("WEBSOCKET", path, status, started)

    async def _ws_proxy(self, websocket: WebSocket, connected) -> int:
        has_header = "authorization" in websocket.headers
        subprotocols = websocket.scope.get("subprotocols") or []
        if has_header and self.check_header(websocket.headers):
            await websocket.send_denial_response(JSONResponse({"detail": "Invalid API key"}, status_code=401))
            return 401
        if not self.check_workspace(websocket.path_params):
            await websocket.send_denial_response(JSONResponse({"detail": "Workspace not found"}, status_code=404))
            return 404
        message_auth = "prefect" in subprotocols
        if not has_header and not message_auth:
            await websocket.send_denial_response(JSONResponse({"detail": "Missing API key"}, status_code=401))
            return 401
        await websocket.accept(subprotocol="prefect" if message_auth else None)
        first: str | None = None
        if message_auth:
            try:
                raw = await asyncio.wait_for(websocket.receive_text(), AUTH_MESSAGE_TIMEOUT)
                message = json.loads(raw)
            except (asyncio.TimeoutError, WebSocketDisconnect, ValueError, KeyError):
                await _close(websocket, 1008, "Expected 'auth' message")
                return 401
            if not isinstance(message, dict) or message.get("type") != "auth":
                await _close(websocket, 1008, "Expected 'auth' message")
                return 401
            if not has_header and not self.valid_key(message.get("token")):
                await _close(websocket, 1008, "Invalid API key")
                return 401
            first = json.dumps({"type": "auth", "token": None})  # the server needs no key
        url = self.upstream.replace("http://", "ws://", 1) + "/" + websocket.path_params["path"]
        if websocket.url.query:
            url += "?" + websocket.url.query
        try:
            upstream = await websockets.connect(
                url,
                subprotocols=[websockets.Subprotocol("prefect")] if message_auth else None,
                open_timeout=10,
                max_size=None,
                ping_interval=None,
            )
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError):
            await _close(websocket, 1011, "Prefect server unavailable")
            return 502
        async with upstream:
            connected(101)
            if first is not None:
                await upstream.send(first)
            await _pipe(websocket, upstream)
        return 101


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code, reason)


async def _pipe(client: WebSocket, upstream) -> None:
    """Relay frames both ways until either side closes; pass the close code on."""

    async def client_to_upstream() -> None:
        while True:
            message = await client.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code") or 1000, message.get("reason") or "")
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await client.send_text(data)
                else:
                    await client.send_bytes(data)
        except websockets.ConnectionClosed:
            pass
        code = upstream.close_code or 1000
        await _close(client, 1000 if code in (1005, 1006) else code, upstream.close_reason or "")

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def create_app(cfg: SandboxConfig) -> Starlette:
    gateway = Gateway(cfg)
    faults = service_faults()

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def not_found(request: Request) -> Response:
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await gateway.http.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/_sandbox/health", health),
            *faults.routes(),
            Route(WORKSPACE_PATH, gateway.http_proxy, methods=methods),
            WebSocketRoute(WORKSPACE_PATH, gateway.ws_proxy),
            Route("/{path:path}", not_found, methods=methods),
        ],
        middleware=[Middleware(RequestLogMiddleware, log=gateway.log, service_faults=faults),
                    Middleware(AdminTokenMiddleware, token=cfg.admin_token, error_key="detail")],
        lifespan=lifespan,
    )


def serve(cfg: SandboxConfig) -> None:
    import uvicorn

    uvicorn.run(
        create_app(cfg), host="127.0.0.1", port=cfg.prefect.gateway_port, log_level="warning",
        server_header=False, date_header=False,
        timeout_graceful_shutdown=3,  # long-lived WebSockets must not hold `sandbox down`
    )


# -- sandbox service -----------------------------------------------------------------------------


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"http://127.0.0.1:{cfg.prefect.gateway_port}/_sandbox/health")


def api(cfg: SandboxConfig) -> httpx.Client:
    """An httpx client on the workspace API, authenticated like any Cloud client."""
    return httpx.Client(
        base_url=cfg.prefect_api_url + "/",
        headers={"Authorization": f"Bearer {cfg.prefect.api_key}"},
        timeout=30,
        verify=tls.httpx_default(),
    )


def ensure_work_pool(cfg: SandboxConfig) -> None:
    """Create the managed pool, or bring its base job template up to date (its paused state stays).
    On a sandbox that has it already, one read and nothing written."""
    from .managed_worker import base_job_template  # here: the gateway's own process needs no worker code

    template = base_job_template(cfg)
    with api(cfg) as client:
        r = client.get(f"work_pools/{cfg.prefect.work_pool}")
        if r.status_code == 404:
            r = client.post(
                "work_pools/",
                json={"name": cfg.prefect.work_pool, "type": cfg.prefect.work_pool_type, "base_job_template": template},
            )
            if r.status_code != 409:  # 409: created meanwhile by someone else; read it as it is
                r.raise_for_status()
                return
            r = client.get(f"work_pools/{cfg.prefect.work_pool}")
        r.raise_for_status()
        if r.json().get("type") != cfg.prefect.work_pool_type:
            raise RuntimeError(
                f"work pool {cfg.prefect.work_pool!r} exists with type {r.json().get('type')!r}, "
                f"not {cfg.prefect.work_pool_type!r}; delete it and run `sandbox up` again"
            )
        if r.json().get("base_job_template") != template:
            client.patch(f"work_pools/{cfg.prefect.work_pool}", json={"base_job_template": template}).raise_for_status()


def secret_values(cfg: SandboxConfig) -> dict[str, str]:
    return {
        "postgres-connection-string": cfg.database_url,
        "modal-token-id": cfg.modal.token_id,
        "modal-token-secret": cfg.modal.token_secret,
    }


def ensure_secret_blocks(cfg: SandboxConfig) -> None:
    """Create or update the Secret blocks through the REST API (values never printed). The existing ones
    are read in one request; only a missing block or a changed value is written."""
    wanted = secret_values(cfg)
    with api(cfg) as client:
        r = client.post(
            "block_documents/filter",
            json={
                "block_types": {"slug": {"any_": ["secret"]}},
                "block_documents": {"name": {"any_": list(wanted)}},
                "include_secrets": True,
            },
        )
        r.raise_for_status()
        existing = {doc["name"]: doc for doc in r.json()}
        schema_id = block_type_id = None
        for name, value in wanted.items():
            doc = existing.get(name)
            if doc is not None:
                if (doc.get("data") or {}).get("value") != value:
                    client.patch(
                        f"block_documents/{doc['id']}",
                        json={"data": {"value": value}, "merge_existing_data": False},
                    ).raise_for_status()
                continue
            if schema_id is None:
                schema_id, block_type_id = _secret_schema(client)
            client.post(
                "block_documents/",
                json={
                    "name": name, "data": {"value": value},
                    "block_schema_id": schema_id, "block_type_id": block_type_id,
                },
            ).raise_for_status()


def _secret_schema(client: httpx.Client) -> tuple[str, str]:
    """(block schema id, block type id) of the Secret block."""
    r = client.get("block_types/slug/secret")
    r.raise_for_status()
    block_type_id = r.json()["id"]
    r = client.post("block_schemas/filter", json={"block_schemas": {"block_type_id": {"any_": [block_type_id]}}})
    r.raise_for_status()
    if not r.json():
        raise RuntimeError("the Prefect server has no schema for the Secret block type")
    return r.json()[0]["id"], block_type_id


def after_start(cfg: SandboxConfig) -> None:
    """The pool and the Secret blocks, at the same time (the managed worker waits for the pool)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-setup") as pool:
        futures = [pool.submit(ensure_work_pool, cfg), pool.submit(ensure_secret_blocks, cfg)]
    for future in futures:
        future.result()


SERVICE = ServiceDef(
    name="prefect_gateway",
    ports=["prefect.gateway_port"],
    health=health,
    url=lambda cfg: cfg.prefect_api_url,
    after_start=after_start,
    after_start_needs=["prefect_server", "fault_proxy"],  # the pool and blocks, through the public URL
    exports=exports,
    start_timeout=30,
)


if __name__ == "__main__":
    serve(config_from_argv())
