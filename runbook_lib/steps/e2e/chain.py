"""The chain test: launch one test batch and prove each link of the chain in order, with its
timing, then clean up. See `runbook_lib.steps.e2e` for what each link proves."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import psutil

from runbook_lib.checks.base import Check, CheckReport, Status
from runbook_lib.core.errors import DatabaseError, PrefectApiError, RunbookError
from runbook_lib.core.secrets import redact
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.notebook.context import register_settings_secrets
from runbook_lib.notebook.progress import Progress
from runbook_lib.records.outputs import E2EOutput
from runbook_lib.steps.e2e import timeline
from runbook_lib.steps.e2e.diagnosis import pool_diagnosis, read_run_evidence, stuck_items
from runbook_lib.steps.e2e.links import (
    CLEANUP, DEPLOYMENT, LAUNCH, LINK_DEFS, ORPHANS, LINK_EDGE_FUNCTION, LINK_FLOW_RUN, LINK_ITEMS, LINK_TRIGGER,
    LINK_WORK_POOL, LINKS, TIMELINE, as_json, count, follows, ms, reached, seconds, short,
)
from runbook_lib.steps.e2e.options import E2EOptions, ExpectedDeployment, batch_items_for_test
from runbook_lib.systems.database import Database, LaunchedBatch
from runbook_lib.systems.prefect import FINAL_STATE_TYPES, PrefectApi

# A flow run created this long before the launch (clock skew between the database and Prefect
# allowed for) was not started by this batch.
CLOCK_SKEW_TOLERANCE = timedelta(seconds=5)
LOG_LINES = 30
# A test batch whose launching process cannot be seen (another host) is orphaned once it is older
# than its test could take (the timeouts of every link) plus this margin (the cleanup itself).
ORPHAN_MARGIN_SECONDS = 300.0


@dataclass
class E2EResult:
    options: E2EOptions
    deployment: ExpectedDeployment
    report: CheckReport
    batch_id: str | None = None
    item_ids: list[str] = field(default_factory=list)
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_run_state: str | None = None
    timeline_ms: dict[str, float | None] = field(default_factory=dict)
    latencies_ms: dict[str, float | None] = field(default_factory=dict)
    state_counts: dict[str, int] = field(default_factory=dict)
    # (ms offset, {status: count}) after each recorded transition of the first step's states
    count_series: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    stuck: list[dict[str, Any]] = field(default_factory=list)
    cleaned_up: bool = False
    orphans_deleted: list[str] = field(default_factory=list)  # test batches of earlier runs, deleted first

    @property
    def ok(self) -> bool:
        return self.report.ok

    @property
    def failed_link(self) -> str | None:
        return next((c.id for c in self.report.checks if c.id in LINKS and c.status == Status.FAIL), None)

    def link_checks(self) -> list[Check]:
        return [c for c in self.report.checks if c.id in LINKS]

    def values(self) -> dict[str, Any]:
        """What the step records (ctx.set): ids, latencies, counts and the timeline."""
        return {
            "batch_id": self.batch_id,
            "flow_run_id": self.flow_run_id,
            "deployment_id": self.deployment.id,
            "deployment_name": self.deployment.name,
            "launch_mode": self.options.launch_mode,
            "item_count": self.options.item_count,
            "latencies_ms": self.latencies_ms,
            "link_elapsed_ms": {c.id: c.data.get("elapsed_ms") for c in self.link_checks()},
            "item_state_counts": self.state_counts,
            "timeline": self.timeline_ms,  # ms offsets from the launch
            "failed_link": self.failed_link,
            "stuck_items": self.stuck,
            "cleaned_up": self.cleaned_up,
            "orphans_deleted": self.orphans_deleted,
        }




class ChainTest:
    """Launch one test batch and prove each link of the chain; see the package doc."""

    def __init__(self, settings: RunbookSettings, options: E2EOptions, deployment: ExpectedDeployment, *, step: str = E2EOutput.STEP,
                 db: Database | None = None, api: PrefectApi | None = None, progress: Progress | None = None,
                 out: Callable[[str], None] = print, on_launch: Callable[[LaunchedBatch], None] | None = None):
        self.settings = settings
        self.options = options
        self.deployment = deployment
        self.step = step
        self.db = db or Database.from_settings(settings)
        self.api = api or PrefectApi.from_settings(settings)
        self.progress = progress or Progress(options.item_count, out=out)
        self.out = out
        self.expected_pool = settings.deployment.work_pool
        self._launched: LaunchedBatch | None = None
        self.on_launch = on_launch  # called right after the launch (the step records the batch id at once)
        self.result: E2EResult | None = None  # the run's result so far (also when it was interrupted)
        self._t0 = 0.0  # monotonic at the launch
        self._run: Any = None
        self._running_at: datetime | None = None
        self._terminal_seen: float | None = None  # monotonic, when link 4 first saw the run terminal
        self._response: dict[str, Any] | None = None
        register_settings_secrets(settings)  # whatever the flow run's logs quote is masked

    # -- the plan ------------------------------------------------------------------------------
    def gate_plan(self) -> dict[str, Any]:
        o = self.options
        return {
            "launch": f"{o.item_count} test item(s) for client {o.client_id}, workstream {o.workstream}, "
                      f"blueprint {o.blueprint}",
            "launch_mode": o.launch_mode,
            "expected_deployment": f"{self.deployment.name} ({self.deployment.id}, from {self.deployment.source})",
            "expected_work_pool": self.expected_pool,
            "effect": "the trigger starts a flow run of the deployment, which dispatches every PENDING item of the "
                      "database (not only the test batch's)",
            "cleanup": "the test batch, its items, states, results and audit rows are deleted at the end" if o.cleanup
                       else "the test rows are kept (cleanup=False)",
            "orphans": f"first, test batches of client {o.client_id} left by an earlier end-to-end test that never "
                       "cleaned up (its process is gone, or it is past its deadline) are deleted",
            "timeouts_s": {"trigger": o.trigger_timeout_seconds, "flow_run": o.flow_run_timeout_seconds, "completion": o.completion_timeout_seconds},
        }

    nothing_to_apply = None  # a launch is always confirmed

    def summary(self) -> str:
        return (f"launch a test batch of {self.options.item_count} item(s) ({self.options.launch_mode}) and follow it "
                f"through {self.deployment.name}")

    # -- running -------------------------------------------------------------------------------
    def run(self) -> E2EResult:
        """Launch, prove each link in order (later links SKIP after a failure), collect the timeline,
        then delete the test rows (when cleanup is on), also after an error."""
        result = self.result = E2EResult(self.options, self.deployment, CheckReport(step=self.step))
        result.report.add(DEPLOYMENT.passed(
            f"{self.deployment.name} ({self.deployment.id}) on "
            f"pool {self.deployment.work_pool}, from {self.deployment.source}", deployment_id=self.deployment.id,
        ))
        result.report.add(self._delete_orphans(result))
        try:
            broken: str | None = None
            try:
                self._launch(result)
            except RunbookError as exc:
                result.report.add(LAUNCH.failed(str(exc)))
                broken = "launch"
            probes = [(LINK_TRIGGER, self._link_trigger), (LINK_EDGE_FUNCTION, self._link_edge_function),
                      (LINK_FLOW_RUN, self._link_flow_run), (LINK_WORK_POOL, self._link_work_pool),
                      (LINK_ITEMS, self._link_items)]
            for link, probe in probes:
                if broken is not None:
                    failed = "the launch" if broken == "launch" else LINKS[broken]
                    result.report.add(LINK_DEFS[link].skipped(f"not checked: {failed} failed", after=broken))
                    continue
                check = result.report.add(LINK_DEFS[link].attempt(lambda: probe(result)))
                self._echo(check)
                if check.status == Status.FAIL:
                    broken = link
        finally:
            self.progress.close()
            if self._launched is not None:
                try:
                    self._collect_timeline(result)
                except RunbookError as exc:
                    result.report.add(TIMELINE.warned(str(exc)))
                if self.options.cleanup:
                    result.report.add(self._cleanup(result))
        return result

    def _echo(self, check: Check) -> None:
        at = check.data.get("elapsed_ms")
        timing = f" at {at / 1000:.1f}s" if isinstance(at, (int, float)) else ""
        self.out(f"{check.status.value.upper():4} {check.title}{timing}: {check.detail.splitlines()[0] if check.detail else ''}")

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _launch(self, result: E2EResult) -> None:
        o = self.options
        tag = uuid.uuid4().hex[:8]
        launched_by = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
                       "step": self.step, "max_seconds": self._max_seconds(), "keep": not o.cleanup}
        self._launched = launched = self.db.launch_batch(
            o.client_id, o.workstream, o.blueprint, batch_items_for_test(tag, o.item_count, launched_by),
            direct_pending=o.launch_mode == "direct_pending",
        )
        self._t0 = time.monotonic()
        result.batch_id, result.item_ids = launched.batch_id, list(launched.item_ids)
        if self.on_launch is not None:
            self.on_launch(launched)
        how = ("inserted INITIALIZING with its items and PENDING states, then flipped to PENDING (the UI's way)"
               if o.launch_mode == "ui" else "inserted directly as PENDING (the UI path that never fires the trigger)")
        result.report.add(LAUNCH.passed(
            f"batch {launched.batch_id}: {o.item_count} item(s) for step "
            f"{o.first_step}, {how}", batch_id=launched.batch_id, launch_mode=o.launch_mode,
        ))
        self.out(f"launched test batch {launched.batch_id} ({o.item_count} item(s), {o.launch_mode})")

    def _wait(self, what: str, timeout: float, probe: Callable[[], Any], interval: float | None = None) -> Any:
        """Call `probe()` until it returns something truthy or `timeout` seconds pass (then None)."""
        deadline = time.monotonic() + timeout
        interval = interval or self.options.poll_interval_seconds
        while True:
            found = probe()
            if found:
                return found
            if time.monotonic() >= deadline:
                return None
            self.progress.update(what, self._elapsed(), self._counts_now())
            time.sleep(max(0.05, min(interval, deadline - time.monotonic())))

    # -- link 1 --------------------------------------------------------------------------------
    def _link_trigger(self, result: E2EResult) -> Check:
        o = self.options
        batch = result.batch_id
        if not self.db.has_relation("runbook.trigger_requests"):
            return LINK_DEFS[LINK_TRIGGER].failed("runbook.trigger_requests does not exist: the trigger's pg_net request cannot be matched to the batch "
                "(net._http_response has no URL column)",
                "apply the runbook's database additions (runbook_sandbox/sql/004_trigger_requests.sql and a trigger "
                "function that records its request id), then re-run this step",
            )

        def answered() -> Any:
            ids = self.db.trigger_request_ids(batch)
            responses = self.db.http_responses(ids) if ids else []
            return (ids, responses[0]) if responses else None

        found = self._wait("link 1: waiting for the trigger's pg_net request", o.trigger_timeout_seconds, answered,
                           interval=min(o.poll_interval_seconds, 0.5))
        if found:
            ids, response = found
            self._response = response
            elapsed = ms(response["created"], self._launched.launched_at)
            return LINK_DEFS[LINK_TRIGGER].passed(f"pg_net request {response['id']} answered {elapsed / 1000:.2f}s after the launch: status "
                f"{response['status_code']}, timed_out {response['timed_out']}, error_msg {response['error_msg'] or 'none'}",
                elapsed_ms=elapsed, request_id=response["id"], status_code=response["status_code"],
                timed_out=response["timed_out"], error_msg=response["error_msg"],
            )
        ids = self.db.trigger_request_ids(batch)
        waited = f"within {o.trigger_timeout_seconds:g}s"
        if ids:
            queued = self.db.queued_requests(ids)
            return LINK_DEFS[LINK_TRIGGER].failed(f"the trigger queued pg_net request {ids[0]} but no response was recorded {waited}"
                + (" (it is still in net.http_request_queue: nothing is sending)" if queued else ""),
                "pg_net's background worker is not sending requests: check the pg_net extension (Database > "
                "Extensions) and its worker; rows of net._http_response expire after about 6 hours",
                request_id=ids[0], still_queued=bool(queued),
            )
        if o.launch_mode == "direct_pending":
            return LINK_DEFS[LINK_TRIGGER].failed(f"no pg_net request for batch {batch} {waited}: it was inserted directly as PENDING "
                "(launch_mode=direct_pending), and trigger_batch_ready fires only on the INITIALIZING -> PENDING flip",
                "launch batches the UI's way: insert them INITIALIZING, add the items and states, then UPDATE the "
                "status to PENDING; a batch already inserted as PENDING needs a flow run started by hand",
            )
        trigger = self.db.trigger()
        if trigger is None:
            cause, fix = ("trigger_batch_ready does not exist on public.batches",
                          "re-create the trigger and its function notify_prefect_on_batch_insert() (see the contract; "
                          "step 01 checks it)")
        elif not trigger.enabled:
            cause, fix = ("trigger_batch_ready is disabled",
                          "ALTER TABLE public.batches ENABLE TRIGGER trigger_batch_ready")
        elif not trigger.fires_on_initializing_to_pending:
            cause, fix = (f"trigger_batch_ready does not fire on the INITIALIZING -> PENDING flip: {trigger.definition}",
                          "re-create it AFTER UPDATE ... WHEN (OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING')")
        else:
            cause, fix = ("the trigger exists, but no request id was recorded in runbook.trigger_requests",
                          "make the trigger function record its pg_net request id in runbook.trigger_requests "
                          "(the runbook's database additions)")
        return LINK_DEFS[LINK_TRIGGER].failed(f"no pg_net request for batch {batch} {waited}: {cause}", fix)

    # -- link 2 --------------------------------------------------------------------------------
    def _link_edge_function(self, result: E2EResult) -> Check:
        r = self._response
        elapsed = ms(r["created"], self._launched.launched_at)
        facts = {"elapsed_ms": elapsed, "request_id": r["id"], "status_code": r["status_code"]}
        if r["timed_out"]:
            return LINK_DEFS[LINK_EDGE_FUNCTION].failed(f"pg_net gave up waiting for the Edge Function (timed_out, {r['error_msg'] or 'no message'}): the "
                "function waits on Prefect's create_flow_run, so a slow Prefect API makes the trigger time out",
                "check the function's logs (Edge Functions > trigger-prefect-orchestrator > Logs) and Prefect's API "
                "latency; raise timeout_milliseconds in the trigger's net.http_post call (default 5000)", **facts,
            )
        if r["error_msg"] or r["status_code"] is None:
            return LINK_DEFS[LINK_EDGE_FUNCTION].failed(f"the Edge Function could not be reached: {r['error_msg'] or 'no status code recorded'}",
                "check that the function trigger-prefect-orchestrator is deployed and serving at the URL the trigger "
                "posts to (`supabase functions deploy trigger-prefect-orchestrator`; step 01 checks the URL)", **facts,
            )
        body = as_json(r["content"])
        status = r["status_code"]
        if status == 200 and isinstance(body, dict) and body.get("flow_run_id"):
            result.flow_run_id = str(body["flow_run_id"])
            return LINK_DEFS[LINK_EDGE_FUNCTION].passed(f"200 after {elapsed / 1000:.2f}s: flow run {result.flow_run_id}",
                                flow_run_id=result.flow_run_id, **facts)
        error = body.get("error") if isinstance(body, dict) else None
        if status == 200:
            cause = f"200 without a flow_run_id: {short(r['content'])}"
            fix = "deploy the contract's version of the function (its 200 answer carries flow_run_id)"
        elif error == "Server configuration error":
            missing = body.get("missing") or []
            cause = f"500 Server configuration error: the function's secret(s) {missing} are not set"
            fix = (f"set {missing} (`supabase secrets set NAME=<value>`; PREFECT_DEPLOYMENT_ID with step 04)")
        elif error == "Failed to trigger Prefect flow run":
            prefect_status = body.get("status")
            details = short(json.dumps(body.get("details")) if not isinstance(body.get("details"), str) else body["details"])
            cause = f"500: Prefect answered {prefect_status} to create_flow_run ({details})"
            if prefect_status == 404:
                cause += (": the function's PREFECT_DEPLOYMENT_ID names no deployment of this workspace (a stale id "
                          "after a redeploy under a new name, or another workspace)")
                fix = (f"run step 04 to set PREFECT_DEPLOYMENT_ID to {self.deployment.id} ({self.deployment.name}), "
                       "and check PREFECT_ACCOUNT_ID / PREFECT_WORKSPACE_ID")
            elif prefect_status in (401, 403):
                fix = "set the function's PREFECT_API_KEY to a valid key of this workspace"
            else:
                fix = "read the details above and the function's logs; check Prefect's status"
        elif status in (401, 403):
            cause = f"{status} from the functions gateway: the trigger's anon key was refused"
            fix = "write the project's current anon key into the trigger function (step 01 checks the trigger)"
        else:
            cause = f"{status}: {short(r['content'])}"
            fix = "read the function's logs (Edge Functions > trigger-prefect-orchestrator > Logs)"
        return LINK_DEFS[LINK_EDGE_FUNCTION].failed(cause, fix, edge_function_error=error, **facts)

    # -- link 3 --------------------------------------------------------------------------------
    def _link_flow_run(self, result: E2EResult) -> Check:
        run = self.api.read_flow_run(result.flow_run_id)
        if run is None:
            return LINK_DEFS[LINK_FLOW_RUN].failed(f"the Edge Function reported flow run {result.flow_run_id}, which this workspace does not have: the "
                "function creates runs in another workspace",
                "set the function's PREFECT_ACCOUNT_ID / PREFECT_WORKSPACE_ID (and PREFECT_API_KEY) to this workspace "
                "(step 04 checks them by digest)",
            )
        self._run = run
        result.flow_run_name = run.name
        elapsed = ms(run.created, self._launched.launched_at)
        facts = {"elapsed_ms": elapsed, "flow_run_id": str(run.id), "flow_run_name": run.name,
                 "deployment_id": str(run.deployment_id) if run.deployment_id else None}
        if str(run.deployment_id) != self.deployment.id:
            other = self.api.read_deployment_by_id(run.deployment_id) if run.deployment_id else None
            other_name = f"{other.name} ({run.deployment_id})" if other is not None else str(run.deployment_id)
            return LINK_DEFS[LINK_FLOW_RUN].failed(f"flow run {run.name} belongs to deployment {other_name}, not {self.deployment.name} "
                f"({self.deployment.id}): the Edge Function's PREFECT_DEPLOYMENT_ID points at another deployment "
                "(stale after a redeploy under a new name?)",
                f"run step 04 to set PREFECT_DEPLOYMENT_ID to {self.deployment.id}", **facts,
            )
        if run.created < self._launched.launched_at - CLOCK_SKEW_TOLERANCE:
            return LINK_DEFS[LINK_FLOW_RUN].failed(f"flow run {run.name} was created {abs(elapsed) / 1000:.1f}s BEFORE the launch: it was not started by "
                "this batch's trigger",
                "check what the function returns (it must create a new flow run per call), then re-run this step",
                **facts,
            )
        return LINK_DEFS[LINK_FLOW_RUN].passed(f"{run.name} of {self.deployment.name}, created {elapsed / 1000:.2f}s after the launch",
                            **facts)

    # -- link 4 --------------------------------------------------------------------------------
    def _link_work_pool(self, result: E2EResult) -> Check:
        o = self.options
        run_id = result.flow_run_id

        def terminal() -> Any:
            run = self.api.read_flow_run(run_id)
            self._run = run
            state = run.state.type.value if run and run.state else None
            if state == "RUNNING" and self._running_at is None:
                self._running_at = run.state.timestamp
            if state in FINAL_STATE_TYPES and self._terminal_seen is None:
                self._terminal_seen = time.monotonic()
            return run if state in FINAL_STATE_TYPES else None

        def phase() -> str:
            return f"link 4: flow run {result.flow_run_name} {self._run.state.name if self._run and self._run.state else '?'}"

        deadline = time.monotonic() + o.flow_run_timeout_seconds
        final = None
        while final is None and time.monotonic() < deadline:
            final = terminal()
            if final is None:
                self.progress.update(phase(), self._elapsed(), self._counts_now())
                time.sleep(max(0.05, min(o.poll_interval_seconds, deadline - time.monotonic())))
        final = final or terminal()
        run = self._run
        result.flow_run_state = run.state.type.value if run.state else None
        states = self.api.read_flow_run_states(run_id)
        running = next((s.timestamp for s in states if s.type.value == "RUNNING"), None) or self._running_at
        self._running_at = running
        facts = {"flow_run_id": run_id, "work_pool": run.work_pool_name, "state": result.flow_run_state,
                 "running_ms": ms(running, self._launched.launched_at)}
        if run.work_pool_name != self.expected_pool:
            return LINK_DEFS[LINK_WORK_POOL].failed(f"flow run {run.name} is on work pool {run.work_pool_name!r}, not "
                f"{self.expected_pool!r}", f"deploy to {self.expected_pool} (step 03), then re-run this step", **facts,
            )
        if final is None:
            if running is None:
                return LINK_DEFS[LINK_WORK_POOL].failed(f"flow run {run.name} never started: still {run.state.name if run.state else 'without a state'} "
                    f"{o.flow_run_timeout_seconds:g}s after it was seen; {pool_diagnosis(self.api, self.expected_pool)}",
                    f"make the pool {self.expected_pool} run it: start a worker for it (`prefect worker start --pool "
                    f"{self.expected_pool}`), or for a Prefect Managed pool check in the Prefect UI that the pool is "
                    "not paused and the workspace's managed-execution limits; then re-run this step "
                    "(cancel the Late run in the UI if it should not run any more)", **facts,
                )
            return LINK_DEFS[LINK_WORK_POOL].failed(f"flow run {run.name} started but is still {run.state.name} after {o.flow_run_timeout_seconds:g}s\n"
                + self._logs_tail(run_id),
                "read the logs above; raise flow_run_timeout if the run is just slow", **facts,
            )
        finished = run.end_time or (run.state.timestamp if run.state else None)
        facts["elapsed_ms"] = ms(finished, self._launched.launched_at)
        path = " -> ".join(dict.fromkeys(s.name for s in states)) or (run.state.name if run.state else "?")
        if result.flow_run_state == "COMPLETED":
            return LINK_DEFS[LINK_WORK_POOL].passed(f"{run.name} ran on {run.work_pool_name} ({path}): running {seconds(facts['running_ms'])} and "
                f"completed {seconds(facts['elapsed_ms'])} after the launch", **facts,
            )
        message = redact(run.state.message or "no state message")
        detail = (f"{run.name} on {run.work_pool_name} ended {run.state.name} ({path}), "
                  f"{seconds(facts['elapsed_ms'])} after the launch: {message}\n" + self._logs_tail(run_id))
        if running is not None and self._items_claimed(result.batch_id):
            return LINK_DEFS[LINK_WORK_POOL].warned(detail + "\nIt did run and claimed test items: the items' link says what "
                "became of them.", "read the state message and logs above", **facts,
            )
        fix = ("read the state message and logs above: a missing module needs deployment.pip_packages (or, on a "
               "process pool, the worker's environment), a missing Secret block must be created, a flow error must be "
               "fixed in the repository; then re-run this step")
        return LINK_DEFS[LINK_WORK_POOL].failed(detail, fix, **facts)

    def _logs_tail(self, run_id: str) -> str:
        try:
            logs = self.api.flow_run_logs(run_id)
        except PrefectApiError as exc:
            return f"(logs unavailable: {exc})"
        if not logs:
            return "(no log lines)"
        return "last log lines:\n" + "\n".join(logs[-LOG_LINES:])

    # -- link 5 --------------------------------------------------------------------------------
    def _link_items(self, result: E2EResult) -> Check:
        """Wait until every item reached the target, or the outcome is certain (the flow run is over
        and the items are left where nothing moves them, or have not changed for settle_seconds),
        or the completion timeout; then say which items are stuck where, and why, from the
        evidence: the states' meta, the registry, the flow run's final state and its logs."""
        o = self.options
        target = o.target_status
        deadline = self._t0 + o.completion_timeout_seconds
        while True:
            rows = self.db.item_states(result.batch_id, o.first_step)
            counts = count(rows)
            done = sum(1 for r in rows if reached(r["status"], target))
            if done == len(result.item_ids):
                ended = "all reached the target"
                break
            ended = self._settled(rows) or self._quiet(result, rows)
            if ended or time.monotonic() >= deadline:
                break
            self.progress.update(f"link 5: items moving towards {target}", self._elapsed(), counts, done)
            time.sleep(max(0.05, min(o.poll_interval_seconds, deadline - time.monotonic())))
        concluded_at = datetime.now(timezone.utc)
        self.progress.update(f"link 5: items moving towards {target}", self._elapsed(), counts, done)
        transitions = [t for t in self.db.transitions(result.batch_id) if t["step_name"] == o.first_step]
        paths: dict[str, list[str]] = {}
        for t in transitions:
            paths.setdefault(str(t["item_id"]), []).append(t["to_status"])
        result.state_counts = counts
        good = [r for r in rows
                if reached(r["status"], target) and follows(paths.get(str(r["item_id"]), []), o.expected_path)]
        last = max((t["at"] for t in transitions if t["to_status"] == target), default=None)
        facts = {"elapsed_ms": ms(last, self._launched.launched_at), "counts": counts, "reached": len(good),
                 "items": len(result.item_ids), "target": target}
        wanted = " -> ".join(o.expected_path)
        if len(good) == len(result.item_ids):
            return LINK_DEFS[LINK_ITEMS].passed(f"all {len(good)} item(s) recorded {wanted} for step {o.first_step}; the last "
                f"reached {target} {seconds(facts['elapsed_ms'])} after the launch", **facts,
            )
        evidence = read_run_evidence(self.api, result.flow_run_id) if result.flow_run_id else None
        result.stuck = stuck_items(o, rows, paths, good, registry=self.db.registry(o.workstream),
                                   run_state=result.flow_run_state,
                                   batch_size=self.deployment.parameters.get("batch_size"), evidence=evidence)
        good_ids = {str(r["item_id"]) for r in good}
        stuck_rows = [r for r in rows if str(r["item_id"]) not in good_ids]
        stuck_ids = [str(r["item_id"]) for r in stuck_rows]
        by_state = {status: n for status, n in count(stuck_rows).items() if n}  # stuck items per state
        run = self._run
        finished = (run.end_time or (run.state.timestamp if run.state else None)) if run is not None else None
        after_end = ms(concluded_at, finished)
        if ended:
            when = (f"concluded {seconds(after_end)} after the flow run ended ({ended})" if after_end is not None
                    else f"concluded: {ended}")
        else:
            when = f"waited the whole completion timeout ({o.completion_timeout_seconds:g}s from the launch)"
        lines = [f"{len(good)} of {len(result.item_ids)} item(s) recorded {wanted} for step {o.first_step}; {when}; "
                 f"counts now {counts}.",
                 "Stuck: " + ", ".join(f"{n} {status}" for status, n in by_state.items()) + ":"]
        lines += [f"- {g['count']} at {g['status']}: {g['cause']} (e.g. {', '.join(g['examples'])})" for g in result.stuck]
        if evidence is not None:
            named = evidence.names_items(stuck_ids)
            lines.append("Evidence: " + evidence.describe()
                         + (f"\n  the dispatch errors name {named} of the {len(stuck_ids)} stuck test item(s)" if named else ""))
        fixes = list(dict.fromkeys(g["remediation"] for g in result.stuck))
        return LINK_DEFS[LINK_ITEMS].failed(
            "\n".join(lines), " ".join(fixes), stuck=result.stuck, stuck_counts=by_state, concluded=ended or "timeout",
            concluded_at=concluded_at.isoformat(), flow_run_ended_at=finished.isoformat() if finished else None,
            after_flow_run_end_ms=after_end, flow_run_state=result.flow_run_state,
            dispatch_errors=evidence.quoted() if evidence else [], evidence_unavailable=evidence.unavailable if evidence else None,
            **facts)

    def _settled(self, rows: list[dict[str, Any]]) -> str | None:
        """Nothing can move any more without another trigger: the flow run is over and every item is
        PENDING (left for a later run), FAILED or at the target. Says so, or None."""
        if self._run_state() not in FINAL_STATE_TYPES:
            return None
        if all(r["status"] in ("PENDING", "FAILED") or reached(r["status"], self.options.target_status) for r in rows):
            return "every item left PENDING, FAILED or at the target"
        return None

    def _quiet(self, result: E2EResult, rows: list[dict[str, Any]]) -> str | None:
        """The flow run is over and no item changed for settle_seconds (on the database's clock, and
        since the run was seen ending), none of them in the enrichment service's hands (IN_PROGRESS
        towards COMPLETED): nothing is coming for them. Says so, or None."""
        o = self.options
        if self._run_state() not in FINAL_STATE_TYPES or self._terminal_seen is None:
            return None
        if any(r["status"] == "IN_PROGRESS" and not reached(r["status"], o.target_status) for r in rows):
            return None
        since_end = time.monotonic() - self._terminal_seen
        unchanged = self.db.quiet_seconds(result.batch_id, o.first_step)
        quiet = min(since_end, unchanged if unchanged is not None else since_end)
        if quiet < o.settle_seconds:
            return None
        return f"the flow run is {self._run_state()} and no item changed for {quiet:.1f}s (settle_seconds {o.settle_seconds:g})"

    def _run_state(self) -> str | None:
        return self._run.state.type.value if self._run is not None and self._run.state else None

    # -- database reads and the timeline ---------------------------------------------------------
    def _counts_now(self) -> dict[str, int]:
        if self._launched is None:
            return {}
        try:
            return count(self.db.item_states(self._launched.batch_id, self.options.first_step))
        except DatabaseError:
            return {}

    def _items_claimed(self, batch_id: str) -> bool:
        return self.db.claimed_count(batch_id, self.options.first_step) > 0

    def _collect_timeline(self, result: E2EResult) -> None:
        first = self.options.first_step
        transitions = [t for t in self.db.transitions(result.batch_id) if t["step_name"] == first]
        timeline.collect(result, origin=self._launched.launched_at, response=self._response, run=self._run,
                         running_at=self._running_at, transitions=transitions,
                         observed_until_ms=round(self._elapsed() * 1000, 1),
                         rows=[] if result.state_counts else self.db.item_states(result.batch_id, first))

    # -- orphaned test batches of earlier runs ---------------------------------------------------
    def _max_seconds(self) -> float:
        o = self.options
        return o.trigger_timeout_seconds + o.flow_run_timeout_seconds + o.completion_timeout_seconds + ORPHAN_MARGIN_SECONDS

    def _orphaned(self, batch: dict[str, Any]) -> tuple[bool, str]:
        """(orphaned?, why) for a test batch: its launching process is gone (same host), or it is older
        than its test could take; a batch kept on purpose (cleanup=False) never is."""
        by = batch.get("launched_by") or {}
        age = float(batch["age_seconds"] or 0)
        if by.get("keep"):
            return False, "kept on purpose (cleanup=False)"
        if by.get("host") == socket.gethostname() and by.get("pid"):
            alive = _process_alive(by["pid"], by.get("pid_started"))
            who = f"launched by process {by['pid']} on this host"
            return (False, f"{who}, still running") if alive else (True, f"{who}, which is gone")
        limit = float(by.get("max_seconds") or self._max_seconds())
        where = f"launched on {by['host']}" if by.get("host") else "launched by an older runbook"
        if age > limit:
            return True, f"{where} {age:.0f}s ago, past its test's deadline ({limit:g}s)"
        return False, f"{where} {age:.0f}s ago, within its test's deadline ({limit:g}s)"

    def _delete_orphans(self, result: E2EResult) -> Check:
        """Delete the test batches earlier end-to-end tests left behind (killed before their cleanup),
        with the step's normal cleanup, and say which; a batch whose test may still run is left alone."""
        try:
            batches = self.db.e2e_test_batches(self.options.client_id)
        except DatabaseError as exc:
            return ORPHANS.warned(f"could not look for orphaned test batches: {exc}")
        deleted, kept, failed = [], [], []
        for batch in batches:
            orphaned, why = self._orphaned(batch)
            line = f"{batch['batch_id']} ({batch['status']}, {batch['items']} item(s), created {batch['created_at']:%Y-%m-%d %H:%M:%S %Z}: {why})"
            if not orphaned:
                kept.append(line)
                continue
            try:
                self.db.delete_batch(batch["batch_id"])
            except DatabaseError as exc:
                failed.append(f"{line}: {exc}")
                continue
            deleted.append(line)
            result.orphans_deleted.append(batch["batch_id"])
            self.out(f"deleted orphaned test batch {line}")
        lines = ([f"deleted {len(deleted)} orphaned test batch(es) of earlier runs:"] + [f"- {d}" for d in deleted]
                 if deleted else ["no orphaned test batch of an earlier run"])
        if kept:
            lines += [f"left alone {len(kept)} test batch(es) that are not orphaned:"] + [f"- {k}" for k in kept]
        facts = {"deleted": list(result.orphans_deleted), "kept": len(kept)}
        if failed:
            return ORPHANS.warned("\n".join(lines + ["could not delete:"] + [f"- {f}" for f in failed]), **facts)
        return ORPHANS.passed("\n".join(lines), **facts)

    def _cleanup(self, result: E2EResult) -> Check:
        try:
            existed = self.db.delete_batch(result.batch_id)
        except DatabaseError as exc:
            return CLEANUP.warned(f"deleting test batch {result.batch_id} failed: {exc}",
                                f"delete it by hand: DELETE FROM public.batches WHERE id = '{result.batch_id}' "
                                "(items, states and results cascade)")
        result.cleaned_up = True
        return CLEANUP.passed(f"test batch {result.batch_id} with its items, states, results and audit "
                            f"rows {'deleted' if existed else 'was already gone'}")


def _process_alive(pid: Any, started: Any) -> bool:
    """The process `pid` runs, and is the one that started at `started` (not a reused pid)."""
    try:
        process = psutil.Process(int(pid))
        return started is None or abs(process.create_time() - float(started)) < 1.0
    except (psutil.Error, ValueError, TypeError):
        return False
