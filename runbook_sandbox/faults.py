"""The sandbox's one fault switch: cut one service, alone, and put it back.

    runbook sandbox fault <service> <mode> [--delay-ms N] [--status N] [--count N]
    runbook sandbox fault all clear
    runbook sandbox faults                     (what is cut now)

    from runbook_sandbox import faults
    with faults.fault("database", "down", state_dir=cfg.state): ...   # always cleared on exit
    faults.set_fault("prefect_api", "slow", delay_ms=5000); faults.clear("prefect_api"); faults.clear_all()

Services and how each is cut:
- `database`, `prefect_api`, `git`, `modal`: at the TCP level, by the fault proxy (`fault_proxy`) in
  front of them; modes `down` (connection refused), `reset` (accepted, then RST), `slow` (each chunk
  and each new connection delayed `delay_ms`, default 3000), `clear`.
- `supabase_api`, `edge_function` (one port, the Supabase stand-in): at the HTTP level, by path
  (`http_common.ServiceFaults`); modes `down` (503, the service's own "unavailable" answer), `reset`
  (the connection drops mid-answer), `slow` (answered after `delay_ms`, or once the fault is
  lifted), `error` (`status`, for `count` requests or until cleared), `clear`.
- `prefect_api` also has `error` (`status`, `count`), answered by the Prefect gateway itself
  (`prefect_gateway.cloud_error`: Cloud's body and headers), e.g. `error --status 503 --count 1`.
Each call returns once the fault is in effect. Faults live in the running processes: a restarted
proxy or stand-in starts with none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import httpx

from .config import SandboxConfig
from .http_common import ADMIN_HEADER, SERVICE_FAULTS_PATH

PROXIED = ("database", "prefect_api", "git", "modal")
HTTP_LEVEL = ("supabase_api", "edge_function")
SERVICES = PROXIED + HTTP_LEVEL
MODES = ("down", "reset", "slow", "clear")
HTTP_MODES = MODES + ("error",)
GATEWAY_ERROR = ("prefect_api",)  # proxied services whose `error` mode their HTTP server answers


def _modes(service: str) -> tuple[str, ...]:
    return HTTP_MODES if service in HTTP_LEVEL or service in GATEWAY_ERROR else MODES


def _gateway_endpoint(cfg: SandboxConfig, service: str) -> tuple[str, str]:
    return f"http://127.0.0.1:{cfg.prefect.gateway_port}", f"{SERVICE_FAULTS_PATH}/{service}"


class FaultError(RuntimeError):
    """A fault could not be set or cleared; the message says which service and why."""


def admin_headers(cfg: SandboxConfig) -> dict[str, str]:
    """The header the stand-ins' `/_sandbox/*` endpoints require."""
    return {ADMIN_HEADER: cfg.admin_token}


def admin_client(cfg: SandboxConfig, base_url: str, **kw) -> httpx.Client:
    """An httpx client on a stand-in's `/_sandbox/*` endpoints, with the admin token."""
    return httpx.Client(base_url=base_url, headers=admin_headers(cfg), timeout=kw.pop("timeout", 30), trust_env=False, **kw)


def _endpoint(cfg: SandboxConfig, service: str) -> tuple[str, str]:
    """(base URL, path) of the control endpoint of `service`'s fault."""
    if service in PROXIED:
        if not cfg.proxy.control_port:
            raise FaultError(f"{service}: this sandbox runs no fault proxy (started with `only`?); "
                             "start it with `runbook sandbox up`")
        return f"http://127.0.0.1:{cfg.proxy.control_port}", f"/_sandbox/faults/{service}"
    if service in HTTP_LEVEL:
        return cfg.supabase_api_url, f"{SERVICE_FAULTS_PATH}/{service}"
    raise FaultError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")


