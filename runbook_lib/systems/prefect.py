"""The Prefect side: Prefect's own client, pointed at the profile's API URL and key.

Each call opens `PrefectClient(api_url, api_key)` for its duration and runs through `run_sync`,
so it works from a notebook cell (running loop) and from plain Python alike. The clients of a process
share one TLS context (`tls_context`), built as Prefect's client builds its own. Failures become a
`PrefectApiError` saying what to fix (a rejected key, a wrong workspace, an unreachable URL),
not a traceback. Reads of a single object return None when it does not exist.

`prefect_settings(settings)` points Prefect's global settings at the same URL and key (and Cloud
URL) for the APIs that take no client (`flow.from_source(...).deploy()`, `Secret.load`).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterator, TypeVar
from uuid import UUID

import httpx

from runbook_lib.core import tls
from runbook_lib.core.aio import run_sync
from runbook_lib.core.errors import PrefectApiError
from runbook_lib.core.secrets import redact, register_secret
from runbook_lib.core.settings import RunbookSettings

# What the first call to Prefect imports (its client: seconds of CPU). A step that calls Prefect names
# these in its module's WARM_IMPORTS: the runner's prewarmed kernel imports them before the step is due.
CLIENT_MODULES = ("prefect", "prefect.client.orchestration")

T = TypeVar("T")

FINAL_STATE_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PrefectApi:
    def __init__(
        self, api_url: str, api_key: str | None, *, cloud: bool = False, timeout: float = 30.0, call_timeout: float = 120.0
    ):
        self.api_url = api_url.rstrip("/")
        self.cloud = cloud
        self._api_key = api_key
        self.timeout = timeout
        self.call_timeout = call_timeout
        register_secret(api_key, "PREFECT_API_KEY")

    @classmethod
    def from_settings(cls, settings: RunbookSettings, **kwargs: Any) -> "PrefectApi":
        settings.require("prefect.api_url", "prefect.api_key")
        return cls(settings.value("prefect.api_url"), settings.value("prefect.api_key"), cloud=settings.prefect.is_cloud, **kwargs)

    # -- plumbing ----------------------------------------------------------------------------
    def _client(self) -> Any:
        from prefect.client.base import ServerType
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(
            self.api_url, api_key=self._api_key, httpx_settings={"timeout": self.timeout, "verify": tls_context()},
            server_type=ServerType.CLOUD if self.cloud else ServerType.SERVER,
        )

    async def _run(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        try:
            async with self._client() as client:
                return await op(client)
        except Exception as exc:
            raise self._explain(what, exc) from None

    def call(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run `op(client)` to completion; `what` names the operation in error messages."""
        try:
            return run_sync(self._run(what, op), timeout=self.call_timeout)
        except TimeoutError as exc:
            raise PrefectApiError(f"{what}: no answer from {self.api_url} within {self.call_timeout:.0f}s ({exc})") from None

    def _explain(self, what: str, exc: Exception) -> PrefectApiError:
        from prefect.exceptions import ObjectNotFound

        if isinstance(exc, ObjectNotFound):
            exc = getattr(exc, "http_exc", exc)
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
            if status == 401:
                msg = f"the API key was rejected (401 Unauthorized) by {self.api_url}: check PREFECT_API_KEY"
            elif status == 403:
                msg = (f"forbidden (403) at {self.api_url}: the API key has no access to this workspace "
                       "(check PREFECT_API_KEY, PREFECT_ACCOUNT_ID, PREFECT_WORKSPACE_ID)")
            elif status == 404:
                msg = (f"not found (404) at {exc.request.url}: if every call says this, check the workspace "
                       "(PREFECT_ACCOUNT_ID, PREFECT_WORKSPACE_ID or PREFECT_API_URL)")
            else:
                msg = f"{status} {exc.response.reason_phrase} from {exc.request.url}: {_short_body(exc.response)}"
            return PrefectApiError(f"{what}: {msg}", status)
        if isinstance(exc, httpx.TimeoutException):
            return PrefectApiError(f"{what}: {self.api_url} did not answer within {self.timeout:.0f}s")
        if isinstance(exc, httpx.RequestError):
            return PrefectApiError(f"{what}: cannot reach the Prefect API at {self.api_url}: {type(exc).__name__}: {exc}")
        return PrefectApiError(f"{what}: {type(exc).__name__}: {exc}")

    # -- reads --------------------------------------------------------------------------------
    def check_access(self) -> None:
        """One authenticated read of the workspace: raises PrefectApiError (bad key, wrong workspace, down)."""
        self.call("reading the workspace", lambda c: c.read_flows(limit=1))

    def read_work_pool(self, name: str) -> Any | None:
        return self.call(f"reading work pool {name!r}", lambda c: _or_none(c.read_work_pool(name)))

    def read_deployment(self, full_name: str) -> Any | None:
        """A deployment by `<flow name>/<deployment name>`, or None."""
        return self.call(f"reading deployment {full_name!r}", lambda c: _or_none(c.read_deployment_by_name(full_name)))

    def read_deployments_named(self, name: str) -> list[Any]:
        """Every deployment called `name`, whatever its flow (more than one is worth a warning)."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        flt = DeploymentFilter(name=DeploymentFilterName(any_=[name]))
        return self.call(f"reading deployments named {name!r}", lambda c: c.read_deployments(deployment_filter=flt))

    def read_deployment_by_id(self, deployment_id: str | UUID) -> Any | None:
        return self.call(f"reading deployment {deployment_id}", lambda c: _or_none(c.read_deployment(UUID(str(deployment_id)))))

    def read_secret_block(self, name: str) -> Any | None:
        """The Secret block document (value withheld by the API), or None when it does not exist."""
        return self.call(
            f"reading Secret block {name!r}",
            lambda c: _or_none(c.read_block_document_by_name(name, block_type_slug="secret", include_secrets=False)),
        )

    def read_secret_value(self, name: str) -> str | None:
        """The plaintext of Secret block `name` (registered for redaction at once), or None."""
        doc = self.call(
            f"reading Secret block {name!r}",
            lambda c: _or_none(c.read_block_document_by_name(name, block_type_slug="secret", include_secrets=True)),
        )
        if doc is None:
            return None
        value = doc.data.get("value")
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if not isinstance(value, str):
            value = str(value) if value is not None else None
        register_secret(value, f"secret block {name}")
        return value

    def read_flow_run(self, flow_run_id: str | UUID) -> Any | None:
        return self.call(f"reading flow run {flow_run_id}", lambda c: _or_none(c.read_flow_run(UUID(str(flow_run_id)))))

    def read_flow_runs_of_deployment(self, deployment_id: str | UUID, limit: int = 10) -> list[Any]:
        """The deployment's most recent flow runs, newest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        flt = DeploymentFilter(id=DeploymentFilterId(any_=[UUID(str(deployment_id))]))
        return self.call(
            f"reading flow runs of deployment {deployment_id}",
            lambda c: c.read_flow_runs(deployment_filter=flt, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit),
        )

    # -- writes -------------------------------------------------------------------------------
    def read_flow_run_states(self, flow_run_id: str | UUID) -> list[Any]:
        """The flow run's states, oldest first."""
        states = self.call(f"reading the states of flow run {flow_run_id}",
                           lambda c: c.read_flow_run_states(UUID(str(flow_run_id))))
        return sorted(states, key=lambda s: s.timestamp)

    def flow_run_logs(self, flow_run_id: str | UUID, limit: int = 200) -> list[str]:
        """The flow run's log lines, oldest first, as `HH:MM:SS LEVEL message` (masked)."""
        return [line.text for line in self.read_logs([flow_run_id], limit=limit)]

    def read_logs(self, flow_run_ids: list[str | UUID], *, min_level: int | None = None, newest_first: bool = False,
                  limit: int = 200) -> list["LogLine"]:
        """The log lines of these flow runs (e.g. a run and its subflows), masked: oldest first, or
        the newest `limit` first; only those at `min_level` (a `logging` level) or above if given."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
        from prefect.client.schemas.sorting import LogSort

        ids = [UUID(str(i)) for i in flow_run_ids]
        flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids),
                        level=LogFilterLevel(ge_=min_level) if min_level is not None else None)
        sort = LogSort.TIMESTAMP_DESC if newest_first else LogSort.TIMESTAMP_ASC
        logs = self.call(f"reading the logs of flow run(s) {', '.join(map(str, ids))}",
                         lambda c: c.read_logs(log_filter=flt, sort=sort, limit=limit))
        return [LogLine(log.timestamp, log.level, str(log.flow_run_id) if log.flow_run_id else None,
                        redact(log.message or "")) for log in logs]

    def read_subflow_runs(self, flow_run_id: str | UUID) -> list[Any]:
        """The flow runs started inside this one (its subflows), oldest first."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
        from prefect.client.schemas.sorting import FlowRunSort

        flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(str(flow_run_id))]))
        return self.call(f"reading the subflow runs of flow run {flow_run_id}",
                         lambda c: c.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.START_TIME_ASC, limit=50))

    def read_flow_name(self, deployment: Any) -> str:
        """The name of a deployment's (or a flow run's) flow (`<flow>/<deployment>` is a deployment's full name)."""
        return self.call("reading the deployment's flow", lambda c: c.read_flow(deployment.flow_id)).name

    def create_flow_run(self, deployment_id: str | UUID, parameters: dict[str, Any] | None = None) -> Any:
        return self.call(
            f"creating a flow run of deployment {deployment_id}",
            lambda c: c.create_flow_run_from_deployment(UUID(str(deployment_id)), parameters=parameters),
        )

    def wait_for_flow_run(self, flow_run_id: str | UUID, timeout: float, poll_interval: float = 2.0) -> Any:
        """Poll until the flow run reaches a final state; TimeoutError names the last state seen."""
        deadline = time.monotonic() + timeout
        run = None
        while True:
            run = self.read_flow_run(flow_run_id)
            if run is None:
                raise PrefectApiError(f"flow run {flow_run_id} does not exist")
            if run.state is not None and run.state.type.value in FINAL_STATE_TYPES:
                return run
            if time.monotonic() >= deadline:
                state = run.state.name if run.state else "no state"
                raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout:.0f}s")
            time.sleep(poll_interval)


