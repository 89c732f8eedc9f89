"""The end-to-end test's timeline: collected from the records (pg_net, Prefect, the audit of state
changes), shown as tables (links, events, latencies) and as a figure (one lane per link, and the
test items' state counts over time)."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

from runbook_lib.checks.base import Status
from runbook_lib.core import render
from runbook_lib.steps.e2e.links import (
    LANES, LINK_EDGE_FUNCTION, LINK_FLOW_RUN, LINK_ITEMS, LINK_TRIGGER, LINK_WORK_POOL, STATUSES, count, diff, ms,
)
from runbook_lib.systems.prefect import FINAL_STATE_TYPES


def collect(result: Any, *, origin: datetime, response: dict[str, Any] | None, run: Any, running_at: datetime | None,
            transitions: list[dict[str, Any]], observed_until_ms: float, rows: list[dict[str, Any]]) -> None:
    """Fill `result`'s timeline (ms offsets from the launch at `origin`), latencies and the series of
    state counts, from the pg_net response, the flow run and the recorded `transitions` of the
    first step's states (`rows`: the states now)."""
    events: dict[str, float | None] = {"launch": 0.0}
    events["pg_net_response"] = ms(response["created"], origin) if response else None
    events["flow_run_created"] = ms(run.created, origin) if run is not None else None
    events["flow_run_running"] = ms(running_at, origin)
    finished = None
    if run is not None and run.state is not None and run.state.type.value in FINAL_STATE_TYPES:
        finished = run.end_time or run.state.timestamp
    events["flow_run_finished"] = ms(finished, origin)
    for status, key in (("QUEUED", "queued"), ("IN_PROGRESS", "in_progress")):
        times = [t["at"] for t in transitions if t["to_status"] == status]
        events[f"first_{key}"] = ms(min(times), origin) if times else None
        events[f"last_{key}"] = ms(max(times), origin) if times else None
    completed = {str(t["item_id"]): t["at"] for t in transitions if t["to_status"] == "COMPLETED"}
    events["completed"] = (ms(max(completed.values()), origin)
                           if completed and len(completed) == len(result.item_ids) else None)
    events["observed_until"] = observed_until_ms  # when the test stopped watching
    result.timeline_ms = events
    result.latencies_ms = {
        "launch_to_pg_net_response": events["pg_net_response"],
        "launch_to_flow_run_created": events["flow_run_created"],
        "flow_run_created_to_running": diff(events["flow_run_created"], events["flow_run_running"]),
        "flow_run_running_to_finished": diff(events["flow_run_running"], events["flow_run_finished"]),
        "flow_run_running_to_first_queued": diff(events["flow_run_running"], events["first_queued"]),
        "first_queued_to_first_in_progress": diff(events["first_queued"], events["first_in_progress"]),
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
        at = max(0.0, ms(t["at"], origin))  # the items were inserted just before the flip
        if series and series[-1][0] == at:
            series[-1] = (at, dict(current))
        else:
            series.append((at, dict(current)))
    if series:
        series.append((max(events["observed_until"], series[-1][0]), dict(current)))
    result.count_series = series
    if not result.state_counts:
        result.state_counts = count(rows)


def tables(result: Any) -> render.Group:
    """The links (status, when proven), the timeline's events and the latencies, as tables."""
    links = [(render.Cell(c.title), render.Cell(c.status.value, status=c.status.value),
              "" if c.data.get("elapsed_ms") is None else f"{c.data['elapsed_ms'] / 1000:.2f}",
              (c.detail.splitlines() or [""])[0][:160]) for c in result.link_checks()]
    events = [(k, "—" if v is None else f"{v / 1000:.2f}") for k, v in result.timeline_ms.items()]
    latencies = [(k, "—" if v is None else f"{v:.0f}") for k, v in result.latencies_ms.items()]
    return render.Group([
        render.Table(f"End-to-end test: batch {result.batch_id}, flow run {result.flow_run_name or result.flow_run_id}",
                     ("Link", "Status", "At (s after launch)", "Detail"), links),
        render.Table("Timeline (seconds after the launch)", ("Event", "At (s)"), events),
        render.Table("Latencies", ("Latency", "ms"), latencies),
    ])


_STATUS_COLOURS = {s: render.COLOURS[render.style_of(s)[0]] for s in STATUSES}
_STATUS_COLOURS["PENDING"] = render.COLOURS["muted"]
_CHECK_COLOURS = {s: render.COLOURS[render.style_of(s.value)[0]] for s in Status}


def figure(result: Any) -> Any:
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


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
