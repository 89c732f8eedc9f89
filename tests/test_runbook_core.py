"""runbook_lib core: settings, redaction, checks, the confirmation gate, run_sync, step results,
flow-source analysis, requirement mapping, git reading, and the database helpers against the
sandbox's real Postgres. Every test is bounded in time; no service is mocked."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import nbformat
import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.aio import run_sync
from runbook_lib.checks.base import Check, CheckDef, CheckReport, Fail, Skip, Status, ok
from runbook_lib.core.errors import (
    ChecksFailed, DatabaseError, FlowSourceError, GitError, NotConfirmed, RequirementError, ResultsError,
    RunbookError, SettingsError, SupabaseApiError,
)
from runbook_lib.notebook.gate import ConfirmationGate, parse_confirm
from runbook_lib.records.results import StepResults
from runbook_lib.core.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "11111111-1111-4111-8111-111111111111"
WORKSPACE = "22222222-2222-4222-8222-222222222222"
OTHER = "33333333-3333-4333-8333-333333333333"


@pytest.fixture(autouse=True)
def _fresh_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


def write_sandbox_env(directory: Path, **extra: str) -> Path:
    values = {
        "PREFECT_API_URL": f"http://127.0.0.1:4201/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}",
        "PREFECT_API_KEY": "pnu_sandboxkey0123456789",
        "PREFECT_ACCOUNT_ID": ACCOUNT,
        "PREFECT_WORKSPACE_ID": WORKSPACE,
        "DATABASE_URL": "postgresql://postgres:sandbox-pw-123@127.0.0.1:5433/postgres",
        "SUPABASE_API_URL": "http://127.0.0.1:5000",
        "SUPABASE_ACCESS_TOKEN": "sbp_sandboxtoken0123456789",
        "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
        "SUPABASE_FUNCTIONS_URL": "http://127.0.0.1:5000/functions/v1",
        "SUPABASE_ANON_KEY": "eyJhbGciOiJIUzI1NiJ9.anon.sig",
        "RUNBOOK_REPO_URL": "http://127.0.0.1:5200/bencrane/data-enrichment-orchestration-v1.git",
        "ENRICHMENT_DISPATCH_URL": "http://127.0.0.1:5100",
        "MODAL_TOKEN_ID": "ak-sandbox0123",
        "MODAL_TOKEN_SECRET": "as-sandboxsecret0123",
    }
    values.update(extra)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sandbox.env"
    path.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def sandbox_environ(tmp_path) -> dict[str, str]:
    write_sandbox_env(tmp_path / "sbx")
    return {"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """A project root with the real profiles, for tests that add a .env or edit a profile."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "profiles", root / "profiles")
    return root


# -- settings ------------------------------------------------------------------------------------


def test_production_profile_holds_the_contract_values():
    s = load_settings("production", environ={})
    assert s.source.repo_url == "https://github.com/bencrane/data-enrichment-orchestration-v1.git"
    assert (s.source.branch, s.source.entrypoint) == ("main", "src/orchestrator.py:orchestrator_main")
    assert s.source.entrypoint_path == "src/orchestrator.py" and s.source.entrypoint_function == "orchestrator_main"
    d = s.deployment
    assert (d.name, d.work_pool, d.work_pool_type) == ("data-enrichment-orchestrator", "managed-production", "prefect:managed")
    assert d.pip_packages == ["psycopg2-binary", "modal", "python-dotenv"]
    assert d.env == {
        "MODAL_TOKEN_ID": "{{ prefect.blocks.secret.modal-token-id }}",
        "MODAL_TOKEN_SECRET": "{{ prefect.blocks.secret.modal-token-secret }}",
    }
    assert d.referenced_secret_blocks() == ["modal-token-id", "modal-token-secret"]
    assert d.tags == ["enrichment", "orchestrator", "production"] and d.parameters == {"batch_size": 50}
    assert (s.blocks.database_url, s.blocks.modal_token_id, s.blocks.modal_token_secret) == (
        "postgres-connection-string", "modal-token-id", "modal-token-secret")
    assert (s.supabase.api_url, s.supabase.function_name, s.supabase.deployment_id_secret) == (
        "https://api.supabase.com", "trigger-prefect-orchestrator", "PREFECT_DEPLOYMENT_ID")
    assert s.e2e.client_id == "00000000-0000-4000-8000-0000000000e2"
    assert (s.e2e.workstream, s.e2e.blueprint) == ("company-enrichment", ["company-firmographics", "person-contact"])
    assert s.prefect.api_url is None and s.prefect.api_key is None
    assert s.origin("deployment.name") == "profiles/production.toml"


def test_production_builds_cloud_urls_from_ids_and_explicit_url_wins():
    s = load_settings("production", environ={
        "PREFECT_ACCOUNT_ID": ACCOUNT, "PREFECT_WORKSPACE_ID": WORKSPACE, "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst"})
    assert s.prefect.api_url == f"https://api.prefect.cloud/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}"
    assert "PREFECT_ACCOUNT_ID" in s.origin("prefect.api_url")
    assert s.supabase.edge_function_url == "https://abcdefghijklmnopqrst.supabase.co/functions/v1/trigger-prefect-orchestrator"
    explicit = f"http://127.0.0.1:9/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}"
    s = load_settings("production", environ={"PREFECT_API_URL": explicit, "PREFECT_WORKSPACE_ID": WORKSPACE})
    assert s.prefect.api_url == explicit and s.origin("prefect.api_url") == "environment variable PREFECT_API_URL"


