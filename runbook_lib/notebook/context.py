"""The entry point of every runbook notebook: `ctx = start_step("<name>", profile=..., confirm=..., run_dir=...)`.

Works from any working directory (project root, `papermill --cwd notebooks`): paths are resolved
from the project root. It loads the profile's settings, registers their secrets for redaction and
installs the redaction hooks, and starts the step's results file in the run directory. The
returned `StepContext` is what the notebook's cells call: show things, record checks (failing
the cell when a check failed), gate changes behind a confirmation, record values, finish.

When the gate refuses a change, the step's results say so at once: `rejected` (Reject clicked, or
`confirm=False`) or `not_confirmed` (headless without `confirm`, or the apply cell reached without
an approval), with the reason in `error`; an approval given afterwards (Approve clicked) puts the
step back to `running`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

from runbook_lib.checks.base import Check, CheckReport
from runbook_lib.core import paths as project
from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import NotConfirmed, RunbookError
from runbook_lib.core.locks import hold_for_step, release_step_lock
from runbook_lib.core.profiles import load_settings
from runbook_lib.core.settings import DEFAULT_PROFILE, PROFILE_ENV, RunbookSettings
from runbook_lib.notebook.gate import ConfirmationGate, in_kernel, parse_confirm
from runbook_lib.records.outputs import StepOutput
from runbook_lib.records.results import ATTEMPT_ENV, REFUSED, GateDecision, StepResults, check_step_name, now, refusal_status

O = TypeVar("O", bound=StepOutput)


def show(obj: Any) -> None:
    """Display `obj`: rich HTML in a notebook, a rich rendering (or its text) in a terminal."""
    if in_kernel():
        from IPython.display import display

        display(obj)
        return
    if hasattr(obj, "__rich__") or hasattr(obj, "__rich_console__"):
        from rich.console import Console

        Console().print(obj)
    else:
        print(redaction.redact(str(obj)))


def resolve_run_dir(run_dir: str | Path | None, profile: str, root: Path) -> Path:
    """An absolute run directory: relative paths are taken from the project root, not the cwd."""
    if run_dir in (None, ""):
        return project.default_run_dir(profile, root)
    path = Path(run_dir).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def register_settings_secrets(settings: RunbookSettings) -> None:
    for label, value in settings.secret_values().items():
        redaction.register_secret(value, label)


class StepContext:
    """One notebook step's state: settings, run directory, results and the confirmation gate."""

    def __init__(self, name: str, settings: RunbookSettings, run_dir: Path, confirm: bool | None, root: Path,
                 attempt: str | None = None):
        self.name = name
        self.settings = settings
        self.run_dir = run_dir
        self.confirm = confirm
        self.root = root
        self.results = StepResults(step=name, profile=settings.profile, attempt=attempt)
        self.gate: ConfirmationGate | None = None
        self.target_lock: Any = None  # the target's lock (core.locks), held from start_step to finish
        self.save()

    @property
    def profile(self) -> str:
        return self.settings.profile

    def save(self) -> Path:
        return self.results.save(self.run_dir)

    # -- outputs ------------------------------------------------------------------------------
    def publish(self, output: O) -> O:
        """Record (merge) the fields of a step output that are set, for later steps and the record."""
        self.results.values.update(output.values())
        self.save()
        return output

    def output_of(self, kind: type[O]) -> O:
        """What an earlier step handed on in this run directory (its typed output); ResultsError
        naming the step when it has not run here."""
        return kind.model_validate(StepResults.load(self.run_dir, kind.STEP).values)

    def output(self, kind: type[O]) -> O:
        """This step's own output so far, as `kind`."""
        return kind.model_validate(self.results.values)

    # -- checks -------------------------------------------------------------------------------
    def new_report(self) -> CheckReport:
        return CheckReport(step=self.name)

    def record_checks(self, report: CheckReport | list[Check]) -> CheckReport:
        """Record and show the checks; a failed check marks the step failed and raises ChecksFailed."""
        if not isinstance(report, CheckReport):
            report = CheckReport(step=self.name, checks=list(report))
        self.results.add_checks(report)
        self.save()
        show(report)
        if not report.ok:
            try:
                report.raise_for_failures()
            except RunbookError as exc:
                self.fail(exc)
                raise
        return report

    def record_failure(self, check: Check, exc: RunbookError) -> None:
        """Record and show a failed check and mark the step failed with `exc`'s message; the caller
        raises `exc`, so the cell ends with one clear message (cause and fix), not check ids."""
        report = CheckReport(step=self.name, checks=[check])
        self.results.add_checks(report)
        self.fail(exc)
        show(report)

    # -- confirmation -------------------------------------------------------------------------
    def confirm_plan(self, summary: str, plan: Any, *, interactive: bool | None = None) -> ConfirmationGate:
        """Show the plan behind a confirmation gate (see runbook_lib.notebook.gate). Headless without
        `confirm`, records the refusal (status `not_confirmed`) and raises NotConfirmed; with
        `confirm=False`, records `rejected` (the apply cell then raises)."""
        try:
            self.gate = ConfirmationGate.open(
                self.name, summary, plan, self.confirm, interactive=interactive, on_decision=self._record_decision
            )
        except RunbookError as exc:
            if self.results.gate is not None:  # refused headless: the plan is still shown, with the refusal
                show(ConfirmationGate(self.name, summary, plan, self.results.gate))
            self.fail(exc)
            raise
        show(self.gate)
        return self.gate

    def require_approved(self, plan: Any = None) -> None:
        """Before applying: raise NotConfirmed unless the gate approved (this very plan). The refusal
        is recorded: `rejected` when the plan was rejected, else `not_confirmed` (no plan shown, no
        decision yet, or the plan changed since it was approved)."""
        if self.gate is None:
            exc = NotConfirmed(f"step {self.name!r}: no plan was shown for confirmation; call confirm_plan first "
                               "(run the confirmation cell); nothing was applied")
            self._refuse("not_confirmed", exc)
            raise exc
        try:
            self.gate.require_approved(plan)
        except NotConfirmed as exc:
            decision = self.gate.decision
            changed = decision.decision == "approved"  # approved, but another plan
            self._refuse(("not_confirmed" if changed else refusal_status(decision)) or "not_confirmed", exc)
            raise
        if self.target_lock is None and read_only(self.name):  # a read-only step about to change something
            try:
                self.target_lock = hold_for_step(self.settings, self.name, self.run_dir)
            except RunbookError as exc:
                self._refuse("failed", exc)
                raise

    def _refuse(self, status: str, exc: BaseException) -> None:
        self.results.status = status  # type: ignore[assignment]
        self.results.error = str(exc)
        self.results.finished_at = now()
        self.save()

    def _record_decision(self, decision: GateDecision) -> None:
        """Every decision of the gate, as it is made: a refusal ends the step `rejected` /
        `not_confirmed`; an approval after a refusal (Approve clicked after Reject) resumes it."""
        self.results.add_decision(decision)
        refused = refusal_status(decision)
        if refused is not None:
            self.results.status = refused  # type: ignore[assignment]
            self.results.error = (f"step {self.name!r}: the plan was rejected ({decision.decided_by}); nothing was applied"
                                  if refused == "rejected" else
                                  f"step {self.name!r}: not confirmed ({decision.decided_by}): pass -p confirm true "
                                  "to apply this plan; nothing was applied")
            self.results.finished_at = decision.at
        elif decision.decision == "approved" and self.results.status in REFUSED:
            self.results.status, self.results.error, self.results.finished_at = "running", None, None
        self.save()

    # -- end ----------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Mark the step failed with `exc`'s message; a NotConfirmed marks it `not_confirmed`, or keeps
        the refusal the gate already recorded (`rejected`)."""
        if isinstance(exc, NotConfirmed):
            if self.results.status not in REFUSED:
                self.results.status = "not_confirmed"
        else:
            self.results.status = "failed"
        self.results.error = str(exc)
        self.results.finished_at = now()
        self.save()
        release_step_lock(self.target_lock)

    def finish(self) -> StepResults:
        """Mark the step passed (unless it already failed or its change was refused) and show its summary."""
        if self.results.status not in ("failed", *REFUSED):
            self.results.status = "passed"
        self.results.finished_at = now()
        self.save()
        release_step_lock(self.target_lock)
        show(self.results.report)
        return self.results


def read_only(step: str) -> bool:
    """Whether `step` changes nothing unless a gate approves (its output's READ_ONLY)."""
    return any(kind.STEP == step and kind.READ_ONLY for kind in _outputs())


def _outputs() -> list[type[StepOutput]]:
    found, todo = [], list(StepOutput.__subclasses__())
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return [k for k in found if "STEP" in k.__dict__ or hasattr(k, "STEP")]


def start_step(
    name: str,
    profile: str | None = "sandbox",
    confirm: Any = None,
    run_dir: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    install_hooks: bool = True,
) -> StepContext:
    """Load settings, set up redaction, start `<run_dir>/<name>.json`; see the module doc.

    A settings problem is recorded in the step's results (status failed) and raised.
    """
    check_step_name(name)
    root = project.project_root()
    confirm = parse_confirm(confirm)
    if install_hooks:
        redaction.install()
    env = os.environ if environ is None else environ
    profile_name = profile or env.get(PROFILE_ENV) or DEFAULT_PROFILE
    directory = resolve_run_dir(run_dir, profile_name, root)
    attempt = env.get(ATTEMPT_ENV) or None  # the runner's, for the results it collects
    try:
        settings = load_settings(profile_name, environ=environ, root=root, overrides=overrides)
    except RunbookError as exc:
        failed = StepResults(step=name, profile=profile_name, status="failed", error=str(exc), finished_at=now(),
                             attempt=attempt)
        failed.save(directory)
        raise
    register_settings_secrets(settings)
    try:  # one change at a time per target: the runner's lock (core.locks), also for JupyterLab
        lock = None if read_only(name) else hold_for_step(settings, name, directory, environ)
    except RunbookError as exc:
        StepResults(step=name, profile=profile_name, status="failed", error=str(exc), finished_at=now(),
                    attempt=attempt).save(directory)
        raise
    ctx = StepContext(name, settings, directory, confirm, root, attempt)
    ctx.target_lock = lock
    return ctx
