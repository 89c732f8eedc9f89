"""The whole runbook, as `make run` runs it: every notebook in order through the real CLI, headless
with --confirm, against a sandbox of its own started fresh (the runbook merges, deploys and rewrites
the Edge Function secret, which the shared sandbox's other tests must not see). The run is the
session's `fresh_runbook` (tests/integration/fresh_runbook.py), which test_rerun_writes_nothing and
the browser's test_records read too."""

from __future__ import annotations

import json

import pytest

from runbook_sandbox.config import SandboxConfig
from tests.conftest import PROJECT_ROOT
from tests.integration.fresh_runbook import failure

STEPS = [p.stem for p in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]


def known_secrets(cfg: SandboxConfig) -> dict[str, str]:
    return {
        "PREFECT_API_KEY": cfg.prefect.api_key,
        "SUPABASE_ACCESS_TOKEN": cfg.supabase.access_token,
        "SUPABASE_JWT_SECRET": cfg.supabase.jwt_secret,
        "SUPABASE_SERVICE_ROLE_KEY": cfg.supabase.service_role_key,
        "GITHUB_TOKEN": cfg.git.token,
        "DATABASE_PASSWORD": cfg.postgres.password,
        "MODAL_TOKEN_SECRET": cfg.modal.token_secret,
    }


@pytest.mark.xdist_group("fresh_runbook")
@pytest.mark.timeout(1800)  # the first test of the session to ask for the fresh runbook waits for it
def test_make_run_equivalent_passes_every_step_and_leaks_no_secret(fresh_runbook):
    proc = fresh_runbook.full
    assert proc.returncode == 0, failure(proc, "the runbook")
    run_dir = fresh_runbook.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["profile"] == "sandbox"
    steps = {s["name"] if "name" in s else s["step"]: s for s in manifest["steps"]}
    assert [*steps] == STEPS
    assert all(s["status"] == "passed" for s in steps.values()), steps

    # Step 03 deployed, step 04 pointed the Edge Function at that deployment, 05 proved the chain.
    deploy = json.dumps(steps["03_deploy"])
    deployment_id = json.loads((run_dir / "03_deploy.json").read_text())["values"]["deployment_id"]
    assert deployment_id in deploy
    secret = json.loads((run_dir / "04_update_edge_function_secret.json").read_text())["values"]
    assert secret["deployment_id"] == deployment_id
    e2e = json.loads((run_dir / "05_end_to_end_test.json").read_text())["values"]
    assert e2e["flow_run_id"] and "timeline" in e2e
    assert "timeline" in json.dumps(steps["05_end_to_end_test"])
    # Step 06, the health check, found the chain it had just proven healthy: verdict ok against this run.
    health = json.loads((run_dir / "06_health_check.json").read_text())["values"]
    assert health["verdict"] == "ok" and health["exit_code"] == 0, health.get("findings")
    assert health["baseline"]["deployment_id"] == deployment_id
    # And `runbook health` afterwards compares with this run, the last passing one: ok, exit 0.
    checked = fresh_runbook.health
    assert checked is not None and checked.returncode == 0, failure(checked, "runbook health")
    record = json.loads(checked.stdout)
    assert record["verdict"] == "ok" and record["baseline"]["source"].startswith("run full (passed")

    # What `make run` prints at the end: the chain's timeline, in ms from the launch.
    printed = proc.stdout
    assert "timeline of 05_end_to_end_test (ms from launch):" in printed
    for event in ("launch", "pg net response", "flow run created", "flow run running", "first queued",
                  "last queued", "first in progress", "last in progress"):
        assert f"  {event} " in printed, event

    # The records: one executed notebook and one HTML page per step, and the index linking them.
    index = (run_dir / "index.html").read_text()
    for step in STEPS:
        assert (run_dir / f"{step}.ipynb").is_file()
        html = next(run_dir.glob(f"{step}*.html"))
        assert html.name in index

    # No secret the sandbox knows appears anywhere in the records.
    for path in run_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            for name, value in known_secrets(fresh_runbook.config).items():
                assert value not in text, f"{name} leaked into {path}"
