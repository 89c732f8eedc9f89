"""The chain's test helpers (test_chain, test_nb05_e2e, test_fallback; the `settings` and `managed`
fixtures of conftest): the profile on the branch whose flow reads the Secret block, step 03's deploy
to managed-production, the Edge Function's PREFECT_DEPLOYMENT_ID, Modal stand-in faults, the
chain's notebooks through papermill."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import httpx

from runbook_lib.core import tls
from runbook_lib.core.profiles import load_settings
from runbook_lib.steps import deploy, e2e
from runbook_lib.systems.database import Database
from runbook_lib.systems.prefect_deploy import deploy_flow
from runbook_lib.systems.supabase import SupabaseManagementApi
from tests.integration.notebook_runs import Run, run_notebook

# The branch whose orchestrator loads the DSN from the Secret block (main gets it when step 02
# merges; these tests do not depend on whether that happened in this session).
FLOW_BRANCH = "feature/secret-blocks"
FIRST_SENDER = "send_company_firmographics"
LINK_IDS = [e2e.LINK_TRIGGER, e2e.LINK_EDGE_FUNCTION, e2e.LINK_FLOW_RUN, e2e.LINK_WORK_POOL, e2e.LINK_ITEMS]
# Every notebook of the chain's tests deploys and runs the branch whose flow reads the Secret block.
KERNEL_ENV = {"RUNBOOK_SOURCE__BRANCH": FLOW_BRANCH}


def sandbox_settings(sandbox, overrides: dict[str, Any] | None = None):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)},
                         overrides={"source.branch": FLOW_BRANCH, **(overrides or {})})


def deploy_managed(settings) -> str:
    """Step 03's library calls: the orchestrator on managed-production; returns the deployment id."""
    the_plan, report = deploy.build_plan(settings)
    assert report.ok, report.summary_line() + "\n" + "\n".join(f"{c.id}: {c.detail}" for c in report.failures)
    if the_plan.no_changes:
        return the_plan.live_id
    return deploy_flow(settings, the_plan.desired)


def set_function_deployment_id(settings, deployment_id: str) -> None:
    """PREFECT_DEPLOYMENT_ID through the Management API stand-in, verified by digest."""
    with SupabaseManagementApi.from_settings(settings) as api:
        api.upsert_secrets({"PREFECT_DEPLOYMENT_ID": deployment_id}, mask_values=False)
        assert api.secret_digests()["PREFECT_DEPLOYMENT_ID"].matches(deployment_id)


def function_deployment_digest(settings) -> str:
    with SupabaseManagementApi.from_settings(settings) as api:
        return api.secret_digests()["PREFECT_DEPLOYMENT_ID"].digest


def modal_fault(sandbox, function: str | None, mode: str | None = None) -> None:
    """Inject a fault on one Modal stand-in function, or clear every fault (function None)."""
    from runbook_sandbox.faults import admin_headers

    with httpx.Client(base_url=sandbox.modal_url, headers=admin_headers(sandbox), timeout=10) as http:
        if function is None:
            http.delete("/_sandbox/faults").raise_for_status()
        else:
            http.put(f"/_sandbox/faults/{function}", json={"mode": mode}).raise_for_status()


def batches_of_client(db: Database, client_id: str) -> set[str]:
    return {str(r["id"]) for r in db.query("SELECT id FROM public.batches WHERE client_id = %s", (client_id,))}


def run_chain_notebook(notebook: str, sandbox, run_dir: Path, parameters: dict[str, Any] | None = None,
                       env: dict[str, str] | None = None, step: str | None = None) -> Run:
    """`notebook_runs.run_notebook` on the flow branch, with up to 600 s a cell."""
    return run_notebook(notebook, sandbox.state, run_dir, parameters, {**KERNEL_ENV, **(env or {})}, step=step,
                        timeout=600)


# -- the Edge Function's secret, read and written over the Management API's HTTP (not the runbook's client) --

FUNCTION_SECRET = "PREFECT_DEPLOYMENT_ID"


def management(sandbox) -> httpx.Client:
    return httpx.Client(base_url=sandbox.supabase_api_url, timeout=30, trust_env=False, verify=tls.verified(),
                        headers={"Authorization": f"Bearer {sandbox.supabase.access_token}"})


def function_secret_digest(sandbox) -> str | None:
    """The digest the Management API lists for PREFECT_DEPLOYMENT_ID (None when unset)."""
    with management(sandbox) as client:
        r = client.get(f"/v1/projects/{sandbox.supabase.project_ref}/secrets")
        r.raise_for_status()
    return next((row["value"] for row in r.json() if row["name"] == FUNCTION_SECRET), None)


def set_function_secret(sandbox, value: str) -> None:
    with management(sandbox) as client:
        client.post(f"/v1/projects/{sandbox.supabase.project_ref}/secrets",
                    json=[{"name": FUNCTION_SECRET, "value": value}]).raise_for_status()


@contextlib.contextmanager
def scripted_answer(sandbox, **spec: Any) -> Iterator[None]:
    """An answer of the Management API stand-in on one path and method (`http_common.ScriptedAnswers`),
    cleared at the end whatever happens."""
    from runbook_sandbox.faults import admin_headers

    with management(sandbox) as client:
        client.post("/_sandbox/faults", json=spec, headers=admin_headers(sandbox)).raise_for_status()
        try:
            yield
        finally:
            client.delete("/_sandbox/faults", headers=admin_headers(sandbox)).raise_for_status()
