"""Launch -> pg_net response -> flow run created -> running -> first IN_PROGRESS -> all IN_PROGRESS,
for a batch of 100 items, over repeated launches: step 05 (end-to-end test) run alone against the
sandbox, its timeline (ms from the launch, `steps/e2e/timeline.py`) read from the run's manifest.

The deployment is the profile's (by name): a first whole run (01-04, --no-setup skips it) deploys it,
points the Edge Function at it and warms the managed-environment cache. Goal (issue 14): launch -> all
100 items IN_PROGRESS <= 5 s with a warm cache, the flow run picked up within ~1 s of its creation.

Then where the time between the flow run's creation and the last IN_PROGRESS goes, phase by phase,
from the flow run's state history and its (and its subflows') logs read through the Prefect API:
the worker's pick-up, its submission (templating, the environment cache), the flow process's start
until its pull step, the clone, the engine's import of the entrypoint until RUNNING, the sequencer
subflow, the dispatcher's start, then the dispatch itself (first QUEUED -> last IN_PROGRESS).

Usage: python bench/e2e_latency.py [--launches 5] [--items 100] [--no-setup]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import begin, fmt, record, runbook_cli, sandbox, sandbox_env, stats  # noqa: E402

E2E = "05_end_to_end_test"
EVENTS = [  # (timeline key, label)
    ("pg_net_response", "launch -> pg_net response"),
    ("flow_run_created", "launch -> flow run created"),
    ("flow_run_running", "launch -> flow run running"),
    ("first_in_progress", "launch -> first item IN_PROGRESS"),
    ("last_in_progress", "launch -> all items IN_PROGRESS"),
    ("completed", "launch -> all items COMPLETED"),
]

# (phase key, label, how the phase's end is found: a state type, or a log line's start)
MILESTONES = [
    ("picked_up", "worker picks the run up (PENDING)", ("state", "PENDING")),
    ("submitted", "submission (templating, env cache)", ("log", "submitted to infrastructure")),
    ("pull_steps", "flow process start -> pull step", ("log", "Running 1 deployment pull step")),
    ("cloned", "git clone", ("log", "All deployment steps completed")),
    ("running", "import of the entrypoint -> RUNNING", ("state", "RUNNING")),
    ("sequencer", "orchestrator start -> sequencer", ("log", "for flow 'advance_completed_items'")),
    ("dispatcher", "sequencer -> dispatcher start", ("log", "for flow 'dispatch_pending_items'")),
]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def phases(env: dict[str, str], flow_run_id: str, timeline: dict) -> dict[str, float | None]:
    """Seconds each phase took, from the flow run's creation to the last IN_PROGRESS item."""
    api = httpx.Client(base_url=env["PREFECT_API_URL"].rstrip("/") + "/", timeout=30,
                       headers={"Authorization": f"Bearer {env['PREFECT_API_KEY']}"})
    with api:
        run = api.get(f"flow_runs/{flow_run_id}").raise_for_status().json()
        states = api.get("flow_run_states/", params={"flow_run_id": flow_run_id}).raise_for_status().json()
        subs = api.post("flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
        ids = [flow_run_id, *(r["id"] for r in subs.raise_for_status().json())]
        logs = api.post("logs/filter", json={"logs": {"flow_run_id": {"any_": ids}}, "sort": "TIMESTAMP_ASC",
                                             "limit": 200}).raise_for_status().json()
    created = _at(run["created"])
    found: dict[str, float | None] = {}
    for key, _, (kind, what) in MILESTONES:
        if kind == "state":
            times = [_at(st["timestamp"]) for st in states if st["type"] == what]
        else:
            times = [_at(line["timestamp"]) for line in logs if what in line["message"]]
        found[key] = (min(times) - created).total_seconds() if times else None
    origin = (timeline.get("flow_run_created") or 0) / 1000  # the timeline is from the launch
    for key in ("first_queued", "last_in_progress"):
        found[key] = timeline[key] / 1000 - origin if timeline.get(key) is not None else None
    out, previous = {}, 0.0
    for key in [m[0] for m in MILESTONES] + ["first_queued", "last_in_progress"]:
        out[key] = None if found[key] is None or previous is None else found[key] - previous
        previous = found[key]
    return out


PHASE_LABELS = {m[0]: m[1] for m in MILESTONES} | {
    "first_queued": "dispatcher start -> first QUEUED", "last_in_progress": "first QUEUED -> all IN_PROGRESS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--no-setup", action="store_true", help="the profile's deployment is already deployed")
    args = parser.parse_args()
    begin()
    outputs = Path(tempfile.mkdtemp(prefix="runbook-bench-e2e-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    timelines: list[dict] = []
    breakdowns: list[dict] = []
    with sandbox() as state:
        env = {**sandbox_env(state), "RUNBOOK_SANDBOX_DIR": str(state)}
        if not args.no_setup:
            _, proc = runbook_cli("run", "--profile", "sandbox", "--confirm", "--run-id", f"e2e-{stamp}-setup",
                                  "--outputs-dir", str(outputs), env=env, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"the set-up run failed; see {outputs}:\n{proc.stdout[-3000:]}")
        for i in range(args.launches):
            run_id = f"e2e-{stamp}-{i}"
            _, proc = runbook_cli("run", "--profile", "sandbox", "--confirm", "--only", E2E, "--run-id", run_id,
                                  "-p", f"n_items={args.items}", "--outputs-dir", str(outputs), env=env, timeout=900)
            manifest = json.loads((outputs / run_id / "manifest.json").read_text())
            values = next(s for s in manifest["steps"] if s["step"] == E2E)["results"]
            timeline = values.get("timeline") or {}
            if proc.returncode != 0:
                print(f"  launch {i} ended {manifest['status']}: {values.get('failed_link')}; see {outputs / run_id}")
            timelines.append({k: (v / 1000 if v is not None else None) for k, v in timeline.items()})
            if values.get("flow_run_id"):
                try:
                    breakdowns.append(phases(env, values["flow_run_id"], timeline))
                except httpx.HTTPError as exc:
                    print(f"  launch {i}: phases not read ({type(exc).__name__}: {exc})")
    print(f"end-to-end latency, {args.items} items, {args.launches} launches of step 05 (seconds from the launch)")
    figures = []
    for key, label in EVENTS:
        s = stats([t.get(key) for t in timelines])
        goal = "<= 5 s" if key == "last_in_progress" else None
        print(f"  {label:36} {fmt(s, 's', 2)}" + (f"   goal {goal}" if goal else ""))
        figures.append({"figure": f"e2e {label}", "stats": s, "unit": "s", "goal": goal})
    picked = stats([t["flow_run_running"] - t["flow_run_created"] for t in timelines
                    if t.get("flow_run_running") is not None and t.get("flow_run_created") is not None])
    print(f"  {'flow run created -> running':36} {fmt(picked, 's', 2)}   goal ~1 s")
    figures.append({"figure": "e2e flow run created -> running", "stats": picked, "unit": "s", "goal": "~1 s"})
    if breakdowns:
        print("  where the time goes, flow run created -> all IN_PROGRESS (seconds per phase):")
        for key, label in PHASE_LABELS.items():
            s = stats([b.get(key) for b in breakdowns])
            print(f"    {label:40} {fmt(s, 's', 2)}")
            figures.append({"figure": f"e2e phase: {label}", "stats": s, "unit": "s", "goal": None})
    record("e2e_latency", figures, items=args.items)


if __name__ == "__main__":
    main()
