"""The runner (`python -m runbook_lib run`) on small notebooks generated here: real papermill, real
kernels, the real CLI in a subprocess, real signals. The notebooks read their settings from a
small sandbox.env written in a temp dir (settings only: no service is involved)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.runner.params import RunRefused, check_params, parse_param_args
from runbook_lib.runner.run import run_runbook
from tests.conftest import kernel_connection_files

PROJECT_ROOT = Path(__file__).resolve().parents[3]
API_KEY = "pnu_runnertestkey0123456789"
DB_PASSWORD = "runner-db-pw-4567"

START = 'from runbook_lib.notebook.context import start_step\nctx = start_step({name!r}, profile=profile, confirm=confirm, run_dir=run_dir)'
# A typed output as a step declares it (read back by type: the "prepare" step's).
OUTPUT = ("from runbook_lib.records.outputs import StepOutput\n"
          "class Out(StepOutput):\n    STEP = 'prepare'\n"
          "    deployment_id: str | None = None\n    applied: bool | None = None\n    reused: str | None = None\n")
CELLS = {
    "prepare": [START.format(name="prepare"), OUTPUT + "print('PREPARED-OUTPUT', note)\nctx.publish(Out(deployment_id='dep-123'))", "ctx.finish()"],
    "gate": [START.format(name="gate"), "ctx.confirm_plan('apply the plan', {'pool': 'managed-production'})",
             OUTPUT + "ctx.require_approved({'pool': 'managed-production'})\nctx.publish(Out(applied=True))\nctx.finish()"],
    # The same gate, refused by the notebook's own confirm=False (a person's "no").
    "reject": ['from runbook_lib.notebook.context import start_step\n'
               'ctx = start_step("reject", profile=profile, confirm=False, run_dir=run_dir)',
               "ctx.confirm_plan('apply the plan', {'pool': 'managed-production'})",
               OUTPUT + "ctx.require_approved({'pool': 'managed-production'})\nctx.publish(Out(applied=True))\nctx.finish()"],
    "after": [START.format(name="after"), OUTPUT + "ctx.publish(Out(reused=ctx.output_of(Out).deployment_id))\nctx.finish()"],
    "check": [START.format(name="check"),
              "from runbook_lib.checks.base import Check\n"
              "ctx.record_checks([Check.failed('pool.exists', 'Work pool exists', 'no pool managed-production', 'create it')])",
              "ctx.finish()"],
    "timeout": [START.format(name="timeout"), "import time\ntime.sleep(60)", "ctx.finish()"],
    "dead": [START.format(name="dead"), "import os\nos._exit(1)", "ctx.finish()"],
    "exit0": [START.format(name="exit0"), "import sys\nsys.exit(0)", "ctx.finish()"],
    "slow": [START.format(name="slow"), "import time\ntime.sleep(900)", "ctx.finish()"],
    "fast": [START.format(name="fast"), "ctx.finish()"],
    # Writes the API key into its record (bypassing the redaction), then runs until it is killed.
    "leakslow": [START.format(name="leakslow"),
                 "import os, time\nsecret = [l for l in open(os.path.join(os.environ['RUNBOOK_SANDBOX_DIR'], 'sandbox.env'))"
                 " if l.startswith('PREFECT_API_KEY')][0]\nopen(os.path.join(run_dir, 'leak.txt'), 'w').write(secret)\n"
                 "(ctx.run_dir / 'slow.json').write_text('{}')\ntime.sleep(900)", "ctx.finish()"],
    # Bypasses the runbook's redaction: reads the sandbox settings file and prints it raw.
    "leak": ["import os\nprint(open(os.path.join(os.environ['RUNBOOK_SANDBOX_DIR'], 'sandbox.env')).read())"],
}


def make_notebooks(directory: Path, names: list[str]) -> Path:
    """`NN_<kind>.ipynb` for each kind, with a `parameters` cell like the runbook's notebooks."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(names, 1):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell('profile = "sandbox"\nconfirm = None\nrun_dir = None\nnote = "default-note"')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in CELLS[kind]]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, directory / f"{i:02d}_{kind}.ipynb")
    return directory


@pytest.fixture(autouse=True)
def _clean_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


