"""Step 03: deploy the orchestrator flow from its git repository to the managed work pool.

The desired deployment is built from the profile (source URL with `.git`, branch or pinned commit,
entrypoint, work pool, job variables with Secret block placeholders only, tags, parameters,
description, version = the commit SHA). `plan()` reads the source at the branch head (the
entrypoint, the flow's name, its imports and parameters) and the live deployment, checks the pool,
the Secret blocks and the job variables (a plaintext secret is a FAIL before anything is applied),
and shows a field-by-field diff. `apply()` deploys with `flow.from_source(...).deploy(...)` behind
the confirmation gate, and skips the call entirely when nothing differs (no API writes, same id).
Deploy errors become one message with the cause and the fix. `verify()` reads the deployment back
and compares it with the plan; `smoke_run()` optionally starts one flow run and waits for it.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import httpx

from runbook_lib.core import secrets as redaction
from runbook_lib.source import flow as flow_source, packages
from runbook_lib.core.aio import run_sync
from runbook_lib.checks.base import Check, CheckReport
from runbook_lib.core.errors import FlowSourceError, GitError, PrefectApiError, RequirementError, RunbookError
from runbook_lib.systems.git import GitRepo
from runbook_lib.systems.prefect import PrefectApi, prefect_settings
from runbook_lib.steps.prerequisites import clear_text_secrets, normalise_repo_url

DEPLOY_TIMEOUT = 300.0
SMOKE_LOG_LINES = 40
# The fields compared between the plan and the live deployment (the diff), in display order.
FIELDS = ("work_pool_name", "entrypoint", "pull_steps", "job_variables", "parameters", "tags", "description", "version")

_SECRET_KEY = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_?KEY|DSN|CONNECTION_STRING|DATABASE_URL", re.I
)
_PLACEHOLDER = re.compile(r"^\{\{\s*prefect\.blocks\.secret\.[A-Za-z0-9_-]+\s*\}\}$")
WITHHELD = "[plaintext secret withheld]"


def parse_flag(name: str, value: Any) -> bool | None:
    """A true/false notebook parameter (papermill or the runner may pass text); None stays None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("", "none", "null"):
        return None
    raise RunbookError(f"parameter {name} must be true or false, got {value!r}")


# -- plaintext secrets -------------------------------------------------------------------------------


def plaintext_secrets(
    obj: Any, known: Mapping[str, str], where: str = "job_variables", public: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """(path, why) for every string of `obj` that holds a secret in clear: the value of a known
    secret, something shaped like a credential (`prerequisites.clear_text_secrets`), or a literal
    under a secret-like name (only a `{{ prefect.blocks.secret.<name> }}` placeholder may stand
    there). Never returns the values."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, path: str, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}", str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", key)
        elif isinstance(value, str) and value:
            what = clear_text_secrets(value, dict(known), public)
            if what:
                found.append((path, "holds " + ", ".join(what)))
            elif key and _SECRET_KEY.search(key) and not _PLACEHOLDER.match(value.strip()):
                found.append((path, "is a literal value under a secret-like name, not a Secret block placeholder"))

    walk(obj, where, None)
    return found


def _mask(obj: Any, paths: set[str], path: str) -> Any:
    if path in paths:
        return WITHHELD
    if isinstance(obj, dict):
        return {k: _mask(v, paths, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, paths, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def withhold(obj: Any, where: str, settings: Any) -> tuple[Any, list[tuple[str, str]]]:
    """`obj` with every plaintext secret replaced by WITHHELD (each one also registered for
    redaction), and the findings."""
    findings = plaintext_secrets(obj, settings.secret_values(), where, _public(settings))
    paths = {p for p, _ in findings}
    _register_literals(obj, paths, where)
    return _mask(obj, paths, where), findings


def job_variables_secrets_check(findings: list[tuple[str, str]], *, consequence: str = "",
                                where: str = "[deployment.env]") -> Check:
    """The `job_variables.secrets` check from `withhold`'s findings: `consequence` ends the detail of
    a FAIL, `where` names the place the Secret block placeholders go."""
    if findings:
        return Check.failed(
            "job_variables.secrets", "No plaintext secret in job_variables",
            "; ".join(f"{path} {why}" for path, why in findings) + consequence,
            "replace each with a Secret block placeholder {{ prefect.blocks.secret.<name> }} in " + where,
        )
    return Check.passed("job_variables.secrets", "No plaintext secret in job_variables",
                        "env holds Secret block placeholders and plain settings only")


def _public(settings: Any) -> tuple[str, ...]:
    """Values that look like credentials but are public by design (the Supabase anon key)."""
    return (settings.supabase.anon_key,) if settings.supabase.anon_key else ()


def _register_literals(obj: Any, paths: set[str], path: str) -> None:
    if path in paths and isinstance(obj, str):
        redaction.register_secret(obj, f"plaintext in {path}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _register_literals(v, paths, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _register_literals(v, paths, f"{path}[{i}]")


# -- the desired deployment --------------------------------------------------------------------------


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

    def storage(self) -> Any:
        """Prefect's git storage for the source: the branch, or the pinned commit."""
        from prefect.runner.storage import GitRepository

        if self.pinned:
            return GitRepository(url=self.repository, commit_sha=self.commit_sha)
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


def describe_deployment(settings: Any, repository: str, branch: str) -> str:
    return (
        f"Orchestrator of the data-enrichment pipeline: started by the Supabase Edge Function "
        f"{settings.supabase.function_name} (event-triggered, no schedule); deployed by the runbook "
        f"from {repository} ({branch})."
    )


def live_fields(deployment: Any) -> dict[str, Any]:
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


# -- diff --------------------------------------------------------------------------------------------


@dataclass
class FieldChange:
    field: str
    status: str  # created / changed / unchanged
    live: Any
    desired: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "status": self.status, "live": self.live, "desired": self.desired}


