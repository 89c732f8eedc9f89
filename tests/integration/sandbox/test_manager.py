"""`sandbox up | status | down` through the real CLI: state files, health, restart, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from dotenv import dotenv_values

from runbook_lib.core import processes as process
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig
from tests.conftest import make_state_dir


def cli(state_dir, *args, check=True):
    env = dict(os.environ, RUNBOOK_SANDBOX_DIR=str(state_dir))
    proc = subprocess.run(
        [sys.executable, "-m", "runbook_lib", "sandbox", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sandbox {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def own_sandbox():
    """A sandbox of its own, for tests that break it."""
    state = make_state_dir()
    yield state
    manager.down(state, purge=True, echo=lambda s: None)


def test_up_writes_state_and_env_then_status_and_down(own_sandbox):
    out = cli(own_sandbox, "up").stdout
    assert "postgres" in out
    state = json.loads((own_sandbox / "sandbox.json").read_text())
    cfg = SandboxConfig.load_or_create(own_sandbox)
    rows = {r["name"]: r for r in manager.status(own_sandbox)}
    assert all(r["healthy"] for r in rows.values()), rows
    for name, rec in state["services"].items():
        assert rec["healthy"] is True and rec["url"], (name, rec)
    env = dotenv_values(own_sandbox / "sandbox.env")
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        assert conn.execute("select count(*) from public.enrichment_registry").fetchone()[0] >= 2
    assert oct((own_sandbox / "sandbox.env").stat().st_mode & 0o777) == "0o600"
    # The password never appears in the state file meant for display.
    assert cfg.postgres.password not in (own_sandbox / "sandbox.json").read_text()

    second = cli(own_sandbox, "up").stdout
    assert "already running" in second

    cli(own_sandbox, "down")
    assert process.processes_of(cfg.instance_id) == []
    assert cli(own_sandbox, "status", check=False).returncode == 1


def test_status_reports_a_dead_service_and_up_restarts_it(own_sandbox):
    cli(own_sandbox, "up")
    cfg = SandboxConfig.load_or_create(own_sandbox)
    pid = json.loads((own_sandbox / "sandbox.json").read_text())["services"]["postgres"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    st = cli(own_sandbox, "status", check=False)
    assert st.returncode == 1
    assert "DOWN" in st.stdout and "postgres" in st.stdout
    again = cli(own_sandbox, "up").stdout
    assert "postgres" in again and "restarting" in again
    assert all(r["healthy"] for r in manager.status(own_sandbox))
    # Data survived the crash (same data directory, migrations not re-applied).
    with psycopg.connect(cfg.database_url) as conn:
        versions = [r[0] for r in conn.execute("select version from runbook.schema_migrations order by 1")]
    assert versions == sorted(set(versions)) and versions[0] == "001_schema"


def test_migrations_apply_once_and_trigger_matches_contract(sandbox, db):
    from runbook_sandbox import postgres

    assert postgres.migrate(sandbox) == []  # already applied: nothing to do
    row = db.execute(
        "select pg_get_triggerdef(t.oid) from pg_trigger t where t.tgname = 'trigger_batch_ready'"
    ).fetchone()
    assert row is not None
    tdef = row[0]
    assert "AFTER UPDATE ON public.batches" in tdef
    assert "(old.status = 'INITIALIZING'::batchstatus)" in tdef and "(new.status = 'PENDING'::batchstatus)" in tdef
    src = db.execute("select prosrc from pg_proc where proname = 'notify_prefect_on_batch_insert'").fetchone()[0]
    assert sandbox.edge_function_url in src
    enum = [r[0] for r in db.execute("select unnest(enum_range(null::batchstatus))::text")]
    assert enum == ["INITIALIZING", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED"]


def test_an_existing_server_given_by_url_gets_the_schema_and_is_not_stopped(sandbox, db, unique):
    """`sandbox up --database-url`: no embedded server; the schema goes into the given database,
    and `down` leaves that server running."""
    name = f"external_{unique}"
    db.execute(f'CREATE DATABASE "{name}"')
    state = make_state_dir()
    try:
        url = sandbox.postgres.url(name)
        # Only the postgres service: a second whole stack would share the session sandbox's Prefect database.
        manager.up(state, database_url=url, only=["postgres"], echo=lambda s: None)
        rec = json.loads((state / "sandbox.json").read_text())["services"]["postgres"]
        assert rec["pid"] is None and rec["healthy"] is True
        assert dotenv_values(state / "sandbox.env")["DATABASE_URL"] == url
        with psycopg.connect(url) as conn:
            tables = {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}
            assert {"batches", "batch_items", "workflow_states", "enrichment_registry"} <= tables
        cli(state, "down")
        with psycopg.connect(url) as conn:  # the existing server is still up
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        manager.down(state, purge=True, echo=lambda s: None)
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_url_never_reaches_a_command_line(sandbox, db, unique, tmp_path):
    """`sandbox up --database-url-file` (or RUNBOOK_SANDBOX_DATABASE_URL): the DSN reaches the sandbox's
    processes through their 0600 config file, never their command lines (`ps` shows those to everyone)."""
    name = f"external_{unique}"
    db.execute(f'CREATE DATABASE "{name}"')
    state = make_state_dir()
    url = sandbox.postgres.url(name)
    password = sandbox.postgres.password
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(url + "\n")
    dsn_file.chmod(0o600)
    try:
        # Not the whole stack: a second Prefect server would share the session sandbox's Prefect database.
        cli(state, "up", "--database-url-file", str(dsn_file), "--only", "fault_proxy", "--only", "postgres",
            "--only", "modal_standin")
        cfg = SandboxConfig.load_or_create(state)
        assert cfg.postgres.external_url == url
        assert oct(cfg.config_path.stat().st_mode & 0o777) == "0o600"
        pids = [p.pid for p in process.processes_of(cfg.instance_id)]
        assert len(pids) >= 2  # the proxy and the Modal stand-in (an external server is not started)
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
            assert password not in argv and url not in argv, (pid, argv)
        with psycopg.connect(dotenv_values(state / "sandbox.env")["DATABASE_URL"]) as conn:  # through the proxy
            assert conn.execute("select current_database()").fetchone() == (name,)
        env_run = subprocess.run(
            [sys.executable, "-m", "runbook_lib", "sandbox", "up", "--only", "postgres"],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, RUNBOOK_SANDBOX_DIR=str(state), RUNBOOK_SANDBOX_DATABASE_URL=url),
        )
        assert env_run.returncode == 0, env_run.stderr
        both = cli(state, "up", "--database-url", url, "--database-url-file", str(dsn_file), check=False)
        assert both.returncode == 2 and "not both" in both.stderr
    finally:
        manager.down(state, purge=True, echo=lambda s: None)
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
