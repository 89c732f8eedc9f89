"""`sandbox up | status | down`: the lifecycle of every stand-in, in dependency order.

Each emulated service is one module of this package exposing `SERVICE: ServiceDef` (`service.py`).
`up` allocates free ports, starts what is not running, waits until each one is healthy, runs its
`after_start` hook (migrations, seeding), and writes `<state>/sandbox.json` (per service: url, pid,
healthy) and `<state>/sandbox.env` (the settings a production user would export). With `repo`, the
GitHub stand-in's repository is seeded from a git repository of the user's first (`git_seed`).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from runbook_lib.core import processes

from . import git_seed
from .config import PROJECT_ROOT, SandboxConfig
from .service import ServiceDef, read_state, write_state

# The services, in start order (stopped in reverse). One module each, exposing SERVICE.
SERVICE_MODULES: list[str] = [
    "fault_proxy",  # TCP fault proxy in front of the database, Prefect API, git and Modal (`runbook sandbox fault`)
    "postgres",  # embedded Postgres (or an existing server), schema, net schema, trigger
    "modal_standin",  # the Modal app data-enrichment-workers
    "prefect_server",  # the real Prefect server, backed by the sandbox Postgres
    "prefect_gateway",  # Prefect Cloud's URL shape + bearer auth in front of it; pool, blocks
    "supabase",  # Management API (secrets) + functions gateway running the Edge Function in Deno
    "pgnet_relay",  # sends net.http_request_queue after commit, writes net._http_response
    "git_server",  # git over smart HTTP, seeded with the orchestrator repository
    "managed_worker",  # the worker serving the prefect:managed pool
]


class SandboxError(RuntimeError):
    """A sandbox operation failed; the message says which service and why."""


def services() -> list[ServiceDef]:
    out = []
    for mod in SERVICE_MODULES:
        svc: ServiceDef = importlib.import_module(f"runbook_sandbox.{mod}").SERVICE
        svc.module = mod
        out.append(svc)
    return out


def service(name: str) -> ServiceDef:
    for svc in services():
        if svc.name == name:
            return svc
    raise SandboxError(f"unknown sandbox service {name!r}; known: {[s.name for s in services()]}")


# -- sandbox.env -----------------------------------------------------------------------------------


def exports(cfg: SandboxConfig) -> dict[str, str]:
    out: dict[str, str] = {"RUNBOOK_PROFILE": "sandbox", "RUNBOOK_SANDBOX_DIR": cfg.state_dir}
    for svc in services():
        if svc.exports:
            out.update(svc.exports(cfg))
    return out


def _write_env(cfg: SandboxConfig) -> None:
    lines = ["# Written by `python -m runbook_lib sandbox up`: the settings a production user exports."]
    for k, v in exports(cfg).items():
        lines.append(f"{k}={json.dumps(str(v))}")
    path = cfg.state / "sandbox.env"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def _process_env(cfg: SandboxConfig, svc: ServiceDef) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            processes.INSTANCE_ENV: cfg.instance_id,
            "PYTHONUNBUFFERED": "1",
            # Fewer glibc malloc arenas in threaded processes (uvicorn, the Prefect server): less resident memory.
            "MALLOC_ARENA_MAX": "2",
            "RUNBOOK_SANDBOX_DIR": cfg.state_dir,
            # `python -m runbook_sandbox.<module>` runs with cwd=<state>: make the package importable.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    if svc.env:
        env.update(svc.env(cfg))
    return env


# -- lifecycle -------------------------------------------------------------------------------------


def _get_port_attr(cfg: SandboxConfig, dotted: str) -> int:
    obj = cfg
    *head, last = dotted.split(".")
    for h in head:
        obj = getattr(obj, h)
    return getattr(obj, last)


def _set_port_attr(cfg: SandboxConfig, dotted: str, value: int) -> None:
    obj = cfg
    *head, last = dotted.split(".")
    for h in head:
        obj = getattr(obj, h)
    setattr(obj, last, value)


def _status_of(cfg: SandboxConfig, svc: ServiceDef, rec: dict | None) -> tuple[bool, str]:
    """(healthy, reason) of one service as recorded."""
    if rec is None:
        return False, "not started"
    pid = rec.get("pid")
    if pid and not processes.is_alive(pid):
        return False, f"process {pid} is not running"
    try:
        reason = svc.health(cfg)
    except Exception as exc:  # a health probe that raises is unhealthy, with its reason
        reason = f"{type(exc).__name__}: {exc}"
    return (reason is None), (reason or "healthy")


def up(
    state_dir: Path | None = None,
    *,
    database_url: str | None = None,
    seed_merged: bool | None = None,
    repo: str | os.PathLike | None = None,
    only: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Start what is not running (every service, or `only` those); see the module's docstring.

    `repo` (a path or URL of a git repository) seeds the GitHub stand-in's `<owner>/<repo>` with every
    branch of that repository instead of the story from flows/ (`git_seed.use_repository`): done
    before any service starts, refused with SandboxError (nothing changed) when it cannot be read;
    kept as is on a later `up` with the same source, replaced when another one is given.
    """
    cfg = SandboxConfig.load_or_create(state_dir)
    if repo is not None:
        if seed_merged is not None:
            raise SandboxError(
                "git_server: --seed-merged/--seed-unmerged choose how the story from flows/ is seeded; "
                "they do not apply to --repo"
            )
        try:
            note = git_seed.use_repository(cfg, repo)
        except git_seed.SeedError as exc:
            raise SandboxError(f"git_server: {exc}") from exc
        cfg.save()
        echo(f"  {'git repository':16} {note}")
    if database_url is not None:
        cfg.postgres.external_url = database_url
    if seed_merged is not None:
        cfg.git.seed_merged = seed_merged
    cfg.save()
    state = read_state(cfg)
    recs = state.setdefault("services", {})
    todo: list[ServiceDef] = []
    for svc in services():
        if only and svc.name not in only:
            continue
        rec = recs.get(svc.name)
        if rec is not None:
            healthy, reason = _status_of(cfg, svc, rec)
            if healthy:
                echo(f"  {svc.name:16} already running  {rec.get('url', '')}")
                continue
            echo(f"  {svc.name:16} was down ({reason}); restarting")
            processes.stop(rec.get("pid"), svc.stop_signal, svc.stop_timeout)
        todo.append(svc)
    # Every port is known before anything starts, so a service can be configured with the URL of
    # one that starts after it (the trigger posts to the Edge Function, for instance).
    for svc in todo:
        for dotted in svc.ports:
            if not processes.port_is_free(_get_port_attr(cfg, dotted)):
                _set_port_attr(cfg, dotted, processes.free_port())
    # A service left out (`only`) still gets a port, so sandbox.env names a well-formed URL at which
    # nothing answers (as a service that is down), not port 0, which the settings refuse. Not the fault
    # proxy: its port 0 means "no proxy, connect directly" (config.ProxyConfig).
    for svc in services():
        for dotted in svc.ports:
            if not dotted.startswith("proxy.") and not _get_port_attr(cfg, dotted):
                _set_port_attr(cfg, dotted, processes.free_port())
    cfg.save()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            _start_all(cfg, todo, state, echo)
            break
        except SandboxError as exc:
            if not isinstance(exc.__cause__, _PortTaken) or attempt == PORT_ATTEMPTS:
                raise
            # What this `up` started is stopped; every port it allocated is allocated again.
            echo(f"  a port was taken by another process while starting ({exc.__cause__}); again on new ports")
            for svc in reversed(todo):
                rec = state["services"].pop(svc.name, None)
                if rec:
                    processes.stop(rec.get("pid"), svc.stop_signal, svc.stop_timeout)
                for dotted in svc.ports:
                    _set_port_attr(cfg, dotted, processes.free_port())
            write_state(cfg, state)
            cfg.save()
    _write_env(cfg)
    if any(svc.name == "postgres" for svc in todo):
        from . import postgres

        postgres.fill_cache(cfg)  # a fresh data directory set up the slow way: cache it for the next one
    return state


