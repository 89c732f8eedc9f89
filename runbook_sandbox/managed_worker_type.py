"""The `prefect:managed` worker type (`ManagedWorker`, a ProcessWorker subclass) that
`managed_worker` runs: apart from it because importing Prefect's worker costs seconds, which
`sandbox up | status | down` (they import every service module for its ServiceDef) need not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import anyio
import anyio.abc
import anyio.to_thread
from pydantic import Field
from prefect.workers.process import ProcessJobConfiguration, ProcessVariables, ProcessWorker, ProcessWorkerResult

from . import managed_runtime

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
