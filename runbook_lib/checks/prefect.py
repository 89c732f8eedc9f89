"""Checks of the Prefect side: the API and key, the work pool (exists, type, not paused, offers
pip_packages), the job variables (fit the pool's template, no plaintext secret) and the Secret
blocks the runs need."""

from __future__ import annotations

from typing import Any

from runbook_lib.checks.base import Fail, Outcome, Skip, check, ok
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import PrefectApiError, RunbookError
from runbook_lib.core.settings import BLOCK_VALUE_SETTINGS, SETTING_ENV


def _api_remediation(facts: Facts, exc: Exception) -> str:
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return (f"set PREFECT_API_KEY to a valid key with access to this workspace (Prefect Cloud: your profile, "
                f"API keys); {facts.where('prefect.api_key')}")
    if status == 404:
        return (f"check PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID (or PREFECT_API_URL): they must name the "
                f"workspace of the deployment; {facts.where('prefect.api_url')}")
    if isinstance(exc, PrefectApiError):
        return f"check that PREFECT_API_URL is right and reachable from here; {facts.where('prefect.api_url')}"
    return "set the missing settings named above"


@check("prefect.api", "Prefect API reachable and authenticated",
       proves="the Prefect API answers with the API key (the workspace of PREFECT_API_URL)")
def api(facts: Facts) -> Outcome:
    try:
        facts.prefect()
    except RunbookError as exc:
        raise Fail(str(exc), _api_remediation(facts, exc)) from None
    return ok(f"{facts.settings.value('prefect.api_url')} accepted the API key")


@check("prefect.work_pool", lambda s: f"Work pool {s.deployment.work_pool!r} exists" if s else "Work pool exists",
       proves="the deployment's work pool exists in the workspace (or the step creates it)")
def work_pool(facts: Facts) -> Outcome:
    pool = facts.work_pool()
    d = facts.settings.deployment
    if pool is None:
        return ok(f"{d.work_pool} does not exist yet: it will be created (type {d.work_pool_type})")
    paused = " (PAUSED: resume it in the UI)" if pool.is_paused else ""
    return ok(f"type {pool.type}, id {pool.id}{paused}", type=pool.type)


@check("prefect.work_pool_type", "Work pool type",
       proves="the pool has the planned type (prefect:managed installs pip_packages at run start)")
def work_pool_type(facts: Facts) -> Outcome:
    pool = facts.pool_for()
    d = facts.settings.deployment
    if pool.type != d.work_pool_type:
        raise Fail(
            f"work pool {d.work_pool!r} has type {pool.type!r}, not {d.work_pool_type!r}: its workers would "
            "not run the deployment as planned (a Prefect Managed pool installs pip_packages at run start)",
            f"deploy to a pool of type {d.work_pool_type!r} (create one: `prefect work-pool create <name> --type "
            f"{d.work_pool_type}`, then set deployment.work_pool), or correct deployment.work_pool_type if "
            f"{pool.type!r} is intended ({facts.where('deployment.work_pool_type')})",
        )
    return ok(f"{pool.type}", type=pool.type)


@check("prefect.work_pool_active", "Work pool not paused",
       proves="the pool is not paused (runs of a paused pool stay Scheduled, then Late)")
def work_pool_active(facts: Facts) -> Outcome:
    pool = facts.pool_for()
    d = facts.settings.deployment
    if pool.is_paused:
        raise Fail(
            f"work pool {d.work_pool!r} is paused: flow runs of the deployment would stay Scheduled, then Late, "
            "and no batch would ever be processed",
            f"resume it: `prefect work-pool resume {d.work_pool}` (or Resume in the Prefect UI, Work Pools)",
        )
    status = getattr(pool.status, "value", pool.status)
    return ok(f"not paused (status {status})")


@check("prefect.work_pool_pip_packages", "Work pool offers pip_packages",
       proves="the pool's base job template has a pip_packages variable (else the flow's imports fail at run start)")
def work_pool_pip_packages(facts: Facts) -> Outcome:
    pool = facts.pool_for()
    props = ((pool.base_job_template or {}).get("variables") or {}).get("properties") or {}
    if "pip_packages" not in props:
        raise Fail(
            f"the base job template of work pool {facts.settings.deployment.work_pool!r} offers no pip_packages "
            f"variable (it offers: {', '.join(sorted(props)) or 'nothing'}): the deployment's pip_packages would be "
            "ignored and the flow's imports would fail at run start",
            "use a prefect:managed pool (its default template offers pip_packages), or add a pip_packages "
            "variable to this pool's base job template (Prefect UI: Work Pools, Edit, Base Job Template)",
        )
    return ok(f"job variables offered: {', '.join(sorted(props))}")


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


