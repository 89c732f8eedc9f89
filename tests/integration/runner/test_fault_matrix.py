"""The fault matrix (issue 13): one service cut at the step where it matters, the runbook run THROUGH
THE RUNNER (`python -m runbook_lib run --profile sandbox --confirm ...` in a subprocess), on the
session's shared sandbox. For each fault: the right step fails with its cause (the failed check and
the service) in the manifest, the exit code is non-zero, no later step runs and nothing is written
after the failure (the stand-ins' request logs), nothing is half-applied (the Edge Function's
PREFECT_DEPLOYMENT_ID digest, the repository's branches, the test batch), and the record is saved
(manifest, results, executed notebook, HTML, index) and scanned for secrets, with nothing found.

Faults go through the sandbox's one switch (`sandbox_fault`, cleared after each test), but for the
write-time 401 (the Management API stand-in's scripted answer on the upsert alone, so the plan reads
succeed), the worker (stopped, then started again) and the runner's SIGKILL. Each test puts the
shared state back (the function's secret names the `managed` deployment, the worker runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from runbook_lib.steps import e2e
from runbook_lib.systems.supabase import secret_digest
from runbook_sandbox import manager
from runbook_sandbox.supabase import STALE_DEPLOYMENT_ID
from tests.conftest import PROJECT_ROOT, wait_for
from tests.integration.chain_helpers import KERNEL_ENV, function_secret_digest as function_digest
from tests.integration.chain_helpers import scripted_answer, set_function_secret
from tests.integration.notebook_runs import assert_no_secrets_under

SECRET = "PREFECT_DEPLOYMENT_ID"
STEPS = [p.stem for p in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
MERGE, DEPLOY, SECRET_STEP, E2E = "02_merge_check", "03_deploy", "04_update_edge_function_secret", "05_end_to_end_test"
E2E_FAST = ["-p", "n_items=3", "-p", "trigger_timeout=15", "-p", "flow_run_timeout=30", "-p", "completion_timeout=60"]
WRITES = ("POST", "PUT", "PATCH", "DELETE")


# -- running the runbook ------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    run_dir: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "manifest.json").read_text())

    def step(self, name: str) -> dict[str, Any]:
        return next(s for s in self.manifest["steps"] if s["step"] == name)

    def results(self, name: str) -> dict[str, Any]:
        return json.loads((self.run_dir / f"{name}.json").read_text())

    def check(self, name: str, id: str) -> dict[str, Any]:
        return next(c for c in self.results(name)["checks"] if c["id"] == id)


def command(outputs: Path, run_id: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "runbook_lib", "run", "--profile", "sandbox", "--confirm",
            "--outputs-dir", str(outputs), "--run-id", run_id, *args]


def environment(sandbox, flow_branch: bool = True) -> dict[str, str]:
    return dict(os.environ, RUNBOOK_SANDBOX_DIR=str(sandbox.state), **(KERNEL_ENV if flow_branch else {}))


def run(sandbox, tmp_path: Path, *args: str, flow_branch: bool = True, timeout: float = 600,
        env: dict[str, str] | None = None) -> Outcome:
    outputs = tmp_path / "outputs"
    proc = subprocess.run(command(outputs, "fault", *args), cwd=PROJECT_ROOT,
                          env={**environment(sandbox, flow_branch), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout + proc.stderr, outputs / "fault")


def known_secrets(cfg) -> dict[str, str]:
    return {
        "PREFECT_API_KEY": cfg.prefect.api_key, "SUPABASE_ACCESS_TOKEN": cfg.supabase.access_token,
        "SUPABASE_JWT_SECRET": cfg.supabase.jwt_secret, "SUPABASE_SERVICE_ROLE_KEY": cfg.supabase.service_role_key,
        "GITHUB_TOKEN": cfg.git.token, "DATABASE_PASSWORD": cfg.postgres.password,
        "MODAL_TOKEN_ID": cfg.modal.token_id, "MODAL_TOKEN_SECRET": cfg.modal.token_secret,
    }


def assert_record_saved_and_clean(sandbox, outcome: Outcome, steps: list[str]) -> None:
    """The run's record: manifest, index, per step run its results, executed notebook and HTML; the
    runner's secret scan ran and found nothing, and no sandbox secret is in any file."""
    m = outcome.manifest
    index = (outcome.run_dir / "index.html").read_text()
    for name in steps:
        assert (outcome.run_dir / f"{name}.json").is_file() and (outcome.run_dir / f"{name}.ipynb").is_file()
        html = outcome.step(name)["html"]
        assert html and (outcome.run_dir / html).is_file() and html in index
    scan = m["secret_scan"]
    assert scan is not None and scan["scanned_files"] > 0 and scan["findings"] == [], scan
    assert "SUPABASE_ACCESS_TOKEN" in scan["secrets_known"] and "PREFECT_API_KEY" in scan["secrets_known"]
    assert_no_secrets_under(outcome.run_dir, known_secrets(sandbox))


