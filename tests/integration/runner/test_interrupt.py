"""Interrupting a run while step 05 waits for the chain, through the real CLI against the sandbox:
SIGTERM (as Ctrl-C or a CI cancel sends it) interrupts the kernel, whose cleanup deletes the test
batch and records it; a SIGKILL of the runner alone still lets the orphaned step process interrupt
its kernel the same way; a SIGKILL of everything (a lost machine) leaves the batch, whose id is in
the record, and the next run's step 05 deletes it and says so.

The chain is held at link 5 by the Modal stand-in's `hang` fault on the first sender (items stay
IN_PROGRESS), undone in a finally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import PROJECT_ROOT, kernel_connection_files, wait_for
from tests.integration.chain_helpers import FIRST_SENDER, KERNEL_ENV, modal_fault

STEP = "05_end_to_end_test"


def start_run(sandbox, outputs: Path, run_id: str, deployment_id: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, RUNBOOK_SANDBOX_DIR=str(sandbox.state), **KERNEL_ENV)
    cmd = [sys.executable, "-m", "runbook_lib", "run", "--only", STEP, "--confirm", "--outputs-dir", str(outputs),
           "--run-id", run_id, "-p", f"deployment_id={deployment_id}", "-p", "n_items=3", *extra]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / f"{STEP}.json").read_text())
    except (OSError, ValueError):
        return {}


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def batch_exists(database, batch_id: str) -> bool:
    return bool(database.query("SELECT 1 FROM public.batches WHERE id = %s", (batch_id,)))


def wait_in_link_5(database, run_dir: Path) -> str:
    """The batch id, once the record has it (written at the launch) and its items are IN_PROGRESS
    (held there by the hang fault: the step is waiting at link 5)."""
    batch_id = wait_for(lambda: record(run_dir).get("values", {}).get("batch_id"), 120, "the batch id in the record")
    wait_for(lambda: database.state_counts(batch_id).get((FIRST_SENDER_STEP, "IN_PROGRESS")) == 3, 180,
             "the test items to be IN_PROGRESS (the step waiting at link 5)", interval=0.5)
    return batch_id


FIRST_SENDER_STEP = "company-firmographics"


@pytest.fixture
def hanging_sender(sandbox):
    modal_fault(sandbox, FIRST_SENDER, "hang")
    yield
    modal_fault(sandbox, None)


@pytest.mark.timeout(420)
def test_sigterm_while_05_waits_runs_its_cleanup_and_records_it(sandbox, managed, database, hanging_sender, tmp_path):
    outputs = tmp_path / "out"
    run = start_run(sandbox, outputs, "term", managed, "-p", "completion_timeout=300")
    try:
        batch_id = wait_in_link_5(database, outputs / "term")
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    assert code == 128 + signal.SIGTERM, run.stderr.read()
    assert not batch_exists(database, batch_id), "the interrupted step did not delete its test batch"
    rec = record(outputs / "term")
    assert rec["status"] == "failed" and "interrupted (KeyboardInterrupt)" in rec["error"]
    assert f"test batch {batch_id} was deleted" in rec["error"]
    assert rec["values"]["batch_id"] == batch_id and rec["values"]["cleaned_up"] is True
    checks = {c["id"]: c["status"] for c in rec["checks"]}
    assert checks["launch"] == "pass" and checks["cleanup"] == "pass" and checks["orphans"] == "pass"
    m = manifest(outputs / "term")
    step = next(s for s in m["steps"] if s["step"] == STEP)
    assert m["status"] == "killed" and step["status"] == "killed"
    assert "interrupted (KeyboardInterrupt in the running cell" in step["error"]
    assert step["results"]["batch_id"] == batch_id and step["results"]["cleaned_up"] is True
    assert (outputs / "term" / f"{STEP}.ipynb").is_file() and m["secret_scan"] is not None


@pytest.mark.timeout(420)
def test_sigkill_of_the_runner_alone_still_cleans_up_through_the_step_process(sandbox, managed, database,
                                                                             hanging_sender, tmp_path):
    outputs = tmp_path / "out"
    run = start_run(sandbox, outputs, "runner-killed", managed, "-p", "completion_timeout=300")
    try:
        batch_id = wait_in_link_5(database, outputs / "runner-killed")
        step_pid = next(s for s in manifest(outputs / "runner-killed")["steps"] if s["step"] == STEP)["pid"]
        family = [psutil.Process(step_pid)] + psutil.Process(step_pid).children(recursive=True)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    wait_for(lambda: not batch_exists(database, batch_id), 60, "the orphaned step process's cleanup", interval=0.5)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, "the step process or its kernel outlived the runner"
    rec = record(outputs / "runner-killed")
    assert rec["values"]["batch_id"] == batch_id and rec["values"]["cleaned_up"] is True
    assert "interrupted (KeyboardInterrupt)" in rec["error"]


@pytest.mark.timeout(600)
def test_after_everything_is_killed_the_next_05_deletes_the_orphaned_batch(sandbox, managed, database,
                                                                         hanging_sender, tmp_path):
    outputs = tmp_path / "out"
    run = start_run(sandbox, outputs, "lost", managed, "-p", "completion_timeout=300")
    try:
        batch_id = wait_in_link_5(database, outputs / "lost")
        everything = [psutil.Process(run.pid)] + psutil.Process(run.pid).children(recursive=True)
        orphaned_files = kernel_connection_files(everything)
        for process in everything:  # a lost machine: nothing gets to clean up
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(everything, timeout=10)
        for path in orphaned_files:  # what the lost machine's reboot would clear: not this test's subject
            path.unlink(missing_ok=True)
    finally:
        if run.poll() is None:
            run.kill()
    rec = record(outputs / "lost")
    assert rec["values"]["batch_id"] == batch_id and rec["values"]["cleaned_up"] is False  # recorded at the launch
    assert batch_exists(database, batch_id)

    modal_fault(sandbox, None)
    nxt = start_run(sandbox, outputs, "next", managed)
    try:
        out, err = nxt.communicate(timeout=420)
    finally:
        if nxt.poll() is None:
            nxt.kill()
    assert nxt.returncode == 0, out[-3000:] + err[-3000:]
    assert not batch_exists(database, batch_id)
    rec = record(outputs / "next")
    assert rec["values"]["orphans_deleted"] == [batch_id]
    orphans = next(c for c in rec["checks"] if c["id"] == "orphans")
    assert orphans["status"] == "pass" and f"deleted 1 orphaned test batch(es) of earlier runs:\n- {batch_id}" in orphans["detail"]
    assert "which is gone" in orphans["detail"]
    assert f"deleted orphaned test batch {batch_id}" in out or batch_id in json.dumps(manifest(outputs / "next"))