def test_api_url_and_ids_of_different_workspaces_are_refused():
    with pytest.raises(SettingsError) as err:
        load_settings("production", environ={
            "PREFECT_API_URL": f"https://api.prefect.cloud/api/accounts/{ACCOUNT}/workspaces/{OTHER}",
            "PREFECT_WORKSPACE_ID": WORKSPACE})
    assert "different workspaces" in str(err.value) and OTHER in str(err.value)


def test_missing_credentials_are_one_error_naming_each_and_where_to_set_it():
    s = load_settings("production", environ={})
    with pytest.raises(SettingsError) as err:
        s.require("prefect.api_key", "database.url", "supabase.access_token", "prefect.api_url")
    text = str(err.value)
    for name in ("PREFECT_API_KEY", "DATABASE_URL", "SUPABASE_ACCESS_TOKEN", "PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID"):
        assert name in text
    assert ".env (git-ignored)" in text


def test_malformed_settings_name_the_setting_and_its_origin():
    with pytest.raises(SettingsError) as err:
        load_settings("production", environ={
            "PREFECT_ACCOUNT_ID": "not-a-uuid",
            "RUNBOOK_E2E__ITEM_COUNT": "many",
            "RUNBOOK_DEPLOYMENT__PIP_PACKAGES": '["modal", "bad package!"]',
            "SUPABASE_PROJECT_REF": "TooShort",
        })
    text = str(err.value)
    assert "prefect.account_id = 'not-a-uuid' (from environment variable PREFECT_ACCOUNT_ID) is not a UUID" in text
    assert "e2e.item_count = 'many' (from environment variable RUNBOOK_E2E__ITEM_COUNT)" in text
    assert "invalid pip requirement 'bad package!'" in text
    assert "supabase.project_ref" in text and "20 lowercase letters" in text


def test_secret_values_never_appear_in_settings_errors():
    with pytest.raises(SettingsError) as err:
        load_settings("production", environ={"DATABASE_URL": "mysql://admin:hunter2-secret@db.example/x"})
    assert "hunter2-secret" not in str(err.value)
    assert "database.url" in str(err.value) and "DATABASE_URL" in str(err.value)


def test_override_variables_must_name_a_setting_and_carry_json_for_lists():
    with pytest.raises(SettingsError, match=r"RUNBOOK_DEPLOYMNT__TAGS .* does not name a setting"):
        load_settings("production", environ={"RUNBOOK_DEPLOYMNT__TAGS": "[]"})
    with pytest.raises(SettingsError, match=r"must be JSON for deployment.tags"):
        load_settings("production", environ={"RUNBOOK_DEPLOYMENT__TAGS": "enrichment,orchestrator"})
    with pytest.raises(SettingsError, match=r"prefect.api_key is a secret; set PREFECT_API_KEY"):
        load_settings("production", environ={"RUNBOOK_PREFECT__API_KEY": "pnu_x"})
    s = load_settings("production", environ={"RUNBOOK_DEPLOYMENT__TAGS": '["a"]', "RUNBOOK_E2E__ITEM_COUNT": "7"})
    assert s.deployment.tags == ["a"] and s.e2e.item_count == 7
    assert s.origin("e2e.item_count") == "environment variable RUNBOOK_E2E__ITEM_COUNT"


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(SettingsError, match=r"unknown profile 'staging'.*production, sandbox"):
        load_settings("staging", environ={})


def test_a_secret_in_a_profile_file_is_refused(project_copy):
    path = project_copy / "profiles" / "production.toml"
    path.write_text(path.read_text().replace('[modal]\n', '[modal]\ntoken_secret = "as-oops"\n'))
    with pytest.raises(SettingsError, match=r"contains secret setting\(s\) \['modal.token_secret'\].*MODAL_TOKEN_SECRET"):
        load_settings("production", environ={}, root=project_copy)


def test_dotenv_file_feeds_production_and_environment_overrides_it(project_copy):
    (project_copy / ".env").write_text('PREFECT_API_KEY="pnu_from_dotenv_123"\nSUPABASE_PROJECT_REF=abcdefghijklmnopqrst\n')
    s = load_settings("production", environ={}, root=project_copy)
    assert s.value("prefect.api_key") == "pnu_from_dotenv_123"
    assert s.origin("prefect.api_key") == f"{project_copy / '.env'} (PREFECT_API_KEY)"
    s = load_settings("production", environ={"PREFECT_API_KEY": "pnu_from_env_456"}, root=project_copy)
    assert s.value("prefect.api_key") == "pnu_from_env_456"


