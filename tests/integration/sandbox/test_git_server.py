"""The GitHub stand-in: real `git` over smart HTTP against `git http-backend` behind the sandbox's server.

The server runs alone (`manager.up(only=["git_server"])`) in its own state directory; its repository
is seeded beforehand from a small flows tree written here, so the after-start hook keeps it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from runbook_sandbox import git_seed, manager
from runbook_sandbox.config import SandboxConfig
from tests.integration.git_helpers import git

pytestmark = pytest.mark.timeout(180)

FEATURE_ORCHESTRATOR = '''\
"""Test orchestrator (feature-branch version)."""
from prefect import flow

# --- runbook:dsn-source begin ---
from prefect.blocks.system import Secret


def get_database_url() -> str:
    """The DSN, from the Secret block."""
    return Secret.load("postgres-connection-string").get()
# --- runbook:dsn-source end ---


@flow
def orchestrator_main(batch_size: int = 50) -> dict:
    return {"dsn_length": len(get_database_url()), "batch_size": batch_size}
'''


def write_flows(root: Path, orchestrator: str = FEATURE_ORCHESTRATOR) -> Path:
    (root / "src" / "__pycache__").mkdir(parents=True)
    (root / "src" / "orchestrator.py").write_text(orchestrator)
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "__pycache__" / "orchestrator.cpython-312.pyc").write_bytes(b"\0compiled")
    (root / "requirements.txt").write_text("prefect\npsycopg2-binary\nmodal\n")
    return root




def auth_header(token: str, user: str = "x-access-token") -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def remote_refs(url: str) -> dict[str, str]:
    out = git("ls-remote", url, cwd=Path("/")).stdout
    return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines())}


def request_log(cfg: SandboxConfig) -> list[dict]:
    return [json.loads(line) for line in cfg.request_log_path("git").read_text().splitlines()]


def commit_file(clone: Path, name: str, content: bytes, message: str) -> str:
    (clone / name).write_bytes(content)
    git("add", name, cwd=clone)
    git("commit", "-q", "-m", message, cwd=clone)
    return git("rev-parse", "HEAD", cwd=clone).stdout.strip()


@pytest.fixture(scope="module")
def flows_dir(tmp_path_factory) -> Path:
    return write_flows(tmp_path_factory.mktemp("flows"))


@pytest.fixture(scope="module")
def git_sandbox(tmp_path_factory, flows_dir) -> SandboxConfig:
    state = tmp_path_factory.mktemp("git-sandbox")
    cfg = SandboxConfig.load_or_create(state)
    cfg.save()
    git_seed.seed_repository(cfg, source_dir=flows_dir, merged=False)
    try:
        manager.up(state, only=["git_server"], echo=lambda s: None)
        yield SandboxConfig.load_or_create(state)
    finally:
        manager.down(state, echo=lambda s: None)


def test_health_and_exports(git_sandbox):
    cfg = git_sandbox
    assert httpx.get(f"{cfg.git_base_url}/_sandbox/health", timeout=5).status_code == 200
    env = (cfg.state / "sandbox.env").read_text()
    assert f"RUNBOOK_REPO_URL={json.dumps(cfg.repo_url)}" in env
    assert f"GITHUB_TOKEN={json.dumps(cfg.git.token)}" in env
    assert cfg.repo_url.endswith("/bencrane/data-enrichment-orchestration-v1.git")


def test_anonymous_clone_shows_main_env_only_and_unmerged_feature_branch(git_sandbox, tmp_path):
    cfg = git_sandbox
    refs = remote_refs(cfg.repo_url)
    assert {"HEAD", "refs/heads/main", "refs/heads/feature/secret-blocks"} <= set(refs)
    assert refs["HEAD"] == refs["refs/heads/main"]

    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    main_src = (clone / "src" / "orchestrator.py").read_text()
    assert "Secret.load" not in main_src
    assert 'os.environ.get("DATABASE_URL")' in main_src and "DATABASE_URL is not set" in main_src
    assert "def orchestrator_main(batch_size: int = 50)" in main_src  # the rest of the file is kept
    feature_src = git("show", "origin/feature/secret-blocks:src/orchestrator.py", cwd=clone).stdout
    assert feature_src == FEATURE_ORCHESTRATOR

    tracked = git("ls-tree", "-r", "--name-only", "origin/feature/secret-blocks", cwd=clone).stdout.split()
    assert sorted(tracked) == ["requirements.txt", "src/__init__.py", "src/orchestrator.py"]

    # Not merged: the branch is exactly one commit ahead of main, main is its parent.
    assert git("merge-base", "--is-ancestor", "origin/feature/secret-blocks", "origin/main", cwd=clone, check=False).returncode == 1
    ahead = git("rev-list", "--count", "origin/main..origin/feature/secret-blocks", cwd=clone).stdout.strip()
    assert ahead == "1"
    log = git("log", "--all", "--format=%an <%ae>|%s", cwd=clone).stdout.splitlines()
    assert {line.split("|")[0] for line in log} == {"Runbook Sandbox <sandbox@example.invalid>"}
    assert len({line.split("|")[1] for line in log}) == len(log) == 2

    # The way Prefect's GitRepository pulls a branch: shallow, single branch.
    shallow = tmp_path / "shallow"
    git("clone", "-q", "--depth", "1", "--branch", "feature/secret-blocks", cfg.repo_url, str(shallow), cwd=tmp_path)
    assert "Secret.load" in (shallow / "src" / "orchestrator.py").read_text()


def test_push_needs_the_token(git_sandbox, tmp_path):
    cfg = git_sandbox
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    before = remote_refs(cfg.repo_url)["refs/heads/main"]
    sha = commit_file(clone, "NOTES.md", b"pushed by the test\n", "Add notes")

    anon = git("push", "origin", "HEAD:main", cwd=clone, check=False)
    assert anon.returncode != 0
    wrong_user_url = cfg.repo_url.replace("http://", "http://x-access-token:ghp_wrong@")
    wrong = git("push", wrong_user_url, "HEAD:main", cwd=clone, check=False)
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stderr
    wrong_header = git("-c", f"http.extraHeader={auth_header('ghp_not-the-token')}", "push", "origin", "HEAD:main", cwd=clone, check=False)
    assert wrong_header.returncode != 0
    assert remote_refs(cfg.repo_url)["refs/heads/main"] == before  # nothing landed

    # Both halves of receive-pack are guarded, with GitHub's challenge.
    base = cfg.repo_url
    adv = httpx.get(f"{base}/info/refs", params={"service": "git-receive-pack"}, timeout=10)
    assert adv.status_code == 401 and adv.headers["www-authenticate"] == 'Basic realm="GitHub"'
    post = httpx.post(f"{base}/git-receive-pack", content=b"0000", timeout=10,
                      headers={"Content-Type": "application/x-git-receive-pack-request"})
    assert post.status_code == 401 and post.headers["www-authenticate"] == 'Basic realm="GitHub"'
    # Anonymous reads stay open; a wrong credential is refused even for reads, as on GitHub.
    assert httpx.get(f"{base}/info/refs", params={"service": "git-upload-pack"}, timeout=10).status_code == 200
    bad_read = httpx.get(f"{base}/info/refs", params={"service": "git-upload-pack"}, auth=("x", "nope"), timeout=10)
    assert bad_read.status_code == 401

    git("-c", f"http.extraHeader={auth_header(cfg.git.token)}", "push", "-q", "origin", "HEAD:main", cwd=clone)
    assert remote_refs(cfg.repo_url)["refs/heads/main"] == sha
    token_url = cfg.repo_url.replace("http://", f"http://someone:{cfg.git.token}@")
    git("push", "-q", token_url, "HEAD:refs/heads/test/url-credentials", cwd=clone)
    assert remote_refs(cfg.repo_url)["refs/heads/test/url-credentials"] == sha

    entries = request_log(cfg)
    refused = [e for e in entries if e["query"] == "service=git-receive-pack" and e["status"] == 401]
    assert refused and all(not e["authenticated"] for e in refused)
    assert any(e["path"].endswith("/git-receive-pack") and e["status"] == 200 and e["authenticated"] for e in entries)
    raw = cfg.request_log_path("git").read_text()
    assert cfg.git.token not in raw and "Authorization" not in raw and "Basic " not in raw


def test_unknown_repository_is_404(git_sandbox, tmp_path):
    cfg = git_sandbox
    base = cfg.git_base_url
    for path in (
        "/bencrane/no-such-repo.git/info/refs?service=git-upload-pack",
        "/someone-else/data-enrichment-orchestration-v1.git/info/refs?service=git-upload-pack",
        "/bencrane/data-enrichment-orchestration-v1.git/config",
        "/bencrane/%2e%2e/bencrane/data-enrichment-orchestration-v1.git/info/refs",  # traversal
        "/bencrane/data-enrichment-orchestration-v1.git/objects/%2e%2e/config",
        "/",
    ):
        assert httpx.get(base + path, timeout=10).status_code == 404, path
    missing = git("ls-remote", f"{base}/bencrane/no-such-repo.git", cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr.lower()
    # GitHub also answers without the .git suffix.
    assert remote_refs(f"{base}/{cfg.git.owner}/{cfg.git.repo}")["refs/heads/main"]


def test_large_push_is_streamed_chunked(git_sandbox, tmp_path):
    cfg = git_sandbox
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    git("checkout", "-q", "-b", "test/large", cwd=clone)
    blob = os.urandom(4 * 1024 * 1024)  # incompressible: the pack stays > http.postBuffer (1 MiB)
    sha = commit_file(clone, "large.bin", blob, "Add a large binary")
    git("-c", f"http.extraHeader={auth_header(cfg.git.token)}", "push", "-q", "origin", "test/large", cwd=clone)
    assert remote_refs(cfg.repo_url)["refs/heads/test/large"] == sha

    posts = [e for e in request_log(cfg) if e["path"].endswith("/git-receive-pack") and e["method"] == "POST"]
    assert any(e["chunked"] and e["status"] == 200 for e in posts), posts

    back = tmp_path / "back"
    git("clone", "-q", "--branch", "test/large", cfg.repo_url, str(back), cwd=tmp_path)
    assert hashlib.sha256((back / "large.bin").read_bytes()).digest() == hashlib.sha256(blob).digest()


def test_gzip_request_bodies(git_sandbox, tmp_path):
    cfg = git_sandbox
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    # Many refs at distinct commits: a fresh clone then sends > 1 KiB of wants, which git gzips.
    pushes = []
    for i in range(40):
        commit_file(clone, "counter.txt", f"{i}\n".encode(), f"Counter {i}")
        pushes.append(f"HEAD:refs/heads/test/many-{i:02d}")
    git("-c", f"http.extraHeader={auth_header(cfg.git.token)}", "push", "-q", "origin", *pushes, cwd=clone)

    fresh = tmp_path / "fresh"
    git("-c", "protocol.version=2", "clone", "-q", "--mirror", cfg.repo_url, str(fresh), cwd=tmp_path)
    assert git("rev-parse", "refs/heads/test/many-39", cwd=fresh).stdout.strip() == git("rev-parse", "HEAD", cwd=clone).stdout.strip()
    gz = [e for e in request_log(cfg) if e["path"].endswith("/git-upload-pack") and e["content_encoding"] == "gzip"]
    assert gz and all(e["status"] == 200 for e in gz)

    # The same by hand: a gzip-encoded protocol-v0 upload-pack request for main.
    main_sha = remote_refs(cfg.repo_url)["refs/heads/main"]
    want = f"want {main_sha}\n".encode()
    body = b"%04x" % (len(want) + 4) + want + b"0000" + b"0009done\n"
    r = httpx.post(
        f"{cfg.repo_url}/git-upload-pack",
        content=gzip.compress(body),
        headers={"Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": "gzip"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-git-upload-pack-result"
    assert r.content.startswith(b"0008NAK\n") and b"PACK" in r.content


def test_restart_keeps_the_repository(git_sandbox, tmp_path):
    cfg = git_sandbox
    clone = tmp_path / "clone"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    sha = commit_file(clone, "restart.txt", b"survives a restart\n", "Before restart")
    git("-c", f"http.extraHeader={auth_header(cfg.git.token)}", "push", "-q", "origin", "HEAD:refs/heads/test/restart", cwd=clone)
    manager.stop_service("git_server", cfg.state)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{cfg.git_base_url}/_sandbox/health", timeout=2)
    manager.up(cfg.state, only=["git_server"], echo=lambda s: None)
    cfg2 = SandboxConfig.load_or_create(cfg.state)
    assert remote_refs(cfg2.repo_url)["refs/heads/test/restart"] == sha


def test_seed_merged_puts_the_branch_into_main(git_sandbox, flows_dir, tmp_path):
    cfg = git_sandbox.model_copy(deep=True)
    cfg.git.repo = "merged-variant"
    cfg.git.seed_merged = True  # what `sandbox up --seed-merged` sets; seed_repository follows it
    git_seed.seed_repository(cfg, source_dir=flows_dir)
    clone = tmp_path / "merged"
    git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    assert git("merge-base", "--is-ancestor", "origin/feature/secret-blocks", "origin/main", cwd=clone, check=False).returncode == 0
    assert (clone / "src" / "orchestrator.py").read_text() == FEATURE_ORCHESTRATOR
    subjects = git("log", "--format=%s", "origin/main", cwd=clone).stdout.splitlines()
    assert subjects[0] == "Merge branch 'feature/secret-blocks'" and len(set(subjects)) == 3


def test_seeding_refuses_bad_sources_and_leaves_nothing(tmp_path):
    cfg = SandboxConfig.load_or_create(tmp_path / "state")
    no_markers = write_flows(tmp_path / "no-markers", FEATURE_ORCHESTRATOR.replace("# --- runbook:dsn-source end ---\n", ""))
    with pytest.raises(git_seed.SeedError, match="runbook:dsn-source"):
        git_seed.seed_repository(cfg, source_dir=no_markers)
    with pytest.raises(git_seed.SeedError, match="does not exist"):
        git_seed.seed_repository(cfg, source_dir=tmp_path / "empty")
    owner_dir = git_seed.repo_path(cfg).parent
    assert not owner_dir.exists() or list(owner_dir.iterdir()) == []

    good = write_flows(tmp_path / "good")
    git_seed.seed_repository(cfg, source_dir=good)
    with pytest.raises(git_seed.SeedError, match="already exists"):
        git_seed.seed_repository(cfg, source_dir=good)


def test_env_only_version_keeps_indentation_and_requires_the_function():
    indented = "class C:\n    # --- runbook:dsn-source begin ---\n    def get_database_url(self):\n        return 1\n    # --- runbook:dsn-source end ---\n"
    out = git_seed.env_only_version(indented)
    assert "    def get_database_url() -> str:" in out and "return 1" not in out
    with pytest.raises(git_seed.SeedError, match="get_database_url"):
        git_seed.env_only_version("# --- runbook:dsn-source begin ---\nX = 1\n# --- runbook:dsn-source end ---\n")


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "seed-merged"])
def test_default_seed_from_the_project_flows(tmp_path, merged):
    """`sandbox up` seeds from the project's flows/: its content is the repository root."""
    state = tmp_path / "state"
    try:
        manager.up(state, only=["git_server"], seed_merged=merged, echo=lambda s: None)
        cfg = SandboxConfig.load_or_create(state)
        clone = tmp_path / "clone"
        git("clone", "-q", cfg.repo_url, str(clone), cwd=tmp_path)
    finally:
        manager.down(state, echo=lambda s: None)
    project_orchestrator = (git_seed.DEFAULT_SOURCE_DIR / "src" / "orchestrator.py").read_text()
    main_src = (clone / "src" / "orchestrator.py").read_text()
    feature_src = git("show", "origin/feature/secret-blocks:src/orchestrator.py", cwd=clone).stdout
    assert feature_src == project_orchestrator and "Secret.load" in feature_src
    assert "def orchestrator_main(" in main_src  # entrypoint src/orchestrator.py:orchestrator_main
    compile(main_src, "orchestrator.py", "exec")
    tracked = git("ls-tree", "-r", "--name-only", "origin/main", cwd=clone).stdout.split()
    assert not any("__pycache__" in t or t.endswith(".pyc") for t in tracked)
    is_merged = git("merge-base", "--is-ancestor", "origin/feature/secret-blocks", "origin/main", cwd=clone, check=False)
    if merged:
        assert is_merged.returncode == 0 and main_src == project_orchestrator
    else:
        assert is_merged.returncode == 1 and "Secret.load" not in main_src
