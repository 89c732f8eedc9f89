"""A cache of an initialised, migrated Postgres data directory, so a fresh sandbox skips the slow set-up.

A new state directory costs initdb, the sandbox's SQL migrations (`sql/NNN_*.sql`), Prefect's own
migrations and its block-type registration. None of that differs between sandboxes of the same code:
one copy of the result is kept under `~/.cache/runbook-sandbox/pgdata/<key>` (`RUNBOOK_PGDATA_CACHE`
overrides the root, as `RUNBOOK_MANAGED_ENV_CACHE` does for the managed environments), keyed by what
determines its content: the Postgres binaries' version, the migration files, the installed Prefect
(and its collections), the superuser's name and this module's format.

What the cache never holds: a password (the superuser's is removed before the copy is taken), the
trigger (it carries the instance's anon key; `postgres.after_start` installs it at every start), and
anything the gateway writes (work pool, Secret blocks). A fresh `up` copies the entry into the new
state directory, hands it to the unprivileged Postgres user and sets the instance's own password with
`postgres --single`, the statement fed on stdin (never on a command line).

An entry is built apart from any sandbox, in a process of its own started after an `up` that found no
entry (`fill_later`): its own initdb in a temporary directory, a Postgres on a free loopback port,
the migrations, then a copy under `<key>.partial-<pid>` with the marker file written last, renamed to
`<key>`. A file lock per key keeps concurrent builders apart; an entry without its marker (a build
that died, a hand-edited cache) is ignored and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

CACHE_ENV = "RUNBOOK_PGDATA_CACHE"
MARKER = ".runbook-pgdata-cache.json"
FORMAT = 1  # bump when what the entry holds changes
BUILD_TIMEOUT_SECONDS = 600.0
KEEP_ENTRIES = 3  # entries of other keys (other checkouts, Prefect versions) kept, the most recently used
LOG_KEEP_BYTES = 256 * 1024  # build.log is cut to its last 256 KiB once it passes 1 MiB


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "runbook-sandbox" / "pgdata")


@lru_cache(maxsize=1)
def _postgres_version() -> str:
    from .postgres import _bin

    return subprocess.run([_bin("postgres"), "--version"], capture_output=True, text=True, check=True).stdout.strip()


@lru_cache(maxsize=1)
def _prefect_distributions() -> tuple[tuple[str, str], ...]:
    """prefect and every installed prefect-* collection (their block types are registered too), read
    once per process like the Postgres version: reading every installed distribution's metadata costs
    ~80 ms of CPU, and the key is asked for at every `entry()` (three times per fresh `up`, and at
    every poll of whoever waits for a build)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "prefect" or name.startswith("prefect-"):
            found[name] = dist.version
    return tuple(sorted(found.items()))


def key_inputs(user: str) -> dict:
    from .postgres import migration_files

    sql = hashlib.sha256()
    for path in migration_files():
        sql.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "format": FORMAT,
        "postgres": _postgres_version(),
        "sql": sql.hexdigest(),
        "prefect": dict(_prefect_distributions()),
        "superuser": user,
    }


def cache_key(user: str) -> str:
    return hashlib.sha256(json.dumps(key_inputs(user), sort_keys=True).encode()).hexdigest()[:24]


def entry(user: str) -> tuple[Path, dict] | None:
    """The complete entry for this key and its marker's content; None when missing or partial."""
    path = cache_root() / cache_key(user)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (path / "pgdata" / "PG_VERSION").is_file():
        return None
    return path, marker


class _Lock:
    """An exclusive flock on `path`, taken without waiting; `held` says whether it was."""

    def __init__(self, path: Path):
        self.path, self.held, self._fd = path, False, None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except BlockingIOError:
            pass
        return self

    def __exit__(self, *exc):
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


