"""Step 06 and `runbook health`: the live chain checked against what the last passing run recorded.

Read-only, no gate, fast. The baseline is the records of the last passing run (step 03's deployment
id and planned fields, step 04's secret digest, step 01's trigger function digest): the run this
step belongs to when its step 03 passed, else the newest passed run of the profile under the
outputs directory, else the profile alone. The checks are `runbook_lib.checks.health`'s groups
(the catalog's checks where one already proves a link). The verdict: `ok` (every check passed),
`drift` (a warning: something differs from the record, the chain still works), `fail` (a link is
broken or work is stuck), exit codes 0 / 1 / 2. The record (the step's results, `health.json`,
`health.html`) goes to the run directory: `outputs/health/<timestamp>/` for `runbook health`, with
`index.html` as its front page.

The one change it can make: with `requeue_stuck`, the states QUEUED past the orchestrator's lease
are shown, and after the gate's approval put back to PENDING (the reason in their meta and the
audit table), then one flow run is started through the Edge Function so the chain picks them up.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runbook_lib.checks.base import Check, CheckReport, Status, define, run_checks
from runbook_lib.checks.health import GROUPS, Baseline, HealthFacts, items_queued
from runbook_lib.core import paths as project
from runbook_lib.core import render
from runbook_lib.core.errors import NotConfirmed, ResultsError, RunbookError
from runbook_lib.core.secrets import redact, redact_obj
from runbook_lib.core.values import parse_flag
from runbook_lib.notebook.context import StepContext, show, start_step
from runbook_lib.records.manifest import runs_of
from runbook_lib.records.outputs import DeployOutput, E2EOutput, EdgeSecretOutput, HealthOutput, PrerequisitesOutput
from runbook_lib.records.results import StepResults
from runbook_lib.steps.base import Step
from runbook_lib.systems.prefect import CLIENT_MODULES
from runbook_lib.systems.supabase import invoke_edge_function

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel
VERDICTS = {"ok": 0, "drift": 1, "fail": 2}
E2E_STEP = E2EOutput.STEP
HEALTH_DIR = "health"
RECORD, PAGE = "health.json", "health.html"

REQUEUE = define("health.requeue", "Stuck QUEUED states requeued",
                 proves="the states QUEUED past the lease were put back to PENDING (reason in their meta and the audit "
                        "table) and one flow run was started through the Edge Function",
                 remediation="read the detail: the states that were reset stay PENDING until a flow run starts; "
                             "launch one through the Edge Function (step 05) once it answers")


def verdict_of(report: CheckReport) -> str:
    if report.failures:
        return "fail"
    if report.by_status(Status.WARN):
        return "drift"
    return "ok"


# -- the baseline ----------------------------------------------------------------------------------------


def _passed(run_dir: Path, step: str) -> StepResults | None:
    try:
        results = StepResults.load(run_dir, step)
    except ResultsError:
        return None
    return results if results.status == "passed" else None


def baseline_from(run_dir: Path, source: str) -> Baseline | None:
    """The baseline a run directory records, or None when its step 03 did not pass there."""
    deploy = _passed(run_dir, DeployOutput.STEP)
    if deploy is None:
        return None
    d = DeployOutput.model_validate(deploy.values)
    if not d.deployment_id:
        return None
    fields = {c["field"]: c.get("desired") for c in (d.diff or []) if isinstance(c, dict) and "field" in c}
    b = Baseline(source=source, run_dir=str(run_dir), deployment_id=d.deployment_id,
                 deployment_name=d.deployment_name, fields=fields)
    secret = _passed(run_dir, EdgeSecretOutput.STEP)
    if secret is not None:
        e = EdgeSecretOutput.model_validate(secret.values)
        b.edge_digest, b.edge_deployment_id = e.new_digest, e.deployment_id
    prereq = _passed(run_dir, PrerequisitesOutput.STEP)
    if prereq is not None:
        b.trigger_digest = PrerequisitesOutput.model_validate(prereq.values).trigger_function_digest
    ends = [r.finished_at for r in (deploy, secret, prereq, _passed(run_dir, E2E_STEP)) if r is not None and r.finished_at]
    b.recorded_at = max(ends) if ends else None
    return b


def find_baseline(profile: str, run_dir: Path | None, outputs_dir: Path, explicit: str | None = None) -> Baseline:
    """The records to compare with (see the module doc); `explicit`: a run directory or a run id."""
    if explicit:
        path = Path(explicit).expanduser()
        path = path if path.is_dir() else outputs_dir / explicit
        found = baseline_from(path, f"run {path.name}") if path.is_dir() else None
        if found is None:
            raise RunbookError(f"baseline {explicit!r}: no passed step 03 recorded in {path}; give a run directory or "
                               f"a run id under {outputs_dir} whose step 03 passed")
        return found
    if run_dir is not None and run_dir.is_dir():
        found = baseline_from(run_dir, f"this run ({run_dir.name})")
        if found is not None:
            return found
    for m, path in runs_of(outputs_dir, profile):
        if m.status != "passed":
            continue
        found = baseline_from(path, f"run {m.run_id} (passed, {m.started_at:%Y-%m-%d %H:%M} UTC)")
        if found is not None:
            return found
    return Baseline(source=f"the profile {profile!r} (no passing run recorded under {outputs_dir})")


# -- the step --------------------------------------------------------------------------------------------


@dataclass
class RequeuePlan:
    states: list[dict[str, Any]]
    lease_seconds: float
    edge_function_url: str

    @property
    def nothing_to_apply(self) -> str | None:
        return None if self.states else "no state is QUEUED past the lease"

    def summary(self) -> str:
        batches = sorted({s["batch_id"] for s in self.states})
        return (f"reset {len(self.states)} state(s) QUEUED longer than {self.lease_seconds:.0f}s to PENDING "
                f"({len(batches)} batch(es)), then start one flow run through the Edge Function")

    def gate_plan(self) -> dict[str, Any]:
        return {"action": "requeue QUEUED states past the lease to PENDING, then POST the Edge Function",
                "state_ids": [s["state_id"] for s in self.states], "lease_seconds": self.lease_seconds,
                "edge_function": self.edge_function_url}

    def table(self) -> render.Table:
        rows = [(s["state_id"], s["batch_id"], s["item_id"], s["step_name"], f"{s['updated_at']:%Y-%m-%d %H:%M:%S}")
                for s in self.states]
        return render.Table(self.summary(), ("State", "Batch", "Item", "Step", "QUEUED since"), rows)


class HealthCheck(Step):
    """The cells of step 06: one method per group of checks, the requeue (plan, apply), the verdict."""

    OUTPUT = HealthOutput

    def __init__(self, ctx: StepContext, *, requeue_stuck: Any = False, baseline: str | None = None,
                 outputs_dir: str | Path | None = None):
        super().__init__(ctx)
        with self.failing():
            self.requeue_stuck = bool(parse_flag("requeue_stuck", requeue_stuck))
            outputs = Path(outputs_dir) if outputs_dir else ctx.root / "outputs"
            self.baseline = find_baseline(ctx.profile, ctx.run_dir, outputs, baseline)
        self.facts = HealthFacts(ctx.settings, ctx.name, self.baseline)
        self.report = CheckReport(step=ctx.name)
        self.plan: RequeuePlan | None = None
        self.publish(baseline=self.baseline.describe())

    def show_baseline(self) -> render.Table:
        b = self.baseline
        rows = [("compared with", b.source), ("deployment", f"{b.deployment_name or '-'} {b.deployment_id or '(by name)'}"),
                ("PREFECT_DEPLOYMENT_ID digest", b.edge_digest or "(none recorded)"),
                ("trigger function digest", b.trigger_digest or "(none recorded)")]
        table = render.Table("Baseline", ("What", "Recorded"), rows)
        show(table)
        return table

    def _group(self, name: str) -> CheckReport:
        return run_checks(self.facts, GROUPS[name], self.report)

    def deployment(self) -> CheckReport:
        """1. The deployment exists under the recorded id; field-by-field drift."""
        return self._group("deployment")

    def edge_function(self) -> CheckReport:
        """2. PREFECT_DEPLOYMENT_ID names the deployment; every secret the function reads is set."""
        return self._group("edge_function")

    def database(self) -> CheckReport:
        """3. The trigger (present, enabled, source unchanged, target), pg_net and its responses."""
        return self._group("database")

    def prefect(self) -> CheckReport:
        """4. The pool (present, type, not paused); failed or unpicked flow runs."""
        return self._group("prefect")

    def items(self) -> CheckReport:
        """5. Items QUEUED past the lease, PENDING with no run since, FAILED in the window."""
        return self._group("items")

    def secret_blocks(self) -> CheckReport:
        """6. The Secret blocks the flow and its job variables need."""
        return self._group("secret_blocks")

    def run_all(self) -> CheckReport:
        for name in GROUPS:
            self._group(name)
        return self.report

    # -- recovery -----------------------------------------------------------------------------------
    def requeue_plan(self) -> RequeuePlan | None:
        """With requeue_stuck: the states it would reset, behind the gate. Headless without confirm the
        refusal is recorded and nothing changes."""
        if not self.requeue_stuck:
            show("requeue_stuck is off: the health check changes nothing.")
            return None
        s = self.settings
        with self.failing():
            db = self.facts.pipeline_database()
            lease, _ = self.facts.queued_lease()
            states = db.queued_state_ids(lease)
        self.plan = RequeuePlan(states, lease, s.supabase.edge_function_url or "")
        self.publish(requeue_plan=[{k: str(v) for k, v in st.items()} for st in states])
        if self.plan.nothing_to_apply:
            show(f"{self.plan.nothing_to_apply}; nothing to requeue.")
            return self.plan
        show(self.plan.table())
        try:
            self.ctx.confirm_plan(self.plan.summary(), self.plan.gate_plan())
        except NotConfirmed as exc:
            show(f"not confirmed: {exc}")
        return self.plan

    def requeue(self) -> Check | None:
        """After approval: reset the planned states (still QUEUED past the lease) to PENDING, record why,
        and start one flow run through the Edge Function."""
        plan = self.plan
        if plan is None or plan.nothing_to_apply or self.ctx.results.refused:
            return None
        with self.failing():
            self.ctx.require_approved(plan.gate_plan())
        s = self.settings
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        reason = (f"runbook health ({who}, {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}): QUEUED longer than the "
                  f"orchestrator's lease ({plan.lease_seconds:.0f}s), never dispatched; reset to PENDING for a new flow run")
        try:
            done = self.facts.pipeline_database().requeue_queued([st["state_id"] for st in plan.states], plan.lease_seconds, reason)
        except RunbookError as exc:
            self.ctx.record_failure(REQUEUE.failed(str(exc)), exc)
            raise
        reset = done["states"]
        self.publish(requeued=reset)
        audit = ("the reason is in each state's meta (requeued) and in runbook.workflow_state_transitions.reason"
                 if done["audit_reason"] else "the reason is in each state's meta (requeued); the audit table has no "
                 "reason column (apply runbook_sandbox/sql/007_transition_reasons.sql)")
        left = len(plan.states) - len(reset)
        moved = f"; {left} had moved meanwhile and were left alone" if left else ""
        detail = f"reset {len(reset)} of {len(plan.states)} state(s) to PENDING{moved}; {audit}"
        if not reset:
            check = REQUEUE.passed(detail + "; no flow run started (nothing to pick up)")
        else:
            batch = reset[0]["batch_id"]
            try:
                s.require("supabase.edge_function_url", "supabase.anon_key")
                status, answer = invoke_edge_function(s.supabase.edge_function_url, s.supabase.anon_key, {"batch_id": batch})
            except RunbookError as exc:
                status, answer = None, str(exc)
            run_id = answer.get("flow_run_id") if isinstance(answer, dict) else None
            if status == 200 and run_id:
                self.publish(requeue_flow_run_id=str(run_id))
                check = REQUEUE.passed(f"{detail}; the Edge Function started flow run {run_id} (batch {batch})",
                                       flow_run_id=str(run_id), count=len(reset))
            else:
                check = REQUEUE.failed(
                    f"{detail}; but the Edge Function did not start a flow run: {status} "
                    f"{redact(json.dumps(answer, default=str))[:300]}", count=len(reset))
        self.report.replace(check)
        show(CheckReport(step=self.ctx.name, checks=[check]))
        run_checks(self.facts, [items_queued], self.report)  # the states as they are now
        return check

    # -- the verdict ---------------------------------------------------------------------------------
    def verdict(self, *, raise_on_fail: bool = True) -> str:
        """Record the checks and the verdict (ok / drift / fail) with the record files; the step fails
        on `fail` (raise_on_fail), and passes with warnings on `drift`."""
        self.facts.close()
        report = self.report
        verdict = verdict_of(report)
        findings = [{"id": c.id, "status": c.status.value, "detail": c.detail, "remediation": c.remediation}
                    for c in report.checks if c.status not in (Status.PASS, Status.SKIP)]
        stuck = next((c.data.get("count", 0) for c in report.checks if c.id == items_queued.id
                      and c.status == Status.FAIL), 0)
        self.publish(verdict=verdict, exit_code=VERDICTS[verdict], counts=report.counts(), findings=findings,
                     stuck_queued=stuck, record_dir=str(self.ctx.run_dir))
        self.ctx.results.add_checks(report)
        if verdict == "fail":
            self.ctx.results.status = "failed"
            self.ctx.results.error = (f"health: fail ({', '.join(c.id for c in report.failures)})")
        results = self.ctx.finish()
        write_record(self.ctx.run_dir, self.ctx.profile, verdict, report, self.baseline, results.values)
        show(verdict_banner(verdict, report))
        if verdict == "fail" and raise_on_fail:
            failed = ", ".join(c.id for c in report.failures)
            raise RunbookError(f"health check: fail ({failed}); see the remediations above")
        return verdict


def verdict_banner(verdict: str, report: CheckReport) -> render.Table:
    status = {"ok": "pass", "drift": "warn", "fail": "fail"}[verdict]
    c = report.counts()
    return render.Table(f"health: {verdict.upper()} (exit {VERDICTS[verdict]})", ("Verdict", "Checks"),
                        [(render.Cell(verdict, status=status), f"{c['pass']} pass, {c['warn']} warn, {c['fail']} fail, "
                          f"{c['skip']} skip")], title_status=status)


def record_of(profile: str, verdict: str, report: CheckReport, baseline: Baseline, values: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable health record (`--json`, `health.json`)."""
    return redact_obj({
        "verdict": verdict, "exit_code": VERDICTS[verdict], "profile": profile,
        "checked_at": datetime.now(timezone.utc).isoformat(), "baseline": baseline.describe(),
        "counts": report.counts(),
        "checks": [{"id": c.id, "title": c.title, "status": c.status.value, "detail": c.detail,
                    "remediation": "" if c.status == Status.PASS else c.remediation, "data": c.data} for c in report.checks],
        "requeue": {k: values[k] for k in ("requeue_plan", "requeued", "requeue_flow_run_id") if k in values},
    })


