"""`sandbox up --repo`: the GitHub stand-in seeded with every branch of a repository of the user's.

Source repositories are built here with git, with the histories real ones have (a rebased branch, a
branch deleted after its merge, an orphan branch, nested branch names, a tag, remote-tracking refs and
a stash that are not branches, HEAD checked out on a feature branch). The sandbox runs only its git
server (`manager.up(..., repo=..., only=["git_server"])`) in a state directory of its own, and every
assertion reads what the stand-in serves over smart HTTP (`git ls-remote`, `git clone`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runbook_lib.core import processes
from runbook_sandbox import git_seed, manager
from runbook_sandbox.config import SandboxConfig
from tests.conftest import make_state_dir
from tests.integration.git_helpers import git

pytestmark = pytest.mark.timeout(240)




def commit(repo: Path, name: str, content: str, message: str) -> str:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(content)
    git("add", name, cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo).stdout.strip()


def local_branches(repo: Path) -> dict[str, str]:
    out = git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/", cwd=repo).stdout
    return dict(line.split(" ") for line in out.splitlines())


def served(url: str, cwd: Path) -> tuple[dict[str, str], dict[str, str], str | None]:
    """What the stand-in advertises over smart HTTP: branches, other refs, and the branch HEAD names."""
    out = git("ls-remote", "--symref", url, cwd=cwd).stdout
    heads, others, head = {}, {}, None
    for line in out.splitlines():
        left, ref = line.split("\t")
        if left.startswith("ref: ") and ref == "HEAD":
            head = left.removeprefix("ref: ")
        elif ref.startswith("refs/heads/"):
            heads[ref.removeprefix("refs/heads/")] = left
        elif ref != "HEAD":
            others[ref] = left
    return heads, others, head


def auth_header(token: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()


def make_real_world_repo(root: Path) -> dict[str, str]:
    """A working repository with the branches a real one has; returns facts about it."""
    repo = root
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    commit(repo, "src/orchestrator.py", "from prefect import flow\n\n\n@flow\ndef orchestrator_main():\n    pass\n", "Initial flow")
    base = git("rev-parse", "HEAD", cwd=repo).stdout.strip()

    # A branch merged into main, then deleted: not a branch any more.
    git("checkout", "-q", "-b", "feature/merged-and-deleted", cwd=repo)
    merged_tip = commit(repo, "src/merged.py", "X = 1\n", "Merged work")
    git("checkout", "-q", "main", cwd=repo)
    git("merge", "-q", "--no-ff", "-m", "Merge feature/merged-and-deleted", "feature/merged-and-deleted", cwd=repo)
    git("branch", "-d", "feature/merged-and-deleted", cwd=repo)

    # A branch made from the first commit, then rebased onto the new main: its old tip is gone.
    git("checkout", "-q", "-b", "feature/secret-blocks", base, cwd=repo)
    pre_rebase = commit(repo, "src/dsn.py", "BLOCK = 'postgres-connection-string'\n", "Load the DSN from a Secret block")
    git("rebase", "-q", "main", cwd=repo)

    # A nested name, an orphan branch, a branch at the same commit as another one.
    git("branch", "fix/deep/nested-name", "main", cwd=repo)
    git("branch", "release/same-as-main", "main", cwd=repo)
    git("checkout", "-q", "--orphan", "gh-pages", cwd=repo)
    git("rm", "-q", "-r", "--cached", ".", cwd=repo)
    shutil.rmtree(repo / "src")
    commit(repo, "index.html", "<h1>docs</h1>\n", "Docs site")

    # A tag; refs that are not branches (a remote-tracking ref, a stash); HEAD on the feature branch.
    git("checkout", "-q", "-f", "feature/secret-blocks", cwd=repo)
    git("tag", "-a", "v1.0", "-m", "First release", "main", cwd=repo)
    git("update-ref", "refs/remotes/origin/stale-remote-branch", base, cwd=repo)
    (repo / "src" / "dsn.py").write_text("BLOCK = 'work in progress'\n")
    git("stash", "-q", cwd=repo)
    return {"pre_rebase": pre_rebase, "merged_tip": merged_tip}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("sources") / "my-orchestrator"
    return path, make_real_world_repo(path)


@pytest.fixture(scope="module")
def repo_sandbox(source):
    """The git server alone, its repository seeded from `source` by `up(repo=...)`."""
    state = make_state_dir("rbsb-gitseed-")
    lines: list[str] = []
    try:
        manager.up(state, repo=str(source[0]), only=["git_server"], echo=lines.append)
        yield SandboxConfig.load_or_create(state), lines
    finally:
        manager.down(state, purge=True, echo=lambda s: None)


def test_every_branch_is_served_with_its_head_and_main_is_the_default(repo_sandbox, source, tmp_path):
    cfg, lines = repo_sandbox
    path, facts = source
    heads, others, head = served(cfg.repo_url, tmp_path)
    expected = local_branches(path)
    assert set(expected) == {"main", "feature/secret-blocks", "fix/deep/nested-name", "release/same-as-main", "gh-pages"}
    assert heads == expected  # every branch, each at its head; the deleted one is not there
    assert head == "refs/heads/main"  # not the branch checked out in the source
    assert facts["pre_rebase"] not in heads.values()  # the rebased branch is served as rebased
    assert git("merge-base", "--is-ancestor", heads["main"], heads["feature/secret-blocks"], cwd=path).returncode == 0
    assert set(others) == {"refs/tags/v1.0", "refs/tags/v1.0^{}"}  # the tag; no remote-tracking ref, no stash
    assert others["refs/tags/v1.0^{}"] == heads["main"]

    assert cfg.git.seed_source == str(path)
    assert any("seeded from" in ln and str(path) in ln and "5 branch(es), HEAD -> main" in ln for ln in lines), lines
    env = (cfg.state / "sandbox.env").read_text()
    assert f"RUNBOOK_REPO_URL={json.dumps(cfg.repo_url)}" in env  # the same repository name as the story's

    # The objects are all there: a clone over smart HTTP has every branch, content included.
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    assert (clone / "src" / "merged.py").read_text() == "X = 1\n"
    assert git("show", "origin/feature/secret-blocks:src/dsn.py", cwd=clone).stdout == "BLOCK = 'postgres-connection-string'\n"
    assert git("show", "origin/gh-pages:index.html", cwd=clone).stdout == "<h1>docs</h1>\n"
    # The way Prefect's pull step clones a branch: shallow, single branch.
    shallow = tmp_path / "shallow"
    git("clone", "-q", "--depth", "1", "--branch", "feature/secret-blocks", cfg.repo_url, str(shallow), cwd=tmp_path)
    assert git("rev-parse", "HEAD", cwd=shallow).stdout.strip() == expected["feature/secret-blocks"]


def test_a_url_source_gets_every_remote_head(repo_sandbox, tmp_path):
    """A URL as the source: here the stand-in itself, over smart HTTP, into a second repository name."""
    cfg, _ = repo_sandbox
    result = git_seed.seed_from_source(cfg, cfg.repo_url, repo="seeded-from-url")
    assert result.source == cfg.repo_url  # a URL is used as is
    url = f"{cfg.git_base_url}/{cfg.git.owner}/seeded-from-url.git"
    heads, others, head = served(url, tmp_path)
    original_heads, original_others, _ = served(cfg.repo_url, tmp_path)
    assert heads == original_heads == result.branches and head == "refs/heads/main"
    assert others == original_others


def test_pushes_survive_a_second_up_and_a_restart_reseeds_from_the_recorded_source(repo_sandbox, source, tmp_path):
    cfg, _ = repo_sandbox
    path, _facts = source
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    pushed = commit(clone, "NOTES.md", "pushed to the sandbox\n", "A push")
    git("-c", f"http.extraHeader={auth_header(cfg.git.token)}", "push", "-q", "origin", "HEAD:refs/heads/pushed/by-test", cwd=clone)

    # The same source again, by another spelling of the path, and no --repo at all: kept as is.
    lines: list[str] = []
    relative = os.path.relpath(path, Path.cwd())
    manager.up(cfg.state, repo=relative, only=["git_server"], echo=lines.append)
    manager.up(cfg.state, only=["git_server"], echo=lines.append)
    assert any("kept as is" in ln for ln in lines), lines
    assert not any("seeded from" in ln and "kept" not in ln for ln in lines), lines
    assert served(cfg.repo_url, tmp_path)[0]["pushed/by-test"] == pushed
    assert SandboxConfig.load_or_create(cfg.state).git.seed_source == str(path)

    # A restart that finds no repository seeds it from the recorded source, not from flows/.
    manager.stop_service("git_server", cfg.state)
    shutil.rmtree(git_seed.repo_path(cfg))
    manager.up(cfg.state, only=["git_server"], echo=lambda s: None)
    heads, _, head = served(SandboxConfig.load_or_create(cfg.state).repo_url, tmp_path)
    assert heads == local_branches(path) and head == "refs/heads/main"


def test_a_bad_source_is_refused_and_changes_nothing(repo_sandbox, source, tmp_path):
    cfg, _ = repo_sandbox
    before_refs = served(cfg.repo_url, tmp_path)
    before_config = cfg.config_path.read_text()
    owner_dir = git_seed.repo_path(cfg).parent
    before_listing = sorted(p.name for p in owner_dir.iterdir())

    plain = tmp_path / "not-a-repo"
    (plain / "src").mkdir(parents=True)
    empty = tmp_path / "empty-repo"
    git("init", "-q", str(empty), cwd=tmp_path)
    unreachable = f"http://127.0.0.1:{processes.free_port()}/someone/nothing.git"
    cases = {
        str(plain): "not a git repository",
        str(source[0] / "src"): "not a git repository",  # a folder inside a repository is not one
        str(tmp_path / "missing"): "no such file or directory",
        str(empty): "has no branch",
        unreachable: "not readable from this machine",
    }
    for bad, reason in cases.items():
        with pytest.raises(manager.SandboxError) as refused:
            manager.up(cfg.state, repo=bad, only=["git_server"], echo=lambda s: None)
        message = str(refused.value)
        assert bad in message and reason in message, message
        assert served(cfg.repo_url, tmp_path) == before_refs
        assert cfg.config_path.read_text() == before_config
        assert sorted(p.name for p in owner_dir.iterdir()) == before_listing  # no temporary leftovers

    # A fresh state directory is left without any git state (nor a config) either.
    fresh = make_state_dir("rbsb-gitseed-fresh-")
    try:
        with pytest.raises(manager.SandboxError, match="not a git repository"):
            manager.up(fresh, repo=str(plain), only=["git_server"], echo=lambda s: None)
        assert list(fresh.iterdir()) == []
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def test_another_source_reseeds_only_when_given_and_says_so(repo_sandbox, source, tmp_path):
    """Runs last in this module: it replaces the repository."""
    cfg, _ = repo_sandbox
    path, _facts = source
    other = tmp_path / "other-orchestrator"
    other.mkdir()
    git("init", "-q", "-b", "trunk", cwd=other)
    commit(other, "flow.py", "from prefect import flow\n", "Trunk")
    git("checkout", "-q", "-b", "develop", cwd=other)
    commit(other, "flow.py", "from prefect import flow  # develop\n", "Develop")
    git("checkout", "-q", "trunk", cwd=other)

    lines: list[str] = []
    manager.up(cfg.state, repo=str(other), only=["git_server"], echo=lines.append)
    note = next(ln for ln in lines if "reseeded" in ln)
    assert str(other) in note and str(path) in note and "HEAD -> trunk" in note, note
    heads, others, head = served(cfg.repo_url, tmp_path)
    assert heads == local_branches(other) and others == {}
    assert head == "refs/heads/trunk"  # no main: the source's own HEAD branch
    assert SandboxConfig.load_or_create(cfg.state).git.seed_source == str(other)


def test_repo_and_seed_merged_together_are_refused(tmp_path, source):
    state = tmp_path / "state"
    with pytest.raises(manager.SandboxError, match="do not apply to --repo"):
        manager.up(state, repo=str(source[0]), seed_merged=True, only=["git_server"], echo=lambda s: None)
    assert not state.exists()


def test_cli_refuses_a_bad_repo_naming_it(tmp_path):
    state, bad = tmp_path / "state", tmp_path / "nothing-here"
    bad.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "runbook_lib", "sandbox", "up", "--state-dir", str(state), "--repo", str(bad)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, RUNBOOK_SANDBOX_DIR=str(state)),
    )
    assert proc.returncode == 1
    assert "sandbox up failed" in proc.stderr and str(bad) in proc.stderr and "not a git repository" in proc.stderr
    assert not state.exists()  # nothing started, nothing written


def test_source_spelling_and_default_branch():
    assert git_seed.source_of("https://github.com/o/r.git") == "https://github.com/o/r.git"
    assert git_seed.source_of("git@github.com:o/r.git") == "git@github.com:o/r.git"
    assert git_seed.source_of("file:///srv/r.git") == "file:///srv/r.git"
    assert git_seed.source_of("../r") == str((Path.cwd() / "../r").resolve())
    with pytest.raises(git_seed.SeedError):
        git_seed.source_of("  ")
    assert git_seed.display_source("https://me:ghp_secret@github.com/o/r.git") == "https://me:***@github.com/o/r.git"
    assert git_seed.default_branch({"dev": "a", "main": "b"}, "dev") == "main"
    assert git_seed.default_branch({"dev": "a", "master": "b"}, "dev") == "dev"
    assert git_seed.default_branch({"dev": "a", "master": "b"}, None) == "master"
    assert git_seed.default_branch({"b": "a", "a": "b"}, None) == "a"
