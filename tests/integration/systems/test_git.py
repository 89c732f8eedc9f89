"""runbook_lib.systems.git against the sandbox's git server: reading the seeded flow, a refused token."""

from __future__ import annotations

import pytest

from runbook_lib.core.errors import (
    GitError,
)


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