def test_sandbox_profile_reads_sandbox_env_only(sandbox_environ):
    environ = dict(sandbox_environ, PREFECT_API_KEY="pnu_PRODUCTION_KEY", PREFECT_API_URL="https://api.prefect.cloud/api/x")
    s = load_settings("sandbox", environ=environ)
    assert s.sandbox and s.value("prefect.api_key") == "pnu_sandboxkey0123456789"
    assert s.prefect.api_url.startswith("http://127.0.0.1:4201/")
    assert s.source.repo_url.startswith("http://127.0.0.1:5200/") and s.source.repo_url.endswith(".git")
    # The production deployment's shape, plus the dispatch URL as a plain (non-secret) value.
    assert s.deployment.env["ENRICHMENT_DISPATCH_URL"] == "http://127.0.0.1:5100"
    assert s.deployment.env["MODAL_TOKEN_SECRET"] == "{{ prefect.blocks.secret.modal-token-secret }}"
    assert s.deployment.pip_packages == ["psycopg2-binary", "modal", "python-dotenv"]
    assert s.e2e.expect_completed is True
    assert s.supabase.edge_function_url == "http://127.0.0.1:5000/functions/v1/trigger-prefect-orchestrator"
    assert s.secret_block_values() == {
        "postgres-connection-string": "postgresql://postgres:sandbox-pw-123@127.0.0.1:5433/postgres",
        "modal-token-id": "ak-sandbox0123", "modal-token-secret": "as-sandboxsecret0123"}


def test_sandbox_profile_without_a_sandbox_says_how_to_start_it(tmp_path):
    with pytest.raises(SettingsError, match=r"sandbox.env, which does not exist: start the sandbox with `python -m runbook_lib sandbox up`"):
        load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path / "none")})


def test_sandbox_profile_refuses_non_loopback_urls(tmp_path):
    write_sandbox_env(tmp_path, SUPABASE_API_URL="https://api.supabase.com")
    with pytest.raises(SettingsError, match=r"supabase.api_url points at api.supabase.com .* only talks to loopback"):
        load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path)})


def test_secrets_in_clear_in_job_variables_are_refused(sandbox_environ):
    with pytest.raises(SettingsError, match=r"deployment.env.LEAK contains the value of MODAL_TOKEN_SECRET in clear"):
        load_settings("sandbox", environ=dict(sandbox_environ, RUNBOOK_DEPLOYMENT__ENV='{"LEAK": "as-sandboxsecret0123"}'))


def test_env_references_to_secrets_are_refused(project_copy, tmp_path):
    write_sandbox_env(tmp_path / "sbx")
    path = project_copy / "profiles" / "sandbox.toml"
    path.write_text(path.read_text().replace(
        'ENRICHMENT_DISPATCH_URL = "${ENRICHMENT_DISPATCH_URL}"', 'MODAL_TOKEN_SECRET = "${MODAL_TOKEN_SECRET}"'))
    with pytest.raises(SettingsError, match=r"would put the secret MODAL_TOKEN_SECRET in clear"):
        load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}, root=project_copy)


# -- redaction -----------------------------------------------------------------------------------


