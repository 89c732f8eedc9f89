"""Steps 03 and 04 as a person steps through them in JupyterLab: the cells run from the UI, the plan
and the Approve / Reject buttons of the confirmation gate, the click, the apply cell's output, then
the live systems (Prefect, the Management API) read back through their APIs.

Each test deploys under a deployment name of its own (RUNBOOK_DEPLOYMENT__NAME in the kernels'
environment, a profile override a user can set too), so what it asserts does not depend on what
other tests of the shared sandbox deployed, and the plan always has a change to approve or reject."""

from __future__ import annotations

import hashlib
import json
import re

from runbook_lib.core.profiles import load_settings
from runbook_lib.systems.prefect import PrefectApi
from runbook_lib.systems.supabase import SupabaseManagementApi
from tests.browser.conftest import Notebook, save_page, wait
from tests.integration.chain_helpers import FLOW_BRANCH, deploy_managed

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def profile(sandbox, name: str):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)},
                         overrides={"source.branch": FLOW_BRANCH, "deployment.name": name})


def kernel_env(name: str) -> dict[str, str]:
    return {"RUNBOOK_SOURCE__BRANCH": FLOW_BRANCH, "RUNBOOK_DEPLOYMENT__NAME": name}


def deployments(api: PrefectApi) -> dict[str, str]:
    """Every deployment of the workspace: id -> its name and last update."""
    found = api.call("read deployments", lambda client: client.read_deployments())
    return {str(d.id): f"{d.name} {d.updated}" for d in found}


def delete_deployment(api: PrefectApi, deployment_id: str) -> None:
    api.call("delete deployment", lambda client: client.delete_deployment(deployment_id))


def open_notebook(driver, lab, name: str) -> Notebook:
    lab.open(driver, f"{name}.ipynb")
    nb = Notebook(driver)
    nb.wait_ready("profile = ")
    return nb


def run_to_gate(nb: Notebook, step: str, *, plan_text: str) -> object:
    """Run the set-up, the plan and the confirmation cells; returns the confirmation cell showing the
    plan and both buttons."""
    for code in ("profile = ", "ctx = start_step", "plan = step.plan()"):
        cell = nb.run(code)
        assert not nb.error(cell), f"{code}: {nb.error(cell)}"
    gate = nb.run("step.confirm(plan)")
    assert not nb.error(gate), nb.error(gate)
    nb.button(gate, "Approve")
    nb.button(gate, "Reject")
    shown = nb.output(gate)
    assert f"Plan for step {step}" in shown and plan_text in shown, shown
    assert "PENDING" in shown  # nobody has decided yet
    return gate


def results(run_dir, step: str) -> dict:
    return json.loads((run_dir / f"{step}.json").read_text())


def test_03_deploy_approved_in_jupyterlab_creates_the_deployment_it_shows(sandbox, lab, driver, artifacts, unique):
    name = f"browser-approve-{unique}"
    api = PrefectApi.from_settings(profile(sandbox, name))
    server = lab({"03_deploy": {"run_dir": str(artifacts)}}, kernel_env(name))
    nb = open_notebook(driver, server, "03_deploy")
    gate = run_to_gate(nb, "03_deploy", plan_text=f"create deployment orchestrator_main/{name}")
    save_page(driver, artifacts, "plan", show=gate)

    nb.button(gate, "Approve").click()
    wait(driver, lambda b: "APPROVED" in nb.output(gate), "the gate to show the approval")
    assert results(artifacts, "03_deploy")["gate"]["decision"] == "approved"

    apply = nb.cell("deployment_id = step.apply(plan)")
    nb.record_progress(apply)
    nb.run("deployment_id = step.apply(plan)")
    assert not nb.error(apply), nb.error(apply)
    shown = nb.output(apply)
    ids = UUID.findall(shown)
    assert ids, f"no deployment id in the apply cell's output:\n{shown}"
    deployment_id = ids[-1]  # the cell's value, shown last
    # The deploy's progress widget updated while it ran: a running state, then the finished one.
    seen = nb.progress_seen()
    assert any("deploying" in s and "[done]" not in s for s in seen), seen
    assert seen[-1].endswith("[done]") and "done in" in seen[-1], seen
    for code in ("_ = step.verify(plan, deployment_id)", "_ = step.smoke_run(plan, deployment_id)", "results = ctx.finish()"):
        cell = nb.run(code)
        assert not nb.error(cell), f"{code}: {nb.error(cell)}"
    save_page(driver, artifacts, "applied", show=apply)

    try:
        live = api.read_deployment_by_id(deployment_id)
        assert live is not None, f"Prefect has no deployment {deployment_id}"
        assert live.name == name
        recorded = results(artifacts, "03_deploy")
        assert recorded["status"] == "passed" and recorded["values"]["deployment_id"] == deployment_id
    finally:
        delete_deployment(api, deployment_id)


