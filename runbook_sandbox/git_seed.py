"""Seeds the sandbox's copy of `bencrane/data-enrichment-orchestration-v1` from the project's `flows/`.

The history reproduces the plan's situation: `main` holds an orchestrator that reads its DSN from
the `DATABASE_URL` environment variable only, and the unmerged branch `feature/secret-blocks` is one
commit ahead with the orchestrator that loads the Prefect Secret block `postgres-connection-string`
(or, with `merged=True`, that branch is already merged into `main`).

`flows/src/orchestrator.py` is the feature-branch version; the `main` version is derived from it by
replacing the section between the DSN-source markers with an environment-only `get_database_url()`.
The repository is built in a temporary directory and moved into place only when complete, so a
failed seeding leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .config import PROJECT_ROOT, SandboxConfig

DEFAULT_SOURCE_DIR = PROJECT_ROOT / "flows"
ORCHESTRATOR = Path("src") / "orchestrator.py"
BEGIN_MARKER = "# --- runbook:dsn-source begin ---"
END_MARKER = "# --- runbook:dsn-source end ---"
FEATURE_BRANCH = "feature/secret-blocks"
MAIN_BRANCH = "main"
AUTHOR_NAME = "Runbook Sandbox"
AUTHOR_EMAIL = "sandbox@example.invalid"
SKIPPED_NAMES = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")

MSG_MAIN = "Orchestrator flow: sequencer and dispatcher to Modal, DSN from DATABASE_URL"
MSG_FEATURE = "Load the database DSN from the Prefect Secret block postgres-connection-string"
MSG_MERGE = f"Merge branch '{FEATURE_BRANCH}'"

# The DSN source on `main`: the environment only (what the plan found before the branch).
ENV_ONLY_SECTION = '''\
import os


def get_database_url() -> str:
    """The database DSN, from the DATABASE_URL environment variable."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError(
            "DATABASE_URL is not set: the orchestrator reads its database DSN from this environment variable"
        )
    return url
'''


class SeedError(RuntimeError):
    """The repository could not be seeded; the message says why."""


def repo_path(cfg: SandboxConfig, owner: str | None = None, repo: str | None = None) -> Path:
    """Where the bare repository `<owner>/<repo>.git` lives: `<state>/git/<owner>/<repo>.git`."""
    return cfg.state / "git" / (owner or cfg.git.owner) / f"{repo or cfg.git.repo}.git"


def env_only_version(feature_source: str) -> str:
    """The `main` orchestrator: the feature version with its DSN-source section made env-only."""
    lines = feature_source.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise SeedError(
            f"{ORCHESTRATOR} must contain exactly one section between the lines {BEGIN_MARKER!r} and "
            f"{END_MARKER!r} (found {len(begins)} begin and {len(ends)} end marker(s)); "
            "cannot derive the env-only main version"
        )
    begin, end = begins[0], ends[0]
    section = "".join(lines[begin + 1 : end])
    if "def get_database_url" not in section:
        raise SeedError(f"the DSN-source section of {ORCHESTRATOR} does not define get_database_url()")
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    replacement = "".join(indent + line if line.strip() else line for line in ENV_ONLY_SECTION.splitlines(True))
    derived = "".join(lines[: begin + 1]) + replacement + "".join(lines[end:])
    try:
        compile(derived, str(ORCHESTRATOR), "exec")
    except SyntaxError as exc:
        raise SeedError(f"the env-only main version of {ORCHESTRATOR} is not valid Python: {exc}") from exc
    return derived


def _git(args: list[str], cwd: Path, when: str = "2025-06-02T09:00:00+00:00") -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
        "GIT_COMMITTER_NAME": AUTHOR_NAME,
        "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
        "GIT_AUTHOR_DATE": when,
        "GIT_COMMITTER_DATE": when,
    }
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SeedError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def _copy_tree(source: Path, dest: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIPPED_NAMES or n.endswith(SKIPPED_SUFFIXES)}

    shutil.copytree(source, dest, ignore=ignore, dirs_exist_ok=True)


def seed_repository(
    cfg: SandboxConfig,
    *,
    source_dir: Path | None = None,
    merged: bool | None = None,
    owner: str | None = None,
    repo: str | None = None,
) -> Path:
    """Create the bare repository from `source_dir` (default: the project's `flows/`); return its path.

    `merged` (default `cfg.git.seed_merged`) seeds `feature/secret-blocks` already merged into `main`.
    Refuses to overwrite an existing repository.
    """
    source = Path(source_dir or DEFAULT_SOURCE_DIR).resolve()
    merged = cfg.git.seed_merged if merged is None else merged
    target = repo_path(cfg, owner, repo)
    if target.exists():
        raise SeedError(f"repository {target} already exists; not seeding over it")
    orchestrator = source / ORCHESTRATOR
    if not orchestrator.is_file():
        raise SeedError(f"cannot seed the repository: {orchestrator} does not exist")
    feature_source = orchestrator.read_text()
    main_source = env_only_version(feature_source)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=target.parent) as tmp:
        work, bare = Path(tmp) / "work", Path(tmp) / "bare.git"
        work.mkdir()
        _git(["init", "-q", "-b", MAIN_BRANCH], work)
        _copy_tree(source, work)
        (work / ORCHESTRATOR).write_text(main_source)
        _git(["add", "-A"], work)
        _git(["commit", "-q", "-m", MSG_MAIN], work, when="2025-06-02T09:00:00+00:00")

        _git(["checkout", "-q", "-b", FEATURE_BRANCH], work)
        (work / ORCHESTRATOR).write_text(feature_source)
        _git(["commit", "-q", "-a", "-m", MSG_FEATURE], work, when="2025-06-03T14:30:00+00:00")

        _git(["checkout", "-q", MAIN_BRANCH], work)
        if merged:
            _git(["merge", "-q", "--no-ff", "-m", MSG_MERGE, FEATURE_BRANCH], work, when="2025-06-04T10:15:00+00:00")

        _git(["init", "-q", "--bare", "-b", MAIN_BRANCH, str(bare)], Path(tmp))
        _git(["push", "-q", str(bare), f"{MAIN_BRANCH}:{MAIN_BRANCH}", f"{FEATURE_BRANCH}:{FEATURE_BRANCH}"], work)
        bare.rename(target)
    return target
