"""The orchestrator flow (flows/src/orchestrator.py) against the sandbox: real Postgres, the real Modal
stand-in over HTTP, and the sandbox's Prefect through its Cloud-shaped gateway (API key, account and
workspace in the URL) for the flows and the Secret block, as the deployed flow reaches Prefect Cloud.
The flow runs made here have no deployment, so nothing that reads the deployment's runs sees them; a
test that needs the Secret block missing deletes the sandbox's and puts it back.

Every test works on its own client, workstream, registry rows and Modal function names, and scopes the
orchestrator to its own batches (`batch_id`), so no other row is touched; all of it is deleted after."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import logging
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from runbook_sandbox import git_seed, prefect_gateway

PROJECT_ROOT = Path(__file__).resolve().parents[3]
ORCHESTRATOR_PATH = PROJECT_ROOT / "flows" / "src" / "orchestrator.py"
BLOCK = "postgres-connection-string"


def load_module(name: str, source: str | None = None):
    """Import the flow module by path, as Prefect loads an entrypoint (or from derived source)."""
    if source is None:
        spec = importlib.util.spec_from_file_location(name, ORCHESTRATOR_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = type(sys)(name)
        module.__file__ = str(ORCHESTRATOR_PATH)
        sys.modules[name] = module
        exec(compile(source, str(ORCHESTRATOR_PATH), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def orch():
    return load_module("orchestrator")


@pytest.fixture(scope="module")
def prefect_api(settings):
    """This process's Prefect pointed at the sandbox's gateway for the module (the runbook's own
    `prefect_settings`; and, as Prefect's own test harness does, as the process-wide settings too, for
    threads whose context was copied before); the log and event workers drained at the end."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    from runbook_lib.systems.prefect import prefect_settings

    with prefect_settings(settings), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        yield

        async def drain() -> None:
            try:
                logs = APILogWorker.instance().drain()
                if inspect.isawaitable(logs):
                    await logs
            except RuntimeError:  # never started
                pass
            events = EventsWorker.drain_all()
            if inspect.isawaitable(events):
                await events

        run_coro_as_sync(drain())


