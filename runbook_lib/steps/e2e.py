"""Step 05: the end-to-end test. A test batch goes through the real chain, and each link is proven
in order, with its timing:

1. the trigger fired: the pg_net request the trigger queued for this batch (matched by request id
   through `runbook.trigger_requests`) got a response (status, `timed_out`, `error_msg`);
2. the Edge Function answered 200 with a flow run id;
3. that flow run exists, belongs to the expected deployment and was created after the launch;
4. it ran on the expected work pool: RUNNING, then a terminal state (its logs and state message
   when it failed; "never started" within the timeout when no worker takes it);
5. every test item moved PENDING -> QUEUED -> IN_PROGRESS (-> COMPLETED when the profile expects
   it), as recorded in `runbook.workflow_state_transitions`; items stuck at a status are listed
   with the likely cause (the contract's failure modes).

A failing link makes the later links SKIP, so the step fails naming the link that broke. The batch
is launched the way the admin UI does (INITIALIZING, items and PENDING states, then the flip) for
the profile's dedicated test client, or inserted directly as PENDING (`launch_mode="direct_pending"`)
to reproduce that failure mode on purpose. Only the test batch's own rows are touched, and they are
deleted at the end (`cleanup=True`), also after a failure. The timeline (ms offsets from the launch,
on the database's and Prefect's clocks) feeds a figure and a table.
"""

from __future__ import annotations

import html
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from runbook_lib.core import secrets as redaction
from runbook_lib.checks.base import Check, CheckReport, Status
from runbook_lib.systems.database import Database, LaunchedBatch
from runbook_lib.core.errors import DatabaseError, PrefectApiError, ResultsError, RunbookError
from runbook_lib.notebook.gate import interactive_front_end, parse_confirm
from runbook_lib.systems.prefect import FINAL_STATE_TYPES, PrefectApi

STEP = "05_end_to_end_test"
DEPLOY_STEP = "03_deploy"
LAUNCH_MODES = ("ui", "direct_pending")
STATUSES = ("PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED")
# A flow run created this long before the launch (clock skew between the database and Prefect
# allowed for) was not started by this batch.
CLOCK_SKEW_TOLERANCE = timedelta(seconds=5)
LOG_LINES = 30
STUCK_EXAMPLES = 5

LINK_TRIGGER = "link1.trigger"
LINK_EDGE_FUNCTION = "link2.edge_function"
LINK_FLOW_RUN = "link3.flow_run"
LINK_WORK_POOL = "link4.work_pool_run"
LINK_ITEMS = "link5.items"
LINKS = {
    LINK_TRIGGER: "Link 1: the trigger fired and pg_net got an answer",
    LINK_EDGE_FUNCTION: "Link 2: the Edge Function answered 200 with a flow run id",
    LINK_FLOW_RUN: "Link 3: the flow run exists, belongs to the deployment, was created after the launch",
    LINK_WORK_POOL: "Link 4: the flow run ran on the work pool and reached a terminal state",
    LINK_ITEMS: "Link 5: every test item moved through the pipeline",
}
LANES = {  # the figure's lane of each link
    LINK_TRIGGER: "1 trigger / pg_net", LINK_EDGE_FUNCTION: "2 Edge Function", LINK_FLOW_RUN: "3 flow run created",
    LINK_WORK_POOL: "4 flow run on pool", LINK_ITEMS: "5 items",
}


class E2EError(RunbookError):
    """The end-to-end test cannot start (bad parameter, unknown deployment, missing test client)."""


# -- options -----------------------------------------------------------------------------------------


@dataclass
class E2EOptions:
    """What to launch and how long to wait; None parameters take the profile's `[e2e]` values."""

    client_id: str
    workstream: str
    blueprint: list[str]
    item_count: int
    trigger_timeout: float
    flow_run_timeout: float
    completion_timeout: float
    poll_interval: float
    expect_completed: bool
    launch_mode: str = "ui"
    cleanup: bool = True

    @classmethod
    def from_settings(
        cls, settings: Any, *, n_items: Any = None, blueprint: Any = None, trigger_timeout: Any = None,
        flow_run_timeout: Any = None, completion_timeout: Any = None, poll_interval: Any = None,
        expect_completed: Any = None, launch_mode: Any = "ui", cleanup: Any = True,
    ) -> "E2EOptions":
        """Validated options; a bad value raises E2EError naming it (nothing is launched)."""
        e2e = settings.e2e
        problems: list[str] = []

        def number(name: str, value: Any, default: float, *, integer: bool = False, low: float = 0) -> Any:
            if value in (None, ""):
                return default
            try:
                out = int(value) if integer else float(value)
                if isinstance(value, bool) or (integer and float(value) != out):
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{name} must be a{'n integer' if integer else ' number'}, got {value!r}")
                return default
            if out <= low:
                problems.append(f"{name} must be greater than {low:g}, got {value!r}")
            return out

        count = number("n_items", n_items, e2e.item_count, integer=True)
        if isinstance(count, int) and count > 1000:
            problems.append(f"n_items must be at most 1000, got {count}")
        steps = e2e.blueprint if blueprint in (None, "", []) else blueprint
        if isinstance(steps, str):
            steps = [s.strip() for s in steps.split(",") if s.strip()]
        if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) and s for s in steps):
            problems.append(f"blueprint must be a non-empty list of step slugs, got {blueprint!r}")
            steps = list(e2e.blueprint)
        mode = str(launch_mode or "ui").strip().lower()
        if mode not in LAUNCH_MODES:
            problems.append(f"launch_mode must be one of {list(LAUNCH_MODES)}, got {launch_mode!r}")
        try:
            clean = True if cleanup is None else parse_confirm(cleanup)
        except RunbookError:
            clean = None
        if clean is None:
            problems.append(f"cleanup must be true or false, got {cleanup!r}")
        try:
            expect = e2e.expect_completed if expect_completed is None else parse_confirm(expect_completed)
        except RunbookError:
            expect = None
        if expect is None:
            problems.append(f"expect_completed must be true or false, got {expect_completed!r}")
        options = cls(
            client_id=e2e.client_id, workstream=e2e.workstream, blueprint=list(steps), item_count=count,
            trigger_timeout=number("trigger_timeout", trigger_timeout, e2e.trigger_timeout_seconds),
            flow_run_timeout=number("flow_run_timeout", flow_run_timeout, e2e.flow_run_timeout_seconds),
            completion_timeout=number("completion_timeout", completion_timeout, e2e.completion_timeout_seconds),
            poll_interval=number("poll_interval", poll_interval, e2e.poll_interval_seconds),
            expect_completed=bool(expect), launch_mode=mode, cleanup=bool(clean),
        )
        if problems:
            raise E2EError("end-to-end test parameters are not usable: " + "; ".join(problems) + "; nothing was launched")
        return options

    @property
    def first_step(self) -> str:
        return self.blueprint[0]

    @property
    def target_status(self) -> str:
        return "COMPLETED" if self.expect_completed else "IN_PROGRESS"

    @property
    def expected_path(self) -> list[str]:
        return ["PENDING", "QUEUED", "IN_PROGRESS"] + (["COMPLETED"] if self.expect_completed else [])


