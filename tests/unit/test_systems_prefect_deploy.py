"""runbook_lib.systems.prefect_deploy without a Prefect server: the desired deployment's fields (pull
step of the branch or the pinned commit), the field-by-field diff with a live deployment
(`diff_fields`, `diff_table`), and what `.deploy()` failures are explained as."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.systems.prefect_deploy import (
    FIELDS,
    DeployError,
    DesiredDeployment,
    FieldChange,
    diff_fields,
    diff_table,
    explain_deploy_error,
    git_clone_step,
    live_fields,
    same,
)

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "https://github.com/bencrane/data-enrichment-orchestration-v1.git"
CLONE = "prefect.deployments.steps.git_clone"


def desired(**changes) -> DesiredDeployment:
    values = dict(
        name="data-enrichment-orchestrator", flow_name="orchestrator_main",
        entrypoint="src/orchestrator.py:orchestrator_main", repository=REPO, branch="main", commit_sha=SHA,
        pinned=False, work_pool_name="managed-production", work_pool_type="prefect:managed",
        job_variables={"pip_packages": ["psycopg2-binary", "modal"], "env": {"A": "1", "B": "2"}},
        parameters={"batch_size": 50}, tags=["production", "enrichment"], description="the orchestrator",
    )
    values.update(changes)
    return DesiredDeployment(**values)


def live_from(d: DesiredDeployment, **changes) -> SimpleNamespace:
    """A deployment as Prefect's client returns it (key order and list order as the server keeps them)."""
    values = dict(
        work_pool_name=d.work_pool_name, entrypoint=d.entrypoint, pull_steps=d.pull_steps(),
        job_variables={"env": {"B": "2", "A": "1"}, "pip_packages": list(d.job_variables["pip_packages"])},
        parameters=dict(d.parameters), tags=list(reversed(d.tags)), description=d.description, version=d.version,
    )
    values.update(changes)
    return SimpleNamespace(**values)


def test_the_desired_deployment_follows_the_branch_or_pins_the_commit():
    d = desired()
    assert d.full_name == "orchestrator_main/data-enrichment-orchestrator"
    assert d.version == SHA and d.ref == "branch main"
    assert d.pull_steps() == [{CLONE: {"repository": REPO, "branch": "main"}}]
    pinned = desired(pinned=True)
    assert pinned.ref == "commit 0123456789ab"
    assert git_clone_step(pinned.pull_steps()) == {"repository": REPO, "branch": None, "commit_sha": SHA}
    fields = d.fields()
    assert list(fields) == list(FIELDS) and fields["tags"] == ["enrichment", "production"]


def test_git_clone_step_finds_the_clone_among_the_pull_steps():
    steps = [{"prefect.deployments.steps.set_working_directory": {"directory": "/x"}},
             {"prefect.deployments.steps.git_clone": {"repository": REPO}}]
    assert git_clone_step(steps) == {"repository": REPO}
    assert git_clone_step([{"prefect.deployments.steps.git_clone": None}]) == {}
    assert git_clone_step(None) is None and git_clone_step([]) is None


def test_without_a_live_deployment_every_field_is_created():
    changes = diff_fields(desired().fields(), None)
    assert [c.field for c in changes] == list(FIELDS)
    assert {c.status for c in changes} == {"created"} and all(c.live is None for c in changes)
    assert changes[0].as_dict() == {"field": "work_pool_name", "status": "created", "live": None,
                                    "desired": "managed-production"}


def test_the_same_deployment_as_the_server_returns_it_is_unchanged():
    d = desired()
    live = live_fields(live_from(d))
    assert [(c.field, c.status) for c in diff_fields(d.fields(), live)] == [(f, "unchanged") for f in FIELDS]


def test_changed_fields_carry_both_values():
    d = desired()
    live = live_fields(live_from(d, work_pool_name="default-agent-pool", parameters={"batch_size": 25},
                                 version="f" * 40, pull_steps=desired(branch="old").pull_steps()))
    changes = {c.field: c for c in diff_fields(d.fields(), live)}
    assert sorted(f for f, c in changes.items() if c.status == "changed") == [
        "parameters", "pull_steps", "version", "work_pool_name"]
    assert (changes["parameters"].live, changes["parameters"].desired) == ({"batch_size": 25}, {"batch_size": 50})
    assert changes["work_pool_name"] == FieldChange("work_pool_name", "changed", "default-agent-pool",
                                                    "managed-production")


def test_a_live_deployment_with_empty_fields_reads_as_empty_values():
    live = live_fields(SimpleNamespace(work_pool_name="p", entrypoint="e", pull_steps=None, job_variables=None,
                                       parameters=None, tags=None, description=None, version=None))
    assert live == {"work_pool_name": "p", "entrypoint": "e", "pull_steps": [], "job_variables": {}, "parameters": {},
                    "tags": [], "description": None, "version": None}
    changes = {c.field: c.status for c in diff_fields(desired(job_variables={}, parameters={}).fields(), live)}
    assert changes["job_variables"] == changes["parameters"] == "unchanged"