@pytest.fixture
def sbx(tmp_path) -> dict[str, str]:
    """A sandbox.env with settings only (what `sandbox up` writes), and the environment pointing at it."""
    values = {
        "PREFECT_API_URL": "http://127.0.0.1:4201/api/accounts/11111111-1111-4111-8111-111111111111/workspaces/22222222-2222-4222-8222-222222222222",
        "PREFECT_API_KEY": API_KEY,
        "DATABASE_URL": f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:5433/postgres",
        "SUPABASE_API_URL": "http://127.0.0.1:5000",
        "SUPABASE_ACCESS_TOKEN": "sbp_runnertesttoken0123456789",
        "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
        "SUPABASE_FUNCTIONS_URL": "http://127.0.0.1:5000/functions/v1",
        "RUNBOOK_REPO_URL": "http://127.0.0.1:5200/bencrane/data-enrichment-orchestration-v1.git",
        "ENRICHMENT_DISPATCH_URL": "http://127.0.0.1:5100",
    }
    (tmp_path / "sbx").mkdir()
    (tmp_path / "sbx" / "sandbox.env").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return {"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}


def cli(args: list[str], env: dict[str, str], timeout: float = 300, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    cmd = [sys.executable, "-m", "runbook_lib", "run", *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def steps_of(m: dict) -> dict[str, dict]:
    return {s["step"]: s for s in m["steps"]}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_step(run_dir: Path) -> dict | None:
    """The running step once its kernel has started the step (its StepResults exist)."""
    try:
        m = manifest(run_dir)
    except (OSError, ValueError):
        return None
    running = [s for s in m["steps"] if s["status"] == "running"]
    return running[0] if running and (run_dir / "slow.json").is_file() else None


@pytest.mark.timeout(600)
def test_cli_stops_at_the_first_failure_records_everything_and_resumes_with_from(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["prepare", "gate", "after"])
    out = tmp_path / "out"
    args = ["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "r1", "-p", "note=marker-7f3a"]
    first = cli(args, sbx)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "01_prepare: passed" in first.stdout and "02_gate: not_confirmed" in first.stdout  # plain lines, no TTY
    run_dir = out / "r1"
    m = manifest(run_dir)
    steps = steps_of(m)
    assert m["run_id"] == "r1" and m["profile"] == "sandbox" and m["status"] == "not_confirmed"  # refused, not failed
    assert m["started_at"] and m["ended_at"] and m["confirm"] is False and m["params"] == {"note": "marker-7f3a"}
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert m["runbook"]["commit"] == head and isinstance(m["runbook"]["dirty"], bool)
    assert m["host"] and m["user"] and {"python", "prefect", "papermill"} <= set(m["versions"])
    assert [s["step"] for s in m["steps"]] == ["01_prepare", "02_gate", "03_after"]
    assert steps["01_prepare"]["status"] == "passed" and steps["01_prepare"]["results"] == {"deployment_id": "dep-123"}
    assert steps["01_prepare"]["duration_seconds"] > 0 and steps["01_prepare"]["ended_at"]
    gate = steps["02_gate"]
    assert gate["status"] == "not_confirmed" and gate["error_type"] == "NotConfirmed" and "pass -p confirm true" in gate["error"]
    assert gate["gate"]["decision"] == "rejected" and gate["gate"]["mode"] == "headless"
    assert steps["03_after"]["status"] == "not_run" and steps["03_after"]["started_at"] is None
    assert not (run_dir / "03_after.ipynb").exists()

    # HTML: the outputs, not the injected parameters (which the executed notebook does hold).
    html = (run_dir / "01_prepare.html").read_text()
    assert "PREPARED-OUTPUT marker-7f3a" in html
    assert "injected-parameters" in (run_dir / "01_prepare.ipynb").read_text()
    assert "Parameters" not in html and 'note = "marker-7f3a"' not in html and "injected-parameters" not in html
    assert "NotConfirmed" in (run_dir / "02_gate.html").read_text()
    index = (run_dir / "index.html").read_text()
    assert 'href="01_prepare.html"' in index and 'href="02_gate.html"' in index and 'href="manifest.json"' in index
    assert "03_after" in index and m["secret_scan"]["findings"] == []

    # Resume from the gate, confirmed: step 1 is kept (passed earlier) and step 3 reads its results.
    second = cli(["--from", "02", "--confirm", "--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "r1"], sbx)
    assert second.returncode == 0, second.stdout + second.stderr
    m = manifest(run_dir)
    steps = steps_of(m)
    assert m["status"] == "passed" and len(m["attempts"]) == 2 and m["attempts"][1]["from_step"] == "02"
    assert steps["01_prepare"]["status"] == "passed" and steps["01_prepare"]["earlier"] is True
    assert steps["02_gate"]["gate"]["decision"] == "approved" and steps["02_gate"]["results"] == {"applied": True}
    assert steps["03_after"]["status"] == "passed" and steps["03_after"]["results"] == {"reused": "dep-123"}
    assert steps["03_after"]["earlier"] is False

    # The same run id without --from is refused (records are not overwritten).
    again = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "r1"], sbx)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.timeout(600)
def test_a_refused_change_is_recorded_as_such_in_the_results_the_manifest_and_the_exit_code(tmp_path, sbx):
    """Headless without --confirm: the gate's step is `not_confirmed`; a notebook that rejects its own
    plan (confirm=False): `rejected`. Either way the results file, the manifest's step record, the
    run's status and index.html say so, the run stops there and exits non-zero."""
    nbs = make_notebooks(tmp_path / "nb", ["prepare", "gate", "after"])
    out = tmp_path / "out"
    headless = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "unconfirmed"], sbx)
    assert headless.returncode == 1, headless.stdout + headless.stderr
    run_dir = out / "unconfirmed"
    results = json.loads((run_dir / "gate.json").read_text())
    assert results["status"] == "not_confirmed" and results["gate"]["mode"] == "headless"
    assert "pass -p confirm true" in results["error"] and results["finished_at"]
    m = manifest(run_dir)
    steps = steps_of(m)
    assert m["status"] == "not_confirmed" and m["attempts"][-1]["status"] == "not_confirmed"
    assert steps["02_gate"]["status"] == "not_confirmed" and steps["02_gate"]["error_type"] == "NotConfirmed"
    assert steps["01_prepare"]["status"] == "passed" and steps["03_after"]["status"] == "not_run"
    assert "step 02_gate not_confirmed" in m["error"] and "02_gate: not_confirmed" in headless.stdout
    index = (run_dir / "index.html").read_text()
    assert "NOT CONFIRMED" in index and "The run stopped at step 02_gate" in index and "--from 02_gate --confirm" in index

    nbs = make_notebooks(tmp_path / "nb-reject", ["prepare", "reject", "after"])
    outcome = run_runbook("sandbox", run_id="rejected", notebooks_dir=nbs, outputs_dir=out, environ=sbx,
                          handle_signals=False)
    assert (outcome.status, outcome.exit_code) == ("rejected", 1)
    results = json.loads((outcome.run_dir / "reject.json").read_text())
    assert results["status"] == "rejected" and results["gate"]["mode"] == "parameter"
    assert "confirm=False" in results["gate"]["decided_by"] and "nothing was applied" in results["error"]
    assert "applied" not in results["values"]
    m = manifest(outcome.run_dir)
    steps = steps_of(m)
    assert m["status"] == "rejected" and steps["02_reject"]["status"] == "rejected"
    assert steps["02_reject"]["error_type"] == "NotConfirmed" and "rejected" in steps["02_reject"]["error"]
    assert steps["02_reject"]["gate"]["decision"] == "rejected" and steps["03_after"]["status"] == "not_run"
    index = (outcome.run_dir / "index.html").read_text()
    assert "REJECTED" in index and "The run stopped at step 02_reject" in index

    # Confirmed, the same notebooks pass: the refusal was the only thing in the way.
    confirmed = cli(["--confirm", "--notebooks-dir", str(tmp_path / "nb"), "--outputs-dir", str(out), "--run-id", "ok"], sbx)
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert manifest(out / "ok")["status"] == "passed"
    assert json.loads((out / "ok" / "gate.json").read_text())["status"] == "passed"


@pytest.mark.timeout(600)
def test_timeouts_dead_kernels_sys_exit_and_failed_checks_are_failures(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["timeout", "dead", "exit0", "check"])
    out = tmp_path / "out"
    expected = {"01_timeout": "CellTimeoutError", "02_dead": "DeadKernelError", "03_exit0": "SystemExit", "04_check": "ChecksFailed"}
    for step, error_type in expected.items():
        # The 2 s cell timeout is for the step that sleeps; the others get room to start a kernel under load
        # (a 2 s timeout there fails them on their first cell, as a CellTimeoutError, before they show theirs).
        outcome = run_runbook("sandbox", only=step, run_id=f"only-{step}", notebooks_dir=nbs, outputs_dir=out,
                              cell_timeout=2 if step == "01_timeout" else 300, environ=sbx, handle_signals=False)
        record = outcome.manifest.step(step)
        assert (outcome.status, outcome.exit_code) == ("failed", 1), step
        assert (record.status, record.error_type) == ("failed", error_type), (step, record)
        assert all(s.status == "not_run" for s in outcome.manifest.steps if s.step != step)
        assert (outcome.run_dir / f"{step}.html").is_file()
    m = manifest(out / "only-03_exit0")
    assert "sys.exit(0)" in steps_of(m)["03_exit0"]["error"]
    assert "pool.exists" in steps_of(manifest(out / "only-04_check"))["04_check"]["error"]


@pytest.mark.timeout(600)
def test_a_second_run_is_refused_and_sigterm_kills_the_step(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["slow", "fast"])
    out = tmp_path / "out"
    first = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "long"], sbx, background=True)
    try:
        step = wait_for(lambda: running_step(out / "long"), 240, "the slow step to run")
        family = psutil.Process(step["pid"]).children(recursive=True) + [psutil.Process(step["pid"])]
        assert any("ipykernel" in " ".join(p.cmdline()) for p in family)

        second = cli(["--only", "02", "--notebooks-dir", str(nbs), "--outputs-dir", str(out)], sbx)
        assert second.returncode == 2
        assert "another run is changing the same target" in second.stderr
        assert "run long of profile 'sandbox'" in second.stderr
        assert sorted(p.name for p in out.iterdir()) == ["long"]  # the refused run wrote nothing
        # The lock is the target's, not the outputs directory's: another --outputs-dir is refused too.
        elsewhere = cli(["--only", "02", "--notebooks-dir", str(nbs), "--outputs-dir", str(tmp_path / "other")], sbx)
        assert elsewhere.returncode == 2 and "run long of profile 'sandbox'" in elsewhere.stderr
        assert not (tmp_path / "other").exists()

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
    psutil.wait_procs(family, timeout=60)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "kernel left running"
    m = manifest(out / "long")
    steps = steps_of(m)
    assert m["status"] == "killed" and "SIGTERM" in m["error"] and m["ended_at"]
    assert steps["01_slow"]["status"] == "killed" and steps["02_fast"]["status"] == "not_run"
    assert (out / "long" / "01_slow.html").is_file()


