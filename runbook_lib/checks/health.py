"""Checks of the live chain after the deployment (step 06, `runbook health`): what drifted from what
the last passing run recorded (the deployment id and fields, the Edge Function secret's digest, the
trigger function's source digest) or, without such a record, from the profile; and what is stuck
(pg_net failures, failed or unpicked flow runs, items QUEUED past the orchestrator's lease, PENDING
with no flow run since, FAILED). Each diagnosis quotes its evidence (the row, the state, the log
line), masked. The health step also runs the catalog's checks that already prove a link (the pool,
the trigger, pg_net, the function's secrets, the Secret blocks): see `GROUPS`.

`HealthFacts` adds to `Facts` the baseline and the reads these checks share (the live deployment,
the function's secret digests, the deployment's recent flow runs, the database's clock)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from runbook_lib.checks import database, prefect, supabase
from runbook_lib.checks.base import CheckDef, Fail, Outcome, Skip, check, ok, warn
from runbook_lib.checks.facts import Facts, withhold
from runbook_lib.core.errors import FlowSourceError
from runbook_lib.core.secrets import redact
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.source import lease
from runbook_lib.systems.database import TRIGGER_FUNCTION, Database
from runbook_lib.systems.prefect_deploy import git_clone_step, same
from runbook_lib.systems.supabase import SupabaseManagementApi, secret_digest

# The deployment fields compared with the record (those the deploy step plans), in display order.
DRIFT_FIELDS = ("work_pool_name", "entrypoint", "pull_steps", "job_variables", "parameters", "tags", "version")
STUCK_RUN_STATES = ("SCHEDULED", "PENDING")
BAD_RUN_STATES = ("FAILED", "CRASHED")
RECENT_RUNS = 50


@dataclass
class Baseline:
    """What the health check compares the live chain with: the records of the last passing run
    (`run_dir` set) or, without one, the profile's settings alone."""

    source: str  # e.g. "run 20261130-120000-sandbox (passed 2026-11-30 12:04 UTC)", or "the profile"
    run_dir: str | None = None
    deployment_id: str | None = None
    deployment_name: str | None = None  # flow/deployment
    fields: dict[str, Any] = field(default_factory=dict)  # the deployed fields (as planned, secrets withheld)
    edge_digest: str | None = None  # PREFECT_DEPLOYMENT_ID's digest after step 04
    edge_deployment_id: str | None = None
    trigger_digest: str | None = None  # sha256 of the trigger function's source (step 01)
    recorded_at: datetime | None = None  # when the recorded run's last step ended: older failures were its business

    @property
    def recorded(self) -> bool:
        return self.run_dir is not None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}