def batch_items_for_test(batch_tag: str, count: int) -> list[dict[str, Any]]:
    """The test batch's items: recognisable, fake companies and people (no real data)."""
    return [
        {
            "company_name": f"Runbook E2E {batch_tag} #{i}",
            "company_domain": f"e2e-{batch_tag}-{i}.example.com",
            "person_first_name": "Test",
            "person_last_name": f"Item{i}",
            "person_title": "End-to-end test item",
            "original_data": {"runbook_e2e": True, "tag": batch_tag, "index": i},
        }
        for i in range(1, count + 1)
    ]


# -- the expected deployment -------------------------------------------------------------------------


@dataclass
class ExpectedDeployment:
    id: str
    name: str  # flow/deployment
    work_pool: str | None
    source: str  # where the id came from
    parameters: dict[str, Any] = field(default_factory=dict)


def resolve_deployment(settings: Any, api: PrefectApi, *, deployment_id: Any = None, previous: Any = None) -> ExpectedDeployment:
    """The deployment the chain must start: the `deployment_id` parameter, else step 03's results
    (`previous()` returns them), else the profile's deployment looked up by name."""
    source = "the deployment_id parameter"
    if deployment_id in (None, "") and previous is not None:
        try:
            deployment_id = previous().value("deployment_id")
            source = f"step {DEPLOY_STEP}'s results"
        except ResultsError:
            deployment_id = None
    if deployment_id in (None, ""):
        name = settings.deployment.name
        found = [d for d in api.read_deployments_named(name) if d.work_pool_name == settings.deployment.work_pool]
        if not found:
            raise E2EError(
                f"no deployment named {name!r} on work pool {settings.deployment.work_pool!r} in this workspace: run "
                f"step {DEPLOY_STEP} first (or pass -p deployment_id <uuid>); nothing was launched"
            )
        if len(found) > 1:
            raise E2EError(
                f"{len(found)} deployments are named {name!r} on pool {settings.deployment.work_pool!r} "
                f"({', '.join(str(d.id) for d in found)}): pass -p deployment_id <uuid>; nothing was launched"
            )
        deployment_id, source = found[0].id, f"the profile's deployment {name!r}, looked up by name"
    try:
        wanted = uuid.UUID(str(deployment_id).strip())
    except ValueError:
        raise E2EError(f"deployment_id {str(deployment_id)[:80]!r} is not a UUID; nothing was launched") from None
    deployment = api.read_deployment_by_id(wanted)
    if deployment is None:
        raise E2EError(f"deployment {wanted} (from {source}) does not exist in this workspace: run step {DEPLOY_STEP} "
                       "again, or pass the id it recorded; nothing was launched")
    flow = api.call("reading the deployment's flow", lambda c: c.read_flow(deployment.flow_id))
    return ExpectedDeployment(str(wanted), f"{flow.name}/{deployment.name}", deployment.work_pool_name, source,
                              dict(deployment.parameters or {}))


# -- progress ----------------------------------------------------------------------------------------


class Progress:
    """Progress while waiting: a tqdm bar in a notebook with a front end, plain log lines headless
    (one when the phase or the counts change, else every `every` seconds)."""

    def __init__(self, total: int, *, interactive: bool | None = None, every: float = 10.0,
                 out: Callable[[str], None] = print):
        self.total = total
        self.interactive = interactive_front_end() if interactive is None else interactive
        self.every = every
        self.out = out
        self._bar: Any = None
        self._last: tuple[str, str] | None = None
        self._last_at = 0.0

    def update(self, phase: str, elapsed: float, counts: dict[str, int] | None = None, done: int | None = None) -> None:
        shown = ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v)
        if self.interactive:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total, desc="end-to-end test",
                                 bar_format="{desc}: {n}/{total} items at target |{bar}| {elapsed} {postfix}")
            self._bar.set_description_str(phase[:60])
            if done is not None:
                self._bar.n = done
            self._bar.set_postfix_str(shown)
            self._bar.refresh()
            return
        now = time.monotonic()
        if (phase, shown) != self._last or now - self._last_at >= self.every:
            self.out(f"[{elapsed:7.1f}s] {phase}" + (f" | items: {shown}" if shown else ""))
            self._last, self._last_at = (phase, shown), now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- the result --------------------------------------------------------------------------------------


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
        }


def _ms(at: datetime | None, origin: datetime | None) -> float | None:
    if at is None or origin is None:
        return None
    return round((at - origin).total_seconds() * 1000, 1)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


# -- the test ----------------------------------------------------------------------------------------


