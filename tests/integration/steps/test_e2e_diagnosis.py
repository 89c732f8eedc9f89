"""Step 05's diagnosis from evidence, over the sandbox: when the dispatch to Modal fails, link 5
concludes as soon as the outcome is certain (the flow run is over and the test items no longer move),
not after the completion timeout; it quotes, masked, the dispatcher's error lines read from the flow
run's logs (and its subflows') through the Prefect API, counts the stuck items per state, and bases
its remediation on what it read.

Two orchestrators: the repository's (flows/: a failed spawn puts the state back to PENDING and the
run ends FAILED), and a variant pushed to the sandbox git server that does what the original
production orchestrator did: it logs the spawn error and goes on, so the run ends COMPLETED with the
items left QUEUED. The dispatch fails for real: the Modal stand-in's sender answers 500
(`/_sandbox/faults`). Times are measured from the flow run's end time as Prefect records it.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from runbook_lib.steps import e2e
from runbook_lib.systems.database import Database
from runbook_lib.systems.prefect import PrefectApi
from runbook_sandbox.git_seed import ORCHESTRATOR
from tests.integration.chain_helpers import (
    FIRST_SENDER,
    FLOW_BRANCH,
    deploy_managed,
    modal_fault,
    sandbox_settings,
    set_function_deployment_id,
)
from tests.integration.notebook_runs import secret_values

STEP = "company-firmographics"
CONCLUDE_WITHIN = 10.0  # seconds after the flow run's end
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_TERMINAL_PROMPT": "0"}

# The variant: the spawn errors of a chunk are logged (from the flow's thread, so they reach the
# run's logs), with the runtime's Modal credentials in the line, and swallowed: nothing is recorded
# on the states (left QUEUED), nothing counts as incomplete (the run ends COMPLETED).
RECORDED = '''    counts["dispatched"] += len(mapped) - len(errors)
    if not errors:
        return True
'''
SWALLOWED = '''    counts["dispatched"] += len(mapped) - len(errors)
    items = {state_id: item_id for state_id, item_id, _ws, _sender in mapped}
    senders = {state_id: sender for state_id, _item, _ws, sender in mapped}
    for state_id, error in errors.items():  # logged and swallowed: the state stays QUEUED
        log.error("Failed to dispatch item %s... to %s (credentials %s:%s): %s", str(items[state_id])[:8],
                  senders[state_id], os.environ.get("MODAL_TOKEN_ID"), os.environ.get("MODAL_TOKEN_SECRET"), error)
    return True
'''


# -- helpers -----------------------------------------------------------------------------------------


class Echo:
    """ChainTest's output lines, each with the wall-clock time it was printed."""

    def __init__(self) -> None:
        self.lines: list[tuple[datetime, str]] = []

    def __call__(self, text: str) -> None:
        self.lines.append((datetime.now(timezone.utc), text))

    def at(self, prefix: str) -> datetime:
        return next(at for at, text in self.lines if text.startswith(prefix))


def chain(settings, deployment_id: str, echo: Echo, **params: Any) -> e2e.ChainTest:
    api = PrefectApi.from_settings(settings)
    options = e2e.E2EOptions.from_settings(settings, **params)
    return e2e.ChainTest(settings, options, e2e.resolve_deployment(settings, api, deployment_id=deployment_id), api=api,
                         progress=e2e.Progress(options.item_count, interactive=False, out=echo), out=echo)


def item_states(db: Database, batch_id: str) -> dict[str, int]:
    rows = db.query("SELECT status::text AS status, count(*) AS n FROM public.workflow_states WHERE batch_id = %s "
                    "AND step_name = %s GROUP BY 1", (batch_id, STEP))
    return {r["status"]: r["n"] for r in rows}


