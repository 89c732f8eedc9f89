"""Diagnosis from evidence: why a flow run never started (the pool, its workers and their
heartbeats), and why test items are stuck (grouped by status and cause, with examples).

What the flow run itself says is read through the Prefect API (`read_run_evidence`): its final
state and message, its subflows' (the sequencer's, the dispatcher's), and their warning and error
log lines. The lines that explain a failed dispatch are quoted (masked), and what they say decides
the cause and the remediation (`dispatch_cause`): Modal credentials missing or refused, the app or
function not found, no sender mapped, Modal unreachable, or Modal's own error.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from runbook_lib.core.errors import PrefectApiError
from runbook_lib.steps.e2e.links import reached, short
from runbook_lib.systems.prefect import LogLine, PrefectApi

STUCK_EXAMPLES = 5
QUOTED_LINES = 4  # distinct dispatch error lines quoted in a check
LOG_GRACE_SECONDS = 5.0  # a terminal run's last log lines may still be in flight: re-read for this long
FINISHED = re.compile(r"^Finished in state ")
# Prefect's own lines about a run's end (they repeat the flow's exception, as its state message does).
ENGINE_LINE = re.compile(r"^(Finished in state |Encountered exception during execution)")
# What the orchestrator logs when a dispatch goes wrong (flows/src/orchestrator.py, and the
# original production version: "Failed to dispatch item ... to <fn>: <error>").
DISPATCH_LINE = re.compile(r"spawn|dispatch|modal|sender", re.I)
SUMMARY_LINE = re.compile(r"^Dispatcher( run complete)?: ", re.I)
_IDS = re.compile(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b|\b[0-9a-f]{8}\b(?:\.\.\.)?|\bfc-[0-9a-f]+\b", re.I)


@dataclass
class DispatchCause:
    """What the dispatch errors say: a kind, a sentence, and the remediation it calls for."""

    kind: str  # modal_credentials_missing | modal_auth | not_found | no_sender | unreachable | modal_error | unknown
    cause: str
    remediation: str
    function: str | None = None


@dataclass
class RunEvidence:
    """What the flow run says about itself: final state, subflows, warning/error lines (masked)."""

    flow_run_id: str
    flow_run_name: str | None = None
    state: str | None = None  # the final state's type, e.g. COMPLETED
    state_name: str | None = None
    state_message: str | None = None
    subflows: list[dict[str, Any]] = field(default_factory=list)  # name, state, message
    problems: list[LogLine] = field(default_factory=list)  # WARNING and above, oldest first
    summary: list[str] = field(default_factory=list)  # the dispatcher's own summary line(s)
    unavailable: str | None = None  # why the logs could not be read

    @property
    def dispatch_lines(self) -> list[LogLine]:
        """The warning/error lines about dispatching (spawn, Modal, sender), oldest first: the flow's
        own, or, when it logged none, Prefect's lines about the run's end (the flow's exception)."""
        found = [line for line in self.problems if DISPATCH_LINE.search(_first_line(line.message))]
        own = [line for line in found if not ENGINE_LINE.match(line.message)]
        return own or found

    @property
    def dispatch_messages(self) -> list[str]:
        """The first line of each dispatch line's message (what `dispatch_cause` reads)."""
        return [_first_line(line.message) for line in self.dispatch_lines]

    def quoted(self, limit: int = QUOTED_LINES) -> list[str]:
        """The distinct dispatch error lines (item ids aside), each with how many times it was logged."""
        groups: dict[str, list[LogLine]] = {}
        for line in self.dispatch_lines:
            groups.setdefault(_IDS.sub("…", _first_line(line.message)), []).append(line)
        quoted = []
        for lines in list(groups.values())[:limit]:
            first = lines[0].text.splitlines()[0] if lines[0].text else ""
            quoted.append(short(first, 400) + (f" (logged {len(lines)} times)" if len(lines) > 1 else ""))
        return quoted

    def names_items(self, item_ids: list[str]) -> int:
        """How many of these items the dispatch lines name (by id, or its first 8 characters)."""
        text = "\n".join(line.message for line in self.dispatch_lines)
        return sum(1 for item in item_ids if item and (item in text or item[:8] in text))

    def describe(self) -> str:
        """One paragraph: the run's final state and message, its subflows', and the quoted lines."""
        head = (f"flow run {self.flow_run_name or self.flow_run_id} ended {self.state_name or self.state or '?'}"
                + (f" ({short(self.state_message, 200)})" if self.state_message else ""))
        subs = "; ".join(f"subflow {s['name']} ({s.get('flow_run_name')}) {s['state'] or '?'}"
                         + (f" ({short(s['message'], 200)})" if s["message"] else "") for s in self.subflows)
        lines = [head + (f"; {subs}" if subs else "")]
        if self.unavailable:
            lines.append(f"its logs could not be read: {self.unavailable}")
            return "\n".join(lines)
        quoted = self.quoted()
        if quoted:
            lines.append(f"its logs show {len(self.dispatch_lines)} dispatch warning/error line(s):")
            lines += [f"  > {q}" for q in quoted]
        else:
            lines.append(f"its logs show no dispatch error ({len(self.problems)} warning/error line(s) in all)")
        lines += [f"  summary: {short(s, 300)}" for s in self.summary[-1:]]
        return "\n".join(lines)


def read_run_evidence(api: PrefectApi, flow_run_id: str, *, grace_seconds: float = LOG_GRACE_SECONDS) -> RunEvidence:
    """The flow run's final state, its subflows' states and their warning/error log lines. A run that
    just ended may still be shipping its last lines: they are re-read (up to `grace_seconds`) until
    the run's own closing line ("Finished in state ...") is there."""
    evidence = RunEvidence(flow_run_id)
    try:
        run = api.read_flow_run(flow_run_id)
        if run is not None:
            evidence.flow_run_name = run.name
            if run.state is not None:
                evidence.state, evidence.state_name = run.state.type.value, run.state.name
                evidence.state_message = short(run.state.message or "", 500) or None
        subflows = api.read_subflow_runs(flow_run_id)
        evidence.subflows = [{"name": api.read_flow_name(s), "flow_run_name": s.name, "flow_run_id": str(s.id),
                              "state": s.state.name if s.state else None,
                              "message": short(s.state.message or "", 500) if s.state else ""} for s in subflows]
        ids = [flow_run_id, *(s["flow_run_id"] for s in evidence.subflows)]
        deadline = time.monotonic() + grace_seconds
        while True:
            tail = api.read_logs(ids, newest_first=True, limit=50)
            done = any(FINISHED.match(line.message) and line.flow_run_id == str(flow_run_id) for line in tail)
            if done or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        evidence.problems = api.read_logs(ids, min_level=logging.WARNING, limit=200)
        evidence.summary = [line.message for line in reversed(tail) if SUMMARY_LINE.match(line.message)]
    except PrefectApiError as exc:
        evidence.unavailable = str(exc)
    return evidence


def dispatch_cause(lines: list[str], *, sender: str | None = None) -> DispatchCause:
    """What the dispatch error lines say, and what to do about it (the first kind that matches, in
    order of how specific it is)."""
    text = "\n".join(lines)
    fn = _function_named(text) or sender
    target = f"data-enrichment-workers.{fn}" if fn else "the sender"
    if re.search(r"credentials missing|MODAL_TOKEN_ID / MODAL_TOKEN_SECRET (are|is) not set|token.*not set", text, re.I):
        return DispatchCause(
            "modal_credentials_missing", "the runtime has no Modal credentials (MODAL_TOKEN_ID / MODAL_TOKEN_SECRET unset)",
            "map the deployment's env MODAL_TOKEN_ID / MODAL_TOKEN_SECRET to the Secret blocks modal-token-id / "
            "modal-token-secret (step 03) and make sure both blocks exist and hold the token", fn)
    if re.search(r"\b40[13]\b|unauthori[sz]ed|forbidden|AuthError|token (missing or )?invalid|invalid token|"
                 r"token.*(malformed|revoked|expired)", text, re.I):
        return DispatchCause(
            "modal_auth", f"Modal refused the runtime's credentials when spawning {target}",
            "put a valid token of the Modal workspace that hosts data-enrichment-workers in the Secret blocks "
            "modal-token-id / modal-token-secret (the runtime reads them through the deployment's env)", fn)
    if re.search(r"no Modal sender mapped|no modal_sender_fn|no sender", text, re.I):
        return DispatchCause(
            "no_sender", "no Modal sender is mapped for the step (enrichment_registry)",
            "set modal_sender_fn (and the batch's workstream_slug) on the step's enrichment_registry row", fn)
    if re.search(r"\b404\b|not found|NotFoundError|lookup failed|does not exist", text, re.I):
        return DispatchCause(
            "not_found", f"Modal has no {target} (the app is not deployed in the token's workspace, or the "
                         "registry names a function the app does not have)",
            f"deploy the Modal app data-enrichment-workers (`modal deploy`) in the workspace of the runtime's token, "
            f"or fix enrichment_registry.modal_sender_fn{f' ({fn})' if fn else ''} to a function the app has", fn)
    if re.search(r"cannot reach|connection (refused|reset|error)|ConnectError|timed? ?out|name or service not known|"
                 r"temporary failure in name resolution|unreachable|Errno", text, re.I):
        return DispatchCause(
            "unreachable", f"the runtime could not reach Modal to spawn {target}",
            "check the runtime's network egress to Modal (and ENRICHMENT_DISPATCH_URL where it is set), and Modal's status", fn)
    if re.search(r"\b5\d\d\b|internal|error", text, re.I):
        return DispatchCause(
            "modal_error", f"Modal answered an error to the spawn of {target}",
            "check Modal's status and the app's logs (`modal app logs data-enrichment-workers`)", fn)
    return DispatchCause("unknown", "the dispatch failed for a reason the logs do not make clear",
                         "read the quoted lines and the flow run's logs", fn)


def _first_line(text: str) -> str:
    return (text or "").strip().split("\n", 1)[0]


def _function_named(text: str) -> str | None:
    found = (re.search(r"data-enrichment-workers\.([A-Za-z0-9_\-]+)", text)
             or re.search(r"\bto ([A-Za-z_][A-Za-z0-9_]*)\s*[:(]", text))
    return found.group(1) if found else None


def pool_diagnosis(api: PrefectApi, pool_name: str) -> str:
    """Why nobody picks up the pool's runs: missing, paused, or no worker online (with heartbeats)."""
    pool = api.read_work_pool(pool_name)
    if pool is None:
        return f"work pool {pool_name!r} does not exist"
    if pool.is_paused:
        return f"work pool {pool_name} is PAUSED"
    workers = api.call(f"reading the workers of {pool_name}",
                            lambda c: c.read_workers_for_work_pool(pool_name))
    online = [w for w in workers if getattr(w.status, "value", w.status) == "ONLINE"]
    status = getattr(pool.status, "value", pool.status)
    if online:
        now = datetime.now(timezone.utc)
        beats = ", ".join(f"{w.name} (last heartbeat {(now - w.last_heartbeat_time).total_seconds():.0f}s ago)"
                          for w in online if w.last_heartbeat_time)
        return (f"pool {pool_name} is {status} and lists worker(s) {beats} as online, yet none took the "
                "run: a worker that stopped is listed online until its heartbeat expires")
    seen = ", ".join(f"{w.name} {getattr(w.status, 'value', w.status)} (last heartbeat {w.last_heartbeat_time:%H:%M:%S})"
                     for w in workers if w.last_heartbeat_time) or "none ever"
    return f"pool {pool_name} is {status}: no worker is online (workers seen: {seen})"


def stuck_items(o: Any, rows: list[dict[str, Any]], paths: dict[str, list[str]], good: list[dict[str, Any]], *,
                registry: list[dict[str, Any]], run_state: str | None, batch_size: Any,
                evidence: RunEvidence | None = None) -> list[dict[str, Any]]:
    """Group the items that did not make it by status and likely cause (the contract's failure modes):
    `rows` are the test batch's states of the first step, `paths` each item's recorded statuses,
    `registry` the workstream's enrichment_registry rows, `run_state` the flow run's final state,
    `evidence` what the flow run's state and logs say (the dispatch errors decide the remediation)."""
    good_ids = {str(r["item_id"]) for r in good}
    by_slug = {r["slug"]: r for r in registry}
    sender = (by_slug.get(o.first_step) or {}).get("modal_sender_fn")
    claimed = sum(1 for r in rows if r["status"] != "PENDING" or "QUEUED" in paths.get(str(r["item_id"]), []))
    logged = evidence.dispatch_messages if evidence else []
    reset = (f"then reset the stuck states to PENDING (UPDATE public.workflow_states SET status = 'PENDING' WHERE "
             f"step_name = '{o.first_step}' AND status = 'QUEUED' AND updated_at < now() - interval '10 minutes') and "
             "trigger again")
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        item = str(r["item_id"])
        if item in good_ids:
            continue
        meta = r["meta"] if isinstance(r["meta"], dict) else {}
        status = r["status"]
        if reached(status, o.target_status):
            cause = (f"reached {status} without recording {' -> '.join(o.expected_path)} (recorded: "
                     f"{' -> '.join(paths.get(item, [])) or 'nothing'})")
            fix = "check that runbook.workflow_state_transitions records every status change (its trigger)"
        elif status == "PENDING":
            if meta.get("last_dispatch_error"):
                found = dispatch_cause([str(meta["last_dispatch_error"]), *logged], sender=sender)
                cause = (f"dispatch failed ({meta.get('dispatch_attempts', '?')} attempt(s)): "
                         f"{short(str(meta['last_dispatch_error']), 200)}; left PENDING for a retry by a later run "
                         f"({found.cause})")
                fix = f"{found.remediation}; then trigger again (the states are PENDING, ready for a retry)"
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
            elif logged:
                found = dispatch_cause(logged, sender=sender)
                swallowed = (f"; the flow run still ended {run_state}: the orchestrator logged the error and went on, "
                             "and never rolls the state back" if run_state == "COMPLETED" else "")
                cause = f"set QUEUED, then the dispatch failed: {found.cause} (the logs quoted below){swallowed}"
                fix = (f"{found.remediation}; {reset}"
                       + ("; deploy an orchestrator that puts a failed dispatch back to PENDING and fails the run "
                          "(the repository's flows/ version does)" if swallowed else ""))
            elif evidence is not None and evidence.unavailable is None:
                cause = (f"set QUEUED and, by the flow run's logs, dispatched without error, but the sender {sender} "
                         "never set them IN_PROGRESS (it failed, or never started, in Modal)")
                fix = f"read the sender's logs in Modal (`modal app logs data-enrichment-workers`) and fix it; {reset}"
            else:
                unread = f" (the flow run's logs could not be read: {evidence.unavailable})" if evidence else ""
                cause = (f"set QUEUED but the sender {sender} never took them (no Modal credentials in the runtime, a "
                         f"missing Secret block, the Modal app not deployed); the state is never rolled back{unread}")
                fix = ("read the flow run's logs for the spawn errors; give the runtime Modal credentials "
                       "(Secret blocks modal-token-id / modal-token-secret), then reset the states to PENDING")
        elif status == "IN_PROGRESS":
            cause = ("handed to the enrichment service by the sender; the receiver has not completed them within "
                     "the timeout")
            fix = "check the receiver function and the external enrichment service; raise completion_timeout if slow"
        elif status == "FAILED":
            reason = str(meta.get("error") or "no reason recorded in meta.error")
            cause = f"FAILED: {short(reason, 200)}"
            if "no Modal sender mapped" in reason:
                fix = "map a Modal sender for the step"
            elif meta.get("last_dispatch_error"):
                fix = dispatch_cause([reason, *logged], sender=sender).remediation + "; then relaunch"
            else:
                fix = "read the reason; fix the sender/receiver or the external service, then relaunch"
        else:
            cause = f"status {status}, recorded path {paths.get(item)}"
            fix = "check what else writes workflow_states for this batch"
        group = groups.setdefault((status, cause), {"status": status, "cause": cause, "remediation": fix,
                                                    "count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < STUCK_EXAMPLES:
            group["examples"].append(item)
    return list(groups.values())
