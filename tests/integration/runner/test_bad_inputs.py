"""Bad inputs through the runner against the sandbox (the rows of tests/unit/test_core_settings.py's
matrix, and the runner's own flags and parameters): each is refused before anything is changed, with a
message naming the setting and where it came from; the stand-ins' request logs prove that no request
(or, for a step that started, no write) reached Prefect, Supabase or git."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("prefect", "supabase", "git")


def _log_lines(sandbox) -> dict[str, list[dict]]:
    out = {}
    for service in SERVICES:
        path = sandbox.request_log_path(service)
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        # The manager's health probes (/_sandbox/health) go on meanwhile: they are no request of the runbook.
        out[service] = [r for r in lines if not r["path"].startswith("/_sandbox/")]
    return out


# Requests that read (Prefect reads by POST to .../filter and by name); the sandbox's own processes
# (the worker, the event stream) keep reading meanwhile.
_READS = ("/filter", "/count", "/paginate", "/get_scheduled_flow_runs", "/heartbeat")


def _new_requests(sandbox, before: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """The writes that reached a stand-in since `before` (every request, for Supabase and git)."""
    after = _log_lines(sandbox)
    new = [(s, r["method"], r["path"]) for s in SERVICES for r in after[s][len(before[s]):]]
    return [(s, method, path) for s, method, path in new
            if s != "prefect" or (method not in ("GET", "HEAD", "WEBSOCKET") and not path.endswith(_READS)
                                  and "/block_documents/name/" not in path)]


def _sandbox_copy(sandbox, tmp_path: Path, **replace: str) -> str:
    """A sandbox.env like the sandbox's, some values replaced (the services stay the sandbox's)."""
    values = {k: v for k, v in dotenv_values(sandbox.state / "sandbox.env").items() if v is not None}
    values.update(replace)
    directory = tmp_path / "sbx-copy"
    directory.mkdir()
    (directory / "sandbox.env").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return str(directory)


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runbook_lib", "run", "--profile", "sandbox", "--confirm", *args],
                          cwd=PROJECT_ROOT, env=dict(os.environ, **env), capture_output=True, text=True, timeout=timeout)


CASES = {
    "deployment_name_with_slash": (
        {"RUNBOOK_DEPLOYMENT__NAME": "orchestrator/prod"}, [],
        ["deployment.name", "environment variable RUNBOOK_DEPLOYMENT__NAME", "cannot contain '/'"]),
    "infinite_timeout": (
        {"RUNBOOK_E2E__TRIGGER_TIMEOUT_SECONDS": "inf"}, [],
        ["e2e.trigger_timeout_seconds", "environment variable RUNBOOK_E2E__TRIGGER_TIMEOUT_SECONDS", "finite"]),
    "env_reference_off_the_allow_list": (
        {"RUNBOOK_DEPLOYMENT__ENV": '{"WHO": "${HOME}"}'}, [],
        ["deployment.env.WHO", "environment variable RUNBOOK_DEPLOYMENT__ENV", "allow-list"]),
    "blank_blueprint_slug": (
        {"RUNBOOK_E2E__BLUEPRINT": '[""]'}, [], ["e2e.blueprint", "RUNBOOK_E2E__BLUEPRINT", "non-empty"]),
    "non_finite_cell_timeout": ({}, ["--cell-timeout", "nan"], ["--cell-timeout nan", "finite positive"]),
    "secret_parameter": ({}, ["-p", "api_key=abc"], ["refused -p parameter"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_refused_before_any_request(sandbox, tmp_path, case):
    env, args, says = CASES[case]
    before = _log_lines(sandbox)
    outputs = tmp_path / "outputs"
    proc = _run(["--outputs-dir", str(outputs), *args], {"RUNBOOK_SANDBOX_DIR": str(sandbox.state), **env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    for fragment in says:
        assert fragment in message, (fragment, proc.stderr)
    assert not outputs.exists()  # nothing written
    assert _new_requests(sandbox, before) == []  # no request reached a stand-in


@pytest.mark.timeout(300)
def test_a_service_role_key_as_anon_key_and_a_dsn_with_a_raw_slash_are_refused_unquoted(sandbox, tmp_path):
    raw_password = "first-part/rest#x?y"
    directory = _sandbox_copy(sandbox, tmp_path, SUPABASE_ANON_KEY=sandbox.supabase.service_role_key,
                              DATABASE_URL=f"postgresql://postgres:{raw_password}@127.0.0.1:{sandbox.postgres.port}/postgres")
    before = _log_lines(sandbox)
    proc = _run(["--outputs-dir", str(tmp_path / "outputs")], {"RUNBOOK_SANDBOX_DIR": directory})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "supabase.anon_key" in text and "role 'service_role'" in text and "sandbox.env (SUPABASE_ANON_KEY)" in text
    assert "database.url" in text and "not percent-encoded" in text and "sandbox.env (DATABASE_URL)" in text
    assert sandbox.supabase.service_role_key not in text and "first-part" not in text
    assert _new_requests(sandbox, before) == []
    shutil.rmtree(directory)


@pytest.mark.timeout(400)
def test_a_bad_notebook_parameter_fails_its_step_before_any_write(sandbox, tmp_path):
    before = _log_lines(sandbox)
    outputs = tmp_path / "outputs"
    proc = _run(["--outputs-dir", str(outputs), "--only", "04", "--run-id", "bad-param", "-p", "deployment_id=not-a-uuid"],
                {"RUNBOOK_SANDBOX_DIR": str(sandbox.state)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    m = json.loads((outputs / "bad-param" / "manifest.json").read_text())
    step = m["steps"][3] if len(m["steps"]) > 3 else m["steps"][-1]
    assert step["status"] == "failed" and "deployment_id.format" in step["error"], step
    results = json.loads((outputs / "bad-param" / "04_update_edge_function_secret.json").read_text())
    check = next(c for c in results["checks"] if c["id"] == "deployment_id.format")
    assert check["status"] == "fail" and "'not-a-uuid' is not a UUID" in json.dumps(check), check
    writes = [(s, method, path) for s, method, path in _new_requests(sandbox, before) if method not in ("GET", "HEAD")]
    assert writes == [], writes  # step 04 read the Edge Function's secrets, wrote nothing