class EndToEndTest:
    """Launch one test batch and prove each link of the chain; see the module doc."""

    def __init__(self, settings: Any, options: E2EOptions, deployment: ExpectedDeployment, *, step: str = STEP,
                 db: Database | None = None, api: PrefectApi | None = None, progress: Progress | None = None,
                 out: Callable[[str], None] = print):
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
        self._t0 = 0.0  # monotonic at the launch
        self._run: Any = None
        self._running_at: datetime | None = None
        self._response: dict[str, Any] | None = None

    @classmethod
    def for_step(cls, ctx: Any, *, deployment_id: Any = None, **params: Any) -> "EndToEndTest":
        """Notebook cell: validate the parameters, find the deployment to expect (the parameter, step
        03's results in this run directory, else the profile's deployment by name) and the test client."""
        try:
            options = E2EOptions.from_settings(ctx.settings, **params)
            ctx.settings.require("database.url", "prefect.api_url", "prefect.api_key")
            api = PrefectApi.from_settings(ctx.settings)
            deployment = resolve_deployment(ctx.settings, api, deployment_id=deployment_id,
                                            previous=lambda: ctx.previous(DEPLOY_STEP))
            db = Database.from_settings(ctx.settings)
            if not db.client_exists(options.client_id):
                raise E2EError(
                    f"the e2e test client {options.client_id} is not in public.clients: insert it (a dedicated client, "
                    f"e.g. company_name 'Runbook E2E') or set e2e.client_id ({ctx.settings.where_to_set('e2e.client_id')}); "
                    "nothing was launched"
                )
        except RunbookError as exc:
            ctx.fail(exc)
            raise
        test = cls(ctx.settings, options, deployment, step=ctx.name, db=db, api=api)
        ctx.set("deployment_id", deployment.id)
        ctx.set("deployment_source", deployment.source)
        return test

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
            "timeouts_s": {"trigger": o.trigger_timeout, "flow_run": o.flow_run_timeout, "completion": o.completion_timeout},
        }

    def summary(self) -> str:
        return (f"launch a test batch of {self.options.item_count} item(s) ({self.options.launch_mode}) and follow it "
                f"through {self.deployment.name}")

    def confirm(self, ctx: Any) -> None:
        """Notebook cell: the launch behind the confirmation gate (it starts a real flow run)."""
        ctx.confirm_plan(self.summary(), self.gate_plan())

    # -- running -------------------------------------------------------------------------------
    def run(self, ctx: Any = None) -> E2EResult:
        """Launch, prove each link in order (later links SKIP after a failure), collect the timeline,
        then delete the test rows (when cleanup is on), also after an error. With `ctx`, the launch
        needs the gate's approval, and the checks and values are recorded in the step's results
        without ending the cell (`ctx.record_checks(result.report)` does that)."""
        if ctx is not None:
            try:
                ctx.require_approved(self.gate_plan())
            except RunbookError as exc:
                ctx.fail(exc)
                raise
        result = E2EResult(self.options, self.deployment, CheckReport(step=self.step))
        result.report.add(Check.passed(
            "deployment", "The deployment the chain must start", f"{self.deployment.name} ({self.deployment.id}) on "
            f"pool {self.deployment.work_pool}, from {self.deployment.source}", deployment_id=self.deployment.id,
        ))
        try:
            broken: str | None = None
            try:
                self._launch(result)
            except RunbookError as exc:
                result.report.add(Check.failed(
                    "launch", "Test batch launched", str(exc),
                    "check the database (DATABASE_URL), the e2e settings (client, workstream, blueprint) and the "
                    "schema, then re-run this step",
                ))
                broken = "launch"
            probes = [(LINK_TRIGGER, self._link_trigger), (LINK_EDGE_FUNCTION, self._link_edge_function),
                      (LINK_FLOW_RUN, self._link_flow_run), (LINK_WORK_POOL, self._link_work_pool),
                      (LINK_ITEMS, self._link_items)]
            for link, probe in probes:
                if broken is not None:
                    failed = "the launch" if broken == "launch" else LINKS[broken]
                    result.report.add(Check.skipped(link, LINKS[link], f"not checked: {failed} failed", after=broken))
                    continue
                check = result.report.run(link, LINKS[link], lambda: probe(result),
                                          "read the detail; fix that link and re-run this step")
                self._echo(check)
                if check.status == Status.FAIL:
                    broken = link
        finally:
            self.progress.close()
            if self._launched is not None:
                try:
                    self._collect_timeline(result)
                except RunbookError as exc:
                    result.report.add(Check.warned("timeline", "Timeline collected", str(exc),
                                                   "the checks above stand; the timeline is incomplete"))
                if self.options.cleanup:
                    result.report.add(self._cleanup(result))
        if ctx is not None:
            for key, value in result.values().items():
                ctx.set(key, value)
            ctx.results.add_checks(result.report)
            ctx.save()
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
        self._launched = launched = self.db.launch_batch(
            o.client_id, o.workstream, o.blueprint, batch_items_for_test(tag, o.item_count),
            direct_pending=o.launch_mode == "direct_pending",
        )
        self._t0 = time.monotonic()
        result.batch_id, result.item_ids = launched.batch_id, list(launched.item_ids)
        how = ("inserted INITIALIZING with its items and PENDING states, then flipped to PENDING (the UI's way)"
               if o.launch_mode == "ui" else "inserted directly as PENDING (the UI path that never fires the trigger)")
        result.report.add(Check.passed(
            "launch", "Test batch launched", f"batch {launched.batch_id}: {o.item_count} item(s) for step "
            f"{o.first_step}, {how}", batch_id=launched.batch_id, launch_mode=o.launch_mode,
        ))
        self.out(f"launched test batch {launched.batch_id} ({o.item_count} item(s), {o.launch_mode})")

    def _wait(self, what: str, timeout: float, probe: Callable[[], Any], interval: float | None = None) -> Any:
        """Call `probe()` until it returns something truthy or `timeout` seconds pass (then None)."""
        deadline = time.monotonic() + timeout
        interval = interval or self.options.poll_interval
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
        if not self._has_table("runbook.trigger_requests"):
            return Check.failed(
                LINK_TRIGGER, LINKS[LINK_TRIGGER],
                "runbook.trigger_requests does not exist: the trigger's pg_net request cannot be matched to the batch "
                "(net._http_response has no URL column)",
                "apply the runbook's database additions (runbook_sandbox/sql/004_trigger_requests.sql and a trigger "
                "function that records its request id), then re-run this step",
            )

        def answered() -> Any:
            ids = self.db.trigger_request_ids(batch)
            responses = self.db.http_responses(ids) if ids else []
            return (ids, responses[0]) if responses else None

        found = self._wait("link 1: waiting for the trigger's pg_net request", o.trigger_timeout, answered,
                           interval=min(o.poll_interval, 0.5))
        if found:
            ids, response = found
            self._response = response
            elapsed = _ms(response["created"], self._launched.launched_at)
            return Check.passed(
                LINK_TRIGGER, LINKS[LINK_TRIGGER],
                f"pg_net request {response['id']} answered {elapsed / 1000:.2f}s after the launch: status "
                f"{response['status_code']}, timed_out {response['timed_out']}, error_msg {response['error_msg'] or 'none'}",
                elapsed_ms=elapsed, request_id=response["id"], status_code=response["status_code"],
                timed_out=response["timed_out"], error_msg=response["error_msg"],
            )
        ids = self.db.trigger_request_ids(batch)
        waited = f"within {o.trigger_timeout:g}s"
        if ids:
            queued = self.db.query("SELECT count(*) AS n FROM net.http_request_queue WHERE id = ANY(%s)", (ids,))[0]["n"]
            return Check.failed(
                LINK_TRIGGER, LINKS[LINK_TRIGGER],
                f"the trigger queued pg_net request {ids[0]} but no response was recorded {waited}"
                + (" (it is still in net.http_request_queue: nothing is sending)" if queued else ""),
                "pg_net's background worker is not sending requests: check the pg_net extension (Database > "
                "Extensions) and its worker; rows of net._http_response expire after about 6 hours",
                request_id=ids[0], still_queued=bool(queued),
            )
        if o.launch_mode == "direct_pending":
            return Check.failed(
                LINK_TRIGGER, LINKS[LINK_TRIGGER],
                f"no pg_net request for batch {batch} {waited}: it was inserted directly as PENDING "
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
        return Check.failed(LINK_TRIGGER, LINKS[LINK_TRIGGER], f"no pg_net request for batch {batch} {waited}: {cause}", fix)

    # -- link 2 --------------------------------------------------------------------------------
    def _link_edge_function(self, result: E2EResult) -> Check:
        r = self._response
        elapsed = _ms(r["created"], self._launched.launched_at)
        facts = {"elapsed_ms": elapsed, "request_id": r["id"], "status_code": r["status_code"]}
        title = LINKS[LINK_EDGE_FUNCTION]
        if r["timed_out"]:
            return Check.failed(
                LINK_EDGE_FUNCTION, title,
                f"pg_net gave up waiting for the Edge Function (timed_out, {r['error_msg'] or 'no message'}): the "
                "function waits on Prefect's create_flow_run, so a slow Prefect API makes the trigger time out",
                "check the function's logs (Edge Functions > trigger-prefect-orchestrator > Logs) and Prefect's API "
                "latency; raise timeout_milliseconds in the trigger's net.http_post call (default 5000)", **facts,
            )
        if r["error_msg"] or r["status_code"] is None:
            return Check.failed(
                LINK_EDGE_FUNCTION, title,
                f"the Edge Function could not be reached: {r['error_msg'] or 'no status code recorded'}",
                "check that the function trigger-prefect-orchestrator is deployed and serving at the URL the trigger "
                "posts to (`supabase functions deploy trigger-prefect-orchestrator`; step 01 checks the URL)", **facts,
            )
        body = _json(r["content"])
        status = r["status_code"]
        if status == 200 and isinstance(body, dict) and body.get("flow_run_id"):
            result.flow_run_id = str(body["flow_run_id"])
            return Check.passed(LINK_EDGE_FUNCTION, title,
                                f"200 after {elapsed / 1000:.2f}s: flow run {result.flow_run_id}",
                                flow_run_id=result.flow_run_id, **facts)
        error = body.get("error") if isinstance(body, dict) else None
        if status == 200:
            cause = f"200 without a flow_run_id: {_short(r['content'])}"
            fix = "deploy the contract's version of the function (its 200 answer carries flow_run_id)"
        elif error == "Server configuration error":
            missing = body.get("missing") or []
            cause = f"500 Server configuration error: the function's secret(s) {missing} are not set"
            fix = (f"set {missing} (`supabase secrets set NAME=<value>`; PREFECT_DEPLOYMENT_ID with step 04)")
        elif error == "Failed to trigger Prefect flow run":
            prefect_status = body.get("status")
            details = _short(json.dumps(body.get("details")) if not isinstance(body.get("details"), str) else body["details"])
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
            cause = f"{status}: {_short(r['content'])}"
            fix = "read the function's logs (Edge Functions > trigger-prefect-orchestrator > Logs)"
        return Check.failed(LINK_EDGE_FUNCTION, title, cause, fix, edge_function_error=error, **facts)

    # -- link 3 --------------------------------------------------------------------------------
    def _link_flow_run(self, result: E2EResult) -> Check:
        title = LINKS[LINK_FLOW_RUN]
        run = self.api.read_flow_run(result.flow_run_id)
        if run is None:
            return Check.failed(
                LINK_FLOW_RUN, title,
                f"the Edge Function reported flow run {result.flow_run_id}, which this workspace does not have: the "
                "function creates runs in another workspace",
                "set the function's PREFECT_ACCOUNT_ID / PREFECT_WORKSPACE_ID (and PREFECT_API_KEY) to this workspace "
                "(step 04 checks them by digest)",
            )
        self._run = run
        result.flow_run_name = run.name
        elapsed = _ms(run.created, self._launched.launched_at)
        facts = {"elapsed_ms": elapsed, "flow_run_id": str(run.id), "flow_run_name": run.name,
                 "deployment_id": str(run.deployment_id) if run.deployment_id else None}
        if str(run.deployment_id) != self.deployment.id:
            other = self.api.read_deployment_by_id(run.deployment_id) if run.deployment_id else None
            other_name = f"{other.name} ({run.deployment_id})" if other is not None else str(run.deployment_id)
            return Check.failed(
                LINK_FLOW_RUN, title,
                f"flow run {run.name} belongs to deployment {other_name}, not {self.deployment.name} "
                f"({self.deployment.id}): the Edge Function's PREFECT_DEPLOYMENT_ID points at another deployment "
                "(stale after a redeploy under a new name?)",
                f"run step 04 to set PREFECT_DEPLOYMENT_ID to {self.deployment.id}", **facts,
            )
        if run.created < self._launched.launched_at - CLOCK_SKEW_TOLERANCE:
            return Check.failed(
                LINK_FLOW_RUN, title,
                f"flow run {run.name} was created {abs(elapsed) / 1000:.1f}s BEFORE the launch: it was not started by "
                "this batch's trigger",
                "check what the function returns (it must create a new flow run per call), then re-run this step",
                **facts,
            )
        return Check.passed(LINK_FLOW_RUN, title,
                            f"{run.name} of {self.deployment.name}, created {elapsed / 1000:.2f}s after the launch",
                            **facts)

    # -- link 4 --------------------------------------------------------------------------------
    def _link_work_pool(self, result: E2EResult) -> Check:
        title = LINKS[LINK_WORK_POOL]
        o = self.options
        run_id = result.flow_run_id

        def terminal() -> Any:
            run = self.api.read_flow_run(run_id)
            self._run = run
            state = run.state.type.value if run and run.state else None
            if state == "RUNNING" and self._running_at is None:
                self._running_at = run.state.timestamp
            return run if state in FINAL_STATE_TYPES else None

        def phase() -> str:
            return f"link 4: flow run {result.flow_run_name} {self._run.state.name if self._run and self._run.state else '?'}"

        deadline = time.monotonic() + o.flow_run_timeout
        final = None
        while final is None and time.monotonic() < deadline:
            final = terminal()
            if final is None:
                self.progress.update(phase(), self._elapsed(), self._counts_now())
                time.sleep(max(0.05, min(o.poll_interval, deadline - time.monotonic())))
        final = final or terminal()
        run = self._run
        result.flow_run_state = run.state.type.value if run.state else None
        states = self._states(run_id)
        running = next((s.timestamp for s in states if s.type.value == "RUNNING"), None) or self._running_at
        self._running_at = running
        facts = {"flow_run_id": run_id, "work_pool": run.work_pool_name, "state": result.flow_run_state,
                 "running_ms": _ms(running, self._launched.launched_at)}
        if run.work_pool_name != self.expected_pool:
            return Check.failed(
                LINK_WORK_POOL, title, f"flow run {run.name} is on work pool {run.work_pool_name!r}, not "
                f"{self.expected_pool!r}", f"deploy to {self.expected_pool} (step 03), then re-run this step", **facts,
            )
        if final is None:
            if running is None:
                return Check.failed(
                    LINK_WORK_POOL, title,
                    f"flow run {run.name} never started: still {run.state.name if run.state else 'without a state'} "
                    f"{o.flow_run_timeout:g}s after it was seen; {self._pool_diagnosis()}",
                    f"make the pool {self.expected_pool} run it: start a worker for it (`prefect worker start --pool "
                    f"{self.expected_pool}`), or for a Prefect Managed pool check in the Prefect UI that the pool is "
                    "not paused and the workspace's managed-execution limits; then re-run this step "
                    "(cancel the Late run in the UI if it should not run any more)", **facts,
                )
            return Check.failed(
                LINK_WORK_POOL, title,
                f"flow run {run.name} started but is still {run.state.name} after {o.flow_run_timeout:g}s\n"
                + self._logs_tail(run_id),
                "read the logs above; raise flow_run_timeout if the run is just slow", **facts,
            )
        finished = run.end_time or (run.state.timestamp if run.state else None)
        facts["elapsed_ms"] = _ms(finished, self._launched.launched_at)
        path = " -> ".join(dict.fromkeys(s.name for s in states)) or (run.state.name if run.state else "?")
        if result.flow_run_state == "COMPLETED":
            return Check.passed(
                LINK_WORK_POOL, title,
                f"{run.name} ran on {run.work_pool_name} ({path}): running {_seconds(facts['running_ms'])} and "
                f"completed {_seconds(facts['elapsed_ms'])} after the launch", **facts,
            )
        message = redaction.redact(run.state.message or "no state message")
        detail = (f"{run.name} on {run.work_pool_name} ended {run.state.name} ({path}), "
                  f"{_seconds(facts['elapsed_ms'])} after the launch: {message}\n" + self._logs_tail(run_id))
        if running is not None and self._items_claimed(result.batch_id):
            return Check.warned(
                LINK_WORK_POOL, title, detail + "\nIt did run and claimed test items: the items' link says what "
                "became of them.", "read the state message and logs above", **facts,
            )
        fix = ("read the state message and logs above: a missing module needs deployment.pip_packages (or, on a "
               "process pool, the worker's environment), a missing Secret block must be created, a flow error must be "
               "fixed in the repository; then re-run this step")
        return Check.failed(LINK_WORK_POOL, title, detail, fix, **facts)

    def _states(self, run_id: str) -> list[Any]:
        from uuid import UUID

        states = self.api.call(f"reading the states of flow run {run_id}", lambda c: c.read_flow_run_states(UUID(run_id)))
        return sorted(states, key=lambda s: s.timestamp)

    def _logs_tail(self, run_id: str) -> str:
        from runbook_lib.steps.deploy import flow_run_logs

        try:
            logs = flow_run_logs(self.api, run_id)
        except PrefectApiError as exc:
            return f"(logs unavailable: {exc})"
        if not logs:
            return "(no log lines)"
        return "last log lines:\n" + "\n".join(logs[-LOG_LINES:])

    def _pool_diagnosis(self) -> str:
        pool = self.api.read_work_pool(self.expected_pool)
        if pool is None:
            return f"work pool {self.expected_pool!r} does not exist"
        if pool.is_paused:
            return f"work pool {self.expected_pool} is PAUSED"
        workers = self.api.call(f"reading the workers of {self.expected_pool}",
                                lambda c: c.read_workers_for_work_pool(self.expected_pool))
        online = [w for w in workers if getattr(w.status, "value", w.status) == "ONLINE"]
        status = getattr(pool.status, "value", pool.status)
        if online:
            now = datetime.now(timezone.utc)
            beats = ", ".join(f"{w.name} (last heartbeat {(now - w.last_heartbeat_time).total_seconds():.0f}s ago)"
                              for w in online if w.last_heartbeat_time)
            return (f"pool {self.expected_pool} is {status} and lists worker(s) {beats} as online, yet none took the "
                    "run: a worker that stopped is listed online until its heartbeat expires")
        seen = ", ".join(f"{w.name} {getattr(w.status, 'value', w.status)} (last heartbeat {w.last_heartbeat_time:%H:%M:%S})"
                         for w in workers if w.last_heartbeat_time) or "none ever"
        return f"pool {self.expected_pool} is {status}: no worker is online (workers seen: {seen})"

    # -- link 5 --------------------------------------------------------------------------------
    def _link_items(self, result: E2EResult) -> Check:
        title = LINKS[LINK_ITEMS]
        o = self.options
        target = o.target_status
        deadline = self._t0 + o.completion_timeout
        while True:
            rows = self._item_states(result.batch_id)
            counts = _count(rows)
            done = sum(1 for r in rows if _reached(r["status"], target))
            if done == len(result.item_ids) or self._settled(rows):
                break
            if time.monotonic() >= deadline:
                break
            self.progress.update(f"link 5: items moving towards {target}", self._elapsed(), counts, done)
            time.sleep(max(0.05, min(o.poll_interval, deadline - time.monotonic())))
        self.progress.update(f"link 5: items moving towards {target}", self._elapsed(), counts, done)
        transitions = [t for t in self.db.transitions(result.batch_id) if t["step_name"] == o.first_step]
        paths: dict[str, list[str]] = {}
        for t in transitions:
            paths.setdefault(str(t["item_id"]), []).append(t["to_status"])
        result.state_counts = counts
        good = [r for r in rows
                if _reached(r["status"], target) and _follows(paths.get(str(r["item_id"]), []), o.expected_path)]
        last = max((t["at"] for t in transitions if t["to_status"] == target), default=None)
        facts = {"elapsed_ms": _ms(last, self._launched.launched_at), "counts": counts, "reached": len(good),
                 "items": len(result.item_ids), "target": target}
        wanted = " -> ".join(o.expected_path)
        if len(good) == len(result.item_ids):
            return Check.passed(
                LINK_ITEMS, title, f"all {len(good)} item(s) recorded {wanted} for step {o.first_step}; the last "
                f"reached {target} {_seconds(facts['elapsed_ms'])} after the launch", **facts,
            )
        result.stuck = self._diagnose(result, rows, paths, good)
        lines = [f"{len(good)} of {len(result.item_ids)} item(s) recorded {wanted} for step {o.first_step} "
                 f"(waited up to {o.completion_timeout:g}s from the launch); counts now {counts}. Stuck:"]
        lines += [f"- {g['count']} at {g['status']}: {g['cause']} (e.g. {', '.join(g['examples'])})" for g in result.stuck]
        fixes = list(dict.fromkeys(g["remediation"] for g in result.stuck))
        return Check.failed(LINK_ITEMS, title, "\n".join(lines), " ".join(fixes), stuck=result.stuck, **facts)

    def _settled(self, rows: list[dict[str, Any]]) -> bool:
        """Nothing can move any more without another trigger: the flow run is over and every item is
        PENDING (left for a later run), FAILED or at the target."""
        state = self._run.state.type.value if self._run is not None and self._run.state else None
        if state not in FINAL_STATE_TYPES:
            return False
        return all(r["status"] in ("PENDING", "FAILED") or _reached(r["status"], self.options.target_status)
                   for r in rows)

    def _diagnose(self, result: E2EResult, rows: list[dict[str, Any]], paths: dict[str, list[str]],
                  good: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Group the items that did not make it by status and likely cause (the contract's failure modes)."""
        o = self.options
        good_ids = {str(r["item_id"]) for r in good}
        registry = {r["slug"]: r for r in self.db.registry(o.workstream)}
        sender = (registry.get(o.first_step) or {}).get("modal_sender_fn")
        run_state = result.flow_run_state
        batch_size = self.deployment.parameters.get("batch_size")
        claimed = sum(1 for r in rows if r["status"] != "PENDING" or "QUEUED" in paths.get(str(r["item_id"]), []))
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            item = str(r["item_id"])
            if item in good_ids:
                continue
            meta = r["meta"] if isinstance(r["meta"], dict) else {}
            status = r["status"]
            if _reached(status, o.target_status):
                cause = (f"reached {status} without recording {' -> '.join(o.expected_path)} (recorded: "
                         f"{' -> '.join(paths.get(item, [])) or 'nothing'})")
                fix = "check that runbook.workflow_state_transitions records every status change (its trigger)"
            elif status == "PENDING":
                if meta.get("last_dispatch_error"):
                    cause = (f"dispatch failed ({meta.get('dispatch_attempts', '?')} attempt(s)): "
                             f"{_short(str(meta['last_dispatch_error']), 200)}; left PENDING for a retry by a later run")
                    fix = ("fix the dispatch to Modal (the runtime's MODAL_TOKEN_ID / MODAL_TOKEN_SECRET Secret blocks, "
                           "the Modal app data-enrichment-workers and its functions), then trigger again")
                elif run_state not in (None, "COMPLETED"):
                    cause = f"the flow run ended {run_state} before dispatching them"
                    fix = "fix what made the flow run fail (link 4's logs), then trigger again"
                elif claimed and batch_size:
                    cause = (f"only batch_size={batch_size} item(s) are dispatched per trigger; the rest of the batch "
                             "waits for a later trigger")
                    fix = ("start another flow run (or raise the deployment's batch_size); use a test batch no larger "
                           "than batch_size")
                else:
                    cause = ("the flow run did not pick them up (it claims the oldest PENDING states first, across every "
                             "batch, or it reads another database)")
                    fix = ("check the Secret block postgres-connection-string points at this database, and what the "
                           "flow run's logs say it dispatched")
            elif status == "QUEUED":
                if not sender:
                    cause = (f"no Modal sender is mapped for step {o.first_step} in workstream {o.workstream} "
                             "(enrichment_registry; a NULL workstream_slug makes the join miss)")
                    fix = (f"set modal_sender_fn (and workstream_slug {o.workstream}) on the enrichment_registry row of "
                           f"{o.first_step}; reset the stuck states to PENDING")
                else:
                    cause = (f"dispatch failed: set QUEUED but the sender {sender} never took them (no Modal credentials "
                             "in the runtime, a missing Secret block, the Modal app not deployed); the state is never "
                             "rolled back")
                    fix = ("read the flow run's logs for the spawn errors; give the runtime Modal credentials "
                           "(Secret blocks modal-token-id / modal-token-secret), then reset the states to PENDING")
            elif status == "IN_PROGRESS":
                cause = ("handed to the enrichment service by the sender; the receiver has not completed them within "
                         "the timeout")
                fix = "check the receiver function and the external enrichment service; raise completion_timeout if slow"
            elif status == "FAILED":
                cause = f"FAILED: {_short(str(meta.get('error') or 'no reason recorded in meta.error'), 200)}"
                fix = ("map a Modal sender for the step" if "no Modal sender mapped" in str(meta.get("error"))
                       else "read the reason; fix the sender/receiver or the external service, then relaunch")
            else:
                cause = f"status {status}, recorded path {paths.get(item)}"
                fix = "check what else writes workflow_states for this batch"
            group = groups.setdefault((status, cause), {"status": status, "cause": cause, "remediation": fix,
                                                        "count": 0, "examples": []})
            group["count"] += 1
            if len(group["examples"]) < STUCK_EXAMPLES:
                group["examples"].append(item)
        return list(groups.values())

    # -- database reads ------------------------------------------------------------------------
    def _has_table(self, name: str) -> bool:
        return bool(self.db.query("SELECT to_regclass(%s) IS NOT NULL AS ok", (name,))[0]["ok"])

    def _item_states(self, batch_id: str) -> list[dict[str, Any]]:
        return self.db.query(
            "SELECT item_id, status::text AS status, meta, updated_at FROM public.workflow_states "
            "WHERE batch_id = %s AND step_name = %s ORDER BY item_id",
            (batch_id, self.options.first_step),
        )

    def _counts_now(self) -> dict[str, int]:
        if self._launched is None:
            return {}
        try:
            return _count(self._item_states(self._launched.batch_id))
        except DatabaseError:
            return {}

    def _items_claimed(self, batch_id: str) -> bool:
        rows = self.db.query(
            "SELECT count(*) AS n FROM runbook.workflow_state_transitions WHERE batch_id = %s AND step_name = %s "
            "AND from_status IS NOT NULL", (batch_id, self.options.first_step),
        )
        return rows[0]["n"] > 0

    # -- timeline and cleanup ------------------------------------------------------------------
    def _collect_timeline(self, result: E2EResult) -> None:
        origin = self._launched.launched_at
        events: dict[str, float | None] = {"launch": 0.0}
        events["pg_net_response"] = _ms(self._response["created"], origin) if self._response else None
        run = self._run
        events["flow_run_created"] = _ms(run.created, origin) if run is not None else None
        events["flow_run_running"] = _ms(self._running_at, origin)
        finished = None
        if run is not None and run.state is not None and run.state.type.value in FINAL_STATE_TYPES:
            finished = run.end_time or run.state.timestamp
        events["flow_run_finished"] = _ms(finished, origin)
        transitions = [t for t in self.db.transitions(result.batch_id) if t["step_name"] == self.options.first_step]
        for status, key in (("QUEUED", "queued"), ("IN_PROGRESS", "in_progress")):
            times = [t["at"] for t in transitions if t["to_status"] == status]
            events[f"first_{key}"] = _ms(min(times), origin) if times else None
            events[f"last_{key}"] = _ms(max(times), origin) if times else None
        completed = {str(t["item_id"]): t["at"] for t in transitions if t["to_status"] == "COMPLETED"}
        events["completed"] = (_ms(max(completed.values()), origin)
                               if completed and len(completed) == len(result.item_ids) else None)
        events["observed_until"] = round(self._elapsed() * 1000, 1)  # when the test stopped watching
        result.timeline_ms = events
        result.latencies_ms = {
            "launch_to_pg_net_response": events["pg_net_response"],
            "launch_to_flow_run_created": events["flow_run_created"],
            "flow_run_created_to_running": _diff(events["flow_run_created"], events["flow_run_running"]),
            "flow_run_running_to_finished": _diff(events["flow_run_running"], events["flow_run_finished"]),
            "flow_run_running_to_first_queued": _diff(events["flow_run_running"], events["first_queued"]),
            "first_queued_to_first_in_progress": _diff(events["first_queued"], events["first_in_progress"]),
            "launch_to_last_in_progress": events["last_in_progress"],
            "launch_to_completed": events["completed"],
        }
        current = {s: 0 for s in STATUSES}
        latest: dict[str, str] = {}
        series: list[tuple[float, dict[str, int]]] = []
        for t in transitions:
            item = str(t["item_id"])
            if item in latest:
                current[latest[item]] -= 1
            current[t["to_status"]] += 1
            latest[item] = t["to_status"]
            at = max(0.0, _ms(t["at"], origin))  # the items were inserted just before the flip
            if series and series[-1][0] == at:
                series[-1] = (at, dict(current))
            else:
                series.append((at, dict(current)))
        if series:
            series.append((max(events["observed_until"], series[-1][0]), dict(current)))
        result.count_series = series
        if not result.state_counts:
            result.state_counts = _count(self._item_states(result.batch_id))

    def _cleanup(self, result: E2EResult) -> Check:
        title = "Test rows deleted"
        try:
            existed = self.db.delete_batch(result.batch_id)
        except DatabaseError as exc:
            return Check.warned("cleanup", title, f"deleting test batch {result.batch_id} failed: {exc}",
                                f"delete it by hand: DELETE FROM public.batches WHERE id = '{result.batch_id}' "
                                "(items, states and results cascade)")
        result.cleaned_up = True
        return Check.passed("cleanup", title, f"test batch {result.batch_id} with its items, states, results and audit "
                            f"rows {'deleted' if existed else 'was already gone'}")


# -- helpers -----------------------------------------------------------------------------------------


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _short(text: str | None, limit: int = 300) -> str:
    text = redaction.redact(text or "")
    return text if len(text) <= limit else text[:limit] + "..."


def _seconds(ms: float | None) -> str:
    return "?" if ms is None else f"{ms / 1000:.2f}s"


def _count(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _reached(status: str, target: str) -> bool:
    """At the target, or past it (COMPLETED is past IN_PROGRESS)."""
    return status == target or (target == "IN_PROGRESS" and status == "COMPLETED")


def _follows(path: list[str], expected: list[str]) -> bool:
    """The recorded path starts PENDING and holds `expected` in order (retries may repeat a status)."""
    if not path or path[0] != expected[0]:
        return False
    position = 0
    for status in path:
        if position < len(expected) and status == expected[position]:
            position += 1
    return position == len(expected)


# -- the record: table and figure --------------------------------------------------------------------


class TimelineTable:
    """The links (status, when proven) and the timeline events, as a table (HTML or rich)."""

    def __init__(self, result: E2EResult):
        self.result = result

    def rows(self) -> list[tuple[str, str, str, str]]:
        out = []
        for c in self.result.link_checks():
            at = c.data.get("elapsed_ms")
            out.append((c.title, c.status.value.upper(), "" if at is None else f"{at / 1000:.2f}",
                        (c.detail.splitlines() or [""])[0][:160]))
        return out

    def events(self) -> list[tuple[str, str]]:
        return [(k, "—" if v is None else f"{v / 1000:.2f}") for k, v in self.result.timeline_ms.items()]

    def latencies(self) -> list[tuple[str, str]]:
        return [(k, "—" if v is None else f"{v:.0f}") for k, v in self.result.latencies_ms.items()]

    def _repr_html_(self) -> str:
        def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
            th = "".join(f'<th style="text-align:left">{html.escape(h)}</th>' for h in head)
            body = "".join("<tr>" + "".join(f'<td style="text-align:left">{html.escape(redaction.redact(v))}</td>'
                                            for v in row) + "</tr>" for row in rows)
            return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

        r = self.result
        return (f"<div><p><b>End-to-end test: batch {html.escape(str(r.batch_id))}, flow run "
                f"{html.escape(str(r.flow_run_name or r.flow_run_id))}</b></p>"
                + table(("Link", "Status", "At (s after launch)", "Detail"), self.rows())
                + "<p><b>Timeline</b> (seconds after the launch)</p>" + table(("Event", "At (s)"), self.events())
                + "<p><b>Latencies</b></p>" + table(("Latency", "ms"), self.latencies()) + "</div>")

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        links = Table(title=f"End-to-end test: batch {self.result.batch_id}", expand=True)
        for column in ("Link", "Status", "At (s)", "Detail"):
            links.add_column(column)
        for row in self.rows():
            links.add_row(*row)
        events = Table(title="Timeline (s after the launch)")
        events.add_column("Event")
        events.add_column("At (s)")
        for row in self.events():
            events.add_row(*row)
        latencies = Table(title="Latencies (ms)")
        latencies.add_column("Latency")
        latencies.add_column("ms")
        for row in self.latencies():
            latencies.add_row(*row)
        return Group(links, events, latencies)


_STATUS_COLOURS = {"PENDING": "#8c959f", "QUEUED": "#bf8700", "IN_PROGRESS": "#0969da", "COMPLETED": "#1a7f37",
                   "FAILED": "#cf222e"}
_CHECK_COLOURS = {Status.PASS: "#1a7f37", Status.WARN: "#bf8700", Status.FAIL: "#cf222e", Status.SKIP: "#8c959f"}


def timeline_figure(result: E2EResult) -> Any:
    """A matplotlib figure: one lane per link (when each was proven), and the test items' state
    counts over time (from the recorded transitions)."""
    from matplotlib.figure import Figure

    t = {k: (None if v is None else v / 1000) for k, v in result.timeline_ms.items()}
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    lanes, counts = fig.subplots(2, 1, sharex=True, height_ratios=[1.1, 1])
    checks = {c.id: c for c in result.link_checks()}
    names = list(LANES)
    for row, link in enumerate(names):
        y = len(names) - 1 - row
        check = checks.get(link)
        colour = _CHECK_COLOURS[check.status] if check else "#8c959f"
        spans: list[tuple[float | None, float | None]] = []
        if link == LINK_TRIGGER:
            spans = [(0.0, t.get("pg_net_response"))]
        elif link == LINK_EDGE_FUNCTION:
            spans = [(t.get("pg_net_response"), t.get("pg_net_response"))]
        elif link == LINK_FLOW_RUN:
            spans = [(t.get("flow_run_created"), t.get("flow_run_created"))]
        elif link == LINK_WORK_POOL:
            waiting_until = t.get("flow_run_running") or t.get("observed_until")  # never started: until given up
            spans = [(t.get("flow_run_created"), waiting_until), (t.get("flow_run_running"), t.get("flow_run_finished"))]
        elif link == LINK_ITEMS:
            spans = [(t.get("first_queued"), t.get("last_in_progress")), (t.get("last_in_progress"), t.get("completed"))]
        drawn = False
        for i, (start, end) in enumerate(spans if check is not None and check.status != Status.SKIP else []):
            if start is None:
                continue
            end = start if end is None else end
            alpha = 0.45 if (link == LINK_WORK_POOL and i == 0) or (link == LINK_ITEMS and i == 1) else 0.9
            if end - start > 0.01:
                lanes.barh(y, end - start, left=start, height=0.5, color=colour, alpha=alpha)
            else:
                lanes.plot([start], [y], marker="D", markersize=9, color=colour)
            drawn = True
        label = check.status.value.upper() if check else "not run"
        lanes.text(0.995, y, label, transform=lanes.get_yaxis_transform(), ha="right", va="center",
                   fontsize=8, color=colour, fontweight="bold")
        if not drawn and check is not None and check.status == Status.FAIL:
            lanes.plot([0], [y], marker="x", markersize=8, color=colour)
    lanes.set_yticks(range(len(names)), [LANES[n] for n in reversed(names)])
    lanes.set_ylim(-0.6, len(names) - 0.4)
    lanes.axvline(0, color="#57606a", linewidth=1, linestyle=":")
    lanes.set_title(f"End-to-end test of batch {result.batch_id}: when each link was proven")
    lanes.grid(axis="x", alpha=0.3)
    series = result.count_series
    if series:
        xs = [s[0] / 1000 for s in series]
        for status in STATUSES:
            ys = [s[1].get(status, 0) for s in series]
            if any(ys):
                counts.step(xs, ys, where="post", label=status, color=_STATUS_COLOURS[status], linewidth=2)
        counts.legend(loc="upper left", fontsize=8, ncols=len(STATUSES))
    counts.set_ylim(0, result.options.item_count * 1.08 + 0.2)
    if t.get("observed_until"):
        counts.set_xlim(left=min(0.0, counts.get_xlim()[0]), right=t["observed_until"] * 1.02 + 0.05)
    counts.set_ylabel("test items")
    counts.set_xlabel("seconds after the launch")
    counts.set_title(f"Item states of step {result.options.first_step} over time (recorded transitions)")
    counts.grid(alpha=0.3)
    return fig


def figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def show_timeline(ctx: Any, result: E2EResult) -> None:
    """Notebook cell: the timeline figure (also saved as `<run_dir>/<step>.timeline.png`) and the table
    of links, events and latencies."""
    from runbook_lib.notebook.gate import in_kernel
    from runbook_lib.notebook.context import show

    png = figure_png(timeline_figure(result))
    path = ctx.run_dir / f"{ctx.name}.timeline.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    ctx.set("timeline_figure", path.name)
    if in_kernel():
        from IPython.display import Image, display

        display(Image(data=png, format="png"))
    else:
        print(f"timeline figure: {path}")
    show(TimelineTable(result))
