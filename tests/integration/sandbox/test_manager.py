"""`sandbox up | status | down` through the real CLI: state files, health, restart, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
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


# -- a fresh state directory from the cached data directory (runbook_sandbox/pgdata_cache.py) -------------


def test_a_fresh_sandbox_comes_from_the_cache_with_its_own_password_and_a_bad_entry_is_rebuilt(monkeypatch):
    from runbook_sandbox import pgdata_cache, postgres
    from tests.conftest import wait_for

    cache = make_state_dir("rbpgcache-")
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(cache))
    states = []

    def fresh_up(only):
        state = make_state_dir()
        states.append(state)
        manager.up(state, only=only, echo=lambda s: None)
        cfg = SandboxConfig.load_or_create(state)
        origin = json.loads((state / postgres.ORIGIN_FILE).read_text())["from_cache"]
        return cfg, origin

    def built():
        return pgdata_cache.entry("postgres")

    try:
        # An empty cache: the slow way, then the entry is built in the background.
        first, origin = fresh_up(["postgres"])
        assert origin is None
        path, marker = wait_for(built, 240, "the cache entry built after the first fresh up")
        assert marker["key"] == pgdata_cache.key_inputs("postgres")
        # Nothing of the first sandbox's in the entry: not its password, not the trigger with its anon key.
        for root, _dirs, files in os.walk(path):
            for name in files:
                content = open(os.path.join(root, name), "rb").read()
                assert first.postgres.password.encode() not in content, name
                assert first.supabase.anon_key.encode() not in content, name

        # A second fresh sandbox comes from it: schema and Prefect's database ready, its own password only.
        second, origin = fresh_up(["postgres", "prefect_server"])
        assert origin == path.name
        assert "migrations and block registration already done" in second.log_path("prefect_server").read_text()
        assert second.postgres.password != first.postgres.password
        with psycopg.connect(second.postgres.url(), connect_timeout=5) as conn:
            applied = {r[0] for r in conn.execute("SELECT version FROM runbook.schema_migrations")}
            assert applied == {p.stem for p in postgres.migration_files()}
            assert conn.execute("SELECT count(*) FROM public.enrichment_registry").fetchone()[0] >= 2
            trigger_fn = conn.execute(
                "SELECT string_agg(prosrc, '') FROM pg_proc WHERE prosrc LIKE '%Authorization%'"
            ).fetchone()[0] or ""
            assert second.supabase.anon_key in trigger_fn and first.supabase.anon_key not in trigger_fn
        with psycopg.connect(second.postgres.url("prefect"), connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM block_type").fetchone()[0] > 0
        as_first = second.model_copy(deep=True)
        as_first.postgres.password = first.postgres.password
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(as_first.postgres.url(), connect_timeout=5).close()
        pgdata = postgres.pgdata(second)
        if postgres.RUN_AS:
            import pwd

            assert pwd.getpwuid(pgdata.stat().st_uid).pw_name == postgres.RUN_AS
        assert oct(pgdata.stat().st_mode & 0o777) == "0o700"

        # A partial entry (no marker) is ignored, and rebuilt after the up that went the slow way.
        (path / pgdata_cache.MARKER).unlink()
        _, origin = fresh_up(["postgres"])
        assert origin is None
        path, _ = wait_for(built, 240, "the cache entry rebuilt")
        # An entry whose files changed since it was built is ignored too (and removed for a rebuild).
        (path / "pgdata" / "PG_VERSION").write_text("16\n\n")
        third, origin = fresh_up(["postgres"])
        assert origin is None
        with psycopg.connect(third.postgres.url(), connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM public.enrichment_registry").fetchone()[0] >= 2
        wait_for(built, 240, "the cache entry rebuilt after a changed one")
    finally:
        for state in states:
            manager.down(state, purge=True, echo=lambda s: None)
        wait_for(lambda: not _builder_running(cache), 240, "the cache builder to finish")
        shutil.rmtree(cache, ignore_errors=True)


def _builder_running(cache) -> bool:
    """A cache builder (`python -m runbook_sandbox.pgdata_cache`) still holds a key's lock in `cache`."""
    from runbook_sandbox import pgdata_cache

    for lock in cache.glob("*.lock"):
        with pgdata_cache._Lock(lock) as held:
            if not held.held:
                return True
    return False


# -- a port taken between its allocation and the service's bind --------------------------------------------


def test_a_port_taken_by_another_process_during_up_is_detected_and_up_starts_again_on_new_ports(own_sandbox, monkeypatch):
    """Two sandboxes starting at once can be given the same free port. Here another process (an HTTP
    server answering 200 to everything, as another sandbox's stand-in would) binds the git server's port
    just before the git server starts: its health probe is answered by the wrong process. `up` must not
    take that answer for the git server's: it starts again on new ports and the git server it reports
    is its own."""
    import http.server
    import threading

    class AnswersEverything(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    foreign: list[http.server.HTTPServer] = []
    real_spawn = process.spawn

    def spawn_after_another_process_took_the_port(argv, **kw):
        if not foreign and "runbook_sandbox.git_server" in argv:
            cfg = SandboxConfig.load_or_create(own_sandbox)
            server = http.server.HTTPServer(("127.0.0.1", cfg.git.port), AnswersEverything)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            foreign.append(server)
        return real_spawn(argv, **kw)

    monkeypatch.setattr(process, "spawn", spawn_after_another_process_took_the_port)
    lines: list[str] = []
    try:
        manager.up(own_sandbox, only=["git_server"], echo=lines.append)
        taken = foreign[0].server_address[1]
        cfg = SandboxConfig.load_or_create(own_sandbox)
        assert cfg.git.port != taken
        assert any("again on new ports" in line and str(taken) in line for line in lines), lines
        pid = json.loads((own_sandbox / "sandbox.json").read_text())["services"]["git_server"]["pid"]
        assert cfg.git.port in manager._listening_ports(pid)
        rows = {r["name"]: r for r in manager.status(own_sandbox)}
        assert rows["git_server"]["healthy"], rows["git_server"]
    finally:
        for server in foreign:
            server.shutdown()
            server.server_close()
