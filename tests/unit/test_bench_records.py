"""The benchmarks' records and their one table (bench/_common.py, bench/report.py): every record carries
the machine's load at its start and end and, while it ran, the host probe's samples (the CPU time of a
fixed Python loop every 0.5 s, in a process of its own) and the share of CPU time the hypervisor stole:
this machine's host runs the same code faster at some times than at others, and figures from two runs
compare only beside it. A benchmark here is a small script run as `make bench` runs one, writing into a
results directory of the test's own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENCH = PROJECT_ROOT / "bench"

BENCHMARK = """
import os
import sys
import time
sys.path.insert(0, {bench!r})
from _common import begin, record, stats

probe = begin()
print(probe.pid, flush=True)
if {die!r}:
    os._exit(3)  # gone before its record, as a benchmark that crashes or is killed
deadline = time.monotonic() + 60  # the benchmark's own work: as long as three of the probe's samples take
while probe.count() < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
record("tiny", [{{"figure": "tiny figure", "stats": stats([1.0, 2.0, 3.0]), "unit": "s", "goal": "<= 5 s"}}])
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run(args: list[str], results: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RUNBOOK_BENCH_RESULTS": str(results)}, cwd=PROJECT_ROOT)


def test_a_record_carries_the_host_probe_sampled_while_it_ran_and_the_table_prints_it(tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(BENCHMARK.format(bench=str(BENCH), die=False))
    results = tmp_path / "results"
    done = run([str(script)], results)
    assert done.returncode == 0, done.stderr
    assert not running(int(done.stdout.split()[0])), "the probe outlived its benchmark"

    machine = json.loads((results / "tiny.json").read_text())["machine"]
    probe = machine["host_probe_ms"]
    assert probe["n"] >= 3, machine  # sampled the whole time, not once
    assert 0 < probe["min"] <= probe["median"] <= probe["max"] < 10_000, machine
    assert probe["min"] <= probe["mean"] <= probe["max"], machine
    assert isinstance(machine["load_1m_at_start"], float), machine
    # /proc/stat's ticks moved between begin() and record(): a share of them, not a missing figure
    assert isinstance(machine["steal_percent"], float) and 0 <= machine["steal_percent"] <= 100, machine
    # the interpreter the loop ran on, .venv's base (its build moves the probe as the host does)
    assert machine["interpreter"] == os.path.realpath(sys._base_executable) and os.access(machine["interpreter"], os.X_OK)

    table = run([str(BENCH / "report.py")], results)
    assert table.returncode == 0, table.stderr
    assert re.search(r"tiny figure\s+2\.0\s+1\.0\s+3\.0\s+s\s+3\s+<= 5 s", table.stdout), table.stdout
    line = next(l for l in table.stdout.splitlines() if l.strip().startswith("tiny:"))
    assert (f"host probe {probe['mean']:.1f} ms mean ({probe['min']:.1f}-{probe['max']:.1f}, n={probe['n']}), "
            f"steal {machine['steal_percent']:g}%") in line, line
    assert f"Python {machine['python']} ({machine['interpreter']})," in line, line
    assert "smaller is a faster host" in table.stdout


def test_the_probe_stops_when_its_benchmark_dies_before_recording(tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text(BENCHMARK.format(bench=str(BENCH), die=True))
    done = run([str(script)], tmp_path / "results")
    assert done.returncode == 3, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30  # it notices its stdin closed within its 0.5 s interval
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), "the probe outlived its benchmark"
    assert not (tmp_path / "results" / "tiny.json").exists()


def test_a_record_from_before_the_probe_prints_as_not_measured(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "old.json").write_text(json.dumps({
        "benchmark": "old", "at": "2026-12-01 15:56:00 +0000", "load_1m_at_end": 0.5,
        "machine": {"host": "vm", "cpus": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "load_1m_at_start": 0.4,
                    "python": "3.11.7"},
        "figures": [{"figure": "old figure", "stats": {"min": 1, "median": 1, "max": 1, "n": 1}, "unit": "s"}],
    }))
    table = run([str(BENCH / "report.py")], results)
    assert table.returncode == 0, table.stderr
    line = next(l for l in table.stdout.splitlines() if l.strip().startswith("old:"))
    assert "Python 3.11.7, load 0.4 -> 0.5, host probe n/a, steal n/a" in line, line  # no interpreter recorded


def test_the_sandbox_memory_is_broken_down_by_kind_of_process() -> None:
    """`sandbox_rss_by_kind`: the marked processes by kind (a `python -m` module by its last name, others
    by their executable), their resident bytes and count; `breakdown` says it largest first. Unmarked
    processes are not counted."""
    sys.path.insert(0, str(BENCH))
    from _common import breakdown, sandbox_rss_by_kind

    from runbook_lib.core.processes import INSTANCE_ENV

    marker = f"bench-test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, INSTANCE_ENV: marker}
    started = [subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen(["sleep", "60"], env=env),
               subprocess.Popen(["sleep", "60"], env=env),
               subprocess.Popen(["sleep", "60"])]  # not the sandbox's
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kinds = sandbox_rss_by_kind(marker)
            if {k: c for k, (_, c) in kinds.items()} == {"server": 1, "sleep": 2}:
                break
            time.sleep(0.05)
        assert {k: c for k, (_, c) in kinds.items()} == {"server": 1, "sleep": 2}
        assert all(total > 0 for total, _ in kinds.values())
        said = breakdown(kinds)
        assert re.fullmatch(r"server \d+ MiB, sleep \(2\) \d+ MiB", said), said  # the interpreter is the larger
    finally:
        for p in started:
            p.kill()
            p.wait()
