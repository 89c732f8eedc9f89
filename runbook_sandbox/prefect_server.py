"""The real Prefect server (the pinned prefect 3.9.1), on loopback, behind the Cloud-shaped gateway.

It has its own home (`<state>/prefect`, never the user's `~/.prefect`) and is backed by the sandbox
Postgres (database `prefect`, created by `postgres.after_start`): SQLite logs `database is locked`
under the tests' concurrent load. Analytics, the UI and the services nothing here uses (scheduler,
automations) are off, so it starts and idles light. Clients never talk to it directly: the gateway
(`prefect_gateway`) is the only public face, with Prefect Cloud's URL shape and bearer auth.

The embedded Postgres (pgserver's build) ships no contrib extensions, and Prefect's migrations create
`pg_trgm` GIN indexes on name columns (only to speed up partial-name search). This process runs the
server in-process and, when the database lacks `pg_trgm`, rewrites those statements: no extension,
plain btree indexes instead. Every query behaves the same; only a name search over millions of rows
would be slower.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time

import psycopg

from runbook_lib.core import processes
from runbook_lib.core.startup import no_collections_while_importing, without_iri_formats

from .config import SandboxConfig, config_from_argv
from .service import ServiceDef
from .postgres import PREFECT_DATABASE, connect


def home(cfg: SandboxConfig) -> str:
    """`<state>/prefect`: the server's PREFECT_HOME (the worker's is `<state>/prefect/worker`)."""
    path = cfg.state / "prefect"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def database_url(cfg: SandboxConfig) -> str:
    """The asyncpg URL of the `prefect` database in the sandbox Postgres."""
    url = cfg.postgres.url(PREFECT_DATABASE)
    return "postgresql+asyncpg://" + url.split("://", 1)[1]


def server_env(cfg: SandboxConfig) -> dict[str, str]:
    return {
        "PREFECT_HOME": home(cfg),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(cfg),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # runs are event-triggered, no schedules
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",  # no automations
        "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",  # no flow pauses
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "true",  # a run on a paused pool shows as Late
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "5",
        # Two pooled connections kept open, more only while busy (each is a Postgres backend, ~20 MiB).
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "2",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(cfg.prefect.server_port),
    }


_TRGM_EXTENSION = re.compile(r"CREATE EXTENSION IF NOT EXISTS pg_trgm", re.IGNORECASE)
_TRGM_INDEX = re.compile(r"USING\s+gin\s*\(\s*(\w+)\s+gin_trgm_ops\s*\)", re.IGNORECASE)


def without_pg_trgm(statement: str) -> str:
    """The statement, with pg_trgm's extension and GIN trigram indexes replaced (see module doc)."""
    if _TRGM_EXTENSION.search(statement):
        return "SELECT 1"
    return _TRGM_INDEX.sub(r"USING btree (\1)", statement)


def pg_trgm_available(cfg: SandboxConfig) -> bool:
    with connect(cfg, PREFECT_DATABASE) as conn:
        return conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'").fetchone() is not None


