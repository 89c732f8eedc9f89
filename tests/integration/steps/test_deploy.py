"""Notebook 03 (deploy), against the sandbox: the real Prefect server behind the Cloud-shaped
gateway, the managed pool and its worker, the git server holding the orchestrator's repository.

Papermill runs the notebook for the paths a user takes (deploy, re-run with no changes, headless
without `confirm`, a plaintext secret in the job variables); the error paths run the same library
calls in-process with one setting changed. No test mocks a service: every failure is produced by
the real service (a missing pool, a missing file in the repository, a refused key, a 422).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from runbook_lib.checks.facts import plaintext_secrets
from runbook_lib.core.errors import ChecksFailed, NotConfirmed, RunbookError
from runbook_lib.core.profiles import load_settings
from runbook_lib.core.values import parse_flag
from runbook_lib.notebook.context import StepContext, start_step
from runbook_lib.steps import deploy
from runbook_lib.systems import prefect_deploy
from runbook_lib.systems.git import GitRepo
from runbook_sandbox import prefect_gateway
from tests.integration.git_helpers import git
from tests.integration.notebook_runs import assert_no_secrets, assert_no_secrets_under, run_notebook, secret_values

STEP = "03_deploy"
DEPLOYMENT = "data-enrichment-orchestrator"
FLOW = "orchestrator_main"


# -- helpers (also used by test_nb04_edge_secret) -----------------------------------------------------


def step_context(step: str, sandbox, run_dir: Path, overrides: dict[str, Any] | None = None,
                 confirm: Any = True) -> StepContext:
    """The notebook's first cell, in this process: settings from the test sandbox plus `overrides`."""
    return start_step(step, "sandbox", confirm=confirm, run_dir=run_dir, environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)},
                      overrides=overrides, install_hooks=False)


def settings_of(sandbox, overrides: dict[str, Any] | None = None):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)}, overrides=overrides)


def deploy_in_process(sandbox, run_dir: Path, overrides: dict[str, Any] | None = None, *, pin_commit: bool = False,
                      smoke: bool = False) -> tuple[StepContext, deploy.DeployPlan, str]:
    """Step 03's cells in order, confirmed."""
    ctx = step_context(STEP, sandbox, run_dir, overrides)
    step = deploy.Deploy(ctx, pin_commit=pin_commit, smoke_run=smoke)
    the_plan = step.plan()
    step.confirm(the_plan)
    deployment_id = step.apply(the_plan)
    step.verify(the_plan, deployment_id)
    step.smoke_run(the_plan, deployment_id)
    ctx.finish()
    return ctx, the_plan, deployment_id


def log_mark(sandbox, service: str) -> int:
    path = sandbox.request_log_path(service)
    return len(path.read_text().splitlines()) if path.exists() else 0


def requests_since(sandbox, service: str, mark: int) -> list[dict[str, Any]]:
    path = sandbox.request_log_path(service)
    return [json.loads(line) for line in path.read_text().splitlines()[mark:]] if path.exists() else []


def deployment_writes(entries: list[dict[str, Any]]) -> list[str]:
    """Writes to the gateway's deployment (and deployment automation) endpoints; reads by filter excluded."""
    out = []
    for e in entries:
        path = e["path"].split("/workspaces/", 1)[-1]
        rest = path.split("/", 1)[-1] if "/" in path else ""
        if e["method"] in ("POST", "PATCH", "PUT", "DELETE") and rest.startswith(("deployments", "automations")) \
                and not rest.endswith(("/filter", "/count", "/paginate")):
            out.append(f"{e['method']} {rest}")
    return out


def gateway(sandbox) -> httpx.Client:
    return prefect_gateway.api(sandbox)


