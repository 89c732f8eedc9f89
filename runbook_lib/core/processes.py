"""Starting, watching and stopping background processes: the sandbox's services, the fallback's worker.

A process started with `spawn` runs in its own session (process group), so `stop` reaches it and
everything it started in that group. Processes may also carry a marker in their environment
(`INSTANCE_ENV=<value>`, inherited by their children): `processes_of` finds them by it and `sweep`
kills them, even those that started a session of their own.

The bottom layer: the standard library, psutil and httpx, and `core.tls` beside it; nothing else from
runbook_lib, nothing from runbook_sandbox.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psutil

INSTANCE_ENV = "RUNBOOK_SANDBOX_INSTANCE"  # the default marker: the sandbox instance a process belongs to
STOP_GRACE = 1.5  # seconds `stop` lets a process group end after its signal, before SIGKILL
KILL_WAIT = 5.0  # seconds to wait for killed processes to be gone


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


# -- process groups ----------------------------------------------------------------------------------


def group_members(pgid: int) -> list[psutil.Process]:
    """Every process in the group `pgid`, found even when its leader already died."""
    return [p for p in psutil.process_iter() if _pgid(p) == pgid]


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the process group `pgid`; a group already gone is not an error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop(pid: int | None, sig: int = signal.SIGTERM, timeout: float = STOP_GRACE) -> None:
    """Stop the process group led by pid (each service runs in its own session, so the group id is
    the leader's pid): send `sig`, give the members `timeout` seconds to end, then SIGKILL the group
    and every member. Returns once every member is gone (or after KILL_WAIT more seconds)."""
    if not pid:
        return
    members = group_members(pid)
    if not members:
        reap(pid)
        return
    kill_group(pid, sig)
    if _wait_gone(members, timeout, leader=pid):
        return
    kill_group(pid, signal.SIGKILL)
    for p in members:
        _kill(p)
    _wait_gone(members, KILL_WAIT, leader=pid)


# -- marked processes --------------------------------------------------------------------------------


def sweep(marker: str, env: str = INSTANCE_ENV) -> list[int]:
    """Kill every process whose environment has `env=marker`; return their pids once they are gone."""
    found = list(_marked(marker, env))
    for p in found:
        _kill(p)
    _wait_gone(found, KILL_WAIT)
    return [p.pid for p in found]


def processes_of(marker: str, env: str = INSTANCE_ENV) -> list[psutil.Process]:
    """The live processes whose environment has `env=marker`."""
    return [p for p in _marked(marker, env) if _alive(p)]


def _marked(marker: str, env: str) -> Iterator[psutil.Process]:
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(env) == marker:
                yield p
        except (psutil.Error, OSError):
            continue


# -- helpers -----------------------------------------------------------------------------------------


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


def _wait_gone(procs: list[psutil.Process], timeout: float, leader: int | None = None) -> bool:
    """Wait until none of `procs` is alive (a zombie counts as gone); True when that happened in time."""
    deadline = time.monotonic() + timeout
    while True:
        if leader:
            reap(leader)
        if not any(_alive(p) for p in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# -- probes ------------------------------------------------------------------------------------------


def http_health(url: str, timeout: float = 3.0) -> str | None:
    """A service's health probe: None when GET url answers 200, else a short reason. Loopback only,
    so proxy settings from the environment are ignored."""
    import httpx  # here: the sandbox's small stand-ins import this module but not httpx (nor ssl)

    from runbook_lib.core import tls

    try:  # one TLS context for every probe of the process (unused on plain HTTP, ~20 ms of CPU to build)
        r = httpx.get(url, timeout=timeout, trust_env=False, verify=tls.verified())
    except httpx.HTTPError as exc:
        return f"no answer from {url}: {type(exc).__name__}"
    return None if r.status_code == 200 else f"{url} answered {r.status_code}"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