class HealthFacts(Facts):
    """`Facts` with the baseline and the shared reads of the health checks."""

    def __init__(self, settings: RunbookSettings, step: str, baseline: Baseline):
        super().__init__(settings, step)
        self.baseline = baseline

    # -- the deployment ------------------------------------------------------------------------
    def deployment_by_name(self) -> Any | None:
        """The live deployment of the recorded full name, else the profile's deployment name (the one
        with the profile's entrypoint when several flows have one of that name)."""
        api = self.prefect_for()

        def read() -> Any | None:
            if self.baseline.deployment_name:
                return api.read_deployment(self.baseline.deployment_name)
            found = api.read_deployments_named(self.settings.deployment.name)
            matching = [d for d in found if d.entrypoint == self.settings.source.entrypoint] or found
            return sorted(matching, key=lambda d: str(d.created))[-1] if matching else None
        return self.fact("deployment_by_name", read)

    def deployment(self) -> Any:
        """The live deployment the chain must start (owned by health.deployment): the recorded id, else
        (no record) the profile's deployment by name. Fail when it is gone."""
        def read() -> Any:
            b, s = self.baseline, self.settings
            api = self.prefect_for()
            if b.deployment_id:
                live = api.read_deployment_by_id(b.deployment_id)
                if live is not None:
                    return live
                other = self.deployment_by_name()
                if other is not None:
                    raise Fail(
                        f"deployment {b.deployment_id} recorded by {b.source} no longer exists; "
                        f"{b.deployment_name or s.deployment.name} was re-created as {other.id} (created {other.created}): "
                        "the Edge Function and the record still name the old id",
                        f"point the Edge Function at the new id: `runbook run --profile {s.profile} --confirm --only 04 "
                        f"-p deployment_id={other.id}`, then prove the chain with step 05 (or re-deploy with step 03 "
                        "if the re-creation was not intended)",
                        live_id=str(other.id), recorded_id=b.deployment_id,
                    )
                raise Fail(
                    f"deployment {b.deployment_id} ({b.deployment_name or s.deployment.name}) recorded by {b.source} "
                    "no longer exists, and no deployment of that name does: every trigger now gets a 404 from Prefect",
                    f"re-deploy and re-point the Edge Function: `runbook run --profile {s.profile} --confirm --from 03`",
                    recorded_id=b.deployment_id,
                )
            live = self.deployment_by_name()
            if live is None:
                raise Fail(
                    f"no deployment named {s.deployment.name!r} exists (no passing run is recorded to name its id)",
                    f"deploy it: `runbook run --profile {s.profile} --confirm --from 03`",
                )
            return live
        return self.fact("deployment", read)

    def deployment_for(self) -> Any:
        return self.need(self.deployment, "health.deployment", "the deployment")

    def live_deployment_id(self) -> str | None:
        """The id of the deployment as it lives now (the recorded one, or its re-creation), if any."""
        try:
            return str(self.deployment().id)
        except Fail as exc:
            return exc.data.get("live_id")
        except Exception:
            return None

    # -- the Edge Function's secrets -----------------------------------------------------------
    def function_digests(self) -> dict[str, str]:
        """name -> the digest the Management API lists (owned by check supabase.api)."""
        def read() -> dict[str, str]:
            with SupabaseManagementApi.from_settings(self.settings, max_attempts=2, max_wait=3) as api:
                return {s.name: s.digest.lower() for s in api.list_secrets()}
        return self.fact("function_digests", read)

    def supabase_secret_names(self) -> set[str]:
        return self.fact("supabase_secrets", lambda: set(self.function_digests()))

    # -- database and Prefect ------------------------------------------------------------------
    def pipeline_database(self) -> Database:
        """The pipeline's database, as database.connect reached it (skips naming that check when it failed)."""
        return self.database_for()[0]

    def flow_runs(self) -> list[Any]:
        """The deployment's most recent flow runs, newest first."""
        deployment = self.deployment_for()
        return self.fact("flow_runs", lambda: self.prefect_for().read_flow_runs_of_deployment(
            deployment.id, limit=RECENT_RUNS))

    def queued_lease(self) -> tuple[float, str]:
        """(the orchestrator's claim lease, where it comes from): `health.queued_lease_seconds` when
        the profile sets it, else the lease the orchestrator's runs use (`source.lease`: the live
        deployment's `claim_lease_seconds` parameter, else the flow's CLAIM_LEASE_SECONDS)."""
        configured = self.settings.health.queued_lease_seconds
        if configured is not None:
            return configured, "health.queued_lease_seconds"
        try:
            parameters = self.deployment().parameters or {}
        except Exception:  # no deployment: its own check says why
            parameters = {}
        try:
            return lease.claim_lease_seconds(parameters)
        except FlowSourceError:  # a malformed parameter on the live deployment: the flow's default
            return lease.claim_lease_seconds({})

    def window(self) -> timedelta:
        return timedelta(minutes=self.settings.health.window_minutes)

    def since(self) -> datetime:
        """The start of what the window checks look at: the window, or the end of the recorded
        passing run when that is later (failures before it were fixed, or proven harmless, by it)."""
        start = _now() - self.window()
        at = self.baseline.recorded_at
        return max(start, at) if at is not None else start

    def since_text(self) -> str:
        start = self.since()
        if self.baseline.recorded_at is not None and start == self.baseline.recorded_at:
            return f"since {self.baseline.source} ended ({start:%Y-%m-%d %H:%M:%S} UTC)"
        return f"in the last {_duration(self.window().total_seconds())}"


