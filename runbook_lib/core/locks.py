"""One change at a time per target: an flock'd lock file per target (the Prefect workspace's API URL
and the Supabase project ref), in a per-user lock directory that does not depend on where a run
writes its records: `$RUNBOOK_LOCK_DIR`, else `$XDG_STATE_HOME/runbook/locks`, else
`~/.local/state/runbook/locks`. Another `--outputs-dir`, a profile extending production, or a
JupyterLab kernel stepping through a notebook all take the same lock for the same target.

The file names its holder (pid, run id or step, kind); a holder that died releases it (flock), and
what it left in the file tells the next holder which run to mark interrupted and scan.
A runner hands its lock to its step processes with `HELD_BY_ENV` (its pid): a step started by the
runner (or by any process up its parents) that holds the lock of its target does not take it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from runbook_lib.core.errors import RunbookError

LOCK_DIR_ENV = "RUNBOOK_LOCK_DIR"
HELD_BY_ENV = "RUNBOOK_TARGET_LOCK_HELD_BY"


class LockHeld(RunbookError):
    """Another run or interactive session is changing the same target."""


def lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the locks live: the process's environment, with `environ` (say, the layers a step's
    settings were loaded from) over it; a lock directory is never lost by passing another mapping."""
    env = {**os.environ, **(environ or {})}
    if env.get(LOCK_DIR_ENV):
        return Path(env[LOCK_DIR_ENV]).expanduser().resolve()
    state = Path(env.get("XDG_STATE_HOME") or Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return state / "runbook" / "locks"


def target_of(settings: Any) -> str:
    """What a run changes, as text: the Prefect API URL (account and workspace) and the Supabase
    project. Two profiles (or outputs directories) aiming at the same target get the same lock."""
    api = (settings.prefect.api_url or "").rstrip("/").lower()
    ref = (settings.supabase.project_ref or "").lower()
    if not api and not ref:
        return f"profile {settings.profile}"
    return f"prefect {api or '-'} + supabase {ref or '-'}"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class TargetLock:
    """The flock'd lock file of one target."""

    def __init__(self, target: str, environ: Mapping[str, str] | None = None):
        self.target = target
        key = hashlib.sha256(target.encode()).hexdigest()[:24]
        self.path = lock_dir(environ) / f"{key}.lock"
        self._fd: int | None = None
        self.content: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}  # what a holder that died left in the file

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        return _read(self.path)

    def acquire(self, **fields: Any) -> None:
        """Take the lock (LockHeld naming the holder when another process has it) and write `fields`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(self.path)
            os.close(fd)
            raise LockHeld(
                f"another {holder.get('kind', 'run')} is changing the same target ({self.target}): "
                f"{describe_holder(holder)}; wait for it to finish or stop it (lock file {self.path})"
            ) from None
        self._fd = fd
        self.previous = _read(self.path)
        import psutil

        self.content = {}
        self.update(target=self.target, pid=os.getpid(), create_time=psutil.Process().create_time(),
                    host=socket.gethostname(), started_at=datetime.now(timezone.utc).isoformat(), **fields)

    def update(self, **fields: Any) -> None:
        assert self._fd is not None
        self.content.update(fields)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(self.content).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            os.close(self._fd)
            self._fd = None


def describe_holder(holder: Mapping[str, Any]) -> str:
    what = f"run {holder['run_id']}" if holder.get("run_id") else f"step {holder.get('step', '?')}"
    return (f"{what} of profile {holder.get('profile', '?')!r} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started_at', '?')}, records in {holder.get('run_dir', '?')})")


# -- interactive steps ---------------------------------------------------------------------------

_held: dict[str, TargetLock] = {}  # this process's locks, by target (a kernel stepping through notebooks)


def hold_for_step(settings: Any, step: str, run_dir: Path, environ: Mapping[str, str] | None = None) -> TargetLock | None:
    """The lock of `settings`' target for an interactive step (kept by this process until
    `release_step_lock`), or None when the runner that started this step holds it already."""
    env = os.environ if environ is None else environ
    target = target_of(settings)
    lock = _held.get(target) or TargetLock(target, env)
    if lock.held:
        lock.update(step=step, run_dir=str(run_dir))
        return lock
    holder = str(lock.holder().get("pid", ""))
    if holder and (holder == env.get(HELD_BY_ENV) or holder in _ancestors()):
        return None  # started by the runner (or the process) that holds the target's lock
    lock.acquire(kind="interactive session", profile=settings.profile, step=step, run_dir=str(run_dir))
    _held[target] = lock
    return lock


def _ancestors() -> set[str]:
    import psutil

    try:
        return {str(p.pid) for p in psutil.Process().parents()}
    except psutil.Error:
        return set()


def release_step_lock(lock: TargetLock | None) -> None:
    if lock is not None:
        lock.release()
        _held.pop(lock.target, None)