@check("job_variables.schema", "Job variables fit the pool's base job template",
       proves="pip_packages and env are variables of the pool, of the right types (else Prefect refuses: 422)",
       remediation="fix deployment.pip_packages / deployment.env in the profile so they match the pool's variables")
def job_variables_schema(facts: Facts) -> Outcome:
    variables = facts.pool_variables()
    pool = facts.need(facts.work_pool, "prefect.work_pool", "the work pool")
    d = facts.settings.deployment
    if pool is not None and pool.type != d.work_pool_type:
        raise Skip(f"{d.work_pool} is not a {d.work_pool_type} pool (see prefect.work_pool_type)")
    job_variables, _ = facts.job_variables()
    if "pip_packages" in job_variables and "pip_packages" not in (variables.get("properties") or {}):
        raise Skip(f"{d.work_pool} offers no pip_packages variable (see prefect.work_pool_pip_packages)")
    problems = template_problems(variables, job_variables)
    if problems:
        raise Fail("; ".join(problems) + " (Prefect would refuse the deployment with 422)",
                   "fix deployment.pip_packages / deployment.env in the profile so they match the pool's variables")
    return ok(f"{sorted(job_variables)} are variables of {d.work_pool}")


@check("job_variables.secrets", "No plaintext secret in job_variables",
       proves="the job variables hold Secret block placeholders, never a secret in clear",
       remediation="replace each with a Secret block placeholder {{ prefect.blocks.secret.<name> }} in "
                   "[deployment.env] of the profile (the block holds the value)")
def job_variables_secrets(facts: Facts) -> Outcome:
    _, findings = facts.job_variables()
    if findings:
        raise Fail("; ".join(f"{path} {why}" for path, why in findings) + ": anyone who can read the deployment "
                   "would see it", "replace each with a Secret block placeholder {{ prefect.blocks.secret.<name> }} "
                   "in [deployment.env] of the profile (the block holds the value)")
    return ok("env holds Secret block placeholders and plain settings only")


@check("blocks.database_url", lambda s: f"Secret block {s.blocks.database_url!r}" if s else "Secret block of the DSN",
       proves="the Secret block the orchestrator loads its DSN from exists and holds a PostgreSQL URL")
def block_database_url(facts: Facts) -> Outcome:
    facts.block_dsn()
    return ok("exists and holds a PostgreSQL URL (value hidden)")


@check("blocks.referenced", "The Secret blocks the runs need exist",
       proves="every Secret block of the job variables' placeholders (resolved at submission) and every block the "
              "flow's source loads exists (the DSN block is blocks.database_url's)")
def blocks_referenced(facts: Facts) -> Outcome:
    settings = facts.settings
    dsn_block = settings.blocks.database_url  # checked, with its value, by blocks.database_url
    needed = {name: "job_variables" for name in settings.deployment.referenced_secret_blocks() if name != dsn_block}
    try:
        info = facts.flow()
    except Exception:
        info = None  # the flow's own loads are checked when its source can be read
    for name in (info.secret_blocks if info is not None and info.is_flow else []):
        if name != dsn_block:
            needed.setdefault(name, "the flow's Secret.load")
    if not needed:
        return ok("the job variables refer to no Secret block and the flow loads none")
    api = facts.prefect_for()
    missing = [b for b in needed if api.read_secret_block(b) is None]
    if missing:
        sources = {getattr(settings.blocks, role): SETTING_ENV[path] for role, path in BLOCK_VALUE_SETTINGS.items()}
        how = "; ".join(f"{b} from {sources[b]}" if b in sources else b for b in missing)
        raise Fail(
            "missing Secret block(s) " + ", ".join(f"{n} (used by {needed[n]})" for n in missing) + ": a missing "
            "placeholder block makes every run CRASH at submission; a block the flow loads makes it fail",
            f"create the Secret block(s) ({how}) with `Secret(value=...).save(<name>)` or `prefect block create "
            "secret`, or remove the placeholder from deployment.env",
            missing=missing,
        )
    return ok("all exist: " + ", ".join(f"{n} ({why})" for n, why in needed.items()), blocks=list(needed))


POOL = [api, work_pool, work_pool_type, work_pool_active, work_pool_pip_packages]
BLOCKS = [block_database_url, blocks_referenced]
JOB_VARIABLES = [job_variables_secrets, job_variables_schema]
