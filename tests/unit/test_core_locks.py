"""The target lock: keyed on the Prefect workspace and the Supabase project (not the profile's name,
not the outputs directory), held across processes with flock, taken by interactive steps too, and
released when its holder dies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runbook_lib.core.locks import HELD_BY_ENV, LOCK_DIR_ENV, LockHeld, TargetLock, hold_for_step, release_step_lock, target_of
from runbook_lib.core.profiles import load_settings
from tests.unit.conftest import write_sandbox_env

HOLD = """
import sys, time
from runbook_lib.core.locks import TargetLock
lock = TargetLock(sys.argv[1])
lock.acquire(kind="run", run_id="other-run", profile="production", run_dir="/elsewhere/other-run")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def lock_env(tmp_path, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    return {LOCK_DIR_ENV: str(tmp_path / "locks")}


def _holder(target: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, target], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_profile_extending_another_shares_its_target_and_its_lock(profiles_root: Path, tmp_path, lock_env):
    write_sandbox_env(tmp_path / "sbx")
    environ = {"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}
    (profiles_root / "profiles" / "sandbox-copy.toml").write_text('extends = "sandbox"\ndescription = "another name"\n')
    a = load_settings("sandbox", environ=environ, root=profiles_root)
    b = load_settings("sandbox-copy", environ=environ, root=profiles_root)
    assert target_of(a) == target_of(b) and "abcdefghijklmnopqrst" in target_of(a)
    assert TargetLock(target_of(a)).path == TargetLock(target_of(b)).path
    assert TargetLock(target_of(a)).path.parent == tmp_path / "locks"  # never under an outputs directory

    holder = _holder(target_of(a), lock_env)
    try:
        with pytest.raises(LockHeld) as err:
            hold_for_step(b, "03_deploy", tmp_path / "runs" / "interactive-sandbox-copy")
        assert "run other-run of profile 'production'" in str(err.value) and "records in /elsewhere/other-run" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    # The holder died: flock released the lock, its content tells the next holder what it left.
    lock = hold_for_step(b, "03_deploy", tmp_path / "runs" / "x")
    try:
        assert lock is not None and lock.previous["run_id"] == "other-run"
        assert hold_for_step(b, "04_update", tmp_path / "runs" / "x") is lock  # the same kernel: the same lock
        on_file = json.loads(lock.path.read_text())
        assert on_file["kind"] == "interactive session" and on_file["step"] == "04_update"
    finally:
        release_step_lock(lock)
    assert lock.path.read_text() == ""


def test_a_step_started_by_the_runner_holding_the_lock_does_not_take_it_again(profiles_root, tmp_path, lock_env):
    write_sandbox_env(tmp_path / "sbx")
    settings = load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}, root=profiles_root)
    holder = _holder(target_of(settings), lock_env)
    try:
        assert hold_for_step(settings, "03_deploy", tmp_path, {**lock_env, HELD_BY_ENV: str(holder.pid)}) is None
        with pytest.raises(LockHeld):  # any other pid: refused
            hold_for_step(settings, "03_deploy", tmp_path, {**lock_env, HELD_BY_ENV: "1"})
    finally:
        holder.kill()
        holder.wait()


def test_other_targets_do_not_share_a_lock(lock_env):
    a, b = TargetLock("prefect http://a + supabase x"), TargetLock("prefect http://b + supabase x")
    a.acquire(kind="run")
    try:
        b.acquire(kind="run")
        b.release()
    finally:
        a.release()


def test_a_read_only_step_runs_beside_a_holder_and_takes_the_lock_only_to_apply(profiles_root, tmp_path, lock_env):
    """01 and 06 change nothing unless a gate approves: they start while another run holds the
    target's lock (a scheduled health check beside a deployment), and are refused at the approval of
    a change (06's requeue), with nothing applied; a mutating step is refused at its start."""
    from runbook_lib.core.errors import NotConfirmed
    from runbook_lib.notebook.context import StepContext, read_only

    assert read_only("01_verify_prerequisites") and read_only("06_health_check")
    assert not read_only("03_deploy") and not read_only("05_end_to_end_test")
    write_sandbox_env(tmp_path / "sbx")
    settings = load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}, root=profiles_root)
    holder = _holder(target_of(settings), lock_env)
    try:
        ctx = StepContext("06_health_check", settings, tmp_path / "rec", True, profiles_root)
        ctx.confirm_plan("requeue 2 states", {"requeue": ["a", "b"]}, interactive=False)
        with pytest.raises(LockHeld):
            ctx.require_approved({"requeue": ["a", "b"]})
        assert ctx.results.status == "failed" and "other-run" in ctx.results.error
        with pytest.raises(LockHeld):
            hold_for_step(settings, "03_deploy", tmp_path / "rec", lock_env)
    finally:
        holder.kill()
        holder.wait()
    ctx = StepContext("06_health_check", settings, tmp_path / "rec2", True, profiles_root)
    ctx.confirm_plan("requeue 2 states", {"requeue": ["a", "b"]}, interactive=False)
    ctx.require_approved({"requeue": ["a", "b"]})  # the holder is gone: the lock is taken for the change
    assert ctx.target_lock is not None and ctx.target_lock.held
    release_step_lock(ctx.target_lock)
    with pytest.raises(NotConfirmed):  # refused changes never take the lock
        StepContext("01_verify_prerequisites", settings, tmp_path / "rec3", None, profiles_root).require_approved({})
