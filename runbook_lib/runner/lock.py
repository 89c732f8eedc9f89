"""One runner per profile at a time: an flock'd lock file naming its holder, and the process helpers
the runner uses to find and stop a holder's leftovers."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from runbook_lib.runner.params import RunRefused


def now() -> datetime:
    return datetime.now(timezone.utc)



class ProfileLock:
    """One runner per profile and outputs directory: an flock'd file naming its holder."""

    def __init__(self, outputs_dir: Path, profile: str):
        self.path = outputs_dir / ".locks" / f"{profile}.lock"
        self.profile = profile
        self._fd: int | None = None
        self.content: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}  # what a holder that died left in the file

    def acquire(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(self.path)
            os.close(fd)
            raise RunRefused(
                f"another run holds the lock for profile {self.profile!r}: run {holder.get('run_id', '?')} "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started_at', '?')}); "
                f"wait for it to finish or stop it (lock file {self.path})"
            ) from None
        self._fd = fd
        self.previous = _read_json(self.path)
        self.update(run_id=run_id, pid=os.getpid(), create_time=psutil.Process().create_time(),
                    host=socket.gethostname(), started_at=now().isoformat())

    def update(self, **fields: Any) -> None:
        """Rewrite the holder's details (the running step's process is added while it runs)."""
        assert self._fd is not None
        self.content.update(fields)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(self.content).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            os.close(self._fd)
            self._fd = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_process(pid: Any, create_time: Any) -> psutil.Process | None:
    """The process `pid` if it is still the one started at `create_time`."""
    try:
        proc = psutil.Process(int(pid))
        return proc if abs(proc.create_time() - float(create_time)) < 0.01 else None
    except (psutil.Error, TypeError, ValueError):
        return None


def kill_tree(proc: psutil.Process, timeout: float = 5.0) -> None:
    """Stop `proc` and every descendant (the step process and its kernel)."""
    try:
        family = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=timeout)


