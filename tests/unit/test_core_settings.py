"""The bad-input matrix: settings values, environment variables, profile files, notebook parameters and
CLI flags that are refused before anything is changed, each with a message naming the setting (or
parameter, or flag) and where its value came from; a credential in the bad value is never echoed.

The README's table "Faults and bad inputs covered" lists these rows; tests/integration/runner/
test_bad_inputs.py runs a few of them through the runner against the sandbox."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from runbook_lib.core.errors import ParameterError, RunbookError, SettingsError
from runbook_lib.core.profiles import load_settings
from runbook_lib.core.values import parse_dsn, parse_flag, parse_uuid


def _jwt(role: str) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'iss': 'supabase', 'role': role})}.c2lnbmF0dXJlc2ln"


SERVICE_ROLE = _jwt("service_role")
ENV = "environment variable"


@dataclass
class Bad:
    """One bad input: `env` (variables), `profile` (extra TOML appended to a profile extending
    production), or `overrides` (notebook / load_settings parameters); the error must hold every
    `says` fragment and none of `hides`."""

    says: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    hides: tuple[str, ...] = ()


MATRIX: dict[str, Bad] = {
    # -- environment variables (the service settings a user exports) ---------------------------
    "prefect_api_url_not_http": Bad(("prefect.api_url", f"{ENV} PREFECT_API_URL", "is not an http(s) URL"),
                                    env={"PREFECT_API_URL": "ftp://api.example.com/api"}),
    "prefect_account_id_not_uuid": Bad(("prefect.account_id", f"{ENV} PREFECT_ACCOUNT_ID", "is not a UUID"),
                                       env={"PREFECT_ACCOUNT_ID": "acct-42"}),
    "dsn_password_with_slash_hash_question": Bad(
        ("database.url", f"{ENV} DATABASE_URL", "not percent-encoded", "%2F"),
        env={"DATABASE_URL": "postgresql://postgres:leakfirstpart/second#third?x@db.example.com:5432/postgres"},
        hides=("leakfirstpart", "second", "third")),
    "dsn_port_out_of_range": Bad(("database.url", f"{ENV} DATABASE_URL", "port that is not a number from 1 to 65535"),
                                 env={"DATABASE_URL": "postgresql://postgres:pw-9911@db.example.com:99999/postgres"},
                                 hides=("pw-9911",)),
    "dsn_port_not_a_number": Bad(("database.url", f"{ENV} DATABASE_URL", "port that is not a number"),
                                 env={"DATABASE_URL": "postgresql://postgres:pw-9912@db.example.com:54x2/postgres"},
                                 hides=("pw-9912", "54x2")),
    "dsn_not_postgres": Bad(("database.url", f"{ENV} DATABASE_URL", "is not a PostgreSQL connection URL"),
                            env={"DATABASE_URL": "mysql://root:pw-9913@db.example.com/app"}, hides=("pw-9913",)),
    "anon_key_is_service_role": Bad(("supabase.anon_key", f"{ENV} SUPABASE_ANON_KEY", "role 'service_role'"),
                                    env={"SUPABASE_ANON_KEY": SERVICE_ROLE}, hides=(SERVICE_ROLE, SERVICE_ROLE[-20:])),
    "anon_key_not_a_jwt": Bad(("supabase.anon_key", f"{ENV} SUPABASE_ANON_KEY", "not a JWT"),
                              env={"SUPABASE_ANON_KEY": "sb-secret-looking-value-123"}, hides=("sb-secret-looking-value-123",)),
    "project_ref_malformed": Bad(("supabase.project_ref", f"{ENV} SUPABASE_PROJECT_REF", "20 lowercase letters"),
                                 env={"SUPABASE_PROJECT_REF": "ABC-123"}),
    "repo_url_with_user_and_token": Bad(("source.repo_url", f"{ENV} RUNBOOK_REPO_URL", "carries credentials"),
                                        env={"RUNBOOK_REPO_URL": "https://deploy:ghp_tok3n0123456789@github.com/o/r.git"},
                                        hides=("ghp_tok3n0123456789", "deploy:")),
    "repo_url_with_token_as_user": Bad(("source.repo_url", f"{ENV} RUNBOOK_REPO_URL", "carries credentials"),
                                       env={"RUNBOOK_REPO_URL": "https://ghp_tok3n9876543210@github.com/o/r.git"},
                                       hides=("ghp_tok3n9876543210",)),
    # -- RUNBOOK_<SECTION>__<FIELD> overrides ---------------------------------------------------
    "trigger_timeout_infinite": Bad(("e2e.trigger_timeout_seconds", f"{ENV} RUNBOOK_E2E__TRIGGER_TIMEOUT_SECONDS", "finite"),
                                    env={"RUNBOOK_E2E__TRIGGER_TIMEOUT_SECONDS": "inf"}),
    "flow_run_timeout_nan": Bad(("e2e.flow_run_timeout_seconds", f"{ENV} RUNBOOK_E2E__FLOW_RUN_TIMEOUT_SECONDS", "finite"),
                                env={"RUNBOOK_E2E__FLOW_RUN_TIMEOUT_SECONDS": "nan"}),
    "completion_timeout_negative": Bad(("e2e.completion_timeout_seconds", f"{ENV} RUNBOOK_E2E__COMPLETION_TIMEOUT_SECONDS",
                                        "greater than 0"), env={"RUNBOOK_E2E__COMPLETION_TIMEOUT_SECONDS": "-5"}),
    "worker_start_timeout_infinite": Bad(("fallback.worker_start_timeout_seconds", "RUNBOOK_FALLBACK__WORKER_START_TIMEOUT_SECONDS",
                                          "finite"), env={"RUNBOOK_FALLBACK__WORKER_START_TIMEOUT_SECONDS": "Infinity"}),
    "blueprint_empty_slug": Bad(("e2e.blueprint", f"{ENV} RUNBOOK_E2E__BLUEPRINT", "non-empty"),
                                env={"RUNBOOK_E2E__BLUEPRINT": '[""]'}),
    "deployment_name_with_slash": Bad(("deployment.name", f"{ENV} RUNBOOK_DEPLOYMENT__NAME", "cannot contain '/'"),
                                      env={"RUNBOOK_DEPLOYMENT__NAME": "orchestrator/prod"}),
    "fallback_deployment_name_with_slash": Bad(("fallback.deployment_name", "RUNBOOK_FALLBACK__DEPLOYMENT_NAME", "'/'"),
                                               env={"RUNBOOK_FALLBACK__DEPLOYMENT_NAME": "a/b"}),
    "env_reference_not_allowed": Bad(("deployment.env.LEAK", f"{ENV} RUNBOOK_DEPLOYMENT__ENV", "${HOME}",
                                      "deployment.env_references_allowed"),
                                     env={"RUNBOOK_DEPLOYMENT__ENV": '{"LEAK": "${HOME}"}', "HOME": "/root-home-value"},
                                     hides=("/root-home-value",)),
    "env_reference_to_a_secret": Bad(("deployment.env.KEY", "PREFECT_API_KEY in clear"),
                                     env={"RUNBOOK_DEPLOYMENT__ENV": '{"KEY": "${PREFECT_API_KEY}"}',
                                          "PREFECT_API_KEY": "pnu_matrixkey0123456789"}, hides=("pnu_matrixkey0123456789",)),
    "item_count_zero": Bad(("e2e.item_count", f"{ENV} RUNBOOK_E2E__ITEM_COUNT", "greater than 0"),
                           env={"RUNBOOK_E2E__ITEM_COUNT": "0"}),
    "pip_package_invalid": Bad(("deployment.pip_packages", f"{ENV} RUNBOOK_DEPLOYMENT__PIP_PACKAGES", "invalid pip requirement"),
                               env={"RUNBOOK_DEPLOYMENT__PIP_PACKAGES": '["requests==="]'}),
    "supabase_attempts_zero": Bad(("supabase.max_attempts", f"{ENV} RUNBOOK_SUPABASE__MAX_ATTEMPTS", "greater than or equal to 1"),
                                  env={"RUNBOOK_SUPABASE__MAX_ATTEMPTS": "0"}),
    "override_of_no_setting": Bad(("RUNBOOK_DEPLOYMENT__NAMEE", "does not name a setting"),
                                  env={"RUNBOOK_DEPLOYMENT__NAMEE": "x"}),
    "override_of_a_secret": Bad(("RUNBOOK_PREFECT__API_KEY", "is a secret", "PREFECT_API_KEY"),
                                env={"RUNBOOK_PREFECT__API_KEY": "pnu_viaoverride0123"}, hides=("pnu_viaoverride0123",)),
    # -- profile files --------------------------------------------------------------------------
    "profile_deployment_name_with_slash": Bad(("deployment.name", "profiles/bad.toml", "cannot contain '/'"),
                                              profile='[deployment]\nname = "flows/prod"\n'),
    "profile_timeout_infinite": Bad(("e2e.settle_seconds", "profiles/bad.toml", "finite"),
                                    profile="[e2e]\nsettle_seconds = inf\n"),
    "profile_holds_a_secret": Bad(("profiles/bad.toml", "contains secret setting", "PREFECT_API_KEY"),
                                  profile='[prefect]\napi_key = "pnu_inprofile0123456"\n', hides=("pnu_inprofile0123456",)),
    "profile_env_reference_not_allowed": Bad(("deployment.env.WHO", "profiles/bad.toml", "${USER}", "allow-list"),
                                             profile='[deployment.env]\nWHO = "${USER}"\n', env={"USER": "someone"}),
    "profile_allow_list_holds_bad_name": Bad(("deployment.env_references_allowed", "profiles/bad.toml", "invalid"),
                                             profile='[deployment]\nenv_references_allowed = ["NOT-A-NAME"]\n'),
    "profile_blueprint_blank": Bad(("e2e.blueprint", "profiles/bad.toml", "non-empty"), profile='[e2e]\nblueprint = ["  "]\n'),
    # -- parameters (a notebook's overrides, as start_step passes them) ----------------------------
    "parameter_item_count_negative": Bad(("e2e.item_count", "override argument", "greater than 0"),
                                         overrides={"e2e.item_count": -1}),
    "parameter_work_pool_with_slash": Bad(("deployment.work_pool", "override argument", "'/'"),
                                          overrides={"deployment.work_pool": "pool/x"}),
}


def _load(root: Path, bad: Bad) -> Any:
    profile = "production"
    if bad.profile is not None:
        (root / "profiles" / "bad.toml").write_text('extends = "production"\n' + bad.profile)
        profile = "bad"
    return load_settings(profile, environ=dict(bad.env), root=root, overrides=bad.overrides)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_bad_input_is_refused_naming_the_setting_and_where_it_came_from(profiles_root: Path, case: str):
    bad = MATRIX[case]
    with pytest.raises(SettingsError) as err:
        _load(profiles_root, bad)
    message = str(err.value)
    for fragment in bad.says:
        assert fragment in message, (case, fragment, message)
    for hidden in bad.hides:
        assert hidden not in message, (case, hidden, message)


def test_the_matrix_has_at_least_20_rows_and_the_good_inputs_load(profiles_root: Path):
    assert len(MATRIX) >= 20
    settings = load_settings("production", environ={
        "DATABASE_URL": "postgresql://postgres:a%2Fb%23c%3Fd@db.example.com:6543/postgres",
        "SUPABASE_ANON_KEY": _jwt("anon"), "RUNBOOK_REPO_URL": "https://github.com/o/r.git",
    }, root=profiles_root)
    assert settings.database.password == "a/b#c?d"
    assert settings.deployment.env_references_allowed == ["ENRICHMENT_DISPATCH_URL"]
    allowed = load_settings("production", environ={"RUNBOOK_DEPLOYMENT__ENV": '{"URL": "${ENRICHMENT_DISPATCH_URL}"}',
                                                   "ENRICHMENT_DISPATCH_URL": "https://dispatch.example.com"},
                            root=profiles_root)
    assert allowed.deployment.env["URL"] == "https://dispatch.example.com"


# -- notebook parameters and DSN parsing outside the settings --------------------------------------


@pytest.mark.parametrize("call, says", [
    (lambda: parse_flag("confirm", "maybe"), "parameter confirm must be true or false"),
    (lambda: parse_flag("cleanup", "2"), "parameter cleanup must be true or false"),
    (lambda: parse_uuid("not-a-uuid", "deployment_id"), "deployment_id 'not-a-uuid' is not a UUID"),
])
def test_bad_notebook_parameters_name_the_parameter(call: Callable[[], Any], says: str):
    with pytest.raises(ParameterError, match=None) as err:
        call()
    assert says in str(err.value)


def test_a_secret_passed_as_a_uuid_is_masked_before_it_is_cut_short():
    from runbook_lib.core import secrets as redaction

    secret = "pnu_" + "k" * 100
    redaction.register_secret(secret, "PREFECT_API_KEY")
    with pytest.raises(ParameterError) as err:
        parse_uuid(secret)
    assert "kkkkkkkk" not in str(err.value) and "[redacted:PREFECT_API_KEY]" in str(err.value)


@pytest.mark.parametrize("dsn", [
    "postgresql://postgres:first/second@db.example.com:5432/postgres",
    "postgresql://postgres:first#second@db.example.com:5432/postgres",
    "postgresql://postgres:first?second@db.example.com:5432/postgres",
    "postgresql://postgres:first@second@db.example.com:5432/postgres",
    "postgresql://postgres:firstsecond@db.example.com:70000/postgres",
    "postgresql://postgres:firstsecond@db.example.com:0/postgres",
])
def test_dsn_errors_never_quote_the_dsn(dsn: str):
    with pytest.raises(ValueError) as err:
        parse_dsn(dsn)
    assert "first" not in str(err.value) and "second" not in str(err.value) and "db.example.com" not in str(err.value)


def test_the_database_client_refuses_a_bad_block_dsn_without_quoting_it():
    from runbook_lib.core.errors import DatabaseError
    from runbook_lib.systems.database import Database

    with pytest.raises(DatabaseError) as err:
        Database("postgresql://postgres:leakfirst/rest@db.example.com:5432/postgres")
    assert "leakfirst" not in str(err.value) and "percent-encoded" in str(err.value)
    assert isinstance(err.value, RunbookError)
