"""The headless runner: `python -m runbook_lib run` executes the runbook's notebooks in order with
papermill and keeps the records of the run in `outputs/<run-id>/` (see runbook_lib.records.manifest).

- The sequence is every `NN_name.ipynb` of the notebooks directory, in order (other notebooks,
  such as the fallback, run only with `--only`). Each notebook gets the parameters `profile`,
  `run_dir` (where it writes its StepResults), `confirm` (only with --confirm) and the `-p`
  overrides, which are refused when they look secret: papermill writes parameters into the
  output notebook twice.
- Each step runs in its own process (papermill + a kernel started with RUNBOOK_HEADLESS=1, so an
  unconfirmed gate fails closed). The verdict is the runner's own: papermill's exception, the
  process's exit, then the executed notebook (papermill returns normally after `sys.exit(0)`),
  then the step's StepResults. A cell timeout or a dead kernel is a failure, whatever the notebook
  metadata says. A step whose confirmation gate refused its change is `not_confirmed` (headless
  without --confirm) or `rejected` (confirm=False, or Reject), as its StepResults say, and so is
  the run. The run stops at the first step that did not pass; later steps stay `not_run`.
- One run per target at a time (core.locks: the Prefect workspace and the Supabase project, in a
  per-user lock directory, whatever the profile or --outputs-dir; JupyterLab steps take the same
  lock). A lock left by a runner that died is taken over with a note; the run it names is marked
  `interrupted`, its leftover step process is stopped, and its records are scanned for secrets.
- SIGTERM/SIGINT stop the step gracefully and mark the step and the run `killed`: the runner forwards
  the signal to the step's process, which interrupts the kernel (KeyboardInterrupt in the running
  cell: its cleanup runs, e.g. step 05 deletes its test batch) and kills it only after a grace period
  (`interrupt_grace`); a second signal kills at once. After a SIGKILL of the runner the manifest
  still says `running` (it is written at every step start and end); its step process notices and
  interrupts its kernel the same way.
- `--from STEP` resumes a run (the same run directory: `--run-id`, default the profile's latest
  run): the steps before it must have passed and are kept as "passed earlier".
- Before the run ends, whatever the outcome (passed, failed, killed, the runner's own fault), every
  file it wrote is scanned for the secrets it knows (records.scan: every encoded form), with the
  values of the Secret blocks read from Prefect, and so are the interactive run directories
  (`outputs/runs/`) and the notebooks JupyterLab saves in the notebooks directory.

Exit codes: 0 every selected step passed; 1 a step failed, a required change was refused (not
confirmed, rejected) or a secret was found; 2 refused before running (bad option, lock held);
128+signal when killed.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import psutil

from runbook_lib.core import paths as project
from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import RunbookError
from runbook_lib.core.locks import HELD_BY_ENV
from runbook_lib.core.profiles import available_profiles, load_settings
from runbook_lib.core.settings import DEFAULT_PROFILE, SANDBOX_ENV_FILE, SECRET_SETTINGS, SETTING_ENV
from runbook_lib.notebook.gate import HEADLESS_ENV
from runbook_lib.records.manifest import Attempt, RunManifest, SecretScan, StepRecord, runs_of
from runbook_lib.records.results import ATTEMPT_ENV, REFUSED, StepResults, list_results
from runbook_lib.records.scan import scan_for_secrets
from runbook_lib.runner.index import render_index, render_notebook_html, warm_html_exporter
from runbook_lib.runner.lock import RunLock, _read_json, _same_process, kill_tree
from runbook_lib.runner.params import STEP_FILE, RunRefused, Step, check_params, discover_steps, find_step
from runbook_lib.runner.progress import Progress
from runbook_lib.core.startup import (
    lower_this_threads_priority,
    no_collections_while_importing,
    skip_exit_collections,
    without_iri_formats,
)
from runbook_lib.runner.step_process import DEFAULT_INTERRUPT_GRACE

DEFAULT_CELL_TIMEOUT = 3600.0
EXIT_PASSED, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str  # passed | failed | rejected | not_confirmed | killed
    exit_code: int
    manifest: RunManifest

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / "manifest.json"


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- the run -------------------------------------------------------------------------------------


def _git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"root": str(root), "commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("prefect", "papermill", "nbclient", "ipykernel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _default_run_id(profile: str, outputs_dir: Path) -> str:
    base = f"{now():%Y%m%d-%H%M%S}-{profile}"
    candidate, n = base, 1
    while (outputs_dir / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


SECRET_VARIABLES = sorted(SETTING_ENV[path] for path in SECRET_SETTINGS)


def _secret_variable_sources(environ: Mapping[str, str]) -> list[tuple[str, Mapping[str, str]]]:
    from dotenv import dotenv_values

    sources: list[tuple[str, Mapping[str, str]]] = [("environment", environ)]
    for label, path in ((".env", project.project_root() / ".env"),
                        ("sandbox.env", project.default_sandbox_dir(dict(environ)) / SANDBOX_ENV_FILE)):
        if path.is_file():
            sources.append((label, {k: v for k, v in dotenv_values(path).items() if v}))
    return sources


def _warm_up(notebook: Path | None) -> None:
    """What the runner needs after the first step (the notebooks' HTML, its templates compiled on
    `notebook`, Prefect's client for the secret scan), imported in a thread while the first step
    runs; a failure is met again, and reported, where the module is used. The thread runs at a lower
    priority: the step's kernel, starting at the same time, is what the run waits for; and without cyclic
    collections, as a kernel imports: what it loads lives as long as the runner, so it is frozen after
    (1.8 -> 1.6 s of CPU, medians of 5, and ~250,000 objects fewer for each full collection of the run
    to scan, ~0.1 s each)."""
    lower_this_threads_priority()
    try:
        with no_collections_while_importing(freeze=True):
            warm_html_exporter(notebook)
            import prefect.client.orchestration  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


class _Background(threading.Thread):
    """Records' work done while something else runs (a step's HTML, the Secret blocks' read); `result()`
    waits for it and raises what it raised."""

    def __init__(self, name: str, work: Any):
        super().__init__(name=name, daemon=True)
        self.work, self.value, self.error = work, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.work()
        except BaseException as exc:  # noqa: BLE001 - raised again in the thread that waits for it
            self.error = exc

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _latest_run(outputs_dir: Path, profile: str) -> str | None:
    runs = runs_of(outputs_dir, profile)
    return runs[0][0].run_id if runs else None


class _StepProcess:
    """A step's process (runbook_lib.runner.step_process), its stderr kept for the verdict. A
    prewarmed one starts its kernel at once and runs the notebook only on `go()`."""

    def __init__(self, step: Step, spec: dict[str, Any], env: Mapping[str, str]):
        self.step = step
        self.prewarm = bool(spec.get("prewarm"))
        self.attempt = env[ATTEMPT_ENV]  # in the results its notebook writes
        # A session of its own: a Ctrl-C in the terminal reaches the runner only, which stops the step.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runbook_lib.runner.step_process", json.dumps(spec)], env=dict(env),
            stdin=subprocess.PIPE if self.prewarm else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        self.stderr: deque[str] = deque(maxlen=20)
        self.reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)  # type: ignore[arg-type]
        self.reader.start()

    def go(self) -> bool:
        """Hand the prewarmed process its notebook; False when it is gone (it cannot run it)."""
        if self.proc.poll() is not None:
            return False
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        """Tell an unused prewarmed process it is not needed (its stdin closed): it stops its kernel."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def abandon(self, grace: float = 10.0) -> None:
        """Stop an unused prewarmed process: its stdin closed, it stops its kernel; killed after `grace`."""
        self.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                kill_tree(psutil.Process(self.proc.pid))
            except psutil.Error:
                pass
            self.proc.wait()
        self.reader.join(timeout=5)


class _Runner:
    """One invocation: owns the lock, the manifest and the step processes."""

    def __init__(self, *, profile: str, confirm: bool, from_step: str | None, only: str | None,
                 run_id: str | None, params: Mapping[str, Any], notebooks_dir: Path, outputs_dir: Path,
                 cell_timeout: float | None, kernel_name: str | None, environ: Mapping[str, str], stream: Any,
                 interrupt_grace: float = DEFAULT_INTERRUPT_GRACE):
        self.profile, self.confirm, self.from_step, self.only = profile, confirm, from_step, only
        self.params = dict(params)
        self.notebooks_dir, self.outputs_dir = notebooks_dir, outputs_dir
        self.cell_timeout, self.kernel_name = cell_timeout, kernel_name
        self.environ = dict(environ)
        self.requested_run_id = run_id
        self.stream = stream
        self.killed_by: int | None = None
        self.interrupt_grace = interrupt_grace
        self.kill_now = False  # a second SIGTERM/SIGINT: no grace
        self.worker: psutil.Process | None = None
        self.notes: list[str] = []
        self.settings: Any = None
        self.scanned = False
        self.exiting: list[_StepProcess] = []  # gave their verdict, stopping their kernel
        self.first: _StepProcess | None = None  # the first step's process, prewarmed while the run starts
        self.rendering: list[_Background] = []  # steps' HTML rendered while the run goes on; done before the scan

    # -- preparation: everything that can refuse happens before anything is written ---------------
    def prepare(self) -> None:
        if self.profile not in available_profiles():
            raise RunRefused(f"unknown profile {self.profile!r}; profiles: {', '.join(available_profiles())}")
        if self.from_step and self.only:
            raise RunRefused("--from and --only cannot be combined")
        if self.cell_timeout is not None and not (math.isfinite(self.cell_timeout) and self.cell_timeout > 0):
            raise RunRefused(f"--cell-timeout {self.cell_timeout}: must be a finite positive number of seconds")
        if not self.notebooks_dir.is_dir():
            raise RunRefused(f"notebooks directory {self.notebooks_dir} does not exist")
        self.secrets = self._known_secrets()
        check_params(self.params, self.secrets)
        self.steps = discover_steps(self.notebooks_dir)
        if not self.steps and not self.only:
            raise RunRefused(f"no notebooks named NN_name.ipynb in {self.notebooks_dir}")
        if self.only:
            outside = self.notebooks_dir / f"{self.only.removesuffix('.ipynb')}.ipynb"
            if outside.is_file() and not STEP_FILE.match(outside.name):  # e.g. the fallback notebook
                self.steps.append(Step(outside.stem, outside))
            self.selected = [find_step(self.steps, self.only, "--only")]
        elif self.from_step:
            self.selected = list(range(find_step(self.steps, self.from_step, "--from"), len(self.steps)))
        else:
            self.selected = list(range(len(self.steps)))

        run_id = self.requested_run_id
        if run_id is None and self.from_step:
            run_id = _latest_run(self.outputs_dir, self.profile)
            if run_id is None:
                raise RunRefused(f"--from {self.from_step}: no earlier run of profile {self.profile!r} in {self.outputs_dir} to resume")
            self.notes.append(f"resuming the latest run of profile {self.profile!r}: {run_id}")
        if run_id is not None and not _RUN_ID.match(run_id):
            raise RunRefused(f"--run-id {run_id!r}: letters, digits, '_', '-', '.' only")
        self.run_id = run_id or _default_run_id(self.profile, self.outputs_dir)
        self.run_dir = self.outputs_dir / self.run_id
        existing = (self.run_dir / "manifest.json").is_file()
        if existing and not (self.from_step or self.only):
            raise RunRefused(f"run {self.run_id} already exists in {self.outputs_dir}: resume it with --from STEP, "
                             "re-run one step with --only STEP, or choose another --run-id")
        if self.from_step and not existing:
            raise RunRefused(f"--from {self.from_step}: there is no run {self.run_id} in {self.outputs_dir} to resume")
        if existing:
            earlier = RunManifest.load(self.run_dir)
            if earlier.profile != self.profile:
                raise RunRefused(f"run {self.run_id} was a {earlier.profile!r} run, not {self.profile!r}")
            before = {s.step: s.status for s in earlier.steps}
            for step in self.steps[: self.selected[0]] if self.from_step else []:
                if before.get(step.name) != "passed":
                    raise RunRefused(f"cannot resume run {self.run_id} from {self.steps[self.selected[0]].name}: step "
                                     f"{step.name} did not pass earlier ({before.get(step.name, 'not in that run')}); "
                                     "resume from it instead")

    def _known_secrets(self) -> dict[str, str]:
        """Every secret value known here, by name, for the -p check, redaction and the secret scan: the
        profile's settings, plus any secret variable set in the environment, `.env` or the sandbox's
        sandbox.env under another value (the scan adds the Secret blocks' live values at the end).
        Settings that do not load refuse the run (RunRefused): nothing is written or changed."""
        secrets: dict[str, str] = {}
        try:
            self.settings = load_settings(self.profile, environ=self.environ)
        except RunbookError as exc:  # bad input: refused before anything is written or changed
            raise RunRefused(f"{exc}\nnothing was run or changed") from None
        secrets.update(self.settings.secret_values())
        for source, values in _secret_variable_sources(self.environ):
            for name in SECRET_VARIABLES:
                value = values.get(name)
                found = {name: value} if value else {}
                if name == "DATABASE_URL" and value and urlsplit(value).password:
                    found["DATABASE_PASSWORD"] = unquote(urlsplit(value).password or "")
                for label, v in found.items():
                    if v not in secrets.values():
                        secrets[f"{label} ({source})"] = v
        for label, value in secrets.items():
            redaction.register_secret(value, label)
        return secrets

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        lock = RunLock(self.settings, self.profile, self.environ)
        lock.acquire(self.run_id, run_dir=str(self.run_dir))
        self.lock = lock
        self.manifest: RunManifest | None = None
        try:
            if self.selected:  # its kernel starts while the records are prepared
                self.first = self._spawn(self.steps[self.selected[0]], prewarm=True)
            first = self.steps[self.selected[0]].notebook if self.selected else None
            threading.Thread(target=_warm_up, args=(first,), name="runbook-warm-up", daemon=True).start()
            self._take_over(lock.previous)
            self.manifest = self._start_manifest()
            self.save()
            with Progress(self.steps, self.stream) as progress:
                self.progress = progress
                for note in self.notes:
                    progress.note(f"note: {note}")
                progress.note(f"run {self.run_id} (profile {self.profile}) -> {self.run_dir}")
                self._run_steps()
            return self._finish()
        except BaseException as exc:  # a fault of the runner itself: the record says so
            if self.worker is not None:
                kill_tree(self.worker)
            if self.manifest is not None and self.manifest.status == "running":
                self.manifest.status, self.manifest.ended_at = "failed", now()
                self.manifest.error = f"the runner failed: {type(exc).__name__}: {exc}"
                self.save()
            raise
        finally:
            if self.first is not None:  # never handed its notebook (the run failed before)
                self.first.abandon()
            self._reap()
            try:
                self._rendered()
            except BaseException:  # noqa: BLE001 - noted on the step (see _render_html); the scan goes on
                pass
            try:
                if self.manifest is not None and not self.scanned:  # the runner's own fault: scan all the same
                    self._scan(self.manifest)
                    self.save()
                    render_index(self.manifest, self.run_dir)
                    self._rescan_final_records()
            finally:
                lock.release()

    def _take_over(self, previous: Mapping[str, Any]) -> None:
        """The lock file was left by a runner that died: say so, stop its step process, and mark
        its run interrupted."""
        if not previous.get("run_id"):
            if previous.get("run_dir") and Path(previous["run_dir"]).is_dir():  # a JupyterLab kernel that died
                self._scan_taken_over(Path(previous["run_dir"]), f"step {previous.get('step', '?')} (interactive)")
            return
        alive = _same_process(previous.get("pid"), previous.get("create_time")) is not None
        self.notes.append(
            f"took over the lock of {self.lock.target} left by run {previous['run_id']} "
            f"(pid {previous.get('pid')}, {'alive but not holding it' if alive else 'no longer running'})"
        )
        leftover = _same_process(previous.get("worker_pid"), previous.get("worker_create_time"))
        if leftover is not None:
            kill_tree(leftover)
            self.notes.append(f"stopped the leftover step process {leftover.pid} of run {previous['run_id']}")
        run_dir = Path(previous.get("run_dir") or self.outputs_dir / str(previous["run_id"]))
        if _RUN_ID.match(str(previous["run_id"])) and (run_dir / "manifest.json").is_file():
            self._mark_interrupted(run_dir, f"the runner (pid {previous.get('pid')}) stopped without finishing; "
                                            f"found by run {self.run_id} at {now().isoformat()}")
        if run_dir.is_dir():  # a killed run never scanned its records: scan them now, and say so in its manifest
            found = self._scan_taken_over(run_dir, f"run {previous['run_id']}")
            try:
                m = RunManifest.load(run_dir)
            except RunbookError:
                return
            if m.secret_scan is None:
                m.secret_scan = found
                m.save(run_dir)
                render_index(m, run_dir)

    def _scan_taken_over(self, run_dir: Path, what: str) -> SecretScan:
        found = scan_for_secrets(run_dir, self.secrets)
        self.notes.append(f"scanned the records of {what} in {run_dir} ({found.scanned_files} files): "
                          + ("; ".join(f"{f.file} contained the value of {f.secret} (masked)" for f in found.findings)
                             or "no secret found"))
        self.takeover_findings = [f"{run_dir.name}/{f.file}" for f in found.findings]
        return found

    @staticmethod
    def _mark_interrupted(run_dir: Path, why: str) -> None:
        try:
            m = RunManifest.load(run_dir)
        except RunbookError:
            return
        if m.status != "running":
            return
        m.status = "interrupted"
        m.notes.append(f"interrupted: {why}")
        for s in m.steps:
            if s.status == "running":
                s.status, s.pid = "interrupted", None
                s.notes.append("the step was running when the runner stopped; its outcome is unknown")
        for a in m.attempts:
            if a.status == "running":
                a.status = "interrupted"
        m.save(run_dir)
        render_index(m, run_dir)

    def _start_manifest(self) -> RunManifest:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        attempt = Attempt(started_at=now(), from_step=self.from_step, only=self.only, confirm=self.confirm,
                          params=self.params, runner_pid=os.getpid())
        fresh = {s.name: StepRecord(step=s.name, notebook=str(s.notebook)) for s in self.steps}
        common = dict(confirm=self.confirm, params=self.params, from_step=self.from_step, only=self.only,
                      cell_timeout_seconds=self.cell_timeout, runbook=_git_state(project.project_root()),
                      host=socket.gethostname(), user=getpass.getuser(), versions=_versions(), runner_pid=os.getpid())
        if (self.run_dir / "manifest.json").is_file():
            self._mark_interrupted(self.run_dir, f"found unfinished when run {self.run_id} was resumed")
            m = RunManifest.load(self.run_dir)
            before = {s.step: s for s in m.steps}
            for i, step in enumerate(self.steps):
                old = before.get(step.name)
                if i not in self.selected and old is not None:
                    fresh[step.name] = old.model_copy(update={"earlier": old.earlier or old.status == "passed"})
            m = m.model_copy(update=dict(common, status="running", ended_at=None, duration_seconds=None,
                                         error=None, secret_scan=None, steps=list(fresh.values()),
                                         attempts=m.attempts + [attempt], notes=m.notes + self.notes))
            return m
        return RunManifest(run_id=self.run_id, profile=self.profile, started_at=attempt.started_at,
                           steps=list(fresh.values()), attempts=[attempt], notes=list(self.notes), **common)

    def save(self) -> None:
        self.manifest.save(self.run_dir)

    def _run_steps(self) -> None:
        """The selected steps in order. While one runs, the next one's process is started and its
        kernel warmed (step_process: started, imports done, waiting for `go`); it is handed the
        notebook when its turn comes, or stopped unused when the run ends before."""
        due = [i for i in range(len(self.steps)) if i in self.selected]
        warm, self.first = self.first, None
        try:
            for i, step in enumerate(self.steps):
                if i not in self.selected or self.killed_by is not None or self.manifest.error:
                    self.progress.skipped(step, self.manifest.step(step.name))  # stays as it was: not_run, or earlier
                    continue
                later = [j for j in due if j > i]
                record, warm = self._run_step(step, warm, self.steps[later[0]] if later else None)
                if record.status != "passed":
                    self.manifest.error = f"step {step.name} {record.status}: {record.error_type or ''} {record.error or ''}".strip()
        finally:
            if warm is not None:  # never handed its notebook: it stops its kernel while the records are finished
                warm.close()
                self.exiting.append(warm)

    def _reap(self) -> None:
        """Wait for the step processes that gave their verdict and were stopping their kernels."""
        while self.exiting:
            self.exiting.pop().abandon(grace=self.interrupt_grace)

    def _step_spec(self, step: Step) -> tuple[dict[str, Any], dict[str, str]]:
        work = self.run_dir / ".runner"
        parameters: dict[str, Any] = {"profile": self.profile, "run_dir": str(self.run_dir), **self.params}
        if self.confirm:
            parameters["confirm"] = True
        spec = {"input": str(step.notebook), "output": str(self.run_dir / step.notebook.name),
                "cwd": str(step.notebook.parent), "parameters": parameters, "kernel_name": self.kernel_name,
                "execution_timeout": self.cell_timeout, "result": str(work / f"{step.name}.result.json"),
                "interrupt_grace": self.interrupt_grace}
        env = dict(self.environ)
        env[HEADLESS_ENV] = "1"
        env[HELD_BY_ENV] = str(os.getpid())  # the step's start_step does not take the target's lock again
        env[ATTEMPT_ENV] = f"{self.run_id}/{step.name}/{uuid.uuid4().hex[:12]}"  # this process's, not the step's
        root = str(project.project_root())
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root])
        return spec, env

    def _spawn(self, step: Step, prewarm: bool) -> "_StepProcess":
        spec, env = self._step_spec(step)
        return _StepProcess(step, dict(spec, prewarm=prewarm), env)

    def _run_step(self, step: Step, warm: "_StepProcess | None" = None,
                  following: Step | None = None) -> tuple[StepRecord, "_StepProcess | None"]:
        """Run `step` (in `warm`, its prewarmed process, when it is one); start `following`'s process
        once this one has its notebook. Returns the record and the process prewarmed for `following`."""
        work = self.run_dir / ".runner"
        work.mkdir(exist_ok=True)
        result_path = work / f"{step.name}.result.json"
        result_path.unlink(missing_ok=True)
        output = self.run_dir / step.notebook.name

        record = StepRecord(step=step.name, notebook=str(step.notebook), status="running", started_at=now(),
                            output=output.name)
        self.manifest.steps = [record if s.step == step.name else s for s in self.manifest.steps]
        started = time.monotonic()
        if warm is not None and (warm.step.name != step.name or not warm.go()):
            warm.abandon()  # not this step's, or it died before its turn: a cold start
            warm = None
        handle = warm or self._spawn(step, prewarm=False)
        proc = handle.proc
        self.worker = psutil.Process(proc.pid)
        record.pid = proc.pid
        self.lock.update(worker_pid=proc.pid, worker_create_time=self.worker.create_time())
        self.save()
        self.progress.started(step)
        nxt = self._spawn(following, prewarm=True) if following is not None else None
        forwarded: float | None = None
        exit_code: int | None = None
        while (exit_code := proc.poll()) is None:
            if self.killed_by is not None and forwarded is None:
                forwarded = time.monotonic()  # the step process interrupts its kernel, then kills it after the grace
                proc.send_signal(self.killed_by)
            if self.kill_now or (forwarded is not None and time.monotonic() - forwarded > self.interrupt_grace + 15):
                kill_tree(self.worker)
                break
            if self.killed_by is None and handle.prewarm and result_path.is_file():
                # The verdict is written (the notebook too): the process is stopping its kernel, the
                # run goes on; it is waited for before the run ends.
                exit_code = 0 if _read_json(result_path).get("ok") else 1
                self.exiting.append(handle)
                break
            time.sleep(0.05)
        if exit_code is None or handle not in self.exiting:
            exit_code = proc.wait()
            handle.reader.join(timeout=5)
        self.worker = None
        self.lock.update(worker_pid=None, worker_create_time=None)

        record.pid = None
        record.ended_at = now()
        record.duration_seconds = round(time.monotonic() - started, 3)
        self._judge(record, exit_code, result_path, output, handle.stderr)
        self._collect_results(record, handle.attempt)
        if output.is_file():  # rendered while the run goes on (the next step, the records' end)
            self.rendering.append(_Background(f"runbook-html-{step.name}", lambda: self._render_html(record, output)))
        shutil.rmtree(work, ignore_errors=True)
        self.save()
        render_index(self.manifest, self.run_dir)
        self.progress.finished(step, record)
        return record, nxt

    def _render_html(self, record: StepRecord, output: Path) -> None:
        try:
            record.html = render_notebook_html(output, self.run_dir / f"{record.step}.html").name
        except Exception as exc:  # a half-written notebook of a killed step: keep the .ipynb
            record.notes.append(f"could not render HTML: {type(exc).__name__}: {exc}")

    def _rendered(self) -> None:
        """Wait for the steps' HTML being rendered (each has its file, or a note saying why not)."""
        pending, self.rendering = self.rendering, []
        for work in pending:
            work.join()
        for work in pending:
            work.result()

    def _judge(self, record: StepRecord, exit_code: int, result_path: Path, output: Path, stderr: Sequence[str]) -> None:
        """The step's verdict: killed by us, papermill's exception, the process's exit, the executed notebook."""
        if self.killed_by is not None:
            record.status, record.error_type = "killed", "Killed"
            how = ("killed at once (a second signal)" if self.kill_now else
                   f"interrupted (KeyboardInterrupt in the running cell, {self.interrupt_grace:g}s grace), then stopped")
            record.error = f"the runner received {signal.Signals(self.killed_by).name}: the step's kernel was {how}"
            return
        result = _read_json(result_path)
        if isinstance(result.get("phases"), dict) and record.started_at is not None:
            began = record.started_at.timestamp()
            record.phases = {k: round(v - began, 3) for k, v in result["phases"].items() if isinstance(v, (int, float))}
        if result.get("error_type"):
            record.status, record.error_type, record.error = "failed", result["error_type"], result.get("error")
            return
        if exit_code != 0 or not result:
            how = f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
            tail = " ".join(line.strip() for line in list(stderr)[-5:])
            record.status, record.error_type = "failed", "StepProcessDied"
            record.error = f"the step's process ended with {how} without a verdict" + (f": {tail}" if tail else "")
            return
        error = notebook_error(output)
        if error:
            record.status, (record.error_type, record.error) = "failed", error
            return
        record.status = "passed"

    def _collect_results(self, record: StepRecord, attempt: str) -> None:
        """The StepResults the notebook wrote in this step's process (their `attempt` is the one the
        runner gave that process; never by time: a step before may end within the same millisecond, a
        clock may be set back): values, gate, checks; a result that says failed fails the step even
        when the notebook ran to the end, and one whose gate refused the change makes the step
        `rejected` / `not_confirmed` (unless it was killed)."""
        for res in list_results(self.run_dir):
            if res.attempt != attempt:
                continue
            record.result_files.append(StepResults.path(self.run_dir, res.step).name)
            record.results.update(res.values)
            if res.gate is not None:
                record.gate = res.gate.model_dump(mode="json")
            record.checks += [{"step": res.step, "id": c.id, "title": c.title, "status": c.status.value} for c in res.checks]
            if res.status in REFUSED and record.status in ("passed", "failed"):
                if record.error_type not in (None, "NotConfirmed"):  # it failed after the refusal
                    record.notes.append(f"after the refusal, the notebook failed: {record.error_type}: {record.error}")
                if record.error_type != "NotConfirmed":
                    record.error_type, record.error = "NotConfirmed", res.error
                record.status = res.status
            elif res.status == "failed" and record.status == "passed":
                record.status, record.error_type, record.error = "failed", "StepFailed", res.error
            elif res.status == "running" and record.status == "passed":
                record.notes.append(f"results {res.step!r} were never finished (the notebook did not call ctx.finish())")
        if not record.result_files and record.status == "passed":
            record.notes.append("the notebook recorded no step results")

    def _finish(self) -> RunOutcome:
        m = self.manifest
        ran = [m.steps[i] for i in self.selected]
        if self.killed_by is not None:
            status = "killed"
            m.error = f"killed by {signal.Signals(self.killed_by).name}"
        else:
            stopped = next((s for s in ran if s.status != "passed"), None)  # the run stops at the first
            if stopped is None:
                status = "passed"
            else:  # a refused change says so (rejected / not_confirmed); anything else is a failure
                status = stopped.status if stopped.status in REFUSED else "failed"
        # The records' work in flight is finished at the same time: the Secret blocks' values read
        # from Prefect while the step processes stop their kernels and the steps' HTML is rendered.
        # Then the secret scan sees every file this run wrote, before the final records are saved
        # (those are written redacted).
        blocks = _Background("runbook-secret-blocks", lambda: self._secret_block_values(m))
        self._reap()
        self._rendered()
        if self._scan(m, blocks.result()) and status == "passed":
            status = "failed"
        m.status = status
        m.ended_at = now()
        m.duration_seconds = round((m.ended_at - m.attempts[-1].started_at).total_seconds(), 3)
        m.attempts[-1].status, m.attempts[-1].ended_at = status, m.ended_at
        self.save()
        render_index(m, self.run_dir)
        self._rescan_final_records()
        code = {"passed": EXIT_PASSED, "failed": EXIT_FAILED, "rejected": EXIT_FAILED,
                "not_confirmed": EXIT_FAILED}.get(status, 128 + (self.killed_by or 0))
        for step in m.steps:
            timeline = step.results.get("timeline")
            if isinstance(timeline, dict) and timeline:
                self.progress.note(format_timeline(step.step, timeline))
        self.progress.note(f"run {self.run_id}: {status}" + (f" ({m.error})" if m.error else "")
                           + f"; records in {self.run_dir / 'index.html'}")
        return RunOutcome(self.run_id, self.run_dir, status, code, m)

    def _scan(self, m: RunManifest, blocks: Mapping[str, str] | None = None) -> bool:
        """The secret scan (see the module doc), with the Secret blocks' values (`blocks`, read now
        when not given); True when a secret was found (and masked)."""
        self.scanned = True
        secrets = dict(self.secrets)
        for label, value in (self._secret_block_values(m) if blocks is None else blocks).items():
            if value not in secrets.values():
                secrets[label] = value
                redaction.register_secret(value, label)
        self._scan_secrets = secrets
        root = project.project_root()
        places = [root / "outputs" / "runs", self.outputs_dir / "runs"]
        places += sorted(self.notebooks_dir.glob("*.ipynb")) + [self.notebooks_dir / ".ipynb_checkpoints"]
        m.secret_scan = scan_for_secrets(self.run_dir, secrets, also=places, relative_to=root)
        found = [f"{f.file} contained the value of {f.secret}" for f in m.secret_scan.findings]
        found += [f"{f} (a run taken over)" for f in getattr(self, "takeover_findings", [])]
        if found:
            listing = "; ".join(found)
            m.error = (m.error + "; " if m.error else "") + f"secret scan: {listing} (masked in place)"
            if getattr(self, "progress", None) is not None:
                self.progress.note(f"SECRET FOUND: {listing}; the values were masked in those files")
        return bool(found)

    def _rescan_final_records(self) -> None:
        """The manifest and index written after the scan quote errors (a step's exception text): they are
        masked in place by the same scan (a credential known by its shape only is no registered secret)."""
        scan_for_secrets(self.run_dir, self._scan_secrets, also=(), relative_to=None)

    def _secret_block_values(self, m: RunManifest) -> dict[str, str]:
        """The values every Secret block of the workspace holds in Prefect (they may differ from the
        environment's, and a block may hold a secret the settings never name), by label; a failed read
        is noted in the manifest, never fatal."""
        settings = self.settings
        if settings is None or not settings.prefect.api_url or settings.prefect.api_key is None:
            return {}
        from runbook_lib.systems.prefect import PrefectApi

        values: dict[str, str] = {}
        try:
            api = PrefectApi.from_settings(settings, timeout=5.0, call_timeout=15.0)
            docs = api.call("reading the Secret blocks' values for the secret scan",
                            lambda c: c.read_block_documents_by_type("secret", limit=200, include_secrets=True))
        except Exception as exc:  # noqa: BLE001 - the scan goes on with the values it knows
            m.notes.append(f"the secret scan could not read the Secret blocks' values from Prefect "
                           f"({redaction.redact(str(exc))[:300]}); it used the values of the settings")
            return {}
        for doc in docs:
            value = (doc.data or {}).get("value")
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            if not isinstance(value, str) or len(value) < redaction.MIN_SECRET_LENGTH:
                continue
            values[f"secret block {doc.name}"] = value
            if "://" in value and urlsplit(value).password:
                values[f"secret block {doc.name} (password)"] = unquote(urlsplit(value).password)
        return values

    def on_signal(self, signum: int, _frame: Any) -> None:
        """SIGTERM/SIGINT: the step loop forwards it to the step's process (a graceful interrupt of the
        kernel) and records the kill; a second one kills the step at once."""
        if self.killed_by is not None:
            self.kill_now = True
        self.killed_by = signum


