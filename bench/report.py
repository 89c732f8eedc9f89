"""The one table of `make bench`: every figure the benchmarks recorded (outputs/bench/*.json), with its
median, min, max and goal, and the machine and load they were measured under. `--markdown` prints the
same as a Markdown table (the README's performance section). Figures from two runs compare only beside
the host probe each benchmark records while it runs (bench/_host_probe.py: the CPU time of a fixed Python
loop every 0.5 s; smaller is a faster host).

Usage: python bench/report.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, conditions  # noqa: E402

ORDER = ["sandbox_lifecycle", "runbook", "e2e_latency", "deploy_overhead", "orchestrator_throughput"]


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    digits = 0 if unit in ("MiB", "items/s") else 2 if unit == "x" else 1
    return f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    found = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))}
    if not found:
        raise SystemExit(f"no benchmark results in {RESULTS_DIR}")
    rows, machines = [], []
    for name in [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]:
        data = found[name]
        m = data["machine"]
        python = f"Python {m.get('python')}" + (f" ({m['interpreter']})" if m.get("interpreter") else "")
        machines.append(f"{name}: {data['at']}, {m['cpus']} x {m['cpu']}, {m['memory_gib']} GiB, {python}, "
                        f"{conditions(data)}")
        for fig in data["figures"]:
            s, unit = fig["stats"], fig.get("unit", "")
            rows.append([name, fig["figure"], cell(s.get("median"), unit), cell(s.get("min"), unit),
                         cell(s.get("max"), unit), unit, str(s.get("n", "")), fig.get("goal") or "",
                         fig.get("note") or ""])
    header = ["benchmark", "figure", "median", "min", "max", "unit", "n", "goal", "note"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, ["-" * w for w in widths], *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    print("Measured on (the interpreter; the 1-minute load average at the start and end of each benchmark; while it")
    print("ran, the host probe, the CPU time of a fixed Python loop on that interpreter, mean (min-max),")
    print("smaller is a faster host, and the share of CPU time the hypervisor stole):")
    for line in machines:
        print(f"  {line}")


if __name__ == "__main__":
    main()
