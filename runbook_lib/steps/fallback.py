"""The plan's fallback, for when Prefect Managed is not usable: the same flow on a process work pool.

- The deployment `fallback.deployment_name` (a name of its own, so the managed deployment stays as it
  is) goes to the process pool `fallback.work_pool` (`default-agent-pool`, type `process`, created
  when missing), from the same repository, branch and entrypoint, with the same env (Secret block
  placeholders, resolved by the worker) and no `pip_packages`: a process pool installs nothing, so
  the worker's own environment must hold the flow's packages.
- A worker serves the pool. Which way comes from the profile, `fallback.start_worker`:
  true: the runbook starts `prefect worker start` here as a background process in its own session
  (pid file and log under `outputs/workers/<profile>-<id>/`) and waits until the pool lists it
  online; false: it prints the exact command and writes a service definition for a small
  always-on host into the run directory (Procfile, Dockerfile, requirements.txt with the flow's
  packages, worker.env.example naming the settings, never their values).
- Then step 04's code points the Edge Function's PREFECT_DEPLOYMENT_ID at the fallback deployment
  (only once a worker is online: never at a pool nobody serves), and step 05's code runs the
  end-to-end test against it.

The step starts with the profile's `deployment.name / work_pool / work_pool_type` replaced by the
fallback's, so that 04's and 05's code check against the fallback deployment and pool.
Switching back is step 04 with the managed deployment's id (`switch_back_command`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from runbook_lib.checks import prefect, source
from runbook_lib.checks.base import Check, CheckReport, define, run_checks
from runbook_lib.checks.deployment import (
    desired_deployment, live_plaintext_check, masked_live_fields, verification_checks,
)
from runbook_lib.checks.facts import Facts
from runbook_lib.core import paths as project
from runbook_lib.core import processes
from runbook_lib.core.errors import PrefectApiError, ResultsError, RunbookError
from runbook_lib.core.profiles import load_settings
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.core.values import parse_flag
from runbook_lib.notebook.context import StepContext, show
from runbook_lib.notebook.context import start_step as _start_step
from runbook_lib.records.outputs import DeployOutput, EdgeSecretOutput, FallbackOutput
from runbook_lib.steps.base import Step
from runbook_lib.systems.prefect import CLIENT_MODULES, PrefectApi
from runbook_lib.systems.prefect_deploy import (
    DeployError, DesiredDeployment, FieldChange, changed_since_plan, deploy_flow, diff_fields, diff_table, live_digest,
)

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel
STEP = FallbackOutput.STEP
WORKER_MARKER_ENV = "RUNBOOK_FALLBACK_WORKER"
SERVICE_DIR = "fallback_worker"
STOP_TIMEOUT = 20.0
# The plan's checks: the catalog's (those of step 03, on the fallback's pool and job variables).
PLAN_CHECKS = [prefect.api, prefect.work_pool, prefect.work_pool_type, prefect.job_variables_secrets,
               prefect.job_variables_schema, *source.REPOSITORY, prefect.block_database_url, prefect.blocks_referenced]

WORKER_MODE = define("fallback.worker_mode", "How the worker is run (fallback.start_worker)",
                     proves="whether the runbook starts the worker here or describes it for an always-on host")
POOL_READY = define("fallback.pool_ready", "Fallback work pool ready", proves="the process pool exists (created if missing)",
                    remediation="create it by hand: `prefect work-pool create default-agent-pool --type process`")
DEPLOYED = define("fallback.deploy", "Fallback deployment applied",
                  proves="the fallback deployment is live on the process pool (no write when nothing differs)")
WORKER = define("fallback.worker", "A worker serves the fallback pool",
                proves="a worker is online on the fallback pool (the Edge Function is never pointed at a pool nobody "
                       "serves)")
WORKER_STOPPED = define("fallback.worker_stopped", "Fallback worker stopped",
                        proves="the worker the runbook started, and every flow run process it spawned, are stopped")


# -- the step ----------------------------------------------------------------------------------------


def fallback_overrides(settings: RunbookSettings) -> dict[str, Any]:
    fb = settings.fallback
    return {"deployment.name": fb.deployment_name, "deployment.work_pool": fb.work_pool,
            "deployment.work_pool_type": fb.work_pool_type}


def start_step(profile: str | None = "sandbox", confirm: Any = None, run_dir: Any = None) -> StepContext:
    """`notebook.start_step` for this step, with the deployment settings pointed at the fallback
    (deployment name, work pool and its type), so that steps 04's and 05's code target it."""
    try:
        base = load_settings(profile)
    except RunbookError:
        return _start_step(STEP, profile=profile, confirm=confirm, run_dir=run_dir)  # records the same error
    ctx = _start_step(STEP, profile=profile, confirm=confirm, run_dir=run_dir, overrides=fallback_overrides(base))
    ctx.publish(FallbackOutput(managed_deployment_name=base.deployment.name, managed_work_pool=base.deployment.work_pool))
    return ctx


@dataclass
class FallbackPlan:
    desired: DesiredDeployment | None
    live_id: str | None
    pool_exists: bool
    changes: list[FieldChange] = field(default_factory=list)
    worker_mode: str = "service_files"  # or "start"
    live_check: Check | None = None  # LIVE_PLAINTEXT of the live deployment (None: there is none)
    live_digest: str | None = None  # what the live deployment was when the plan was made

    @property
    def deploy_needed(self) -> bool:
        return self.live_id is None or any(c.status != "unchanged" for c in self.changes)

    def gate_plan(self) -> dict[str, Any]:
        d = self.desired
        return {
            "work_pool": f"{'keep' if self.pool_exists else 'create'} {d.work_pool_name} (type {d.work_pool_type})",
            "deployment": d.full_name,
            "deployment_id": self.live_id,
            "ref": {"branch": d.branch, "head": d.commit_sha},
            "changes": [c.as_dict() for c in self.changes if c.status != "unchanged"],
            "live_digest": self.live_digest,
            "worker": ("start `prefect worker start` here in the background (fallback.start_worker = true)"
                       if self.worker_mode == "start" else
                       "write a service definition for an always-on host into the run directory and print the command"),
        }

    nothing_to_apply = None  # the worker is always started or described: always confirmed

    def summary(self) -> str:
        d = self.desired
        what = ("no deployment change" if not self.deploy_needed else
                f"{'create' if self.live_id is None else 'update'} deployment {d.full_name}")
        pool = "" if self.pool_exists else f"create work pool {d.work_pool_name}, "
        return f"{pool}{what} on {d.work_pool_name}, and {'start' if self.worker_mode == 'start' else 'describe'} its worker"


def process_template() -> dict[str, Any]:
    """The process worker's base job template (what `prefect work-pool create --type process` uses)."""
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def build_plan(settings: RunbookSettings) -> tuple[FallbackPlan | None, CheckReport]:
    """Read-only: the checks, the desired deployment on the process pool and the diff with the live one.
    A process pool has no pip_packages: only the env goes into the job variables."""
    settings.require("prefect.api_url", "prefect.api_key", "source.repo_url")
    dep, fb = settings.deployment, settings.fallback
    facts = Facts(settings, STEP, job_variables={"env": dict(dep.env)}, missing_pool_template=process_template())
    try:
        report = run_checks(facts, PLAN_CHECKS)
        mode = "start" if fb.start_worker else "service_files"
        report.add(WORKER_MODE.passed(
            "started here in the background" if mode == "start" else
            "on an always-on host: the runbook writes its service definition and prints the command"))
        if not report.ok:
            return None, report
        desired = desired_deployment(
            facts, pin_commit=False, name=dep.name, work_pool=dep.work_pool, work_pool_type=dep.work_pool_type,
            tags=sorted(set(dep.tags) | {"fallback"}),
            description=(f"Fallback of the managed deployment: the orchestrator on process pool {dep.work_pool}, "
                         f"served by worker {fb.worker_name}; deployed by the runbook from {settings.source.clone_url} "
                         f"({settings.source.branch})."),
        )
        live = facts.prefect().read_deployment(desired.full_name)
        pool_exists = facts.work_pool() is not None
    finally:
        facts.close()
    live_masked = None
    if live is not None:  # masked as the planned job variables are
        live_masked, findings = masked_live_fields(settings, live)
        live_check = live_plaintext_check(findings, desired.full_name)
    else:
        live_check = None
    changes = diff_fields(desired.fields(), live_masked)
    return FallbackPlan(desired, str(live.id) if live is not None else None, pool_exists, changes, mode,
                        live_check, live_digest(live)), report


