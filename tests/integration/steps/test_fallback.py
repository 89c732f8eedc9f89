"""The fallback notebook (the orchestrator on a process work pool) through papermill, against the
sandbox: it creates the pool, deploys, runs a worker the way the profile says, points the Edge Function
at the fallback deployment with step 04's code and proves the chain with step 05's checks; it stops its
worker when asked and leaves nothing running. Without `fallback.start_worker` it writes a service
definition instead, refuses to switch the Edge Function while no worker serves the pool, and passes
once a worker started from that definition's command serves it.
"""

from __future__ import annotations

import shlex
import shutil
import uuid
from importlib import metadata

import psutil
import pytest

from runbook_lib.core import processes as process
from runbook_lib.steps import e2e, fallback
from runbook_lib.systems.prefect import PrefectApi
from runbook_lib.systems.supabase import secret_digest
from tests.conftest import PROJECT_ROOT, wait_for
from tests.integration.chain_helpers import (
    LINK_IDS,
    function_deployment_digest,
    run_chain_notebook,
    set_function_deployment_id,
)
from tests.integration.notebook_runs import assert_no_secrets_under, secret_values

STEP = "fallback_process_pool"
E2E = {"n_items": 6, "flow_run_timeout": 120, "completion_timeout": 150}


def fallback_worker_processes() -> list[int]:
    """Every process a worker started by the runbook left (they carry its marker variable)."""
    found = []
    for p in psutil.process_iter():
        try:
            if fallback.WORKER_MARKER_ENV in p.environ():
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(600)
def test_fallback_passes_end_to_end_and_stops_its_worker(sandbox, sandbox_env, settings, managed, tmp_path):
    spec = fallback.worker_spec(settings)
    try:
        run = run_chain_notebook(STEP, sandbox, tmp_path, {"confirm": True, "stop_worker": True, **E2E})
        assert run.error is None, run.results
        # Each gate's decision is kept, in order: the deployment, the Edge Function's secret, the test batch.
        gates = run.results["gates"]
        assert len(gates) == 3 and all(g["decision"] == "approved" and g["mode"] == "parameter" for g in gates), gates
        assert "worker" in gates[0]["summary"] and "PREFECT_DEPLOYMENT_ID" in gates[1]["summary"]
        assert len({g["plan_digest"] for g in gates}) == 3 and run.results["gate"] == gates[-1]
        statuses = run.statuses()
        for check in ("prefect.work_pool", "fallback.pool_ready", "fallback.deploy", "verify.work_pool", "fallback.worker",
                      "secret.verify", "fallback.worker_stopped", *LINK_IDS, "cleanup"):
            assert statuses[check] == "pass", (check, run.check(check))
        api = PrefectApi.from_settings(settings)
        # The same flow on the process pool, under its own name; no pip_packages, placeholders in env.
        fallback_id = run.values["fallback_deployment_id"]
        assert fallback_id != managed
        deployment = api.read_deployment_by_id(fallback_id)
        assert deployment.name == settings.fallback.deployment_name
        assert deployment.work_pool_name == "default-agent-pool"
        assert api.read_work_pool("default-agent-pool").type == "process"
        assert "pip_packages" not in deployment.job_variables
        assert deployment.job_variables["env"]["MODAL_TOKEN_SECRET"] == "{{ prefect.blocks.secret.modal-token-secret }}"
        assert deployment.entrypoint == settings.source.entrypoint
        # The Edge Function now starts it, and the end-to-end run went through the process pool.
        assert function_deployment_digest(settings) == secret_digest(fallback_id)
        flow_run = api.read_flow_run(run.values["flow_run_id"])
        assert str(flow_run.deployment_id) == fallback_id and flow_run.work_pool_name == "default-agent-pool"
        assert run.values["item_state_counts"]["COMPLETED"] == 6
        # The worker was started here, served the run, then was stopped with everything it spawned.
        worker_check = run.check("fallback.worker")
        assert "started (pid" in worker_check["detail"] and "ONLINE" in worker_check["detail"]
        # The worker and the flow run processes the stop killed are gone moments later (not necessarily at
        # once under load: a killed process ends when the kernel has torn it down).
        wait_for(lambda: not process.is_alive(worker_check["data"]["pid"]), 60, "the stopped worker to be gone")
        assert fallback.worker_running(settings) is None and not spec.pid_file.exists()
        wait_for(lambda: fallback_worker_processes() == [], 60, "no process of the stopped worker left")
        # Switching back is one command: step 04 with the managed deployment's id.
        assert run.values["switch_back_command"].endswith(
            f"--only 04_update_edge_function_secret -p deployment_id={managed} --confirm")
        assert_no_secrets_under(tmp_path, secret_values(sandbox, sandbox_env, service_role=False))
    finally:
        fallback.stop_worker(settings)
        set_function_deployment_id(settings, managed)
        shutil.rmtree(spec.directory, ignore_errors=True)
    assert fallback.worker_running(settings) is None


