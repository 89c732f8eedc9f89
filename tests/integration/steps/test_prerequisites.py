"""Notebook 01 (verify prerequisites), run with papermill against the sandbox.

A healthy sandbox passes. Then, for each check, the sandbox (or one setting) is broken in exactly
that one way, and the executed notebook must fail at its verdict cell with exactly that check
failed, with a remediation, the checks that depend on it skipped, and every other check passing.
Each break is undone in a `finally`, since the sandbox is shared by the whole session. No secret
value may appear in any executed notebook or results file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psycopg
import pytest
from dotenv import dotenv_values

from runbook_lib.checks.local import python_outcome
from runbook_lib.core.secrets import clear_text_secrets
from runbook_lib.core.settings import git_clone_url as normalise_repo_url
from runbook_sandbox import postgres, prefect_gateway
from runbook_sandbox.config import _anon_key
from tests.integration import notebook_runs
from tests.integration.notebook_runs import Run, assert_no_secrets, secret_values

STEP = "01_verify_prerequisites"
JWT_SECRET = "a-test-jwt-secret-of-32-bytes-or-more"

ALL_CHECKS = {
    "local.python", "local.prefect", "local.git",
    "prefect.api", "prefect.work_pool", "prefect.work_pool_type", "prefect.work_pool_active", "prefect.work_pool_pip_packages",
    "blocks.database_url", "blocks.referenced",
    "database.connect", "database.block_dsn", "database.tables", "database.enums", "database.unique_constraint", "database.pg_net",
    "database.trigger", "database.trigger_target", "database.trigger_secrets",
    "source.repo_url", "source.reachable", "source.branch", "source.entrypoint_file", "source.flow_function",
    "source.flow_parameters", "packages.requirements", "packages.imports",
    "job_variables.secrets", "job_variables.schema",
    "supabase.api", "supabase.function_secrets", "supabase.edge_function",
}


# -- running the notebook ---------------------------------------------------------------------------


def run_notebook(sandbox_dir: Path, out_dir: Path, env: dict[str, str] | None = None) -> Run:
    """Notebook 01, headless: the executed notebook in `out_dir`, the results in `out_dir/run`."""
    return notebook_runs.run_notebook(STEP, sandbox_dir, out_dir / "run", env=env, output=out_dir / f"{STEP}.ipynb",
                                      timeout=180)


# -- breaking the sandbox in one way ----------------------------------------------------------------


def copied_sandbox_env(sandbox, tmp: Path, name: str, value: str) -> Path:
    """A copy of the sandbox's settings dir (just sandbox.env) with one setting changed."""
    values = dotenv_values(sandbox.state / "sandbox.env")
    assert name in values
    values[name] = value
    directory = tmp / "sandbox-copy"
    directory.mkdir()
    (directory / "sandbox.env").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return directory


