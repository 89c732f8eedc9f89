"""Diagnosis from evidence: why a flow run never started (the pool, its workers and their
heartbeats), and why test items are stuck (grouped by status and cause, with examples)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from runbook_lib.steps.e2e.links import reached, short
from runbook_lib.systems.prefect import PrefectApi

STUCK_EXAMPLES = 5


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
                registry: list[dict[str, Any]], run_state: str | None, batch_size: Any) -> list[dict[str, Any]]:
    """Group the items that did not make it by status and likely cause (the contract's failure modes):
    `rows` are the test batch's states of the first step, `paths` each item's recorded statuses,
    `registry` the workstream's enrichment_registry rows, `run_state` the flow run's final state."""
    good_ids = {str(r["item_id"]) for r in good}
    by_slug = {r["slug"]: r for r in registry}
    sender = (by_slug.get(o.first_step) or {}).get("modal_sender_fn")
    claimed = sum(1 for r in rows if r["status"] != "PENDING" or "QUEUED" in paths.get(str(r["item_id"]), []))
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
                cause = (f"dispatch failed ({meta.get('dispatch_attempts', '?')} attempt(s)): "
                         f"{short(str(meta['last_dispatch_error']), 200)}; left PENDING for a retry by a later run")
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
            cause = f"FAILED: {short(str(meta.get('error') or 'no reason recorded in meta.error'), 200)}"
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