def set_fault(service: str, mode: str, *, state_dir: Path | str | None = None, delay_ms: int | None = None,
              status: int | None = None, count: int | None = None) -> dict | None:
    """Set `service`'s fault to `mode` (see the module doc); returns the fault now in effect (None
    after `clear`). Raises FaultError for an unknown service or mode, or when the switch refuses."""
    cfg = SandboxConfig.load_or_create(Path(state_dir) if state_dir else None)
    modes = _modes(service)
    if service in SERVICES and mode not in modes:
        raise FaultError(f"{service}: unknown mode {mode!r}; known: {', '.join(modes)}")
    http_error = service in GATEWAY_ERROR and mode == "error"
    if (status is not None or count is not None) and not (service in HTTP_LEVEL or http_error):
        raise FaultError(f"{service}: --status/--count apply to the mode `error` of "
                         f"{', '.join(HTTP_LEVEL + GATEWAY_ERROR)} only")
    body: dict = {"mode": mode}
    if delay_ms is not None:
        body["delay_ms"] = delay_ms
    if status is not None:
        body["status"] = status
    if count is not None:
        body["count"] = count
    if http_error:
        return _put(cfg, service, mode, *_gateway_endpoint(cfg, service), body)
    if service in GATEWAY_ERROR:
        # One fault a service: a TCP-level mode (or clear) replaces the gateway's error, and the reverse.
        # A gateway that does not run (a partial sandbox) has no fault to clear.
        with contextlib.suppress(FaultError):
            _put(cfg, service, "clear", *_gateway_endpoint(cfg, service), {"mode": "clear"})
    return _put(cfg, service, mode, *_endpoint(cfg, service), body)


def _put(cfg: SandboxConfig, service: str, mode: str, base: str, path: str, body: dict) -> dict | None:
    try:
        with admin_client(cfg, base) as client:
            r = client.put(path, json=body)
    except httpx.HTTPError as exc:
        raise FaultError(f"{service}: the fault switch at {base} did not answer ({type(exc).__name__}: {exc}); "
                         "is the sandbox up?") from None
    if r.status_code != 200:
        raise FaultError(f"{service}: the fault switch refused {mode!r}: {r.status_code} {r.text.strip()}")
    return r.json().get("fault")


def clear(service: str, *, state_dir: Path | str | None = None) -> None:
    set_fault(service, "clear", state_dir=state_dir)


def active(*, state_dir: Path | str | None = None) -> dict[str, dict]:
    """Every fault in effect: {service: fault}."""
    cfg = SandboxConfig.load_or_create(Path(state_dir) if state_dir else None)
    out: dict[str, dict] = {}
    sources = [(cfg.supabase_api_url, SERVICE_FAULTS_PATH)]
    if cfg.proxy.control_port:
        sources.insert(0, (f"http://127.0.0.1:{cfg.proxy.control_port}", "/_sandbox/faults"))
    if cfg.prefect.gateway_port:
        sources.insert(0, (f"http://127.0.0.1:{cfg.prefect.gateway_port}", SERVICE_FAULTS_PATH))
    gateway = f"http://127.0.0.1:{cfg.prefect.gateway_port}"
    for base, path in sources:
        try:
            with admin_client(cfg, base) as client:
                r = client.get(path)
                r.raise_for_status()
        except httpx.ConnectError:
            if base == gateway:
                continue  # not running (a partial sandbox): no fault there
            raise FaultError(f"cannot read the faults at {base}{path}: connection refused") from None
        except httpx.HTTPError as exc:
            raise FaultError(f"cannot read the faults at {base}{path}: {exc}") from None
        out.update(r.json())
    return out


def clear_all(*, state_dir: Path | str | None = None) -> None:
    """Clear every fault of every service."""
    for service in active(state_dir=state_dir):
        clear(service, state_dir=state_dir)


@contextlib.contextmanager
def fault(service: str, mode: str, *, state_dir: Path | str | None = None, delay_ms: int | None = None,
          status: int | None = None, count: int | None = None) -> Iterator[dict | None]:
    """`service` cut with `mode` for the duration of the block; always cleared on exit."""
    current = set_fault(service, mode, state_dir=state_dir, delay_ms=delay_ms, status=status, count=count)
    try:
        yield current
    finally:
        clear(service, state_dir=state_dir)