def assert_failed_at(sandbox, outcome: Outcome, step: str, check_id: str | None, *words: str) -> dict[str, Any]:
    """`step` failed (exit code non-zero) on the failed check `check_id` (None: the step's error alone,
    when the step stops before any check), whose detail (or the step's error) has each of `words`;
    every later step of the sequence is not_run; the record is saved. Returns the failed check (or
    the step's record)."""
    assert outcome.code != 0, outcome.out[-3000:]
    assert (outcome.run_dir / "manifest.json").is_file(), outcome.out[-3000:]
    m = outcome.manifest
    assert m["status"] == "failed", (m["status"], m.get("error"))
    record = outcome.step(step)
    assert record["status"] == "failed", record
    if check_id is None:
        failed = {"detail": "", "remediation": record["error"]}
    else:
        assert next(c for c in record["checks"] if c["id"] == check_id)["status"] == "fail", record["checks"]
        failed = outcome.check(step, check_id)
    assert record["error"] and outcome.results(step)["status"] == "failed"
    evidence = f"{failed['detail']}\n{record['error']}"
    for word in words:
        assert word.lower() in evidence.lower(), f"{word!r} not in the failure of {step}:\n{evidence}"
    assert failed["remediation"], failed
    ran = [s["step"] for s in m["steps"] if s["status"] != "not_run"]
    assert ran[-1] == step, ran
    assert all(s["status"] == "not_run" for s in m["steps"][[s["step"] for s in m["steps"]].index(step) + 1:])
    assert_record_saved_and_clean(sandbox, outcome, [step])
    return failed


# -- what the stand-ins saw ---------------------------------------------------------------------------


def log_mark(sandbox, service: str) -> int:
    path = sandbox.request_log_path(service)
    return len(path.read_text().splitlines()) if path.exists() else 0


def requests_since(sandbox, service: str, mark: int) -> list[dict[str, Any]]:
    path = sandbox.request_log_path(service)
    return [json.loads(line) for line in path.read_text().splitlines()[mark:]] if path.exists() else []


def marks(sandbox) -> dict[str, int]:
    return {service: log_mark(sandbox, service) for service in ("prefect", "supabase", "git", "modal")}


def prefect_writes(entries: list[dict[str, Any]]) -> list[str]:
    """Writes to Prefect (reads by filter, count or pagination excluded)."""
    return [f"{e['method']} {e['path'].split('/workspaces/', 1)[-1]}" for e in entries
            if e["method"] in WRITES and not e["path"].endswith(("/filter", "/count", "/paginate"))]


def writes_since(sandbox, since: dict[str, int]) -> dict[str, list[str]]:
    """What was written since `since` by anyone but the worker's polling: deployments, flow runs
    (a run the runbook started), Supabase secrets, git pushes, Modal spawns."""
    prefect = [w for w in prefect_writes(requests_since(sandbox, "prefect", since["prefect"]))
               if w.split(" ", 1)[1].split("/", 2)[1].startswith(("deployments", "automations", "block_documents"))
               or "create_flow_run" in w]
    supabase = [f"{e['method']} {e['path']}" for e in requests_since(sandbox, "supabase", since["supabase"])
                if e["method"] in WRITES and e["path"].endswith("/secrets")]
    git = [e["path"] for e in requests_since(sandbox, "git", since["git"]) if "receive-pack" in e["path"]]
    modal = [f"{e['method']} {e['path']}" for e in requests_since(sandbox, "modal", since["modal"])
             if e["method"] in WRITES]
    return {k: v for k, v in {"prefect": prefect, "supabase": supabase, "git": git, "modal": modal}.items() if v}


# -- the Edge Function's secret -----------------------------------------------------------------------