@pytest.mark.timeout(600)
def test_after_sigkill_the_manifest_says_running_and_the_next_run_marks_it_interrupted(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["slow", "fast"])
    out = tmp_path / "out"
    first = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "doomed"], sbx, background=True)
    try:
        step = wait_for(lambda: running_step(out / "doomed"), 240, "the slow step to run")
        worker = psutil.Process(step["pid"])
        kernel = [p for p in worker.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]

        def both_kernels() -> list[Path] | None:
            files = kernel_connection_files(psutil.Process(first.pid).children(recursive=True))
            return files if len(files) == 2 else None

        # 01's kernel and 02's, prewarmed while 01 runs: each connection file holds its kernel's signing key.
        connection_files = wait_for(both_kernels, 120, "01's kernel and 02's (prewarmed)")
        assert all(f.exists() for f in connection_files)
        descendants = psutil.Process(first.pid).children(recursive=True)
        first.kill()
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    m = manifest(out / "doomed")
    assert m["status"] == "running" and m["ended_at"] is None and steps_of(m)["01_slow"]["status"] == "running"
    # The orphaned step process notices and takes its kernel down with it.
    gone, alive = psutil.wait_procs([worker] + kernel, timeout=60)
    assert not alive
    # So does 02's prewarmed process; neither leaves a kernel's connection file (its signing key) behind.
    gone, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive
    assert [f for f in connection_files if f.exists()] == []

    nxt = cli(["--only", "fast", "--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "next"], sbx)
    assert nxt.returncode == 0, nxt.stdout + nxt.stderr
    assert "took over the lock of prefect" in nxt.stdout
    notes = manifest(out / "next")["notes"]
    assert any(n.startswith("took over the lock of prefect http://127.0.0.1:4201/api/accounts/") and "left by run doomed" in n
               for n in notes), notes
    m = manifest(out / "doomed")
    assert m["status"] == "interrupted" and steps_of(m)["01_slow"]["status"] == "interrupted"
    assert any("stopped without finishing" in n for n in m["notes"])
    assert any("took over the lock" in n for n in manifest(out / "next")["notes"])


@pytest.mark.timeout(600)
def test_the_secret_scan_fails_a_run_that_wrote_a_secret_and_names_the_file(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["leak"])
    outcome = run_runbook("sandbox", run_id="leaky", notebooks_dir=nbs, outputs_dir=tmp_path / "out",
                          environ=sbx, handle_signals=False)
    assert (outcome.status, outcome.exit_code) == ("failed", 1)
    assert outcome.manifest.step("01_leak").status == "passed"  # the notebook itself ran fine
    found = {(f.file, f.secret) for f in outcome.manifest.secret_scan.findings}
    assert {(f, s.split(" ")[0]) for f, s in found} >= {("01_leak.ipynb", "PREFECT_API_KEY"), ("01_leak.ipynb", "DATABASE_URL")}
    m = manifest(outcome.run_dir)
    assert "01_leak.ipynb contained the value of PREFECT_API_KEY" in m["error"]
    for path in outcome.run_dir.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert API_KEY not in text and DB_PASSWORD not in text, path
    assert "[redacted:PREFECT_API_KEY]" in (outcome.run_dir / "01_leak.ipynb").read_text()


def test_secret_looking_parameters_are_refused_before_anything_runs(tmp_path, sbx):
    known = {"PREFECT_API_KEY": API_KEY, "DATABASE_PASSWORD": DB_PASSWORD}
    refused = {
        "api_key": "x", "github_token": "abc", "db_password": "x", "dsn": "x", "client_secret": "x",
        "note": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.sig", "n2": "pnu_abcdef", "n3": "sbp_0123abc",
        "n4": "ghp_abcdef", "n5": "postgresql://user:pw@db.example.com/postgres", "n6": f"prefix-{DB_PASSWORD}",
        "profile": "production", "confirm": True, "run_dir": "/tmp/x",
    }
    for key, value in refused.items():
        with pytest.raises(RunRefused):
            check_params({key: value}, known)
    check_params({"item_count": 5, "note": "https://example.com/a", "branch": "main"}, known)
    assert parse_param_args(["item_count=5", "flag=true", "name=x=y"]) == {"item_count": 5, "flag": True, "name": "x=y"}

    nbs = make_notebooks(tmp_path / "nb", ["prepare"])
    out = tmp_path / "out"
    for param in (f"note={API_KEY}", "prefect_api_key=abc", f"note=postgres://u:{DB_PASSWORD}@h/db"):
        result = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "-p", param], sbx)
        assert result.returncode == 2 and "refused -p parameter" in result.stderr, result.stderr
        assert API_KEY not in result.stderr + result.stdout and DB_PASSWORD not in result.stderr + result.stdout
    bad_step = cli(["--from", "nope", "--notebooks-dir", str(nbs), "--outputs-dir", str(out)], sbx)
    assert bad_step.returncode == 2 and "no such step" in bad_step.stderr and "01_prepare" in bad_step.stderr
    assert not out.exists()


