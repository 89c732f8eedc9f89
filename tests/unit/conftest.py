"""Fixtures of the unit tests: no sandbox, no service, no network. Settings come from a temporary copy
of the project's profiles; a flow's repository is a real bare git repository in a temporary
directory, reached by a file:// URL (git's own protocol, as `GitRepo` speaks it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.profiles import load_settings
from runbook_lib.core.settings import RunbookSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_GIT_IDENTITY = ("-c", "user.name=Runbook Test", "-c", "user.email=runbook-test@example.com",
                 "-c", "commit.gpgsign=false")


@pytest.fixture(autouse=True)
def _fresh_redaction() -> Iterator[None]:
    """Registered secrets are process-wide: each test starts and ends with none."""
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


@pytest.fixture
def profiles_root(tmp_path: Path) -> Path:
    """A project root holding a copy of the real profiles (and no .env)."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "profiles", root / "profiles")
    return root


@pytest.fixture
def make_settings(profiles_root: Path) -> Callable[..., RunbookSettings]:
    """`make_settings(environ=None, **overrides)`: the production profile, with dotted overrides
    given as keyword arguments whose dots are written `__` (`source__branch="x"`)."""
    def build(environ: dict[str, str] | None = None, **overrides: Any) -> RunbookSettings:
        dotted = {k.replace("__", "."): v for k, v in overrides.items()}
        return load_settings("production", environ=dict(environ or {}), root=profiles_root, overrides=dotted)
    return build


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *_GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


@dataclass
class Remote:
    url: str  # file://.../remote.git
    path: Path
    shas: dict[str, str]  # branch -> commit sha


@pytest.fixture
def make_remote(tmp_path: Path) -> Callable[[dict[str, dict[str, str]]], Remote]:
    """`make_remote({"main": {"src/orchestrator.py": "..."}, "feature": {...}})`: a bare repository
    with one branch per key, each holding exactly the given files (one commit)."""
    counter = iter(range(1000))

    def build(branches: dict[str, dict[str, str]]) -> Remote:
        n = next(counter)
        bare = tmp_path / f"remote{n}" / "remote.git"
        bare.parent.mkdir(parents=True)
        git("init", "--quiet", "--bare", str(bare))
        shas = {}
        for i, (branch, files) in enumerate(branches.items()):
            work = tmp_path / f"remote{n}" / f"work{i}"
            git("init", "--quiet", f"--initial-branch={branch}", str(work))
            for rel, text in files.items():
                path = work / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            git("add", "-A", cwd=work)
            git("commit", "--quiet", "--allow-empty", "-m", f"{branch}", cwd=work)
            shas[branch] = git("rev-parse", "HEAD", cwd=work).strip()
            git("push", "--quiet", str(bare), f"HEAD:refs/heads/{branch}", cwd=work)
        return Remote(f"file://{bare}", bare, shas)
    return build


# -- a sandbox profile without a sandbox: its settings file, written by hand ------------------------

ACCOUNT = "11111111-1111-4111-8111-111111111111"
WORKSPACE = "22222222-2222-4222-8222-222222222222"
OTHER = "33333333-3333-4333-8333-333333333333"


def write_sandbox_env(directory: Path, **extra: str) -> Path:
    values = {
        "PREFECT_API_URL": f"http://127.0.0.1:4201/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}",
        "PREFECT_API_KEY": "pnu_sandboxkey0123456789",
        "PREFECT_ACCOUNT_ID": ACCOUNT,
        "PREFECT_WORKSPACE_ID": WORKSPACE,
        "DATABASE_URL": "postgresql://postgres:sandbox-pw-123@127.0.0.1:5433/postgres",
        "SUPABASE_API_URL": "http://127.0.0.1:5000",
        "SUPABASE_ACCESS_TOKEN": "sbp_sandboxtoken0123456789",
        "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
        "SUPABASE_FUNCTIONS_URL": "http://127.0.0.1:5000/functions/v1",
        "SUPABASE_ANON_KEY": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.sig",  # role anon
        "RUNBOOK_REPO_URL": "http://127.0.0.1:5200/bencrane/data-enrichment-orchestration-v1.git",
        "ENRICHMENT_DISPATCH_URL": "http://127.0.0.1:5100",
        "MODAL_TOKEN_ID": "ak-sandbox0123",
        "MODAL_TOKEN_SECRET": "as-sandboxsecret0123",
    }
    values.update(extra)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sandbox.env"
    path.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def sandbox_environ(tmp_path) -> dict[str, str]:
    write_sandbox_env(tmp_path / "sbx")
    return {"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """A project root with the real profiles, for tests that add a .env or edit a profile."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "profiles", root / "profiles")
    return root