def block_document(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.get(f"block_types/slug/secret/block_documents/name/{name}")
    r.raise_for_status()
    return r.json()


@contextlib.contextmanager
def sql_change(sandbox, do: list[str], undo: Callable[[], None] | list[str]) -> Iterator[None]:
    with psycopg.connect(sandbox.database_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for statement in do:
            conn.execute(statement)
    try:
        yield
    finally:
        if callable(undo):
            undo()
        else:
            with psycopg.connect(sandbox.database_url, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '10s'")
                for statement in undo:
                    conn.execute(statement)


def trigger_function_source(sandbox) -> str:
    with psycopg.connect(sandbox.database_url, autocommit=True) as conn:
        return conn.execute("SELECT pg_get_functiondef('public.notify_prefect_on_batch_insert()'::regprocedure)").fetchone()[0]


def env_only(**env: str) -> Callable[..., Any]:
    @contextlib.contextmanager
    def breaker(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
        yield dict(env)
    return breaker


@contextlib.contextmanager
def wrong_prefect_key(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    yield {"RUNBOOK_SANDBOX_DIR": str(copied_sandbox_env(sandbox, tmp, "PREFECT_API_KEY", "pnu_" + "0" * 36))}


@contextlib.contextmanager
def wrong_supabase_token(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    yield {"RUNBOOK_SANDBOX_DIR": str(copied_sandbox_env(sandbox, tmp, "SUPABASE_ACCESS_TOKEN", "sbp_" + "0" * 40))}


@contextlib.contextmanager
def paused_pool(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    with prefect_gateway.api(sandbox) as client:
        client.patch(f"work_pools/{sandbox.prefect.work_pool}", json={"is_paused": True}).raise_for_status()
        try:
            yield {}
        finally:
            client.patch(f"work_pools/{sandbox.prefect.work_pool}", json={"is_paused": False}).raise_for_status()


@contextlib.contextmanager
def pool_without_pip_packages(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    """A prefect:managed pool whose base job template is the process worker's (no pip_packages)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    assert "pip_packages" not in template["variables"]["properties"]
    name = f"nb01-no-pip-{uuid.uuid4().hex[:8]}"
    with prefect_gateway.api(sandbox) as client:
        client.post("work_pools/", json={"name": name, "type": "prefect:managed", "base_job_template": template}).raise_for_status()
        try:
            yield {"RUNBOOK_DEPLOYMENT__WORK_POOL": name}
        finally:
            client.delete(f"work_pools/{name}").raise_for_status()


def deleted_block(name: str) -> Callable[..., Any]:
    @contextlib.contextmanager
    def breaker(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
        with prefect_gateway.api(sandbox) as client:
            client.delete(f"block_documents/{block_document(client, name)['id']}").raise_for_status()
        try:
            yield {}
        finally:
            prefect_gateway.ensure_secret_blocks(sandbox)
    return breaker


@contextlib.contextmanager
def dsn_block_with_wrong_password(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    bad = sandbox.database_url.replace(sandbox.postgres.password, "not-the-password-" + uuid.uuid4().hex[:6])
    with prefect_gateway.api(sandbox) as client:
        doc = block_document(client, "postgres-connection-string")
        client.patch(f"block_documents/{doc['id']}", json={"data": {"value": bad}, "merge_existing_data": False}).raise_for_status()
    try:
        yield {}
    finally:
        prefect_gateway.ensure_secret_blocks(sandbox)


@contextlib.contextmanager
def dsn_block_on_another_database(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    """The block's DSN connects, but to another database of the same server than DATABASE_URL's."""
    other = sandbox.database_url.rsplit("/", 1)[0] + "/" + postgres.PREFECT_DATABASE
    with prefect_gateway.api(sandbox) as client:
        doc = block_document(client, "postgres-connection-string")
        client.patch(f"block_documents/{doc['id']}", json={"data": {"value": other}, "merge_existing_data": False}).raise_for_status()
    try:
        yield {}
    finally:
        prefect_gateway.ensure_secret_blocks(sandbox)


@contextlib.contextmanager
def renamed_column(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    with sql_change(sandbox, ["ALTER TABLE public.client_workflow_configs RENAME COLUMN config TO settings"],
                    ["ALTER TABLE public.client_workflow_configs RENAME COLUMN settings TO config"]):
        yield {}


@contextlib.contextmanager
def renamed_enum_value(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    with sql_change(sandbox, ["ALTER TYPE enrichmenttype RENAME VALUE 'ASYNC' TO 'ASYNCHRONOUS'"],
                    ["ALTER TYPE enrichmenttype RENAME VALUE 'ASYNCHRONOUS' TO 'ASYNC'"]):
        yield {}


@contextlib.contextmanager
def dropped_unique_constraint(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    with sql_change(sandbox, ["ALTER TABLE public.workflow_states DROP CONSTRAINT workflow_states_batch_item_step_key"],
                    ["ALTER TABLE public.workflow_states ADD CONSTRAINT workflow_states_batch_item_step_key "
                     "UNIQUE (batch_id, item_id, step_name)"]):
        yield {}


@contextlib.contextmanager
def no_http_post(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    signature = "net.http_post(text,jsonb,jsonb,jsonb,integer)"
    with sql_change(sandbox, [f"ALTER FUNCTION {signature} RENAME TO http_post_gone"],
                    ["ALTER FUNCTION net.http_post_gone(text,jsonb,jsonb,jsonb,integer) RENAME TO http_post"]):
        yield {}


@contextlib.contextmanager
def dropped_trigger(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    with sql_change(sandbox, ["DROP TRIGGER trigger_batch_ready ON public.batches"], lambda: postgres.install_trigger(sandbox)):
        yield {}


@contextlib.contextmanager
def trigger_posting_elsewhere(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    source = trigger_function_source(sandbox)
    assert f"'{sandbox.edge_function_url}'" in source
    changed = source.replace(sandbox.edge_function_url, "http://127.0.0.1:9/functions/v1/an-old-function")
    with sql_change(sandbox, [changed], lambda: postgres.install_trigger(sandbox)):
        yield {}


@contextlib.contextmanager
def deleted_function_secret(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    """PREFECT_WORKSPACE_ID removed through the Management API, then restored with its known value."""
    name, value = "PREFECT_WORKSPACE_ID", sandbox.prefect.workspace_id
    url = f"{sandbox.supabase_api_url}/v1/projects/{sandbox.supabase.project_ref}/secrets"
    headers = {"Authorization": f"Bearer {sandbox.supabase.access_token}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        listed = {s["name"]: s["value"] for s in client.get(url).raise_for_status().json()}
        assert listed[name] == hashlib.sha256(value.encode()).hexdigest()  # restored exactly as it was
        client.request("DELETE", url, json=[name]).raise_for_status()
        try:
            yield {}
        finally:
            client.post(url, json=[{"name": name, "value": value}]).raise_for_status()



@contextlib.contextmanager
def unreachable_repository(sandbox, tmp: Path) -> Iterator[dict[str, str]]:
    yield {"RUNBOOK_SOURCE__REPO_URL": f"{sandbox.git_base_url}/bencrane/no-such-repository.git"}


DEPENDENTS_OF_PREFECT = {"prefect.work_pool", "prefect.work_pool_type", "prefect.work_pool_active",
                         "prefect.work_pool_pip_packages", "blocks.database_url", "blocks.referenced", "database.block_dsn",
                         "job_variables.schema"}
# case: (breaker, the one failing check, checks skipped because they depend on it, words the detail holds)
BREAKAGES: dict[str, tuple[Callable[..., Any], str, set[str], tuple[str, ...]]] = {
    "wrong_prefect_key": (wrong_prefect_key, "prefect.api", DEPENDENTS_OF_PREFECT, ("401",)),
    "missing_pool": (env_only(RUNBOOK_DEPLOYMENT__WORK_POOL="no-such-pool"), "prefect.work_pool",
                     {"prefect.work_pool_type", "prefect.work_pool_active", "prefect.work_pool_pip_packages",
                      "job_variables.schema"}, ("no-such-pool",)),
    "wrong_pool_type": (env_only(RUNBOOK_DEPLOYMENT__WORK_POOL_TYPE="process"), "prefect.work_pool_type",
                        {"job_variables.schema"}, ("prefect:managed", "process")),
    "paused_pool": (paused_pool, "prefect.work_pool_active", set(), ("paused",)),
    "pool_without_pip_packages": (pool_without_pip_packages, "prefect.work_pool_pip_packages", {"job_variables.schema"},
                                  ("pip_packages",)),
    "missing_dsn_block": (deleted_block("postgres-connection-string"), "blocks.database_url", {"database.block_dsn"},
                          ("does not exist",)),
    "missing_referenced_block": (deleted_block("modal-token-secret"), "blocks.referenced", set(),
                                 ("modal-token-secret", "CRASH")),
    "dsn_block_does_not_connect": (dsn_block_with_wrong_password, "database.block_dsn", set(), ("does not connect",)),
    "dsn_block_on_another_database": (dsn_block_on_another_database, "database.block_dsn", set(),
                                      ("'prefect'", "not the one of DATABASE_URL")),
    "missing_column": (renamed_column, "database.tables", set(), ("client_workflow_configs", "config")),
    "missing_enum_value": (renamed_enum_value, "database.enums", set(), ("enrichmenttype lacks ASYNC",)),
    "no_unique_constraint": (dropped_unique_constraint, "database.unique_constraint", set(), ("ON CONFLICT",)),
    "no_pg_net": (no_http_post, "database.pg_net", set(), ("net.http_post",)),
    "trigger_dropped": (dropped_trigger, "database.trigger", {"database.trigger_target", "database.trigger_secrets"},
                        ("trigger_batch_ready",)),
    "trigger_posts_elsewhere": (trigger_posting_elsewhere, "database.trigger_target", set(), ("an-old-function",)),
    "repository_unreachable": (unreachable_repository, "source.reachable",
                               {"source.branch", "source.entrypoint_file", "source.flow_function", "source.flow_parameters",
                                "packages.imports"}, ("no-such-repository",)),
    "branch_absent": (env_only(RUNBOOK_SOURCE__BRANCH="release/absent"), "source.branch",
                      {"source.entrypoint_file", "source.flow_function", "source.flow_parameters", "packages.imports"},
                      ("release/absent", "main")),
    "entrypoint_missing": (env_only(RUNBOOK_SOURCE__ENTRYPOINT="src/missing_flow.py:orchestrator_main"), "source.entrypoint_file",
                           {"source.flow_function", "source.flow_parameters", "packages.imports"}, ("src/missing_flow.py",)),
    "not_a_flow": (env_only(RUNBOOK_SOURCE__ENTRYPOINT="src/orchestrator.py:get_database_url"), "source.flow_function",
                   {"source.flow_parameters"}, ("get_database_url", "@flow")),
    "parameter_not_taken": (env_only(RUNBOOK_DEPLOYMENT__PARAMETERS=json.dumps({"batch_size": 50, "batch_limit": 10})),
                            "source.flow_parameters", set(), ("batch_limit",)),
    "uncovered_import": (env_only(RUNBOOK_DEPLOYMENT__PIP_PACKAGES=json.dumps(["modal", "python-dotenv"])), "packages.imports",
                         set(), ("import psycopg2", "psycopg2-binary")),
    "wrong_supabase_token": (wrong_supabase_token, "supabase.api", {"supabase.function_secrets"}, ("401",)),
    "missing_function_secret": (deleted_function_secret, "supabase.function_secrets", set(), ("PREFECT_WORKSPACE_ID", "500")),
}



# -- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthy(sandbox, tmp_path_factory) -> Run:
    return run_notebook(sandbox.state, tmp_path_factory.mktemp("nb01-healthy"))


@pytest.mark.timeout(300)
def test_healthy_sandbox_passes_every_check(healthy, sandbox, sandbox_env):
    assert healthy.error is None
    assert healthy.results["status"] == "passed"
    assert {c["id"] for c in healthy.results["checks"]} == ALL_CHECKS
    assert healthy.ids("fail") == set() and healthy.ids("skip") == set()
    # Warnings only where this machine differs from the plan (Python 3.14 is the only one possible).
    assert healthy.ids("warn") <= {"local.python"}
    assert "3.12" in healthy.check("local.python")["detail"]
    assert healthy.check("source.repo_url")["data"]["url"].endswith(".git")
    assert "anon key" in healthy.check("database.trigger_secrets")["detail"]
    assert "psycopg2" in healthy.check("packages.imports")["detail"]
    assert_no_secrets(healthy, secret_values(sandbox, sandbox_env))
    # The executed notebook is the record: the checks are shown there, by group.
    text = healthy.notebook.read_text()
    for check_id in ("prefect.work_pool_pip_packages", "database.trigger_target", "supabase.function_secrets"):
        assert check_id in text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(BREAKAGES))
def test_one_breakage_fails_exactly_its_check(case, sandbox, sandbox_env, tmp_path):
    breaker, failed, skipped, words = BREAKAGES[case]
    with breaker(sandbox, tmp_path) as env:
        run = run_notebook(sandbox.state, tmp_path / "out", env)
    assert run.error is not None, f"{case}: the notebook passed"
    assert run.error.ename == "ChecksFailed" and "verdict()" in run.error.source  # failed at the verdict cell
    assert failed in run.error.evalue
    assert run.results["status"] == "failed"
    assert run.ids("fail") == {failed}
    assert run.ids("skip") == skipped
    assert {c["id"] for c in run.results["checks"]} == ALL_CHECKS  # one failure hid no other check
    check = run.check(failed)
    assert check["remediation"].strip(), f"{failed} failed without a remediation"
    for word in words:
        assert word in check["detail"], f"{failed}: {word!r} not in {check['detail']!r}"
    for other in ALL_CHECKS - {failed} - skipped:
        assert run.check(other)["status"] in ("pass", "warn"), f"{case}: {other} is {run.check(other)['status']}"
    for skip in skipped:
        assert "skipped" in run.check(skip)["detail"]
    secrets = secret_values(sandbox, sandbox_env)
    if case == "wrong_prefect_key":
        secrets["the wrong key"] = "pnu_" + "0" * 36
    assert_no_secrets(run, secrets)


@pytest.mark.timeout(300)
def test_warnings_do_not_fail_the_step(sandbox, sandbox_env, tmp_path):
    """A URL without .git (normalised), a service_role JWT in the trigger function, prefect in
    pip_packages: each is a WARN with a remediation; the step still passes."""
    source = trigger_function_source(sandbox)
    assert sandbox.supabase.anon_key in source
    leaky = source.replace(sandbox.supabase.anon_key, sandbox.supabase.service_role_key)
    env = {
        "RUNBOOK_SOURCE__REPO_URL": f"{sandbox.git_base_url}/{sandbox.git.owner}/{sandbox.git.repo}",
        "RUNBOOK_DEPLOYMENT__PIP_PACKAGES": json.dumps(["psycopg2-binary", "modal", "python-dotenv", "prefect"]),
    }
    with sql_change(sandbox, [leaky], lambda: postgres.install_trigger(sandbox)):
        run = run_notebook(sandbox.state, tmp_path / "out", env)
    assert run.error is None and run.results["status"] == "passed"
    assert {"source.repo_url", "database.trigger_secrets", "packages.requirements"} <= run.ids("warn")
    assert run.ids("fail") == set() and run.ids("skip") == set()
    url = run.check("source.repo_url")
    assert "fsspec" in url["detail"] and url["data"]["url"] == sandbox.repo_url and sandbox.repo_url in url["remediation"]
    leak = run.check("database.trigger_secrets")
    assert "service_role" in leak["detail"] and "rotate" in leak["remediation"]
    assert "prefect" in run.check("packages.requirements")["remediation"]
    # The normalised URL was used: the repository checks passed through it.
    assert run.check("source.branch")["status"] == "pass"
    assert_no_secrets(run, secret_values(sandbox, sandbox_env))


# -- the pure parts -------------------------------------------------------------------------------


def test_repo_url_normalisation():
    assert normalise_repo_url("https://github.com/bencrane/data-enrichment-orchestration-v1") == (
        "https://github.com/bencrane/data-enrichment-orchestration-v1.git", True)
    assert normalise_repo_url("https://github.com/o/r/") == ("https://github.com/o/r.git", True)
    assert normalise_repo_url("https://github.com/o/r.git") == ("https://github.com/o/r.git", False)
    assert normalise_repo_url("git@github.com:o/r") == ("git@github.com:o/r", False)


def test_clear_text_secret_detection_names_kinds_never_values():
    anon, service = _anon_key(JWT_SECRET, "abcdefghijklmnopqrst"), _anon_key(JWT_SECRET, "abcdefghijklmnopqrst", "service_role")
    assert clear_text_secrets(f"headers := '{{\"Authorization\": \"Bearer {anon}\"}}'", public=(anon,)) == []
    assert clear_text_secrets(f"'Bearer {anon}'") == []  # an anon JWT is public even when not configured
    found = clear_text_secrets(f"'Bearer {service}'", public=(anon,))
    assert found == ["a JWT with role 'service_role'"]
    token = "sbp_" + "a1" * 20
    found = clear_text_secrets(f"x := '{token}'; y := 'postgresql://u:hunter2pass@db:5432/p'; password := 'p4ss'",
                               known={"PREFECT_API_KEY": "pnu_" + "b" * 36})
    assert found == ["a Supabase access token (sbp_...)", "a URL with a password", "a password literal"]
    assert not any(token in f or "hunter2pass" in f for f in found)
    assert clear_text_secrets("k := 'pnu_" + "c" * 36 + "'") == ["a Prefect API key (pnu_...)"]
    assert clear_text_secrets("v := 'my-known-secret-value'", known={"MODAL_TOKEN_SECRET": "my-known-secret-value"}) == [
        "the value of MODAL_TOKEN_SECRET"]


def test_python_314_is_a_warning_naming_the_runtime_version(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 14, 0, "final", 0))
    check = python_outcome("3.12")
    assert check.status.value == "warn" and "3.14.0" in check.detail and "3.12" in check.detail
    assert "3.12" in check.remediation
    monkeypatch.setattr(sys, "version_info", (3, 12, 7, "final", 0))
    check = python_outcome("3.12")
    assert check.status.value == "pass" and "same version" in check.detail
