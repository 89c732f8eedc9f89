"""runbook_lib.notebook.context: a step's context records its results and typed outputs, later steps read them by type, failures and gate decisions are recorded, and a real kernel run masks secrets and fails closed."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from runbook_lib.checks.base import Check
from runbook_lib.core.errors import (
    ChecksFailed,
    NotConfirmed,
    ResultsError,
    SettingsError,
)
from runbook_lib.records.results import StepResults

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_start_step_records_typed_outputs_and_later_steps_read_them_by_type(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step
    from runbook_lib.records.outputs import DeployOutput, E2EOutput, EdgeSecretOutput

    run_dir = tmp_path / "run"
    deployment_id = "0F9D2C1E-0000-4000-8000-0000000000AB"
    ctx = start_step(DeployOutput.STEP, profile="sandbox", run_dir=run_dir, environ=sandbox_environ, install_hooks=False)
    ctx.publish(DeployOutput(deployment_id=deployment_id))
    ctx.publish(DeployOutput(flow_name="key pnu_sandboxkey0123456789"))  # secrets are registered: masked on disk
    ctx.finish()
    on_disk = json.loads((run_dir / "03_deploy.json").read_text())
    assert on_disk["status"] == "passed" and on_disk["values"]["deployment_id"] == deployment_id.lower()
    assert "pnu_sandboxkey0123456789" not in (run_dir / "03_deploy.json").read_text()
    later = start_step(EdgeSecretOutput.STEP, profile="sandbox", confirm="true", run_dir=run_dir, environ=sandbox_environ,
                       install_hooks=False)
    deployed = later.output_of(DeployOutput)
    assert isinstance(deployed, DeployOutput) and deployed.deployment_id == deployment_id.lower()
    assert deployed.commit_sha is None  # not recorded: None, never a KeyError
    with pytest.raises(ResultsError, match="no results of step '05_end_to_end_test' .* run that step first"):
        later.output_of(E2EOutput)
    with pytest.raises(ValueError, match="is not a UUID"):
        DeployOutput(deployment_id="not-a-uuid")

def test_failing_checks_fail_the_step_and_the_gate_decision_is_recorded(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("deploy", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    with pytest.raises(NotConfirmed):
        ctx.confirm_plan("deploy orchestrator", {"pool": "managed-production"}, interactive=False)
    saved = StepResults.load(tmp_path, "deploy")
    # The headless refusal is a refusal, not a failure: `not_confirmed`, with the reason.
    assert saved.status == "not_confirmed" and saved.gate.decision == "rejected" and saved.gate.mode == "headless"
    assert saved.refused and "pass -p confirm true" in saved.error and saved.finished_at is not None
    ctx = start_step("preflight", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    report = ctx.new_report()
    report.add(Check.failed("pool", "Work pool exists", "no pool", "create it"))
    with pytest.raises(ChecksFailed, match="pool"):
        ctx.record_checks(report)
    saved = StepResults.load(tmp_path, "preflight")
    assert saved.status == "failed" and [c.id for c in saved.checks] == ["pool"] and "pool" in saved.error

PLAN = {"pool": "managed-production", "flow": "orchestrator_main"}


def on_disk(run_dir: Path, step: str) -> dict:
    return json.loads((run_dir / f"{step}.json").read_text())


def test_confirm_false_ends_the_step_rejected_in_its_results_file(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("deploy", confirm=False, run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    gate = ctx.confirm_plan("deploy orchestrator", PLAN, interactive=False)  # shown, refused, no exception yet
    assert not gate.approved
    saved = on_disk(tmp_path, "deploy")
    assert saved["status"] == "rejected" and saved["gate"]["decision"] == "rejected"
    assert saved["gate"]["mode"] == "parameter" and "confirm=False" in saved["gate"]["decided_by"]
    assert "rejected" in saved["error"] and "nothing was applied" in saved["error"] and saved["finished_at"]
    # The apply cell refuses; the record stays `rejected` (never `running`, never `failed`).
    with pytest.raises(NotConfirmed, match="the plan was rejected"):
        ctx.require_approved(PLAN)
    assert on_disk(tmp_path, "deploy")["status"] == "rejected"
    # A step that fails the apply cell through the step's own error handling keeps the refusal too.
    ctx.fail(NotConfirmed("step 'deploy': not confirmed"))
    assert on_disk(tmp_path, "deploy")["status"] == "rejected"
    # And finishing the notebook does not turn a refused step into a pass.
    assert ctx.finish().status == "rejected" and on_disk(tmp_path, "deploy")["status"] == "rejected"


def test_headless_without_confirm_ends_the_step_not_confirmed(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("deploy", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    with pytest.raises(NotConfirmed, match="pass -p confirm true"):
        ctx.confirm_plan("deploy orchestrator", PLAN, interactive=False)
    saved = on_disk(tmp_path, "deploy")
    assert saved["status"] == "not_confirmed" and saved["gate"]["mode"] == "headless"
    assert "pass -p confirm true" in saved["error"]
    # The apply cell reached anyway (no gate was opened): refused, still `not_confirmed`.
    with pytest.raises(NotConfirmed, match="no plan was shown for confirmation"):
        ctx.require_approved(PLAN)
    saved = on_disk(tmp_path, "deploy")
    assert saved["status"] == "not_confirmed" and "nothing was applied" in saved["error"]
    assert ctx.finish().status == "not_confirmed"


def test_the_apply_cell_without_an_approval_is_not_confirmed_and_a_later_approval_resumes(sandbox_environ, tmp_path):
    from runbook_lib.notebook.context import start_step

    ctx = start_step("deploy", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    gate = ctx.confirm_plan("deploy orchestrator", PLAN, interactive=True)  # a notebook: Approve / Reject
    assert on_disk(tmp_path, "deploy")["status"] == "running"  # waiting for a click is not a refusal
    with pytest.raises(NotConfirmed, match="click Approve above"):
        ctx.require_approved(PLAN)
    saved = on_disk(tmp_path, "deploy")
    assert saved["status"] == "not_confirmed" and saved["gate"]["decision"] == "pending"
    gate.reject()
    assert on_disk(tmp_path, "deploy")["status"] == "rejected"
    gate.approve()  # changed their mind: the step goes on
    saved = on_disk(tmp_path, "deploy")
    assert saved["status"] == "running" and saved["error"] is None and saved["gate"]["decision"] == "approved"
    # Approved, but not this plan: not confirmed.
    with pytest.raises(NotConfirmed, match="plan changed"):
        ctx.require_approved({**PLAN, "pool": "other"})
    assert on_disk(tmp_path, "deploy")["status"] == "not_confirmed"
    gate.approve()
    ctx.require_approved(PLAN)
    assert ctx.finish().status == "passed" and on_disk(tmp_path, "deploy")["status"] == "passed"


def test_a_failure_that_is_not_a_refusal_still_fails_the_step(sandbox_environ, tmp_path):
    from runbook_lib.core.errors import RunbookError
    from runbook_lib.notebook.context import start_step

    ctx = start_step("deploy", confirm=True, run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    ctx.confirm_plan("deploy orchestrator", PLAN, interactive=False)
    ctx.require_approved(PLAN)
    assert on_disk(tmp_path, "deploy")["status"] == "running"
    ctx.fail(RunbookError("the deploy call failed"))
    assert on_disk(tmp_path, "deploy")["status"] == "failed" and ctx.finish().status == "failed"


def test_start_step_records_a_settings_failure(tmp_path):
    from runbook_lib.notebook.context import start_step

    with pytest.raises(SettingsError):
        start_step("preflight", profile="sandbox", run_dir=tmp_path,
                   environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path / "missing")}, install_hooks=False)
    saved = StepResults.load(tmp_path, "preflight")
    assert saved.status == "failed" and "sandbox up" in saved.error

def test_relative_run_dirs_are_taken_from_the_project_root(monkeypatch, tmp_path):
    from runbook_lib.notebook.context import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir("outputs/run-1", "sandbox", PROJECT_ROOT) == PROJECT_ROOT / "outputs" / "run-1"
    assert resolve_run_dir(None, "production", PROJECT_ROOT) == PROJECT_ROOT / "outputs" / "runs" / "interactive-production"
    with pytest.raises(ResultsError):
        StepResults.path(tmp_path, "../escape")

NOTEBOOK_CELLS = [
    ("parameters", "profile = 'sandbox'\nconfirm = None\nrun_dir = None"),
    ("", "import asyncio\nfrom runbook_lib.notebook.context import start_step\n"
         "from runbook_lib.core.aio import run_sync\n"
         "ctx = start_step('deploy', profile=profile, confirm=confirm, run_dir=run_dir)"),
    ("", "print('key', ctx.settings.value('prefect.api_key'))\n"
         "from IPython.display import HTML, display\n"
         "display(HTML('<i>dsn ' + ctx.settings.value('database.url') + '</i>'))\n"
         "print('in a kernel:', run_sync(asyncio.sleep(0, result='slept')))"),
    ("", "ctx.new_report()"),
    ("", "gate = ctx.confirm_plan('deploy the orchestrator', {'pool': 'managed-production'})"),
    ("", "from runbook_lib.records.outputs import MergeOutput\n"
         "ctx.require_approved({'pool': 'managed-production'})\nctx.publish(MergeOutput(action='applied'))\nctx.finish()"),
]

@pytest.mark.timeout(180)
def test_a_notebook_in_a_real_kernel_from_another_cwd(sandbox_environ, tmp_path, monkeypatch):
    """papermill runs the notebook in a Jupyter kernel from a foreign directory: secrets are
    masked in outputs, run_sync works with the kernel's loop, and without confirm the apply cell
    fails closed; with -p confirm true it applies."""
    import papermill

    monkeypatch.setenv("RUNBOOK_SANDBOX_DIR", sandbox_environ["RUNBOOK_SANDBOX_DIR"])
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.delenv("RUNBOOK_HEADLESS", raising=False)
    nb = nbformat.v4.new_notebook()
    for tag, source in NOTEBOOK_CELLS:
        cell = nbformat.v4.new_code_cell(source)
        if tag:
            cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "step.ipynb"
    nbformat.write(nb, source)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    run_dir = tmp_path / "run-unconfirmed"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(source), str(tmp_path / "out1.ipynb"), cwd=str(elsewhere),
                                   parameters={"run_dir": str(run_dir)}, progress_bar=False, kernel_name="python3")
    assert err.value.ename == "NotConfirmed" and "click Approve above" in err.value.evalue
    out = (tmp_path / "out1.ipynb").read_text()
    assert "pnu_sandboxkey0123456789" not in out and "key [redacted:PREFECT_API_KEY]" in out
    assert "sandbox-pw-123" not in out and "<i>dsn [redacted:DATABASE_URL]</i>" in out
    assert "in a kernel: slept" in out and "deploy: passed (0 pass" in out  # the report's HTML
    assert "application/vnd.jupyter.widget-view+json" in out  # the Approve button
    assert StepResults.load(run_dir, "deploy").gate.decision == "pending"

    run_dir = tmp_path / "run-confirmed"
    papermill.execute_notebook(str(source), str(tmp_path / "out2.ipynb"), cwd=str(elsewhere),
                               parameters={"run_dir": str(run_dir), "confirm": True}, progress_bar=False,
                               kernel_name="python3")
    saved = StepResults.load(run_dir, "deploy")
    assert saved.status == "passed" and saved.values["action"] == "applied"
    assert saved.gate.decision == "approved" and saved.gate.mode == "parameter"


def test_an_interrupted_step_is_recorded_failed_not_left_running(sandbox_environ, tmp_path):
    """Ctrl-C, the runner's SIGTERM or its death interrupt the kernel: the results say so (else they
    stay `running`, and a record of a killed run looks like one still going)."""
    from runbook_lib.notebook.context import start_step
    from runbook_lib.steps.base import Step

    ctx = start_step("04_update_edge_function_secret", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    with pytest.raises(KeyboardInterrupt), Step(ctx).failing():
        raise KeyboardInterrupt
    saved = StepResults.load(tmp_path, "04_update_edge_function_secret")
    assert saved.status == "failed" and "interrupted (KeyboardInterrupt)" in saved.error and saved.finished_at
