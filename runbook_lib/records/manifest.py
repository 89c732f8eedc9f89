"""The manifest of one runbook run, `outputs/<run-id>/manifest.json`: the run, each step's record
(status, timings, error, gate decision, checks, outputs), the attempts, the secret scan.

The manifest is rewritten (atomically, redacted) at every step start and end, so a run that is
killed leaves a manifest saying how far it got. The run's pages (`index.html`, each notebook as
HTML) are drawn by `runbook_lib.runner.index`; the scan is `runbook_lib.records.scan`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from runbook_lib.core.errors import RunbookError
from runbook_lib.core.secrets import redact_obj

MANIFEST = "manifest.json"

# `rejected` / `not_confirmed`: the step's confirmation gate refused its change (records.results);
# the run then stops there and takes that status (its exit code is non-zero).
StepStatus = Literal["passed", "failed", "rejected", "not_confirmed", "not_run", "running", "killed", "interrupted"]
RunStatus = Literal["running", "passed", "failed", "rejected", "not_confirmed", "killed", "interrupted"]


class StepRecord(BaseModel):
    """One notebook of the sequence: how it ended and what it produced."""

    step: str  # the notebook's name without .ipynb, e.g. "03_deploy"
    notebook: str  # the source notebook
    status: StepStatus = "not_run"
    output: str | None = None  # executed notebook, relative to the run directory
    html: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None
    error_type: str | None = None
    error: str | None = None
    gate: dict[str, Any] | None = None  # the confirmation gate's decision (GateDecision)
    results: dict[str, Any] = Field(default_factory=dict)  # StepResults.values (deployment id, digests, ...)
    checks: list[dict[str, Any]] = Field(default_factory=list)  # id, title, status of each check
    result_files: list[str] = Field(default_factory=list)  # the StepResults the notebook wrote
    earlier: bool = False  # passed in an earlier attempt of this run and not re-run
    pid: int | None = None  # the step's process while it runs
    # Seconds from started_at of the step process's phases (runner.step_process; negative: before the
    # step was due, while its process and kernel were prewarmed during the step before)
    phases: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class Attempt(BaseModel):
    """One invocation of the runner on this run directory (a resume with --from adds one)."""

    started_at: datetime
    ended_at: datetime | None = None
    status: RunStatus = "running"
    from_step: str | None = None
    only: str | None = None
    confirm: bool = False
    params: dict[str, Any] = Field(default_factory=dict)
    runner_pid: int


class SecretFinding(BaseModel):
    file: str
    secret: str  # the secret's NAME


class SecretScan(BaseModel):
    scanned_files: int
    secrets_known: list[str]  # names only
    findings: list[SecretFinding] = Field(default_factory=list)


class RunManifest(BaseModel):
    run_id: str
    profile: str
    status: RunStatus = "running"
    started_at: datetime
    ended_at: datetime | None = None
    duration_seconds: float | None = None
    confirm: bool = False
    params: dict[str, Any] = Field(default_factory=dict)
    from_step: str | None = None
    only: str | None = None
    cell_timeout_seconds: float | None = None
    runbook: dict[str, Any] = Field(default_factory=dict)  # commit, dirty, root
    host: str
    user: str
    versions: dict[str, str] = Field(default_factory=dict)
    runner_pid: int
    steps: list[StepRecord] = Field(default_factory=list)
    attempts: list[Attempt] = Field(default_factory=list)
    secret_scan: SecretScan | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)

    def step(self, name: str) -> StepRecord:
        for record in self.steps:
            if record.step == name:
                return record
        raise KeyError(name)

    def save(self, run_dir: Path) -> Path:
        """Write `<run_dir>/manifest.json` atomically, every string redacted."""
        path = Path(run_dir) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(redact_obj(self.model_dump(mode="json")), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "RunManifest":
        path = Path(run_dir) / MANIFEST
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise RunbookError(f"no run record {path}") from None
        except (ValidationError, ValueError) as exc:
            raise RunbookError(f"run record {path} is unreadable: {exc}") from None


def runs_of(outputs_dir: Path, profile: str) -> list[tuple[RunManifest, Path]]:
    """The runs of `profile` recorded under `outputs_dir` (manifest, run directory), newest first;
    an unreadable manifest is passed over."""
    runs = []
    for path in outputs_dir.glob("*/manifest.json"):
        try:
            m = RunManifest.model_validate_json(path.read_text())
        except ValueError:
            continue
        if m.profile == profile:
            runs.append((m, path.parent))
    return sorted(runs, key=lambda r: r[0].started_at, reverse=True)
