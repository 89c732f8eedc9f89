"""runbook_lib.checks.source: the repository and package checks, run through the mechanism
(`run_checks(Facts(...), source.REPOSITORY + source.PACKAGES)`) against real bare git repositories
in a temporary directory (file:// URLs). No network: the one http URL points at a closed loopback port."""

from __future__ import annotations

import socket

import pytest

from runbook_lib.checks import Facts, Status, run_checks, source
from runbook_lib.checks.base import CheckReport
from tests.unit.flow_sources import (
    COMPUTED_NAME,
    ENTRYPOINT,
    HELPER,
    NOT_A_FLOW,
    ORCHESTRATOR,
    REQUIRED_PARAMETER,
    WITH_HELPER,
)

STEP = "01_verify_prerequisites"
GROUP = source.REPOSITORY + source.PACKAGES
IDS = ["source.repo_url", "source.reachable", "source.branch", "source.entrypoint_file", "source.flow_function",
       "source.flow_parameters", "packages.requirements", "packages.imports"]


@pytest.fixture
def run_group(make_settings):
    """`run_group(**overrides)`: the report of the repository and package checks, Facts closed after."""
    opened: list[Facts] = []

    def run(environ=None, **overrides) -> CheckReport:
        facts = Facts(make_settings(environ, **overrides), STEP)
        opened.append(facts)
        return run_checks(facts, GROUP)
    yield run
    for facts in opened:
        facts.close()


def statuses(report: CheckReport) -> dict[str, str]:
    return {c.id: c.status.value for c in report.checks}


def test_the_group_holds_the_checks_in_order():
    assert [d.id for d in GROUP] == IDS


def test_a_good_repository_passes_every_check(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR, "README.md": "# flows\n"},
                          "feature/other": {ENTRYPOINT: NOT_A_FLOW}})
    report = run_group(source__repo_url=remote.url)
    assert report.step == STEP and [c.id for c in report.checks] == IDS
    assert set(statuses(report).values()) == {"pass"}, report.to_json()
    assert report.ok and report.counts() == {"pass": 8, "warn": 0, "fail": 0, "skip": 0}
    assert report.get("source.repo_url").detail == remote.url and report.get("source.repo_url").data == {"url": remote.url}
    assert report.get("source.reachable").detail == "2 branch(es), read without credentials"
    branch = report.get("source.branch")
    assert branch.title == "Branch 'main' exists"
    assert branch.detail == f"main is at {remote.shas['main']}" and branch.data["commit_sha"] == remote.shas["main"]
    assert report.get("source.entrypoint_file").detail == "src/orchestrator.py at 'main'"
    flow = report.get("source.flow_function")
    assert "is a flow named 'orchestrator_main'" in flow.detail and flow.data == {"flow_name": "orchestrator_main"}
    assert report.get("source.flow_parameters").detail == (
        "deployment parameters batch_size=50; flow parameters: batch_size, batch_id, time_budget_seconds")
    assert "psycopg2-binary, modal, python-dotenv" in report.get("packages.requirements").detail
    imports = report.get("packages.imports").detail
    assert imports == ("9 top-level imports in 1 file(s) covered: __future__, dotenv, json, logging, modal, os, "
                       "prefect, psycopg2, typing")
    assert all(c.remediation == "" for c in report.checks)


def test_the_other_branch_is_read_when_the_profile_names_it(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: NOT_A_FLOW}, "release": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url, source__branch="release")
    assert set(statuses(report).values()) == {"pass"}
    assert report.get("source.branch").data["sha"] == remote.shas["release"]


def test_a_missing_branch_fails_and_the_checks_that_need_it_skip_naming_it(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}, "feature/x": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url, source__branch="release")
    assert statuses(report) == {
        "source.repo_url": "pass", "source.reachable": "pass", "source.branch": "fail",
        "source.entrypoint_file": "skip", "source.flow_function": "skip", "source.flow_parameters": "skip",
        "packages.requirements": "pass", "packages.imports": "skip",
    }
    failed = report.get("source.branch")
    assert failed.title == "Branch 'release' exists"
    assert failed.detail == "branch 'release' does not exist in the repository (branches: feature/x, main)"
    assert failed.data == {"branches": ["feature/x", "main"]}
    assert failed.remediation.startswith("push the branch, or set source.branch to an existing one (")
    assert "RUNBOOK_SOURCE__BRANCH" in failed.remediation and "[source]" in failed.remediation
    for id in ("source.entrypoint_file", "source.flow_function", "source.flow_parameters", "packages.imports"):
        skipped = report.get(id)
        assert skipped.detail == "skipped: needs branch 'release', which check source.branch could not establish", id
        assert skipped.remediation == ""
    assert [c.id for c in report.failures] == ["source.branch"] and not report.ok


