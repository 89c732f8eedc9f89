"""What a sandbox service is: `ServiceDef`, which each service module exposes as `SERVICE`, and the
sandbox's state file (`<state>/sandbox.json`: per service url, pid, healthy, how to stop it) that `manager`
writes.

Service modules import this module, never `manager`; `manager` imports the service modules (by name,
from its list) and this module.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runbook_lib.core.processes import STOP_GRACE

from .config import SandboxConfig


@dataclass
class ServiceDef:
    name: str
    # Services that must be up (healthy, after_start done) before this one's process starts, and those
    # its after_start needs besides itself. Only services started by the same `up` are waited for (one
    # already running is up; one left out by `only` is the caller's choice). Independent services start
    # at the same time.
    needs: list[str] = field(default_factory=list)
    after_start_needs: list[str] = field(default_factory=list)
    # Services this one's process talks to while it runs, besides `needs` (it may start before them and
    # wait for them itself): `down` stops them after it, as it does what it needs.
    uses: list[str] = field(default_factory=list)
    # Config attributes holding this service's ports, e.g. ["supabase.port"]; allocated free.
    ports: list[str] = field(default_factory=list)
    # argv of the process; default `python -m runbook_sandbox.<module> --config <config.json>`.
    # Return None when there is nothing to start (e.g. an external Postgres).
    command: Callable[[SandboxConfig], list[str] | None] | None = None
    # None when healthy, else a short reason.
    health: Callable[[SandboxConfig], str | None] = lambda cfg: None
    url: Callable[[SandboxConfig], str] = lambda cfg: ""
    prepare: Callable[[SandboxConfig], None] | None = None  # before start (initdb, ...)
    after_start: Callable[[SandboxConfig], None] | None = None  # after healthy (migrate, seed)
    env: Callable[[SandboxConfig], dict[str, str]] | None = None  # extra process environment
    exports: Callable[[SandboxConfig], dict[str, str]] | None = None  # lines of sandbox.env
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = STOP_GRACE  # seconds after stop_signal before the process group is killed
    start_timeout: float = 60.0
    user: str | None = None  # run the process as this system user (Postgres refuses root)
    module: str = ""

    def argv(self, cfg: SandboxConfig) -> list[str] | None:
        if self.command is not None:
            return self.command(cfg)
        return [sys.executable, "-m", f"runbook_sandbox.{self.module}", "--config", str(cfg.config_path)]


# -- state file ------------------------------------------------------------------------------------


def _state_path(cfg: SandboxConfig) -> Path:
    return cfg.state / "sandbox.json"


def read_state(cfg: SandboxConfig) -> dict:
    try:
        return json.loads(_state_path(cfg).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"services": {}}


def write_state(cfg: SandboxConfig, state: dict) -> None:
    cfg.state.mkdir(parents=True, exist_ok=True)
    state["instance_id"] = cfg.instance_id
    state["state_dir"] = cfg.state_dir
    state["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = _state_path(cfg).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(cfg))


def recorded_pid(cfg: SandboxConfig, name: str) -> int | None:
    """The pid `sandbox up` recorded for the service `name`, if any."""
    return read_state(cfg).get("services", {}).get(name, {}).get("pid")