def ensure_pool(api: PrefectApi, name: str, pool_type: str) -> bool:
    """Create the process pool when it is missing; True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate

    if api.read_work_pool(name) is not None:
        return False
    api.call(f"creating work pool {name!r}", lambda c: c.create_work_pool(
        WorkPoolCreate(name=name, type=pool_type, base_job_template=process_template())))
    return True


# -- the worker --------------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    name: str
    pool: str
    pool_type: str
    directory: Path  # pid file, log, PREFECT_HOME and temporary files of a worker started here
    query_seconds: int

    @property
    def argv(self) -> list[str]:
        return ["prefect", "worker", "start", "--pool", self.pool, "--type", self.pool_type, "--name", self.name]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def pid_file(self) -> Path:
        return self.directory / "worker.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "worker.log"


def worker_spec(settings: RunbookSettings, root: Path | None = None) -> WorkerSpec:
    """The worker of this profile's fallback pool; its directory is keyed by the Prefect API URL and
    the pool, so two workspaces (or two sandboxes) never share a pid file."""
    fb = settings.fallback
    key = hashlib.sha256(f"{settings.value('prefect.api_url')}|{fb.work_pool}".encode()).hexdigest()[:10]
    directory = (root or project.project_root()) / "outputs" / "workers" / f"{settings.profile}-{key}"
    return WorkerSpec(fb.worker_name, fb.work_pool, fb.work_pool_type, directory, fb.worker_query_seconds)


def _read_pid(spec: WorkerSpec) -> dict[str, Any] | None:
    try:
        record = json.loads(spec.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _alive(record: dict[str, Any] | None) -> bool:
    """The pid file's process is running and is the worker it started (same process start time)."""
    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - record.get("create_time", 0)) < 1
    except psutil.Error:
        return False