def test_the_ci_example_runs_production_with_secrets_from_the_secret_store_only():
    import yaml

    from runbook_lib.core.settings import ENV_SETTINGS, SECRET_SETTINGS, SETTING_ENV

    text = (PROJECT_ROOT / "ci-examples" / "runbook-production.yml").read_text()
    job = yaml.safe_load(text)["jobs"]["runbook"]
    step = next(s for s in job["steps"] if "runbook run" in s.get("run", ""))
    assert "--profile production" in step["run"] and "-p " not in step["run"] and "papermill" not in step["run"]
    env = step["env"]
    assert set(env) - {"CONFIRM_FLAG"} <= set(ENV_SETTINGS), "every variable is a setting the profile reads"
    for path in SECRET_SETTINGS - {"source.github_token"}:  # the flow's repository is public
        name = SETTING_ENV[path]
        assert env[name] == "${{ secrets.%s }}" % name, name
    assert text.count("${{ secrets.") == len(SECRET_SETTINGS) - 1, "secrets are used nowhere else"
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "outputs/${{ env.RUN_ID }}/"
    assert '--run-id "$RUN_ID"' in step["run"] and job["environment"] == "production"


def _leakslow_running(run_dir: Path) -> dict | None:
    try:
        m = manifest(run_dir)
    except (OSError, ValueError):
        return None
    running = [s for s in m["steps"] if s["status"] == "running"]
    return running[0] if running and (run_dir / "leak.txt").is_file() else None


