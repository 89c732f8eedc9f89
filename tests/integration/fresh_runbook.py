"""The whole runbook as `make run` runs it, on a sandbox of its own started fresh, once per test session
(the `fresh_runbook` fixture of tests/conftest.py), for the tests that read such a run:
runner/test_full_runbook.py (every step passes, nothing leaks, `runbook health` after it),
runner/test_rerun_writes_nothing.py (a second run of the mutating steps writes nothing) and
browser/test_records.py (the run's index.html in a browser).

In order, on one fresh sandbox: the whole runbook through the real CLI (`runbook run --profile sandbox
--confirm`, run id `full`); `runbook health` against its records; the mutating sequence 01 to 04 again
(run id `second`). The stand-ins' request logs are cut at each phase. The sandbox is brought down
(and purged) before the tests read anything: what they assert lives in the records and the logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from runbook_lib.core import processes as process
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig
from tests.conftest import PROJECT_ROOT, make_state_dir, wait_for

MUTATING_STEPS = ["01_verify_prerequisites", "02_merge_check", "03_deploy", "04_update_edge_function_secret"]
LOGGED = ("prefect", "supabase", "git")
FINAL_STATES = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]


@dataclass
class FreshRunbook:
    config: SandboxConfig  # the fresh sandbox's config (its issued secrets); the sandbox itself is down
    outputs: Path  # the outputs directory: full/ (the whole runbook), second/ (01-04 again)
    full: subprocess.CompletedProcess
    health: subprocess.CompletedProcess | None = None  # `runbook health` after the full run (None: the run failed)
    second: subprocess.CompletedProcess | None = None  # 01-04 again (None: the full run failed)
    # The request log entries of each stand-in (LOGGED) during "full" and during "second".
    requests: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.outputs / "full"


def _log(cfg: SandboxConfig, service: str) -> list[dict[str, Any]]:
    path = cfg.request_log_path(service)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _marks(cfg: SandboxConfig) -> dict[str, int]:
    return {service: len(_log(cfg, service)) for service in LOGGED}


def _since(cfg: SandboxConfig, marks: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    return {service: _log(cfg, service)[mark:] for service, mark in marks.items()}


def _flow_runs_over(cfg: SandboxConfig) -> bool:
    """Every flow run of the sandbox is in a final state and no flow run process is left: nothing the
    first run started can write to Prefect any more (step 05 passes once the items moved, which can be
    before its flow run has ended)."""
    with httpx.Client(base_url=cfg.prefect_api_url + "/", headers={"Authorization": f"Bearer {cfg.prefect.api_key}"},
                      timeout=30, trust_env=False) as api:
        unfinished = api.post("flow_runs/filter", json={"flow_runs": {"state": {"type": {"not_any_": FINAL_STATES}}}})
        unfinished.raise_for_status()
    if unfinished.json():
        return False
    return not [p for p in process.processes_of(cfg.instance_id) if "prefect.engine" in _cmdline(p)]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _runbook(cfg: SandboxConfig, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_HEADLESS"}  # as a user's shell runs `make run`
    env["RUNBOOK_SANDBOX_DIR"] = str(cfg.state_dir)
    return subprocess.run([sys.executable, "-m", "runbook_lib", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_fresh_runbook(workdir: Path) -> FreshRunbook:
    outputs = workdir / "outputs"
    notebooks = workdir / "notebooks-01-04"  # the mutating sequence alone, for the second run
    notebooks.mkdir(parents=True)
    for step in MUTATING_STEPS:
        (notebooks / f"{step}.ipynb").write_bytes((PROJECT_ROOT / "notebooks" / f"{step}.ipynb").read_bytes())
    state = make_state_dir("rbsb-fresh-")
    try:
        manager.up(state, echo=lambda s: None)
        cfg = SandboxConfig.load_or_create(state)
        start = _marks(cfg)
        full = _runbook(cfg, "run", "--profile", "sandbox", "--confirm", "--outputs-dir", str(outputs),
                        "--run-id", "full", timeout=1500)
        outcome = FreshRunbook(cfg, outputs, full, requests={"full": _since(cfg, start)})
        if full.returncode != 0:
            return outcome
        # `runbook health` compares with the last passing run of the profile: this one (before the second).
        outcome.health = _runbook(cfg, "health", "--profile", "sandbox", "--json", "--outputs-dir", str(outputs),
                                  timeout=300)
        wait_for(lambda: _flow_runs_over(cfg), 300, "the first run's flow runs to end", interval=1)
        mark = _marks(cfg)
        outcome.second = _runbook(cfg, "run", "--profile", "sandbox", "--confirm", "--notebooks-dir", str(notebooks),
                                  "--outputs-dir", str(outputs), "--run-id", "second", "--cell-timeout", "600",
                                  timeout=1500)
        outcome.requests["second"] = _since(cfg, mark)
        return outcome
    finally:
        manager.down(state, purge=True, echo=lambda s: None)


def failure(proc: subprocess.CompletedProcess | None, what: str) -> str:
    if proc is None:
        return f"{what} did not run: an earlier phase of the fresh runbook failed"
    return f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
