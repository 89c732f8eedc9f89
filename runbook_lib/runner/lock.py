"""One runner per target at a time (the lock of core.locks, keyed on the Prefect workspace and the
Supabase project), and the process helpers the runner uses to find and stop a holder's leftovers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import psutil

from runbook_lib.core.locks import LockHeld, TargetLock, target_of
from runbook_lib.runner.params import RunRefused


def now() -> datetime:
    return datetime.now(timezone.utc)


class RunLock(TargetLock):
    """One runner per target (core.locks): refused (RunRefused) when a run or a JupyterLab session
    changes the same target, wherever it was started from."""

    def __init__(self, settings: Any | None, profile: str, environ: Mapping[str, str] | None = None):
        super().__init__(target_of(settings) if settings is not None else f"profile {profile}", environ)
        self.profile = profile

    def acquire(self, run_id: str, **fields: Any) -> None:  # type: ignore[override]
        try:
            super().acquire(kind="run", run_id=run_id, profile=self.profile, **fields)
        except LockHeld as exc:
            raise RunRefused(str(exc)) from None


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