class _Blocked(SandboxError):
    """A service not started (or not finished) because another one failed."""


class _PortTaken(SandboxError):
    """A port given to a service was taken by another process (another sandbox starting at the same
    time, say) between its allocation and the service's bind: `up` starts again on new ports."""


PORT_ATTEMPTS = 3


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports the process `pid` and its descendants listen on."""
    found: set[int] = set()
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in family:
        try:
            found.update(c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        except psutil.Error:
            continue
    return found


def _check_ports_are_ours(cfg: SandboxConfig, svc: ServiceDef, pid: int | None) -> None:
    """Once `svc` answers its health probe: each of its ports is listened on by its own processes or by
    nobody yet (a child it starts later). A port another process holds means the answer came from that
    process, not from this service."""
    if not pid:
        return
    ours = _listening_ports(pid)
    for dotted in svc.ports:
        port = _get_port_attr(cfg, dotted)
        if port and port not in ours and not processes.port_is_free(port):
            raise _PortTaken(f"{svc.name}: port {port} ({dotted}) is held by another process, not by this "
                             "service's; starting again on new ports")


class _Start:
    """One `up`'s services starting at once, each in its own thread once what it needs is up."""

    def __init__(self, cfg: SandboxConfig, todo: list[ServiceDef], state: dict, echo: Callable[[str], None]):
        self.cfg, self.state, self._echo = cfg, state, echo
        self.todo = {svc.name: svc for svc in todo}
        self.done = {name: threading.Event() for name in self.todo}
        self.errors: dict[str, SandboxError] = {}  # service -> why it failed (its own fault)
        self.skipped: dict[str, str] = {}  # service -> the failed service it needed
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def echo(self, line: str) -> None:
        with self.lock:
            self._echo(line)

    def save(self) -> None:
        with self.lock:
            write_state(self.cfg, self.state)

    def wait_for(self, svc: ServiceDef, names: list[str]) -> str | None:
        """Wait until the services `names` (those this `up` starts) are up; the first one that failed, if any."""
        for name in names:
            if name == svc.name or name not in self.todo:
                continue
            self.done[name].wait()
            if name in self.errors or name in self.skipped:
                return name
        return None

    def failed_dependency(self, svc: ServiceDef) -> str | None:
        """A service `svc` needs (for its start or its set-up, directly or not) that failed, if any."""
        seen: set[str] = set()
        todo = [*svc.needs, *svc.after_start_needs]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.todo:
                continue
            seen.add(name)
            if name in self.errors or name in self.skipped:
                return name
            todo += [*self.todo[name].needs, *self.todo[name].after_start_needs]
        return None

    def run(self, svc: ServiceDef) -> None:
        try:
            blocked = self.wait_for(svc, svc.needs)
            if blocked:
                self.skipped[svc.name] = blocked
                return
            self._start(svc)
        except _Blocked as exc:
            self.skipped[svc.name] = str(exc)
        except SandboxError as exc:
            self.errors[svc.name] = exc
        except Exception as exc:  # a bug in a prepare hook, say: still named after its service
            self.errors[svc.name] = SandboxError(f"{svc.name}: start failed: {type(exc).__name__}: {exc}")
        finally:
            self.done[svc.name].set()

    def _start(self, svc: ServiceDef) -> None:
        cfg = self.cfg
        began = time.monotonic()
        try:
            if svc.prepare:
                svc.prepare(cfg)
        except Exception as exc:
            raise SandboxError(f"{svc.name}: preparing the start failed: {type(exc).__name__}: {exc}") from exc
        argv = svc.argv(cfg)
        pid = None
        if argv:
            pid = processes.spawn(
                argv, log_path=cfg.log_path(svc.name), env=_process_env(cfg, svc), cwd=cfg.state, user=svc.user
            )
        rec = {"url": svc.url(cfg), "pid": pid, "log": str(cfg.log_path(svc.name)), "healthy": False,
               "stop": _stop_record(svc)}
        with self.lock:
            self.state["services"][svc.name] = rec
        self.save()
        _wait_healthy(cfg, svc, rec, abandon=lambda: self.failed_dependency(svc))
        healthy_at = time.monotonic()
        blocked = self.wait_for(svc, svc.after_start_needs)
        if blocked:
            raise _Blocked(blocked)
        setup_at = time.monotonic()
        if svc.after_start:
            try:
                svc.after_start(cfg)
            except Exception as exc:
                raise SandboxError(f"{svc.name}: set-up after start failed: {type(exc).__name__}: {exc}") from exc
        end = time.monotonic()
        timing = dict(
            healthy=True,
            # Seconds: from `up`'s start to this one's spawn, spawn to healthy, healthy to its set-up's
            # needs being up, the after_start hook.
            timing={
                "waited": round(began - self.t0, 2),
                "start": round(healthy_at - began, 2),
                "setup_waited": round(setup_at - healthy_at, 2),
                "after_start": round(end - setup_at, 2),
            },
        )
        with self.lock:  # another thread may be writing the state file from the same dict
            rec.update(timing)
        self.save()
        self.echo(f"  {svc.name:16} up  {end - began:5.1f}s       {rec['url']}")


