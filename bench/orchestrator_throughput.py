"""Throughput of the orchestrator's dispatch path, PENDING -> dispatched, on the sandbox Postgres.

Three ways to move 10,000 PENDING workflow states to QUEUED and hand them to a dispatcher that does
nothing (so the figures measure the database path, not Modal):
  (a) this orchestrator: `drain_pending` (set-based SKIP LOCKED claims in chunks of batch_size,
      concurrent spawns, one statement per chunk recording the outcome);
  (b) the production pattern it replaces: fetch batch_size PENDING rows, then per item a new
      connection and one single-row UPDATE ... WHERE status = 'PENDING', commit, then dispatch
      (measured on a sample and extrapolated, it is too slow for 10,000);
  (c) the floor: one UPDATE of all 10,000 rows.
Goals (issue 14): (a) >= 100x (b) and (c)/(a) <= 2x at batch_size 50, robustly over repeated runs.

Usage: python bench/orchestrator_throughput.py [--items 10000] [--baseline-sample 400] [--runs 3]
Uses DATABASE_URL when set (touching only its own client's rows, deleted afterwards); otherwise starts
the sandbox's Postgres in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg2

from runbook_lib.core.paths import project_root
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, fmt, record, stats  # noqa: E402
from runbook_sandbox import manager
from runbook_sandbox.config import SandboxConfig

PROJECT_ROOT = project_root()

WORKSTREAM, STEP = "company-enrichment", "company-firmographics"  # a seeded registry row


def load_orchestrator():
    spec = importlib.util.spec_from_file_location("orchestrator", PROJECT_ROOT / "flows" / "src" / "orchestrator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["orchestrator"] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def database():
    """DATABASE_URL, or a sandbox Postgres of our own for the duration of the benchmark."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as state_dir:
        try:
            manager.up(Path(state_dir), only=["postgres"], echo=lambda s: None)
            yield SandboxConfig.load_or_create(Path(state_dir)).database_url
        finally:
            manager.down(Path(state_dir), echo=lambda s: None)


def connect(dsn: str):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


