"""runbook_lib core: settings, redaction, checks, the confirmation gate, run_sync, step results,
flow-source analysis, requirement mapping, git reading, and the database helpers against the
sandbox's real Postgres. Every test is bounded in time; no service is mocked."""

from __future__ import annotations

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    GitError,
)
from runbook_lib.core.profiles import load_settings


@pytest.fixture(autouse=True)
def _fresh_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()

@pytest.fixture
def sandbox_settings(sandbox):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)})

@pytest.mark.timeout(120)
def test_git_repo_reads_the_seeded_flow_and_refuses_a_wrong_token(sandbox_settings):
    from runbook_lib.source.flow import analyse_entrypoint
    from runbook_lib.systems.git import GitRepo

    with GitRepo.from_settings(sandbox_settings) as repo:
        assert repo.branch_sha("main")
        files = repo.read_files("main")
        info = analyse_entrypoint(files, sandbox_settings.source.entrypoint)
        assert info.is_flow and info.parameter("batch_size").default == "50"
    with pytest.raises(GitError, match="refused access"):
        GitRepo(sandbox_settings.source.repo_url, "ghp_not_the_token_00").ls_remote()