def format_timeline(step: str, timeline: Mapping[str, Any]) -> str:
    """A step's timeline (event -> ms from the launch) as aligned lines, in time order."""
    events = sorted(((k, v) for k, v in timeline.items() if isinstance(v, (int, float))), key=lambda kv: kv[1])
    width = max((len(k) for k, _ in events), default=0)
    lines = [f"timeline of {step} (ms from launch):"]
    lines += [f"  {name.replace('_', ' '):<{width}}  {ms:>10,.1f}" for name, ms in events]
    return "\n".join(lines)


def notebook_error(path: Path) -> tuple[str, str] | None:
    """The first error in an executed notebook (papermill returns normally after `sys.exit(0)`),
    or a cell left unexecuted; None when every cell completed cleanly."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        return "UnreadableNotebook", f"the executed notebook {path.name} cannot be read: {exc}"
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                name, value = out.get("ename", "Error"), out.get("evalue", "")
                if name == "SystemExit":
                    return name, f"the notebook called sys.exit({value}); the cells after it did not run"
                return name, value
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.metadata.get("papermill", {}).get("status") not in (None, "completed"):
            return "NotExecuted", f"cell {nb.cells.index(cell)} was left {cell.metadata['papermill']['status']}"
    if nb.metadata.get("papermill", {}).get("exception"):
        return "PapermillException", "papermill recorded an exception in the notebook"
    return None


def run_runbook(
    profile: str = DEFAULT_PROFILE,
    confirm: bool = False,
    from_step: str | None = None,
    only: str | None = None,
    run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    notebooks_dir: Path | str | None = None,
    outputs_dir: Path | str | None = None,
    *,
    cell_timeout: float | None = DEFAULT_CELL_TIMEOUT,
    kernel_name: str | None = None,
    environ: Mapping[str, str] | None = None,
    stream: Any = None,
    handle_signals: bool = True,
    interrupt_grace: float = DEFAULT_INTERRUPT_GRACE,
) -> RunOutcome:
    """Run the runbook's notebooks (see the module doc). Raises RunRefused, before writing anything,
    when the run cannot start. `environ` adds environment variables for the notebooks and the
    settings (e.g. RUNBOOK_SANDBOX_DIR). SIGTERM/SIGINT are handled when called from the main thread."""
    root = project.project_root()
    without_iri_formats()
    skip_exit_collections()
    runner = _Runner(
        profile=profile, confirm=confirm, from_step=from_step, only=only, run_id=run_id, params=params or {},
        notebooks_dir=Path(notebooks_dir or root / "notebooks").resolve(),
        outputs_dir=Path(outputs_dir or root / "outputs").resolve(),
        cell_timeout=cell_timeout, kernel_name=kernel_name, environ=dict(os.environ, **(environ or {})), stream=stream,
        interrupt_grace=interrupt_grace,
    )
    runner.prepare()
    previous: dict[int, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, runner.on_signal)
    try:
        return runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


