"""Prefect deployments: the deployment a step wants (`DesiredDeployment`), its fields as Prefect
stores them, the field-by-field diff with the live one, and `deploy_flow`, which runs
`flow.from_source(...).deploy(...)` and turns whatever it raises into one message with the cause
and the fix. Used by the deploy step and by the fallback (the same flow on another pool).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import httpx

from runbook_lib.core import render
from runbook_lib.core.aio import run_sync
from runbook_lib.core.errors import RunbookError
from runbook_lib.core.secrets import redact
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.systems.git import GitRepo
from runbook_lib.systems.prefect import PrefectApi, prefect_settings

DEPLOY_TIMEOUT = 300.0
STALE = "the live state changed since the plan was shown"
# The fields compared between the plan and the live deployment (the diff), in display order.
FIELDS = ("work_pool_name", "entrypoint", "pull_steps", "job_variables", "parameters", "tags", "description", "version")


@dataclass
class DesiredDeployment:
    name: str
    flow_name: str
    entrypoint: str
    repository: str
    branch: str
    commit_sha: str
    pinned: bool  # the pull step names the commit instead of the branch
    work_pool_name: str
    work_pool_type: str
    job_variables: dict[str, Any]
    parameters: dict[str, Any]
    tags: list[str]
    description: str

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    @property
    def version(self) -> str:
        return self.commit_sha

    @property
    def ref(self) -> str:
        return f"commit {self.commit_sha[:12]}" if self.pinned else f"branch {self.branch}"

    def storage(self, *, checked: bool = False) -> Any:
        """Prefect's git storage for the source: the branch, or the pinned commit. `checked`: a
        clone of the branch refuses (DeployError) unless it got exactly the planned commit."""
        from prefect.runner.storage import GitRepository

        if self.pinned:
            return GitRepository(url=self.repository, commit_sha=self.commit_sha)
        if checked:
            return _checked_branch_storage(self)
        return GitRepository(url=self.repository, branch=self.branch)

    def pull_steps(self) -> list[dict[str, Any]]:
        """The pull steps Prefect stores for this storage (what the runtime runs to get the code)."""
        return [self.storage().to_pull_step()]

    def fields(self) -> dict[str, Any]:
        return {
            "work_pool_name": self.work_pool_name,
            "entrypoint": self.entrypoint,
            "pull_steps": self.pull_steps(),
            "job_variables": self.job_variables,
            "parameters": self.parameters,
            "tags": sorted(self.tags),
            "description": self.description,
            "version": self.version,
        }


def _checked_branch_storage(desired: "DesiredDeployment") -> Any:
    """The branch's git storage (its pull step names the branch, as planned) whose clone must be at
    the planned commit: the flow deployed is exactly the commit the plan showed and recorded."""
    import anyio
    from prefect.runner.storage import GitRepository

    class PlannedCommitRepository(GitRepository):
        async def pull_code(self) -> None:
            await super().pull_code()
            try:
                done = await anyio.run_process(["git", "rev-parse", "HEAD"], cwd=self.destination)
                head = done.stdout.decode().strip()
            except Exception:  # the clone has no readable HEAD: refused below like a moved branch
                head = ""
            if head != desired.commit_sha:
                raise DeployError(
                    f"{STALE}: branch {desired.branch} of "
                    f"{desired.repository} is at {head[:12] or 'an unreadable commit'}, the plan was made at "
                    f"{desired.commit_sha[:12]}; nothing was deployed",
                    "re-run this step to see and confirm the new plan",
                )

    return PlannedCommitRepository(url=desired.repository, branch=desired.branch)


def live_fields(deployment: Any) -> dict[str, Any]:
    """The compared fields of a deployment as Prefect stores it."""
    return {
        "work_pool_name": deployment.work_pool_name,
        "entrypoint": deployment.entrypoint,
        "pull_steps": deployment.pull_steps or [],
        "job_variables": deployment.job_variables or {},
        "parameters": deployment.parameters or {},
        "tags": sorted(deployment.tags or []),
        "description": deployment.description,
        "version": deployment.version,
    }


def live_digest(deployment: Any) -> str | None:
    """A digest of the live deployment as stored (id, last update, every compared field): any write
    to it since the plan changes the digest. Only the digest is kept, never the values."""
    if deployment is None:
        return None
    state = {"id": str(deployment.id), "updated": str(getattr(deployment, "updated", "")),
             "fields": live_fields(deployment)}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def changed_since_plan(settings: RunbookSettings, desired: DesiredDeployment, live_id: str | None,
                       planned_live_digest: str | None) -> str | None:
    """Read again what a plan was built from (the branch head, the live deployment): None when both
    are as they were, else the refusal's message saying what changed."""
    with GitRepo(desired.repository) as git:
        head = git.branch_sha(desired.branch)
    live = PrefectApi.from_settings(settings).read_deployment(desired.full_name)
    changed = []
    if head != desired.commit_sha:
        changed.append(f"branch {desired.branch} is now at {head[:12] if head else 'no commit (deleted)'}, the plan "
                       f"was made at {desired.commit_sha[:12]}")
    if live_digest(live) != planned_live_digest:
        changed.append(f"deployment {desired.full_name} " + (
            "was deleted" if live is None else "was created" if live_id is None else f"was changed (id {live.id})"))
    if not changed:
        return None
    return f"{STALE}: {'; '.join(changed)}. Nothing was applied; re-run this step to see and confirm the new plan"


