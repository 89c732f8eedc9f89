"""runbook_lib.systems.git on a local repository: refs, files at a ref, clear errors that never show the token."""

from __future__ import annotations

import subprocess

import pytest

from runbook_lib.core.errors import (
    GitError,
)
from tests.unit.flow_sources import ANNOTATED_ORCHESTRATOR


@pytest.fixture
def local_repo(tmp_path) -> str:
    work = tmp_path / "work"
    work.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True, timeout=30)  # noqa: E731
    git("init", "--quiet", "--initial-branch=main")
    (work / "src").mkdir()
    (work / "src" / "orchestrator.py").write_text(ANNOTATED_ORCHESTRATOR)
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
        assert repo.read_file("main", "src/orchestrator.py") == ANNOTATED_ORCHESTRATOR
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