def test_redact_masks_registered_secrets_their_url_forms_and_patterns():
    redaction.register_secret("p@ss/w0rd!", "DATABASE_PASSWORD")
    redaction.register_secret("pnu_abcdef123456", "PREFECT_API_KEY")
    redaction.register_secret("abc", "TOO_SHORT")  # below MIN_SECRET_LENGTH: not masked
    text = "key=pnu_abcdef123456 dsn=postgresql://u:p%40ss%2Fw0rd%21@h/db raw=p@ss/w0rd! abc"
    out = redaction.redact(text)
    assert "pnu_abcdef123456" not in out and "p@ss/w0rd!" not in out and "p%40ss%2Fw0rd%21" not in out
    assert "[redacted:PREFECT_API_KEY]" in out and out.endswith(" abc")
    assert redaction.redact("postgresql://user:unknownpw@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redaction.redact("Authorization: Bearer eyJhbGciOi.payload.sig") == "Authorization: Bearer ***"
    assert redaction.redact_obj({"a": ["pnu_abcdef123456", 3]}) == {"a": ["[redacted:PREFECT_API_KEY]", 3]}


def test_log_records_and_streams_are_redacted():
    redaction.register_secret("sbp_logsecret999", "SUPABASE_ACCESS_TOKEN")
    redaction.install_log_redaction()
    buffer = io.StringIO()
    logger = logging.getLogger("runbook-test-redaction")
    handler = logging.StreamHandler(buffer)
    logger.addHandler(handler)
    try:
        logger.warning("token is %s", "sbp_logsecret999")
        try:
            raise ValueError("boom sbp_logsecret999")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert "sbp_logsecret999" not in buffer.getvalue()
    assert "token is [redacted:SUPABASE_ACCESS_TOKEN]" in buffer.getvalue()
    assert "boom [redacted:SUPABASE_ACCESS_TOKEN]" in buffer.getvalue()
    inner = io.StringIO()
    stream = redaction.RedactingStream(inner)
    print("x sbp_logsecret999 y", file=stream)
    assert inner.getvalue() == "x [redacted:SUPABASE_ACCESS_TOKEN] y\n"


def test_runbook_errors_are_redacted_when_created():
    redaction.register_secret("ghp_errorsecret42", "GITHUB_TOKEN")
    assert "ghp_errorsecret42" not in str(RunbookError("clone with ghp_errorsecret42 failed"))


# -- checks --------------------------------------------------------------------------------------


def _report() -> CheckReport:
    report = CheckReport(step="preflight")
    report.add(Check.passed("prefect.key", "Prefect API key accepted", "200 from the workspace"))
    report.add(Check.warned("packages.redundant", "Redundant packages", "prefect is in the image", "drop it"))
    report.add(Check.failed("source.git-suffix", "Source URL ends in .git", "https://github.com/o/r <b>",
                            "append .git to the repository URL"))
    report.add(Check.skipped("e2e", "End-to-end", "not requested"))
    return report


def test_check_report_html_shows_colours_status_and_remediation():
    html = _report()._repr_html_()
    assert "preflight: FAILED (1 pass, 1 warn, 1 fail, 1 skip)" in html
    for colour in ("#dafbe1", "#fff8c5", "#ffebe9", "#f6f8fa"):
        assert colour in html
    assert "append .git to the repository URL" in html and "&lt;b&gt;" in html and "<b>https" not in html
    assert html.count("<tr") == 5  # header + 4 checks


def test_check_report_terminal_and_json_renderings():
    from rich.console import Console

    report = _report()
    console = Console(record=True, width=160)
    report.render_terminal(console)
    text = console.export_text()
    assert "FAIL" in text and "append .git to the repository URL" in text and "source.git-suffix" in text
    again = CheckReport.from_json(report.to_json())
    assert again == report and again.get("packages.redundant").status is Status.WARN


def test_failed_checks_raise_naming_them_and_probes_that_raise_become_failures():
    report = _report()
    pool = CheckDef("prefect.pool", "Work pool exists", proves="the pool exists", remediation="create it")
    report.add(pool.attempt(lambda: (_ for _ in ()).throw(RunbookError("pool missing"))))
    with pytest.raises(ChecksFailed) as err:
        report.raise_for_failures()
    assert err.value.failed == ["source.git-suffix", "prefect.pool"]
    assert "source.git-suffix (Source URL ends in .git)" in str(err.value) and "2 check(s) failed" in str(err.value)
    assert report.get("prefect.pool").detail == "pool missing" and report.get("prefect.pool").remediation == "create it"
    with pytest.raises(ValueError, match="already in the report"):
        report.add(Check.passed("prefect.key", "again"))
    CheckReport(step="ok", checks=[Check.passed("a", "A")]).raise_for_failures()
    # A probe's own remediation wins; a skip names what it needed; an outcome is the result.
    fail = pool.attempt(lambda: (_ for _ in ()).throw(Fail("no pool 'x'", "create x", pool="x")))
    assert (fail.status, fail.remediation, fail.data) == (Status.FAIL, "create x", {"pool": "x"})
    skip = pool.attempt(lambda: (_ for _ in ()).throw(Skip("needs the Prefect API")))
    assert skip.status is Status.SKIP and "needs the Prefect API" in skip.detail
    passed = pool.attempt(lambda: ok("exists", id="1"))
    assert (passed.id, passed.title, passed.status, passed.data) == ("prefect.pool", "Work pool exists", Status.PASS, {"id": "1"})
    crash = pool.attempt(lambda: 1 / 0)
    assert crash.status is Status.FAIL and crash.detail.startswith("ZeroDivisionError") and crash.remediation == "create it"


def test_check_texts_are_redacted():
    redaction.register_secret("pnu_checksecret1", "PREFECT_API_KEY")
    check = Check.failed("k", "Key", "sent pnu_checksecret1", "rotate pnu_checksecret1", key="pnu_checksecret1")
    dumped = CheckReport(step="s", checks=[check]).to_json()
    assert "pnu_checksecret1" not in dumped and "[redacted:PREFECT_API_KEY]" in dumped


# -- confirmation gate ---------------------------------------------------------------------------


def test_gate_headless_without_confirm_fails_closed_and_records_it():
    decisions = []
    with pytest.raises(NotConfirmed, match=r"not confirmed: pass -p confirm true"):
        ConfirmationGate.open("deploy", "deploy 1 flow", {"x": 1}, None, interactive=False, on_decision=decisions.append)
    assert [(d.decision, d.mode) for d in decisions] == [("rejected", "headless")]
    assert "headless run without confirm" in decisions[0].decided_by


def test_gate_confirm_parameter_decides_and_binds_to_the_plan():
    decisions = []
    gate = ConfirmationGate.open("deploy", "deploy", {"x": 1}, "true", interactive=False, on_decision=decisions.append)
    gate.require_approved({"x": 1})
    assert decisions[-1].decision == "approved" and decisions[-1].mode == "parameter"
    assert decisions[-1].decided_by.startswith("parameter confirm=True")
    with pytest.raises(NotConfirmed, match="plan changed since it was approved"):
        gate.require_approved({"x": 2})
    rejected = ConfirmationGate.open("deploy", "deploy", {"x": 1}, False, interactive=False)
    with pytest.raises(NotConfirmed, match="rejected"):
        rejected.require_approved()
    with pytest.raises(NotConfirmed, match="confirm must be true or false"):
        parse_confirm("maybe")
    assert (parse_confirm("yes"), parse_confirm("0"), parse_confirm(None), parse_confirm("None")) == (True, False, None, None)


def test_gate_widget_waits_for_a_click():
    decisions = []
    gate = ConfirmationGate.open("deploy", "deploy", {"x": 1}, None, interactive=True, on_decision=decisions.append)
    with pytest.raises(NotConfirmed, match="click Approve above"):
        gate.require_approved()
    box = gate.widget()
    approve_button = box.children[1].children[0]
    approve_button.click()
    gate.require_approved({"x": 1})
    assert [d.decision for d in decisions] == ["pending", "approved"]
    assert decisions[-1].mode == "widget" and "clicked Approve" in decisions[-1].decided_by
    assert "APPROVED" in box.children[2].value


# -- run_sync ------------------------------------------------------------------------------------


async def _answer(value, delay=0.0):
    await asyncio.sleep(delay)
    return value, threading.current_thread().name


def test_run_sync_without_a_running_loop():
    assert run_sync(_answer(42))[0] == 42
    assert run_sync(7) == 7  # a plain value (a sync Prefect call outside a kernel) passes through


def test_run_sync_inside_a_running_loop_uses_a_worker_thread_with_the_callers_context():
    var = contextvars.ContextVar("var", default="unset")

    async def read_var():
        return var.get()

    async def kernel_cell():
        var.set("from the cell")
        blocked = _answer(1)
        with pytest.raises(RuntimeError):
            asyncio.run(blocked)  # what fails in a Jupyter kernel
        blocked.close()
        value, thread = run_sync(_answer(5))
        return value, thread, run_sync(read_var())

    value, thread, seen = asyncio.run(kernel_cell())
    assert value == 5 and thread.startswith("runbook-run-sync") and seen == "from the cell"


def test_run_sync_times_out():
    async def cell():
        return run_sync(_answer(1, delay=5), timeout=0.2)

    with pytest.raises(TimeoutError, match="gave up after"):
        asyncio.run(cell())


def test_prefect_settings_reach_prefect_inside_a_running_loop(sandbox_environ):
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    from runbook_lib.systems.prefect import prefect_settings

    settings = load_settings("sandbox", environ=sandbox_environ)

    async def read_prefect_settings():
        return PREFECT_API_URL.value(), PREFECT_API_KEY.value()

    async def cell():
        with prefect_settings(settings):
            return run_sync(read_prefect_settings())

    assert asyncio.run(cell()) == (settings.prefect.api_url, "pnu_sandboxkey0123456789")


# -- step results and start_step -----------------------------------------------------------------


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
    assert saved.status == "failed" and saved.gate.decision == "rejected" and saved.gate.mode == "headless"
    ctx = start_step("preflight", run_dir=tmp_path, environ=sandbox_environ, install_hooks=False)
    report = ctx.new_report()
    report.add(Check.failed("pool", "Work pool exists", "no pool", "create it"))
    with pytest.raises(ChecksFailed, match="pool"):
        ctx.record_checks(report)
    saved = StepResults.load(tmp_path, "preflight")
    assert saved.status == "failed" and [c.id for c in saved.checks] == ["pool"] and "pool" in saved.error


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


# -- flow source ---------------------------------------------------------------------------------

ORCHESTRATOR = '''
import os
import prefect
from prefect import flow as pflow
from prefect.blocks.system import Secret
import psycopg2
from dotenv import load_dotenv
from src.sequencer import advance_completed_items
from dispatcher import dispatch_pending_items


def get_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except Exception as exc:
        print("could not load", exc)
        return os.environ.get("DATABASE_URL", "")


def strict_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except (KeyError, Exception):
        raise RuntimeError("no dsn")


def nested():
    try:
        try:
            return prefect.blocks.system.Secret.load("modal-token-id")
        except ValueError:
            raise
    except:
        return None


def narrow():
    try:
        return Secret.load(name="modal-token-secret")
    except KeyError:
        return None


@pflow(log_prints=True)
def orchestrator_main(batch_size: int = 50, dry_run: bool = False):
    import modal
    advance_completed_items()
    return dispatch_pending_items(batch_size, os.environ["MODAL_TOKEN_ID"])


def not_a_flow(x):
    return x
'''


def test_flow_analysis_finds_the_flow_its_parameters_imports_and_secret_loads():
    from runbook_lib.source.flow import analyse_flow

    info = analyse_flow(ORCHESTRATOR, "orchestrator_main", "src/orchestrator.py")
    assert info.is_flow and not info.is_async and info.flow_name == "orchestrator-main"  # Prefect's default naming
    assert [(p.name, p.annotation, p.default) for p in info.parameters] == [("batch_size", "int", "50"), ("dry_run", "bool", "False")]
    modules = {i.module for i in info.imports}
    assert {"os", "prefect", "psycopg2", "dotenv", "modal", "src.sequencer", "dispatcher"} <= modules
    assert next(i for i in info.imports if i.module == "modal").in_function
    loads = {(s.function, s.block): s for s in info.secret_loads}
    assert loads[("get_dsn", "postgres-connection-string")].swallowed
    assert loads[("get_dsn", "postgres-connection-string")].handler == "except Exception (line 15)"
    assert not loads[("strict_dsn", "postgres-connection-string")].swallowed
    assert loads[("nested", "modal-token-id")].swallowed  # re-raised inward, swallowed by the bare except
    assert loads[("nested", "modal-token-id")].handler.startswith("bare except")
    assert not loads[("narrow", "modal-token-secret")].swallowed  # KeyError does not catch Secret.load's ValueError
    assert info.secret_blocks == ["modal-token-id", "modal-token-secret", "postgres-connection-string"]
    assert [(e.name, e.has_default) for e in info.env_reads] == [("DATABASE_URL", True), ("MODAL_TOKEN_ID", False)]

    plain = analyse_flow(ORCHESTRATOR, "not_a_flow")
    assert not plain.is_flow and plain.flow_name is None
    named = analyse_flow("from prefect import flow\n@flow(name='orchestrator_main')\nasync def f(): pass\n", "f")
    assert named.flow_name == "orchestrator_main" and named.is_async


def test_flow_analysis_errors_are_clear():
    from runbook_lib.source.flow import analyse_flow

    with pytest.raises(FlowSourceError, match=r"has no module-level function 'orchestrator_main' \(it defines: \['get_dsn'"):
        analyse_flow(ORCHESTRATOR.replace("def orchestrator_main", "def renamed"), "orchestrator_main", "src/o.py")
    with pytest.raises(FlowSourceError, match=r"src/o.py does not parse: .*line 2"):
        analyse_flow("x = 1\ndef broken(:\n", "broken", "src/o.py")


def test_repository_imports_follow_local_modules_and_feed_the_package_check():
    from runbook_lib.source.flow import local_top_level_names, repository_imports
    from runbook_lib.source.packages import missing_imports

    files = {
        "src/orchestrator.py": ORCHESTRATOR,
        "src/__init__.py": "",
        "src/sequencer.py": "from .db import connect\nimport requests\n",
        "src/db.py": "import psycopg2\nimport yaml\n",
        "src/dispatcher.py": "def dispatch_pending_items(*a):\n    import modal\n    import sklearn.cluster\n",
        "scripts/unused.py": "import pandas\n",
    }
    external, visited = repository_imports(files, "src/orchestrator.py:orchestrator_main")
    names = {i.module for i in external}
    assert {"psycopg2", "yaml", "modal", "requests", "sklearn.cluster", "dotenv"} <= names and "pandas" not in names
    assert set(visited) == {"src/orchestrator.py", "src/__init__.py", "src/sequencer.py", "src/db.py", "src/dispatcher.py"}
    local = local_top_level_names(files, "src/orchestrator.py:orchestrator_main")
    assert {"src", "dispatcher", "sequencer"} <= local
    production = ["psycopg2-binary", "modal", "python-dotenv"]
    missing = missing_imports([i.module for i in external], production, local_modules=local)
    assert [(m.module, m.distribution) for m in missing] == [("sklearn", "scikit-learn")]
    missing = missing_imports([i.module for i in external], ["psycopg2-binary"], local_modules=local)
    assert {m.module for m in missing} == {"modal", "sklearn"}


# -- packages ------------------------------------------------------------------------------------


def test_requirement_strings_are_validated():
    from runbook_lib.source.packages import parse_requirement, validate_requirements

    assert parse_requirement("psycopg2-binary>=2.9; python_version >= '3.9'").name == "psycopg2-binary"
    with pytest.raises(RequirementError, match="invalid pip requirement 'modal==='"):
        parse_requirement("modal===")
    with pytest.raises(RequirementError, match="surrounding whitespace"):
        parse_requirement(" modal")
    with pytest.raises(RequirementError, match=r"'Python_Dotenv' is listed twice"):
        validate_requirements(["python-dotenv", "Python_Dotenv==1.0"])


def test_import_names_map_to_distributions_and_the_runtime_image():
    from runbook_lib.source.packages import distribution_for_import, redundant_packages, runtime_provided_imports, stdlib_modules

    assert distribution_for_import("psycopg2.extras") == "psycopg2-binary"
    assert distribution_for_import("dotenv") == "python-dotenv"
    assert distribution_for_import("yaml") == "PyYAML"
    assert distribution_for_import("modal") == "modal"
    provided = runtime_provided_imports("3.12")
    assert {"os", "json", "prefect", "pydantic", "httpx", "anyio"} <= provided
    assert not {"modal", "psycopg2"} & provided
    assert "distutils" in stdlib_modules("3.11") and "distutils" not in stdlib_modules("3.12")
    assert redundant_packages(["psycopg2-binary", "modal", "python-dotenv", "prefect"]) == ["python-dotenv", "prefect"]


def test_equivalent_distributions_satisfy_an_import():
    from runbook_lib.source.packages import missing_imports

    assert missing_imports(["psycopg2"], ["psycopg2==2.9.9"]) == []
    assert missing_imports(["psycopg2"], ["psycopg2-binary>=2.9"]) == []
    assert [str(m) for m in missing_imports(["psycopg2"], [])] == ["import psycopg2 needs 'psycopg2-binary' in pip_packages"]


# -- Supabase Management API: what is checked before any request ---------------------------------


def test_supabase_inputs_are_validated_before_any_request():
    from runbook_lib.systems.supabase import SupabaseManagementApi, secret_digest

    calls = []
    api = SupabaseManagementApi("http://127.0.0.1:9", "sbp_token0123456789", "abcdefghijklmnopqrst", sleep=calls.append)
    with api:
        with pytest.raises(SupabaseApiError, match="starts with SUPABASE_, which is reserved"):
            api.upsert_secrets({"PREFECT_DEPLOYMENT_ID": "x", "SUPABASE_URL": "y"})
        with pytest.raises(SupabaseApiError, match="longer than 24576"):
            api.upsert_secrets({"BIG": "x" * 24577})
        with pytest.raises(SupabaseApiError, match="invalid secret name '1BAD'"):
            api.delete_secrets(["1BAD"])
    assert calls == []  # nothing was even attempted
    with pytest.raises(SupabaseApiError, match="not 20 lowercase letters"):
        SupabaseManagementApi("http://127.0.0.1:9", "sbp_t0123", "ABC")
    assert secret_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_supabase_retry_delay_honours_the_rate_limit_headers():
    import time

    from runbook_lib.systems.supabase import SupabaseManagementApi

    api = SupabaseManagementApi("http://127.0.0.1:9", "sbp_token0123456789", "abcdefghijklmnopqrst", max_wait=30)
    delay = lambda headers: api.retry_delay(httpx.Response(429, headers=headers), attempt=1)  # noqa: E731
    assert delay({"retry-after": "7"}) == 7
    assert delay({"retry-after": "120"}) == 30  # capped
    assert delay({"x-ratelimit-reset": "4"}) == 4  # seconds, as Supabase documents it
    assert delay({"x-ratelimit-reset": "4500"}) == 4.5  # no window lasts 4500 s: milliseconds
    assert 8 <= delay({"x-ratelimit-reset": str(int(time.time()) + 10)}) <= 10
    assert 8 <= delay({"x-ratelimit-reset": str(int(time.time() * 1000) + 10000)}) <= 10
    assert 0.5 <= delay({}) <= 0.6
    api.close()


# -- git -----------------------------------------------------------------------------------------


@pytest.fixture
def local_repo(tmp_path) -> str:
    work = tmp_path / "work"
    work.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True, timeout=30)  # noqa: E731
    git("init", "--quiet", "--initial-branch=main")
    (work / "src").mkdir()
    (work / "src" / "orchestrator.py").write_text(ORCHESTRATOR)
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "--quiet", "-m", "seed")
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work), str(bare)], check=True, capture_output=True, timeout=30)
    return f"file://{bare}"