def test_an_entrypoint_that_is_not_a_flow_fails_naming_the_flows_of_the_file(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: NOT_A_FLOW}})
    report = run_group(source__repo_url=remote.url)
    assert statuses(report)["source.flow_function"] == "fail"
    assert statuses(report)["source.flow_parameters"] == "skip"
    assert statuses(report)["packages.imports"] == "pass"  # the imports are read all the same
    failed = report.get("source.flow_function")
    assert "orchestrator_main (line" in failed.detail
    assert "is not decorated with @flow (decorators: task(retries=2)): Prefect cannot deploy it" in failed.detail
    assert failed.data == {"flows": ["advance_completed_items", "dispatch_pending_items"]}
    assert ("point source.entrypoint at a @flow function (src/orchestrator.py:advance_completed_items, "
            "src/orchestrator.py:dispatch_pending_items;") in failed.remediation
    assert "or decorate orchestrator_main with @flow" in failed.remediation
    assert report.get("source.flow_parameters").detail == (
        "skipped: orchestrator_main is not a flow (see source.flow_function)")


def test_an_entrypoint_function_that_does_not_exist_fails_listing_the_flows(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url, source__entrypoint="src/orchestrator.py:main_flow")
    failed = report.get("source.flow_function")
    assert failed.status is Status.FAIL
    assert "has no module-level function 'main_flow'" in failed.detail
    assert failed.remediation.startswith(
        "set source.entrypoint to a @flow function (advance_completed_items, dispatch_pending_items, orchestrator_main;")
    assert report.get("source.flow_parameters").detail == (
        "skipped: needs the analysis of main_flow, which check source.flow_function could not establish")


def test_a_flow_name_computed_at_import_time_fails(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: COMPUTED_NAME}})
    report = run_group(source__repo_url=remote.url)
    failed = report.get("source.flow_function")
    assert failed.status is Status.FAIL and "computed at import time" in failed.detail
    assert failed.remediation == 'give the flow a literal name: @flow(name="...")'
    assert statuses(report)["source.flow_parameters"] == "pass"  # it is a flow: its parameters are checked


def test_a_missing_entrypoint_file_fails_listing_the_python_files(make_remote, run_group):
    remote = make_remote({"main": {"flows/orchestrator.py": ORCHESTRATOR, "setup.py": "", "README.md": ""}})
    report = run_group(source__repo_url=remote.url)
    assert statuses(report) == {
        "source.repo_url": "pass", "source.reachable": "pass", "source.branch": "pass",
        "source.entrypoint_file": "fail", "source.flow_function": "skip", "source.flow_parameters": "skip",
        "packages.requirements": "pass", "packages.imports": "skip",
    }
    failed = report.get("source.entrypoint_file")
    assert failed.detail == "src/orchestrator.py does not exist at 'main' (Python files there: flows/orchestrator.py, setup.py)"
    assert "set source.entrypoint to '<path from the repository root>:<function>'" in failed.remediation
    assert "or push the file to 'main'" in failed.remediation
    assert report.get("source.flow_function").detail == (
        "skipped: src/orchestrator.py is not in the repository (see source.entrypoint_file)")


def test_a_required_flow_parameter_the_deployment_does_not_pass_fails(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: REQUIRED_PARAMETER}})
    report = run_group(source__repo_url=remote.url)
    failed = report.get("source.flow_parameters")
    assert failed.status is Status.FAIL
    assert failed.detail == ("orchestrator_main requires client_id, which the deployment does not pass "
                             "(the Edge Function starts runs with no parameters)")
    assert failed.remediation.startswith("make deployment.parameters match the flow's signature (")
    assert "RUNBOOK_DEPLOYMENT__PARAMETERS" in failed.remediation
    assert [c.id for c in report.failures] == ["source.flow_parameters"]
    # Passing it (and nothing else it does not take) satisfies the check.
    again = run_group(source__repo_url=remote.url, deployment__parameters={"client_id": "c1", "batch_size": 10})
    assert again.get("source.flow_parameters").status is Status.PASS


def test_a_parameter_the_flow_does_not_take_fails(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url, deployment__parameters={"batch_size": 50, "dry_run": True})
    failed = report.get("source.flow_parameters")
    assert failed.status is Status.FAIL
    assert failed.detail.startswith("the deployment passes dry_run, which orchestrator_main"
                                    "(batch_size, batch_id, time_budget_seconds) does not take")
    assert "422" in failed.detail


def test_an_import_not_covered_by_pip_packages_fails_naming_the_distribution(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: WITH_HELPER, "src/scoring.py": HELPER}})
    report = run_group(source__repo_url=remote.url)
    assert [c.id for c in report.failures] == ["packages.imports"]
    failed = report.get("packages.imports")
    assert failed.detail == ("import sklearn is provided neither by the runtime image nor by pip_packages "
                             "(add 'scikit-learn'): the run would crash at start with ModuleNotFoundError")
    assert failed.data == {"missing": {"sklearn": "scikit-learn"}}
    assert failed.remediation.startswith("add 'scikit-learn' to deployment.pip_packages (")
    # Adding the distribution covers it; the repository's own module is not taken for a package.
    again = run_group(source__repo_url=remote.url,
                      deployment__pip_packages=["psycopg2-binary", "modal", "python-dotenv", "scikit-learn"])
    assert again.get("packages.imports").status is Status.PASS
    assert "in 2 file(s) covered" in again.get("packages.imports").detail
    assert "scoring" not in again.get("packages.imports").detail