def git_clone_step(pull_steps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The arguments of the deployment's git_clone pull step, or None when it has none."""
    for step in pull_steps or []:
        for key, value in step.items():
            if key.endswith("git_clone"):
                return value or {}
    return None


# -- diff --------------------------------------------------------------------------------------------


@dataclass
class FieldChange:
    field: str
    status: str  # created / changed / unchanged
    live: Any
    desired: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "status": self.status, "live": self.live, "desired": self.desired}


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (key order and types as Prefect returns them do not matter)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def diff_fields(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> list[FieldChange]:
    """Field by field: `created` (no live deployment), `changed` or `unchanged`."""
    out = []
    for name in FIELDS:
        want = desired.get(name)
        if live is None:
            out.append(FieldChange(name, "created", None, want))
            continue
        have = live.get(name)
        out.append(FieldChange(name, "unchanged" if same(have, want) else "changed", have, want))
    return out


def diff_table(title: str, changes: list[FieldChange]) -> render.Table:
    """The diff as a table: status, field, live value, planned value."""
    rows = [(render.Cell(c.status, status=c.status), render.Cell(c.field), render.Cell(c.live, pre=True),
             render.Cell(c.desired, pre=True)) for c in changes]
    return render.Table(title, ("Status", "Field", "Live", "Planned"), rows)


# -- deploy --------------------------------------------------------------------------------------------


class DeployError(RunbookError):
    """`.deploy()` failed; `cause` says what went wrong, `fix` what to do."""

    def __init__(self, cause: str, fix: str):
        self.cause = redact(cause)
        self.fix = redact(fix)
        super().__init__(f"{cause} Fix: {fix}")


def explain_deploy_error(exc: BaseException, desired: DesiredDeployment) -> DeployError:
    """One clear message (cause and fix) for what `from_source(...).deploy(...)` raised."""
    from prefect.exceptions import MissingFlowError, ScriptError

    text = redact(str(exc)).strip() or type(exc).__name__
    status = _http_status(exc)
    if isinstance(exc, ValueError) and "Could not find work pool" in text:
        return DeployError(
            f"work pool {desired.work_pool_name!r} does not exist in this workspace ({text})",
            f"create it (type {desired.work_pool_type}: `prefect work-pool create {desired.work_pool_name} "
            f"--type {desired.work_pool_type}`, or in the Prefect Cloud UI), or set deployment.work_pool to an existing pool.",
        )
    if isinstance(exc, (FileNotFoundError, MissingFlowError, ScriptError)):
        return DeployError(
            f"entrypoint {desired.entrypoint} was not found in {desired.repository} at {desired.ref}: {text}",
            "set source.entrypoint to '<path/to/file.py>:<flow function>' as it is in the repository, or push the flow.",
        )
    if isinstance(exc, RuntimeError) and "clone" in text.lower():
        return DeployError(
            f"the source repository could not be cloned: {text}",
            f"check source.repo_url ({desired.repository}): it must end in .git, exist, be reachable and hold "
            f"{desired.ref}; a private repository needs a git credentials block.",
        )
    if status in (401, 403):
        return DeployError(
            f"the Prefect API refused the API key ({status}): {text}",
            "set PREFECT_API_KEY to a valid key of this workspace, and check PREFECT_ACCOUNT_ID / "
            "PREFECT_WORKSPACE_ID (or PREFECT_API_URL).",
        )
    if status == 422 or "Validation failed" in text or "Error creating deployment" in text:
        return DeployError(
            f"Prefect refused the deployment as invalid (422): {text}",
            "make job_variables match the work pool's base job template (pip_packages: a list of requirement "
            "strings; env: a table of strings) and parameters match the flow's signature, in the profile.",
        )
    if isinstance(exc, TimeoutError):
        return DeployError(f"deploying took too long: {text}", "check the Prefect API and the repository, then re-run.")
    if isinstance(exc, (httpx.RequestError, OSError)):
        return DeployError(
            f"the Prefect API could not be reached: {type(exc).__name__}: {text}",
            "check PREFECT_API_URL and the network, then re-run this step.",
        )
    return DeployError(f"{type(exc).__name__}: {text}", "read the cause above; re-run this step once it is fixed.")


def _http_status(exc: BaseException) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code
        exc = exc.__cause__ or exc.__context__
    return None


def deploy_flow(settings: RunbookSettings, desired: DesiredDeployment, timeout: float = DEPLOY_TIMEOUT) -> str:
    """`flow.from_source(...).deploy(...)` with the profile's Prefect URL and key; the deployment id.
    The flow is loaded from exactly the planned commit (a branch that moved refuses: DeployError).
    Works inside a kernel (the coroutines run on a fresh loop) and in plain Python."""
    from prefect import Flow
    from prefect._internal.versioning import VersionType

    async def deploy() -> Any:
        flow = await Flow.afrom_source(desired.storage(checked=True), desired.entrypoint)
        return await flow.adeploy(
            name=desired.name, work_pool_name=desired.work_pool_name, job_variables=desired.job_variables,
            parameters=desired.parameters, tags=desired.tags, description=desired.description,
            version=desired.version, version_type=VersionType.SIMPLE, build=False, push=False,
            print_next_steps=False,
        )

    try:
        with prefect_settings(settings):
            return str(run_sync(deploy(), timeout=timeout))
    except RunbookError:
        raise
    except Exception as exc:
        raise explain_deploy_error(exc, desired) from None
