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
from runbook_sandbox.git_seed import DEFAULT_SOURCE_DIR, FEATURE_BRANCH, MAIN_BRANCH, ORCHESTRATOR, repo_path, seed_repository
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
    assert refused.results["status"] == "not_confirmed" and "confirm" in refused.results["error"]
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
def test_a_conflict_is_shown_before_the_gate_and_pushes_nothing(sandbox, sandbox_env, repo, tmp_path):
    repo.commit_on_main(tmp_path, ORCHESTRATOR.as_posix(), lambda text: text.replace(
        'url = os.environ.get("DATABASE_URL")', 'url = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL")'))
    before = repo.refs()
    run = run_notebook(sandbox, tmp_path / "run", repo, confirm=True)
    assert run.error is not None and run.error.ename == "MergeConflict"
    assert "merge.propose()" in run.error.source  # previewed against the current main: nothing to approve
    assert run.results["status"] == "failed" and run.results["gate"] is None
    assert ORCHESTRATOR.as_posix() in run.results["error"] and "nothing was pushed" in run.results["error"]
    assert run.results["values"]["before"]["preview"]["conflicts"] == [ORCHESTRATOR.as_posix()]
    assert run.check("merge.merged")["status"] == "fail" and "rebase" in run.check("merge.merged")["remediation"]
    assert repo.refs() == before
    assert receive_pack_posts(sandbox, repo) == []
    assert_no_secrets(run, sandbox, sandbox_env)


@pytest.mark.timeout(300)
def test_an_absent_branch_when_main_lacks_the_change_fails_naming_the_branches_that_have_it(sandbox, repo, tmp_path):
    run = run_notebook(sandbox, tmp_path / "run", repo, feature_branch="feature/absent")
    assert run.error is not None and run.error.ename == "ChecksFailed" and "merge.propose()" in run.error.source
    check = run.check("merge.merged")
    assert check["status"] == "fail" and "feature/absent" in check["detail"] and "does not exist" in check["detail"]
    assert FEATURE_BRANCH in check["remediation"] and check["data"]["candidates"] == [FEATURE_BRANCH]
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


# -- histories that moved on: rebased, cherry-picked, squash-merged, deleted branches -----------------


class History:
    """A work clone of a test repository on the git server's disk, to build a history and push it
    straight into the bare repository (as a team's pushes would leave it)."""

    def __init__(self, repo: Repo, tmp: Path):
        self.repo, self.work = repo, tmp / f"history-{uuid.uuid4().hex[:6]}"
        git("clone", "-q", str(repo.bare), str(self.work))

    def git(self, *args: str) -> str:
        return git(*args, cwd=self.work)

    def commit(self, path: str, change, message: str) -> str:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(change(target.read_text() if target.exists() else ""))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def push(self, *refspecs: str) -> None:
        self.git("push", "-q", "--force", "origin", *refspecs)


def merge_step(sandbox, repo: Repo, tmp_path: Path, feature: str = FEATURE_BRANCH, confirm: Any = None):
    env = {"RUNBOOK_SANDBOX_DIR": str(sandbox.state), "RUNBOOK_SOURCE__REPO_URL": repo.url}
    ctx = start_step(STEP, "sandbox", confirm=confirm, run_dir=tmp_path / f"run-{uuid.uuid4().hex[:6]}",
                     environ=env, install_hooks=False)
    return ctx, MergeCheck(ctx, feature_branch=feature)


def loads_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "Secret.load(" in line)


@pytest.mark.timeout(300)
def test_main_already_holding_the_change_passes_saying_where_though_the_branch_is_gone(
        sandbox, sandbox_env, repo, tmp_path):
    """The branch was merged, main moved on, the branch was deleted: the plan's question has the
    answer yes, from main's content; the missing branch is a note, not an error."""
    h = History(repo, tmp_path)
    h.git("checkout", "-q", MAIN_BRANCH)
    h.git("merge", "-q", "--ff-only", f"origin/{FEATURE_BRANCH}")
    h.commit("docs/OPERATIONS.md", lambda _: "# Operations\n", "Operations notes")
    h.commit("README.md", lambda text: text + "\nMoved on.\n", "Readme")
    h.push(MAIN_BRANCH, f":refs/heads/{FEATURE_BRANCH}")
    line = loads_line((h.work / ORCHESTRATOR).read_text())
    before = repo.refs()
    assert f"refs/heads/{FEATURE_BRANCH}" not in before

    run = run_notebook(sandbox, tmp_path / "nb", repo)  # the default parameters, headless, no confirm
    assert run.error is None, run.error
    assert run.results["status"] == "passed" and run.results["gate"] is None
    merged = run.check("merge.merged")
    assert merged["status"] == "pass" and f"{ORCHESTRATOR.as_posix()}:{line}" in merged["detail"]
    assert "does not exist" in merged["detail"]
    assert run.check("merge.entrypoint_loads_block")["status"] == "pass"
    assert run.results["values"]["action"] == "none: the change is on the target"
    assert repo.refs() == before and receive_pack_posts(sandbox, repo) == []
    assert_no_secrets(run, sandbox, sandbox_env)


