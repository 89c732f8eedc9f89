"""What the end-to-end test launches and against which deployment.

The options are the profile's `[e2e]` settings with the notebook's parameters laid over them and
validated by the same model (`E2ESettings`): a bad parameter is refused naming it, before anything
is launched. The deployment the chain must start is the `deployment_id` parameter, else what step
03 handed on, else the profile's deployment looked up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ValidationError

from runbook_lib.core.errors import ParameterError, ResultsError, RunbookError
from runbook_lib.core.settings import E2ESettings, RunbookSettings
from runbook_lib.core.values import parse_uuid
from runbook_lib.records.outputs import DeployOutput
from runbook_lib.systems.prefect import PrefectApi

# notebook parameter -> setting of [e2e]
PARAMETERS = {
    "n_items": "item_count", "blueprint": "blueprint", "trigger_timeout": "trigger_timeout_seconds",
    "flow_run_timeout": "flow_run_timeout_seconds", "completion_timeout": "completion_timeout_seconds",
    "poll_interval": "poll_interval_seconds", "settle": "settle_seconds", "expect_completed": "expect_completed",
    "launch_mode": "launch_mode", "cleanup": "cleanup",
}
_SETTING_TO_PARAMETER = {v: k for k, v in PARAMETERS.items()}


class E2EError(RunbookError):
    """The end-to-end test cannot start (bad parameter, unknown deployment, missing test client)."""


class E2EOptions(E2ESettings):
    """The `[e2e]` settings of this run: the profile's, with the notebook's parameters laid over."""

    @classmethod
    def from_settings(cls, settings: RunbookSettings, **params: Any) -> "E2EOptions":
        """Validated options; a bad value raises E2EError naming the parameter (nothing is launched).
        A parameter that is None or empty keeps the profile's value."""
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise E2EError(f"unknown end-to-end test parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
        values = settings.e2e.model_dump()
        for name, value in params.items():
            if value in (None, "") or (name == "blueprint" and value == []):
                continue
            if name == "blueprint" and isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()]
            if name == "launch_mode" and isinstance(value, str):
                value = value.strip().lower()
            values[PARAMETERS[name]] = value
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = [_explain(err) for err in exc.errors()]
            raise E2EError("end-to-end test parameters are not usable: " + "; ".join(problems)
                           + "; nothing was launched") from None


def _explain(err: Any) -> str:
    field_name = str(err["loc"][0]) if err["loc"] else "?"
    name = _SETTING_TO_PARAMETER.get(field_name, field_name)
    given = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in ("greater_than", "greater_than_equal"):
        return f"{name} must be greater than {ctx.get('gt', ctx.get('ge'))}, got {given!r}"
    if kind in ("less_than", "less_than_equal"):
        return f"{name} must be at most {ctx.get('lt', ctx.get('le'))}, got {given!r}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{name} must be an integer, got {given!r}"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"{name} must be a finite number, got {given!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{name} must be true or false, got {given!r}"
    if kind == "literal_error":
        return f"{name} must be one of {ctx.get('expected')}, got {given!r}"
    if name == "blueprint":
        return f"blueprint must be a non-empty list of step slugs, got {given!r}"
    return f"{name}: {err['msg']} (got {given!r})"


def batch_items_for_test(batch_tag: str, count: int, launched_by: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The test batch's items: recognisable, fake companies and people (no real data). Their
    `original_data` carries the marker a later step 05 finds orphaned test batches by
    (`runbook_e2e: true`) and who launched the batch (`launched_by`: host, pid, how long the test
    may take, whether its rows are kept on purpose)."""
    marker: dict[str, Any] = {"runbook_e2e": True, "tag": batch_tag}
    if launched_by:
        marker["launched_by"] = launched_by
    return [
        {
            "company_name": f"Runbook E2E {batch_tag} #{i}",
            "company_domain": f"e2e-{batch_tag}-{i}.example.com",
            "person_first_name": "Test",
            "person_last_name": f"Item{i}",
            "person_title": "End-to-end test item",
            "original_data": {**marker, "index": i},
        }
        for i in range(1, count + 1)
    ]


@dataclass
class ExpectedDeployment:
    id: str
    name: str  # flow/deployment
    work_pool: str | None
    source: str  # where the id came from
    parameters: dict[str, Any] = field(default_factory=dict)


def resolve_deployment(settings: RunbookSettings, api: PrefectApi, *, deployment_id: Any = None,
                       previous: Callable[[], DeployOutput] | None = None) -> ExpectedDeployment:
    """The deployment the chain must start: the `deployment_id` parameter, else step 03's output
    (`previous()` returns it), else the profile's deployment looked up by name."""
    deploy_step = DeployOutput.STEP
    source = "the deployment_id parameter"
    if deployment_id in (None, "") and previous is not None:
        try:
            deployment_id = previous().deployment_id
            source = f"step {deploy_step}'s results"
        except ResultsError:
            deployment_id = None
    if deployment_id in (None, ""):
        name = settings.deployment.name
        found = [d for d in api.read_deployments_named(name) if d.work_pool_name == settings.deployment.work_pool]
        if not found:
            raise E2EError(
                f"no deployment named {name!r} on work pool {settings.deployment.work_pool!r} in this workspace: run "
                f"step {deploy_step} first (or pass -p deployment_id <uuid>); nothing was launched"
            )
        if len(found) > 1:
            raise E2EError(
                f"{len(found)} deployments are named {name!r} on pool {settings.deployment.work_pool!r} "
                f"({', '.join(str(d.id) for d in found)}): pass -p deployment_id <uuid>; nothing was launched"
            )
        deployment_id, source = found[0].id, f"the profile's deployment {name!r}, looked up by name"
    try:
        wanted = parse_uuid(deployment_id)
    except ParameterError as exc:
        raise E2EError(f"{exc}; nothing was launched") from None
    deployment = api.read_deployment_by_id(wanted)
    if deployment is None:
        raise E2EError(f"deployment {wanted} (from {source}) does not exist in this workspace: run step {deploy_step} "
                       "again, or pass the id it recorded; nothing was launched")
    return ExpectedDeployment(wanted, f"{api.read_flow_name(deployment)}/{deployment.name}", deployment.work_pool_name,
                              source, dict(deployment.parameters or {}))
