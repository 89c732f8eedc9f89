"""runbook_lib.checks.facts: memoised facts (a value or the exception, computed once), `need` turning
another check's failure into a skip naming it, and the job variables with every plaintext secret
withheld (`plaintext_secrets`, `withhold`, `Facts.job_variables`)."""

from __future__ import annotations

import base64
import json

import pytest

from runbook_lib.checks.base import Skip
from runbook_lib.checks.facts import (
    WITHHELD,
    Facts,
    plaintext_secrets,
    public_values,
    withhold,
)
from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import GitError

PLACEHOLDER = "{{ prefect.blocks.secret.modal-token-secret }}"


def _jwt(role: str) -> str:
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'role': role, 'iss': 'supabase'})}.c2lnbmF0dXJl"


# -- plumbing ----------------------------------------------------------------------------------------


def test_a_fact_is_computed_once_and_so_is_its_failure(make_settings):
    facts = Facts(make_settings(), "s")
    calls = []

    def compute() -> int:
        calls.append(1)
        return 42

    assert facts.fact("answer", compute) == 42 and facts.fact("answer", compute) == 42 and len(calls) == 1

    def broken() -> int:
        calls.append(2)
        raise GitError("no such repository")

    for _ in range(2):
        with pytest.raises(GitError, match="no such repository"):
            facts.fact("broken", broken)
    assert calls == [1, 2]


def test_need_turns_a_failure_into_a_skip_naming_the_owning_check():
    def failing() -> str:
        raise GitError("refused")

    with pytest.raises(Skip) as skip:
        Facts.need(failing, "source.reachable", "the repository")
    assert str(skip.value) == "needs the repository, which check source.reachable could not establish"
    assert skip.value.__cause__ is None and skip.value.__suppress_context__

    def skipping() -> str:
        raise Skip("needs the Prefect API, which check prefect.api could not establish")

    with pytest.raises(Skip, match="^needs the Prefect API, which check prefect.api"):  # the first cause is kept
        Facts.need(skipping, "prefect.work_pool", "the work pool")
    assert Facts.need(lambda: "value", "x", "y") == "value"


def test_where_says_where_a_setting_is_set(make_settings, profiles_root):
    facts = Facts(make_settings(), "s")
    assert facts.where("source.repo_url") == (
        f"set RUNBOOK_REPO_URL in the environment or in {profiles_root.resolve() / '.env'} (git-ignored)")
    assert facts.where("source.branch") == (
        f"set `branch` in section [source] of {profiles_root.resolve() / 'profiles' / 'production.toml'}, "
        "or override it with RUNBOOK_SOURCE__BRANCH")


def test_the_repository_url_gains_git_and_a_url_with_credentials_is_refused(make_settings):
    from runbook_lib.checks.base import Fail

    assert Facts(make_settings(source__repo_url="https://github.com/o/r/")).repo_url() == "https://github.com/o/r.git"
    settings = make_settings()  # the settings refuse such a URL (test_core_settings); the check still does
    settings.source = settings.source.model_copy(update={"repo_url": "https://x-access-token:ghs_abcdef123456@github.com/o/r.git"})
    facts = Facts(settings)
    with pytest.raises(Fail) as err:
        facts.repo_url()
    assert "carries credentials" in str(err.value) and "ghs_abcdef123456" not in err.value.remediation
    with pytest.raises(Skip, match="needs a usable repository URL, which check source.repo_url could not establish"):
        facts.refs()


# -- plaintext secrets in the job variables ----------------------------------------------------------


def test_the_profiles_placeholders_pass_and_nothing_is_withheld(make_settings):
    settings = make_settings()
    job_variables, findings = Facts(settings).job_variables()
    assert findings == []
    assert job_variables == {"pip_packages": ["psycopg2-binary", "modal", "python-dotenv"],
                             "env": {"MODAL_TOKEN_ID": "{{ prefect.blocks.secret.modal-token-id }}",
                                     "MODAL_TOKEN_SECRET": PLACEHOLDER}}