# -- restoring into a new state directory ------------------------------------------------------------


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def set_password(data: Path, user: str, password: str, run_as: str | None) -> None:
    """Set `user`'s password in the stopped cluster at `data`: single-user Postgres, the statement on stdin."""
    from .postgres import _bin

    statement = f"ALTER ROLE {_sql_identifier(user)} PASSWORD {_sql_literal(password)};\n"
    proc = subprocess.run(
        [_bin("postgres"), "--single", "-D", str(data), "-c", "unix_socket_directories=", "-c", "fsync=off",
         "-c", "log_min_messages=warning", "postgres"],
        check=False, input=statement, capture_output=True, text=True, user=run_as, group=run_as,
        extra_groups=[] if run_as else None, timeout=120,
    )
    if proc.returncode != 0 or "ERROR" in proc.stdout + proc.stderr:
        # The output may quote the statement: say what failed, never what was fed.
        raise RuntimeError(f"setting the password on the cached data directory failed (exit {proc.returncode})")


def restore(cfg, data: Path, run_as: str | None) -> bool:
    """Fill the empty `data` from the cache entry for this key; False (data left empty) when there is none
    or it cannot be used, so the caller runs initdb."""
    found = entry(cfg.postgres.user)
    if found is None:
        return False
    path, marker = found
    try:
        shutil.copytree(path / "pgdata", data, dirs_exist_ok=True, symlinks=True)
        if _inventory(data) != marker.get("inventory"):
            # Files lost or changed since it was built: not used, and removed so that it is rebuilt.
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError("the cache entry is not as built")
        if run_as:
            import pwd

            ent = pwd.getpwnam(run_as)
            for root, dirs, files in os.walk(data):
                os.chown(root, ent.pw_uid, ent.pw_gid)
                for name in files:
                    os.chown(os.path.join(root, name), ent.pw_uid, ent.pw_gid, follow_symlinks=False)
        os.chmod(data, 0o700)  # Postgres refuses a data directory others can read
        set_password(data, cfg.postgres.user, cfg.postgres.password, run_as)
    except (OSError, RuntimeError, subprocess.SubprocessError):
        _empty(data)
        return False
    from .prefect_server import record_ready

    record_ready(cfg, marker.get("prefect_revision"))
    try:
        os.utime(path / MARKER)  # last used: what pruning keeps
    except OSError:
        pass
    return True


def _inventory(data: Path) -> dict[str, int]:
    """Number of files and their total size under `data`: a copy that differs is not the entry as built."""
    files = size = 0
    for root, _dirs, names in os.walk(data):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(root, name)).st_size
    return {"files": files, "bytes": size}


def _empty(data: Path) -> None:
    for child in data.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# -- filling the cache ---------------------------------------------------------------------------------