@pytest.fixture
def dispatch_env(monkeypatch, sandbox_env):
    """The deployment env of the sandbox profile: dispatch to the Modal stand-in."""
    for key in ("ENRICHMENT_DISPATCH_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.setenv(key, sandbox_env[key])
    monkeypatch.delenv("ORCHESTRATOR_ALLOW_ENV_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return sandbox_env


@pytest.fixture
def modal(sandbox):
    from runbook_sandbox.faults import admin_headers

    with httpx.Client(base_url=sandbox.modal_url, headers=admin_headers(sandbox), timeout=10) as client:
        yield client


@pytest.fixture
def secret_block(prefect_api, sandbox):
    """The Secret block `postgres-connection-string` holding the sandbox DSN (the sandbox's own block,
    made sure of: a test before may have changed it)."""
    prefect_gateway.ensure_secret_blocks(sandbox)
    yield


@pytest.fixture
def no_secret_block(prefect_api, sandbox):
    """The sandbox's Secret block `postgres-connection-string` deleted for the test, put back after."""
    from prefect.blocks.system import Secret

    prefect_gateway.ensure_secret_blocks(sandbox)
    Secret.delete(BLOCK)
    try:
        yield
    finally:
        prefect_gateway.ensure_secret_blocks(sandbox)


class World:
    """A test's own rows: client, workstream with two registry steps, batches. Removed on exit."""

    def __init__(self, db, unique: str):
        self.db, self.unique = db, unique
        self.client_id = str(uuid.uuid4())
        self.workstream = f"orch-test-{unique}"
        self.step_a, self.step_b = f"step-a-{unique}", f"step-b-{unique}"
        self.sender_a, self.sender_b = f"send_step_a_{unique}", f"send_step_b_{unique}"
        self.registry_ids: list[str] = []
        self.batch_ids: list[str] = []
        db.execute("INSERT INTO public.clients (id, company_name) VALUES (%s, %s)", (self.client_id, f"orch {unique}"))
        for slug, sender in ((self.step_a, self.sender_a), (self.step_b, self.sender_b)):
            self.add_registry(slug, self.workstream, sender, "receive" + sender[4:])

    def add_registry(self, slug, workstream, sender, receiver=None) -> None:
        row = self.db.execute(
            "INSERT INTO public.enrichment_registry (slug, workstream_slug, name, type, modal_sender_fn, modal_receiver_fn)"
            " VALUES (%s, %s, %s, 'ASYNC', %s, %s) RETURNING id", (slug, workstream, slug, sender, receiver),
        ).fetchone()
        self.registry_ids.append(row[0])

    def batch(self, n_items: int, blueprint: list[str] | None = None, workstream: str | None = "default") -> str:
        """A launched batch: n items, one PENDING state each for the blueprint's first step."""
        blueprint = blueprint or [self.step_a, self.step_b]
        workstream = self.workstream if workstream == "default" else workstream
        batch_id = self.db.execute(
            "INSERT INTO public.batches (status, blueprint, client_id, workstream_slug)"
            " VALUES ('PENDING', %s, %s, %s) RETURNING id::text",
            (json.dumps(blueprint), self.client_id, workstream),
        ).fetchone()[0]
        self.batch_ids.append(batch_id)
        self.db.execute(
            """WITH items AS (
                   INSERT INTO public.batch_items (batch_id, company_name, company_domain)
                   SELECT %(b)s, 'Company ' || g, 'c' || g || '.example' FROM generate_series(1, %(n)s) g
                   RETURNING id)
               INSERT INTO public.workflow_states (batch_id, item_id, step_name, status)
               SELECT %(b)s, id, %(step)s, 'PENDING' FROM items""",
            {"b": batch_id, "n": n_items, "step": blueprint[0]},
        )
        return batch_id

    def states(self, batch_id: str, step: str | None = None) -> list[dict]:
        cur = self.db.execute(
            "SELECT id::text, item_id::text, step_name, status::text, meta, advanced_at"
            " FROM public.workflow_states WHERE batch_id = %s AND (%s::text IS NULL OR step_name = %s)"
            " ORDER BY item_id", (batch_id, step, step),
        )
        cols = [c.name for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def transitions(self, batch_id: str) -> dict[str, list[str]]:
        """state id -> its recorded statuses, in order (from the audit trigger)."""
        out: dict[str, list[str]] = {}
        for state_id, to_status in self.db.execute(
            "SELECT state_id::text, to_status::text FROM runbook.workflow_state_transitions"
            " WHERE batch_id = %s ORDER BY id", (batch_id,),
        ):
            out.setdefault(state_id, []).append(to_status)
        return out

    def wait_for(self, batch_id: str, step: str, status: str, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(batch_id, step)
            if states and all(s["status"] == status for s in states):
                return states
            if time.monotonic() > deadline:
                pytest.fail(f"states of {step} not all {status} within {timeout}s: "
                            f"{sorted({s['status'] for s in states})}")
            time.sleep(0.2)

    def cleanup(self, modal) -> None:
        """Wait (bounded) for the stand-in's work on our items to end, then delete our rows."""
        ours = {self.sender_a, self.sender_b, "receive" + self.sender_a[4:], "receive" + self.sender_b[4:]}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            c["function"] in ours and c["status"] in ("pending", "running") for c in modal.get("/_sandbox/calls").json()
        ):
            time.sleep(0.2)
        for batch_id in self.batch_ids:
            self.db.execute("DELETE FROM runbook.workflow_state_transitions WHERE batch_id = %s", (batch_id,))
        self.db.execute("DELETE FROM public.clients WHERE id = %s", (self.client_id,))
        self.db.execute("DELETE FROM public.enrichment_registry WHERE id = ANY(%s)", (self.registry_ids,))


@pytest.fixture
def world(db, unique, modal):
    w = World(db, unique)
    yield w
    modal.delete("/_sandbox/faults")
    w.cleanup(modal)


def spawn_calls(modal, function_name: str) -> list[dict]:
    return [c for c in modal.get("/_sandbox/calls").json() if c["function"] == function_name]


@contextmanager
def captured_run_logs():
    """Records of Prefect's flow-run loggers (the messages a run shows in the UI)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- the module itself -----------------------------------------------------------------------------------


def test_entrypoint_contract_and_imports(orch):
    """Production name and defaults (the Edge Function passes no parameters); top-level third-party
    imports are exactly the deployment's pip_packages (modal only lazily, for the real backend)."""
    main = orch.orchestrator_main
    assert main.name == "orchestrator_main"
    schema = main.parameters.model_dump()
    assert schema["properties"]["batch_size"]["default"] == 50
    assert not schema.get("required"), "every parameter must have a default"
    assert orch.advance_completed_items.name == "advance_completed_items"
    assert orch.dispatch_pending_items.name == "dispatch_pending_items"

    tree = ast.parse(ORCHESTRATOR_PATH.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module.split(".")[0])
    third_party = {m for m in top if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"psycopg2", "dotenv", "prefect"}
    spawner = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "modal_spawner")
    assert any(isinstance(n, ast.Import) and n.names[0].name == "modal" for n in ast.walk(spawner))


# -- dispatcher --------------------------------------------------------------------------------------------


def test_flow_drains_every_pending_item_not_only_batch_size(orch, world, dispatch_env, secret_block, modal):
    batch = world.batch(120)
    with captured_run_logs() as logs:
        result = orch.orchestrator_main(batch_size=50, batch_id=batch)
    dispatcher = result["dispatcher"]
    assert dispatcher["processed"] == dispatcher["queued"] == dispatcher["dispatched"] == 120
    assert dispatcher["failed"] == dispatcher["skipped"] == dispatcher["pending_remaining"] == 0

    states = world.states(batch)
    assert len(states) == 120 and not [s for s in states if s["status"] == "PENDING"]
    assert all(s["meta"]["dispatch_attempts"] == 1 and s["meta"]["claimed_by"].startswith("flow-run/") for s in states)
    for statuses in world.transitions(batch).values():
        assert statuses[:2] == ["PENDING", "QUEUED"] and statuses.count("QUEUED") == 1
    calls = spawn_calls(modal, world.sender_a)
    assert sorted(c["args"][0] for c in calls) == sorted(s["item_id"] for s in states)
    assert all(c["args"][1] == world.workstream for c in calls)
    messages = [r.getMessage() for r in logs]
    assert any(f"Prefect Secret block {BLOCK!r}" in m for m in messages)


def test_concurrent_claimers_never_dispatch_an_item_twice(orch, world, dispatch_env, sandbox, modal):
    import psycopg2

    batch = world.batch(400)
    http_spawn = orch.http_spawner(dispatch_env["ENRICHMENT_DISPATCH_URL"], dispatch_env["MODAL_TOKEN_ID"],
                                   dispatch_env["MODAL_TOKEN_SECRET"])

    def slow_spawn(fn, item_id, workstream):  # keeps every claimer busy long enough to overlap
        time.sleep(0.005)
        return http_spawn(fn, item_id, workstream)

    start = threading.Barrier(4)
    results, errors = {}, []

    def claimer(n: int) -> None:
        conn = psycopg2.connect(sandbox.database_url)
        conn.autocommit = True
        try:
            start.wait(timeout=30)
            results[n] = orch.drain_pending(conn, slow_spawn, batch_size=20, batch_id=batch,
                                            time_budget_seconds=120, claimed_by=f"claimer-{n}")
        except Exception as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not errors and len(results) == 4
    assert sum(r["dispatched"] for r in results.values()) == 400

    item_ids = [c["args"][0] for c in spawn_calls(modal, world.sender_a)]
    assert len(item_ids) == len(set(item_ids)) == 400, "an item was spawned twice"
    states = world.states(batch)
    assert all(s["status"] != "PENDING" and s["meta"]["dispatch_attempts"] == 1 for s in states)
    assert len({s["meta"]["claimed_by"] for s in states}) >= 2, "the claimers did not run concurrently"
    for statuses in world.transitions(batch).values():
        assert statuses.count("QUEUED") == 1


def test_failed_spawn_goes_back_to_pending_then_failed_after_max_attempts(orch, world, dispatch_env, sandbox, modal):
    import psycopg2

    batch = world.batch(3)
    assert modal.put(f"/_sandbox/faults/{world.sender_a}", json={"mode": "spawn_error"}).status_code == 200
    spawn = orch.spawner_from_env()
    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        for attempt in (1, 2):  # each run waits for the retry delay, tries once more, puts the items back
            counts = orch.drain_pending(conn, spawn, batch_id=batch, max_dispatch_attempts=3,
                                        retry_delay_seconds=0.3, time_budget_seconds=30)
            assert counts["dispatch_errors"] == counts["requeued"] == counts["pending_remaining"] == 3
            assert counts["dispatched"] == counts["failed"] == 0
            assert "3 back to PENDING after a failed dispatch" in orch.incomplete_reason(counts)
            for s in world.states(batch):
                assert s["status"] == "PENDING" and s["meta"]["dispatch_attempts"] == attempt
                assert "HTTP 500 injected spawn failure" in s["meta"]["last_dispatch_error"]
                assert "retry_after" in s["meta"] and "error" not in s["meta"]

        last = orch.drain_pending(conn, spawn, batch_id=batch, max_dispatch_attempts=3,
                                  retry_delay_seconds=0.3, time_budget_seconds=30)
        assert last["dispatch_errors"] == last["failed"] == 3 and last["requeued"] == 0
        assert "3 FAILED after the last dispatch attempt" in orch.incomplete_reason(last)
        for s in world.states(batch):
            assert s["status"] == "FAILED" and s["meta"]["dispatch_attempts"] == 3
            assert s["meta"]["error"].startswith("dispatch failed 3 time(s); last error:")
            assert "injected spawn failure" in s["meta"]["error"]
        for statuses in world.transitions(batch).values():
            assert statuses == ["PENDING", "QUEUED", "PENDING", "QUEUED", "PENDING", "QUEUED", "FAILED"]
        assert spawn_calls(modal, world.sender_a) == []  # the stand-in accepted none of them
        assert orch.drain_pending(conn, spawn, batch_id=batch)["processed"] == 0  # FAILED is final
    finally:
        conn.close()


def test_a_chunk_where_every_spawn_fails_stops_the_run(orch, world, dispatch_env, sandbox, modal):
    """Bad credentials or Modal down: one chunk pays an attempt, the other items are left untouched."""
    import psycopg2

    batch = world.batch(12)
    modal.put(f"/_sandbox/faults/{world.sender_a}", json={"mode": "spawn_error"})
    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        counts = orch.drain_pending(conn, orch.spawner_from_env(), batch_size=5, batch_id=batch,
                                    retry_delay_seconds=0)
    finally:
        conn.close()
    assert counts["processed"] == counts["dispatch_errors"] == counts["requeued"] == 5
    assert counts["pending_remaining"] == 12
    states = world.states(batch)
    assert all(s["status"] == "PENDING" for s in states)
    assert sorted((s["meta"] or {}).get("dispatch_attempts", 0) for s in states) == [0] * 7 + [1] * 5


def test_transient_spawn_failure_is_retried_in_the_same_run(orch, world, dispatch_env, sandbox, modal):
    import psycopg2

    batch = world.batch(6)
    flaky = {s["item_id"] for s in world.states(batch)[::2]}  # half the items: their first spawn fails
    http_spawn = orch.spawner_from_env()
    lock, refused = threading.Lock(), set()

    def flaky_spawn(fn, item_id, workstream):
        with lock:
            first_time = item_id in flaky and item_id not in refused
            refused.add(item_id)
        if first_time:
            raise RuntimeError("connection reset by peer")
        return http_spawn(fn, item_id, workstream)

    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        counts = orch.drain_pending(conn, flaky_spawn, batch_id=batch, retry_delay_seconds=0.3,
                                    time_budget_seconds=30)
    finally:
        conn.close()
    assert counts["dispatched"] == 6 and counts["dispatch_errors"] == 3
    assert counts["failed"] == counts["requeued"] == 0 and orch.incomplete_reason(counts) is None
    for s in world.states(batch):
        assert s["status"] != "PENDING"
        assert s["meta"]["dispatch_attempts"] == (2 if s["item_id"] in flaky else 1)
    assert len(spawn_calls(modal, world.sender_a)) == 6


def test_flow_run_with_failures_ends_failed_with_counts(orch, world, dispatch_env, secret_block, modal):
    batch = world.batch(3)
    modal.put(f"/_sandbox/faults/{world.sender_a}", json={"mode": "spawn_error"})
    state = orch.orchestrator_main(batch_size=50, batch_id=batch, retry_delay_seconds=0.2, return_state=True)
    assert state.is_failed()
    assert "3 back to PENDING after a failed dispatch" in state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, orch.OrchestratorIncomplete)
    assert error.counts["dispatcher"]["requeued"] == 3 and error.counts["sequencer"]["processed"] == 0
    assert all(s["status"] == "PENDING" for s in world.states(batch))


def test_unmapped_steps_go_failed_with_the_reason(orch, world, dispatch_env, sandbox, modal):
    import psycopg2

    orphan = f"orphan-step-{world.unique}"
    world.add_registry(orphan, None, f"send_orphan_{world.unique}")
    registry_miss = world.batch(2, blueprint=[f"no-such-step-{world.unique}"])
    null_workstream = world.batch(2, workstream=None)
    null_registry_workstream = world.batch(2, blueprint=[orphan])
    spawn = orch.spawner_from_env()
    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        expected = {
            registry_miss: f"no enrichment_registry row for step 'no-such-step-{world.unique}' in workstream "
                           f"'{world.workstream}'",
            null_workstream: f"batch {null_workstream} has no workstream_slug",
            null_registry_workstream: "(a row for this step has a NULL workstream_slug)",
        }
        for batch, reason in expected.items():
            counts = orch.drain_pending(conn, spawn, batch_id=batch)
            assert counts["skipped"] == 2 and counts["queued"] == counts["dispatched"] == 0
            assert "2 FAILED with no Modal sender mapped" in orch.incomplete_reason(counts)
            for s in world.states(batch):
                assert s["status"] == "FAILED"
                assert s["meta"]["error"].startswith("no Modal sender mapped") and reason in s["meta"]["error"]
            assert all(t == ["PENDING", "FAILED"] for t in world.transitions(batch).values())
    finally:
        conn.close()
    assert spawn_calls(modal, f"send_orphan_{world.unique}") == []


# -- sequencer ---------------------------------------------------------------------------------------------


def test_sequencer_advances_each_completed_step_once(orch, world, db, sandbox):
    import psycopg2

    batch = world.batch(4)
    a_states = world.states(batch, world.step_a)
    done = [s["id"] for s in a_states[:3]]
    db.execute("UPDATE public.workflow_states SET status = 'COMPLETED' WHERE id = ANY(%s::uuid[])", (done,))
    # The next step already exists for one item (e.g. a run that crashed before setting advanced_at).
    db.execute("INSERT INTO public.workflow_states (batch_id, item_id, step_name) VALUES (%s, %s, %s)",
               (batch, a_states[2]["item_id"], world.step_b))
    # A completed step that is not in the blueprint.
    stray_item = a_states[3]["item_id"]
    db.execute("INSERT INTO public.workflow_states (batch_id, item_id, step_name, status)"
               " VALUES (%s, %s, 'not-in-blueprint', 'COMPLETED')", (batch, stray_item))
    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        counts = orch.advance_completed(conn, batch_size=2, batch_id=batch)
        assert counts == {"processed": 4, "advanced": 2, "already_present": 1, "finished": 0, "not_in_blueprint": 1}
        b_states = world.states(batch, world.step_b)
        assert sorted(s["item_id"] for s in b_states) == sorted(s["item_id"] for s in a_states[:3])
        assert all(s["status"] == "PENDING" and s["advanced_at"] is None for s in b_states)
        assert all(s["advanced_at"] is not None for s in world.states(batch, world.step_a) if s["id"] in done)
        assert world.states(batch, world.step_a)[3]["advanced_at"] is None  # still PENDING: not touched

        assert orch.advance_completed(conn, batch_id=batch)["processed"] == 0  # advanced once only
        assert len(world.states(batch, world.step_b)) == 3

        db.execute("UPDATE public.workflow_states SET status = 'COMPLETED' WHERE batch_id = %s AND step_name = %s",
                   (batch, world.step_b))
        last = orch.advance_completed(conn, batch_id=batch)
        assert last["processed"] == last["finished"] == 3 and last["advanced"] == 0
        assert len(world.states(batch)) == 4 + 3 + 1
    finally:
        conn.close()


def test_two_step_pipeline_through_the_modal_standin(orch, world, dispatch_env, secret_block, modal):
    """Run 1 dispatches step A; the stand-in completes it; run 2 advances to step B and dispatches it."""
    batch = world.batch(3)
    first = orch.orchestrator_main(batch_id=batch)
    assert first["dispatcher"]["dispatched"] == 3
    world.wait_for(batch, world.step_a, "COMPLETED")
    second = orch.orchestrator_main(batch_id=batch)
    assert second["sequencer"]["advanced"] == 3 and second["dispatcher"]["dispatched"] == 3
    world.wait_for(batch, world.step_b, "COMPLETED")
    for statuses in world.transitions(batch).values():
        assert statuses == ["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"]
    results = world.db.execute(
        "SELECT workflow_slug, count(*) FROM public.enrichment_results r JOIN public.batch_items i"
        " ON i.id = r.batch_item_id WHERE i.batch_id = %s GROUP BY 1 ORDER BY 1", (batch,)).fetchall()
    assert results == [(world.step_a, 3), (world.step_b, 3)]


# -- the DSN source ----------------------------------------------------------------------------------------


def test_missing_secret_block_fails_naming_it_and_changes_nothing(orch, world, dispatch_env, no_secret_block,
                                                                 sandbox, monkeypatch):
    batch = world.batch(3)
    monkeypatch.setenv("DATABASE_URL", sandbox.database_url)  # present, but not allowed as a fallback
    state = orch.orchestrator_main(batch_id=batch, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RuntimeError)
    assert f"Prefect Secret block {BLOCK!r}" in str(error) and "ORCHESTRATOR_ALLOW_ENV_DSN=1" in str(error)
    assert sandbox.postgres.password not in str(error)
    assert all(s["status"] == "PENDING" and s["meta"] is None for s in world.states(batch))


def test_env_fallback_only_when_enabled_and_logged_without_the_value(orch, world, dispatch_env, no_secret_block,
                                                                   sandbox, monkeypatch):
    batch = world.batch(2)
    monkeypatch.setenv("DATABASE_URL", sandbox.database_url)
    monkeypatch.setenv("ORCHESTRATOR_ALLOW_ENV_DSN", "1")
    with captured_run_logs() as logs:
        result = orch.orchestrator_main(batch_id=batch)
    assert result["dispatcher"]["dispatched"] == 2
    messages = [r.getMessage() for r in logs]
    assert any("database DSN source: environment variable DATABASE_URL" in m for m in messages)
    assert not any(sandbox.postgres.password in m for m in messages)

    monkeypatch.setenv("ORCHESTRATOR_ALLOW_ENV_DSN", "yes")  # only "1" enables it
    with pytest.raises(RuntimeError, match=BLOCK):
        orch.get_database_url()


# -- bad input changes nothing ------------------------------------------------------------------------------


def test_bad_input_is_refused_before_any_claim(orch, world, dispatch_env, secret_block, monkeypatch):
    batch = world.batch(2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        orch.orchestrator_main(batch_size=0, batch_id=batch)
    with pytest.raises(ValueError, match="batch_id must be a batch's UUID"):
        orch.orchestrator_main(batch_id="batch-1")
    monkeypatch.delenv("MODAL_TOKEN_SECRET")
    state = orch.orchestrator_main(batch_id=batch, return_state=True)
    assert state.is_failed() and "MODAL_TOKEN_SECRET are not" in state.message
    assert all(s["status"] == "PENDING" and s["meta"] is None for s in world.states(batch))


def test_env_only_main_version_from_the_git_seeder_still_works(world, dispatch_env, sandbox, monkeypatch):
    """The seeder derives `main`'s orchestrator by swapping the DSN section; the rest must still run."""
    source = git_seed.env_only_version(ORCHESTRATOR_PATH.read_text())
    assert "Secret.load" not in source
    env_only = load_module("orchestrator_env_only", source)
    monkeypatch.setenv("DATABASE_URL", sandbox.database_url)
    batch = world.batch(2)
    conn = env_only.connect()
    try:
        counts = env_only.drain_pending(conn, env_only.spawner_from_env(), batch_id=batch)
    finally:
        conn.close()
    assert counts["dispatched"] == 2


# -- claims whose run died: the lease, and the spawn timeout -------------------------------------------


class Blackhole:
    """A Modal endpoint that accepts connections and never answers (a hung spawn: a network path that
    drops replies, a stuck load balancer). Counts the connections it holds."""

    def __init__(self):
        import socket

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def blackhole():
    hole = Blackhole()
    yield hole
    hole.close()


def wait_until(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def claim_age(db, batch_id: str) -> float:
    """Seconds (database clock) since the youngest QUEUED claim of the batch."""
    return db.execute("SELECT coalesce(extract(epoch FROM now() - max((meta ->> 'claimed_at')::timestamptz)), 0)"
                      " FROM public.workflow_states WHERE batch_id = %s AND status = 'QUEUED'",
                      (batch_id,)).fetchone()[0]


def test_a_flow_run_killed_between_claim_and_dispatch_is_requeued_and_dispatched_by_the_next_run(
        orch, world, dispatch_env, secret_block, sandbox, modal, blackhole, db):
    """A real flow run (its own process) claims the items, hangs in its spawn and is SIGKILLed. A run
    within the lease leaves the claims alone; the first run after the lease puts them back (reason in
    meta and in the audit) and dispatches them; none is left QUEUED."""
    import os
    import signal
    import subprocess

    batch = world.batch(5)
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('orchestrator', {str(ORCHESTRATOR_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['orchestrator'] = m; spec.loader.exec_module(m)\n"
        f"m.orchestrator_main(batch_id={batch!r}, spawn_timeout_seconds=120, claim_lease_seconds=600)\n"
    )
    env = dict(os.environ, **sandbox.prefect_client_settings(), ENRICHMENT_DISPATCH_URL=blackhole.url)
    doomed = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: all(s["status"] == "QUEUED" for s in world.states(batch)) and blackhole.held, 90,
                   "the doomed run to claim every item and hang in its spawn")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    states = world.states(batch)
    dead_run = states[0]["meta"]["claimed_by"]
    assert dead_run.startswith("flow-run/") and all(s["status"] == "QUEUED" for s in states)
    assert spawn_calls(modal, world.sender_a) == []

    # Within the lease: the claims stay with the run that made them, dead or not.
    within = orch.orchestrator_main(batch_id=batch, claim_lease_seconds=60, spawn_timeout_seconds=5)
    assert within["dispatcher"]["reclaimed"] == within["dispatcher"]["processed"] == 0
    assert all(s["status"] == "QUEUED" and s["meta"]["claimed_by"] == dead_run for s in world.states(batch))

    wait_until(lambda: claim_age(db, batch) > 3.5, 30, "the claims to be older than the lease")
    with captured_run_logs() as logs:
        after = orch.orchestrator_main(batch_id=batch, claim_lease_seconds=3, spawn_timeout_seconds=0.5)
    dispatcher = after["dispatcher"]
    assert dispatcher["reclaimed"] == dispatcher["processed"] == dispatcher["dispatched"] == 5
    assert dispatcher["failed"] == dispatcher["pending_remaining"] == 0
    assert any("Requeued 5 expired claim(s)" in r.getMessage() for r in logs)
    assert not [s for s in world.states(batch) if s["status"] in ("QUEUED", "PENDING")]
    assert sorted(c["args"][0] for c in spawn_calls(modal, world.sender_a)) == sorted(s["item_id"] for s in states)
    for s in world.wait_for(batch, world.step_a, "COMPLETED"):
        assert s["meta"]["dispatch_attempts"] == 2
        assert f"by {dead_run}, longer than the claim lease of 3 s" in s["meta"]["requeue_reason"]
    for statuses in world.transitions(batch).values():
        assert statuses == ["PENDING", "QUEUED", "PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"]
    reasons = db.execute("SELECT reason FROM runbook.workflow_state_transitions WHERE batch_id = %s"
                         " AND from_status = 'QUEUED' AND to_status = 'PENDING'", (batch,)).fetchall()
    assert len(reasons) == 5
    assert all(r[0].startswith("claim expired: still QUEUED after the claim lease of 3 s") for r in reasons)


def test_a_live_runs_claims_are_not_taken_and_its_hung_spawns_time_out(orch, world, dispatch_env, sandbox, modal,
                                                                      blackhole):
    """Run A hangs in its spawns (Modal does not answer): a run within the lease does not take its claims;
    A's spawn timeout puts them back to PENDING with the reason, and the next run dispatches them."""
    import psycopg2

    batch = world.batch(3)
    hanging = orch.http_spawner(blackhole.url, dispatch_env["MODAL_TOKEN_ID"], dispatch_env["MODAL_TOKEN_SECRET"], 60)
    outcome: dict = {}

    def live_run() -> None:
        conn = psycopg2.connect(sandbox.database_url)
        conn.autocommit = True
        started = time.monotonic()
        try:
            outcome["counts"] = orch.drain_pending(conn, hanging, batch_id=batch, claimed_by="live-run",
                                                   spawn_timeout_seconds=6, retry_delay_seconds=0,
                                                   time_budget_seconds=120)
        except Exception as exc:  # reported below
            outcome["error"] = exc
        finally:
            outcome["seconds"] = time.monotonic() - started
            conn.close()

    thread = threading.Thread(target=live_run)
    thread.start()
    conn = psycopg2.connect(sandbox.database_url)
    conn.autocommit = True
    try:
        wait_until(lambda: len(blackhole.held) >= 3, 30, "the live run's three spawns to hang")
        other = orch.drain_pending(conn, orch.spawner_from_env(), batch_id=batch, claimed_by="other-run",
                                   claim_lease_seconds=30, spawn_timeout_seconds=5)
        assert other["reclaimed"] == other["processed"] == 0
        assert all(s["status"] == "QUEUED" and s["meta"]["claimed_by"] == "live-run" for s in world.states(batch))

        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in outcome, outcome
        counts = outcome["counts"]
        assert counts["dispatch_errors"] == counts["requeued"] == 3 and counts["dispatched"] == 0
        assert outcome["seconds"] < 20, f"the hung spawns held the run {outcome['seconds']:.1f}s"
        for s in world.states(batch):
            assert s["status"] == "PENDING" and s["meta"]["claimed_by"] == "live-run"
            assert "did not answer within the spawn timeout of 6s" in s["meta"]["last_dispatch_error"]

        after = orch.drain_pending(conn, orch.spawner_from_env(), batch_id=batch, claimed_by="other-run",
                                   claim_lease_seconds=30, spawn_timeout_seconds=5)
        assert after["dispatched"] == 3 and after["reclaimed"] == 0
    finally:
        conn.close()
        thread.join(timeout=60)
    world.wait_for(batch, world.step_a, "COMPLETED")


def test_a_lease_shorter_than_one_chunks_dispatch_is_refused(orch, world, dispatch_env, secret_block):
    batch = world.batch(2)
    schema = orch.orchestrator_main.parameters.model_dump()["properties"]
    assert schema["claim_lease_seconds"]["default"] == orch.CLAIM_LEASE_SECONDS == 900
    assert schema["spawn_timeout_seconds"]["default"] == orch.SPAWN_TIMEOUT_SECONDS
    with pytest.raises(ValueError, match=r"claim_lease_seconds \(60\) must be longer than the longest dispatch of one "
                                         r"chunk \(60 s: spawn_timeout_seconds 15 x ceil\(batch_size 50"):
        orch.orchestrator_main(batch_id=batch, claim_lease_seconds=60)
    with pytest.raises(ValueError, match="spawn_timeout_seconds must be a finite number > 0"):
        orch.orchestrator_main(batch_id=batch, spawn_timeout_seconds=float("inf"))
    assert all(s["status"] == "PENDING" and s["meta"] is None for s in world.states(batch))