def read_deployment(sandbox, flow: str, name: str) -> dict[str, Any] | None:
    with gateway(sandbox) as client:
        r = client.get(f"deployments/name/{flow}/{name}")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def branch_head(sandbox, branch: str = "main") -> str:
    with GitRepo(sandbox.repo_url) as git:
        sha = git.branch_sha(branch)
    assert sha
    return sha


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- papermill ---------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_deploy_then_rerun_reports_no_changes_without_api_writes(sandbox, sandbox_env, tmp_path):
    first = run_notebook(STEP, sandbox.state, tmp_path / "run1", {"confirm": True})
    assert first.error is None, first.error
    assert first.results["status"] == "passed"
    assert first.results["gate"] is None or first.results["gate"]["decision"] == "approved"
    values = first.results["values"]
    deployment_id = values["deployment_id"]
    uuid.UUID(deployment_id)
    assert values["flow_name"] == FLOW
    assert values["commit_sha"] == values["version"] == branch_head(sandbox)
    assert all(status in ("pass", "skip") for status in first.statuses().values()), first.statuses()
    assert first.check("smoke_run")["status"] == "skip"  # off by default

    stored = read_deployment(sandbox, FLOW, DEPLOYMENT)
    assert stored["id"] == deployment_id
    assert stored["work_pool_name"] == "managed-production"
    assert stored["entrypoint"] == "src/orchestrator.py:orchestrator_main"
    clone = stored["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == sandbox.repo_url and clone["repository"].endswith(".git")
    assert clone["branch"] == "main"
    assert stored["job_variables"]["pip_packages"] == ["psycopg2-binary", "modal", "python-dotenv"]
    assert stored["job_variables"]["env"]["MODAL_TOKEN_SECRET"] == "{{ prefect.blocks.secret.modal-token-secret }}"
    assert stored["parameters"] == {"batch_size": 50}
    assert sorted(stored["tags"]) == ["enrichment", "orchestrator", "production"]
    assert stored["version"] == values["commit_sha"]

    # Again, headless and without confirm: nothing to apply, so nothing to confirm, and no write.
    mark = log_mark(sandbox, "prefect")
    second = run_notebook(STEP, sandbox.state, tmp_path / "run2")
    assert second.error is None, second.error
    assert second.results["status"] == "passed"
    assert second.results["gate"] is None
    assert second.results["values"]["deployment_id"] == deployment_id
    assert second.results["values"]["no_changes"] is True and second.results["values"]["changed"] is False
    assert {d["status"] for d in second.results["values"]["diff"]} == {"unchanged"}
    assert "no changes" in second.check("deploy.apply")["detail"]
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []
    assert read_deployment(sandbox, FLOW, DEPLOYMENT)["updated"] == stored["updated"]

    secrets = secret_values(sandbox, sandbox_env)
    assert_no_secrets(first, secrets)
    assert_no_secrets(second, secrets)


@pytest.mark.timeout(300)
def test_headless_without_confirm_shows_the_plan_and_applies_nothing(sandbox, tmp_path):
    name = unique_name("runbook-test-unconfirmed")
    mark = log_mark(sandbox, "prefect")
    run = run_notebook(STEP, sandbox.state, tmp_path / "run", env={"RUNBOOK_DEPLOYMENT__NAME": name})
    assert run.error is not None and run.error.ename == "NotConfirmed"
    assert "pass -p confirm true" in run.error.evalue
    assert run.results["status"] == "not_confirmed"
    assert run.results["gate"]["decision"] == "rejected" and run.results["gate"]["mode"] == "headless"
    assert {d["status"] for d in run.results["values"]["diff"]} == {"created"}
    assert "deployment_id" not in run.results["values"]
    executed = run.notebook.read_text()
    assert "Plan for step 03_deploy" in executed and name in executed  # the plan was shown
    assert read_deployment(sandbox, FLOW, name) is None
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []


@pytest.mark.timeout(300)
def test_plaintext_secret_in_job_variables_fails_before_anything_is_applied(sandbox, sandbox_env, tmp_path):
    name = unique_name("runbook-test-plaintext")
    literal = "as-" + uuid.uuid4().hex  # shaped like a Modal token secret, known to no setting
    env_table = {
        "MODAL_TOKEN_ID": "{{ prefect.blocks.secret.modal-token-id }}",
        "MODAL_TOKEN_SECRET": literal,
    }
    mark = log_mark(sandbox, "prefect")
    run = run_notebook(STEP, sandbox.state, tmp_path / "run", {"confirm": True},
                       env={"RUNBOOK_DEPLOYMENT__NAME": name, "RUNBOOK_DEPLOYMENT__ENV": json.dumps(env_table)})
    assert run.error is not None and run.error.ename == "ChecksFailed"
    check = run.check("job_variables.secrets")
    assert check["status"] == "fail"
    assert "job_variables.env.MODAL_TOKEN_SECRET" in check["detail"]
    assert "prefect.blocks.secret" in check["remediation"]
    assert "deploy.apply" not in run.statuses()
    assert read_deployment(sandbox, FLOW, name) is None
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []
    assert_no_secrets(run, {"the plaintext literal": literal, **secret_values(sandbox, sandbox_env)})


# -- in-process: the plan's checks -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_url_without_dot_git_is_normalised_with_a_warning_and_a_pinned_commit(sandbox, tmp_path):
    name = unique_name("runbook-test-nogit")
    overrides = {"source.repo_url": sandbox.repo_url.removesuffix(".git"), "deployment.name": name}
    ctx, the_plan, deployment_id = deploy_in_process(sandbox, tmp_path / "run1", overrides, pin_commit=True)
    checks = {c.id: c for c in ctx.results.checks}
    assert checks["source.repo_url"].status.value == "warn"
    assert sandbox.repo_url in checks["source.repo_url"].detail and checks["source.repo_url"].remediation
    assert ctx.results.status == "passed"
    head = branch_head(sandbox)
    stored = read_deployment(sandbox, FLOW, name)
    assert stored["id"] == deployment_id
    clone = stored["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == sandbox.repo_url  # normalised: ends in .git
    assert clone["commit_sha"] == head and not clone.get("branch")
    assert stored["version"] == head
    assert checks["verify.pull_step"].status.value == "pass"

    # Re-planned with the same settings: nothing differs.
    again, _ = deploy.build_plan(settings_of(sandbox, overrides), pin_commit=True)
    assert again.no_changes and again.live_id == deployment_id


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["missing_pool", "missing_entrypoint", "entrypoint_not_a_flow"])
def test_plan_failures_name_the_cause_and_apply_nothing(case, sandbox, tmp_path):
    name = unique_name(f"runbook-test-{case.replace('_', '-')}")
    overrides = {"deployment.name": name}
    expected_check = {
        "missing_pool": ("prefect.work_pool", "prefect work-pool create no-such-pool"),
        "missing_entrypoint": ("source.entrypoint_file", "source.entrypoint"),
        "entrypoint_not_a_flow": ("source.flow_function", "source.entrypoint"),
    }[case]
    if case == "missing_pool":
        overrides["deployment.work_pool"] = "no-such-pool"
    elif case == "missing_entrypoint":
        overrides["source.entrypoint"] = "src/missing.py:orchestrator_main"
    else:
        overrides["source.entrypoint"] = "src/orchestrator.py:connect"
    ctx = step_context(STEP, sandbox, tmp_path / "run", overrides)
    mark = log_mark(sandbox, "prefect")
    with pytest.raises(ChecksFailed) as failed:
        deploy.Deploy(ctx).plan()
    check_id, remedy = expected_check
    assert failed.value.failed == [check_id]
    check = next(c for c in ctx.results.checks if c.id == check_id)
    assert check.status.value == "fail" and remedy in check.remediation
    saved = json.loads((tmp_path / "run" / f"{STEP}.json").read_text())
    assert saved["status"] == "failed" and check_id in saved["error"]
    assert read_deployment(sandbox, FLOW, name) is None
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []


@pytest.mark.timeout(300)
def test_wrong_work_pool_type_fails_the_plan(sandbox, tmp_path):
    pool = unique_name("runbook-test-process-pool")
    with gateway(sandbox) as client:
        client.post("work_pools/", json={"name": pool, "type": "process"}).raise_for_status()
        try:
            ctx = step_context(STEP, sandbox, tmp_path / "run", {"deployment.work_pool": pool,
                                                                  "deployment.name": unique_name("runbook-test-pool")})
            with pytest.raises(ChecksFailed) as failed:
                deploy.Deploy(ctx).plan()
        finally:
            client.delete(f"work_pools/{pool}").raise_for_status()
    assert failed.value.failed == ["prefect.work_pool_type"]
    check = next(c for c in ctx.results.checks if c.id == "prefect.work_pool_type")
    assert "'process'" in check.detail and "prefect:managed" in check.remediation


# -- in-process: deploy errors from the real services, translated ------------------------------------


@pytest.fixture
def desired(sandbox) -> prefect_deploy.DesiredDeployment:
    the_plan, report = deploy.build_plan(settings_of(sandbox, {"deployment.name": unique_name("runbook-test-err")}))
    assert report.ok, report.summary_line()
    return the_plan.desired


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["missing_pool", "missing_entrypoint", "bad_url", "bad_key", "schema_422"])
def test_deploy_errors_become_one_message_with_cause_and_fix(case, sandbox, desired):
    settings = settings_of(sandbox)
    broken = desired
    if case == "missing_pool":
        broken = replace(desired, work_pool_name="no-such-pool")
        cause, fix = "work pool 'no-such-pool' does not exist", "prefect work-pool create no-such-pool --type prefect:managed"
    elif case == "missing_entrypoint":
        broken = replace(desired, entrypoint="src/missing.py:orchestrator_main")
        cause, fix = "entrypoint src/missing.py:orchestrator_main was not found", "source.entrypoint"
    elif case == "bad_url":
        broken = replace(desired, repository=sandbox.repo_url.replace("orchestration-v1", "no-such-repo"))
        cause, fix = "could not be cloned", "source.repo_url"
    elif case == "bad_key":
        settings = settings_of(sandbox, {"prefect.api_key": "pnu_" + "0" * 36})
        cause, fix = "refused the API key (401)", "PREFECT_API_KEY"
    else:
        broken = replace(desired, job_variables={**desired.job_variables, "pip_packages": "psycopg2-binary"})
        cause, fix = "422", "pip_packages"
    with pytest.raises(prefect_deploy.DeployError) as err:
        prefect_deploy.deploy_flow(settings, broken)
    assert cause in err.value.cause, err.value.cause
    assert fix in err.value.fix, err.value.fix
    assert "Fix:" in str(err.value)
    assert read_deployment(sandbox, FLOW, desired.name) is None


