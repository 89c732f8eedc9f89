"""What the benchmarks share: a sandbox to measure against, the sandbox's memory, statistics, and the
results file each benchmark writes for `bench/report.py` (the one table `make bench` prints).

A benchmark uses the sandbox named by RUNBOOK_SANDBOX_DIR (or .sandbox/) when it is up, else starts
one in a temporary directory and stops it at the end. Figures are whole-process wall times on this
machine: quote medians, and the machine's load and the host's speed with them (`machine()`): a
benchmark calls `begin()` first, which starts the host probe; `record()` stops it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from runbook_lib.core import processes
from runbook_lib.core.paths import project_root

ROOT = project_root()
RESULTS_DIR = Path(os.environ.get("RUNBOOK_BENCH_RESULTS", ROOT / "outputs" / "bench"))


def stats(values: list[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def fmt(s: dict | None, unit: str = "s", digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f} {unit}"
    return f"{s['median']:.{digits}f} {unit} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n={s['n']})"


_START: dict = {}  # begin()'s readings


class HostProbe:
    """bench/_host_probe.py in a process of its own for the length of a benchmark: its samples (ms of CPU
    time for a fixed loop, every 0.5 s) say how fast the host ran this guest meanwhile. Figures from two
    runs compare only beside it: a smaller probe is a faster host. The samples fall in two modes (the
    host's two speeds), so their mean, not their median, follows the mix of the two. It runs on the
    benchmark's interpreter, whose build moves it too (the record names it: `machine()['interpreter']`)."""

    SCRIPT = Path(__file__).resolve().with_name("_host_probe.py")

    def __init__(self) -> None:
        self._out = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, str(self.SCRIPT)], stdin=subprocess.PIPE, stdout=self._out,
                                      stderr=subprocess.DEVNULL)
        self.pid = self._proc.pid
        self.samples: list[float] | None = None

    def count(self) -> int:
        """How many samples it has written so far (read without moving the offset it writes at)."""
        fd = self._out.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).count(b"\n")

    def stop(self) -> list[float]:
        """Stop it (its stdin closed, killed after 5 s) and return its samples."""
        if self.samples is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._out.seek(0)
            self.samples = [float(line) for line in self._out.read().split()]
            self._out.close()
        return self.samples


def _cpu_ticks() -> tuple[float, float]:
    """(stolen, all) CPU seconds of the machine so far: stolen is time the hypervisor gave our virtual
    CPUs' turns to someone else; all is user ... steal (guest time is already inside user time)."""
    times = psutil.cpu_times()
    return times.steal, sum(times[:8])


def begin() -> HostProbe:
    """A benchmark's first call: the load and the CPU ticks at its start, and the host probe (returned),
    which samples until `record()`."""
    _START.update(load=os.getloadavg()[0], ticks=_cpu_ticks(), probe=HostProbe())
    return _START["probe"]


def machine() -> dict:
    """The machine, its load at the benchmark's start (`begin()`), and since then the host's speed (the
    probe's samples) and the share of CPU time the hypervisor stole."""
    samples = _START["probe"].stop() if "probe" in _START else []
    probe = {**stats(samples), "mean": statistics.fmean(samples)} if samples else None
    ticks, started = _cpu_ticks(), _START.get("ticks")
    steal = (round(100 * (ticks[0] - started[0]) / (ticks[1] - started[1]), 1)
             if started and ticks[1] > started[1] else None)
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_1m_at_start": None if "load" not in _START else round(_START["load"], 2),
        "host_probe_ms": None if not probe else {k: round(v, 2) for k, v in probe.items()},
        "steal_percent": steal,
        "python": platform.python_version(),
        # The interpreter the benchmark and its probe ran on (.venv's base): its build moves every CPU figure,
        # the probe's loop included (~1.18x as fast on Debian's /usr/bin/python3.11 as on pyenv's default build).
        "interpreter": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record(name: str, figures: list[dict], **extra) -> Path:
    """Write this benchmark's figures (rows: figure, value, goal, note) for bench/report.py."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"benchmark": name, "at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
            "load_1m_at_end": round(os.getloadavg()[0], 2), "figures": figures, **extra}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"  measured under: {conditions(data)}")
    return path


def conditions(data: dict) -> str:
    """A record's machine state in words: load at the start and end, the host probe, the steal."""
    m = data["machine"]
    probe, steal = m.get("host_probe_ms"), m.get("steal_percent")
    return (f"load {m.get('load_1m_at_start')} -> {data.get('load_1m_at_end')}, "
            + ("host probe n/a" if not probe else
               f"host probe {probe['mean']:.1f} ms mean ({probe['min']:.1f}-{probe['max']:.1f}, n={probe['n']})")
            + f", steal {'n/a' if steal is None else f'{steal:g}%'}")


