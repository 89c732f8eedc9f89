"""Shared fixtures. The whole sandbox runs once per test session in a temporary state directory
(never the developer's .sandbox/), started and stopped through the same manager as the CLI."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from runbook_lib.core.startup import without_iri_formats
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig

# The test processes (pytest and its xdist workers) leave jsonschema's `iri` formats out, as the runner, its
# kernels and the sandbox's services do: papermill and Prefect's client import jsonschema here too, which
# would build rfc3987_syntax's grammar in each worker (~2.5 s of CPU). No test checks an `iri` format.
without_iri_formats()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SEED_CLIENT_ID = "00000000-0000-4000-8000-000000000001"  # the client runbook_sandbox/sql/003_seed.sql creates


def make_state_dir(prefix: str = "rbsb-") -> Path:
    """A sandbox state directory outside pytest's temp root: pytest resets that root to 0700 at
    every session start, which locks out the unprivileged Postgres user of a concurrent run."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def run_fresh(script: str, *args: str, timeout: float = 60) -> Any:
    """Run `script` in a fresh interpreter (`python -c`, in the project's root, with `args`): it must exit 0;
    the last line it printed, read as JSON. For what only a new process shows (imports, the collector, exit)."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), each worker is a session of its own
    (its own shared sandbox, its own lock directory); every test module is one group, run by one worker
    in file order (a module's fixtures, say its deployment, are made once), unless its tests name a group
    of their own (`fresh_runbook`'s readers: one run, whichever worker)."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


@pytest.fixture(scope="session", autouse=True)
def _own_lock_dir() -> Iterator[None]:
    """The targets' locks (core.locks) of this session, in a directory of its own: a concurrent test
    session aiming at a same-named target never finds its lock held (the runners it starts inherit it)."""
    import os

    from runbook_lib.core.locks import LOCK_DIR_ENV

    path = tempfile.mkdtemp(prefix="rblocks-", dir="/tmp")
    previous = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = path
    yield
    if previous is None:
        os.environ.pop(LOCK_DIR_ENV, None)
    else:
        os.environ[LOCK_DIR_ENV] = previous
    shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def fresh_runbook(tmp_path_factory):
    """The whole runbook (`make run`) on a fresh sandbox of its own, then `runbook health`, then 01-04
    again, once per session; the sandbox is down by the time tests read it (tests/integration/fresh_runbook.py)."""
    from tests.integration.fresh_runbook import run_fresh_runbook

    return run_fresh_runbook(tmp_path_factory.mktemp("fresh-runbook"))


@pytest.fixture
def sandbox_fault(sandbox) -> Iterator[Callable[..., Any]]:
    """The sandbox's fault switch on the session sandbox: `with sandbox_fault(service, mode, **kw):`
    cuts one service alone for the block and always undoes it (`runbook_sandbox.faults.fault`).
    service: database, prefect_api, git, modal, supabase_api, edge_function; mode: down, reset, slow
    (delay_ms=...), clear, and error (status=..., count=...) for supabase_api / edge_function. Any
    fault still set when the test ends is cleared too."""
    from runbook_sandbox import faults

    def cut(service: str, mode: str, **kw: Any):
        return faults.fault(service, mode, state_dir=sandbox.state, **kw)

    yield cut
    faults.clear_all(state_dir=sandbox.state)


@pytest.fixture
def db(sandbox):
    """An autocommit connection to the sandbox database."""
    with psycopg.connect(sandbox.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


def wait_for(probe: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.1) -> Any:
    """Poll probe() until it returns something truthy, and return that; fail with `what` after
    timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def kernel_connection_files(processes: list[Any]) -> list[Path]:
    """The connection files (`ipykernel_launcher -f FILE`) of the kernels among `processes` (psutil's; one
    gone meanwhile is passed over)."""
    import psutil

    files = []
    for proc in processes:
        try:
            command = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "ipykernel_launcher" in command and "-f" in command[:-1]:
            files.append(Path(command[command.index("-f") + 1]))
    return files


# -- a partial sandbox (test_modal_standin, test_pgnet_relay) -----------------------------------------


@contextlib.contextmanager
def partial_sandbox(prefix: str, only: list[str]) -> Iterator[SandboxConfig]:
    """Only the stand-ins `only`, in a state directory of their own, purged afterwards. Not under
    pytest's basetemp: pytest re-restricts /tmp/pytest-of-<user> to its owner at every session
    start, which locks out Postgres (running as `pgserver`) when sessions overlap."""
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        manager.up(state_dir, only=only, echo=lambda s: None)
        yield SandboxConfig.load_or_create(state_dir)
    finally:
        manager.down(state_dir, purge=True, echo=lambda s: None)


@pytest.fixture
def conn(stack):
    """An autocommit connection returning dict rows, to the database of the test module's `stack`
    fixture (a partial sandbox)."""
    with psycopg.connect(stack.database_url, autocommit=True, row_factory=dict_row) as c:
        yield c


def insert_batch(conn, status: str, blueprint: list[str], items: list[tuple[str, str]], *,
                 client_id: str = SEED_CLIENT_ID, workstream: str = "company-enrichment") -> tuple[str, list[str]]:
    """The admin UI's inserts, in one transaction on `conn` (dict rows): the batch with `status`, its
    items (company name, domain), one PENDING workflow state per item at blueprint[0]. Returns the
    batch id and the item ids. (runbook_lib.systems.database.Database.launch_batch does the same on a
    connection of its own; these tests also insert inside a transaction they roll back.)"""
    with conn.transaction():
        batch_id = conn.execute(
            "INSERT INTO batches (status, blueprint, client_id, workstream_slug) VALUES (%s, %s, %s, %s) RETURNING id",
            (status, json.dumps(blueprint), client_id, workstream),
        ).fetchone()["id"]
        item_ids = []
        for name, domain in items:
            item_id = conn.execute(
                "INSERT INTO batch_items (batch_id, company_name, company_domain) VALUES (%s, %s, %s) RETURNING id",
                (batch_id, name, domain),
            ).fetchone()["id"]
            conn.execute(
                "INSERT INTO workflow_states (batch_id, item_id, step_name, status) VALUES (%s, %s, %s, 'PENDING')",
                (batch_id, item_id, blueprint[0]),
            )
            item_ids.append(str(item_id))
    return str(batch_id), item_ids


# -- the chain (test_chain, test_nb05_e2e, test_fallback) ---------------------------------------------


@pytest.fixture(scope="module")
def settings(sandbox):
    """The sandbox profile on the branch whose flow reads the Secret block (chain_helpers.FLOW_BRANCH)."""
    from tests.integration.chain_helpers import sandbox_settings

    return sandbox_settings(sandbox)


@pytest.fixture(scope="module")
def managed(settings) -> str:
    """The managed deployment (step 03's library calls), and the Edge Function pointed at it."""
    from tests.integration.chain_helpers import deploy_managed, set_function_deployment_id

    deployment_id = deploy_managed(settings)
    set_function_deployment_id(settings, deployment_id)
    return deployment_id


@pytest.fixture(scope="module")
def database(settings):
    """runbook_lib's Database of the profile."""
    from runbook_lib.systems.database import Database

    return Database.from_settings(settings)


@pytest.fixture(autouse=True)
def _release_step_locks() -> Iterator[None]:
    """A step started in a test (start_step) holds its target's lock until it finishes, as a kernel
    would; a test that stops half-way must not leave the lock held by the test session (a later runner
    test, or the browser tests' run, aiming at the same target would be refused)."""
    yield
    from runbook_lib.core import locks

    for lock in list(locks._held.values()):
        locks.release_step_lock(lock)