@pytest.fixture
def pending_secret_change(sandbox, managed) -> Iterator[str]:
    """The function's secret names the sandbox's stale deployment, so step 04 with the `managed`
    deployment has a change to make; put back to `managed` afterwards. Yields the digest before."""
    set_function_secret(sandbox, STALE_DEPLOYMENT_ID)
    try:
        yield secret_digest(STALE_DEPLOYMENT_ID)
    finally:
        set_function_secret(sandbox, managed)


@contextlib.contextmanager
def worker_stopped(sandbox) -> Iterator[None]:
    """The managed worker stopped (nothing serves the pool, nothing else polls the Prefect API); started
    again afterwards."""
    manager.stop_service("managed_worker", sandbox.state)
    try:
        yield
    finally:
        manager.up(sandbox.state, only=["managed_worker"], echo=lambda s: None)


def cancel_runs_of(settings, flow_run_id: str | None) -> None:
    if not flow_run_id:
        return
    from prefect.states import Cancelled

    from runbook_lib.systems.prefect import PrefectApi

    PrefectApi.from_settings(settings).call("cancelling the test's unstarted run", lambda c: c.set_flow_run_state(
        flow_run_id, Cancelled(message="fault matrix: worker stopped on purpose"), force=True))


def assert_no_change_applied(run_dir: Path) -> None:
    """The Edge Function secret's change history records no applied change: absent, or (write-ahead)
    every change recorded ahead was finalised `not_applied`."""
    path = run_dir / "edge_function_secret_history.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    last = {e.get("change_id"): e.get("status") for e in entries}
    assert all(status == "not_applied" for status in last.values()), entries


def batch_gone(database, batch_id: str | None) -> bool:
    return batch_id is None or not database.query("SELECT 1 FROM public.batches WHERE id = %s", (batch_id,))


# -- Prefect ------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_prefect_api_down_fails_step_03_before_any_write(sandbox, managed, sandbox_fault, tmp_path):
    since = marks(sandbox)
    with sandbox_fault("prefect_api", "down"):
        outcome = run(sandbox, tmp_path, "--only", "03")
    assert_failed_at(sandbox, outcome, DEPLOY, "prefect.api", "cannot reach the Prefect API", "ConnectError")
    assert writes_since(sandbox, since) == {}


@pytest.mark.timeout(300)
def test_prefect_503_once_is_retried_and_step_04_passes(sandbox, managed, sandbox_fault, tmp_path):
    """Prefect's client retries 503 (honouring Retry-After) up to PREFECT_CLIENT_MAX_RETRIES times: one
    503 costs a second, the step passes. The worker is stopped so that the one 503 is the runbook's."""
    with worker_stopped(sandbox):
        since = marks(sandbox)
        with sandbox_fault("prefect_api", "error", status=503, count=1):
            outcome = run(sandbox, tmp_path, "--only", "04", "-p", f"deployment_id={managed}")
        entries = requests_since(sandbox, "prefect", since["prefect"])
    assert outcome.code == 0, outcome.out[-3000:]
    assert outcome.manifest["status"] == "passed" and outcome.step(SECRET_STEP)["status"] == "passed"
    faulted = [i for i, e in enumerate(entries) if e.get("fault")]
    assert len(faulted) == 1 and entries[faulted[0]]["status"] == 503, entries
    first = entries[faulted[0]]
    assert any(e["path"] == first["path"] and e["method"] == first["method"] and e["status"] < 400
               for e in entries[faulted[0] + 1:]), "the request answered 503 was not retried"
    assert outcome.check(SECRET_STEP, "deployment.exists")["status"] == "pass"
    assert writes_since(sandbox, since) == {}  # the secret already named the deployment: no write
    assert_record_saved_and_clean(sandbox, outcome, [SECRET_STEP])


# -- Supabase Management API --------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("status, words", [(500, ("server error 500", "3 attempts")),
                                            (429, ("rate limited (429)", "3 attempts")),
                                            (401, ("401", "SUPABASE_ACCESS_TOKEN"))])
def test_supabase_api_errors_fail_step_04_at_the_read_and_change_nothing(sandbox, managed, pending_secret_change,
                                                                         sandbox_fault, tmp_path, status, words):
    since = marks(sandbox)
    with sandbox_fault("supabase_api", "error", status=status):
        # Three attempts, not the default six: the same retries, a tenth of the waiting (the default budget:
        # tests/unit/test_systems_supabase.py).
        outcome = run(sandbox, tmp_path, "--only", "04", "-p", f"deployment_id={managed}",
                      env={"RUNBOOK_SUPABASE__MAX_ATTEMPTS": "3"})
    assert_failed_at(sandbox, outcome, SECRET_STEP, "management_api.access", *words)
    assert function_digest(sandbox) == pending_secret_change
    assert writes_since(sandbox, since) == {}
    assert not (outcome.run_dir / "edge_function_secret_history.jsonl").exists()


