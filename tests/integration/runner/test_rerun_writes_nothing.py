"""Two runs in a row, through the runner's command line (`runbook run --profile sandbox --confirm`),
against a sandbox of their own: the second keeps the same deployment and sends no write to Prefect,
Supabase or git. "No write" is read from the sandbox's request logs (one line per request the
stand-ins answered), not from what the steps report.

The runs are the runbook's mutating sequence, 01 to 04 (verify, merge, deploy, Edge Function
secret): step 05 launches a test batch on purpose (rows, a flow run) every time it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig
from tests.conftest import PROJECT_ROOT, make_state_dir

MUTATING_STEPS = ["01_verify_prerequisites", "02_merge_check", "03_deploy", "04_update_edge_function_secret"]
READS = ("GET", "HEAD", "OPTIONS")
# POSTs that only read: Prefect's filters, the pool's worker polling and beating (not the runbook), and
# git's fetch (smart HTTP's git-upload-pack; a push is git-receive-pack).
READ_ONLY_POSTS = ("/filter", "/count", "/paginate", "/get_scheduled_flow_runs", "/workers/heartbeat",
                   "/git-upload-pack")


@pytest.fixture(scope="module")
def own_sandbox():
    state = make_state_dir("rbsb-rerun-")
    try:
        manager.up(state, echo=lambda s: None)
        yield SandboxConfig.load_or_create(state)
    finally:
        manager.down(state, purge=True, echo=lambda s: None)


def log_lines(cfg: SandboxConfig, service: str) -> list[dict[str, Any]]:
    path = cfg.request_log_path(service)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def writes(entries: list[dict[str, Any]]) -> list[str]:
    return [f"{e['method']} {e['path']} -> {e['status']}" for e in entries
            if e["method"] not in READS and not e["path"].rstrip("/").endswith(READ_ONLY_POSTS)]


def run_runbook(cfg: SandboxConfig, notebooks: Path, outputs: Path, run_id: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RUNBOOK_SANDBOX_DIR=str(cfg.state_dir))
    return subprocess.run(
        [sys.executable, "-m", "runbook_lib", "run", "--profile", "sandbox", "--confirm", "--notebooks-dir",
         str(notebooks), "--outputs-dir", str(outputs), "--run-id", run_id, "--cell-timeout", "600"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_run_keeps_the_deployment_and_writes_nothing(own_sandbox, tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for step in MUTATING_STEPS:
        (notebooks / f"{step}.ipynb").write_bytes((PROJECT_ROOT / "notebooks" / f"{step}.ipynb").read_bytes())
    outputs = tmp_path / "outputs"
    start = {service: len(log_lines(own_sandbox, service)) for service in ("prefect", "supabase", "git")}

    first = run_runbook(own_sandbox, notebooks, outputs, "first")
    assert first.returncode == 0, f"first run failed:\n{first.stdout[-4000:]}\n{first.stderr[-4000:]}"
    first_deploy = json.loads((outputs / "first" / "03_deploy.json").read_text())["values"]
    assert first_deploy["changed"] is True  # the first run did deploy
    marks = {service: len(log_lines(own_sandbox, service)) for service in ("prefect", "supabase", "git")}
    # The first run did write, and the logs show it: what counts as a write below is what a change looks like.
    first_writes = {service: writes(log_lines(own_sandbox, service)[start[service]:marks[service]]) for service in marks}
    assert any("/deployments" in w for w in first_writes["prefect"]), first_writes["prefect"]
    assert any(w.startswith("POST ") and w.split()[1].endswith("/secrets") for w in first_writes["supabase"])
    assert any("/git-receive-pack" in w for w in first_writes["git"]), first_writes["git"]

    second = run_runbook(own_sandbox, notebooks, outputs, "second")
    assert second.returncode == 0, f"second run failed:\n{second.stdout[-4000:]}\n{second.stderr[-4000:]}"
    manifest = json.loads((outputs / "second" / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    second_deploy = json.loads((outputs / "second" / "03_deploy.json").read_text())["values"]
    assert second_deploy["deployment_id"] == first_deploy["deployment_id"]

    # What the stand-ins saw during the second run: reads only.
    seen = {service: log_lines(own_sandbox, service)[mark:] for service, mark in marks.items()}
    assert seen["prefect"] and seen["supabase"] and seen["git"], "the second run read nothing: it did not run"
    for service, entries in seen.items():
        assert writes(entries) == [], f"the second run wrote to {service}"