def _start_all(cfg: SandboxConfig, todo: list[ServiceDef], state: dict, echo: Callable[[str], None]) -> None:
    """Start `todo` (in SERVICE_MODULES order), each as soon as its `needs` are up; raise SandboxError
    naming every service that failed on its own account (with its log tail) once all have settled."""
    known = {svc.name for svc in services()}
    for svc in todo:
        unknown = [n for n in [*svc.needs, *svc.after_start_needs, *svc.uses] if n not in known]
        if unknown:
            raise SandboxError(f"{svc.name}: needs unknown service(s) {unknown}")
    by_name = {svc.name: svc for svc in services()}

    def cycle(name: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if name in path:
            return (*path, name)
        svc = by_name[name]
        for need in [*svc.needs, *svc.after_start_needs]:
            if need != name and (found := cycle(need, (*path, name))):
                return found
        return None

    for svc in todo:
        if found := cycle(svc.name, ()):
            raise SandboxError(f"{svc.name}: its needs form a cycle: {' -> '.join(found)}")
    run = _Start(cfg, todo, state, echo)
    threads = [threading.Thread(target=run.run, args=(svc,), name=f"up-{svc.name}", daemon=True) for svc in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if run.errors:
        failed = [svc.name for svc in todo if svc.name in run.errors]
        message = "\n\n".join(str(run.errors[name]) for name in failed)
        waiting = sorted(name for name in run.skipped)
        if waiting:
            message += f"\n(not started, since a service they need failed: {', '.join(waiting)})"
        taken = [name for name in failed if isinstance(run.errors[name], _PortTaken)]
        raise SandboxError(message) from run.errors[(taken or failed)[0]]


def _wait_healthy(
    cfg: SandboxConfig, svc: ServiceDef, rec: dict, abandon: Callable[[], str | None] | None = None
) -> None:
    """Wait for `svc`'s health probe; give up (_Blocked) when `abandon()` names a failed service it needs."""
    deadline = time.monotonic() + svc.start_timeout
    reason = "not checked"
    delay = 0.05
    while time.monotonic() < deadline:
        pid = rec.get("pid")
        if pid and not processes.is_alive(pid):
            processes.reap(pid)
            tail = processes.log_tail(cfg.log_path(svc.name))
            kind = _PortTaken if "address already in use" in tail.lower() else SandboxError
            raise kind(f"{svc.name} exited during start-up. Last lines of {cfg.log_path(svc.name)}:\n" + tail)
        try:
            reason = svc.health(cfg)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            _check_ports_are_ours(cfg, svc, pid)
            return
        blocked = abandon() if abandon is not None else None
        if blocked:
            raise _Blocked(blocked)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise SandboxError(
        f"{svc.name} did not become healthy within {svc.start_timeout:.0f}s ({reason}). "
        f"Last lines of {cfg.log_path(svc.name)}:\n" + processes.log_tail(cfg.log_path(svc.name))
    )


def status(state_dir: Path | None = None) -> list[dict]:
    """One row per service: name, url, pid, healthy, reason."""
    cfg = SandboxConfig.load_or_create(state_dir)
    recs = read_state(cfg).get("services", {})
    rows = []
    for svc in services():
        rec = recs.get(svc.name)
        healthy, reason = _status_of(cfg, svc, rec)
        rows.append(
            {
                "name": svc.name,
                "url": (rec or {}).get("url", ""),
                "pid": (rec or {}).get("pid"),
                "healthy": healthy,
                "reason": reason,
            }
        )
    return rows


def stop_service(name: str, state_dir: Path | None = None) -> None:
    """Stop one service (fault injection in tests, or before a restart)."""
    cfg = SandboxConfig.load_or_create(state_dir)
    state = read_state(cfg)
    svc = service(name)
    rec = state.get("services", {}).get(name)
    if rec:
        processes.stop(rec.get("pid"), svc.stop_signal, svc.stop_timeout)
        rec["healthy"] = False
        write_state(cfg, state)


def _stop_record(svc: ServiceDef) -> dict:
    """How `down` stops this service's process, recorded with its pid when `up` starts it: the signal,
    the grace before its group is killed, and the services it stops before (what it needs and uses).
    `down` reads it from the state file instead of importing every service's module (and with it the
    servers' libraries: ~0.4 s of CPU, half of a `sandbox down` that has nothing to stop)."""
    return {"signal": int(svc.stop_signal), "grace": svc.stop_timeout, "before": [*svc.needs, *svc.uses]}


def _stop_records(recs: dict[str, dict]) -> dict[str, dict]:
    """Each recorded service's stop record. A record without a well-formed one (written by an older
    `up`, or edited) gets it from its ServiceDef; a service this code no longer defines, the default
    stop (SIGTERM, the usual grace)."""

    def well_formed(stop: object) -> bool:
        return (isinstance(stop, dict) and isinstance(stop.get("signal"), int)
                and isinstance(stop.get("grace"), (int, float)) and isinstance(stop.get("before"), list))

    plans = {name: rec["stop"] for name, rec in recs.items() if rec and well_formed(rec.get("stop"))}
    missing = [name for name, rec in recs.items() if rec and name not in plans]
    if missing:
        known = {svc.name: svc for svc in services()}
        for name in missing:
            plans[name] = _stop_record(known.get(name) or ServiceDef(name=name))
    return plans


def down(state_dir: Path | None = None, *, purge: bool = False, echo: Callable[[str], None] = print) -> list[int]:
    """Stop every service; return pids of stragglers the sweep had to kill.

    Services stop at the same time, each given its short grace (`ServiceDef.stop_timeout`) before its
    process group is killed, except that what other processes need (`needs` and `uses`: Postgres, the
    fault proxy) stops in a second wave, once those are gone. What to send and wait is read from the
    state file (`_stop_record`)."""
    cfg = SandboxConfig.load_or_create(state_dir)
    state = read_state(cfg)
    recs = state.get("services", {})
    plans = _stop_records(recs)
    lock = threading.Lock()

    def stop(name: str) -> None:
        plan = plans[name]
        began = time.monotonic()
        processes.stop(recs[name].get("pid"), plan["signal"], plan["grace"])
        with lock:
            echo(f"  {name:16} stopped {time.monotonic() - began:4.1f}s")

    left = list(plans)
    while left:
        needed = {n for name in left for n in plans[name]["before"]}
        wave = [name for name in left if name not in needed] or left
        threads = [threading.Thread(target=stop, args=(name,), name=f"down-{name}") for name in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = [name for name in left if name not in wave]
    leftovers = processes.sweep(cfg.instance_id)
    if leftovers:
        echo(f"  killed {len(leftovers)} leftover process(es): {leftovers}")
    state["services"] = {}
    write_state(cfg, state)
    if purge:
        shutil.rmtree(cfg.state, ignore_errors=True)
    return leftovers