# -- smoke run ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_run_completes_and_a_failing_run_shows_its_logs(sandbox, tmp_path):
    """The orchestrator of feature/secret-blocks, deployed under its own name: one flow run on the
    managed pool completes; with its Secret block gone, the next one fails and the check shows why."""
    # batch_id (a parameter of this repository's orchestrator) names no batch: the run touches no item
    # that other tests may have left PENDING.
    overrides = {"deployment.name": unique_name("runbook-test-smoke"), "source.branch": "feature/secret-blocks",
                 "deployment.parameters": {"batch_size": 50, "batch_id": str(uuid.uuid4())}}
    ctx, _, deployment_id = deploy_in_process(sandbox, tmp_path / "run1", overrides, smoke=True)
    smoke = next(c for c in ctx.results.checks if c.id == "smoke_run")
    assert smoke.status.value == "pass", smoke.detail
    assert "COMPLETED" in smoke.detail

    ctx = step_context(STEP, sandbox, tmp_path / "run2", overrides)
    step = deploy.Deploy(ctx, smoke_run=True)
    the_plan = step.plan()
    step.confirm(the_plan)  # no changes, but the smoke run is approved with the plan
    with gateway(sandbox) as client:
        block = client.get("block_types/slug/secret/block_documents/name/postgres-connection-string")
        block.raise_for_status()
        client.delete(f"block_documents/{block.json()['id']}").raise_for_status()
        try:
            with pytest.raises(ChecksFailed):
                step.smoke_run(the_plan, deployment_id)
        finally:
            prefect_gateway.ensure_secret_blocks(sandbox)
    smoke = next(c for c in ctx.results.checks if c.id == "smoke_run")
    assert smoke.status.value == "fail"
    assert "FAILED" in smoke.detail and "postgres-connection-string" in smoke.detail
    assert "last log lines" in smoke.detail
    assert smoke.remediation


