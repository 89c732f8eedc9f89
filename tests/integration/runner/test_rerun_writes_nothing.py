"""Two runs in a row, through the runner's command line (`runbook run --profile sandbox --confirm`),
against a sandbox of their own: the second keeps the same deployment and sends no write to Prefect,
Supabase or git. "No write" is read from the sandbox's request logs (one line per request the
stand-ins answered), not from what the steps report.

The first run is the session's `fresh_runbook` (tests/integration/fresh_runbook.py): the whole runbook
on a fresh sandbox, which test_full_runbook reads too. The second is the runbook's mutating sequence,
01 to 04 (verify, merge, deploy, Edge Function secret), on the same sandbox: step 05 launches a test
batch on purpose (rows, a flow run) every time it runs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.fresh_runbook import failure

READS = ("GET", "HEAD", "OPTIONS")
# POSTs that only read: Prefect's filters, the pool's worker polling and beating (not the runbook), and
# git's fetch (smart HTTP's git-upload-pack; a push is git-receive-pack).
READ_ONLY_POSTS = ("/filter", "/count", "/paginate", "/get_scheduled_flow_runs", "/workers/heartbeat",
                   "/git-upload-pack")


def writes(entries: list[dict[str, Any]]) -> list[str]:
    return [f"{e['method']} {e['path']} -> {e['status']}" for e in entries
            if e["method"] not in READS and not e["path"].rstrip("/").endswith(READ_ONLY_POSTS)]


@pytest.mark.slow
@pytest.mark.xdist_group("fresh_runbook")
@pytest.mark.timeout(1800)  # the first test of the session to ask for the fresh runbook waits for it
def test_a_second_run_keeps_the_deployment_and_writes_nothing(fresh_runbook):
    first, outputs = fresh_runbook.full, fresh_runbook.outputs
    assert first.returncode == 0, failure(first, "the first run")
    first_deploy = json.loads((outputs / "full" / "03_deploy.json").read_text())["values"]
    assert first_deploy["changed"] is True  # the first run did deploy
    # The first run did write, and the logs show it: what counts as a write below is what a change looks like.
    first_writes = {service: writes(entries) for service, entries in fresh_runbook.requests["full"].items()}
    assert any("/deployments" in w for w in first_writes["prefect"]), first_writes["prefect"]
    assert any(w.startswith("POST ") and w.split()[1].endswith("/secrets") for w in first_writes["supabase"])
    assert any("/git-receive-pack" in w for w in first_writes["git"]), first_writes["git"]

    second = fresh_runbook.second
    assert second is not None and second.returncode == 0, failure(second, "the second run")
    manifest = json.loads((outputs / "second" / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert [s["step"] for s in manifest["steps"]] == ["01_verify_prerequisites", "02_merge_check", "03_deploy",
                                                      "04_update_edge_function_secret"]
    second_deploy = json.loads((outputs / "second" / "03_deploy.json").read_text())["values"]
    assert second_deploy["deployment_id"] == first_deploy["deployment_id"]

    # What the stand-ins saw during the second run: reads only.
    seen = fresh_runbook.requests["second"]
    assert seen["prefect"] and seen["supabase"] and seen["git"], "the second run read nothing: it did not run"
    for service, entries in seen.items():
        assert writes(entries) == [], f"the second run wrote to {service}"