@pytest.mark.timeout(600)
def test_a_killed_run_is_scanned_sigterm_at_once_sigkill_by_the_run_that_takes_its_lock_over(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["leakslow", "fast"])
    out = tmp_path / "out"
    # SIGTERM: the runner scans in its finally, before it exits.
    first = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "termed"], sbx, background=True)
    try:
        wait_for(lambda: _leakslow_running(out / "termed"), 240, "the leaking step to run")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
    m = manifest(out / "termed")
    assert m["status"] == "killed"
    assert {(f["file"], f["secret"]) for f in m["secret_scan"]["findings"]} >= {("leak.txt", "PREFECT_API_KEY")}
    assert API_KEY not in (out / "termed" / "leak.txt").read_text()

    # SIGKILL: nothing runs in the runner; the next run on the same target takes the lock over and scans it.
    doomed = cli(["--notebooks-dir", str(nbs), "--outputs-dir", str(tmp_path / "out2"), "--run-id", "doomed"], sbx,
                 background=True)
    try:
        wait_for(lambda: _leakslow_running(tmp_path / "out2" / "doomed"), 240, "the leaking step to run")
        doomed.kill()
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    assert API_KEY in (tmp_path / "out2" / "doomed" / "leak.txt").read_text()  # not scanned yet
    nxt = cli(["--only", "fast", "--notebooks-dir", str(nbs), "--outputs-dir", str(out), "--run-id", "next"], sbx)
    assert nxt.returncode == 1, nxt.stdout + nxt.stderr  # a secret was found (in the run taken over)
    assert API_KEY not in (tmp_path / "out2" / "doomed" / "leak.txt").read_text()
    m = manifest(out / "next")
    assert steps_of(m)["02_fast"]["status"] == "passed"
    assert any("scanned the records of run doomed" in n and "leak.txt contained the value of PREFECT_API_KEY" in n
               for n in m["notes"]), m["notes"]
    assert "doomed/leak.txt (a run taken over)" in m["error"]
    assert manifest(tmp_path / "out2" / "doomed")["status"] == "interrupted"