def test_an_import_missing_from_pip_packages_fails_naming_its_distribution(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url, deployment__pip_packages=["modal"])
    failed = report.get("packages.imports")
    assert failed.status is Status.FAIL
    assert failed.data == {"missing": {"psycopg2": "psycopg2-binary"}}  # dotenv is in the runtime image
    assert "add 'psycopg2-binary'" in failed.detail


def test_a_pinned_package_already_in_the_runtime_image_warns(make_remote, run_group):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}})
    report = run_group(source__repo_url=remote.url,
                       deployment__pip_packages=["psycopg2-binary", "modal", "python-dotenv", "prefect==3.0.0"])
    warned = report.get("packages.requirements")
    assert warned.status is Status.WARN and warned.data == {"redundant": ["prefect==3.0.0"]}
    assert warned.detail.startswith("prefect==3.0.0: already in the managed runtime image")
    assert warned.remediation.startswith("remove prefect==3.0.0 from deployment.pip_packages (")
    assert report.ok  # a warning is not a failure


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_url_without_git_warns_and_the_runbook_uses_it_with_git(run_group, monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{_closed_port()}/owner/flows"
    report = run_group(source__repo_url=url)
    warned = report.get("source.repo_url")
    assert warned.status is Status.WARN and warned.data == {"url": url + ".git"}
    assert warned.detail.startswith(f"{url} does not end in .git; the runbook uses {url}.git.")
    assert "fsspec" in warned.detail
    assert warned.remediation.startswith(f"set the URL with .git: {url}.git (")
    # Nothing listens there: the repository is unreachable, and what needs it skips naming that check.
    reachable = report.get("source.reachable")
    assert reachable.status is Status.FAIL and f"{url}.git" in reachable.detail
    assert reachable.remediation.startswith("the managed runtime clones the repository without credentials")
    assert report.get("source.branch").detail == (
        "skipped: needs the repository, which check source.reachable could not establish")
    assert statuses(report) == {
        "source.repo_url": "warn", "source.reachable": "fail", "source.branch": "skip",
        "source.entrypoint_file": "skip", "source.flow_function": "skip", "source.flow_parameters": "skip",
        "packages.requirements": "pass", "packages.imports": "skip",
    }


def test_a_url_with_credentials_fails_and_everything_that_needs_it_skips(make_settings):
    # The settings refuse such a URL when they load (test_core_settings); the check is a second line.
    settings = make_settings()
    settings.source = settings.source.model_copy(update={"repo_url": "https://deploy:hunter2secret@github.com/owner/flows.git"})
    facts = Facts(settings, STEP)
    try:
        report = run_checks(facts, GROUP)
    finally:
        facts.close()
    failed = report.get("source.repo_url")
    assert failed.status is Status.FAIL
    assert failed.detail.startswith("the repository URL carries credentials")
    assert failed.remediation.startswith("remove them from the URL (set RUNBOOK_REPO_URL in the environment")
    assert "the repository must be public" in failed.remediation
    assert "hunter2secret" not in report.to_json()
    for id in ("source.reachable", "source.branch", "source.entrypoint_file", "source.flow_function",
               "source.flow_parameters", "packages.imports"):
        assert report.get(id).status is Status.SKIP, id
        assert "which check source.repo_url could not establish" in report.get(id).detail, id
    assert statuses(report)["packages.requirements"] == "pass"


def test_an_unreadable_repository_fails_reachable_and_skips_the_rest(tmp_path, run_group):
    report = run_group(source__repo_url=f"file://{tmp_path}/absent.git")
    reachable = report.get("source.reachable")
    assert reachable.status is Status.FAIL and "absent.git" in reachable.detail
    assert "make it public (or fix the URL, set RUNBOOK_REPO_URL" in reachable.remediation
    assert [c.id for c in report.failures] == ["source.reachable"]
    assert report.counts() == {"pass": 2, "warn": 0, "fail": 1, "skip": 5}


def test_an_unset_repository_url_fails_saying_where_to_set_it(run_group):
    report = run_group(source__repo_url="")  # "" unsets the profile's URL
    failed = report.get("source.repo_url")
    assert failed.status is Status.FAIL
    assert "source.repo_url is not set: set RUNBOOK_REPO_URL in the environment" in failed.detail
    assert report.get("source.reachable").status is Status.SKIP


def test_the_checks_share_one_clone_per_step(make_remote, make_settings):
    remote = make_remote({"main": {ENTRYPOINT: ORCHESTRATOR}})
    facts = Facts(make_settings(source__repo_url=remote.url), STEP)
    try:
        run_checks(facts, GROUP)
        repo = facts.git()
        cache = repo._cache
        assert cache is not None and cache.is_dir()
        assert facts.files() is facts.files()  # memoised: one read of the branch's files
        assert list(facts.files()) == [ENTRYPOINT]
    finally:
        facts.close()
    assert not cache.exists()
