"""The worker behind the `prefect:managed` pool `managed-production`: Prefect Cloud's managed
execution, on loopback.

A ProcessWorker subclass of type `prefect:managed`, talking to the Cloud-shaped gateway with the API
key like any Cloud client. It picks a run up as the run is scheduled: it follows the pool's events
(`/events/out`: a flow run Scheduled, the pool or a queue ready again) and asks for the pool's runs at
each, with Prefect's own poll every few seconds as the fallback (`pick_up_on_events`). For each run it
does what the managed infrastructure does:

1. Prefect's templating resolves the job variables, `{{ prefect.blocks.secret.* }}` placeholders
   in `env` included; a missing Secret block fails the submission, so the run ends CRASHED with
   the block's name in the state message.
2. `pip_packages` are installed into the emulated managed image (`managed_runtime`); a pip
   failure ends the run CRASHED with pip's error in the state message and in the run's logs.
3. The flow process starts: Prefect's engine runs the deployment's pull steps (`git clone`) and
   imports the entrypoint under the image's import guard, so a module missing from pip_packages
   makes the run fail with ModuleNotFoundError, as in production.

The runtime is this machine's Python 3.11; production's managed image runs Python 3.12.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

from runbook_lib.core import tls
from runbook_lib.core.startup import lower_this_threads_priority, no_collections_while_importing, without_iri_formats

from .config import SandboxConfig, config_from_argv
from .service import ServiceDef, recorded_pid

# The worker type, imported when used (`managed_worker_type`): ManagedWorker, ManagedJobConfiguration,
# ManagedVariables, DEFAULT_IMAGE.
_TYPE_NAMES = {"ManagedWorker", "ManagedJobConfiguration", "ManagedVariables", "DEFAULT_IMAGE"}


def __getattr__(name: str) -> Any:
    if name in _TYPE_NAMES:
        from . import managed_worker_type

        return getattr(managed_worker_type, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _template_key() -> str:
    """What the base job template depends on: the installed Prefect and the worker type's source."""
    source = (Path(__file__).parent / "managed_worker_type.py").read_bytes()
    return f"prefect {importlib.metadata.version('prefect')} / {hashlib.sha256(source).hexdigest()}"


def _template_cache(cfg: SandboxConfig) -> Path:
    return cfg.path("prefect", "managed-base-job-template.json")


def write_base_job_template(cfg: SandboxConfig) -> dict[str, Any]:
    """Compute the template (imports Prefect's worker) and keep it in the sandbox's state."""
    from .managed_worker_type import base_job_template as compute

    template = compute()
    tmp = _template_cache(cfg).with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": _template_key(), "template": template}))
    tmp.replace(_template_cache(cfg))
    return template


def base_job_template(cfg: SandboxConfig | None = None) -> dict[str, Any]:
    """The pool's base job template: the process worker's, plus `pip_packages` and `image`.

    With `cfg`, read from the sandbox's state when written there for this Prefect and this worker
    type (the worker process writes it as it starts), so the gateway's set-up need not import the
    worker; else computed, and kept."""
    if cfg is None:
        from .managed_worker_type import base_job_template as compute

        return compute()
    try:
        cached = json.loads(_template_cache(cfg).read_text())
        if cached.get("key") == _template_key():
            return cached["template"]
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    return write_base_job_template(cfg)


def worker_name(cfg: SandboxConfig) -> str:
    return f"managed-{cfg.instance_id[:8]}"


def worker_home(cfg: SandboxConfig) -> str:
    path = cfg.state / "prefect" / "worker"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# What makes the worker ask for the pool's runs at once: one of its runs scheduled, the pool or one of
