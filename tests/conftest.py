"""Shared fixtures. The whole sandbox runs once per test session in a temporary state directory
(never the developer's .sandbox/), started and stopped through the same manager as the CLI."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_state_dir(prefix: str = "rbsb-") -> Path:
    """A sandbox state directory outside pytest's temp root: pytest resets that root to 0700 at
    every session start, which locks out the unprivileged Postgres user of a concurrent run."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def sandbox_dir() -> Path:
    path = make_state_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox(sandbox_dir) -> SandboxConfig:
    """Every registered stand-in, up and healthy; yields the sandbox's config."""
    try:
        manager.up(sandbox_dir, echo=lambda s: None)
    except Exception:
        manager.down(sandbox_dir, echo=lambda s: None)
        raise
    yield SandboxConfig.load_or_create(sandbox_dir)
    manager.down(sandbox_dir, echo=lambda s: None)


@pytest.fixture(scope="session")
def sandbox_env(sandbox) -> dict[str, str]:
    """The settings of `.sandbox/sandbox.env`, as a production user would export them."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(sandbox.state / "sandbox.env").items() if v is not None}


@pytest.fixture
def db(sandbox):
    """An autocommit connection to the sandbox database."""
    with psycopg.connect(sandbox.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]