def online_workers(api: PrefectApi, pool: str, name: str | None = None, since: datetime | None = None) -> list[Any]:
    """Workers the pool lists ONLINE (optionally: by name, with a heartbeat after `since`)."""
    workers = api.call(f"reading the workers of {pool}", lambda c: c.read_workers_for_work_pool(pool))
    out = []
    for w in workers:
        if getattr(w.status, "value", w.status) != "ONLINE":
            continue
        if name is not None and w.name != name:
            continue
        if since is not None and (w.last_heartbeat_time is None or w.last_heartbeat_time < since):
            continue
        out.append(w)
    return out


def _worker_env(settings: RunbookSettings, spec: WorkerSpec, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_API_URL": settings.value("prefect.api_url"),
        "PREFECT_API_KEY": settings.value("prefect.api_key"),
        "PREFECT_HOME": str(spec.directory / "home"),
        "PREFECT_WORKER_QUERY_SECONDS": str(spec.query_seconds),
        # Flow runs' working directories and clones stay in the worker's directory.
        "TMPDIR": str(spec.directory / "tmp"),
        "PYTHONUNBUFFERED": "1",
        WORKER_MARKER_ENV: marker,
    })
    if settings.prefect.cloud_api_url:
        env["PREFECT_CLOUD_API_URL"] = settings.prefect.cloud_api_url
    return env


