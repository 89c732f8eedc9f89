"""runbook_lib.core.profiles: loading a profile's settings from its layers (profile file, .env, environment, sandbox.env, overrides), every value's origin, and clear errors naming the setting and where to set it."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook_lib.core.errors import (
    SettingsError,
)
from runbook_lib.core.profiles import load_settings
from tests.unit.conftest import ACCOUNT, OTHER, WORKSPACE, write_sandbox_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