def diff_fields(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> list[FieldChange]:
    """Field by field: `created` (no live deployment), `changed` or `unchanged`."""
    out = []
    for name in FIELDS:
        want = desired.get(name)
        if live is None:
            out.append(FieldChange(name, "created", None, want))
            continue
        have = live.get(name)
        same = json.dumps(have, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)
        out.append(FieldChange(name, "unchanged" if same else "changed", have, want))
    return out


class DiffTable:
    """The diff, shown as a table (HTML in a notebook, rich in a terminal)."""

    _COLOURS = {"created": ("#116329", "bold green"), "changed": ("#7d4e00", "bold yellow"), "unchanged": ("#57606a", "dim")}

    def __init__(self, title: str, changes: list[FieldChange]):
        self.title = redaction.redact(title)
        self.changes = changes

    @staticmethod
    def _text(value: Any) -> str:
        return "—" if value is None else redaction.redact(json.dumps(value, indent=1, sort_keys=True, default=str))

    def _repr_html_(self) -> str:
        rows = "".join(
            f'<tr><td style="text-align:left;vertical-align:top;color:{self._COLOURS[c.status][0]}"><b>{c.status}</b></td>'
            f'<td style="text-align:left;vertical-align:top"><code>{html.escape(c.field)}</code></td>'
            f'<td style="text-align:left;vertical-align:top;white-space:pre-wrap">{html.escape(self._text(c.live))}</td>'
            f'<td style="text-align:left;vertical-align:top;white-space:pre-wrap">{html.escape(self._text(c.desired))}</td></tr>'
            for c in self.changes
        )
        return (
            f"<div><p><b>{html.escape(self.title)}</b></p><table><thead><tr><th>Status</th><th>Field</th>"
            f"<th>Live</th><th>Planned</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.title, show_lines=True, expand=True)
        for column in ("Status", "Field", "Live", "Planned"):
            table.add_column(column)
        for c in self.changes:
            table.add_row(Text(c.status, style=self._COLOURS[c.status][1]), c.field, self._text(c.live), self._text(c.desired))
        return table

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lines = [self.title]
        lines += [f"  {c.status:9} {c.field}: {self._text(c.live)} -> {self._text(c.desired)}" for c in self.changes]
        return "\n".join(lines)


# -- plan --------------------------------------------------------------------------------------------


@dataclass
class DeployPlan:
    desired: DesiredDeployment | None  # None when the source could not be read
    live_id: str | None
    changes: list[FieldChange] = field(default_factory=list)

    @property
    def no_changes(self) -> bool:
        return self.live_id is not None and all(c.status == "unchanged" for c in self.changes)

    def summary(self) -> str:
        d = self.desired
        if self.live_id is None:
            return f"create deployment {d.full_name} on work pool {d.work_pool_name} at {d.commit_sha[:12]}"
        changed = [c.field for c in self.changes if c.status != "unchanged"]
        return f"update deployment {d.full_name} ({self.live_id}): {', '.join(changed) or 'no changes'}"

    def gate_plan(self) -> dict[str, Any]:
        """What the confirmation approves: the deployment, its commit and every field that changes."""
        d = self.desired
        return {
            "deployment": d.full_name,
            "deployment_id": self.live_id,
            "repository": d.repository,
            "ref": {"commit_sha": d.commit_sha} if d.pinned else {"branch": d.branch, "head": d.commit_sha},
            "changes": [c.as_dict() for c in self.changes if c.status != "unchanged"],
        }


def source_checks(report: CheckReport, settings: Any, pin_commit: bool) -> tuple[dict[str, Any] | None, Any]:
    """Check the repository, branch and entrypoint; returns (source facts, FlowInfo) or (None, None)."""
    raw_url = settings.value("source.repo_url")
    url, changed = normalise_repo_url(raw_url)
    if changed:
        report.add(Check.warned(
            "source.url", "Source URL is a git repository URL",
            f"{raw_url} does not end in .git: flow.from_source would treat it as remote file storage and fail; "
            f"the deployment uses {url}",
            f"set source.repo_url to {url} ({settings.where_to_set('source.repo_url')})",
            repository=url,
        ))
    else:
        report.add(Check.passed("source.url", "Source URL is a git repository URL", url, repository=url))
    branch = settings.source.branch
    entrypoint = settings.source.entrypoint
    with GitRepo(url, settings.value("source.github_token")) as git:
        try:
            sha = git.branch_sha(branch)
        except GitError as exc:
            report.add(Check.failed(
                "source.branch", f"Branch {branch} resolves to a commit", str(exc),
                f"check source.repo_url ({settings.where_to_set('source.repo_url')}): the repository must exist and "
                "be readable from here and from the managed runtime (public, or cloned with a credentials block)",
            ))
            return None, None
        if sha is None:
            report.add(Check.failed(
                "source.branch", f"Branch {branch} resolves to a commit", f"{url} has no branch {branch!r}",
                f"push the branch, or set source.branch to an existing branch ({settings.where_to_set('source.branch')})",
            ))
            return None, None
        how = f"pinned: the pull step names commit {sha}" if pin_commit else f"the pull step follows branch {branch}"
        report.add(Check.passed("source.branch", f"Branch {branch} resolves to a commit", f"{branch} is at {sha} ({how})",
                                commit_sha=sha))
        try:
            files = git.read_files(sha)
            info = flow_source.analyse_entrypoint(files, entrypoint)
        except (GitError, FlowSourceError) as exc:
            report.add(Check.failed(
                "source.entrypoint", f"Entrypoint {entrypoint} exists", f"at {branch} ({sha[:12]}): {exc}",
                f"set source.entrypoint to '<path/to/file.py>:<flow function>' as it is in the repository at {branch} "
                f"({settings.where_to_set('source.entrypoint')}), or push the flow file",
            ))
            return None, None
    if not info.is_flow:
        report.add(Check.failed(
            "source.entrypoint", f"Entrypoint {entrypoint} exists",
            f"{info.path}:{info.function} (line {info.line}) is not decorated with @flow",
            "decorate the function with @flow, or point source.entrypoint at the flow function",
        ))
        return None, None
    if not info.flow_name:
        report.add(Check.failed(
            "source.entrypoint", f"Entrypoint {entrypoint} exists",
            f"the flow name of {info.function} is computed at import time; the runbook cannot find its deployment",
            "give the flow a literal name: @flow(name=\"...\")",
        ))
        return None, None
    report.add(Check.passed(
        "source.entrypoint", f"Entrypoint {entrypoint} exists",
        f"{info.path}:{info.function} (line {info.line}) is flow {info.flow_name!r}", flow_name=info.flow_name,
    ))
    _imports_check(report, settings, files, entrypoint)
    return {"repository": url, "branch": branch, "commit_sha": sha}, info


def _imports_check(report: CheckReport, settings: Any, files: dict[str, str], entrypoint: str) -> None:
    pip = settings.deployment.pip_packages
    try:
        imports, visited = flow_source.repository_imports(files, entrypoint)
        missing = packages.missing_imports(
            [i.module for i in imports], pip, python=settings.deployment.runtime_python,
            local_modules=flow_source.local_top_level_names(files, entrypoint),
        )
    except (FlowSourceError, RequirementError) as exc:
        report.add(Check.failed("job_variables.pip_packages", "pip_packages cover the flow's imports", str(exc),
                                "fix the flow's source or deployment.pip_packages so both parse"))
        return
    if missing:
        report.add(Check.failed(
            "job_variables.pip_packages", "pip_packages cover the flow's imports",
            "the managed runtime would fail to import the flow: " + "; ".join(str(m) for m in missing),
            f"add {sorted({m.distribution for m in missing})} to deployment.pip_packages in the profile",
        ))
    else:
        report.add(Check.passed(
            "job_variables.pip_packages", "pip_packages cover the flow's imports",
            f"{len(imports)} import(s) of {len(visited)} file(s) are provided by the runtime image or {pip}",
        ))


def _parameters_check(report: CheckReport, settings: Any, info: Any) -> None:
    wanted = settings.deployment.parameters
    unknown = [name for name in wanted if info.parameter(name) is None]
    if unknown:
        report.add(Check.failed(
            "parameters", "Deployment parameters are flow parameters",
            f"{unknown} are not parameters of {info.function}({', '.join(p.name for p in info.parameters)})",
            "remove them from [deployment.parameters] in the profile (Prefect would refuse the deployment: 422)",
        ))
    else:
        report.add(Check.passed("parameters", "Deployment parameters are flow parameters", json.dumps(wanted)))


def _pool_checks(report: CheckReport, settings: Any, api: PrefectApi, job_variables: dict[str, Any]) -> bool:
    """Access, the pool's existence and type, and job_variables against its template; False if
    Prefect cannot be read at all."""
    dep = settings.deployment
    try:
        api.check_access()
    except PrefectApiError as exc:
        report.add(Check.failed(
            "prefect.access", "The Prefect API accepts the key", str(exc),
            "check PREFECT_API_KEY and the workspace (PREFECT_ACCOUNT_ID, PREFECT_WORKSPACE_ID or PREFECT_API_URL): "
            f"{settings.where_to_set('prefect.api_key')}",
        ))
        return False
    report.add(Check.passed("prefect.access", "The Prefect API accepts the key", settings.value("prefect.api_url")))
    pool = api.read_work_pool(dep.work_pool)
    if pool is None:
        report.add(Check.failed(
            "work_pool.exists", f"Work pool {dep.work_pool} exists", f"the workspace has no work pool {dep.work_pool!r}",
            f"create it in Prefect Cloud (Work Pools > Create > Prefect Managed, name {dep.work_pool}) or with "
            f"`prefect work-pool create {dep.work_pool} --type {dep.work_pool_type}`; or set deployment.work_pool "
            "to an existing managed pool",
        ))
        for id, title in (("work_pool.type", f"Work pool type is {dep.work_pool_type}"),
                          ("job_variables.schema", "Job variables fit the pool's base job template")):
            report.add(Check.skipped(id, title, f"not checked: there is no work pool {dep.work_pool!r}"))
        return True
    report.add(Check.passed("work_pool.exists", f"Work pool {dep.work_pool} exists", f"type {pool.type}"))
    if pool.type != dep.work_pool_type:
        report.add(Check.failed(
            "work_pool.type", f"Work pool type is {dep.work_pool_type}",
            f"{dep.work_pool} is of type {pool.type!r}: its runs would not get the managed runtime (pip_packages)",
            f"deploy to a {dep.work_pool_type} pool: set deployment.work_pool to one, or recreate {dep.work_pool} "
            f"with type {dep.work_pool_type}",
        ))
        report.add(Check.skipped("job_variables.schema", "Job variables fit the pool's base job template",
                                 f"not checked: {dep.work_pool} is not a {dep.work_pool_type} pool"))
        return True
    report.add(Check.passed("work_pool.type", f"Work pool type is {dep.work_pool_type}", pool.type))
    variables = (pool.base_job_template or {}).get("variables") or {}
    problems = template_problems(variables, job_variables)
    if problems:
        report.add(Check.failed(
            "job_variables.schema", "Job variables fit the pool's base job template", "; ".join(problems),
            "fix deployment.pip_packages / deployment.env in the profile so they match the pool's variables "
            "(Prefect would refuse the deployment with 422)",
        ))
    else:
        report.add(Check.passed("job_variables.schema", "Job variables fit the pool's base job template",
                                f"{sorted(job_variables)} are variables of {dep.work_pool}"))
    return True


def template_problems(variables: dict[str, Any], job_variables: dict[str, Any]) -> list[str]:
    """What Prefect's server validation of job_variables against the pool's variables would refuse."""
    import jsonschema

    properties = variables.get("properties") or {}
    problems = [f"{k!r} is not a variable of the pool" for k in job_variables if k not in properties]
    schema = {**variables, "required": []}  # values left out fall back to the template's defaults
    validator = jsonschema.Draft202012Validator(schema)
    for error in validator.iter_errors({k: v for k, v in job_variables.items() if k in properties}):
        where = ".".join(str(p) for p in error.absolute_path) or "job_variables"
        problems.append(f"{where}: {error.message}")
    return problems


def blocks_check(report: CheckReport, settings: Any, api: PrefectApi, info: Any) -> None:
    """The Secret blocks the runs need: job_variables placeholders (resolved at submission) and the
    blocks the flow's source loads."""
    needed = {name: "job_variables" for name in settings.deployment.referenced_secret_blocks()}
    for name in (info.secret_blocks if info is not None else []):
        needed.setdefault(name, "the flow's Secret.load")
    missing = [n for n in needed if api.read_secret_block(n) is None]
    if missing:
        report.add(Check.failed(
            "secret_blocks", "The Secret blocks the runs need exist",
            "missing Secret block(s) " + ", ".join(f"{n} (used by {needed[n]})" for n in missing) + ": a missing "
            "placeholder block makes every run CRASH at submission; a block the flow loads makes it fail",
            f"create the Secret block(s) {missing} in this workspace (the runbook's Secret block step, or "
            "`prefect block create secret`) before deploying",
        ))
    else:
        report.add(Check.passed("secret_blocks", "The Secret blocks the runs need exist",
                                ", ".join(f"{n} ({why})" for n, why in needed.items()) or "none needed"))


def build_plan(settings: Any, *, pin_commit: bool = False) -> tuple[DeployPlan, CheckReport]:
    """Everything the plan needs, read-only: checks, the desired deployment, the live one, the diff."""
    settings.require("prefect.api_url", "prefect.api_key", "source.repo_url")
    report = CheckReport(step="03_deploy")
    dep = settings.deployment
    job_variables, findings = withhold(dep.job_variables(), "job_variables", settings)
    report.add(job_variables_secrets_check(
        findings, consequence=": anyone who can read the deployment would see it",
        where="[deployment.env] of the profile (the block holds the value)",
    ))
    source, info = source_checks(report, settings, pin_commit)
    if info is not None:
        _parameters_check(report, settings, info)
    api = PrefectApi.from_settings(settings)
    reachable = _pool_checks(report, settings, api, job_variables)
    if reachable:
        blocks_check(report, settings, api, info)
    if source is None or not reachable:
        return DeployPlan(None, None, []), report
    desired = DesiredDeployment(
        name=dep.name, flow_name=info.flow_name, entrypoint=settings.source.entrypoint,
        repository=source["repository"], branch=source["branch"], commit_sha=source["commit_sha"], pinned=pin_commit,
        work_pool_name=dep.work_pool, work_pool_type=dep.work_pool_type, job_variables=job_variables,
        parameters=dict(dep.parameters), tags=list(dep.tags),
        description=describe_deployment(settings, source["repository"], source["branch"]),
    )
    live = api.read_deployment(desired.full_name)
    changes = diff_fields(desired.fields(), live_fields(live) if live is not None else None)
    return DeployPlan(desired, str(live.id) if live is not None else None, changes), report


def plan(ctx: Any, *, pin_commit: bool = False) -> DeployPlan:
    """Notebook cell: build the plan, show the diff and record the checks (a FAIL ends the cell)."""
    from runbook_lib.notebook.context import show

    try:
        result, report = build_plan(ctx.settings, pin_commit=bool(parse_flag("pin_commit", pin_commit)))
    except RunbookError as exc:
        ctx.fail(exc)
        raise
    if result.desired is not None:
        d = result.desired
        title = (f"Deployment {d.full_name}: " + ("no changes" if result.no_changes else
                 "new deployment" if result.live_id is None else "changes to apply"))
        show(DiffTable(title, result.changes))
        ctx.set("flow_name", d.flow_name)
        ctx.set("deployment_name", d.full_name)
        ctx.set("commit_sha", d.commit_sha)
        ctx.set("branch", d.branch)
        ctx.set("pinned", d.pinned)
        ctx.set("version", d.version)
        ctx.set("repository", d.repository)
        ctx.set("diff", [c.as_dict() for c in result.changes])
        ctx.set("no_changes", result.no_changes)
    ctx.record_checks(report)
    return result


def confirm(ctx: Any, the_plan: DeployPlan) -> None:
    """Notebook cell: show the plan behind the confirmation gate, unless there is nothing to apply."""
    from runbook_lib.notebook.context import show

    if the_plan.no_changes:
        show(f"No changes: deployment {the_plan.desired.full_name} ({the_plan.live_id}) already matches the plan; "
             "nothing to confirm.")
        return
    ctx.confirm_plan(the_plan.summary(), the_plan.gate_plan())


# -- apply -------------------------------------------------------------------------------------------


class DeployError(RunbookError):
    """`.deploy()` failed; `cause` says what went wrong, `fix` what to do."""

    def __init__(self, cause: str, fix: str):
        self.cause = redaction.redact(cause)
        self.fix = redaction.redact(fix)
        super().__init__(f"{cause} Fix: {fix}")


def explain_deploy_error(exc: BaseException, desired: DesiredDeployment) -> DeployError:
    """One clear message (cause and fix) for what `from_source(...).deploy(...)` raised."""
    from prefect.exceptions import MissingFlowError, ScriptError

    text = redaction.redact(str(exc)).strip() or type(exc).__name__
    status = _http_status(exc)
    ref = f"commit {desired.commit_sha[:12]}" if desired.pinned else f"branch {desired.branch}"
    if isinstance(exc, ValueError) and "Could not find work pool" in text:
        return DeployError(
            f"work pool {desired.work_pool_name!r} does not exist in this workspace ({text})",
            f"create it (type {desired.work_pool_type}: `prefect work-pool create {desired.work_pool_name} "
            f"--type {desired.work_pool_type}`, or in the Prefect Cloud UI), or set deployment.work_pool to an existing pool.",
        )
    if isinstance(exc, (FileNotFoundError, MissingFlowError, ScriptError)):
        return DeployError(
            f"entrypoint {desired.entrypoint} was not found in {desired.repository} at {ref}: {text}",
            "set source.entrypoint to '<path/to/file.py>:<flow function>' as it is in the repository, or push the flow.",
        )
    if isinstance(exc, RuntimeError) and "clone" in text.lower():
        return DeployError(
            f"the source repository could not be cloned: {text}",
            f"check source.repo_url ({desired.repository}): it must end in .git, exist, be reachable and hold "
            f"{ref}; a private repository needs a git credentials block.",
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
    if isinstance(exc, (httpx.RequestError, OSError)):
        return DeployError(
            f"the Prefect API could not be reached: {type(exc).__name__}: {text}",
            "check PREFECT_API_URL and the network, then re-run this step.",
        )
    if isinstance(exc, TimeoutError):
        return DeployError(f"deploying took too long: {text}", "check the Prefect API and the repository, then re-run.")
    return DeployError(f"{type(exc).__name__}: {text}", "read the cause above; re-run this step once it is fixed.")


def _http_status(exc: BaseException) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code
        exc = exc.__cause__ or exc.__context__
    return None


def deploy_flow(settings: Any, desired: DesiredDeployment, timeout: float = DEPLOY_TIMEOUT) -> str:
    """`flow.from_source(...).deploy(...)` with the profile's Prefect URL and key; the deployment id.
    Works inside a kernel (the coroutines run on a fresh loop) and in plain Python."""
    from prefect import Flow
    from prefect._internal.versioning import VersionType

    async def deploy() -> Any:
        flow = await Flow.afrom_source(desired.storage(), desired.entrypoint)
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


def apply(ctx: Any, the_plan: DeployPlan) -> str:
    """Notebook cell: deploy (once approved) or, with no changes, keep the live deployment without
    any API write. Records and returns the deployment id."""
    d = the_plan.desired
    if the_plan.no_changes:
        ctx.record_checks([Check.passed(
            "deploy.apply", "Deployment applied", f"no changes: {d.full_name} is up to date; kept {the_plan.live_id} "
            "without calling deploy", deployment_id=the_plan.live_id,
        )])
        ctx.set("changed", False)
        return ctx.set("deployment_id", the_plan.live_id)
    try:
        ctx.require_approved(the_plan.gate_plan())
    except RunbookError as exc:  # NotConfirmed, or no plan was shown for confirmation
        ctx.fail(exc)
        raise
    try:
        deployment_id = deploy_flow(ctx.settings, d)
    except DeployError as exc:
        ctx.record_failure(Check.failed("deploy.apply", "Deployment applied", exc.cause, exc.fix), exc)
        raise
    if the_plan.live_id is not None and deployment_id != the_plan.live_id:
        ctx.record_checks([Check.warned(
            "deploy.apply", "Deployment applied", f"{d.full_name} got a new id {deployment_id} (was {the_plan.live_id})",
            "update the Edge Function's PREFECT_DEPLOYMENT_ID (step 04)", deployment_id=deployment_id,
        )])
    else:
        verb = "created" if the_plan.live_id is None else "updated"
        ctx.record_checks([Check.passed("deploy.apply", "Deployment applied", f"{verb} {d.full_name}: {deployment_id}",
                                        deployment_id=deployment_id)])
    ctx.set("changed", True)
    return ctx.set("deployment_id", deployment_id)


# -- read back ---------------------------------------------------------------------------------------


def _git_clone_step(pull_steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    for step in pull_steps or []:
        for key, value in step.items():
            if key.endswith("git_clone"):
                return value or {}
    return None


def verification_checks(api: PrefectApi, settings: Any, desired: DesiredDeployment, deployment_id: str) -> list[Check]:
    """The deployment as Prefect stores it, compared with the plan."""
    deployment = api.read_deployment_by_id(deployment_id)
    if deployment is None:
        return [Check.failed("verify.exists", "Deployment exists", f"no deployment {deployment_id}",
                             "re-run this step; if it persists, check the workspace the API key points at")]
    checks = [Check.passed("verify.exists", "Deployment exists", f"{deployment.name} ({deployment_id})")]
    flow = api.call("reading the deployment's flow", lambda c: c.read_flow(deployment.flow_id))
    full_name = f"{flow.name}/{deployment.name}"
    checks.append(_equal("verify.name", "Deployment name and flow", full_name, desired.full_name))
    checks.append(_equal("verify.work_pool", "Work pool", deployment.work_pool_name, desired.work_pool_name))
    checks.append(_equal("verify.entrypoint", "Entrypoint", deployment.entrypoint, desired.entrypoint))
    clone = _git_clone_step(deployment.pull_steps)
    if clone is None:
        checks.append(Check.failed("verify.pull_step", "Pull step clones the repository",
                                   f"pull steps {deployment.pull_steps} have no git_clone step",
                                   "re-deploy with this step (flow.from_source with a git repository)"))
    else:
        repo = clone.get("repository") or ""
        ref_ok = clone.get("commit_sha") == desired.commit_sha if desired.pinned else clone.get("branch") == desired.branch
        want_ref = f"commit {desired.commit_sha}" if desired.pinned else f"branch {desired.branch}"
        got_ref = f"commit {clone.get('commit_sha')}" if clone.get("commit_sha") else f"branch {clone.get('branch')}"
        if repo.endswith(".git") and repo == desired.repository and ref_ok:
            checks.append(Check.passed("verify.pull_step", "Pull step clones the repository", f"{repo} at {got_ref}"))
        else:
            checks.append(Check.failed(
                "verify.pull_step", "Pull step clones the repository",
                f"stored {repo or 'no repository'} at {got_ref}; planned {desired.repository} at {want_ref}",
                "re-run this step; a repository URL must end in .git",
            ))
    checks.append(_equal("verify.job_variables", "Job variables", deployment.job_variables or {}, desired.job_variables))
    checks.append(_equal("verify.parameters", "Parameters", deployment.parameters or {}, desired.parameters))
    checks.append(_equal("verify.tags", "Tags", sorted(deployment.tags or []), sorted(desired.tags)))
    if deployment.schedules:
        checks.append(Check.warned(
            "verify.schedule", "No schedule (event-triggered)", f"{len(deployment.schedules)} schedule(s) are attached",
            "remove the schedules in the Prefect UI: runs are started by the Edge Function only",
        ))
    else:
        checks.append(Check.passed("verify.schedule", "No schedule (event-triggered)", "no schedule"))
    stored = {"job_variables": deployment.job_variables, "parameters": deployment.parameters,
              "pull_steps": deployment.pull_steps, "description": deployment.description}
    findings = plaintext_secrets(stored, settings.secret_values(), "deployment", _public(settings))
    if findings:
        checks.append(Check.failed(
            "verify.no_plaintext_secrets", "No plaintext secret stored in the deployment",
            "; ".join(f"{p} {why}" for p, why in findings),
            "replace each with a Secret block placeholder in the profile, re-deploy, and rotate the exposed credential",
        ))
    else:
        checks.append(Check.passed("verify.no_plaintext_secrets", "No plaintext secret stored in the deployment",
                                   "job variables, parameters, pull steps and description hold no secret"))
    return checks


def _equal(id: str, title: str, stored: Any, planned: Any) -> Check:
    a, b = json.dumps(stored, sort_keys=True, default=str), json.dumps(planned, sort_keys=True, default=str)
    if a == b:
        return Check.passed(id, title, a)
    return Check.failed(id, title, f"stored {a}, planned {b}", "re-run this step; if it persists, the workspace "
                        "changes the deployment after it is applied (another deploy, a UI edit)")


def verify(ctx: Any, the_plan: DeployPlan, deployment_id: str) -> CheckReport:
    """Notebook cell: read the deployment back and check it equals the plan."""
    api = PrefectApi.from_settings(ctx.settings)
    report = CheckReport(step=ctx.name, checks=verification_checks(api, ctx.settings, the_plan.desired, deployment_id))
    return ctx.record_checks(report)


# -- smoke run ---------------------------------------------------------------------------------------


def flow_run_logs(api: PrefectApi, flow_run_id: str, limit: int = 200) -> list[str]:
    """The flow run's log lines, oldest first (redacted)."""
    from uuid import UUID

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    logs = api.call(f"reading the logs of flow run {flow_run_id}",
                    lambda c: c.read_logs(log_filter=flt, sort=LogSort.TIMESTAMP_ASC, limit=limit))
    return [redaction.redact(f"{log.timestamp:%H:%M:%S} {logging.getLevelName(log.level)} {log.message}") for log in logs]


def smoke_run_check(api: PrefectApi, deployment_id: str, timeout: float, poll_interval: float = 2.0) -> Check:
    """Create a flow run of the deployment and wait for a final state; the logs on failure."""
    run = api.create_flow_run(deployment_id)
    try:
        final = api.wait_for_flow_run(run.id, timeout=timeout, poll_interval=poll_interval)
    except TimeoutError as exc:
        logs = flow_run_logs(api, run.id)
        return Check.failed(
            "smoke_run", "A flow run of the deployment completes", f"{exc}\n" + "\n".join(logs[-SMOKE_LOG_LINES:]),
            f"check that a worker serves the pool (in Prefect Cloud, managed pools need no worker) and read flow run "
            f"{run.id} in the UI", flow_run_id=str(run.id),
        )
    state = final.state
    if state.type.value == "COMPLETED":
        return Check.passed("smoke_run", "A flow run of the deployment completes",
                            f"flow run {run.name} ({run.id}) COMPLETED", flow_run_id=str(run.id))
    logs = flow_run_logs(api, run.id)
    detail = f"flow run {run.name} ({run.id}) ended {state.type.value}: {state.message or 'no message'}"
    if logs:
        detail += "\nlast log lines:\n" + "\n".join(logs[-SMOKE_LOG_LINES:])
    return Check.failed(
        "smoke_run", "A flow run of the deployment completes", detail,
        "read the state message and logs above: a missing module needs deployment.pip_packages, a missing "
        "Secret block must be created, a flow error must be fixed in the repository; then re-run this step",
        flow_run_id=str(run.id), state=state.type.value,
    )


def smoke_run(ctx: Any, deployment_id: str, enabled: bool | None = None) -> Check:
    """Notebook cell: when enabled (default: the profile's deployment.smoke_run), start one flow run
    of the deployment and wait for it (e2e.flow_run_timeout_seconds)."""
    settings = ctx.settings
    try:
        enabled = parse_flag("smoke_run", enabled)
    except RunbookError as exc:
        ctx.fail(exc)
        raise
    if enabled is None:
        enabled = settings.deployment.smoke_run
    if not enabled:
        check = Check.skipped("smoke_run", "A flow run of the deployment completes",
                              "not requested (pass -p smoke_run true, or set deployment.smoke_run in the profile)")
    else:
        api = PrefectApi.from_settings(settings)
        check = smoke_run_check(api, deployment_id, settings.e2e.flow_run_timeout_seconds,
                                min(settings.e2e.poll_interval_seconds, 5.0))
    ctx.record_checks([check])
    return check