# its queues becoming ready (or not ready: resumed while no worker is online). The pool is matched by
# name, so a pool deleted and created again is still followed.
PICKUP_EVENTS = [
    "prefect.flow-run.Scheduled",
    "prefect.work-pool.ready", "prefect.work-pool.not-ready",
    "prefect.work-queue.ready", "prefect.work-queue.not-ready",
]
FALLBACK_QUERY_SECONDS = 5
RESUBSCRIBE_SECONDS = (1.0, 10.0)  # the wait before subscribing again: doubled from the first to the second


def worker_env(cfg: SandboxConfig) -> dict[str, str]:
    tmp = cfg.state / "prefect" / "worker" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **cfg.prefect_client_settings(),
        "PREFECT_HOME": worker_home(cfg),
        # Flow runs' working directories, clones and run manifests (which hold the run's resolved
        # environment, secrets included) stay in the sandbox's state, even after a kill.
        "TMPDIR": str(tmp),
        # The fallback poll: runs are picked up on their events (`pick_up_on_events`).
        "PREFECT_WORKER_QUERY_SECONDS": str(FALLBACK_QUERY_SECONDS),
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


def _process_started(cfg: SandboxConfig) -> datetime | None:
    pid = recorded_pid(cfg, SERVICE.name)
    try:
        return datetime.fromtimestamp(psutil.Process(pid).create_time(), timezone.utc) if pid else None
    except psutil.Error:
        return None


def health(cfg: SandboxConfig) -> str | None:
    """Healthy once the pool lists this worker ONLINE with a heartbeat from the current process
    (a worker restarted under the same name is not healthy on its predecessor's heartbeat)."""
    try:
        r = httpx.post(
            f"{cfg.prefect_api_url}/work_pools/{cfg.prefect.work_pool}/workers/filter",
            json={},
            headers={"Authorization": f"Bearer {cfg.prefect.api_key}"},
            timeout=5,
            verify=tls.verified(),
        )
    except httpx.HTTPError as exc:
        return f"gateway unreachable: {type(exc).__name__}"
    if r.status_code != 200:
        return f"listing the pool's workers answered {r.status_code}"
    workers = [w for w in r.json() if w.get("name") == worker_name(cfg)]
    if not workers:
        return f"worker {worker_name(cfg)} has not polled {cfg.prefect.work_pool} yet"
    if workers[0].get("status") != "ONLINE":
        return f"worker {worker_name(cfg)} is {workers[0].get('status')}"
    started = _process_started(cfg)
    beat = datetime.fromisoformat(workers[0]["last_heartbeat_time"].replace("Z", "+00:00"))
    if started and beat < started:
        return f"worker {worker_name(cfg)} has not sent a heartbeat since it started"
    return None


POOL_WAIT_SECONDS = 300.0


async def wait_for_pool(cfg: SandboxConfig, timeout: float = POOL_WAIT_SECONDS) -> None:
    """Wait until the gateway answers for the pool: `sandbox up` starts this process beside the Prefect
    server, so its imports overlap the server's start; the gateway creates the pool once that is up."""
    url = f"{cfg.prefect_api_url}/work_pools/{cfg.prefect.work_pool}"
    headers = {"Authorization": f"Bearer {cfg.prefect.api_key}"}
    deadline = anyio.current_time() + timeout
    last = "no answer yet"
    async with httpx.AsyncClient(timeout=5, trust_env=False, headers=headers) as http:
        while anyio.current_time() < deadline:
            try:
                r = await http.get(url)
                if r.status_code == 200:
                    return
                last = f"{url} answered {r.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__} from {url}"
            await anyio.sleep(0.1)
    raise SystemExit(f"managed worker: the pool {cfg.prefect.work_pool} did not appear within {timeout:.0f}s ({last})")


def pickup_filter(pool: str) -> Any:
    """The events `pick_up_on_events` follows: PICKUP_EVENTS about the pool named `pool`."""
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    return EventFilter(
        event=EventNameFilter(name=PICKUP_EVENTS),
        any_resource=EventAnyResourceFilter(id_prefix=["prefect.work-pool."],
                                            labels={"prefect.resource.name": pool}),
    )


