"""Checks of a deployment as Prefect stores it, read back after a deploy and compared with the plan
(used by the deploy step and the fallback)."""

from __future__ import annotations

from typing import Any

from runbook_lib.checks.base import Check, define
from runbook_lib.checks.facts import Facts, plaintext_secrets, public_values, withhold
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.systems.prefect import PrefectApi
from runbook_lib.systems.prefect_deploy import DesiredDeployment, git_clone_step, live_fields, same

_AGAIN = ("re-run this step; if it persists, the workspace changes the deployment after it is applied (another "
          "deploy, a UI edit)")

EXISTS = define("verify.exists", "Deployment exists", proves="the deployment can be read back by its id",
                remediation="re-run this step; if it persists, check the workspace the API key points at")
NAME = define("verify.name", "Deployment name and flow", proves="the stored flow/deployment name is the planned one",
              remediation=_AGAIN)
WORK_POOL = define("verify.work_pool", "Work pool", proves="the deployment is on the planned work pool", remediation=_AGAIN)
ENTRYPOINT = define("verify.entrypoint", "Entrypoint", proves="the stored entrypoint is the planned one",
                    remediation=_AGAIN)
PULL_STEP = define("verify.pull_step", "Pull step clones the repository",
                   proves="the pull step clones the planned repository (.git) at the planned branch or commit",
                   remediation="re-run this step; a repository URL must end in .git")
JOB_VARIABLES = define("verify.job_variables", "Job variables", proves="the stored job variables are the planned ones",
                       remediation=_AGAIN)
PARAMETERS = define("verify.parameters", "Parameters", proves="the stored parameters are the planned ones",
                    remediation=_AGAIN)
TAGS = define("verify.tags", "Tags", proves="the stored tags are the planned ones", remediation=_AGAIN)
SCHEDULE = define("verify.schedule", "No schedule (event-triggered)",
                  proves="no schedule is attached: runs are started by the Edge Function only",
                  remediation="remove the schedules in the Prefect UI: runs are started by the Edge Function only")
NO_PLAINTEXT = define("verify.no_plaintext_secrets", "No plaintext secret stored in the deployment",
                      proves="job variables, parameters, pull steps and description hold no secret in clear",
                      remediation="replace each with a Secret block placeholder in the profile, re-deploy, and rotate "
                                  "the exposed credential")

LIVE_PLAINTEXT = define("deployment.live_plaintext_secrets", "No plaintext secret in the live deployment",
                        proves="the deployment as it is live (before this step changes it) holds no secret in clear in "
                               "its job variables, parameters, pull steps or description",
                        remediation="the value was readable by anyone with access to the workspace: rotate the exposed "
                                    "credential; applying this plan replaces it with the Secret block placeholder of the "
                                    "profile, then re-run this step")


def masked_live_fields(settings: RunbookSettings, deployment: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The compared fields of the live deployment with every plaintext secret withheld (and
    registered for redaction), the same masking as the planned job variables; and the findings."""
    return withhold(live_fields(deployment), "live deployment", settings)


def live_plaintext_check(findings: list[tuple[str, str]], name: str) -> Check:
    """LIVE_PLAINTEXT from the findings of `masked_live_fields` (paths and kinds, never values)."""
    if findings:
        return LIVE_PLAINTEXT.failed("; ".join(f"{path} {why}" for path, why in findings) +
                                     f": anyone who can read deployment {name} can see it")
    return LIVE_PLAINTEXT.passed(f"{name}: job variables, parameters, pull steps and description hold no secret")


def desired_deployment(facts: Facts, *, pin_commit: bool, name: str, work_pool: str, work_pool_type: str,
                       tags: list[str], description: str) -> DesiredDeployment:
    """The deployment to make from what the checks established (the branch head, the flow's name,
    the job variables with every plaintext secret withheld)."""
    settings = facts.settings
    job_variables, _ = facts.job_variables()
    return DesiredDeployment(
        name=name, flow_name=facts.flow().flow_name, entrypoint=settings.source.entrypoint,
        repository=settings.source.clone_url, branch=settings.source.branch, commit_sha=facts.branch_sha(),
        pinned=pin_commit, work_pool_name=work_pool, work_pool_type=work_pool_type, job_variables=job_variables,
        parameters=dict(settings.deployment.parameters), tags=list(tags), description=description,
    )


def _equal(definition: Any, stored: Any, planned: Any) -> Check:
    import json

    a, b = json.dumps(stored, sort_keys=True, default=str), json.dumps(planned, sort_keys=True, default=str)
    return definition.passed(a) if same(stored, planned) else definition.failed(f"stored {a}, planned {b}")


def verification_checks(api: PrefectApi, settings: RunbookSettings, desired: DesiredDeployment, deployment_id: str) -> list[Check]:
    """The deployment as Prefect stores it, compared with the plan."""
    deployment = api.read_deployment_by_id(deployment_id)
    if deployment is None:
        return [EXISTS.failed(f"no deployment {deployment_id}")]
    checks = [EXISTS.passed(f"{deployment.name} ({deployment_id})")]
    full_name = f"{api.read_flow_name(deployment)}/{deployment.name}"
    checks.append(_equal(NAME, full_name, desired.full_name))
    checks.append(_equal(WORK_POOL, deployment.work_pool_name, desired.work_pool_name))
    checks.append(_equal(ENTRYPOINT, deployment.entrypoint, desired.entrypoint))
    clone = git_clone_step(deployment.pull_steps)
    if clone is None:
        checks.append(PULL_STEP.failed(f"pull steps {deployment.pull_steps} have no git_clone step",
                                       "re-deploy with this step (flow.from_source with a git repository)"))
    else:
        repo = clone.get("repository") or ""
        ref_ok = clone.get("commit_sha") == desired.commit_sha if desired.pinned else clone.get("branch") == desired.branch
        want_ref = f"commit {desired.commit_sha}" if desired.pinned else f"branch {desired.branch}"
        got_ref = f"commit {clone.get('commit_sha')}" if clone.get("commit_sha") else f"branch {clone.get('branch')}"
        if repo.endswith(".git") and repo == desired.repository and ref_ok:
            checks.append(PULL_STEP.passed(f"{repo} at {got_ref}"))
        else:
            checks.append(PULL_STEP.failed(f"stored {repo or 'no repository'} at {got_ref}; planned "
                                           f"{desired.repository} at {want_ref}"))
    checks.append(_equal(JOB_VARIABLES, deployment.job_variables or {}, desired.job_variables))
    checks.append(_equal(PARAMETERS, deployment.parameters or {}, desired.parameters))
    checks.append(_equal(TAGS, sorted(deployment.tags or []), sorted(desired.tags)))
    if deployment.schedules:
        checks.append(SCHEDULE.warned(f"{len(deployment.schedules)} schedule(s) are attached"))
    else:
        checks.append(SCHEDULE.passed("no schedule"))
    stored = {"job_variables": deployment.job_variables, "parameters": deployment.parameters,
              "pull_steps": deployment.pull_steps, "description": deployment.description}
    findings = plaintext_secrets(stored, settings.secret_values(), "deployment", public_values(settings))
    if findings:
        checks.append(NO_PLAINTEXT.failed("; ".join(f"{p} {why}" for p, why in findings)))
    else:
        checks.append(NO_PLAINTEXT.passed("job variables, parameters, pull steps and description hold no secret"))
    return checks