@pytest.mark.timeout(300)
def test_a_rebased_branch_counts_only_the_commit_main_lacks_and_a_change_outside_the_flow_is_not_needed(
        sandbox, repo, tmp_path):
    """feature/rebased: the Secret-block change, a docs change and a CI change; the first two were
    re-applied on main under new hashes (cherry-picked), then main moved on. Only the CI commit is
    unique, and it touches none of the entrypoint's modules."""
    h = History(repo, tmp_path)
    h.git("checkout", "-q", "-b", "feature/rebased", f"origin/{FEATURE_BRANCH}")
    docs = h.commit("docs/DSN.md", lambda _: "The DSN comes from a Secret block.\n", "Document the DSN source")
    ci = h.commit(".ci/lint.sh", lambda _: "#!/bin/sh\nexit 0\n", "Lint in CI")
    feature_change = h.git("rev-parse", f"origin/{FEATURE_BRANCH}")
    h.git("checkout", "-q", MAIN_BRANCH)
    h.commit("docs/OPERATIONS.md", lambda _: "# Operations\n", "Operations notes")  # main moved first
    h.git("cherry-pick", feature_change, docs)
    h.push(MAIN_BRANCH, "feature/rebased")

    ctx, step = merge_step(sandbox, repo, tmp_path, feature="feature/rebased")
    try:
        state = step.inspect()
        c = state.comparison
        assert len(c.ahead) == 3  # by hash: three commits main does not have
        assert [(commit.sha, files) for commit, files in c.unique] == [(ci, [".ci/lint.sh"])]
        assert len(c.already_on_target) == 2 and state.unique_in_closure == []
        assert state.target_has_change and state.action is None
        assert step.propose() is None and ctx.results.gate is None  # nothing to approve
        report = step.verify()
    finally:
        step.close()
    merged = report.get("merge.merged")
    assert merged.status.value == "warn" and ".ci/lint.sh" in merged.detail and "not needed" in merged.detail
    recorded = ctx.results.values["before"]
    assert recorded["unique"] == [{"commit": f"{ci[:12]} Lint in CI", "files": [".ci/lint.sh"]}]
    assert recorded["already_on_target"] == 2
    # The same through the notebook, headless without confirm: nothing to approve, the step passes.
    run = run_notebook(sandbox, tmp_path / "nb", repo, feature_branch="feature/rebased")
    assert run.error is None, run.error
    assert run.results["status"] == "passed" and run.results["gate"] is None
    assert run.check("merge.merged")["status"] == "warn" and "not needed" in run.check("merge.merged")["detail"]
    assert receive_pack_posts(sandbox, repo) == []


@pytest.mark.timeout(300)
def test_a_squash_merged_branch_is_recognised_as_merged(sandbox, repo, tmp_path):
    """feature/split makes the Secret-block change in two commits; main got them as one squash commit."""
    h = History(repo, tmp_path)
    h.git("checkout", "-q", "-b", "feature/split", MAIN_BRANCH)
    target_text = git("show", f"origin/{FEATURE_BRANCH}:{ORCHESTRATOR.as_posix()}", cwd=h.work)
    original = (h.work / ORCHESTRATOR).read_text()
    halfway = original.replace('"""The database DSN', '"""The database DSN (moving to a Secret block)', 1)
    h.commit(ORCHESTRATOR.as_posix(), lambda _: halfway, "Prepare the DSN source change")
    h.commit(ORCHESTRATOR.as_posix(), lambda _: target_text, "Load the DSN from the Secret block")
    h.git("checkout", "-q", MAIN_BRANCH)
    h.git("merge", "-q", "--squash", "feature/split")
    h.git("commit", "-q", "-m", "Squashed: the DSN from the Secret block (#12)")
    h.push(MAIN_BRANCH, "feature/split")

    ctx, step = merge_step(sandbox, repo, tmp_path, feature="feature/split")
    try:
        state = step.inspect()
        assert len(state.comparison.ahead) == 2 and state.comparison.merged
        assert state.comparison.unique == [] and len(state.comparison.already_on_target) == 2
        assert state.comparison.preview.kind == "nothing"
        step.propose()
        report = step.verify()
    finally:
        step.close()
    assert ctx.results.values["action"] == "none: already merged"
    assert {c.id: c.status.value for c in report.checks} == {
        "merge.merged": "pass", "merge.entrypoint_loads_block": "pass", "merge.load_error_handled": "pass"}
    run = run_notebook(sandbox, tmp_path / "nb", repo, feature_branch="feature/split")
    assert run.error is None, run.error
    assert run.results["status"] == "passed" and run.results["values"]["action"] == "none: already merged"
    assert run.results["values"]["before"]["already_on_target"] == 2
    assert receive_pack_posts(sandbox, repo) == []