def test_git_repo_lists_refs_and_reads_files_at_a_ref(local_repo):
    from runbook_lib.systems.git import GitRepo

    with GitRepo(local_repo) as repo:
        sha = repo.branch_sha("main")
        assert sha and len(sha) == 40 and repo.branch_sha("feature/nope") is None
        assert repo.read_file("main", "src/orchestrator.py") == ORCHESTRATOR
        assert repo.fetch("main") == sha and repo.list_files(sha) == ["src/orchestrator.py"]
        with pytest.raises(GitError, match=r"src/missing.py does not exist at main"):
            repo.read_file("main", "src/missing.py")
        with pytest.raises(GitError, match="no such branch, tag or commit"):
            repo.read_file("feature/nope", "src/orchestrator.py")


def test_git_errors_are_clear_and_never_show_the_token(tmp_path):
    from runbook_lib.systems.git import GitRepo

    with pytest.raises(GitError) as err:
        GitRepo(f"file://{tmp_path}/absent.git", token="ghp_gitsecret0123456789").ls_remote()
    assert "ghp_gitsecret0123456789" not in str(err.value) and "absent.git" in str(err.value)


# -- database (the sandbox's real Postgres) ------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_sandbox(tmp_path_factory):
    """Only the sandbox's Postgres (schema, pg_net stand-in, trigger): no flow is triggered."""
    from runbook_sandbox import manager
    from runbook_sandbox.config import SandboxConfig

    state = tmp_path_factory.mktemp("pg-sandbox")
    try:
        manager.up(state, only=["postgres"], echo=lambda s: None)
        yield SandboxConfig.load_or_create(state)
    finally:
        manager.down(state, echo=lambda s: None)