@pytest.mark.timeout(900)
def test_without_start_worker_it_writes_a_service_definition_and_switches_only_once_a_worker_serves(
        sandbox, sandbox_env, settings, managed, tmp_path):
    tag = uuid.uuid4().hex[:6]
    pool, worker_name = f"fallback-svc-{tag}", f"svc-worker-{tag}"
    env = {"RUNBOOK_FALLBACK__START_WORKER": "false", "RUNBOOK_FALLBACK__WORK_POOL": pool,
           "RUNBOOK_FALLBACK__DEPLOYMENT_NAME": f"orchestrator-svc-{tag}", "RUNBOOK_FALLBACK__WORKER_NAME": worker_name}
    before = function_deployment_digest(settings)
    host_pid = None
    try:
        first = run_chain_notebook(STEP, sandbox, tmp_path / "first", {"confirm": True, **E2E}, env=env)
        # No worker serves the new pool: the step stops before touching the Edge Function.
        assert first.error is not None and "fallback.worker" in first.results["error"]
        check = first.check("fallback.worker")
        assert check["status"] == "fail" and "NOT switched" in check["detail"]
        assert f"prefect worker start --pool {pool} --type process --name {worker_name}" in check["remediation"]
        assert function_deployment_digest(settings) == before
        assert not any(c["id"] in LINK_IDS for c in first.results["checks"])
        # The service definition: the worker command, the flow's packages, the settings' names only.
        service = tmp_path / "first" / fallback.SERVICE_DIR
        procfile = (service / "Procfile").read_text()
        assert procfile == f"worker: prefect worker start --pool {pool} --type process --name {worker_name}\n"
        requirements = (service / "requirements.txt").read_text().split()
        assert f"prefect=={metadata.version('prefect')}" in requirements
        assert {"psycopg2-binary", "modal", "python-dotenv"} <= set(requirements)
        dockerfile = (service / "Dockerfile").read_text()
        assert dockerfile.startswith("FROM python:3.12-slim") and "pip install --no-cache-dir -r requirements.txt" in dockerfile
        assert f'"--pool", "{pool}"' in dockerfile
        env_example = (service / "worker.env.example").read_text()
        assert "PREFECT_API_KEY=\n" in env_example and f"PREFECT_API_URL={sandbox_env['PREFECT_API_URL']}" in env_example
        assert_no_secrets_under(tmp_path / "first", secret_values(sandbox, sandbox_env, service_role=False))
        # A host runs the Procfile's command with the settings worker.env.example names.
        host_env = {"PATH": f"{PROJECT_ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
                    "PREFECT_HOME": str(tmp_path / "host-prefect"), "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_API_KEY": sandbox_env["PREFECT_API_KEY"]}
        for line in env_example.splitlines():
            name, _, value = line.partition("=")
            if value and not line.startswith("#"):
                host_env[name] = value
        host_pid = process.spawn(shlex.split(procfile.split(":", 1)[1]), log_path=tmp_path / "host-worker.log",
                                 env=host_env, cwd=tmp_path)
        api = PrefectApi.from_settings(settings)

        def online() -> bool:
            assert process.is_alive(host_pid), process.log_tail(tmp_path / "host-worker.log")
            return bool(fallback.online_workers(api, pool, worker_name))

        wait_for(online, 90, "the host's worker ONLINE in the pool", interval=0.5)
        second = run_chain_notebook(STEP, sandbox, tmp_path / "second", {"confirm": True, **E2E}, env=env)
        assert second.error is None, second.results
        assert second.check("fallback.worker")["status"] == "pass" and worker_name in second.check("fallback.worker")["detail"]
        assert second.check(e2e.LINK_WORK_POOL)["data"]["work_pool"] == pool
        assert function_deployment_digest(settings) == secret_digest(second.values["fallback_deployment_id"])
    finally:
        if host_pid is not None:
            children = [p.pid for p in psutil.Process(host_pid).children(recursive=True)] \
                if process.is_alive(host_pid) else []
            process.stop(host_pid)
            for pid in children:
                process.stop(pid)
        set_function_deployment_id(settings, managed)
    wait_for(lambda: not process.is_alive(host_pid), 60, "the host's worker to be gone")


def test_worker_directory_is_keyed_by_workspace_and_pool(settings, tmp_path):
    spec = fallback.worker_spec(settings)
    other = fallback.worker_spec(settings.model_copy(update={"fallback": settings.fallback.model_copy(
        update={"work_pool": "another-pool"})}))
    assert spec.directory != other.directory and spec.directory.parent == PROJECT_ROOT / "outputs" / "workers"
    assert spec.argv == ["prefect", "worker", "start", "--pool", "default-agent-pool", "--type", "process",
                         "--name", settings.fallback.worker_name]
    # Stopping when nothing was started is a no-op that says so.
    idle = fallback.WorkerSpec("idle", "default-agent-pool", "process", tmp_path, 10)
    check = fallback.stop_worker(settings, idle)
    assert check.status.value == "pass" and "no worker" in check.detail
