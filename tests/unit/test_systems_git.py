"""runbook_lib core: settings, redaction, checks, the confirmation gate, run_sync, step results,
flow-source analysis, requirement mapping, git reading, and the database helpers against the
sandbox's real Postgres. Every test is bounded in time; no service is mocked."""

from __future__ import annotations

import subprocess

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    GitError,
)


@pytest.fixture(autouse=True)
def _fresh_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()

ORCHESTRATOR = '''
import os
import prefect
from prefect import flow as pflow
from prefect.blocks.system import Secret
import psycopg2
from dotenv import load_dotenv
from src.sequencer import advance_completed_items
from dispatcher import dispatch_pending_items


def get_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except Exception as exc:
        print("could not load", exc)
        return os.environ.get("DATABASE_URL", "")


def strict_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except (KeyError, Exception):
        raise RuntimeError("no dsn")


def nested():
    try:
        try:
            return prefect.blocks.system.Secret.load("modal-token-id")
        except ValueError:
            raise
    except:
        return None


def narrow():
    try:
        return Secret.load(name="modal-token-secret")
    except KeyError:
        return None


@pflow(log_prints=True)
def orchestrator_main(batch_size: int = 50, dry_run: bool = False):
    import modal
    advance_completed_items()
    return dispatch_pending_items(batch_size, os.environ["MODAL_TOKEN_ID"])


def not_a_flow(x):
    return x
'''

@pytest.fixture
def local_repo(tmp_path) -> str:
    work = tmp_path / "work"
    work.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True, timeout=30)  # noqa: E731
    git("init", "--quiet", "--initial-branch=main")
    (work / "src").mkdir()
    (work / "src" / "orchestrator.py").write_text(ORCHESTRATOR)
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "--quiet", "-m", "seed")
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work), str(bare)], check=True, capture_output=True, timeout=30)
    return f"file://{bare}"

def test_git_repo_lists_refs_and_reads_files_at_a_ref(local_repo):
    from runbook_lib.systems.git import GitRepo

    with GitRepo(local_repo) as repo:
        sha = repo.branch_sha("main")
        assert sha and len(sha) == 40 and repo.branch_sha("feature/nope") is None
        assert repo.read_file("main", "src/orchestrator.py") == ORCHESTRATOR
        assert repo.fetch("main") == sha and repo.list_files(sha) == ["src/orchestrator.py"]
        with pytest.raises(GitError, match=r"src/missing.py does not exist at main"):
            repo.read_file("main", "src/missing.py")
        with pytest.raises(GitError, match="no such branch, tag or commit"):
            repo.read_file("feature/nope", "src/orchestrator.py")

def test_git_errors_are_clear_and_never_show_the_token(tmp_path):
    from runbook_lib.systems.git import GitRepo

    with pytest.raises(GitError) as err:
        GitRepo(f"file://{tmp_path}/absent.git", token="ghp_gitsecret0123456789").ls_remote()
    assert "ghp_gitsecret0123456789" not in str(err.value) and "absent.git" in str(err.value)
