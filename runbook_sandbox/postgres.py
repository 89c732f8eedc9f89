"""Supabase's Postgres, on loopback: the embedded server from the `pgserver` wheel (no system
install), or an existing server given with `sandbox up --database-url`.

After start: the versioned SQL files in `sql/` (`NNN_name.sql`, each applied once and recorded
in `runbook.schema_migrations`), then the trigger (`sql/trigger.sql`, rendered with the Edge
Function's URL and anon key), and a `prefect` database for the Prefect server.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import psycopg
from psycopg import sql

from runbook_lib.core import processes

from .config import SandboxConfig
from .service import ServiceDef

SQL_DIR = Path(__file__).parent / "sql"
RUN_AS = "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None  # postgres refuses root
PREFECT_DATABASE = "prefect"
ORIGIN_FILE = "pgdata-origin.json"  # in the state directory: which cache entry pgdata was copied from, if any


def _pgserver():
    """The pgserver wheel's modules, imported lazily (only the embedded server needs them) and
    quietly: pgserver warns about XDG_RUNTIME_DIR on import, and we use no socket directory."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver._commands
        import pgserver.utils

    return pgserver


def _bin(name: str) -> str:
    return str(_pgserver()._commands.POSTGRES_BIN_PATH / name)


def pgdata(cfg: SandboxConfig) -> Path:
    return cfg.state / "pgdata"


def connect(cfg: SandboxConfig, database: str | None = None, **kw) -> psycopg.Connection:
    return psycopg.connect(cfg.postgres.url(database), connect_timeout=5, **kw)


def _grant_access(data: Path, *files: Path) -> None:
    """Let the unprivileged Postgres user reach its data directory (and the binaries). Done at every
    start: something else may have tightened a parent directory since (pytest resets its temp root
    to 0700, for instance)."""
    import pwd

    pgs = _pgserver()
    bin_path = pgs._commands.POSTGRES_BIN_PATH
    pgs.utils.ensure_user_exists(RUN_AS)
    pgs.utils.ensure_prefix_permissions(data)
    pgs.utils.ensure_prefix_permissions(bin_path)
    pgs.utils.ensure_folder_permissions(bin_path, 0o055)
    pgs.utils.ensure_folder_permissions(bin_path.parent / "lib", 0o044)
    ent = pwd.getpwnam(RUN_AS)
    for p in (data, *files):
        os.chown(p, ent.pw_uid, ent.pw_gid)


def prepare(cfg: SandboxConfig, use_cache: bool = True) -> None:
    """On first use: a copy of the cached, already-migrated data directory (`pgdata_cache`) with this
    sandbox's own password, else initdb (as an unprivileged user when we are root)."""
    if cfg.postgres.external_url:
        return
    data = pgdata(cfg)
    data.mkdir(parents=True, exist_ok=True)
    if (data / "PG_VERSION").exists():
        if RUN_AS:
            _grant_access(data)
        _remove_stale_pid_file(data)
        return
    import subprocess

    if use_cache:
        from . import pgdata_cache

        if RUN_AS:
            _grant_access(data)
        restored = pgdata_cache.restore(cfg, data, RUN_AS)
        origin = pgdata_cache.cache_key(cfg.postgres.user) if restored else None
        cfg.path(ORIGIN_FILE).write_text(json.dumps({"from_cache": origin}))
        if restored:
            return

    pwfile = cfg.state / ".pgpass-init"
    pwfile.write_text(cfg.postgres.password + "\n")
    if RUN_AS:
        _grant_access(data, pwfile)
    os.chmod(pwfile, 0o600)
    try:
        subprocess.run(
            [
                _bin("initdb"), "-D", str(data), "-U", cfg.postgres.user, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-instructions",
            ],
            check=True, capture_output=True, text=True, user=RUN_AS, group=RUN_AS,
            extra_groups=[] if RUN_AS else None,
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed: {exc.stderr or exc.stdout}") from exc
    finally:
        pwfile.unlink(missing_ok=True)


def _remove_stale_pid_file(data: Path) -> None:
    """After a crash the postmaster may linger as an unreaped zombie, which Postgres takes for a live
    server ("lock file postmaster.pid already exists"); its pid file is stale once it is not alive."""
    pid_file = data / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    if not processes.is_alive(pid):
        pid_file.unlink(missing_ok=True)


def command(cfg: SandboxConfig) -> list[str] | None:
    if cfg.postgres.external_url:
        return None
    return [
        _bin("postgres"), "-D", str(pgdata(cfg)),
        "-p", str(cfg.postgres.port), "-h", "127.0.0.1",
        "-c", "unix_socket_directories=",
        "-c", "max_connections=200",
        "-c", "fsync=off",  # a sandbox: speed over durability
        "-c", "synchronous_commit=off",
        "-c", "log_min_messages=warning",
    ]


def health(cfg: SandboxConfig) -> str | None:
    try:
        with connect(cfg) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        return f"cannot connect: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return None


def migration_files() -> list[Path]:
    return sorted(p for p in SQL_DIR.glob("*.sql") if re.match(r"^\d{3}_", p.name))


def migrate(cfg: SandboxConfig) -> list[str]:
    """Apply every versioned SQL file not applied yet, each in its own transaction."""
    applied_now = []
    with connect(cfg, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS runbook")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS runbook.schema_migrations "
            "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM runbook.schema_migrations")}
        for path in migration_files():
            version = path.stem
            if version in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("INSERT INTO runbook.schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
    return applied_now


def render_trigger_sql(edge_function_url: str, anon_key: str) -> str:
    text = (SQL_DIR / "trigger.sql").read_text()
    lit = lambda v: "'" + v.replace("'", "''") + "'"  # noqa: E731 - SQL string literal
    return text.replace(":edge_function_url", lit(edge_function_url)).replace(":anon_key", lit(anon_key))


def install_trigger(cfg: SandboxConfig) -> None:
    with connect(cfg, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(render_trigger_sql(cfg.edge_function_url, cfg.supabase.anon_key))


def ensure_database(cfg: SandboxConfig, name: str) -> None:
    with connect(cfg, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def fill_cache(cfg: SandboxConfig) -> int | None:
    """After an `up` whose Postgres was set up without the cache: build the cache entry in the background
    (`pgdata_cache.fill_later`); the builder's pid, if one was started."""
    try:
        origin = json.loads(cfg.path(ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if origin.get("from_cache") is not None:
        return None
    from . import pgdata_cache

    try:
        return pgdata_cache.fill_later(cfg)
    except OSError as exc:  # an unwritable cache costs the next fresh up its speed, never this up
        print(f"postgres: the data-directory cache cannot be filled: {exc}")
        return None


def after_start(cfg: SandboxConfig) -> None:
    migrate(cfg)
    install_trigger(cfg)
    ensure_database(cfg, PREFECT_DATABASE)


SERVICE = ServiceDef(
    name="postgres",
    ports=["postgres.port"],
    command=command,
    health=health,
    url=lambda cfg: cfg.database_url.replace(cfg.postgres.password, "***") if cfg.postgres.password else cfg.database_url,
    prepare=prepare,
    after_start=after_start,
    exports=lambda cfg: {"DATABASE_URL": cfg.database_url},
    stop_signal=signal.SIGINT,  # fast shutdown
    stop_timeout=15.0,  # let it finish its shutdown checkpoint rather than kill the server
    start_timeout=60,
    user=RUN_AS,
)
