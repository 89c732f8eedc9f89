"""The worker behind the `prefect:managed` pool `managed-production`: Prefect Cloud's managed
execution, on loopback.

A ProcessWorker subclass of type `prefect:managed`, polling through the Cloud-shaped gateway with
the API key like any Cloud client. For each run it does what the managed infrastructure does:

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

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import psutil
from pydantic import Field
from prefect.workers.process import ProcessJobConfiguration, ProcessVariables, ProcessWorker, ProcessWorkerResult

from . import managed_runtime
from .config import SandboxConfig, config_from_argv
from .service import ServiceDef, recorded_pid

DEFAULT_IMAGE = "prefecthq/prefect-client:3-python3.12"


class ManagedJobConfiguration(ProcessJobConfiguration):
    pip_packages: list[str] = Field(default_factory=list)
    image: Optional[str] = Field(default=None)


class ManagedVariables(ProcessVariables):
    pip_packages: list[str] = Field(
        default_factory=list,
        title="Pip Packages",
        description="Requirement strings installed with pip when a flow run starts.",
    )
    image: Optional[str] = Field(
        default=DEFAULT_IMAGE,
        title="Image",
        description="The runtime image (emulated here: this machine's Python with prefect).",
    )


class ManagedWorker(ProcessWorker):
    """Runs flow runs of a `prefect:managed` pool in the emulated managed runtime."""

    type = "prefect:managed"
    job_configuration = ManagedJobConfiguration
    job_configuration_variables = ManagedVariables
    _description = "Prefect Cloud's managed execution, emulated on loopback by the runbook sandbox."
    _display_name = "Prefect Managed (sandbox)"

    def __init__(self, *args: Any, blocked_modules_file: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._blocked_modules_file = blocked_modules_file

    async def run(
        self,
        flow_run: Any,
        configuration: ManagedJobConfiguration,
        task_status: Optional[anyio.abc.TaskStatus[int]] = None,
    ) -> ProcessWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        logger.info(
            "Managed runtime: image %s (emulated by this machine's Python with prefect)",
            configuration.image or DEFAULT_IMAGE,
        )
        try:
            target = await anyio.to_thread.run_sync(
                managed_runtime.ensure_environment, configuration.pip_packages, logger.info
            )
        except managed_runtime.ManagedEnvironmentError as exc:
            logger.error("%s", exc)
            raise
        configuration.env.update(managed_runtime.runtime_environment(target, self._blocked_modules_file))
        return await super().run(flow_run, configuration, task_status)


def base_job_template() -> dict[str, Any]:
    """The pool's base job template: the process worker's, plus `pip_packages` and `image`."""
    return ManagedWorker.get_default_base_job_template()


def worker_name(cfg: SandboxConfig) -> str:
    return f"managed-{cfg.instance_id[:8]}"


def worker_home(cfg: SandboxConfig) -> str:
    path = cfg.state / "prefect" / "worker"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def worker_env(cfg: SandboxConfig) -> dict[str, str]:
    tmp = cfg.state / "prefect" / "worker" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **cfg.prefect_client_settings(),
        "PREFECT_HOME": worker_home(cfg),
        # Flow runs' working directories, clones and run manifests (which hold the run's resolved
        # environment, secrets included) stay in the sandbox's state, even after a kill.
        "TMPDIR": str(tmp),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
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


async def serve(cfg: SandboxConfig) -> None:
    blocked = managed_runtime.write_blocked_modules(cfg.path("prefect", "managed-image-blocked-modules.json"))
    worker = ManagedWorker(
        work_pool_name=cfg.prefect.work_pool,
        name=worker_name(cfg),
        create_pool_if_not_found=False,
        blocked_modules_file=blocked,
    )
    await worker.start()


SERVICE = ServiceDef(
    name="managed_worker",
    health=health,
    url=lambda cfg: f"{cfg.prefect_api_url}/work_pools/{cfg.prefect.work_pool}",
    env=worker_env,
    start_timeout=90,
)


if __name__ == "__main__":
    anyio.run(serve, config_from_argv())