# -- the live deployment: masked, re-read before apply; the smoke run behind the gate --------------------


def patch_deployment(sandbox, deployment_id: str, **fields: Any) -> None:
    """Change the live deployment through Prefect's API, as someone in the UI would."""
    with gateway(sandbox) as client:
        client.patch(f"deployments/{deployment_id}", json=fields).raise_for_status()


@pytest.mark.timeout(420)
def test_a_plaintext_secret_in_the_live_deployment_is_masked_everywhere_and_fails_its_check(sandbox, sandbox_env,
                                                                                               tmp_path):
    name = unique_name("runbook-test-live-secret")
    _, _, deployment_id = deploy_in_process(sandbox, tmp_path / "deploy", {"deployment.name": name})
    literal = "as-" + uuid.uuid4().hex  # shaped like a Modal token secret, known to no setting
    stored = read_deployment(sandbox, FLOW, name)
    env = dict(stored["job_variables"]["env"], MODAL_TOKEN_SECRET=literal, MODAL_TOKEN_ID=sandbox_env["MODAL_TOKEN_ID"])
    patch_deployment(sandbox, deployment_id, job_variables=dict(stored["job_variables"], env=env))

    run_dir = tmp_path / "run"
    run = run_notebook(STEP, sandbox.state, run_dir, {"confirm": True}, env={"RUNBOOK_DEPLOYMENT__NAME": name})
    assert run.error is not None and run.error.ename == "ChecksFailed"
    live = run.check("deployment.live_plaintext_secrets")
    assert live["status"] == "fail" and "job_variables.env.MODAL_TOKEN_SECRET" in live["detail"]
    assert "rotate" in live["remediation"]
    job_variables = next(d for d in run.values["diff"] if d["field"] == "job_variables")
    assert job_variables["status"] == "changed"
    assert job_variables["live"]["env"]["MODAL_TOKEN_SECRET"] == "[plaintext secret withheld]"
    assert run.results["status"] == "failed"
    # The deploy replaced the plaintext with the placeholder; the step still fails (rotate it).
    fixed = read_deployment(sandbox, FLOW, name)
    assert fixed["id"] == deployment_id
    assert fixed["job_variables"]["env"]["MODAL_TOKEN_SECRET"] == "{{ prefect.blocks.secret.modal-token-secret }}"
    assert run.check("verify.no_plaintext_secrets")["status"] == "pass"
    assert_no_secrets_under(run_dir, {"the live plaintext": literal, **secret_values(sandbox, sandbox_env)})