@pytest.mark.timeout(300)
def test_supabase_401_at_the_write_fails_step_04_and_the_secret_is_unchanged(sandbox, managed, pending_secret_change,
                                                                            tmp_path):
    since = marks(sandbox)
    path = f"/v1/projects/{sandbox.supabase.project_ref}/secrets"
    with scripted_answer(sandbox, path=path, method="POST", status=401, count=None):
        outcome = run(sandbox, tmp_path, "--only", "04", "-p", f"deployment_id={managed}")
    write = assert_failed_at(sandbox, outcome, SECRET_STEP, "secret.write", "401", "SUPABASE_ACCESS_TOKEN", "unchanged")
    assert "access token" in write["remediation"].lower()
    assert outcome.step(SECRET_STEP)["gate"]["decision"] == "approved"
    assert function_digest(sandbox) == pending_secret_change
    assert writes_since(sandbox, since) == {"supabase": [f"POST {path}"]}  # the refused write, once
    assert_no_change_applied(outcome.run_dir)


# -- git ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_git_server_down_fails_step_02_and_nothing_is_pushed(sandbox, sandbox_fault, tmp_path):
    since = marks(sandbox)
    with sandbox_fault("git", "down"):
        outcome = run(sandbox, tmp_path, "--only", "02", flow_branch=False)
    # It stops at the first fetch, before any check: the error names git and the repository's URL.
    assert_failed_at(sandbox, outcome, MERGE, None, "git", "unable to access", sandbox.git_base_url)
    assert outcome.step(MERGE)["gate"] is None  # no plan was offered
    assert writes_since(sandbox, since) == {}


# -- step 05: the chain -------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_database_down_fails_step_05_before_anything_is_launched(sandbox, managed, database, sandbox_fault, tmp_path):
    since = marks(sandbox)
    with sandbox_fault("database", "down"):
        outcome = run(sandbox, tmp_path, "--only", "05", "-p", f"deployment_id={managed}", *E2E_FAST)
    # It stops at its first read of the database, before any check: the error names it and DATABASE_URL.
    assert_failed_at(sandbox, outcome, E2E, None, "database: cannot connect", "Connection refused", "DATABASE_URL")
    assert outcome.results(E2E)["values"].get("batch_id") is None
    assert writes_since(sandbox, since) == {}


@pytest.mark.timeout(400)
def test_edge_function_500_fails_step_05_at_link_2_and_the_test_batch_is_deleted(sandbox, managed, database,
                                                                               sandbox_fault, tmp_path):
    since = marks(sandbox)
    with sandbox_fault("edge_function", "error", status=500):
        outcome = run(sandbox, tmp_path, "--only", "05", "-p", f"deployment_id={managed}", *E2E_FAST)
    link = assert_failed_at(sandbox, outcome, E2E, e2e.LINK_EDGE_FUNCTION, "500")
    assert link["remediation"]
    values = outcome.results(E2E)["values"]
    assert values["failed_link"] == e2e.LINK_EDGE_FUNCTION and values["cleaned_up"] is True
    assert batch_gone(database, values["batch_id"])
    assert writes_since(sandbox, since) == {}  # no flow run was created, nothing dispatched


@pytest.mark.timeout(400)
def test_worker_absent_fails_step_05_at_link_4(sandbox, settings, managed, database, tmp_path):
    outcome = None
    with worker_stopped(sandbox):
        try:
            # Nothing serves the pool: the run never starts, however long 05 waits (5 s, as in test_e2e).
            outcome = run(sandbox, tmp_path, "--only", "05", "-p", f"deployment_id={managed}", *E2E_FAST,
                          "-p", "flow_run_timeout=5")
        finally:
            if outcome is not None and (outcome.run_dir / f"{E2E}.json").is_file():
                cancel_runs_of(settings, outcome.results(E2E)["values"].get("flow_run_id"))
    link = assert_failed_at(sandbox, outcome, E2E, e2e.LINK_WORK_POOL, "never started", settings.deployment.work_pool)
    assert "worker" in link["remediation"]
    assert batch_gone(database, outcome.results(E2E)["values"]["batch_id"])


