"""runbook_lib.checks.prefect without a Prefect server: `job_variables.secrets` (no plaintext secret in
what is deployed), the pool template's validation (`template_problems`), and the checks that need the
API skipping, naming prefect.api, when no credentials are set."""

from __future__ import annotations

import json

from runbook_lib.checks import Facts, Status, prefect, run_checks
from runbook_lib.checks.facts import WITHHELD

MANAGED_VARIABLES = {
    "type": "object",
    "properties": {
        "pip_packages": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "image": {"type": "string"},
    },
    "required": ["image"],
}


def test_a_literal_under_modal_token_secret_fails_and_the_value_is_withheld(make_settings):
    settings = make_settings(deployment__env={"MODAL_TOKEN_ID": "{{ prefect.blocks.secret.modal-token-id }}",
                                              "MODAL_TOKEN_SECRET": "as-plaintext-secret-42"})
    facts = Facts(settings, "03_deploy")
    report = run_checks(facts, [prefect.job_variables_secrets])
    failed = report.get("job_variables.secrets")
    assert failed.status is Status.FAIL and failed.title == "No plaintext secret in job_variables"
    assert failed.detail == ("job_variables.env.MODAL_TOKEN_SECRET is a literal value under a secret-like name, not a "
                             "Secret block placeholder: anyone who can read the deployment would see it")
    assert failed.remediation.startswith("replace each with a Secret block placeholder {{ prefect.blocks.secret.<name> }}")
    job_variables, _ = facts.job_variables()
    assert job_variables["env"]["MODAL_TOKEN_SECRET"] == WITHHELD
    assert "as-plaintext-secret-42" not in json.dumps(job_variables) + report.to_json()


def test_secret_block_placeholders_pass(make_settings):
    settings = make_settings(deployment__env={"MODAL_TOKEN_ID": "{{prefect.blocks.secret.modal-token-id}}",
                                              "MODAL_TOKEN_SECRET": "  {{ prefect.blocks.secret.modal-token-secret }} ",
                                              "ENRICHMENT_DISPATCH_URL": "https://dispatch.example.com"})
    report = run_checks(Facts(settings, "01_verify_prerequisites"), prefect.JOB_VARIABLES)
    passed = report.get("job_variables.secrets")
    assert passed.status is Status.PASS and passed.detail == "env holds Secret block placeholders and plain settings only"
    # The schema check needs the pool, hence the API: it skips, naming the check that could not reach it.
    assert report.get("job_variables.schema").status is Status.SKIP
    assert "which check prefect.api could not establish" in report.get("job_variables.schema").detail


def test_without_credentials_prefect_api_fails_once_and_the_rest_skip_naming_it(make_settings, profiles_root):
    report = run_checks(Facts(make_settings(), "01_verify_prerequisites"), prefect.POOL + prefect.BLOCKS)
    api = report.get("prefect.api")
    assert api.status is Status.FAIL and api.remediation == "set the missing settings named above"
    assert "prefect.api_url is not set: set PREFECT_API_URL (or PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID)" in api.detail
    assert "prefect.api_key is not set: set PREFECT_API_KEY" in api.detail
    assert [c.id for c in report.failures] == ["prefect.api"]
    for check in report.checks[1:]:
        assert check.status is Status.SKIP, check.id
        assert check.detail == "skipped: needs the Prefect API, which check prefect.api could not establish", check.id
    assert report.get("prefect.work_pool").title == "Work pool 'managed-production' exists"
    assert report.get("blocks.database_url").title == "Secret block 'postgres-connection-string'"


def test_template_problems_are_what_prefect_would_refuse():
    assert prefect.template_problems(MANAGED_VARIABLES, {"pip_packages": ["modal"], "env": {"A": "1"}}) == []
    problems = prefect.template_problems(MANAGED_VARIABLES, {"pip_packages": "modal", "env": {"A": 1}, "cpu": 2})
    assert problems[0] == "'cpu' is not a variable of the pool"
    assert sorted(problems[1:]) == ["env.A: 1 is not of type 'string'", "pip_packages: 'modal' is not of type 'array'"]
    assert prefect.template_problems({}, {"env": {}}) == ["'env' is not a variable of the pool"]
