"""How long `runbook health` takes against a running sandbox (goal: <= 10 s), measured as a user
runs it: the command line in a new process (Python start, imports, every check, the record).

Prints the wall-clock seconds of each repetition, their median, and the slowest checks of one
in-process run (import time shown apart: Prefect's client alone takes seconds to import).

Usage: python bench/health_check.py [--repeat 3] [--outputs-dir DIR]
Uses the running sandbox (`runbook sandbox up`; RUNBOOK_SANDBOX_DIR if it is not .sandbox/), else starts
one in a temporary directory and stops it at the end. Runs only reads: the health check changes nothing
without --requeue-stuck --confirm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import begin, record, sandbox, stats  # noqa: E402


def command_line(outputs: Path) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runbook_lib", "health", "--profile", "sandbox", "--json",
                           "--outputs-dir", str(outputs)], cwd=ROOT, capture_output=True, text=True)
    return time.monotonic() - started, proc.returncode


def per_check() -> list[tuple[float, str]]:
    started = time.monotonic()
    import prefect.client.orchestration  # noqa: F401  (what the first Prefect call pays)

    imported = time.monotonic() - started
    from runbook_lib.checks.health import GROUPS, Baseline, HealthFacts
    from runbook_lib.core.profiles import load_settings

    facts = HealthFacts(load_settings("sandbox"), "bench", Baseline(source="the profile"))
    times = [(imported, "(import prefect's client)")]
    for group in GROUPS.values():
        for definition in group:
            t = time.monotonic()
            definition.run(facts)
            times.append((time.monotonic() - t, definition.id))
    facts.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--outputs-dir", type=Path, default=None)
    args = parser.parse_args()
    begin()
    with sandbox() as state:
        os.environ["RUNBOOK_SANDBOX_DIR"] = str(state)  # for the command line's process and the in-process checks
        measure(args)


def measure(args: argparse.Namespace) -> None:
    outputs = args.outputs_dir or Path(tempfile.mkdtemp(prefix="runbook-bench-health-"))
    runs = []
    for i in range(args.repeat):
        seconds, code = command_line(outputs)
        runs.append(seconds)
        print(f"runbook health #{i + 1}: {seconds:6.2f} s (exit {code})")
    print(f"median: {statistics.median(runs):.2f} s (goal <= 10 s); the runs' records in {outputs}")
    record("health_check", [{"figure": "runbook health (command line)", "stats": stats(runs), "unit": "s",
                             "goal": "<= 10 s"}])
    print("in-process, slowest first:")
    for seconds, what in sorted(per_check(), reverse=True)[:8]:
        print(f"  {seconds:6.2f} s  {what}")


if __name__ == "__main__":
    main()