def start_worker(settings: RunbookSettings, api: PrefectApi, spec: WorkerSpec, timeout: float) -> Check:
    """Start the worker in the background (own session, pid file, log) unless it already runs, and wait
    until the pool lists it online with a fresh heartbeat."""
    record = _read_pid(spec)
    if _alive(record):
        started = datetime.fromtimestamp(record["create_time"], timezone.utc)
        how = f"already running (pid {record['pid']})"
    else:
        for sub in ("home", "tmp"):
            (spec.directory / sub).mkdir(parents=True, exist_ok=True)
        spec.directory.chmod(0o700)
        marker = hashlib.sha256(f"{spec.directory}|{time.time()}".encode()).hexdigest()[:16]
        argv = [sys.executable, "-m", "prefect", *spec.argv[1:]]
        started = datetime.now(timezone.utc)
        pid = processes.spawn(argv, log_path=spec.log_file, env=_worker_env(settings, spec, marker), cwd=spec.directory)
        record = {"pid": pid, "create_time": psutil.Process(pid).create_time(), "marker": marker, "name": spec.name,
                  "pool": spec.pool, "started_at": started.isoformat()}
        spec.pid_file.write_text(json.dumps(record))
        how = f"started (pid {pid}, log {spec.log_file})"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(record):
            processes.reap(record["pid"])
            spec.pid_file.unlink(missing_ok=True)
            return WORKER.failed(f"the worker exited right after it was {how}; last log lines:\n"
                + processes.log_tail(spec.log_file), f"read the log; run `{spec.command}` by hand to see the error",
            )
        if online_workers(api, spec.pool, spec.name, since=started):
            return WORKER.passed(f"{spec.name} {how}; {spec.pool} lists it ONLINE", pid=record["pid"])
        time.sleep(1.0)
    return WORKER.failed(f"{how}, but {spec.pool} did not list it online within {timeout:g}s; last log lines:\n"
        + processes.log_tail(spec.log_file),
        "read the log; check PREFECT_API_URL / PREFECT_API_KEY, then re-run this step",
    )


def stop_worker(settings: RunbookSettings, spec: WorkerSpec | None = None) -> Check:
    """Stop a worker this runbook started (its process group and every flow run process it spawned);
    a no-op when none runs."""
    spec = spec or worker_spec(settings)
    record = _read_pid(spec)
    if record is None:
        return WORKER_STOPPED.passed("no worker started by the runbook is running")
    leftovers: list[int] = []
    if _alive(record):
        try:
            children = psutil.Process(record["pid"]).children(recursive=True)
        except psutil.Error:
            children = []
        processes.stop(record["pid"], signal.SIGTERM, timeout=STOP_TIMEOUT)
        marked = [p for p in psutil.process_iter() if _has_marker(p, record.get("marker"))]
        for p in {p.pid: p for p in children + marked}.values():
            try:
                if p.is_running():
                    p.kill()
                    leftovers.append(p.pid)
            except psutil.Error:
                pass
    spec.pid_file.unlink(missing_ok=True)
    extra = f"; killed {len(leftovers)} leftover flow run process(es)" if leftovers else ""
    return WORKER_STOPPED.passed(f"stopped pid {record['pid']}{extra}", pid=record["pid"])


def _has_marker(proc: psutil.Process, marker: str | None) -> bool:
    if not marker:
        return False
    try:
        return proc.environ().get(WORKER_MARKER_ENV) == marker
    except psutil.Error:
        return False


def worker_running(settings: RunbookSettings) -> int | None:
    """The pid of the worker this runbook started for the profile's fallback pool, if it runs."""
    record = _read_pid(worker_spec(settings))
    return record["pid"] if _alive(record) else None


def write_service_files(settings: RunbookSettings, spec: WorkerSpec, directory: Path) -> list[Path]:
    """A ready service definition for a small always-on host (a Procfile host, or any Docker host):
    the worker command, its packages (the flow's: a process pool installs nothing), and the names of
    the settings it needs. No secret value is written."""
    from importlib import metadata

    directory.mkdir(parents=True, exist_ok=True)
    requirements = [f"prefect=={metadata.version('prefect')}", *settings.deployment.pip_packages]
    files = {
        "Procfile": f"worker: {spec.command}\n",
        "requirements.txt": (
            "# The worker's environment runs the flow: it needs prefect AND the flow's packages\n"
            "# (a process pool has no pip_packages).\n" + "\n".join(requirements) + "\n"
        ),
        "Dockerfile": (
            f"FROM python:{settings.deployment.runtime_python}-slim\n"
            "# git: the deployment's pull step clones the flow's repository at each run.\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*\n"
            "WORKDIR /worker\n"
            "COPY requirements.txt .\n"
            "RUN pip install --no-cache-dir -r requirements.txt\n"
            f"ENV PREFECT_WORKER_QUERY_SECONDS={spec.query_seconds}\n"
            "# PREFECT_API_URL and PREFECT_API_KEY come from the host's environment (see worker.env.example);\n"
            "# never bake them into the image.\n"
            f"CMD {json.dumps(spec.argv)}\n"
        ),
        "worker.env.example": (
            "# The worker's settings. Set them in the host's environment or secret store; the key is a secret.\n"
            f"PREFECT_API_URL={settings.value('prefect.api_url')}\n"
            + (f"PREFECT_CLOUD_API_URL={settings.prefect.cloud_api_url}\n" if settings.prefect.cloud_api_url else "")
            + "PREFECT_API_KEY=\n"
        ),
    }
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


