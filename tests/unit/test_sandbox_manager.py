"""The manager's start and stop, over tiny real processes standing for services (no sandbox): what
needs nothing starts at once, a service waits for what it needs, a failure names its service with
its log tail and what needed it is not started, and `down` leaves nothing running."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from runbook_lib.core import processes
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig
from runbook_sandbox.service import ServiceDef
from tests.conftest import run_fresh

# Touches its flag file (argv[2]) once the flag of what it needs (argv[1], or "-") exists, then idles.
IDLE = (
    "import pathlib, sys, time\n"
    "need, flag = sys.argv[1], pathlib.Path(sys.argv[2])\n"
    "if need != '-' and not pathlib.Path(need).exists():\n"
    "    sys.exit('started before ' + need)\n"
    "flag.touch()\n"
    "time.sleep(120)\n"
)


def flag(cfg: SandboxConfig, name: str) -> Path:
    return cfg.state / f"{name}.flag"


def fake(name: str, *, needs: list[str] | None = None, script: str = IDLE, after_start=None) -> ServiceDef:
    need = (needs or ["-"])[0]

    def command(cfg: SandboxConfig) -> list[str]:
        return [sys.executable, "-c", script, str(flag(cfg, need)) if need != "-" else "-", str(flag(cfg, name))]

    def health(cfg: SandboxConfig) -> str | None:
        return None if flag(cfg, name).exists() else "no flag yet"

    return ServiceDef(name=name, needs=needs or [], command=command, health=health, after_start=after_start,
                      start_timeout=30, module=name)


@pytest.fixture
def stack(tmp_path, monkeypatch):
    defs: list[ServiceDef] = []
    monkeypatch.setattr(manager, "services", lambda: defs)
    yield defs
    manager.down(tmp_path, echo=lambda s: None)


def test_independent_services_start_together_and_a_dependent_waits(tmp_path, stack):
    stack += [fake("slow_base", script="import time; time.sleep(1.5)\n" + IDLE), fake("free"),
              fake("dependent", needs=["slow_base"])]
    lines: list[str] = []
    state = manager.up(tmp_path, echo=lines.append)
    timing = {name: rec["timing"] for name, rec in state["services"].items()}
    assert all(rec["healthy"] for rec in state["services"].values())
    assert timing["free"]["waited"] < 1.0 and timing["slow_base"]["waited"] < 1.0
    assert timing["dependent"]["waited"] >= timing["slow_base"]["start"]  # spawned once slow_base was up
    assert [ln.split()[0] for ln in lines][-1] == "dependent"
    # A second `up` finds them running and starts nothing.
    again: list[str] = []
    manager.up(tmp_path, echo=again.append)
    assert all("already running" in ln for ln in again) and len(again) == 3


def test_a_failed_service_is_named_with_its_log_and_what_needs_it_is_not_started(tmp_path, stack):
    stack += [fake("broken", script="import sys; print('cannot bind the port'); sys.exit(3)"),
              fake("needs_broken", needs=["broken"]), fake("fine")]
    with pytest.raises(manager.SandboxError) as failed:
        manager.up(tmp_path, echo=lambda s: None)
    message = str(failed.value)
    assert "broken exited during start-up" in message and "cannot bind the port" in message
    assert "not started" in message and "needs_broken" in message
    recs = manager.read_state(SandboxConfig.load_or_create(tmp_path))["services"]
    assert "needs_broken" not in recs  # never spawned
    assert recs["fine"]["healthy"] is True  # what does not depend on it is up


def test_an_after_start_failure_names_its_service(tmp_path, stack):
    def seed(cfg: SandboxConfig) -> None:
        raise RuntimeError("the seed went wrong")

    stack += [fake("seeded", after_start=seed)]
    with pytest.raises(manager.SandboxError, match="seeded: set-up after start failed: RuntimeError: the seed went wrong"):
        manager.up(tmp_path, echo=lambda s: None)


def test_down_stops_everything_quickly_and_leaves_nothing(tmp_path, stack):
    # One service ignores SIGTERM: its group is killed after the grace period.
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + IDLE
    stack += [fake("base"), fake("on_top", needs=["base"]), fake("stubborn", script=stubborn)]
    manager.up(tmp_path, echo=lambda s: None)
    cfg = SandboxConfig.load_or_create(tmp_path)
    assert len(processes.processes_of(cfg.instance_id)) == 3
    lines: list[str] = []
    assert manager.down(tmp_path, echo=lines.append) == []
    assert processes.processes_of(cfg.instance_id) == []
    names = [ln.split()[0] for ln in lines]
    assert names.index("base") > names.index("on_top")  # what others need stops after them


def test_down_stops_what_a_running_process_uses_after_it(tmp_path, stack):
    # `uses`: started together (the user waits for it itself), stopped after the process that uses it.
    user = fake("user")
    user.uses = ["used"]
    stack += [fake("used"), user]
    state = manager.up(tmp_path, echo=lambda s: None)
    assert state["services"]["user"]["timing"]["waited"] < 1.0  # not held back by what it uses
    lines: list[str] = []
    assert manager.down(tmp_path, echo=lines.append) == []
    names = [ln.split()[0] for ln in lines]
    assert names.index("used") > names.index("user")


def test_needs_in_a_cycle_are_refused_before_anything_starts(tmp_path, stack):
    stack += [fake("egg", needs=["hen"]), fake("hen", needs=["egg"])]
    with pytest.raises(manager.SandboxError, match="cycle: egg -> hen -> egg"):
        manager.up(tmp_path, echo=lambda s: None)
    assert manager.read_state(SandboxConfig.load_or_create(tmp_path))["services"] == {}


# Ignores SIGTERM, ends at once on SIGINT (Python's KeyboardInterrupt, set here: a process inherits an ignored
# SIGINT, and Python then leaves it ignored; a test run in the background can be such a parent): a service whose
# stop signal is SIGINT.
SIGINT_ONLY = (
    "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    + IDLE
)


def sigint_service(name: str) -> ServiceDef:
    svc = fake(name, script=SIGINT_ONLY)
    svc.stop_signal, svc.stop_timeout = signal.SIGINT, 60.0  # SIGTERM would wait out the minute
    return svc


def test_down_stops_as_up_recorded_without_importing_the_service_modules(tmp_path, stack):
    user = sigint_service("user")
    user.uses = ["used"]
    stack += [fake("used"), user]
    manager.up(tmp_path, echo=lambda s: None)
    cfg = SandboxConfig.load_or_create(tmp_path)
    recs = manager.read_state(cfg)["services"]
    assert recs["user"]["stop"] == {"signal": signal.SIGINT, "grace": 60.0, "before": ["used"]}
    # A fresh interpreter that knows only the state file: no service module imported, no server library.
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from runbook_sandbox import manager\n"
        f"began = time.monotonic(); lines = []; left = manager.down(Path({str(tmp_path)!r}), echo=lines.append)\n"
        "print(json.dumps({'seconds': time.monotonic() - began, 'left': left, 'order': [ln.split()[0] for ln in lines],\n"
        "    'imported': sorted(m for m in sys.modules if m.startswith('runbook_sandbox.') and m.split('.')[1] in\n"
        "                       manager.SERVICE_MODULES or m in ('uvicorn', 'starlette', 'httpx', 'psycopg', 'jwt'))}))\n"
    )
    out = run_fresh(script, timeout=120)
    assert out["seconds"] < 10, out  # SIGINT, as recorded: not SIGTERM and a minute's grace
    assert out["left"] == [] and out["order"] == ["user", "used"], out  # no straggler; what it uses after it
    assert out["imported"] == [], out
    assert processes.processes_of(cfg.instance_id) == []


def test_down_of_a_state_written_before_stop_records_uses_the_service_definitions(tmp_path, stack):
    stack += [sigint_service("old"), sigint_service("edited")]
    manager.up(tmp_path, echo=lambda s: None)
    cfg = SandboxConfig.load_or_create(tmp_path)
    state = manager.read_state(cfg)
    del state["services"]["old"]["stop"]
    state["services"]["edited"]["stop"] = {"signal": "SIGINT"}
    manager.write_state(cfg, state)
    began = time.monotonic()
    assert manager.down(tmp_path, echo=lambda s: None) == []
    assert time.monotonic() - began < 10  # the definition's SIGINT
    assert processes.processes_of(cfg.instance_id) == []
