"""Notebook 01 with one service of the sandbox down (issue 17): through the sandbox's fault switch
(`sandbox_fault`), on the shared session sandbox, undone whatever happens.

Each service fails alone, as in production: step 01 fails exactly that service's own checks, skips
exactly the checks that truly need what it could not establish (and says so), and every other
check passes on its own. In particular the database is checked with DATABASE_URL alone: a Prefect
outage skips only the comparison of the Secret block's DSN with it, and a database outage leaves
every Prefect check passing (the Prefect server keeps its own storage).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import notebook_runs
from tests.integration.notebook_runs import Run, assert_no_secrets, secret_values
from tests.integration.steps.test_prerequisites import ALL_CHECKS, STEP, copied_sandbox_env

DATABASE_SCHEMA = {"database.tables", "database.enums", "database.unique_constraint", "database.pg_net",
                   "database.trigger", "database.trigger_target", "database.trigger_secrets"}
# service: (the checks that fail, the checks skipped because they need them, words the first failure's detail holds)
CASES: dict[str, tuple[set[str], set[str], tuple[str, ...]]] = {
    "prefect_api": (
        {"prefect.api"},
        {"prefect.work_pool", "prefect.work_pool_type", "prefect.work_pool_active", "prefect.work_pool_pip_packages",
         "blocks.database_url", "blocks.referenced", "database.block_dsn", "job_variables.schema"},
        ("cannot reach the Prefect API",),
    ),
    "database": (
        {"database.connect"},
        {"database.block_dsn"} | DATABASE_SCHEMA,
        ("DATABASE_URL", "Connection refused"),
    ),
    "git": (
        {"source.reachable"},
        {"source.branch", "source.entrypoint_file", "source.flow_function", "source.flow_parameters", "packages.imports"},
        ("unable to access",),
    ),
    "supabase_api": ({"supabase.api"}, {"supabase.function_secrets"}, ("503",)),
    "edge_function": ({"supabase.edge_function"}, set(), ("503", "BOOT_ERROR")),
    # Nothing step 01 reads depends on Modal (the flow runs call it): step 01 passes.
    "modal": (set(), set(), ()),
}


def run_step01(sandbox, out_dir: Path, settings_dir: Path | None = None) -> Run:
    """Step 01 on the sandbox's settings, or on those in `settings_dir` (a changed copy of its sandbox.env)."""
    return notebook_runs.run_notebook(STEP, settings_dir or sandbox.state, out_dir / "run", output=out_dir / f"{STEP}.ipynb",
                                      timeout=180)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("service", list(CASES))
def test_one_service_down_fails_exactly_its_checks(service, sandbox, sandbox_env, sandbox_fault, tmp_path):
    failed, skipped, words = CASES[service]
    with sandbox_fault(service, "down"):
        run = run_step01(sandbox, tmp_path)
    assert {c["id"] for c in run.results["checks"]} == ALL_CHECKS  # one outage hid no check
    assert run.ids("fail") == failed, f"{service}: failed {run.ids('fail')}"
    assert run.ids("skip") == skipped, f"{service}: skipped {run.ids('skip')}"
    assert run.ids("pass") | run.ids("warn") == ALL_CHECKS - failed - skipped
    if not failed:
        assert run.error is None and run.results["status"] == "passed"
        return
    assert run.error is not None and run.error.ename == "ChecksFailed" and "verdict()" in run.error.source
    assert run.results["status"] == "failed"
    for check_id in failed:
        assert check_id in run.error.evalue
        assert run.check(check_id)["remediation"].strip()
    first = run.check(min(failed))
    for word in words:
        assert word in first["detail"], f"{service}: {word!r} not in {first['detail']!r}"
    # Each skip names what it needed and the failed check that could not establish it.
    for check_id in skipped:
        detail = run.check(check_id)["detail"]
        assert detail.startswith("skipped: needs") and any(f"check {f}" in detail for f in failed), (check_id, detail)
    assert_no_secrets(run, secret_values(sandbox, sandbox_env))


@pytest.mark.timeout(400)
def test_the_database_slow_past_the_connect_timeout_is_reported_as_the_database(sandbox, sandbox_env, sandbox_fault,
                                                                                tmp_path):
    """A database that answers too slowly (each exchange 15 s) is the database's failure too, not Prefect's;
    the connect timeout is the one DATABASE_URL names (libpq's `connect_timeout`, 2 s here; 10 s when it
    names none, tests/unit/test_systems_database.py), and the detail says which it was and what sets it."""
    url = sandbox_env["DATABASE_URL"]
    settings = copied_sandbox_env(sandbox, tmp_path, "DATABASE_URL", url + ("&" if "?" in url else "?") + "connect_timeout=2")
    with sandbox_fault("database", "slow", delay_ms=15000):
        run = run_step01(sandbox, tmp_path, settings)
    assert run.ids("fail") == {"database.connect"}
    assert run.ids("skip") == {"database.block_dsn"} | DATABASE_SCHEMA
    detail = run.check("database.connect")["detail"]
    assert "connection timeout expired (after 2 s: the URL's connect_timeout" in detail, detail
    assert_no_secrets(run, secret_values(sandbox, sandbox_env))


# -- the step that uses the service --------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_merge_check_with_git_down_fails_naming_the_repository_and_pushes_nothing(sandbox, sandbox_fault, tmp_path):
    """Step 02 reads and merges through git: with the GitHub stand-in down it fails, and says it could
    not reach the repository (not a missing branch, not a merge conflict)."""
    with sandbox_fault("git", "down"):
        run = notebook_runs.run_notebook("02_merge_check", sandbox.state, tmp_path / "run", {}, {},
                                         output=tmp_path / "02.ipynb", timeout=180)
    assert run.error is not None and run.results["status"] == "failed"
    error = run.results["error"]
    assert error.startswith("git: ") and "unable to access" in error and sandbox.repo_url.removesuffix(".git") in error
    assert "conflict" not in error.lower() and "does not exist" not in error
    assert run.results["gate"] is None  # stopped before any plan was offered: nothing could be merged or pushed
    assert run.results["values"] == {}