async def _pick_up(worker: Any, event: Any) -> None:
    """Ask for the pool's runs at `event`; one line of the log says what was picked up."""
    try:
        runs = await worker.get_and_submit_flow_runs()
    except Exception as exc:  # noqa: BLE001 - the poll asks again
        print(f"managed_worker: pickup on {event.event} failed ({type(exc).__name__}); the poll asks again",
              flush=True)
        return
    print(f"managed_worker: on {event.event} ({event.resource.id}) picked up "
          + (", ".join(str(r.id) for r in runs) or "nothing new"), flush=True)


async def pick_up_on_events(worker: Any, pool: str) -> None:
    """Ask for the pool's runs whenever one of its runs is scheduled (or the pool is ready again), so a
    run starts within the event's ~0.1 s instead of the poll's interval; Prefect's poll (every
    FALLBACK_QUERY_SECONDS) still picks up what an event did not announce. A lost subscription is
    made again (Prefect's subscriber replays what it missed); a failed request is left to the poll."""
    from prefect.events.clients import get_events_subscriber

    wait = RESUBSCRIBE_SECONDS[0]
    while True:
        try:
            async with get_events_subscriber(filter=pickup_filter(pool)) as events:
                wait = RESUBSCRIBE_SECONDS[0]
                print(f"managed_worker: following {pool}'s events for pickups", flush=True)
                async for event in events:
                    await _pick_up(worker, event)
        except Exception as exc:  # noqa: BLE001 - subscribe again; the poll covers the gap
            print(f"managed_worker: events of {pool} lost ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"subscribing again in {wait:.0f}s", flush=True)
        await anyio.sleep(wait)
        wait = min(wait * 2, RESUBSCRIBE_SECONDS[1])


async def serve(cfg: SandboxConfig) -> None:
    began = time.monotonic()
    without_iri_formats()
    with no_collections_while_importing():
        from . import managed_runtime
        from .managed_worker_type import ManagedWorker

    write_base_job_template(cfg)  # for the gateway's set-up, which may then skip importing the worker
    imported = time.monotonic()
    # The emulated image's import guard lists what it blocks by scanning every installed distribution
    # (~0.7 s of CPU): done while the pool is awaited, in a thread at a lower priority (the Prefect server
    # starting beside it is what `sandbox up` waits for), instead of after it, on `up`'s critical path.
    with ThreadPoolExecutor(1, "blocked-modules", initializer=lower_this_threads_priority) as pool:
        blocked = pool.submit(managed_runtime.write_blocked_modules,
                              cfg.path("prefect", "managed-image-blocked-modules.json"))
        await wait_for_pool(cfg)
        print(f"managed_worker: imports {imported - began:.1f}s; pool ready after "
              f"{time.monotonic() - imported:.1f}s more", flush=True)
        blocked_modules_file = await anyio.to_thread.run_sync(blocked.result)
    worker = ManagedWorker(
        work_pool_name=cfg.prefect.work_pool,
        name=worker_name(cfg),
        create_pool_if_not_found=False,
        blocked_modules_file=blocked_modules_file,
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(pick_up_on_events, worker, cfg.prefect.work_pool)
        await worker.start()
        tasks.cancel_scope.cancel()


SERVICE = ServiceDef(
    name="managed_worker",
    # Its process starts (imports) at once, beside the Prefect server and the fault proxy it reaches
    # the gateway through, and waits for the pool (`serve`); it is up once the gateway created the
    # pool and the worker polled it.
    after_start_needs=["fault_proxy", "prefect_gateway"],
    uses=["fault_proxy"],
    health=health,
    url=lambda cfg: f"{cfg.prefect_api_url}/work_pools/{cfg.prefect.work_pool}",
    env=worker_env,
    start_timeout=240,  # counted from its spawn, so it includes the Prefect server's first migrations
)


if __name__ == "__main__":
    anyio.run(serve, config_from_argv())