@dataclass(frozen=True)
class LogLine:
    """One log line of a flow run (its message masked)."""

    timestamp: datetime
    level: int
    flow_run_id: str | None
    message: str

    @property
    def level_name(self) -> str:
        import logging

        return logging.getLevelName(self.level)

    @property
    def text(self) -> str:
        """`HH:MM:SS LEVEL message`, masked."""
        return redact(f"{self.timestamp:%H:%M:%S} {self.level_name} {self.message}")


def tls_context() -> ssl.SSLContext:
    """The TLS context of this process's Prefect clients, by Prefect's own rules for its client
    (`PREFECT_API_TLS_INSECURE_SKIP_VERIFY`: no verification; else `PREFECT_API_SSL_CERT_FILE`, else
    certifi's bundle), read at each call and shared (`core.tls`): every call paid 25-35 ms of CPU
    loading the CA bundle when each client built its own (a call's client side is ~5 ms without it)."""
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        return tls.unverified()
    return tls.verified(cafile=PREFECT_API_SSL_CERT_FILE.value())


async def _or_none(awaitable: Awaitable[T]) -> T | None:
    from prefect.exceptions import ObjectNotFound

    try:
        return await awaitable
    except ObjectNotFound:
        return None


def _short_body(response: httpx.Response, limit: int = 300) -> str:
    try:
        text = redact(response.text)  # masked before it is cut short (a cut secret is no longer recognised)
    except Exception:
        return ""
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def prefect_settings(settings: RunbookSettings) -> Iterator[None]:
    """Point Prefect's settings (PREFECT_API_URL / PREFECT_API_KEY) at the profile for the block,
    for `from_source(...).deploy()`, `Secret.load()` and other calls that create their own client.
    Context variables: `run_sync` carries them into its worker thread."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, PREFECT_CLOUD_API_URL, temporary_settings

    settings.require("prefect.api_url", "prefect.api_key")
    key = settings.value("prefect.api_key")
    register_secret(key, "PREFECT_API_KEY")
    updates = {PREFECT_API_URL: settings.value("prefect.api_url"), PREFECT_API_KEY: key}
    if settings.prefect.cloud_api_url:
        updates[PREFECT_CLOUD_API_URL] = settings.prefect.cloud_api_url
    with temporary_settings(updates=updates):
        yield