def test_database_reads_trigger_pg_net_and_registry(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    assert db.server_version().startswith("16")
    assert db.http_post_available()
    trigger = db.trigger()
    assert trigger and trigger.enabled and trigger.security_definer
    assert trigger.fires_on_initializing_to_pending and trigger.posts_to(postgres_sandbox.edge_function_url)
    assert not trigger.posts_to("https://elsewhere.supabase.co/functions/v1/trigger-prefect-orchestrator")
    rows = db.registry("company-enrichment")
    assert [(r["slug"], r["modal_sender_fn"]) for r in rows] == [
        ("company-firmographics", "send_company_firmographics"), ("person-contact", "send_person_contact")]
    assert db.client_exists("00000000-0000-4000-8000-0000000000e2")


def test_launching_a_batch_like_the_ui_fires_the_trigger_once(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    items = [{"company_name": f"Co {i}", "company_domain": f"co{i}.example", "original_data": {"row": i}} for i in range(3)]
    batch = db.launch_batch("00000000-0000-4000-8000-0000000000e2", "company-enrichment",
                            ["company-firmographics", "person-contact"], items)
    try:
        assert len(batch.item_ids) == 3 and len(batch.trigger_request_ids) == 1
        assert db.state_counts(batch.batch_id) == {("company-firmographics", "PENDING"): 3}
        assert [(t["from_status"], t["to_status"]) for t in db.transitions(batch.batch_id)] == [(None, "PENDING")] * 3
        queued = db.query("SELECT url, convert_from(body, 'UTF8')::jsonb AS body FROM net.http_request_queue WHERE id = %s",
                          (batch.trigger_request_ids[0],))
        assert queued[0]["url"] == postgres_sandbox.edge_function_url and queued[0]["body"] == {"batch_id": batch.batch_id}
        assert db.http_responses(batch.trigger_request_ids) == []  # nothing relays in this Postgres-only sandbox
    finally:
        assert db.delete_batch(batch.batch_id)
    assert db.state_counts(batch.batch_id) == {} and db.trigger_request_ids(batch.batch_id) == []
    assert not db.delete_batch(batch.batch_id)


def test_bad_batch_input_changes_nothing_and_connection_errors_hide_the_password(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    before = db.query("SELECT count(*) AS n FROM public.batches")[0]["n"]
    with pytest.raises(DatabaseError, match=r"unknown batch item field\(s\) \['colour'\]"):
        db.launch_batch("00000000-0000-4000-8000-0000000000e2", "company-enrichment", ["company-firmographics"],
                        [{"company_name": "ok"}, {"colour": "blue"}])
    with pytest.raises(DatabaseError, match="inserting the batch failed"):
        db.launch_batch("99999999-9999-4999-8999-999999999999", "company-enrichment", ["company-firmographics"],
                        [{"company_name": "no such client"}])
    assert db.query("SELECT count(*) AS n FROM public.batches")[0]["n"] == before
    wrong = postgres_sandbox.database_url.replace(postgres_sandbox.postgres.password, "wrong-password-xyz")
    with pytest.raises(DatabaseError) as err:
        Database(wrong, connect_timeout=5).server_version()
    assert "wrong-password-xyz" not in str(err.value) and "check DATABASE_URL" in str(err.value)


# -- the service clients against the whole sandbox (real gateway, Management API, git server) ----


@pytest.fixture
def sandbox_settings(sandbox):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)})