def test_03_deploy_rejected_in_jupyterlab_applies_nothing(sandbox, lab, driver, artifacts, unique):
    name = f"browser-reject-{unique}"
    api = PrefectApi.from_settings(profile(sandbox, name))
    before = deployments(api)
    server = lab({"03_deploy": {"run_dir": str(artifacts)}}, kernel_env(name))
    nb = open_notebook(driver, server, "03_deploy")
    gate = run_to_gate(nb, "03_deploy", plan_text=f"create deployment orchestrator_main/{name}")

    nb.button(gate, "Reject").click()
    wait(driver, lambda b: "REJECTED" in nb.output(gate), "the gate to show the rejection")
    apply = nb.run("deployment_id = step.apply(plan)")
    error = nb.error(apply)
    assert "NotConfirmed" in error and "nothing was applied" in error, error
    assert not UUID.search(nb.output(apply).replace(error, "")), "the apply cell showed a deployment id"
    save_page(driver, artifacts, "rejected", show=gate)

    assert api.read_deployment(f"orchestrator_main/{name}") is None
    assert deployments(api) == before, "Prefect's deployments changed after a rejection"
    recorded = results(artifacts, "03_deploy")
    assert recorded["status"] == "rejected" and recorded["gate"]["decision"] == "rejected"
    assert "deployment_id" not in recorded["values"]


def test_04_edge_function_secret_approved_in_jupyterlab_holds_the_deployment(sandbox, lab, driver, artifacts, unique):
    name = f"browser-secret-{unique}"
    settings = profile(sandbox, name)
    deployment_id = deploy_managed(settings)  # step 03's library calls, under this test's name
    digest = hashlib.sha256(deployment_id.encode()).hexdigest()
    with SupabaseManagementApi.from_settings(settings) as mgmt:
        assert not mgmt.secret_digests()["PREFECT_DEPLOYMENT_ID"].matches(deployment_id)
    server = lab({"04_update_edge_function_secret": {"run_dir": str(artifacts), "deployment_id": deployment_id}},
                 kernel_env(name))
    nb = open_notebook(driver, server, "04_update_edge_function_secret")
    gate = run_to_gate(nb, "04_update_edge_function_secret", plan_text=deployment_id)
    save_page(driver, artifacts, "plan", show=gate)
    assert digest in nb.output(gate)  # the plan names the digest the secret will have

    nb.button(gate, "Approve").click()
    wait(driver, lambda b: "APPROVED" in nb.output(gate), "the gate to show the approval")
    apply = nb.run("_ = step.apply(plan)")
    assert not nb.error(apply), nb.error(apply)
    finish = nb.run("results = ctx.finish()")
    assert not nb.error(finish), nb.error(finish)
    save_page(driver, artifacts, "applied", show=apply)

    with SupabaseManagementApi.from_settings(settings) as mgmt:
        live = mgmt.secret_digests()["PREFECT_DEPLOYMENT_ID"]
    assert live.matches(deployment_id) and live.digest.lower() == digest
    recorded = results(artifacts, "04_update_edge_function_secret")
    assert recorded["status"] == "passed" and recorded["values"]["new_digest"] == digest
    assert {c["id"]: c["status"] for c in recorded["checks"]}["secret.verify"] == "pass"