def fill_later(cfg) -> int | None:
    """After an `up` that found no entry: build one in a detached, low-priority process; its pid, or None
    when the entry exists or a build is already under way."""
    if cfg.postgres.external_url or entry(cfg.postgres.user) is not None:
        return None
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg.postgres.user)
    with _Lock(root / f"{key}.lock") as lock:
        if not lock.held:
            return None
    from runbook_lib.core import processes

    from .config import PROJECT_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != processes.INSTANCE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    with open(root / "build.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runbook_sandbox.pgdata_cache", "--user", cfg.postgres.user],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
            start_new_session=True,
        )
    return proc.pid


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the builder dies, so no Postgres outlives it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def build(user: str = "postgres", log=print) -> Path | None:
    """Build the entry for this key unless it exists or another process is building it; its path."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(user)
    target = root / key
    with _Lock(root / f"{key}.lock") as lock:
        if not lock.held:
            log(f"pgdata cache {key}: another process is building it")
            return None
        if entry(user) is not None:
            return target
        shutil.rmtree(target, ignore_errors=True)  # partial or corrupt: rebuilt
        began = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="rbpgcache-", dir="/tmp"))
        work.chmod(0o755)
        partial = root / f"{key}.partial-{os.getpid()}"
        try:
            revision = _build_in(work, user)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(work / "pgdata", partial / "pgdata", symlinks=True)
            marker = {"key": key_inputs(user), "prefect_revision": revision, "built_at": time.time(),
                      "inventory": _inventory(partial / "pgdata")}
            (partial / MARKER).write_text(json.dumps(marker, indent=2))
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        log(f"pgdata cache {key}: built in {time.monotonic() - began:.1f}s")
    for removed in prune(keep=key):
        log(f"pgdata cache: removed {removed}")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(keep: str) -> list[str]:
    """Remove what is no longer used from the cache: entries of other keys beyond the KEEP_ENTRIES most
    recently used (each ~50 MB; an entry being built or restored keeps its lock and is skipped), partial
    directories whose builder is gone, lock files without an entry; and cut build.log to its tail.
    The names removed."""
    root = cache_root()
    removed: list[str] = []
    if not root.is_dir():
        return removed
    entries = []
    for path in root.iterdir():
        name = path.name
        if ".partial-" in name:
            pid = name.rsplit("-", 1)[1]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
        elif path.is_dir() and name != keep:
            marker = path / MARKER
            entries.append((marker.stat().st_mtime if marker.exists() else 0.0, path))
    entries.sort(reverse=True)
    for _used, path in entries[KEEP_ENTRIES:]:
        with _Lock(root / f"{path.name}.lock") as lock:
            if not lock.held:  # being built: not ours to remove
                continue
            shutil.rmtree(path, ignore_errors=True)
            (root / f"{path.name}.lock").unlink(missing_ok=True)
            removed.append(path.name)
    for lock_file in root.glob("*.lock"):
        if not (root / lock_file.stem).exists() and lock_file.stem != keep:
            with _Lock(lock_file) as lock:
                if lock.held:
                    lock_file.unlink(missing_ok=True)
    log_file = root / "build.log"
    try:
        if log_file.stat().st_size > 4 * LOG_KEEP_BYTES:
            with log_file.open("rb") as f:
                f.seek(-LOG_KEEP_BYTES, os.SEEK_END)
                tail = f.read()
            tmp = log_file.with_suffix(".log.tmp")
            tmp.write_bytes(tail[tail.find(b"\n") + 1:])
            tmp.replace(log_file)
    except OSError:
        pass
    return removed


def _build_in(work: Path, user: str) -> str | None:
    """initdb in `work/pgdata`, start it, migrate both databases, stop it; Prefect's Alembic revision."""
    from runbook_lib.core import processes

    from . import postgres
    from .config import SandboxConfig

    cfg = SandboxConfig(state_dir=str(work))
    cfg.postgres.user = user
    cfg.postgres.port = processes.free_port()
    data = postgres.pgdata(cfg)
    postgres.prepare(cfg, use_cache=False)
    argv = postgres.command(cfg)
    run_as = postgres.RUN_AS
    server = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(work),
        user=run_as, group=run_as, extra_groups=[] if run_as else None, preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_SECONDS
        while (reason := postgres.health(cfg)) is not None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the cache's Postgres did not start ({reason})")
            time.sleep(0.1)
        postgres.migrate(cfg)
        postgres.ensure_database(cfg, postgres.PREFECT_DATABASE)
        _prefect_migrate(cfg)
        from .prefect_server import database_revision

        revision = database_revision(cfg)
        with postgres.connect(cfg, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {_sql_identifier(user)} PASSWORD NULL")  # no password in the cache
            conn.execute("CHECKPOINT")
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown, with its checkpoint
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for name in ("postmaster.pid", "postmaster.opts"):
        (data / name).unlink(missing_ok=True)
    return revision


def _prefect_migrate(cfg) -> None:
    """Prefect's migrations and block-type registration, as its server does on a new database."""
    import asyncio

    from runbook_lib.core.startup import without_iri_formats

    from . import prefect_server

    os.environ["PREFECT_HOME"] = str(cfg.state / "prefect")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_server.database_url(cfg)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    without_iri_formats()
    if not prefect_server.pg_trgm_available(cfg):
        prefect_server._install_pg_trgm_rewrite()
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    async def run() -> None:
        db = provide_database_interface()
        await db.create_db()
        async with await db.session() as session:  # as the server's start does: it commits as it goes
            await run_block_auto_registration(session=session)
        await (await db.engine()).dispose()

    asyncio.run(run())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the sandbox's Postgres data-directory cache entry.")
    parser.add_argument("--user", default="postgres")
    args = parser.parse_args()
    try:
        os.nice(10)  # behind whatever the sandbox and its user are doing
    except OSError:
        pass
    build(args.user, log=lambda s: print(s, flush=True))