@pytest.mark.timeout(600)
def test_the_scan_covers_interactive_runs_and_notebooks_saved_with_outputs(tmp_path, sbx):
    nbs = make_notebooks(tmp_path / "nb", ["fast"])
    scratch = nbformat.v4.new_notebook()
    scratch.cells = [nbformat.v4.new_code_cell("print(key)", outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text=f"Authorization: Basic {__import__('base64').b64encode(f'x:{API_KEY}'.encode()).decode()}\n")])]
    nbformat.write(scratch, nbs / "scratch.ipynb")
    out = tmp_path / "out"
    interactive = out / "runs" / "interactive-sandbox"
    interactive.mkdir(parents=True)
    (interactive / "03_deploy.json").write_text(json.dumps({"error": f"connecting to postgres://u:{DB_PASSWORD}@h/db"}))
    outcome = run_runbook("sandbox", run_id="r", notebooks_dir=nbs, outputs_dir=out, environ=sbx, handle_signals=False)
    assert outcome.status == "failed" and outcome.manifest.step("01_fast").status == "passed"
    found = {(f.file.rsplit("/", 1)[-1], f.secret.split(" ")[0]) for f in outcome.manifest.secret_scan.findings}
    assert {("scratch.ipynb", "PREFECT_API_KEY"), ("03_deploy.json", "DATABASE_PASSWORD")} <= found, found
    assert DB_PASSWORD not in (interactive / "03_deploy.json").read_text()
    assert "[redacted:PREFECT_API_KEY" in (nbs / "scratch.ipynb").read_text()