@pytest.mark.timeout(300)
def test_a_branch_behind_a_main_that_moved_is_previewed_and_merged_with_only_its_unique_commit(
        sandbox, sandbox_env, repo, tmp_path):
    """main moved on (docs, and the docs commit of the branch cherry-picked); the branch's Secret-block
    commit is the one unique change, in the flow's module: the preview is a clean merge, the plan
    lists that commit only, and the merge is pushed once approved."""
    h = History(repo, tmp_path)
    h.git("checkout", "-q", "-b", FEATURE_BRANCH, f"origin/{FEATURE_BRANCH}")
    docs = h.commit("docs/DSN.md", lambda _: "The DSN comes from a Secret block.\n", "Document the DSN source")
    h.git("checkout", "-q", MAIN_BRANCH)
    h.commit("docs/OPERATIONS.md", lambda _: "# Operations\n", "Operations notes")
    h.git("cherry-pick", docs)
    h.push(MAIN_BRANCH, FEATURE_BRANCH)

    refused = run_notebook(sandbox, tmp_path / "refused", repo)
    assert refused.error is not None and refused.error.ename == "NotConfirmed"
    plan = refused.results["values"]["before"]
    assert [u["files"] for u in plan["unique"]] == [[ORCHESTRATOR.as_posix()]] and plan["already_on_target"] == 1
    assert plan["preview"]["kind"] == "merge" and ORCHESTRATOR.as_posix() in plan["preview"]["stat"]
    assert receive_pack_posts(sandbox, repo) == []

    merged = run_notebook(sandbox, tmp_path / "merged", repo, confirm=True)
    assert merged.error is None, merged.error
    assert merged.results["values"]["action"] == "merge commit"
    assert merged.check("merge.merged")["status"] == "pass"
    assert merged.check("merge.entrypoint_loads_block")["status"] == "pass"
    assert len(receive_pack_posts(sandbox, repo)) == 1
    assert_no_secrets(merged, sandbox, sandbox_env)


# -- rehearsal on your own repository: `runbook sandbox up --repo` ------------------------------------


def own_repository(root: Path) -> Path:
    """A user's repository, not the seeded story: main already loads the Secret block (the change was
    squash-merged long ago and main moved on), feature/secret-blocks was deleted, and a rebased branch
    holds one change main lacks, in CI files only."""
    source = DEFAULT_SOURCE_DIR
    work = root / "mine"
    work.mkdir()
    git("init", "-q", "-b", MAIN_BRANCH, cwd=work)
    shutil.copytree(source / "src", work / "src")
    (work / "requirements.txt").write_text((source / "requirements.txt").read_text())
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "Orchestrator that loads its DSN from the Secret block (squashed #7)", cwd=work)
    git("checkout", "-q", "-b", "ci/lint", cwd=work)
    (work / ".ci").mkdir()
    (work / ".ci" / "lint.sh").write_text("#!/bin/sh\nexit 0\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "Lint in CI", cwd=work)
    git("checkout", "-q", MAIN_BRANCH, cwd=work)
    (work / "CHANGELOG.md").write_text("# Changes\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "Changelog", cwd=work)
    git("rebase", "-q", MAIN_BRANCH, "ci/lint", cwd=work)
    git("checkout", "-q", MAIN_BRANCH, cwd=work)
    return work


@pytest.mark.timeout(300)
def test_rehearsal_on_your_own_repository_answers_from_its_content(tmp_path):
    """`sandbox up --repo <path>`: the git stand-in serves the user's branches; step 02 with its default
    parameters passes, saying where main loads the block, although feature/secret-blocks does not exist,
    and `feature_branch=ci/lint` is a change outside the flow: not needed, a warning, nothing pushed."""
    from runbook_sandbox import manager
    from tests.conftest import make_state_dir

    work = own_repository(tmp_path)
    line = next(i for i, text in enumerate((work / ORCHESTRATOR).read_text().splitlines(), 1) if "Secret.load(" in text)
    state = make_state_dir("rbsb-own-")
    try:
        manager.up(state, only=["git_server"], repo=str(work), echo=lambda s: None)
        default = notebook_runs.run_notebook(STEP, state, tmp_path / "default" / "run", {}, {},
                                             output=tmp_path / "default.ipynb", timeout=180)
        lint = notebook_runs.run_notebook(STEP, state, tmp_path / "lint" / "run", {"feature_branch": "ci/lint"}, {},
                                          output=tmp_path / "lint.ipynb", timeout=180)
    finally:
        manager.down(state, purge=True, echo=lambda s: None)
        shutil.rmtree(state, ignore_errors=True)
    assert default.error is None, default.error
    assert default.results["status"] == "passed" and default.results["gate"] is None
    merged = default.check("merge.merged")
    assert merged["status"] == "pass" and f"{ORCHESTRATOR.as_posix()}:{line}" in merged["detail"]
    assert FEATURE_BRANCH in merged["detail"] and "does not exist" in merged["detail"]
    assert lint.error is None, lint.error
    assert lint.results["status"] == "passed"
    assert lint.check("merge.merged")["status"] == "warn" and ".ci/lint.sh" in lint.check("merge.merged")["detail"]
    assert lint.results["values"]["before"]["unique"][0]["files"] == [".ci/lint.sh"]