class Fixture:
    """One client of our own; each scenario gets a fresh batch of n PENDING states."""

    def __init__(self, conn):
        self.conn, self.client_id = conn, str(uuid.uuid4())
        with conn.cursor() as cur:
            cur.execute("INSERT INTO public.clients (id, company_name) VALUES (%s, 'orchestrator benchmark')",
                        (self.client_id,))

    def batch(self, n: int) -> str:
        with self.conn.cursor() as cur:
            cur.execute("INSERT INTO public.batches (status, blueprint, client_id, workstream_slug)"
                        " VALUES ('PENDING', %s, %s, %s) RETURNING id::text",
                        (json.dumps([STEP]), self.client_id, WORKSTREAM))
            batch_id = cur.fetchone()[0]
            cur.execute(
                """WITH items AS (
                       INSERT INTO public.batch_items (batch_id, company_name)
                       SELECT %(b)s, 'Company ' || g FROM generate_series(1, %(n)s) g RETURNING id)
                   INSERT INTO public.workflow_states (batch_id, item_id, step_name, status)
                   SELECT %(b)s, id, %(step)s, 'PENDING' FROM items""",
                {"b": batch_id, "n": n, "step": STEP},
            )
            cur.execute("ANALYZE public.workflow_states")
        return batch_id

    def drop(self, batch_id: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute("DELETE FROM runbook.workflow_state_transitions WHERE batch_id = %s", (batch_id,))
            cur.execute("DELETE FROM public.batches WHERE id = %s", (batch_id,))

    def pending(self, batch_id: str) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM public.workflow_states WHERE batch_id = %s AND status = 'PENDING'",
                        (batch_id,))
            return cur.fetchone()[0]

    def cleanup(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("DELETE FROM runbook.workflow_state_transitions WHERE batch_id IN "
                        "(SELECT id FROM public.batches WHERE client_id = %s)", (self.client_id,))
            cur.execute("DELETE FROM public.clients WHERE id = %s", (self.client_id,))


def noop_spawn(function_name, item_id, workstream_slug):
    return "noop"


def run_orchestrator(orch, dsn: str, fx: Fixture, n: int, batch_size: int) -> float:
    batch_id = fx.batch(n)
    with closing(connect(dsn)) as conn:
        started = time.perf_counter()
        counts = orch.drain_pending(conn, noop_spawn, batch_size=batch_size, batch_id=batch_id,
                                    time_budget_seconds=600)
        elapsed = time.perf_counter() - started
    assert counts["dispatched"] == n and fx.pending(batch_id) == 0, counts
    fx.drop(batch_id)
    return n / elapsed


def run_baseline(dsn: str, fx: Fixture, n: int, sample: int, batch_size: int = 50) -> float:
    """The production dispatcher's pattern, on the first `sample` items of a batch of n."""
    batch_id = fx.batch(n)
    done = 0
    started = time.perf_counter()
    while done < sample:
        with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:  # fetch_pending_items
            cur.execute(
                """SELECT ws.id, ws.item_id, ws.step_name, er.modal_sender_fn
                   FROM public.workflow_states ws
                   LEFT JOIN public.enrichment_registry er ON ws.step_name = er.slug
                   WHERE ws.status = 'PENDING' AND ws.batch_id = %s
                   ORDER BY ws.updated_at LIMIT %s""",
                (batch_id, min(batch_size, sample - done)),
            )
            rows = cur.fetchall()
        for state_id, item_id, _step, sender in rows:
            with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:  # update_state_to_queued
                cur.execute("UPDATE public.workflow_states SET status = 'QUEUED', updated_at = now()"
                            " WHERE id = %s AND status = 'PENDING'", (state_id,))
                conn.commit()
            noop_spawn(sender, item_id, WORKSTREAM)
            done += 1
    elapsed = time.perf_counter() - started
    assert fx.pending(batch_id) == n - sample
    fx.drop(batch_id)
    return sample / elapsed


def run_floor(dsn: str, fx: Fixture, n: int) -> float:
    batch_id = fx.batch(n)
    with closing(connect(dsn)) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        cur.execute("UPDATE public.workflow_states SET status = 'QUEUED', updated_at = now()"
                    " WHERE batch_id = %s AND status = 'PENDING'", (batch_id,))
        elapsed = time.perf_counter() - started
        assert cur.rowcount == n
    fx.drop(batch_id)
    return n / elapsed


def measure(orch, dsn: str, fx: Fixture, args) -> tuple[float, float, dict[int, float]]:
    """One measurement: (floor, baseline, orchestrator rate per batch size), items/s. The floor and the
    orchestrator are measured in turn (floor, each batch size, floor, ...), so that a change of the
    machine's load during the measurement weighs on both sides of (c)/(a) alike."""
    baseline = run_baseline(dsn, fx, args.items, args.baseline_sample)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    floors, ours = [], {size: [] for size in sizes}
    for _ in range(args.repeats):
        floors.append(run_floor(dsn, fx, args.items))
        for size in sizes:
            ours[size].append(run_orchestrator(orch, dsn, fx, args.items, size))
    return max(floors), baseline, {size: max(rates) for size, rates in ours.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--baseline-sample", type=int, default=400)
    parser.add_argument("--batch-sizes", default="50,500", help="chunk sizes to measure (a) with")
    parser.add_argument("--repeats", type=int, default=3, help="(a) and (c): best of this many runs")
    parser.add_argument("--runs", type=int, default=3, help="whole measurements, reported as min/median/max")
    args = parser.parse_args()
    begin()
    orch = load_orchestrator()
    runs = []
    with database() as dsn:
        fx = Fixture(connect(dsn))
        try:
            run_floor(dsn, fx, 1000)  # warm-up: caches, plans, the audit trigger
            runs = [measure(orch, dsn, fx, args) for _ in range(args.runs)]
        finally:
            fx.cleanup()
            fx.conn.close()
    print(f"Orchestrator dispatch throughput, {args.items:,} PENDING items, no-op dispatcher, {args.runs} runs "
          f"(each: best of {args.repeats} for (a) and (c), measured in turn); min / median / max; scoped to the "
          "benchmark's own batch")
    floors, baselines = stats([r[0] for r in runs]), stats([r[1] for r in runs])
    print(f"  (b) baseline, production pattern  {fmt(baselines, 'items/s', 0)}  "
          f"(measured on {args.baseline_sample} items, extrapolated)")
    print(f"  (c) floor, one set-based UPDATE   {fmt(floors, 'items/s', 0)}")
    figures = []
    for size in runs[0][2]:
        rate = stats([r[2][size] for r in runs])
        over_b = stats([r[2][size] / r[1] for r in runs])  # pair by pair, within one run
        c_over_a = stats([r[0] / r[2][size] for r in runs])
        print(f"  (a) orchestrator, batch_size={size:<5} {fmt(rate, 'items/s', 0)}")
        print(f"      (a)/(b) = {fmt(over_b, 'x', 1)} (goal >= 100x)   (c)/(a) = {fmt(c_over_a, 'x', 2)} (goal <= 2x)")
        figures += [
            {"figure": f"orchestrator (a)/(b), batch {size}", "stats": over_b, "unit": "x", "goal": ">= 100x"},
            {"figure": f"orchestrator (c)/(a), batch {size}", "stats": c_over_a, "unit": "x", "goal": "<= 2x"},
        ]
    record("orchestrator_throughput", figures, items=args.items)


if __name__ == "__main__":
    main()