@pytest.mark.timeout(400)
def test_modal_down_fails_step_05_at_link_5_with_the_items_cause(sandbox, managed, database, sandbox_fault, tmp_path):
    with sandbox_fault("modal", "down"):
        outcome = run(sandbox, tmp_path, "--only", "05", "-p", f"deployment_id={managed}", *E2E_FAST)
    link = assert_failed_at(sandbox, outcome, E2E, e2e.LINK_ITEMS, "dispatch failed", sandbox.modal_url,
                            "Connection refused")
    assert "Modal" in link["remediation"]
    values = outcome.results(E2E)["values"]
    assert [(g["status"], g["count"]) for g in values["stuck_items"]] == [("PENDING", 3)], values  # ready for a retry
    assert batch_gone(database, values["batch_id"])


# -- the runner killed mid-step -----------------------------------------------------------------------


def connected_to(pid: int, port: int) -> bool:
    """Whether the process `pid` or one of its descendants has a connection open to `port` on loopback."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in family:
        with contextlib.suppress(psutil.Error):
            if any(c.raddr and c.raddr.port == port for c in process.net_connections(kind="tcp")):
                return True
    return False


@pytest.mark.timeout(400)
def test_runner_sigkilled_during_step_04_leaves_the_secret_unchanged_and_the_next_run_marks_it(
        sandbox, managed, pending_secret_change, sandbox_fault, tmp_path):
    """The runner is killed (SIGKILL) while step 04 waits on the Management API (held by a slow fault):
    its step process interrupts the kernel, whose record says so; no write was sent; the next run of
    the profile takes the lock over and marks the killed run interrupted in its manifest and index."""
    outputs = tmp_path / "outputs"
    since = marks(sandbox)
    port = int(sandbox.supabase_api_url.rsplit(":", 1)[1].split("/", 1)[0])
    with sandbox_fault("supabase_api", "slow", delay_ms=60_000):
        proc = subprocess.Popen(command(outputs, "killed", "--only", "04", "-p", f"deployment_id={managed}"),
                                cwd=PROJECT_ROOT, env=environment(sandbox), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            step_pid = wait_for(lambda: next((s.get("pid") for s in _manifest(outputs / "killed").get("steps", [])
                                              if s["step"] == SECRET_STEP and s["status"] == "running"), None),
                                120, "step 04 to run", interval=0.2)
            wait_for(lambda: connected_to(step_pid, port), 120, "step 04 to wait on the Management API", interval=0.2)
            family = [psutil.Process(step_pid), *psutil.Process(step_pid).children(recursive=True)]
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            _, alive = psutil.wait_procs(family, timeout=60)
            assert not alive, "the step process or its kernel outlived the killed runner"
        finally:
            if proc.poll() is None:
                proc.kill()
    killed = outputs / "killed"
    rec = json.loads((killed / f"{SECRET_STEP}.json").read_text())
    assert rec["status"] == "failed" and "interrupted" in rec["error"], rec
    assert function_digest(sandbox) == pending_secret_change
    assert writes_since(sandbox, since) == {}
    assert (killed / f"{SECRET_STEP}.ipynb").is_file()
    assert_no_secrets_under(killed, known_secrets(sandbox))

    # The next run (the user re-runs step 04): takes the lock over, marks the killed run, applies.
    nxt = subprocess.run(command(outputs, "next", "--only", "04", "-p", f"deployment_id={managed}"), cwd=PROJECT_ROOT,
                         env=environment(sandbox), capture_output=True, text=True, timeout=300)
    assert nxt.returncode == 0, (nxt.stdout + nxt.stderr)[-3000:]
    assert "took over the lock" in nxt.stdout + nxt.stderr
    m = _manifest(killed)
    step = next(s for s in m["steps"] if s["step"] == SECRET_STEP)
    assert m["status"] == "interrupted" and step["status"] == "interrupted", (m["status"], step)
    assert all(s["status"] == "not_run" for s in m["steps"] if s["step"] == E2E)
    assert "interrupted" in (killed / "index.html").read_text()
    scan = m["secret_scan"]  # the take-over scanned the killed run's records
    assert scan is not None and scan["scanned_files"] > 0 and scan["findings"] == [], scan
    assert function_digest(sandbox) == secret_digest(managed)


def _manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}

