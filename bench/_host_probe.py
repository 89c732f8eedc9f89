"""The host probe, run by bench/_common.py for the length of a benchmark: every INTERVAL seconds, the CPU
time of a fixed pure-Python loop, printed in milliseconds, one line each; it stops when its stdin closes
(the benchmark is done, or gone).

CPU time, not wall time: waiting for a core (our own load: the sandbox, the benchmark's processes) does not
count, so what moves it is how fast the host runs this guest's instructions: this machine is a virtual one
whose host runs the same loop at two speeds, ~1.6x apart, switching from second to second. The process
runs at low priority (nice 10): it takes ~2% of one core.
"""

from __future__ import annotations

import os
import select
import sys
import time

ITERATIONS = 200_000
INTERVAL = 0.5


def sample(iterations: int = ITERATIONS) -> float:
    """Milliseconds of this thread's CPU time for a fixed loop."""
    began = time.thread_time()
    total = 0
    for i in range(iterations):
        total += i
    return (time.thread_time() - began) * 1000


def main() -> None:
    os.nice(10)
    while True:
        print(f"{sample():.3f}", flush=True)
        ready, _, _ = select.select([sys.stdin], [], [], INTERVAL)
        if ready:  # end of file: the benchmark closed its end
            return


if __name__ == "__main__":
    main()