class Fallback(Step):
    """The cells of the fallback: plan, confirm, apply, worker, stop, switch_back_command (the Edge
    Function's secret and the end-to-end test run with steps 04's and 05's classes on this context)."""

    OUTPUT = FallbackOutput

    def plan(self) -> FallbackPlan | None:
        """The checks and the diff; a FAIL ends the cell."""
        with self.failing():
            the_plan, report = build_plan(self.settings)
        if the_plan is not None:
            d = the_plan.desired
            title = f"Deployment {d.full_name} on {d.work_pool_name}: " + (
                "new deployment" if the_plan.live_id is None else "changes to apply" if the_plan.deploy_needed
                else "no changes")
            show(diff_table(title, the_plan.changes))
            self.publish(flow_name=d.flow_name, commit_sha=d.commit_sha, work_pool=d.work_pool_name)
        self.ctx.record_checks(report)
        if the_plan is not None and the_plan.live_check is not None:
            # Recorded and shown; a failure fails the step at apply, once the deploy replaced the secret.
            self.ctx.results.add_checks(CheckReport(step=self.ctx.name, checks=[the_plan.live_check]))
            self.ctx.save()
            show(CheckReport(step=self.ctx.name, checks=[the_plan.live_check]))
        return the_plan

    def apply(self, the_plan: FallbackPlan) -> str:
        """Once approved: read the branch head and the live deployment again (a change since the plan
        refuses), create the pool when missing, deploy when anything differs, read the deployment back.
        Records and returns the fallback deployment id."""
        ctx = self.ctx
        with self.failing():
            ctx.require_approved(the_plan.gate_plan())
        settings, d = self.settings, the_plan.desired
        try:
            stale = changed_since_plan(settings, d, the_plan.live_id, the_plan.live_digest)
        except RunbookError as exc:
            stale = f"the live state could not be read again before applying ({exc}); nothing was applied"
        if stale:
            exc = RunbookError(stale)
            ctx.record_failure(DEPLOYED.failed(stale, "re-run this notebook: it shows the plan for the live state as "
                                                      "it is now"), exc)
            raise exc
        api = PrefectApi.from_settings(settings)
        checks = []
        try:
            created = ensure_pool(api, d.work_pool_name, d.work_pool_type)
        except PrefectApiError as exc:
            ctx.record_failure(POOL_READY.failed(str(exc)), exc)
            raise
        checks.append(POOL_READY.passed(f"{d.work_pool_name}: " + ("created (type process)" if created else "already there")))
        if the_plan.deploy_needed:
            try:
                deployment_id = deploy_flow(settings, d)
            except DeployError as exc:
                ctx.record_failure(DEPLOYED.failed(exc.cause, exc.fix), exc)
                raise
            verb = "created" if the_plan.live_id is None else "updated"
            checks.append(DEPLOYED.passed(f"{verb} {d.full_name}: {deployment_id}", deployment_id=deployment_id))
        else:
            deployment_id = the_plan.live_id
            checks.append(DEPLOYED.passed(f"no changes: kept {d.full_name} ({deployment_id}) without calling deploy",
                                          deployment_id=deployment_id))
        checks += verification_checks(api, settings, d, deployment_id)
        if the_plan.live_check is not None and the_plan.live_check.status.value == "fail":
            checks.append(the_plan.live_check)
        self.publish(fallback_deployment_id=deployment_id)
        ctx.record_checks(checks)
        return deployment_id

    def worker(self) -> Check:
        """Run the worker the way the profile says (fallback.start_worker), then check that the pool
        has a worker online; a FAIL ends the cell before the Edge Function is switched."""
        ctx, settings = self.ctx, self.settings
        spec = worker_spec(settings, ctx.root)
        api = PrefectApi.from_settings(settings)
        self.publish(worker_command=spec.command)
        if settings.fallback.start_worker:
            check = start_worker(settings, api, spec, settings.fallback.worker_start_timeout_seconds)
            self.publish(worker_pid_file=str(spec.pid_file))
            return ctx.record_checks([check]).checks[0]
        target = ctx.run_dir / SERVICE_DIR
        files = write_service_files(settings, spec, target)
        self.publish(service_files=[str(p) for p in files])
        print(f"Run the worker on an always-on host with the flow's packages installed:\n"
              f"  PREFECT_API_URL={settings.value('prefect.api_url')} PREFECT_API_KEY=<your key> {spec.command}\n"
              f"or deploy the service definition written to {target}: {', '.join(p.name for p in files)}")
        online = online_workers(api, spec.pool)
        if online:
            check = WORKER.passed(f"online on {spec.pool}: {', '.join(w.name for w in online)}; service definition in "
                                  f"{target}")
        else:
            check = WORKER.failed(
                f"no worker is online on {spec.pool}: the Edge Function is NOT switched to a pool nobody serves",
                f"start the worker on its host (`{spec.command}` with PREFECT_API_URL and PREFECT_API_KEY set, or the "
                f"Procfile / Dockerfile in {target}), then re-run this step",
            )
        return ctx.record_checks([check]).checks[0]

    def stop(self, enabled: Any = True) -> Check | None:
        """Stop the worker the runbook started, when asked (`stop_worker`)."""
        ctx = self.ctx
        with self.failing():
            enabled = parse_flag("stop_worker", enabled)
        if not enabled:
            print(f"The worker keeps serving {self.settings.fallback.work_pool} (stop_worker = False).")
            return None
        check = stop_worker(self.settings, worker_spec(self.settings, ctx.root))
        print(f"{check.title}: {check.detail}. While the Edge Function points at the fallback deployment, its runs "
              "wait for a worker: switch back (below) or start the worker again.")
        ctx.results.add_checks(CheckReport(step=ctx.name, checks=[check]))
        ctx.save()
        return check

    def managed_deployment_id(self) -> tuple[str | None, str]:
        """The managed deployment's id: step 03's output in this run directory, else looked up by name."""
        try:
            deployment_id = self.ctx.output_of(DeployOutput).deployment_id
            if deployment_id:
                return deployment_id, f"step {DeployOutput.STEP}'s results"
        except ResultsError:
            pass
        own = self.ctx.output(FallbackOutput)
        name, pool = own.managed_deployment_name, own.managed_work_pool
        found = [d for d in PrefectApi.from_settings(self.settings).read_deployments_named(name) if d.work_pool_name == pool]
        if len(found) == 1:
            return str(found[0].id), f"the deployment {name!r} on {pool}, looked up by name"
        return None, f"{len(found)} deployment(s) named {name!r} on {pool}"

    def switch_back_command(self) -> str:
        """The one command that points the Edge Function back at the managed deployment (step 04 with
        its id). Read-only: it prints the command, it does not run it."""
        deployment_id, source = self.managed_deployment_id()
        shown = deployment_id or "<the managed deployment id: step 03's deployment_id>"
        command = (f"runbook run --profile {self.ctx.profile} --only {EdgeSecretOutput.STEP} "
                   f"-p deployment_id={shown} --confirm")
        self.publish(switch_back_command=command)
        print(f"To switch back to Prefect Managed (deployment id from {source}):\n  {command}\n"
              f"then stop the fallback worker: re-run this notebook with -p stop_worker true, or stop its host.")
        return command
