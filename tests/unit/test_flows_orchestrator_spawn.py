"""The orchestrator's spawn threads (flows/src/orchestrator.py `_SpawnWorkers`), without a database: every
state spawned once, failures reported, `dispatch_concurrency` spawns in flight when spawns wait on the
network, a hung spawn reported at its timeout while the others go on. Waits are on conditions with deadlines."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time

import pytest

from runbook_lib.core.paths import project_root

DEADLINE = 30.0


@pytest.fixture(scope="module")
def orch():
    spec = importlib.util.spec_from_file_location("orchestrator_unit", project_root() / "flows" / "src" / "orchestrator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["orchestrator_unit"] = module
    spec.loader.exec_module(module)
    return module


def tasks(n: int) -> list[tuple[str, str, str, str]]:
    return [(f"state-{i}", f"item-{i}", "ws", "sender_fn") for i in range(n)]


def test_quick_spawns_each_state_once_and_failures_are_reported(orch):
    seen: list[str] = []
    lock = threading.Lock()

    def spawn(fn, item_id, workstream):
        with lock:
            seen.append(item_id)
        if item_id.endswith("7"):
            raise RuntimeError(f"HTTP 500 for {item_id}")
        return "fc-1"

    workers = orch._SpawnWorkers(spawn, 16, 5.0)
    try:
        for _ in range(3):  # the same threads serve chunk after chunk
            seen.clear()
            errors = workers.run(tasks(50))
            assert sorted(seen) == sorted(f"item-{i}" for i in range(50))
            assert errors == {f"state-{i}": f"HTTP 500 for item-{i}" for i in (7, 17, 27, 37, 47)}
        assert workers.run([]) == {}
    finally:
        workers.close()


def test_spawns_that_wait_get_dispatch_concurrency_threads(orch):
    """Spawns that do not return at once: the chunk's other threads join, up to the concurrency."""
    in_flight, peak = [0], [0]
    lock = threading.Lock()
    release = threading.Event()

    def spawn(fn, item_id, workstream):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        release.wait(DEADLINE)
        with lock:
            in_flight[0] -= 1
        return "fc"

    workers = orch._SpawnWorkers(spawn, 4, DEADLINE)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(errors=workers.run(tasks(10))))
    runner.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while peak[0] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert peak[0] == 4, f"only {peak[0]} spawn(s) in flight at once, expected 4"
    finally:
        release.set()
        runner.join(DEADLINE)
        workers.close()
    assert result["errors"] == {} and peak[0] == 4


def test_a_hung_spawn_is_reported_at_its_timeout_and_the_rest_of_the_chunk_goes_on(orch):
    hang = threading.Event()
    done: list[str] = []

    def spawn(fn, item_id, workstream):
        if item_id == "item-0":
            hang.wait(DEADLINE)  # never answers within the spawn timeout
        done.append(item_id)
        return "fc"

    workers = orch._SpawnWorkers(spawn, 2, 0.3)
    try:
        errors = workers.run(tasks(6))
        assert errors == {"state-0": "spawn data-enrichment-workers.sender_fn did not answer within the spawn "
                                     "timeout of 0.3s"}
        assert sorted(done) == [f"item-{i}" for i in range(1, 6)]
        after = [(f"next-{i}", f"next-item-{i}", "ws", "sender_fn") for i in range(3)]
        assert workers.run(after) == {}  # a new thread took the abandoned one's place
        assert sorted(done)[-3:] == [f"next-item-{i}" for i in range(3)]
    finally:
        hang.set()
        workers.close()
