"""Step results: what each notebook decided, checked and produced, as JSON in the run directory.

`<run_dir>/<step>.json` holds one `StepResults` (status, checks, the confirmation gate's latest
decision and, in `gates`, every decision of every gate of the step in order, values such as
`deployment_id`). Later steps and the runner read earlier ones by step name.
Everything written is redacted first.

A step's status: `running`, then `passed` or `failed`; or, when its confirmation gate refused the
change, `rejected` (a person clicked Reject, or `confirm=False`) or `not_confirmed` (headless
without `confirm`, or the apply cell reached without an approval). Nothing was applied in either.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from runbook_lib.checks.base import Check, CheckReport
from runbook_lib.core.errors import ResultsError
from runbook_lib.core.secrets import redact_obj

_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Set by the runner in each step's process: which attempt of which step wrote a results file, so that
# the runner claims the results its step's notebook wrote, whatever the clocks say.
ATTEMPT_ENV = "RUNBOOK_STEP_ATTEMPT"


def now() -> datetime:
    return datetime.now(timezone.utc)


def check_step_name(step: str) -> str:
    if not isinstance(step, str) or not _STEP_NAME.match(step) or ".." in step:
        raise ResultsError(f"step name {step!r} is not valid (letters, digits, '_', '-', '.')")
    return step


class GateDecision(BaseModel):
    """The confirmation gate's outcome: approved, rejected or pending, who/what decided, for which plan."""

    decision: Literal["approved", "rejected", "pending"]
    decided_by: str
    mode: Literal["parameter", "widget", "headless"]
    at: datetime = Field(default_factory=now)
    plan_digest: str
    summary: str = ""


StepStatus = Literal["running", "passed", "failed", "rejected", "not_confirmed"]
# The statuses of a step whose confirmation gate refused its change (nothing was applied).
REFUSED: tuple[str, ...] = ("rejected", "not_confirmed")


def refusal_status(decision: "GateDecision") -> str | None:
    """The step status a gate decision imposes: `rejected` when a person or `confirm=False` refused
    the plan, `not_confirmed` when nobody could (headless without `confirm`); None otherwise."""
    if decision.decision != "rejected":
        return None
    return "not_confirmed" if decision.mode == "headless" else "rejected"


class StepResults(BaseModel):
    step: str
    profile: str
    status: StepStatus = "running"
    started_at: datetime = Field(default_factory=now)
    finished_at: datetime | None = None
    checks: list[Check] = Field(default_factory=list)
    gate: GateDecision | None = None  # the latest decision
    gates: list[GateDecision] = Field(default_factory=list)  # every decision of every gate, in order
    values: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    # The runner's step attempt whose process wrote this (start_step reads it from ATTEMPT_ENV); None
    # when no runner ran the notebook (JupyterLab, papermill by hand).
    attempt: str | None = None

    @staticmethod
    def path(run_dir: Path, step: str) -> Path:
        return Path(run_dir) / f"{check_step_name(step)}.json"

    def add_decision(self, decision: GateDecision) -> None:
        """A gate's decision: the latest one (`gate`), appended to every earlier one (`gates`)."""
        self.gate = decision
        self.gates.append(decision)

    def add_checks(self, report: CheckReport) -> None:
        known = {c.id for c in self.checks}
        self.checks.extend(c for c in report.checks if c.id not in known)

    @property
    def refused(self) -> bool:
        """The confirmation gate refused the step's change (rejected / not confirmed)."""
        return self.status in REFUSED

    @property
    def report(self) -> CheckReport:
        return CheckReport(step=self.step, checks=list(self.checks))

    def value(self, key: str) -> Any:
        if key not in self.values:
            raise ResultsError(f"step {self.step!r} recorded no value {key!r} (it has: {sorted(self.values) or 'none'})")
        return self.values[key]

    def save(self, run_dir: Path) -> Path:
        """Write (atomically, redacted) to `<run_dir>/<step>.json`."""
        path = self.path(run_dir, self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(redact_obj(self.model_dump(mode="json")), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: Path, step: str) -> "StepResults":
        """The results step `step` wrote in `run_dir`; a clear error when there are none."""
        path = cls.path(run_dir, step)
        if not path.is_file():
            raise ResultsError(
                f"no results of step {step!r} in {run_dir}: run that step first, with the same run_dir"
            )
        try:
            return cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ResultsError(f"results of step {step!r} in {path} are unreadable: {exc}") from None


def list_results(run_dir: Path) -> list[StepResults]:
    """Every step's results in `run_dir`, oldest first."""
    found = []
    for path in Path(run_dir).glob("*.json"):
        try:
            found.append(StepResults.model_validate_json(path.read_text()))
        except (ValidationError, ValueError):
            continue  # not a step result file
    return sorted(found, key=lambda r: r.started_at)