@pytest.mark.timeout(120)
def test_prefect_api_reads_the_workspace_and_explains_a_rejected_key(sandbox_settings):
    from runbook_lib.systems.prefect import PrefectApi

    api = PrefectApi.from_settings(sandbox_settings)
    api.check_access()
    pool = api.read_work_pool("managed-production")
    assert (pool.name, pool.type) == ("managed-production", "prefect:managed")
    assert api.read_work_pool("no-such-pool") is None
    assert api.read_secret_block("modal-token-id") is not None and api.read_secret_block("no-such-block") is None
    value = api.read_secret_value("modal-token-id")
    assert value and redaction.redact(value) == "[redacted:secret block modal-token-id]"

    async def kernel_cell():  # the same client call from inside a running loop
        return api.read_work_pool("managed-production").name

    assert asyncio.run(kernel_cell()) == "managed-production"
    wrong = PrefectApi(sandbox_settings.prefect.api_url, "pnu_not_the_key_000", cloud=True)
    with pytest.raises(RunbookError, match=r"the API key was rejected \(401 Unauthorized\).*check PREFECT_API_KEY"):
        wrong.check_access()
    elsewhere = sandbox_settings.prefect.api_url.replace(sandbox_settings.prefect.workspace_id, OTHER)
    with pytest.raises(RunbookError, match=r"not found \(404\).*PREFECT_WORKSPACE_ID"):
        PrefectApi(elsewhere, sandbox_settings.value("prefect.api_key"), cloud=True).check_access()


