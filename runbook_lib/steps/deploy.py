"""Step 03: deploy the orchestrator flow from its git repository to the managed work pool.

The desired deployment is built from the profile (source URL with `.git`, branch or pinned commit,
entrypoint, work pool, job variables with Secret block placeholders only, tags, parameters,
description, version = the commit SHA). `plan()` runs the catalog's checks of the source, the
pool, the job variables and the Secret blocks (the same checks as step 01; a plaintext secret is a
FAIL before anything is applied), reads the live deployment and shows a field-by-field diff.
`apply()` deploys with `flow.from_source(...).deploy(...)` behind the confirmation gate, and skips
the call entirely when nothing differs (no API writes, same id). `verify()` reads the deployment
back and compares it with the plan; `smoke_run()` optionally starts one flow run and waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runbook_lib.checks import prefect, source
from runbook_lib.checks.base import CheckReport, define, run_checks
from runbook_lib.checks.deployment import (
    LIVE_PLAINTEXT, desired_deployment, live_plaintext_check, masked_live_fields, verification_checks,
)
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import RunbookError
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.core.values import parse_flag
from runbook_lib.notebook.context import StepContext, show
from runbook_lib.notebook.progress import Activity
from runbook_lib.records.outputs import DeployOutput
from runbook_lib.steps.base import Step
from runbook_lib.systems.prefect import CLIENT_MODULES, PrefectApi
from runbook_lib.systems.prefect_deploy import (
    DeployError, DesiredDeployment, FieldChange, changed_since_plan, deploy_flow, diff_fields, diff_table, live_digest,
)

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel
SMOKE_LOG_LINES = 40
# What the plan checks, in order: the catalog's checks, shared with step 01.
PLAN_CHECKS = [prefect.job_variables_secrets, *source.REPOSITORY, source.imports, prefect.api, prefect.work_pool,
               prefect.work_pool_type, prefect.job_variables_schema, prefect.block_database_url,
               prefect.blocks_referenced]

APPLY = define("deploy.apply", "Deployment applied", proves="the planned deployment is live (created, updated, or "
               "already equal: then nothing was written)")
SMOKE_RUN = define("smoke_run", "A flow run of the deployment completes",
                   proves="one flow run of the deployment reaches COMPLETED (optional)",
                   remediation="read the state message and logs above: a missing module needs deployment.pip_packages, "
                               "a missing Secret block must be created, a flow error must be fixed in the repository; "
                               "then re-run this step")


def describe_deployment(settings: RunbookSettings, repository: str, branch: str) -> str:
    return (
        f"Orchestrator of the data-enrichment pipeline: started by the Supabase Edge Function "
        f"{settings.supabase.function_name} (event-triggered, no schedule); deployed by the runbook "
        f"from {repository} ({branch})."
    )


# -- plan --------------------------------------------------------------------------------------------


@dataclass
class DeployPlan:
    desired: DesiredDeployment | None  # None when the source could not be read
    live_id: str | None
    changes: list[FieldChange] = field(default_factory=list)
    smoke_run: bool = False  # a flow run of the deployment is started after the deploy: part of what is approved
    live_digest: str | None = None  # what the live deployment was when the plan was made (None: no deployment)
    live_findings: list[tuple[str, str]] = field(default_factory=list)  # plaintext secrets in the live deployment

    @property
    def no_changes(self) -> bool:
        return self.live_id is not None and all(c.status == "unchanged" for c in self.changes)

    @property
    def nothing_to_apply(self) -> str | None:
        if not self.no_changes or self.smoke_run:
            return None
        return f"No changes: deployment {self.desired.full_name} ({self.live_id}) already matches the plan"

    def summary(self) -> str:
        d = self.desired
        if self.live_id is None:
            text = f"create deployment {d.full_name} on work pool {d.work_pool_name} at {d.commit_sha[:12]}"
        elif self.no_changes:
            text = f"keep deployment {d.full_name} ({self.live_id}) as it is (no changes)"
        else:
            changed = [c.field for c in self.changes if c.status != "unchanged"]
            text = f"update deployment {d.full_name} ({self.live_id}): {', '.join(changed)}"
        if self.smoke_run:
            text += ("; then start one flow run of it (smoke run: the orchestrator dispatches every PENDING item "
                     "it finds)")
        return text

    def gate_plan(self) -> dict[str, Any]:
        """What the confirmation approves: the deployment, its commit, every field that changes, the
        live state the plan was made from, and whether a smoke run is started."""
        d = self.desired
        return {
            "deployment": d.full_name,
            "deployment_id": self.live_id,
            "repository": d.repository,
            "ref": {"commit_sha": d.commit_sha} if d.pinned else {"branch": d.branch, "head": d.commit_sha},
            "changes": [c.as_dict() for c in self.changes if c.status != "unchanged"],
            "live_digest": self.live_digest,
            "smoke_run": self.smoke_run,
        }


def build_plan(settings: RunbookSettings, *, pin_commit: bool = False,
               smoke_run: bool = False) -> tuple[DeployPlan, CheckReport]:
    """Everything the plan needs, read-only: checks, the desired deployment, the live one (masked:
    a plaintext secret in it is withheld and reported), the diff."""
    settings.require("prefect.api_url", "prefect.api_key", "source.repo_url")
    facts = Facts(settings, DeployOutput.STEP)
    try:
        report = run_checks(facts, PLAN_CHECKS)
        if not report.ok:
            return DeployPlan(None, None, []), report
        dep = settings.deployment
        desired = desired_deployment(
            facts, pin_commit=pin_commit, name=dep.name, work_pool=dep.work_pool,
            work_pool_type=dep.work_pool_type, tags=list(dep.tags),
            description=describe_deployment(settings, settings.source.clone_url, settings.source.branch),
        )
        live = facts.prefect().read_deployment(desired.full_name)
    finally:
        facts.close()
    findings: list[tuple[str, str]] = []
    live_masked = None
    if live is not None:
        live_masked, findings = masked_live_fields(settings, live)
    changes = diff_fields(desired.fields(), live_masked)
    return DeployPlan(desired, str(live.id) if live is not None else None, changes, smoke_run, live_digest(live),
                      findings), report


def plan_is_current(settings: RunbookSettings, the_plan: DeployPlan) -> str | None:
    """Re-read what the plan was built from (the live deployment, the branch head); None when both
    are as they were, else what changed (the refusal's message)."""
    return changed_since_plan(settings, the_plan.desired, the_plan.live_id, the_plan.live_digest)


# -- the step ----------------------------------------------------------------------------------------


class Deploy(Step):
    """The cells of step 03: plan, confirm, apply, verify, smoke_run."""

    OUTPUT = DeployOutput

    def __init__(self, ctx: StepContext, *, pin_commit: Any = False, smoke_run: Any = None):
        super().__init__(ctx)
        with self.failing():
            self.pin_commit = bool(parse_flag("pin_commit", pin_commit))
            self.smoke = parse_flag("smoke_run", smoke_run)

    @property
    def smoke_enabled(self) -> bool:
        """The `smoke_run` parameter, else the profile's deployment.smoke_run."""
        return bool(self.settings.deployment.smoke_run if self.smoke is None else self.smoke)

    def plan(self) -> DeployPlan:
        """Build the plan, show the diff and record the checks (a FAIL ends the cell). A plaintext
        secret in the live deployment is recorded as a failed check; the plan (which replaces it with
        the placeholder) can still be applied, and the step ends failed (rotate the credential)."""
        with self.failing():
            result, report = build_plan(self.settings, pin_commit=self.pin_commit, smoke_run=self.smoke_enabled)
        if result.desired is not None:
            d = result.desired
            title = (f"Deployment {d.full_name}: " + ("no changes" if result.no_changes else
                     "new deployment" if result.live_id is None else "changes to apply"))
            show(diff_table(title, result.changes))
            self.publish(flow_name=d.flow_name, deployment_name=d.full_name, commit_sha=d.commit_sha, branch=d.branch,
                         pinned=d.pinned, version=d.version, repository=d.repository,
                         diff=[c.as_dict() for c in result.changes], no_changes=result.no_changes)
            if result.live_id is not None:
                report.add(live_plaintext_check(result.live_findings, d.full_name))
        self.ctx.record_checks(CheckReport(step=report.step, checks=[c for c in report.checks
                                                                      if c.id != LIVE_PLAINTEXT.id]))
        live = [c for c in report.checks if c.id == LIVE_PLAINTEXT.id]
        if live:  # recorded and shown; it fails the step at verify, once the deploy replaced the secret
            self.ctx.results.add_checks(CheckReport(step=report.step, checks=live))
            self.ctx.save()
            show(CheckReport(step=report.step, checks=live))
        return result

    def _refuse_if_stale(self, the_plan: DeployPlan) -> None:
        try:
            stale = plan_is_current(self.settings, the_plan)
        except RunbookError as exc:
            stale = f"the live state could not be read again before applying ({exc}); nothing was applied"
        if stale:
            exc = RunbookError(stale)
            self.ctx.record_failure(APPLY.failed(stale, "re-run this step: it shows the plan for the live state "
                                                        "as it is now"), exc)
            raise exc

    def apply(self, the_plan: DeployPlan) -> str:
        """Deploy (once approved) or, with no changes, keep the live deployment without any API write.
        Before anything, the live deployment and the branch head are read again: a change since the
        plan refuses. Records and returns the deployment id."""
        d = the_plan.desired
        if not the_plan.nothing_to_apply:
            with self.failing():  # NotConfirmed, or no plan was shown for confirmation
                self.ctx.require_approved(the_plan.gate_plan())
        self._refuse_if_stale(the_plan)
        if the_plan.no_changes:
            self.ctx.record_checks([APPLY.passed(
                f"no changes: {d.full_name} is up to date; kept {the_plan.live_id} without calling deploy",
                deployment_id=the_plan.live_id,
            )])
            self.publish(changed=False, deployment_id=the_plan.live_id)
            return the_plan.live_id
        try:
            with Activity(f"deploying {d.full_name} at {d.commit_sha[:12]}"):
                deployment_id = deploy_flow(self.settings, d)
        except DeployError as exc:
            self.ctx.record_failure(APPLY.failed(exc.cause, exc.fix), exc)
            raise
        if the_plan.live_id is not None and deployment_id != the_plan.live_id:
            check = APPLY.warned(f"{d.full_name} got a new id {deployment_id} (was {the_plan.live_id})",
                                 "update the Edge Function's PREFECT_DEPLOYMENT_ID (step 04)", deployment_id=deployment_id)
        else:
            verb = "created" if the_plan.live_id is None else "updated"
            check = APPLY.passed(f"{verb} {d.full_name}: {deployment_id}", deployment_id=deployment_id)
        self.ctx.record_checks([check])
        self.publish(changed=True, deployment_id=deployment_id)
        return deployment_id

    def verify(self, the_plan: DeployPlan, deployment_id: str) -> CheckReport:
        """Read the deployment back and check it equals the plan. A plaintext secret the live
        deployment held before this step fails the step here (the deploy replaced it; the credential
        must be rotated)."""
        api = PrefectApi.from_settings(self.settings)
        checks = verification_checks(api, self.settings, the_plan.desired, deployment_id)
        checks += [c for c in self.ctx.results.checks if c.id == LIVE_PLAINTEXT.id and c.status.value == "fail"]
        return self.ctx.record_checks(checks)

    def smoke_run(self, the_plan: DeployPlan, deployment_id: str) -> Any:
        """When enabled (the `smoke_run` parameter, else the profile's deployment.smoke_run) and
        approved with the plan, start one flow run of the deployment and wait for it
        (e2e.flow_run_timeout_seconds). Without the approval nothing is started."""
        if not the_plan.smoke_run:
            check = SMOKE_RUN.skipped("not requested (pass -p smoke_run true, or set deployment.smoke_run in the profile)")
        else:
            with self.failing():  # the smoke run is part of the approved plan: no approval, no flow run
                self.ctx.require_approved(the_plan.gate_plan())
            with Activity(f"smoke run of {deployment_id}: waiting for a final state"):
                check = smoke_run_check(PrefectApi.from_settings(self.settings), deployment_id,
                                        self.settings.e2e.flow_run_timeout_seconds,
                                        min(self.settings.e2e.poll_interval_seconds, 5.0))
        self.ctx.record_checks([check])
        return check


def smoke_run_check(api: PrefectApi, deployment_id: str, timeout: float, poll_interval: float = 2.0) -> Any:
    """Create a flow run of the deployment and wait for a final state; the logs on failure."""
    run = api.create_flow_run(deployment_id)
    try:
        final = api.wait_for_flow_run(run.id, timeout=timeout, poll_interval=poll_interval)
    except TimeoutError as exc:
        logs = api.flow_run_logs(run.id)
        return SMOKE_RUN.failed(
            f"{exc}\n" + "\n".join(logs[-SMOKE_LOG_LINES:]),
            f"check that a worker serves the pool (in Prefect Cloud, managed pools need no worker) and read flow run "
            f"{run.id} in the UI", flow_run_id=str(run.id),
        )
    state = final.state
    if state.type.value == "COMPLETED":
        return SMOKE_RUN.passed(f"flow run {run.name} ({run.id}) COMPLETED", flow_run_id=str(run.id))
    logs = api.flow_run_logs(run.id)
    detail = f"flow run {run.name} ({run.id}) ended {state.type.value}: {state.message or 'no message'}"
    if logs:
        detail += "\nlast log lines:\n" + "\n".join(logs[-SMOKE_LOG_LINES:])
    return SMOKE_RUN.failed(detail, flow_run_id=str(run.id), state=state.type.value)