def _install_pg_trgm_rewrite() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "before_cursor_execute", retval=True)
    def _rewrite(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        return without_pg_trgm(statement), parameters


# -- starting fast on a database this server already set up ------------------------------------------
#
# On every start Prefect checks its migrations (~1.5 s) and registers every block type it ships (~1 s on an
# idle machine, 5 s under load). Both are needed once per database and Prefect version: after a start that
# did them, `after_start` records the database's Alembic revision with Prefect's version, and a later start
# that finds the same revision under the same version skips both. A new database, a reset one or another
# Prefect gets the full start.


def _ready_marker(cfg: SandboxConfig):
    return cfg.path("prefect", "server-ready.json")


def database_revision(cfg: SandboxConfig) -> str | None:
    """The `prefect` database's Alembic revision, None when it has none (or cannot be read)."""
    try:
        with connect(cfg, PREFECT_DATABASE) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except psycopg.Error:
        return None
    return row[0] if row else None


def _ready_state(cfg: SandboxConfig, revision: bool = True) -> dict[str, str | None]:
    return {
        "prefect": importlib.metadata.version("prefect"),
        "database": cfg.postgres.url(PREFECT_DATABASE).rpartition("@")[2],  # host:port/db, no password
        "revision": database_revision(cfg) if revision else None,
    }


def startup_settings(cfg: SandboxConfig) -> dict[str, str]:
    """Settings for this start: migrations and block registration off when already done (see above)."""
    try:
        recorded = json.loads(_ready_marker(cfg).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    current = _ready_state(cfg)
    if current["revision"] is None or recorded != current:
        return {}
    return {"PREFECT_API_DATABASE_MIGRATE_ON_START": "false", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}


def after_start(cfg: SandboxConfig) -> None:
    """Record that this database is migrated and has its block types, for the next start."""
    state = _ready_state(cfg)
    if state["revision"] is not None:
        _ready_marker(cfg).write_text(json.dumps(state))


def record_ready(cfg: SandboxConfig, revision: str | None) -> None:
    """Record, before the first start, a database copied from the cache (`pgdata_cache`) as set up at
    `revision` by this Prefect: the server's first start then skips migrations and block registration."""
    if revision:
        state = {**_ready_state(cfg, revision=False), "revision": revision}
        _ready_marker(cfg).write_text(json.dumps(state))


DATABASE_WAIT_SECONDS = 170.0  # within the service's start_timeout


def wait_for_database(cfg: SandboxConfig, timeout: float = DATABASE_WAIT_SECONDS) -> None:
    """Wait until the `prefect` database accepts connections: `sandbox up` starts this process beside
    Postgres, so importing Prefect overlaps Postgres's start (and initdb on a fresh state directory);
    `postgres.after_start` creates the database."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with connect(cfg, PREFECT_DATABASE):
                return
        except psycopg.Error as exc:
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        time.sleep(0.1)
    raise SystemExit(f"prefect_server: the database {PREFECT_DATABASE!r} did not accept connections within "
                     f"{timeout:.0f}s ({last})")


def serve(cfg: SandboxConfig) -> None:
    """Run the Prefect server (API and its background services) in this process until stopped."""
    began = time.monotonic()
    without_iri_formats()
    with no_collections_while_importing(freeze=True):  # the app, once built, lives as long as the process
        import uvicorn
        from prefect.context import refresh_global_settings_context
        from prefect.server.api.server import create_app

        app = create_app(final=True)  # collects once it has dropped what it does not keep
    imported = time.monotonic()
    wait_for_database(cfg)
    skip = startup_settings(cfg)
    if skip:
        os.environ.update(skip)  # read by the app's lifespan, from the settings context refreshed here
        refresh_global_settings_context()
    print(
        f"prefect_server: imports and app {imported - began:.1f}s; database ready after "
        f"{time.monotonic() - imported:.1f}s more; "
        + ("migrations and block registration already done" if skip else "migrating and registering block types"),
        flush=True,
    )
    if not pg_trgm_available(cfg):
        _install_pg_trgm_rewrite()
    uvicorn.run(
        app=app,
        host="127.0.0.1",
        port=cfg.prefect.server_port,
        log_level="warning",
        ws_ping_interval=20,
        ws_ping_timeout=20,
        # At a stop, what is still open is given 0.2 s (a request takes 10-40 ms here), then cancelled:
        # an `/events/out` handler (the managed worker's pick-up subscription) notices its client gone
        # only at its next 1 s check, and nothing in flight matters to a sandbox that is stopping.
        # With 0.5 s this was most of `sandbox down` (0.7-0.8 s of it; 0.4 s now).
        timeout_graceful_shutdown=0.2,
    )


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"{cfg.prefect_server_api_url}/health")


SERVICE = ServiceDef(
    name="prefect_server",
    # Its process starts (imports Prefect) beside Postgres and waits for its database (`serve`), which
    # postgres.after_start creates; a Postgres that fails to start abandons the wait.
    after_start_needs=["postgres"],
    uses=["postgres"],
    ports=["prefect.server_port"],
    health=health,
    url=lambda cfg: cfg.prefect_server_api_url,
    after_start=after_start,
    env=server_env,
    start_timeout=180,  # the first start runs every migration on an empty database
)


if __name__ == "__main__":
    serve(config_from_argv())