def test_a_literal_under_a_secret_like_name_is_withheld_and_registered_for_masking(make_settings):
    settings = make_settings(deployment__env={"MODAL_TOKEN_ID": "{{prefect.blocks.secret.modal-token-id}}",
                                              "MODAL_TOKEN_SECRET": "as-literal-value-0123", "LOG_LEVEL": "INFO"})
    facts = Facts(settings)
    job_variables, findings = facts.job_variables()
    assert findings == [("job_variables.env.MODAL_TOKEN_SECRET",
                         "is a literal value under a secret-like name, not a Secret block placeholder")]
    assert job_variables["env"] == {"MODAL_TOKEN_ID": "{{prefect.blocks.secret.modal-token-id}}",
                                    "MODAL_TOKEN_SECRET": WITHHELD, "LOG_LEVEL": "INFO"}
    assert "as-literal-value-0123" not in json.dumps(job_variables)
    assert facts.job_variables() is facts.job_variables()  # one computation per step
    assert redaction.redact("value as-literal-value-0123") == (
        "value [redacted:plaintext in job_variables.env.MODAL_TOKEN_SECRET]")
    assert settings.deployment.env["MODAL_TOKEN_SECRET"] == "as-literal-value-0123"  # the settings are not changed


def test_known_secrets_and_credential_shapes_are_found_anywhere_in_planned_job_variables(make_settings):
    anon, service = _jwt("anon"), _jwt("service_role")
    settings = make_settings({"MODAL_TOKEN_SECRET": "as-known-secret-0123", "SUPABASE_ANON_KEY": anon})
    planned = {
        "pip_packages": ["modal", "git+https://bot:pw0rd-123@example.com/lib.git"],
        "env": {
            "NOTE": "copied as-known-secret-0123 by hand",
            "PREFECT_HEADER": "pnu_abcdefghijklmnop",
            "SERVICE": service,
            "ANON": anon,  # public by design
            "DATABASE_URL": "{{ prefect.blocks.secret.postgres-connection-string }}",
            "REGION": "eu-west-1",
        },
    }
    job_variables, findings = Facts(settings, job_variables=planned).job_variables()
    assert dict(findings) == {
        "job_variables.pip_packages[1]": "holds a URL with a password",
        "job_variables.env.NOTE": "holds the value of MODAL_TOKEN_SECRET",
        "job_variables.env.PREFECT_HEADER": "holds a Prefect API key (pnu_...)",
        "job_variables.env.SERVICE": "holds a JWT with role 'service_role'",
    }
    assert job_variables == {
        "pip_packages": ["modal", WITHHELD],
        "env": {"NOTE": WITHHELD, "PREFECT_HEADER": WITHHELD, "SERVICE": WITHHELD, "ANON": anon,
                "DATABASE_URL": "{{ prefect.blocks.secret.postgres-connection-string }}", "REGION": "eu-west-1"},
    }
    assert planned["env"]["NOTE"].startswith("copied")  # the caller's plan is not changed
    assert public_values(settings) == (anon,)


def test_plaintext_secrets_never_returns_the_values():
    found = plaintext_secrets({"env": {"API_KEY": "literal-key-value", "X": "ok"}}, {}, "vars")
    assert found == [("vars.env.API_KEY", "is a literal value under a secret-like name, not a Secret block placeholder")]
    assert "literal-key-value" not in json.dumps(found)
    assert plaintext_secrets({"env": {"API_KEY": ""}}, {}) == []  # an empty value holds nothing


def test_withhold_masks_the_findings_paths_only(make_settings):
    masked, findings = withhold({"a": ["x", {"token": "t0ken-value"}], "b": 1}, "plan", make_settings())
    assert findings == [("plan.a[1].token", "is a literal value under a secret-like name, not a Secret block placeholder")]
    assert masked == {"a": ["x", {"token": WITHHELD}], "b": 1}
