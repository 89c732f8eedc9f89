"""Starting, watching and stopping the sandbox's background processes.

Every process the sandbox starts runs in its own session (process group) and carries the
environment variable `RUNBOOK_SANDBOX_INSTANCE=<instance id>`, inherited by its children
(Deno, flow runs, pip). `stop` kills the group, and `sweep` finds any leftover by that marker,
so `sandbox down` leaves nothing behind even when a child started a session of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

INSTANCE_ENV = "RUNBOOK_SANDBOX_INSTANCE"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def spawn(
    argv: list[str], *, log_path: Path, env: dict[str, str], cwd: Path | None = None, user: str | None = None
) -> int:
    """Start a detached process in a new session, output appended to log_path; return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {argv[:4]}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    return proc.pid


def is_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(pid: int) -> None:
    """Collect the exit status of a child we started, if it is ours (avoids zombies in tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal the process group led by pid (we start each service in its own session, so the group
    id is the leader's pid), wait for every member to end, then SIGKILL what is left. Members are
    found even when the leader already died (e.g. Postgres backends after a crashed postmaster)."""
    if not pid:
        return
    pgid = pid
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    if not members:
        reap(pid)
        return
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(pid)
        if not any(_alive(p) for p in members):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in members:
        _kill(p)
    reap(pid)


def sweep(instance_id: str) -> list[int]:
    """Kill every process still carrying this sandbox instance's marker; return their pids."""
    killed = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(INSTANCE_ENV) == instance_id:
                _kill(p)
                killed.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return killed


def processes_of(instance_id: str) -> list[psutil.Process]:
    found = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(INSTANCE_ENV) == instance_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass
    reap(p.pid)


def http_health(url: str, timeout: float = 3.0) -> str | None:
    """A service's health probe: None when GET url answers 200, else a short reason. Loopback only,
    so proxy settings from the environment are ignored."""
    import httpx

    try:
        r = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        return f"no answer from {url}: {type(exc).__name__}"
    return None if r.status_code == 200 else f"{url} answered {r.status_code}"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