# -- helpers -------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _age(at: Any) -> float | None:
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return (_now() - at).total_seconds()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _short(value: Any, limit: int = 160) -> str:
    text = " ".join(redact(str(value)).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _run_state(run: Any) -> str:
    return run.state.type.value if run.state is not None else "NONE"


def _run_name(run: Any) -> str:
    return f"{run.name} ({run.id})"


def _expected_fields(facts: HealthFacts) -> dict[str, Any]:
    """The fields the deployment should have: the record's, else the profile's."""
    b, s = facts.baseline, facts.settings
    if b.fields:
        return {k: b.fields[k] for k in DRIFT_FIELDS if k in b.fields}
    job_variables, _ = withhold(s.deployment.job_variables(), "job_variables", s)
    return {"work_pool_name": s.deployment.work_pool, "entrypoint": s.source.entrypoint,
            "pull_steps": [{"prefect.deployments.steps.git_clone": {"repository": s.source.clone_url,
                                                                     "branch": s.source.branch}}],
            "job_variables": job_variables, "parameters": dict(s.deployment.parameters),
            "tags": sorted(s.deployment.tags)}


def _live_fields(facts: HealthFacts, deployment: Any) -> dict[str, Any]:
    job_variables, _ = withhold(deployment.job_variables or {}, "job_variables", facts.settings)
    return {"work_pool_name": deployment.work_pool_name, "entrypoint": deployment.entrypoint,
            "pull_steps": deployment.pull_steps or [], "job_variables": job_variables,
            "parameters": deployment.parameters or {}, "tags": sorted(deployment.tags or []),
            "version": deployment.version}


def _differences(path: str, want: Any, got: Any) -> list[tuple[str, Any, Any]]:
    """(path, expected, live) of each differing leaf, dictionaries compared key by key."""
    if isinstance(want, dict) and isinstance(got, dict):
        return [d for key in sorted(set(want) | set(got), key=str)
                for d in _differences(f"{path}.{key}", want.get(key), got.get(key))]
    return [] if same(want, got) else [(path, want, got)]


def _pull_ref(pull_steps: Any) -> dict[str, Any] | None:
    clone = git_clone_step(pull_steps)
    if clone is None:
        return None
    return {k: clone.get(k) for k in ("repository", "branch", "commit_sha") if clone.get(k)}


# -- 1. the deployment -------------------------------------------------------------------------------


@check("health.deployment", "The deployment exists under the recorded id",
       proves="the deployment the Edge Function must start exists under the id the last passing run recorded "
              "(else under the profile's name); a deleted or re-created deployment is named with its new id")
def deployment(facts: HealthFacts) -> Outcome:
    live = facts.deployment()
    b = facts.baseline
    how = f"the id recorded by {b.source}" if b.deployment_id else "found by name (no passing run recorded)"
    return ok(f"{b.deployment_name or live.name} {live.id} exists ({how})", deployment_id=str(live.id))


@check("health.deployment_drift", "The deployment has not drifted from the record",
       proves="the live deployment's entrypoint, pull step (branch/commit), pool, job variables (masked), parameters, "
              "tags and version equal the last passing run's (else the profile's), and it is not paused and has no "
              "schedule")
def deployment_drift(facts: HealthFacts) -> Outcome:
    live = facts.deployment_for()
    expected = _expected_fields(facts)
    have = _live_fields(facts, live)
    changes = []
    for name, want in expected.items():
        got = have.get(name)
        if name == "pull_steps":
            want, got = _pull_ref(want), _pull_ref(got)
            if want is not None and got is not None and not facts.baseline.fields:
                got = {k: v for k, v in got.items() if k in want}  # the profile names a branch, not a commit
        if not same(got, want):
            changes.append({"field": name, "recorded": want, "live": got})
    said = "recorded" if facts.baseline.fields else "profile"
    problems = [f"{path}: {said} {_short(_json(want), 200)}, live {_short(_json(got), 200)}"
                for c in changes for path, want, got in _differences(c["field"], c["recorded"], c["live"])]
    if getattr(live, "paused", False):
        problems.append("paused: the deployment is paused (its runs are not scheduled)")
    if live.schedules:
        problems.append(f"schedules: {len(live.schedules)} schedule(s) attached; runs are meant to start from the "
                        "Edge Function only")
    against = facts.baseline.source if facts.baseline.fields else "the profile (no passing run recorded)"
    if problems:
        return warn(
            f"{live.name} {live.id} differs from {against}:\n" + "\n".join(f"- {p}" for p in problems),
            f"if the change was not intended, re-deploy from the runbook: `runbook run --profile {facts.settings.profile} "
            "--confirm --from 03` (step 03 shows the diff first); if it was, record it with a passing run (03-05)",
            changed=[c["field"] for c in changes],
        )
    return ok(f"entrypoint, pull step, pool, job variables, parameters, tags, version equal {against}; "
              "not paused; no schedule")


# -- 2. the Edge Function's secret ---------------------------------------------------------------------


@check("health.edge_secret", "The Edge Function's PREFECT_DEPLOYMENT_ID names the deployment",
       proves="the digest of the function's PREFECT_DEPLOYMENT_ID is sha256 of the live deployment's id (the "
              "recorded one, unless it was re-created)")
def edge_secret(facts: HealthFacts) -> Outcome:
    s, b = facts.settings, facts.baseline
    name = s.supabase.deployment_id_secret
    digests = facts.need(facts.function_digests, "supabase.api", "the function's secret digests")
    if name not in digests:
        raise Skip(f"{name} is not set (see supabase.function_secrets)")
    digest = digests[name]
    live_id = facts.live_deployment_id()
    expected = live_id or b.deployment_id
    if expected is None:
        raise Skip("no deployment to compare with (see health.deployment)")
    if digest == secret_digest(expected):
        recorded = f"; unchanged since {b.source}" if b.edge_digest and b.edge_digest == digest else ""
        return ok(f"{name} digest {digest[:12]}... = sha256({expected}){recorded}", digest=digest)
    names = {secret_digest(i): i for i in {b.deployment_id, b.edge_deployment_id} if i}
    if b.deployment_id and live_id and digest == secret_digest(b.deployment_id):
        what = (f"it still names {b.deployment_id}, the deployment recorded by {b.source}, which no longer exists "
                f"(re-created as {live_id})")
    elif digest in names:
        what = f"it names {names[digest]}"
    else:
        what = "it names no deployment the record knows (another deployment, or a value set by hand)"
    changed = b.edge_digest and b.edge_digest != digest
    since = f"; it changed since {b.source} (recorded {b.edge_digest[:12]}...)" if changed else ""
    raise Fail(
        f"{name} digest {digest[:12]}... is not sha256({expected}): {what}{since}; every trigger starts the wrong "
        "deployment or gets a 404 from Prefect",
        f"point it back at the deployment: "
        f"`runbook run --profile {s.profile} --confirm --only 04 -p deployment_id={expected}`",
        digest=digest, expected_deployment_id=expected,
    )


# -- 3. the database ---------------------------------------------------------------------------------


@check("health.trigger_function", "The trigger function's source is unchanged",
       proves="sha256 of the trigger function's source equals the digest the last passing run recorded (step 01)")
def trigger_function(facts: HealthFacts) -> Outcome:
    info = facts.need(facts.trigger, "database.trigger", "the trigger")
    if info is None:
        raise Skip("the trigger does not exist (see database.trigger)")
    digest = info.source_digest
    b = facts.baseline
    if not b.trigger_digest:
        return ok(f"{info.function} source sha256 {digest[:12]}... (no recorded digest to compare: a passing run's "
                  "step 01 records it)", digest=digest)
    if digest != b.trigger_digest:
        return warn(
            f"{info.function} was changed since {b.source}: its source's sha256 is {digest[:12]}..., recorded "
            f"{b.trigger_digest[:12]}... (database.trigger_target says whether it still posts to the Edge Function)",
            f"review it: `SELECT pg_get_functiondef('{TRIGGER_FUNCTION}'::regproc);`; if the change is intended, record "
            f"it with a passing run (step 01 onwards), else restore the function from your migrations",
            digest=digest, recorded=b.trigger_digest,
        )
    return ok(f"{info.function} source sha256 {digest[:12]}... as recorded by {b.source}", digest=digest)


def _response_line(r: dict[str, Any]) -> str:
    what = ("timed out" if r.get("timed_out") else f"error {_short(r['error_msg'], 120)}" if r.get("error_msg")
            else f"status {r.get('status_code')}")
    body = f", body {_short(r['content'], 120)!s}" if r.get("content") else ""
    batch = f", batch {r['batch_id']}" if r.get("batch_id") else ""
    return f"request {r['id']} at {r['created']:%Y-%m-%d %H:%M:%S}: {what}{body}{batch}"


def _response_remediation(r: dict[str, Any]) -> str:
    code = r.get("status_code")
    if r.get("timed_out"):
        return ("pg_net gave up waiting (timeout_milliseconds, default 5000) while the Edge Function waited on Prefect: "
                "raise timeout_milliseconds in the trigger function's net.http_post, and check Prefect's latency")
    if code in (401, 403):
        return ("the functions gateway refused the trigger's credentials: the anon key written into "
                f"{TRIGGER_FUNCTION}() is wrong or was rotated; re-create the function with the project's anon key "
                "(Supabase: Project Settings, API)")
    if code == 404:
        return "the URL in the trigger function names no deployed Edge Function: deploy it or correct the URL"
    if code is not None and code >= 500:
        return ("the Edge Function failed (its answer is quoted): a missing secret or Prefect refusing the flow run; "
                "see health.edge_secret and supabase.function_secrets, and the function's logs")
    return "the request did not reach the Edge Function: check the URL in the trigger function and the network"


@check("health.pg_net_responses", "pg_net's requests got 2xx answers",
       proves="the pg_net responses (net._http_response) of the window hold no failure (non-2xx, timeout, error), "
              "or none since the latest success")
def pg_net_responses(facts: HealthFacts) -> Outcome:
    db = facts.pipeline_database()
    h = facts.settings.health
    if not db.has_relation("net._http_response"):
        raise Skip("net._http_response does not exist (see database.pg_net)")
    summary = db.http_response_summary(facts.since(), h.examples)
    window = facts.since_text()
    if not summary["total"]:
        return ok(f"no pg_net response {window} (no batch launched)")
    if not summary["failed"]:
        return ok(f"{summary['total']} response(s) {window}, all 2xx")
    examples = "\n".join(f"- {_response_line(r)}" for r in summary["failures"])
    head = f"{summary['failed']} of {summary['total']} pg_net response(s) {window} failed"
    latest = summary["latest"]
    data = {"failed": summary["failed"], "total": summary["total"],
            "status_codes": sorted({r["status_code"] for r in summary["failures"] if r["status_code"] is not None})}
    if latest is not None and latest["failed"]:
        raise Fail(f"{head}, the latest too:\n{examples}", _response_remediation(latest), **data)
    return warn(f"{head}; the latest ({_response_line(latest)}) succeeded:\n{examples}",
                "the chain recovered; the batches named above may not have started a flow run: check their items "
                "(health.items_pending)", **data)


# -- 4. Prefect: the deployment's runs ----------------------------------------------------------------


def _in_window(facts: HealthFacts, run: Any) -> bool:
    at = run.expected_start_time or run.created
    if at is None:
        return False
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at >= facts.since()


@check("health.flow_runs", "The deployment's recent flow runs did not fail",
       proves="no flow run of the deployment failed or crashed in the window, or the latest finished one completed")
def flow_runs(facts: HealthFacts) -> Outcome:
    runs = [r for r in facts.flow_runs() if _in_window(facts, r)]
    window = facts.since_text()
    if not runs:
        return ok(f"no flow run {window}")
    bad = [r for r in runs if _run_state(r) in BAD_RUN_STATES]
    counts: dict[str, int] = {}
    for r in runs:
        counts[_run_state(r)] = counts.get(_run_state(r), 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if not bad:
        return ok(f"{len(runs)} flow run(s) {window}: {tally}")
    api = facts.prefect_for()
    lines = []
    for r in bad[:facts.settings.health.examples]:
        errors = [line.text for line in api.read_logs([r.id], min_level=40, newest_first=True, limit=2)]
        quote = f"; log: {_short(errors[0], 200)}" if errors else ""
        lines.append(f"- {_run_name(r)} {_run_state(r)} at {r.state.timestamp:%Y-%m-%d %H:%M:%S}: "
                     f"{_short(r.state.message or 'no message', 200)}{quote}")
    finished = [r for r in runs if r.state is not None and r.state.is_final()]
    detail = f"{len(bad)} of {len(runs)} flow run(s) {window} failed or crashed ({tally}):\n" + "\n".join(lines)
    fix = ("read the runs' logs (quoted above): a CRASHED run at submission usually names a missing Secret block or "
           "package; a FAILED one the flow's own error")
    if finished and _run_state(finished[0]) in BAD_RUN_STATES:
        raise Fail(detail, fix, failed=len(bad))
    return warn(detail + f"\nthe latest finished run {_run_name(finished[0])} completed", fix, failed=len(bad))


def _stuck_reason(facts: HealthFacts, run: Any) -> str:
    api = facts.prefect_for()
    parts = []
    try:
        states = api.read_flow_run_states(run.id)
        messages = [f"{s.name}: {_short(s.message, 120)}" for s in states[-3:] if s.message]
        if messages:
            parts.append("states say " + "; ".join(messages))
    except Exception as exc:
        parts.append(f"states unreadable ({_short(exc, 80)})")
    try:
        logs = [line.text for line in api.read_logs([run.id], newest_first=True, limit=2)]
        if logs:
            parts.append("last log: " + _short(logs[0], 160))
        else:
            parts.append("no log line: no worker has picked it up")
    except Exception:
        pass
    try:
        pool = facts.work_pool()
        if pool is not None:
            status = getattr(pool.status, "value", pool.status)
            parts.append(f"pool {pool.name} {'PAUSED' if pool.is_paused else f'status {status}'}")
    except Exception:
        pass
    return "; ".join(parts)


@check("health.flow_runs_stuck", "No flow run waits to be picked up",
       proves="no flow run of the deployment has been Scheduled (past its start) or Pending longer than the threshold; "
              "a stuck one is quoted with what its states, logs and pool say")
def flow_runs_stuck(facts: HealthFacts) -> Outcome:
    threshold = facts.settings.health.scheduled_threshold_seconds
    stuck = []
    for r in facts.flow_runs():
        state = _run_state(r)
        if state not in STUCK_RUN_STATES:
            continue
        since = r.expected_start_time if state == "SCHEDULED" else r.state.timestamp
        age = _age(since)
        if age is not None and age > threshold:
            stuck.append((r, age))
    if not stuck:
        return ok(f"no run Scheduled or Pending for longer than {_duration(threshold)}")
    lines = [f"- {_run_name(r)} {r.state.name} for {_duration(age)}: {_stuck_reason(facts, r)}"
             for r, age in stuck[:facts.settings.health.examples]]
    pool = facts.settings.deployment.work_pool
    raise Fail(
        f"{len(stuck)} flow run(s) waiting longer than {_duration(threshold)} to be picked up:\n" + "\n".join(lines),
        f"nobody picks up the runs of pool {pool}: resume it if paused (`prefect work-pool resume {pool}`), check its "
        "workers (a process pool needs one online) and concurrency limits; then the runs start, or cancel them",
        stuck=len(stuck),
    )


# -- 5. the items ----------------------------------------------------------------------------------------


def _states_detail(summary: dict[str, Any]) -> str:
    batches = ", ".join(f"{b['batch_id']} ({b['n']})" for b in summary["batches"])
    hidden = summary["batch_count"] - len(summary["batches"])
    more = f" and {hidden} more" if hidden > 0 else ""
    examples = "\n".join(
        f"- state {e['state_id']}: item {e['item_id']}, step {e['step_name']}, since {e['updated_at']:%Y-%m-%d %H:%M:%S} "
        f"({_duration(e['age_seconds'])})" + (f", meta keys {', '.join(e['meta_keys'])}" if e["meta_keys"] else "")
        for e in summary["examples"])
    return (f"{summary['count']} state(s), the oldest {_duration(summary['oldest_seconds'])} old, in "
            f"{summary['batch_count']} batch(es): {batches}{more}\n{examples}")


DISPATCH_WORDS = ("dispatch", "spawn", "modal", "sender", "secret", "credential")


def _claim_evidence(facts: HealthFacts, summary: dict[str, Any]) -> str:
    """What the flow run that was running when the oldest state was claimed logged (warnings and
    errors, its subflows' too), quoted masked; or that no run of the deployment was running then."""
    if not summary["examples"]:
        return ""
    claimed = summary["examples"][0]["updated_at"]
    if claimed.tzinfo is None:
        claimed = claimed.replace(tzinfo=timezone.utc)
    try:
        runs = facts.flow_runs()
    except Exception:  # the deployment is unknown: its own check says why
        return ""
    slack = timedelta(seconds=5)

    def covers(run: Any) -> bool:
        start, end = run.start_time, run.end_time or _now()
        return start is not None and start - slack <= claimed <= end + slack
    run = next((r for r in runs if covers(r)), None)
    if run is None:
        return (f"\nno flow run of the deployment was running when the oldest was claimed ({claimed:%Y-%m-%d %H:%M:%S}): "
                "another deployment, a manual run, or a run older than the last "
                f"{RECENT_RUNS} claimed them")
    api = facts.prefect_for()
    try:
        ids = [run.id, *(sub.id for sub in api.read_subflow_runs(run.id))]
        lines = api.read_logs(ids, min_level=30, limit=100)
    except Exception as exc:  # the logs are evidence, not a condition of the check
        return f"\nclaimed during flow run {_run_name(run)} ({_run_state(run)}); its logs are unreadable: {_short(exc, 120)}"
    messages = list(dict.fromkeys(_short(line.message.splitlines()[0] if line.message else "", 200) for line in lines))
    about = [m for m in messages if any(w in m.lower() for w in DISPATCH_WORDS)] or messages
    quoted = "".join(f"\n  > {m}" for m in about[:3]) or " (no warning or error logged)"
    state = f"{_run_state(run)}: {_short(run.state.message, 120)}" if run.state and run.state.message else _run_state(run)
    return f"\nclaimed during flow run {_run_name(run)} ({state}); it logged:{quoted}"


@check("health.items_queued", "No item is QUEUED past the orchestrator's lease",
       proves="no workflow state has been QUEUED (claimed by the orchestrator) longer than its lease without being "
              "dispatched")
def items_queued(facts: HealthFacts) -> Outcome:
    db = facts.pipeline_database()
    h = facts.settings.health
    lease, source = facts.queued_lease()
    summary = db.states_summary("QUEUED", older_than_seconds=lease, examples=h.examples)
    if not summary["count"]:
        return ok(f"no state QUEUED for longer than the lease, {_duration(lease)} ({source})")
    raise Fail(
        f"QUEUED longer than the lease ({_duration(lease)}, {source}), never dispatched: " + _states_detail(summary)
        + _claim_evidence(facts, summary),
        "the orchestrator claimed them and the dispatch failed (no Modal credentials in the runtime, a missing Secret "
        "block, no sender mapped for the step and workstream): read the flow runs' logs, fix the cause, then put them "
        f"back to PENDING and start a run: `runbook health --profile {facts.settings.profile} --requeue-stuck --confirm` "
        "(notebook 06: requeue_stuck=True)",
        count=summary["count"], batches=[b["batch_id"] for b in summary["batches"]],
    )


@check("health.items_pending", "No item waits PENDING with no flow run since",
       proves="no workflow state has been PENDING longer than the threshold without a flow run of the deployment "
              "started after it (the trigger not firing); older PENDING states a run skipped are warned")
def items_pending(facts: HealthFacts) -> Outcome:
    db = facts.pipeline_database()
    h = facts.settings.health
    runs = facts.flow_runs()
    last = max((r.created for r in runs if r.created is not None), default=None)
    waiting = db.states_summary("PENDING", older_than_seconds=h.pending_threshold_seconds, changed_after=last,
                                examples=h.examples)
    all_old = db.states_summary("PENDING", older_than_seconds=h.pending_threshold_seconds, examples=h.examples)
    since = f"the last flow run was created {last:%Y-%m-%d %H:%M:%S}" if last else "the deployment has no flow run"
    if waiting["count"]:
        raise Fail(
            f"PENDING longer than {_duration(h.pending_threshold_seconds)} with no flow run since ({since}): "
            + _states_detail(waiting),
            "the trigger did not start a flow run for them: check database.trigger, health.pg_net_responses and "
            "health.edge_secret; a batch inserted directly as PENDING never fires the trigger (the UI must insert it "
            "INITIALIZING, then flip it). Once the chain is sound, start a run through the Edge Function (step 05 "
            "launches one) so the dispatcher picks them up",
            count=waiting["count"], batches=[b["batch_id"] for b in waiting["batches"]],
        )
    if all_old["count"]:
        return warn(
            f"PENDING longer than {_duration(h.pending_threshold_seconds)} although a flow run started since ({since}): "
            + _states_detail(all_old),
            "the dispatcher skipped them: no sender mapped for the step and workstream (enrichment_registry), a NULL "
            "workstream_slug on the batch, or more than batch_size items waiting (the rest waits for the next trigger)",
            count=all_old["count"],
        )
    return ok(f"no state PENDING for longer than {_duration(h.pending_threshold_seconds)} ({since})")


@check("health.items_failed", "No item FAILED in the window",
       proves="no workflow state became FAILED in the window")
def items_failed(facts: HealthFacts) -> Outcome:
    db = facts.pipeline_database()
    h = facts.settings.health
    summary = db.states_summary("FAILED", changed_after=facts.since(), examples=h.examples)
    if not summary["count"]:
        return ok(f"no state FAILED {facts.since_text()}")
    return warn(f"FAILED {facts.since_text()}: " + _states_detail(summary),
                "the enrichment service or a receiver failed these items: read enrichment_results and the Modal "
                "functions' logs for them, and re-launch the items once the cause is fixed",
                count=summary["count"])


# -- the groups the health step runs, in order (the catalog's checks where one already proves a link) -----

GROUPS: dict[str, list[CheckDef]] = {
    "deployment": [prefect.api, deployment, deployment_drift],
    "edge_function": [supabase.api, edge_secret, supabase.function_secrets],
    "database": [database.connect, database.trigger, trigger_function, database.trigger_target, database.pg_net,
                 pg_net_responses],
    "prefect": [prefect.work_pool, prefect.work_pool_type, prefect.work_pool_active, flow_runs, flow_runs_stuck],
    "items": [items_queued, items_pending, items_failed],
    "secret_blocks": prefect.BLOCKS,
}