def write_record(run_dir: Path, profile: str, verdict: str, report: CheckReport, baseline: Baseline,
                 values: dict[str, Any]) -> Path:
    """`health.json` and `health.html` (the verdict and the checks' table) next to the step's results."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = record_of(profile, verdict, report, baseline, values)
    (run_dir / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    body = (verdict_banner(verdict, report)._repr_html_() + f"<p>{render.escape('compared with ' + baseline.source)}</p>"
            + report.table()._repr_html_())
    (run_dir / PAGE).write_text(render.page(f"health {profile} {verdict}", body))
    return run_dir / RECORD


# -- `runbook health` ------------------------------------------------------------------------------------


@dataclass
class HealthOutcome:
    verdict: str
    exit_code: int
    record_dir: Path
    record: dict[str, Any]


def health_dir(outputs_dir: Path) -> Path:
    """A new `<outputs>/health/<timestamp>/` directory."""
    base = outputs_dir / HEALTH_DIR
    stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    candidate, n = base / stamp, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    candidate.mkdir(parents=True)
    return candidate


def run_health(profile: str, *, requeue_stuck: bool = False, confirm: bool | None = None,
               outputs_dir: Path | None = None, baseline: str | None = None, quiet: bool = False) -> HealthOutcome:
    """The health check from the command line: the same step as notebook 06, its record in
    `<outputs>/health/<timestamp>/`. `quiet` sends the tables to stderr (for `--json`)."""
    outputs = Path(outputs_dir) if outputs_dir else project.project_root() / "outputs"
    record_dir = health_dir(outputs)
    stream = sys.stderr if quiet else sys.stdout
    with contextlib.redirect_stdout(stream):
        ctx = start_step(HealthOutput.STEP, profile=profile, confirm=confirm, run_dir=record_dir)
        step = HealthCheck(ctx, requeue_stuck=requeue_stuck, baseline=baseline, outputs_dir=outputs)
        step.show_baseline()
        step.run_all()
        step.requeue_plan()
        if step.plan is not None and not step.plan.nothing_to_apply and not ctx.results.refused:
            step.requeue()
        verdict = step.verdict(raise_on_fail=False)
    (record_dir / "index.html").write_text((record_dir / PAGE).read_text())  # the record's front page, as a run's
    record = json.loads((record_dir / RECORD).read_text())
    return HealthOutcome(verdict, VERDICTS[verdict], record_dir, record)