def test_same_compares_as_json():
    assert same({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1})
    assert not same([1, 2], [2, 1]) and not same(1, "1") and same(None, None)


def test_the_diff_table_shows_status_badges_and_both_values():
    d = desired()
    changes = diff_fields(d.fields(), live_fields(live_from(d, tags=["old"])))
    table = diff_table("Deployment data-enrichment-orchestrator", changes)
    assert table.columns == ("Status", "Field", "Live", "Planned") and len(table.rows) == len(FIELDS)
    html = table._repr_html_()
    assert html.count('<span class="rb-badge rb-muted">unchanged</span>') == len(FIELDS) - 1
    assert html.count('<span class="rb-badge rb-warn">changed</span>') == 1
    assert '<td class="rb-pre">[\n &quot;old&quot;\n]</td>' in html
    text = str(table).splitlines()
    assert text[0] == "Deployment data-enrichment-orchestrator"
    assert "  changed | tags | [  \"old\" ] | [  \"enrichment\",  \"production\" ]" in text
    created = str(diff_table("new", diff_fields(d.fields(), None))).splitlines()
    assert created[1] == "  created | work_pool_name | — | managed-production"
    assert '<span class="rb-badge rb-ok">created</span>' in diff_table("new", diff_fields(d.fields(), None))._repr_html_()


# -- what a failed deploy is explained as ------------------------------------------------------------


def _status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://api.prefect.cloud/api/accounts/a/workspaces/w/deployments/")
    return httpx.HTTPStatusError(f"Client error '{status}'", request=request, response=httpx.Response(status, request=request))


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as raised:
        return raised


def test_a_missing_work_pool_says_how_to_create_it():
    err = explain_deploy_error(ValueError("Could not find work pool 'managed-production'."), desired())
    assert isinstance(err, DeployError)
    assert err.cause.startswith("work pool 'managed-production' does not exist in this workspace")
    assert "`prefect work-pool create managed-production --type prefect:managed`" in err.fix
    assert str(err) == f"{err.cause} Fix: {err.fix}"


def test_a_missing_entrypoint_names_the_repository_and_ref():
    from prefect.exceptions import MissingFlowError

    for exc in (FileNotFoundError("src/orchestrator.py"), MissingFlowError("flow not found")):
        err = explain_deploy_error(exc, desired(pinned=True))
        assert err.cause.startswith(f"entrypoint src/orchestrator.py:orchestrator_main was not found in {REPO} at "
                                    "commit 0123456789ab")
        assert err.fix.startswith("set source.entrypoint")


def test_a_failed_clone_points_at_the_repository_url():
    err = explain_deploy_error(RuntimeError("Failed to clone repository 'https://x/y' with exit code 128."), desired())
    assert err.cause.startswith("the source repository could not be cloned")
    assert f"check source.repo_url ({REPO}): it must end in .git" in err.fix and "branch main" in err.fix


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_found_through_the_cause_chain(status):
    err = explain_deploy_error(_raised_from(RuntimeError("deploy failed"), _status_error(status)), desired())
    assert err.cause == f"the Prefect API refused the API key ({status}): deploy failed"
    assert err.fix.startswith("set PREFECT_API_KEY to a valid key of this workspace")


def test_an_invalid_deployment_is_a_422_with_the_template_fix():
    for exc in (_status_error(422), RuntimeError("Validation failed for field 'job_variables'")):
        err = explain_deploy_error(exc, desired())
        assert err.cause.startswith("Prefect refused the deployment as invalid (422)")
        assert "base job template" in err.fix


def test_an_unreachable_api_and_anything_else():
    err = explain_deploy_error(httpx.ConnectError("connection refused"), desired())
    assert err.cause == "the Prefect API could not be reached: ConnectError: connection refused"
    assert err.fix == "check PREFECT_API_URL and the network, then re-run this step."
    other = explain_deploy_error(KeyError("x"), desired())
    assert other.cause == "KeyError: 'x'" and other.fix.startswith("read the cause above")
    empty = explain_deploy_error(ValueError(), desired())
    assert empty.cause == "ValueError: ValueError"


def test_the_explanation_is_masked():
    redaction.register_secret("pnu_deploysecret42", "PREFECT_API_KEY")
    err = explain_deploy_error(RuntimeError("Bearer pnu_deploysecret42 was sent"), desired())
    assert "pnu_deploysecret42" not in str(err) and "pnu_deploysecret42" not in err.cause
    assert "[redacted:PREFECT_API_KEY]" in err.cause or "Bearer ***" in err.cause