@pytest.mark.timeout(300)
def test_the_smoke_run_is_not_started_without_approval(sandbox, tmp_path):
    """With nothing to deploy, the smoke run is still a change (in production a flow run dispatches
    every PENDING item): it is part of the plan, behind the gate; headless without confirm, no flow run."""
    name = unique_name("runbook-test-smoke-gate")
    _, _, deployment_id = deploy_in_process(sandbox, tmp_path / "deploy", {"deployment.name": name})
    ctx = step_context(STEP, sandbox, tmp_path / "run", {"deployment.name": name}, confirm=None)
    step = deploy.Deploy(ctx, smoke_run=True)
    the_plan = step.plan()
    assert the_plan.no_changes and the_plan.nothing_to_apply is None
    assert the_plan.gate_plan()["smoke_run"] is True and "flow run" in the_plan.summary()
    mark = log_mark(sandbox, "prefect")
    with pytest.raises(NotConfirmed):
        step.confirm(the_plan)
    with pytest.raises(NotConfirmed):
        step.apply(the_plan)
    with pytest.raises(NotConfirmed):
        step.smoke_run(the_plan, deployment_id)
    started = [e for e in requests_since(sandbox, "prefect", mark) if e["path"].endswith("/create_flow_run")]
    assert started == []
    with gateway(sandbox) as client:
        runs = client.post("flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
        runs.raise_for_status()
    assert runs.json() == []
    assert ctx.results.status == "not_confirmed" and "smoke_run" not in {c.id for c in ctx.results.checks}


@pytest.mark.timeout(300)
def test_a_deployment_changed_after_the_plan_refuses_the_apply(sandbox, tmp_path):
    name = unique_name("runbook-test-stale-live")
    _, _, deployment_id = deploy_in_process(sandbox, tmp_path / "deploy", {"deployment.name": name})
    overrides = {"deployment.name": name, "deployment.parameters": {"batch_size": 25}}
    ctx = step_context(STEP, sandbox, tmp_path / "run", overrides)
    step = deploy.Deploy(ctx)
    the_plan = step.plan()
    assert [c["field"] for c in the_plan.gate_plan()["changes"]] == ["parameters"]
    step.confirm(the_plan)
    patch_deployment(sandbox, deployment_id, description="edited in the UI after the plan was shown")
    changed = read_deployment(sandbox, FLOW, name)
    mark = log_mark(sandbox, "prefect")
    with pytest.raises(RunbookError, match="the live state changed since the plan was shown"):
        step.apply(the_plan)
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []
    after = read_deployment(sandbox, FLOW, name)
    assert after["updated"] == changed["updated"] and after["parameters"] == {"batch_size": 50}
    saved = json.loads((tmp_path / "run" / f"{STEP}.json").read_text())
    assert saved["status"] == "failed" and "the live state changed since the plan was shown" in saved["error"]
    assert next(c for c in saved["checks"] if c["id"] == "deploy.apply")["status"] == "fail"


def push_over_http(sandbox, work: Path, refspec: str) -> None:
    """git push to the sandbox's git server over smart HTTP, with the token as GitHub takes it."""
    import base64

    basic = base64.b64encode(f"x-access-token:{sandbox.git.token}".encode()).decode()
    git("-c", f"http.extraHeader=Authorization: Basic {basic}", "push", "-q", sandbox.repo_url, refspec, cwd=work)


@pytest.mark.timeout(400)
def test_a_branch_pushed_after_the_plan_refuses_the_apply_and_deploys_nothing(sandbox, tmp_path):
    branch = unique_name("runbook-test-stale-branch")
    work = tmp_path / "work"
    git("clone", "-q", sandbox.repo_url, str(work), cwd=tmp_path)
    push_over_http(sandbox, work, f"HEAD:refs/heads/{branch}")
    try:
        name = unique_name("runbook-test-stale-head")
        ctx = step_context(STEP, sandbox, tmp_path / "run", {"deployment.name": name, "source.branch": branch})
        step = deploy.Deploy(ctx)
        the_plan = step.plan()
        planned = the_plan.desired.commit_sha
        step.confirm(the_plan)
        (work / "NOTES.md").write_text("pushed after the plan was shown\n")
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "A commit after the plan", cwd=work)
        push_over_http(sandbox, work, f"HEAD:refs/heads/{branch}")
        assert branch_head(sandbox, branch) != planned
        mark = log_mark(sandbox, "prefect")
        with pytest.raises(RunbookError, match="the live state changed since the plan was shown") as refused:
            step.apply(the_plan)
        assert planned[:12] in str(refused.value)
        assert read_deployment(sandbox, FLOW, name) is None
        assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []
    finally:
        push_over_http(sandbox, work, f":refs/heads/{branch}")


