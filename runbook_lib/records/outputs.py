"""What each step hands on: one typed output per step, the step's name with it.

A step fills its output as it goes (`ctx.publish(DeployOutput(deployment_id=...))`), so a step that
fails half-way still records what it knew. The output is written in the step's results
(`<run_dir>/<step>.json`, key `values`, as the run's manifest shows it); a later step asks for it
by type (`ctx.output_of(DeployOutput)`), never by file name or string key. Unknown keys in a
results file are ignored when read, so an older record still loads.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from runbook_lib.core.errors import ParameterError
from runbook_lib.core.values import parse_uuid


def _uuid_or_none(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return parse_uuid(value)
    except ParameterError as exc:
        raise ValueError(str(exc)) from None


class StepOutput(BaseModel):
    """Base of the step outputs; `STEP` is the step's name (its notebook's stem)."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    STEP: ClassVar[str]
    # A read-only step changes nothing unless one of its gates approves a change: it takes the
    # target's lock (core.locks) only then, so it can run beside a run that is changing the target.
    READ_ONLY: ClassVar[bool] = False

    def values(self) -> dict[str, Any]:
        """The fields that are set, as JSON values (what the step's results record)."""
        return self.model_dump(mode="json", exclude_none=True)


class PrerequisitesOutput(StepOutput):
    STEP: ClassVar[str] = "01_verify_prerequisites"
    READ_ONLY: ClassVar[bool] = True
    trigger_function: str | None = None
    trigger_function_digest: str | None = None  # sha256 of its source: the health check's baseline


class MergeOutput(StepOutput):
    STEP: ClassVar[str] = "02_merge_check"
    before: dict[str, Any] | None = None  # the branches as they stood
    action: str | None = None  # "none: already merged", "fast-forward", "merge commit"
    pushed_sha: str | None = None
    after: dict[str, Any] | None = None


class DeployOutput(StepOutput):
    STEP: ClassVar[str] = "03_deploy"
    deployment_id: str | None = None
    flow_name: str | None = None
    deployment_name: str | None = None  # flow/deployment
    commit_sha: str | None = None
    branch: str | None = None
    pinned: bool | None = None
    version: str | None = None
    repository: str | None = None
    diff: list[dict[str, Any]] | None = None
    no_changes: bool | None = None
    changed: bool | None = None

    _id = field_validator("deployment_id", mode="before")(_uuid_or_none)


class EdgeSecretOutput(StepOutput):
    STEP: ClassVar[str] = "04_update_edge_function_secret"
    secret_name: str | None = None
    rollback: bool | None = None
    deployment_id: str | None = None
    new_digest: str | None = None
    previous_digest: str | None = None
    previous_deployment_id: str | None = None
    no_change: bool | None = None
    retries: int | None = None
    changed: bool | None = None
    change_id: str | None = None  # the change's entry in the history, written ahead of the upsert
    change_status: str | None = None  # pending (written ahead), applied, not_applied

    _ids = field_validator("deployment_id", "previous_deployment_id", mode="before")(_uuid_or_none)


class E2EOutput(StepOutput):
    STEP: ClassVar[str] = "05_end_to_end_test"
    deployment_id: str | None = None
    deployment_source: str | None = None
    deployment_name: str | None = None
    batch_id: str | None = None
    flow_run_id: str | None = None
    launch_mode: str | None = None
    item_count: int | None = None
    latencies_ms: dict[str, float | None] | None = None
    link_elapsed_ms: dict[str, float | None] | None = None
    item_state_counts: dict[str, int] | None = None
    timeline: dict[str, float | None] | None = None  # ms offsets from the launch
    failed_link: str | None = None
    stuck_items: list[dict[str, Any]] | None = None
    cleaned_up: bool | None = None
    orphans_deleted: list[str] | None = None  # test batches earlier runs left behind, deleted before the launch
    timeline_figure: str | None = None

    _id = field_validator("deployment_id", mode="before")(_uuid_or_none)


class FallbackOutput(StepOutput):
    STEP: ClassVar[str] = "fallback_process_pool"
    managed_deployment_name: str | None = None
    managed_work_pool: str | None = None
    flow_name: str | None = None
    commit_sha: str | None = None
    work_pool: str | None = None
    fallback_deployment_id: str | None = None
    worker_command: str | None = None
    worker_pid_file: str | None = None
    service_files: list[str] | None = None
    switch_back_command: str | None = None

    _id = field_validator("fallback_deployment_id", mode="before")(_uuid_or_none)


class HealthOutput(StepOutput):
    STEP: ClassVar[str] = "06_health_check"
    READ_ONLY: ClassVar[bool] = True
    verdict: str | None = None  # ok | drift | fail
    exit_code: int | None = None  # 0 | 1 | 2
    baseline: dict[str, Any] | None = None  # where the compared values came from (a run, or the profile)
    counts: dict[str, int] | None = None  # checks by status
    findings: list[dict[str, Any]] | None = None  # id, status, detail, remediation of each non-pass
    stuck_queued: int | None = None
    requeue_plan: list[dict[str, Any]] | None = None  # the states requeue_stuck would reset
    requeued: list[dict[str, Any]] | None = None  # the states it reset
    requeue_flow_run_id: str | None = None  # the flow run the Edge Function started for them
    record_dir: str | None = None