@pytest.mark.timeout(120)
def test_supabase_api_upserts_lists_and_deletes_secrets(sandbox_settings):
    from runbook_lib.systems.supabase import SupabaseManagementApi

    with SupabaseManagementApi.from_settings(sandbox_settings) as api:
        api.upsert_secrets({"RUNBOOK_CORE_TEST": "core-test-value"})
        try:
            listed = api.secret_digests()["RUNBOOK_CORE_TEST"]
            assert listed.matches("core-test-value") and not listed.matches("other")
        finally:
            api.delete_secrets(["RUNBOOK_CORE_TEST"])
        assert "RUNBOOK_CORE_TEST" not in api.secret_digests()
    bad = SupabaseManagementApi(sandbox_settings.supabase.api_url, "sbp_not_the_token_0", sandbox_settings.supabase.project_ref)
    with bad, pytest.raises(SupabaseApiError, match=r"rejected \(401\): check SUPABASE_ACCESS_TOKEN"):
        bad.list_secrets()


@pytest.mark.timeout(120)
def test_supabase_api_retries_rate_limits_and_server_errors(sandbox_settings):
    from runbook_lib.systems.supabase import SupabaseManagementApi

    base = sandbox_settings.supabase.api_url
    path = f"/v1/projects/{sandbox_settings.supabase.project_ref}/secrets"
    waits: list[float] = []
    try:
        httpx.post(f"{base}/_sandbox/faults", json={"path": path, "status": 429, "count": 2}, timeout=10, trust_env=False).raise_for_status()
        with SupabaseManagementApi.from_settings(sandbox_settings, sleep=waits.append, max_wait=30) as api:
            assert any(s.name == "SUPABASE_URL" for s in api.list_secrets())
            assert len(waits) == 2 and all(0 < w <= 30 for w in waits)  # waited what the headers said, capped
            httpx.post(f"{base}/_sandbox/faults", json={"path": path, "status": 503, "count": None}, timeout=10, trust_env=False).raise_for_status()
            with pytest.raises(SupabaseApiError, match=r"server error 503 after 6 attempts"):
                api.list_secrets()
    finally:
        httpx.delete(f"{base}/_sandbox/faults", timeout=10, trust_env=False)


@pytest.mark.timeout(120)
def test_git_repo_reads_the_seeded_flow_and_refuses_a_wrong_token(sandbox_settings):
    from runbook_lib.source.flow import analyse_entrypoint
    from runbook_lib.systems.git import GitRepo

    with GitRepo.from_settings(sandbox_settings) as repo:
        assert repo.branch_sha("main")
        files = repo.read_files("main")
        info = analyse_entrypoint(files, sandbox_settings.source.entrypoint)
        assert info.is_flow and info.parameter("batch_size").default == "50"
    with pytest.raises(GitError, match="refused access"):
        GitRepo(sandbox_settings.source.repo_url, "ghp_not_the_token_00").ls_remote()