@pytest.mark.timeout(300)
def test_deploy_flow_deploys_exactly_the_planned_commit_or_refuses(sandbox, desired):
    """The last guard: the clone `.deploy()` loads the flow from must be at the planned commit (the
    branch could move between the re-read and the clone)."""
    moved = replace(desired, commit_sha="0" * 40)  # a plan made at another commit than the branch's head
    mark = log_mark(sandbox, "prefect")
    with pytest.raises(prefect_deploy.DeployError, match="the live state changed since the plan was shown"):
        prefect_deploy.deploy_flow(settings_of(sandbox), moved)
    assert read_deployment(sandbox, FLOW, desired.name) is None
    assert deployment_writes(requests_since(sandbox, "prefect", mark)) == []


# -- pure functions ----------------------------------------------------------------------------------


def test_plaintext_secret_detection_names_paths_never_values():
    job_variables = {
        "pip_packages": ["modal"],
        "env": {
            "MODAL_TOKEN_ID": "{{ prefect.blocks.secret.modal-token-id }}",
            "API_TOKEN": "literal-token-value",
            "DSN_URL": "postgresql://app:hunter2hunter2@db.example.com/app",
            "KNOWN": "prefix-known-secret-value",
            "PLAIN": "https://example.com/hook",
        },
    }
    found = dict(plaintext_secrets(job_variables, {"SOME_KEY": "known-secret-value"}))
    assert set(found) == {"job_variables.env.API_TOKEN", "job_variables.env.DSN_URL", "job_variables.env.KNOWN"}
    assert "SOME_KEY" in found["job_variables.env.KNOWN"]
    assert "password" in found["job_variables.env.DSN_URL"]
    assert not any(v in text for text in found.values() for v in ("literal-token-value", "hunter2", "known-secret-value"))


def test_diff_reports_created_changed_and_unchanged_fields():
    desired = {f: f"want-{f}" for f in prefect_deploy.FIELDS}
    assert {c.status for c in prefect_deploy.diff_fields(desired, None)} == {"created"}
    live = dict(desired, tags="other")
    changes = {c.field: c.status for c in prefect_deploy.diff_fields(desired, live)}
    assert changes.pop("tags") == "changed"
    assert set(changes.values()) == {"unchanged"}


def test_flag_parameters_accept_text_and_refuse_anything_else():
    assert parse_flag("smoke_run", "true") is True and parse_flag("smoke_run", "False") is False
    assert parse_flag("smoke_run", None) is None and parse_flag("smoke_run", "null") is None
    with pytest.raises(RunbookError, match="smoke_run must be true or false"):
        parse_flag("smoke_run", "sometimes")


def test_headless_gate_refuses_before_apply(sandbox, tmp_path):
    """The gate alone: a plan with changes, no confirm, headless -> NotConfirmed, decision recorded."""
    ctx = step_context(STEP, sandbox, tmp_path / "run", {"deployment.name": unique_name("runbook-test-gate")}, confirm=None)
    step = deploy.Deploy(ctx)
    the_plan = step.plan()
    with pytest.raises(NotConfirmed):
        step.confirm(the_plan)
    assert ctx.results.gate.decision == "rejected"
    with pytest.raises(RunbookError, match="no plan was shown"):
        step.apply(the_plan)
    assert read_deployment(sandbox, FLOW, the_plan.desired.name) is None
