"""`sandbox up` fresh and warm, `sandbox down`: wall times of the commands as a user runs them, each
service's start (from the state file: waited for what it needs, its start to healthy, its after_start
hook), the sandbox's resident memory once up, and whether `down` left anything running.

Goals (issue 14): up <= 12 s fresh, <= 8 s warm (an existing state directory); down <= 2 s, nothing
left; the whole sandbox <= 1 GiB resident (the peak during a run is bench/runbook.py's).

Usage: python bench/sandbox_lifecycle.py [--repeats 3]   (a sandbox of its own, in a temporary directory)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import begin, breakdown, fmt, instance_id, mib, record, runbook_cli, sandbox_rss_by_kind, stats, summed  # noqa: E402

from runbook_lib.core import processes  # noqa: E402


def service_timings(state: Path) -> dict[str, dict]:
    recs = json.loads((state / "sandbox.json").read_text())["services"]
    return {name: rec.get("timing") or {} for name, rec in recs.items()}


def up(env: dict) -> float:
    seconds, proc = runbook_cli("sandbox", "up", env=env)
    if proc.returncode != 0:
        raise SystemExit(f"sandbox up failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def down(env: dict, marker: str) -> tuple[float, int]:
    seconds, proc = runbook_cli("sandbox", "down", env=env)
    if proc.returncode != 0:
        raise SystemExit(f"sandbox down failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds, len(processes.processes_of(marker))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh and warm cycles each")
    args = parser.parse_args()
    begin()
    fresh, warm, downs, left, rss, nproc = [], [], [], [], [], []
    by_kind: dict[str, tuple[int, int]] = {}  # the last cycle's, once up
    warm_state = Path()
    per_service: dict[str, dict[str, list[float]]] = {}
    for kind in ["fresh"] * args.repeats + ["warm"] * args.repeats:
        state = Path(tempfile.mkdtemp(prefix="runbook-bench-lifecycle-")) if kind == "fresh" else warm_state
        env = {"RUNBOOK_SANDBOX_DIR": str(state)}
        try:
            seconds = up(env)
            (fresh if kind == "fresh" else warm).append(seconds)
            marker = instance_id(state)
            time.sleep(2)  # settle: resident memory once idle, not mid-start
            by_kind = sandbox_rss_by_kind(marker)
            total, n = summed(by_kind)
            rss.append(mib(total))
            nproc.append(n)
            for name, timing in service_timings(state).items():
                for key, value in timing.items():
                    per_service.setdefault(name, {}).setdefault(f"{kind} {key}", []).append(value)
            seconds, remaining = down(env, marker)
            downs.append(seconds)
            left.append(remaining)
        finally:
            if kind == "fresh":
                # Keep the last fresh state directory for the warm cycles; the others go.
                if len(fresh) < args.repeats:
                    runbook_cli("sandbox", "down", "--purge", env=env)
                    shutil.rmtree(state, ignore_errors=True)
                else:
                    warm_state = state
    runbook_cli("sandbox", "down", "--purge", env={"RUNBOOK_SANDBOX_DIR": str(warm_state)})

    s_fresh, s_warm, s_down, s_rss = stats(fresh), stats(warm), stats(downs), stats(rss)
    print(f"sandbox lifecycle ({args.repeats} fresh + {args.repeats} warm cycles; wall time of the CLI command)")
    print(f"  up, fresh state directory   {fmt(s_fresh)}   goal <= 12 s")
    print(f"  up, existing state          {fmt(s_warm)}   goal <= 8 s")
    print(f"  down                        {fmt(s_down)}   goal <= 2 s; processes left after down: {max(left)}")
    print(f"  resident memory once up     {fmt(s_rss, 'MiB', 0)} over {max(nproc)} processes   goal <= 1024 MiB")
    print(f"    the last cycle's, by kind: {breakdown(by_kind) or 'n/a'}")
    print("  per service, median seconds (waited = until what it needs was up; start = spawn to healthy; "
          "setup_waited = until what its set-up needs was up; after_start = its set-up hook):")
    rows = []
    for name, figures in per_service.items():
        cells = {key: stats(values)["median"] for key, values in figures.items()}
        rows.append({"service": name, **cells})
        print(f"    {name:16} " + "  ".join(f"{key} {value:5.2f}" for key, value in cells.items()))
    record(
        "sandbox_lifecycle",
        [
            {"figure": "sandbox up, fresh", "stats": s_fresh, "unit": "s", "goal": "<= 12 s"},
            {"figure": "sandbox up, existing state", "stats": s_warm, "unit": "s", "goal": "<= 8 s"},
            {"figure": "sandbox down", "stats": s_down, "unit": "s", "goal": "<= 2 s",
             "note": f"{max(left)} process(es) left"},
            {"figure": "sandbox RSS once up", "stats": s_rss, "unit": "MiB", "goal": "<= 1024 MiB"},
        ],
        per_service=rows,
    )


if __name__ == "__main__":
    main()
