"""The whole runbook, 01-05, with the sandbox up: `runbook run --profile sandbox --confirm` as a user
runs it, repeated; each step's duration from the run's manifest (median, min, max), the whole run's
wall time, and the sandbox's peak resident memory while it ran.

The first run warms the managed-environment cache (its pip_packages) and is counted apart, unless
--no-warmup. Goals (issue 14): 01-05 <= 40 s with the cache warm; the sandbox <= 1 GiB resident at its peak.

Usage: python bench/runbook.py [--repeats 3] [--no-warmup]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakRss, begin, breakdown, fmt, instance_id, mib, record, runbook_cli, sandbox, sandbox_env, stats  # noqa: E402


def one_run(state: Path, outputs: Path, run_id: str) -> tuple[float, dict, PeakRss]:
    """(wall seconds, manifest, the sandbox's peak memory: `.peak` bytes, `.at_peak` by kind) of one whole run."""
    env = {**sandbox_env(state), "RUNBOOK_SANDBOX_DIR": str(state)}
    with PeakRss(instance_id(state)) as peak:
        seconds, proc = runbook_cli("run", "--profile", "sandbox", "--confirm", "--run-id", run_id,
                                    "--outputs-dir", str(outputs), env=env, timeout=1800)
    manifest = json.loads((outputs / run_id / "manifest.json").read_text())
    if proc.returncode != 0:
        failed = [s["step"] for s in manifest["steps"] if s["status"] not in ("passed", "not_run")]
        print(f"  run {run_id} ended {manifest['status']} (steps {failed}); see {outputs / run_id}")
    return seconds, manifest, peak


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def step_phases(run_dir: Path, step: dict) -> dict[str, float]:
    """Where one step's seconds went (from the manifest's phases and papermill's cell times):
    `prewarm`: its process started -> its kernel ready with the imports done (papermill's import, the
    kernel's start, the notebook's and Prefect's imports), overlapped with the step before; `wait_warm`:
    the part of it left when the step was due (in the step's duration); `to_first_cell`: -> papermill's first cell; `imports`: the notebook's first code cell
    (imports, settings, start_step); `cells`: the other cells (the step's own work and its network waits);
    `to_verdict`: last cell -> the verdict read by the runner."""
    phases, began = step.get("phases") or {}, _at(step.get("started_at"))
    output = run_dir / (step.get("output") or "")
    if not phases or began is None or not output.is_file():
        return {}
    cells = [c for c in json.loads(output.read_text())["cells"]
             if c["cell_type"] == "code" and c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not cells:
        return {}
    work = [c for c in cells if not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", []))]
    first = (_at(cells[0]["metadata"]["papermill"]["start_time"]) - began).total_seconds()
    last = (_at(cells[-1]["metadata"]["papermill"]["end_time"]) - began).total_seconds()
    go = max(phases.get("go", 0.0), 0.0)
    ready = phases.get("imports_done", phases.get("kernel_ready"))
    return {
        "prewarm": round(ready - phases["process_start"], 3) if ready is not None and "process_start" in phases else 0.0,
        "wait_warm": go,
        "to_first_cell": round(first - go, 3),
        "imports": work[0]["metadata"]["papermill"]["duration"] if work else 0.0,
        "cells": round(sum(c["metadata"]["papermill"]["duration"] for c in work[1:]), 3),
        "to_verdict": round(step["duration_seconds"] - last, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true", help="count every run (the cache is already warm)")
    args = parser.parse_args()
    begin()
    outputs = Path(tempfile.mkdtemp(prefix="runbook-bench-runs-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    walls, peaks, statuses = [], [], []
    highest: PeakRss | None = None  # the run whose peak was the highest: what made it up
    steps: dict[str, list[float]] = {}
    phases: dict[str, dict[str, list[float]]] = {}
    with sandbox() as state:
        if not args.no_warmup:
            seconds, manifest, peak = one_run(state, outputs, f"bench-{stamp}-warmup")
            print(f"  warm-up run (managed environment cache filled): {seconds:.1f} s, {manifest['status']}")
            peaks.append(mib(peak.peak))
            highest = peak
        for i in range(args.repeats):
            seconds, manifest, peak = one_run(state, outputs, f"bench-{stamp}-{i}")
            walls.append(seconds)
            peaks.append(mib(peak.peak))
            if highest is None or peak.peak > highest.peak:
                highest = peak
            statuses.append(manifest["status"])
            for step in manifest["steps"]:
                if step.get("duration_seconds") is not None:
                    steps.setdefault(step["step"], []).append(step["duration_seconds"])
                    for phase, value in step_phases(outputs / manifest["run_id"], step).items():
                        phases.setdefault(step["step"], {}).setdefault(phase, []).append(value)
    s_wall, s_peak = stats(walls), stats(peaks)
    print(f"whole runbook 01-05 against the sandbox, {args.repeats} runs ({', '.join(statuses)}), runs in {outputs}")
    for name, values in steps.items():
        print(f"  {name:34} {fmt(stats(values))}")
    print(f"  {'whole run (runner command)':34} {fmt(s_wall)}   goal <= 40 s")
    names = ["prewarm", "wait_warm", "to_first_cell", "imports", "cells", "to_verdict"]
    print("  where each step's seconds went (medians; prewarm overlaps the step before, but for wait_warm):")
    print(f"  {'':34} " + " ".join(f"{n:>13}" for n in names))
    for name, values in phases.items():
        print(f"  {name:34} " + " ".join(f"{stats(values.get(n, []))['median'] or 0:13.2f}" for n in names))
    print(f"  {'sandbox peak RSS during the runs':34} {fmt(s_peak, 'MiB', 0)}   goal <= 1024 MiB")
    at_peak = highest.at_peak if highest is not None else {}
    print(f"  {'at the highest peak':34} {breakdown(at_peak) or 'n/a'}")
    figures = [{"figure": f"step {name}", "stats": stats(values), "unit": "s"} for name, values in steps.items()]
    figures += [
        {"figure": "runbook 01-05, whole run", "stats": s_wall, "unit": "s", "goal": "<= 40 s",
         "note": ", ".join(sorted(set(statuses)))},
        {"figure": "sandbox peak RSS during make run", "stats": s_peak, "unit": "MiB", "goal": "<= 1024 MiB"},
    ]
    record("runbook", figures, phases={step: {n: stats(v) for n, v in p.items()} for step, p in phases.items()},
           peak_rss_by_kind={kind: {"mib": round(mib(total), 1), "processes": count}
                             for kind, (total, count) in at_peak.items()})


if __name__ == "__main__":
    main()
