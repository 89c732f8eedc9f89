"""The links of the chain the end-to-end test proves, each a check defined once, and the small
pure helpers the probes, the diagnosis and the timeline share."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from runbook_lib.checks.base import define
from runbook_lib.core.secrets import redact

STATUSES = ("PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED")

LINK_TRIGGER = "link1.trigger"
LINK_EDGE_FUNCTION = "link2.edge_function"
LINK_FLOW_RUN = "link3.flow_run"
LINK_WORK_POOL = "link4.work_pool_run"
LINK_ITEMS = "link5.items"
_AGAIN = "read the detail; fix that link and re-run this step"
LINK_DEFS = {
    LINK_TRIGGER: define(LINK_TRIGGER, "Link 1: the trigger fired and pg_net got an answer", remediation=_AGAIN,
                         proves="the batch's INITIALIZING -> PENDING flip fired the trigger, whose pg_net request got a "
                                "response (status, timed_out, error_msg)"),
    LINK_EDGE_FUNCTION: define(LINK_EDGE_FUNCTION, "Link 2: the Edge Function answered 200 with a flow run id",
                               remediation=_AGAIN, proves="the Edge Function started a flow run (200 with flow_run_id)"),
    LINK_FLOW_RUN: define(LINK_FLOW_RUN, "Link 3: the flow run exists, belongs to the deployment, was created after the "
                          "launch", remediation=_AGAIN,
                          proves="the flow run the function reported is in this workspace, of the expected deployment"),
    LINK_WORK_POOL: define(LINK_WORK_POOL, "Link 4: the flow run ran on the work pool and reached a terminal state",
                           remediation=_AGAIN, proves="the flow run ran on the expected pool and finished (its logs and "
                                                      "state message when it did not)"),
    LINK_ITEMS: define(LINK_ITEMS, "Link 5: every test item moved through the pipeline", remediation=_AGAIN,
                       proves="every test item recorded PENDING -> QUEUED -> IN_PROGRESS (-> COMPLETED); stuck items "
                              "grouped by cause, with evidence"),
}
LINKS = {id: d.title_for(None) for id, d in LINK_DEFS.items()}
LANES = {  # the figure's lane of each link
    LINK_TRIGGER: "1 trigger / pg_net", LINK_EDGE_FUNCTION: "2 Edge Function", LINK_FLOW_RUN: "3 flow run created",
    LINK_WORK_POOL: "4 flow run on pool", LINK_ITEMS: "5 items",
}

DEPLOYMENT = define("deployment", "The deployment the chain must start",
                    proves="which deployment the test expects the chain to start, and where its id came from")
LAUNCH = define("launch", "Test batch launched",
                proves="the test batch was inserted the UI's way (INITIALIZING, items, states, then the flip)",
                remediation="check the database (DATABASE_URL), the e2e settings (client, workstream, blueprint) and the "
                            "schema, then re-run this step")
TIMELINE = define("timeline", "Timeline collected", proves="the timeline of the test was read back",
                  remediation="the checks above stand; the timeline is incomplete")
CLEANUP = define("cleanup", "Test rows deleted", proves="the test batch's rows were deleted (cleanup=True)")
ORPHANS = define("orphans", "Orphaned test batches of earlier runs deleted",
                 proves="no test batch left by an earlier end-to-end test that never cleaned up (its process is gone, "
                        "or it is past its deadline) stays in the database; each one found is deleted and named",
                 remediation="delete it by hand: DELETE FROM public.batches WHERE id = '<batch id>' (items, states and "
                             "results cascade)")


def ms(at: datetime | None, origin: datetime | None) -> float | None:
    """Milliseconds from `origin` to `at`."""
    if at is None or origin is None:
        return None
    return round((at - origin).total_seconds() * 1000, 1)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


def as_json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def short(text: str | None, limit: int = 300) -> str:
    text = redact(text or "")
    return text if len(text) <= limit else text[:limit] + "..."


def seconds(value_ms: float | None) -> str:
    return "?" if value_ms is None else f"{value_ms / 1000:.2f}s"


def count(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def reached(status: str, target: str) -> bool:
    """At the target, or past it (COMPLETED is past IN_PROGRESS)."""
    return status == target or (target == "IN_PROGRESS" and status == "COMPLETED")


def follows(path: list[str], expected: list[str]) -> bool:
    """The recorded path starts PENDING and holds `expected` in order (retries may repeat a status)."""
    if not path or path[0] != expected[0]:
        return False
    position = 0
    for status in path:
        if position < len(expected) and status == expected[position]:
            position += 1
    return position == len(expected)
