"""Notebook 02 (merge check), run with papermill against the sandbox's git server.

Each test seeds its own copy of the orchestrator repository on the sandbox git server (so the
shared repository stays as seeded) and points the profile at it with RUNBOOK_SOURCE__REPO_URL.
Pushes are observed in the git server's request log (a push is a POST to git-receive-pack) and in
the refs of the bare repository itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from runbook_lib.core.errors import RunbookError
from runbook_lib.notebook.context import start_step
from runbook_lib.source.flow import parse, secret_loads
from runbook_lib.steps.merge_check import MergeCheck, _branch_name, _raises_outside_handler, block_loading
from runbook_sandbox.git_seed import FEATURE_BRANCH, MAIN_BRANCH, ORCHESTRATOR, repo_path, seed_repository
from tests.integration import notebook_runs
from tests.integration.notebook_runs import Run

STEP = "02_merge_check"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@dataclass
class Repo:
    name: str
    url: str
    bare: Path

    def refs(self) -> dict[str, str]:
        out = git("for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", cwd=self.bare)
        return dict(line.split() for line in out.splitlines())

    def commit_on_main(self, tmp: Path, path: str, change) -> str:
        """A commit on main, pushed straight into the bare repository (not over HTTP)."""
        work = tmp / f"work-{uuid.uuid4().hex[:6]}"
        git("clone", "-q", "--branch", MAIN_BRANCH, str(self.bare), str(work))
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(change(target.read_text() if target.exists() else ""))
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"Change {path} on main", cwd=work)
        git("push", "-q", "origin", MAIN_BRANCH, cwd=work)
        return git("rev-parse", "HEAD", cwd=work)


@pytest.fixture
def repo(sandbox) -> Iterator[Repo]:
    """A fresh copy of the seeded repository: main, and feature/secret-blocks one commit ahead."""
    name = f"nb02-{uuid.uuid4().hex[:8]}"
    bare = seed_repository(sandbox, repo=name, merged=False)
    yield Repo(name, f"{sandbox.git_base_url}/{sandbox.git.owner}/{name}.git", bare)
    shutil.rmtree(repo_path(sandbox, repo=name), ignore_errors=True)


def receive_pack_posts(sandbox, repo: Repo) -> list[dict[str, Any]]:
    path = sandbox.request_log_path("git")
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r["method"] == "POST" and r["path"] == f"/{sandbox.git.owner}/{repo.name}.git/git-receive-pack"]


def run_notebook(sandbox, out_dir: Path, repo: Repo | None, **parameters: Any) -> Run:
    """Notebook 02, headless, on `repo`: the executed notebook in `out_dir`, the results in `out_dir/run`."""
    return notebook_runs.run_notebook(STEP, sandbox.state, out_dir / "run", parameters,
                                      {"RUNBOOK_SOURCE__REPO_URL": repo.url if repo else ""},
                                      output=out_dir / f"{STEP}.ipynb", timeout=180)


def assert_no_secrets(run: Run, sandbox, sandbox_env: dict[str, str]) -> None:
    notebook_runs.assert_no_secrets(run, {
        "GITHUB_TOKEN": sandbox_env["GITHUB_TOKEN"], "PREFECT_API_KEY": sandbox_env["PREFECT_API_KEY"],
        "SUPABASE_ACCESS_TOKEN": sandbox_env["SUPABASE_ACCESS_TOKEN"], "DATABASE_PASSWORD": sandbox.postgres.password,
        "MODAL_TOKEN_SECRET": sandbox_env["MODAL_TOKEN_SECRET"]})


# -- through papermill ----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_merges_the_seeded_branch_once_then_is_a_no_op(sandbox, sandbox_env, repo, tmp_path):
    before = repo.refs()
    feature_sha = before[f"refs/heads/{FEATURE_BRANCH}"]

    # Headless without confirm: the plan is shown, the gate refuses, nothing is pushed.
    refused = run_notebook(sandbox, tmp_path / "refused", repo)
    assert refused.error is not None and refused.error.ename == "NotConfirmed"
    assert "merge.propose()" in refused.error.source
    assert refused.results["status"] == "failed" and "confirm" in refused.results["error"]
    assert refused.results["gate"]["decision"] == "rejected" and refused.results["gate"]["mode"] == "headless"
    assert refused.results["values"]["before"]["merged"] is False
    assert len(refused.results["values"]["before"]["ahead"]) == 1
    assert refused.results["values"]["before"]["files"] == [f"M\t{ORCHESTRATOR.as_posix()}"]
    assert repo.refs() == before and receive_pack_posts(sandbox, repo) == []

    # Confirmed: fast-forward main to the feature branch, push with the token, verify.
    merged = run_notebook(sandbox, tmp_path / "merged", repo, confirm=True)
    assert merged.error is None, merged.error
    assert merged.results["status"] == "passed"
    assert merged.results["gate"]["decision"] == "approved"
    assert merged.results["values"]["action"] == "fast-forward"
    after = repo.refs()
    assert after[f"refs/heads/{MAIN_BRANCH}"] == feature_sha == merged.results["values"]["pushed_sha"]
    posts = receive_pack_posts(sandbox, repo)
    assert len(posts) == 1 and posts[0]["status"] == 200 and posts[0]["authenticated"] is True
    assert {c["id"]: c["status"] for c in merged.results["checks"]} == {
        "merge.merged": "pass", "merge.entrypoint_loads_block": "pass", "merge.load_error_handled": "pass"}
    assert "postgres-connection-string" in merged.check("merge.entrypoint_loads_block")["detail"]

    # Again, without confirm: already merged, a no-op that says so; nothing pushed.
    again = run_notebook(sandbox, tmp_path / "again", repo)
    assert again.error is None, again.error
    assert again.results["status"] == "passed" and again.results["gate"] is None
    assert again.results["values"]["action"] == "none: already merged"
    assert "already merged" in again.notebook.read_text()
    assert repo.refs() == after
    assert len(receive_pack_posts(sandbox, repo)) == 1  # no receive-pack POST on the second run

    for run in (refused, merged, again):
        assert_no_secrets(run, sandbox, sandbox_env)


@pytest.mark.timeout(300)
def test_diverged_branches_get_a_merge_commit(sandbox, sandbox_env, repo, tmp_path):
    main_sha = repo.commit_on_main(tmp_path, "docs/OPERATIONS.md", lambda _: "# Operations\n")
    feature_sha = repo.refs()[f"refs/heads/{FEATURE_BRANCH}"]
    run = run_notebook(sandbox, tmp_path / "run", repo, confirm=True)
    assert run.error is None, run.error
    assert run.results["values"]["action"] == "merge commit"
    assert run.results["values"]["before"]["behind"] and run.results["values"]["before"]["ahead"]
    head = repo.refs()[f"refs/heads/{MAIN_BRANCH}"]
    assert git("rev-list", "--parents", "-n", "1", head, cwd=repo.bare).split()[1:] == [main_sha, feature_sha]
    assert git("cat-file", "-t", f"{head}:docs/OPERATIONS.md", cwd=repo.bare) == "blob"
    assert run.check("merge.merged")["status"] == "pass"
    assert len(receive_pack_posts(sandbox, repo)) == 1
    assert_no_secrets(run, sandbox, sandbox_env)


@pytest.mark.timeout(300)
def test_a_conflict_aborts_cleanly_and_pushes_nothing(sandbox, sandbox_env, repo, tmp_path):
    repo.commit_on_main(tmp_path, ORCHESTRATOR.as_posix(), lambda text: text.replace(
        'url = os.environ.get("DATABASE_URL")', 'url = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL")'))
    before = repo.refs()
    run = run_notebook(sandbox, tmp_path / "run", repo, confirm=True)
    assert run.error is not None and run.error.ename == "MergeConflict"
    assert "merge.apply()" in run.error.source
    assert run.results["status"] == "failed"
    assert ORCHESTRATOR.as_posix() in run.results["error"] and "nothing was pushed" in run.results["error"]
    assert repo.refs() == before
    assert receive_pack_posts(sandbox, repo) == []
    assert_no_secrets(run, sandbox, sandbox_env)


@pytest.mark.timeout(300)
def test_an_absent_feature_branch_is_a_clear_error(sandbox, repo, tmp_path):
    run = run_notebook(sandbox, tmp_path / "run", repo, feature_branch="feature/absent")
    assert run.error is not None and run.error.ename == "GitError" and "merge.inspect()" in run.error.source
    assert "feature/absent" in run.results["error"] and "main" in run.results["error"]
    assert receive_pack_posts(sandbox, repo) == []


# -- the library, directly ------------------------------------------------------------------------


def test_verify_on_an_unmerged_target_fails_naming_what_is_missing(sandbox, repo, tmp_path):
    env = {"RUNBOOK_SANDBOX_DIR": str(sandbox.state), "RUNBOOK_SOURCE__REPO_URL": repo.url}
    ctx = start_step(STEP, "sandbox", run_dir=tmp_path / "run", environ=env, install_hooks=False)
    check = MergeCheck(ctx)
    try:
        report = check.verify()
    finally:
        check.close()
    statuses = {c.id: c.status.value for c in report.checks}
    assert statuses == {"merge.merged": "fail", "merge.entrypoint_loads_block": "fail", "merge.load_error_handled": "skip"}
    assert "confirm=True" in report.get("merge.merged").remediation
    loads = report.get("merge.entrypoint_loads_block")
    assert "no Secret.load('postgres-connection-string')" in loads.detail and loads.remediation


def test_bad_branch_names_are_refused_before_anything_runs(sandbox, tmp_path):
    for bad in ("-rf", "a..b", "", "with space"):
        with pytest.raises(RunbookError, match="branch"):
            _branch_name(bad, "feature_branch")
    env = {"RUNBOOK_SANDBOX_DIR": str(sandbox.state)}
    ctx = start_step(STEP, "sandbox", run_dir=tmp_path / "run", environ=env, install_hooks=False)
    with pytest.raises(RunbookError, match="both 'main'"):
        MergeCheck(ctx, feature_branch="main")


SWALLOWING = '''
import os
from prefect.blocks.system import Secret

BLOCK = "postgres-connection-string"


def silent():
    try:
        return Secret.load(BLOCK).get()
    except Exception:
        return os.environ.get("DATABASE_URL")


def loud():
    try:
        value = Secret.load("postgres-connection-string").get()
    except Exception:
        value = None
    if not value:
        raise RuntimeError("no DSN")
    return value
'''


def test_a_swallowed_load_is_told_apart_from_one_that_still_fails():
    tree = parse(SWALLOWING, "src/o.py")
    loads = {l.function: l for l in secret_loads(tree)}
    assert loads["silent"].block == "postgres-connection-string"  # the module constant is resolved
    assert loads["silent"].swallowed and loads["loud"].swallowed
    assert _raises_outside_handler(tree, loads["silent"]) is None
    assert _raises_outside_handler(tree, loads["loud"]) == 21
    files = {"src/o.py": SWALLOWING + "\nfrom prefect import flow\n\n@flow\ndef main():\n    return silent()\n"}
    loading = block_loading(files, "src/o.py:main")
    assert [(path, load.function, line) for path, load, line in loading.of("postgres-connection-string")] == [
        ("src/o.py", "silent", None), ("src/o.py", "loud", 21)]