# -- the sandbox ---------------------------------------------------------------------------------------


def runbook_cli(*args: str, env: dict | None = None, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python -m runbook_lib ...` as a user would; (wall seconds, completed process)."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runbook_lib", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)
    return time.monotonic() - began, proc


def sandbox_is_up(state_dir: Path) -> bool:
    from runbook_sandbox import manager

    if not (state_dir / "sandbox.json").exists():
        return False
    return all(row["healthy"] for row in manager.status(state_dir))


@contextmanager
def sandbox() -> Iterator[Path]:
    """The state directory of a running sandbox: the user's when up, else one of our own for the duration."""
    from runbook_sandbox.config import default_state_dir

    mine = Path(os.environ.get("RUNBOOK_SANDBOX_DIR") or default_state_dir())
    if sandbox_is_up(mine):
        yield mine
        return
    state = Path(tempfile.mkdtemp(prefix="runbook-bench-"))
    env = {"RUNBOOK_SANDBOX_DIR": str(state)}
    try:
        _, proc = runbook_cli("sandbox", "up", env=env)
        if proc.returncode != 0:
            raise SystemExit(f"sandbox up failed:\n{proc.stdout}\n{proc.stderr}")
        yield state
    finally:
        runbook_cli("sandbox", "down", "--purge", env=env)


def sandbox_env(state_dir: Path) -> dict[str, str]:
    """The environment a user's shell has after sourcing sandbox.env."""
    from dotenv import dotenv_values

    values = dotenv_values(state_dir / "sandbox.env")
    return {k: v for k, v in values.items() if v is not None}


def instance_id(state_dir: Path) -> str:
    from runbook_sandbox.config import SandboxConfig

    return SandboxConfig.load_or_create(state_dir).instance_id


def _kind(p: psutil.Process) -> str:
    """What a sandbox process is, for the memory breakdown: a Python module run with -m (the stand-ins,
    the Prefect server, the managed worker), a flow run (Prefect's engine or its workspace supervisor),
    a Postgres backend, Deno, or its executable's name."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "gone"
    if "-m" in cmd[:-1]:
        module = cmd[cmd.index("-m") + 1]
        return "flow run" if module.startswith("prefect") else module.rpartition(".")[2]
    name = os.path.basename(cmd[0]) if cmd else ""
    if name.startswith("postgres"):  # the postmaster, and its processes by their titles ("postgres: checkpointer")
        return "postgres"
    if any("prefect" in part and "engine" in part for part in cmd):
        return "flow run"
    return name or "?"


def sandbox_rss_by_kind(marker: str) -> dict[str, tuple[int, int]]:
    """Resident bytes and process count per kind of process (`_kind`) over the sandbox's processes:
    every process carrying the sandbox's marker, Postgres's backends, Deno and flow runs included.
    Shared pages count once per process, as `ps` shows them: an upper bound."""
    found: dict[int, psutil.Process] = {}
    for p in processes.processes_of(marker):
        found[p.pid] = p
        try:  # Postgres's backends overwrite their environment (their ps title): found as children
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    kinds: dict[str, tuple[int, int]] = {}
    for p in found.values():
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        kind = _kind(p)
        total, count = kinds.get(kind, (0, 0))
        kinds[kind] = (total + rss, count + 1)
    return kinds


def summed(kinds: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(resident bytes, processes) over every kind of `sandbox_rss_by_kind`."""
    return sum(total for total, _ in kinds.values()), sum(count for _, count in kinds.values())


class PeakRss:
    """Samples the sandbox's resident memory in a thread while a block runs; `.peak` in bytes, and
    `.at_peak`, what made it up (`sandbox_rss_by_kind` at that sample)."""

    def __init__(self, marker: str, interval: float = 0.5):
        self.marker, self.interval = marker, interval
        self.peak = 0
        self.at_peak: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kinds = sandbox_rss_by_kind(self.marker)
            rss, _ = summed(kinds)
            if rss > self.peak:
                self.peak, self.at_peak = rss, kinds
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def breakdown(kinds: dict[str, tuple[int, int]]) -> str:
    """`kinds` (from `sandbox_rss_by_kind`) in words, largest first: "prefect_server 212 MiB, postgres (9) 160 MiB"."""
    ordered = sorted(kinds.items(), key=lambda item: -item[1][0])
    return ", ".join(f"{kind}{f' ({count})' if count > 1 else ''} {total / 2**20:.0f} MiB"
                     for kind, (total, count) in ordered)


def mib(n: float) -> float:
    return n / 2**20
