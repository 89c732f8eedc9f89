"""Where the project lives, whatever the working directory (project root, `notebooks/`, a test's
temp dir): the directory holding `profiles/` and `runbook_lib/`, or `RUNBOOK_PROJECT_ROOT`."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT_ENV = "RUNBOOK_PROJECT_ROOT"
SANDBOX_DIR_ENV = "RUNBOOK_SANDBOX_DIR"


def project_root() -> Path:
    explicit = os.environ.get(PROJECT_ROOT_ENV)
    if explicit:
        return Path(explicit).resolve()
    return Path(__file__).resolve().parents[2]


def profiles_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "profiles"


def default_sandbox_dir(environ: dict[str, str] | None = None, root: Path | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get(SANDBOX_DIR_ENV)
    return Path(explicit).resolve() if explicit else (root or project_root()) / ".sandbox"


def default_run_dir(profile: str, root: Path | None = None) -> Path:
    """Where an interactive session keeps its step results when no `run_dir` is given."""
    return (root or project_root()) / "outputs" / "runs" / f"interactive-{profile}"