def assert_concluded_quickly(settings, result: e2e.E2EResult, echo: Echo) -> tuple[float, float]:
    """Link 5 failed within CONCLUDE_WITHIN seconds of the flow run's end (Prefect's end time), as
    its own record says and as the moment it was printed shows. Returns both delays (s)."""
    run = PrefectApi.from_settings(settings).read_flow_run(result.flow_run_id)
    assert run.end_time is not None, run.state
    link = result.report.get(e2e.LINK_ITEMS)
    assert link.status.value == "fail", link.detail
    recorded = link.data["after_flow_run_end_ms"] / 1000
    printed = (echo.at("FAIL Link 5") - run.end_time).total_seconds()
    assert 0 <= recorded < CONCLUDE_WITHIN and 0 <= printed < CONCLUDE_WITHIN, (recorded, printed, link.detail)
    assert link.data["concluded"] != "timeout" and "whole completion timeout" not in link.detail
    assert link.data["flow_run_ended_at"] == run.end_time.isoformat()
    return recorded, printed


def assert_masked(result: e2e.E2EResult, sandbox, sandbox_env) -> None:
    text = result.report.model_dump_json()
    for label, value in secret_values(sandbox, sandbox_env).items():
        assert value not in text, f"{label} appears in the checks"


def git(*args: str, cwd: Path | None = None, token: str | None = None) -> str:
    auth = []
    if token:  # HTTP Basic with the token as the password, never written into a URL or a config file
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        auth = ["-c", f"http.extraHeader=Authorization: Basic {basic}"]
    proc = subprocess.run(["git", *auth, *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.replace(token or "\0", "[token]")
    return proc.stdout.strip()


@pytest.fixture
def swallowing_branch(sandbox, sandbox_env, tmp_path):
    """A branch of the sandbox's orchestrator repository, pushed over HTTP with the token, whose
    dispatcher logs and swallows spawn errors; deleted afterwards."""
    branch = f"variant/swallow-dispatch-errors-{uuid.uuid4().hex[:6]}"
    work = tmp_path / "variant"
    git("clone", "-q", "--branch", FLOW_BRANCH, sandbox.repo_url, str(work))
    source = (work / ORCHESTRATOR).read_text()
    assert source.count(RECORDED) == 1, "the dispatcher of flows/ changed: update the variant"
    (work / ORCHESTRATOR).write_text(source.replace(RECORDED, SWALLOWED))
    git("checkout", "-q", "-b", branch, cwd=work)
    git("commit", "-q", "-a", "-m", "Dispatcher: log spawn errors and carry on", cwd=work)
    git("push", "-q", "origin", branch, cwd=work, token=sandbox_env["GITHUB_TOKEN"])
    yield branch
    git("push", "-q", "origin", f":refs/heads/{branch}", cwd=work, token=sandbox_env["GITHUB_TOKEN"])


# -- tests -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_failed_spawns_put_back_to_pending_are_diagnosed_from_the_logs_at_once(sandbox, sandbox_env, settings, managed,
                                                                               database):
    modal_fault(sandbox, FIRST_SENDER, "spawn_error")
    echo = Echo()
    started = time.monotonic()
    try:
        result = chain(settings, managed, echo, n_items=4, cleanup=False).run()
    finally:
        modal_fault(sandbox, None)
    try:
        took = time.monotonic() - started
        recorded, printed = assert_concluded_quickly(settings, result, echo)
        # The states, as the database has them: every item back to PENDING with its dispatch error.
        assert item_states(database, result.batch_id) == {"PENDING": 4}
        link = result.report.get(e2e.LINK_ITEMS)
        assert link.data["stuck_counts"] == {"PENDING": 4} and "Stuck: 4 PENDING" in link.detail
        assert link.data["flow_run_state"] == "FAILED"
        # Quoted from the dispatcher subflow's logs, read through the Prefect API.
        quoted = link.data["dispatch_errors"]
        assert any("spawn(s) failed" in q and f"data-enrichment-workers.{FIRST_SENDER}: HTTP 500 injected spawn failure" in q
                   for q in quoted), quoted
        assert "subflow dispatch_pending_items" in link.detail and "HTTP 500 injected spawn failure" in link.detail, link.detail
        # The remediation follows from what was read: Modal answered an error (not credentials, not a mapping).
        assert "dispatch failed (1 attempt(s))" in link.detail
        assert "modal app logs data-enrichment-workers" in link.remediation
        assert "modal-token-id" not in link.remediation and "modal_sender_fn" not in link.remediation
        assert_masked(result, sandbox, sandbox_env)
        print(f"\nflows/ orchestrator: link 5 concluded {recorded:.2f}s (recorded) / {printed:.2f}s (printed) after "
              f"the flow run ended; whole chain {took:.1f}s")
        print(f"{link.detail}\nremediation: {link.remediation}")
    finally:
        database.delete_batch(result.batch_id)


@pytest.mark.timeout(600)
def test_an_orchestrator_that_swallows_dispatch_errors_fails_link_5_within_seconds_with_the_error_quoted(
        sandbox, sandbox_env, managed, database, swallowing_branch):
    settings = sandbox_settings(sandbox, {"source.branch": swallowing_branch,
                                          "deployment.name": f"orchestrator-swallowing-{uuid.uuid4().hex[:6]}"})
    variant = deploy_managed(settings)
    api = PrefectApi.from_settings(settings)
    set_function_deployment_id(settings, variant)
    modal_fault(sandbox, FIRST_SENDER, "spawn_error")
    echo = Echo()
    started = time.monotonic()
    try:
        result = chain(settings, variant, echo, n_items=3, cleanup=False).run()
    finally:
        modal_fault(sandbox, None)
        set_function_deployment_id(settings, managed)
    try:
        took = time.monotonic() - started
        # The flow run says all is well: COMPLETED, on the pool, with the items claimed.
        assert result.report.get(e2e.LINK_WORK_POOL).status.value == "pass"
        assert result.flow_run_state == "COMPLETED"
        assert item_states(database, result.batch_id) == {"QUEUED": 3}
        recorded, printed = assert_concluded_quickly(settings, result, echo)
        # It concluded on quiet: the run over, the items unchanged for settle_seconds; not on the timeout.
        link = result.report.get(e2e.LINK_ITEMS)
        assert link.data["concluded"].startswith("the flow run is COMPLETED and no item changed for")
        assert took < settings.e2e.completion_timeout_seconds / 2
        assert link.data["stuck_counts"] == {"QUEUED": 3} and "Stuck: 3 QUEUED" in link.detail
        assert link.data["flow_run_state"] == "COMPLETED"
        # The dispatcher's error line, quoted from the logs with the credentials in it masked.
        quoted = link.data["dispatch_errors"]
        assert len(quoted) == 1 and "ERROR Failed to dispatch item" in quoted[0], quoted
        assert f"to {FIRST_SENDER}" in quoted[0] and "HTTP 500 injected spawn failure" in quoted[0]
        assert re.search(r"\(logged \d+ times\)$", quoted[0]), quoted[0]  # one line per item, grouped
        assert "[redacted:" in quoted[0] and sandbox_env["MODAL_TOKEN_SECRET"] not in quoted[0]
        assert "the dispatch errors name 3 of the 3 stuck test item(s)" in link.detail
        # Cause and remediation from the evidence: Modal's error, the run's COMPLETED state, the QUEUED states.
        [group] = result.stuck
        assert group["status"] == "QUEUED" and group["count"] == 3
        assert "the dispatch failed: Modal answered an error" in group["cause"] and "ended COMPLETED" in group["cause"]
        assert "modal app logs data-enrichment-workers" in link.remediation
        assert "reset the stuck states to PENDING" in link.remediation and "puts a failed dispatch back to PENDING" in link.remediation
        assert "read the flow run's logs for the spawn errors" not in link.remediation
        assert_masked(result, sandbox, sandbox_env)
        print(f"\nswallowing orchestrator: link 5 concluded {recorded:.2f}s (recorded) / {printed:.2f}s (printed) "
              f"after the flow run ended (settle_seconds {settings.e2e.settle_seconds:g}); whole chain {took:.1f}s")
        print(f"{link.detail}\nremediation: {link.remediation}")
    finally:
        database.delete_batch(result.batch_id)
        api.call("deleting the variant deployment", lambda c: c.delete_deployment(UUID(variant)))
