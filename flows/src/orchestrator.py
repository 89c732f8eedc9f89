"""Data-enrichment orchestrator: advance completed steps, then drain PENDING work to Modal.

Deployment `data-enrichment-orchestrator`, entrypoint `src/orchestrator.py:orchestrator_main`,
started by the Supabase Edge Function with no parameters. Two phases, each a subflow:

1. `advance_completed_items` (sequencer): every COMPLETED state not yet advanced gets the next step
   of its batch's blueprint inserted as PENDING (ON CONFLICT DO NOTHING) and `advanced_at` set.
2. `dispatch_pending_items` (dispatcher): claims PENDING states in chunks of `batch_size` with one
   `FOR UPDATE SKIP LOCKED` statement (concurrent runs never claim the same state), spawns the Modal
   sender of each, and keeps going until nothing is PENDING or the time / item budget is spent.

Nothing is stranded: each dispatcher run first puts back to PENDING every claim (QUEUED) older
than the claim lease (`claim_lease_seconds`, default CLAIM_LEASE_SECONDS) that no sender took: its
run died between claim and dispatch (killed, cancelled, crashed, a spawn that hung). The reason goes
into `meta.requeue_reason` and into the audit (`runbook.workflow_state_transitions.reason`, through
the `runbook.transition_reason` setting its trigger reads). Every spawn is bounded by
`spawn_timeout_seconds`; a spawn that does not answer in time counts as a failed spawn. The lease
must be longer than a run's dispatch of one chunk, so a live run's claims are never taken.
A failed spawn puts the state back to PENDING (`meta.dispatch_attempts`,
`meta.last_dispatch_error`, `meta.retry_after`; retried in the same run once due) and, after
`max_dispatch_attempts`, to FAILED (`meta.error`); a step with no Modal sender mapped goes to FAILED
with the reason in `meta.error`. When every spawn of a chunk fails (bad credentials, Modal down) the
run stops rather than spend every item's attempts.
A run that failed or skipped any item, or left any PENDING, ends FAILED (`OrchestratorIncomplete`,
whose message carries the counts); otherwise it returns the counts.

Dispatch goes to the real Modal app, or to the HTTP endpoint in ENRICHMENT_DISPATCH_URL (the
sandbox's Modal stand-in: same call, same credentials MODAL_TOKEN_ID / MODAL_TOKEN_SECRET).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from contextlib import closing
from typing import Callable, Optional

import psycopg2
from dotenv import load_dotenv
from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

MODAL_APP = "data-enrichment-workers"
DISPATCH_URL_ENV = "ENRICHMENT_DISPATCH_URL"
SPAWN_TIMEOUT_SECONDS = 15.0  # default bound of one spawn (Modal or its HTTP stand-in), whole call
# A QUEUED claim older than this that no sender took is put back to PENDING by the next run. The one
# place the default lives: the runbook reads it from here (runbook_lib.source.lease) for its health
# check. Longer than a run's whole time budget (600 s), let alone one chunk's dispatch.
CLAIM_LEASE_SECONDS = 900.0
TRANSITION_REASON_SETTING = "runbook.transition_reason"  # read by the audit trigger (reason column)
LOCKED_PATIENCE_SECONDS = 5.0  # how long to wait for PENDING rows held by another transaction
# A chunk starts on one spawn thread; the others join when it is not done within this (spawns that wait on
# the network): quick spawns cost one thread hand-off per chunk, slow ones get `dispatch_concurrency`.
SPAWN_RAMP_SECONDS = 0.005

# spawn(function_name, item_id, workstream_slug) -> function call id; raises on failure.
Spawn = Callable[[str, str, Optional[str]], str]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a flow run, a plain logger elsewhere (tests, benchmark)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("orchestrator")


# --- runbook:dsn-source begin ---
from prefect.blocks.system import Secret

DSN_SECRET_BLOCK = "postgres-connection-string"
DSN_ENV = "DATABASE_URL"
ALLOW_ENV_DSN = "ORCHESTRATOR_ALLOW_ENV_DSN"


def get_database_url() -> str:
    """The database DSN from the Prefect Secret block `postgres-connection-string`.

    Only when ORCHESTRATOR_ALLOW_ENV_DSN=1 and the block cannot be read is DATABASE_URL used
    instead. The log names the source, never the value.
    """
    try:
        value = Secret.load(DSN_SECRET_BLOCK, _sync=True).get()
        problem = None if value else "the block is empty"
    except Exception as exc:  # missing block, API unreachable, wrong block type: all mean "no DSN"
        value, problem = None, f"{type(exc).__name__}: {exc}"
    if value:
        _logger().info("Database DSN source: Prefect Secret block %r", DSN_SECRET_BLOCK)
        return value
    if os.environ.get(ALLOW_ENV_DSN) == "1" and os.environ.get(DSN_ENV):
        _logger().warning(
            "Prefect Secret block %r unavailable (%s); database DSN source: environment variable %s "
            "(allowed by %s=1)", DSN_SECRET_BLOCK, problem, DSN_ENV, ALLOW_ENV_DSN,
        )
        return os.environ[DSN_ENV]
    raise RuntimeError(
        f"Cannot read the database DSN from the Prefect Secret block {DSN_SECRET_BLOCK!r} ({problem}). "
        f"Create the block, or set {ALLOW_ENV_DSN}=1 and {DSN_ENV} to use the environment instead."
    )
# --- runbook:dsn-source end ---


def connect() -> psycopg2.extensions.connection:
    """One autocommit connection for a whole phase: every statement below is its own transaction."""
    conn = psycopg2.connect(get_database_url(), connect_timeout=10, application_name="orchestrator_main")
    conn.autocommit = True
    return conn


class OrchestratorIncomplete(RuntimeError):
    """The run left work behind (failed, skipped or still PENDING items); `counts` says how much."""

    def __init__(self, message: str, counts: dict):
        super().__init__(message, counts)
        self.message, self.counts = message, counts

    def __str__(self) -> str:
        return self.message


# -- SQL ---------------------------------------------------------------------------------------------
# Scope: every statement takes %(batch_id)s (NULL = all batches, which is what production runs).

# Sequencer: one statement advances up to %(limit)s COMPLETED states. Blueprint positions are 1-based
# (WITH ORDINALITY) and `json ->> int` is 0-based, so `blueprint ->> position` is the next step.
ADVANCE_SQL = """
WITH done AS (
    SELECT ws.id, ws.batch_id, ws.item_id, ws.step_name, b.blueprint
    FROM public.workflow_states ws
    JOIN public.batches b ON b.id = ws.batch_id
    WHERE ws.status = 'COMPLETED' AND ws.advanced_at IS NULL
      AND (%(batch_id)s::uuid IS NULL OR ws.batch_id = %(batch_id)s::uuid)
    ORDER BY ws.updated_at
    LIMIT %(limit)s
    FOR UPDATE OF ws SKIP LOCKED
), placed AS (
    SELECT d.*, pos.ord::int AS position, d.blueprint ->> pos.ord::int AS next_step
    FROM done d
    LEFT JOIN LATERAL (
        SELECT e.ord
        FROM json_array_elements_text(
            CASE WHEN json_typeof(d.blueprint) = 'array' THEN d.blueprint ELSE '[]'::json END
        ) WITH ORDINALITY AS e(slug, ord)
        WHERE e.slug = d.step_name
        ORDER BY e.ord
        LIMIT 1
    ) pos ON true
), inserted AS (
    INSERT INTO public.workflow_states (batch_id, item_id, step_name, status, updated_at)
    SELECT batch_id, item_id, next_step, 'PENDING', now() FROM placed WHERE next_step IS NOT NULL
    ON CONFLICT (batch_id, item_id, step_name) DO NOTHING
    RETURNING item_id, step_name
), marked AS (
    UPDATE public.workflow_states ws SET advanced_at = now() FROM done WHERE ws.id = done.id
)
SELECT p.id, p.step_name, p.position, p.next_step, i.item_id IS NOT NULL AS created
FROM placed p LEFT JOIN inserted i ON i.item_id = p.item_id AND i.step_name = p.next_step
"""

# Dispatcher claim: one statement locks up to %(limit)s PENDING states (oldest first, skipping rows
# another run holds) and sets them QUEUED, or FAILED with the reason when no sender is mapped. The
# update finds each locked row by its ctid (a TID scan; no second primary-key lookup per row): the
# lock keeps the row version in place until the statement ends, and `status = 'PENDING'` still guards.
CLAIM_SQL = """
WITH picked AS (
    SELECT ws.id, ws.ctid AS row_ctid, b.workstream_slug, er.modal_sender_fn AS sender,
        CASE
            WHEN er.modal_sender_fn IS NOT NULL THEN NULL
            WHEN b.workstream_slug IS NULL THEN format(
                'no Modal sender mapped: batch %%s has no workstream_slug, so step %%L matches no '
                'enrichment_registry row', b.id, ws.step_name)
            WHEN er.id IS NULL THEN format(
                'no Modal sender mapped: no enrichment_registry row for step %%L in workstream %%L',
                ws.step_name, b.workstream_slug)
                || CASE WHEN EXISTS (SELECT 1 FROM public.enrichment_registry r
                                     WHERE r.slug = ws.step_name AND r.workstream_slug IS NULL)
                        THEN ' (a row for this step has a NULL workstream_slug)' ELSE '' END
            ELSE format(
                'no Modal sender mapped: the enrichment_registry row for step %%L in workstream %%L '
                'has no modal_sender_fn', ws.step_name, b.workstream_slug)
        END AS unmapped
    FROM public.workflow_states ws
    JOIN public.batches b ON b.id = ws.batch_id
    LEFT JOIN public.enrichment_registry er
        ON er.slug = ws.step_name AND er.workstream_slug = b.workstream_slug
    WHERE ws.status = 'PENDING'
      AND (%(batch_id)s::uuid IS NULL OR ws.batch_id = %(batch_id)s::uuid)
      AND (ws.meta ->> 'retry_after' IS NULL OR (ws.meta ->> 'retry_after')::timestamptz <= now())
    ORDER BY ws.updated_at
    LIMIT %(limit)s
    FOR UPDATE OF ws SKIP LOCKED
)
UPDATE public.workflow_states ws SET
    status = (CASE WHEN p.unmapped IS NULL THEN 'QUEUED' ELSE 'FAILED' END)::workflowstatus,
    updated_at = now(),
    meta = CASE WHEN p.unmapped IS NULL
        THEN (coalesce(ws.meta, '{}'::jsonb) - 'retry_after') || jsonb_build_object(
            'dispatch_attempts', coalesce((ws.meta ->> 'dispatch_attempts')::int, 0) + 1,
            'claimed_at', now(), 'claimed_by', %(claimed_by)s::text)
        ELSE coalesce(ws.meta, '{}'::jsonb) || jsonb_build_object('error', p.unmapped, 'failed_at', now())
    END
FROM picked p
WHERE ws.ctid = p.row_ctid AND ws.status = 'PENDING'
RETURNING ws.id, ws.item_id, ws.step_name, p.workstream_slug, p.sender, p.unmapped
"""

# A failed spawn: back to PENDING (retry after a delay) or, after the last attempt, FAILED.
RECORD_SPAWN_FAILED_SQL = """
UPDATE public.workflow_states ws SET
    status = (CASE WHEN coalesce((ws.meta ->> 'dispatch_attempts')::int, 0) >= %(max_attempts)s
                   THEN 'FAILED' ELSE 'PENDING' END)::workflowstatus,
    updated_at = now(),
    meta = CASE WHEN coalesce((ws.meta ->> 'dispatch_attempts')::int, 0) >= %(max_attempts)s
        THEN coalesce(ws.meta, '{}'::jsonb) || jsonb_build_object(
            'last_dispatch_error', v.error, 'failed_at', now(),
            'error', format('dispatch failed %%s time(s); last error: %%s', ws.meta ->> 'dispatch_attempts', v.error))
        ELSE coalesce(ws.meta, '{}'::jsonb) || jsonb_build_object(
            'last_dispatch_error', v.error,
            'retry_after', now() + make_interval(secs => %(retry_delay)s))
    END
FROM unnest(%(ids)s::uuid[], %(errors)s::text[]) AS v(id, error)
WHERE ws.id = v.id AND ws.status = 'QUEUED'
RETURNING ws.id, ws.status::text
"""

# What is still PENDING in scope: how many are claimable now, and seconds until the next retry.
PENDING_PROBE_SQL = """
SELECT count(*) FILTER (WHERE meta ->> 'retry_after' IS NULL
                           OR (meta ->> 'retry_after')::timestamptz <= now()),
       extract(epoch FROM min((meta ->> 'retry_after')::timestamptz)
                          FILTER (WHERE (meta ->> 'retry_after')::timestamptz > now()) - now()),
       count(*)
FROM public.workflow_states
WHERE status = 'PENDING' AND (%(batch_id)s::uuid IS NULL OR batch_id = %(batch_id)s::uuid)
"""


# Claims older than the lease that no sender took (still QUEUED): back to PENDING (claimable at once),
# or FAILED when they already used their last dispatch attempt. QUEUED rows without `claimed_at`
# (claimed by an older orchestrator) count from `updated_at`.
REQUEUE_EXPIRED_SQL = """
WITH expired AS (
    SELECT ws.id
    FROM public.workflow_states ws
    WHERE ws.status = 'QUEUED'
      AND (%(batch_id)s::uuid IS NULL OR ws.batch_id = %(batch_id)s::uuid)
      AND coalesce((ws.meta ->> 'claimed_at')::timestamptz, ws.updated_at)
          < now() - make_interval(secs => %(lease)s)
    FOR UPDATE OF ws SKIP LOCKED
), described AS (
    SELECT ws.id,
        coalesce((ws.meta ->> 'dispatch_attempts')::int, 0) >= %(max_attempts)s AS exhausted,
        format('claim expired: QUEUED since %%s by %%s, longer than the claim lease of %%s s, and no sender took '
               'it (the claiming run died, was cancelled, or its spawn hung)',
               coalesce(ws.meta ->> 'claimed_at', ws.updated_at::text),
               coalesce(ws.meta ->> 'claimed_by', 'an unknown run'), %(lease_text)s::text) AS reason
    FROM public.workflow_states ws JOIN expired e ON e.id = ws.id
)
UPDATE public.workflow_states ws SET
    status = (CASE WHEN d.exhausted THEN 'FAILED' ELSE 'PENDING' END)::workflowstatus,
    updated_at = now(),
    meta = (coalesce(ws.meta, '{}'::jsonb) - 'retry_after') || jsonb_build_object(
            'requeue_reason', d.reason, 'requeued_at', now(), 'requeued_by', %(requeued_by)s::text)
        || CASE WHEN d.exhausted THEN jsonb_build_object(
            'failed_at', now(),
            'error', format('dispatch failed %%s time(s); last: %%s', ws.meta ->> 'dispatch_attempts', d.reason))
           ELSE '{}'::jsonb END
FROM described d
WHERE ws.id = d.id AND ws.status = 'QUEUED'
RETURNING ws.id, ws.status::text
"""


# -- dispatch backends -------------------------------------------------------------------------------


def http_spawner(base_url: str, token_id: str, token_secret: str, timeout: float = SPAWN_TIMEOUT_SECONDS) -> Spawn:
    """Spawn through Modal's HTTP shape (the sandbox stand-in): POST .../functions/{fn}/spawn. `timeout`
    bounds each socket operation; the dispatcher bounds the whole call (`spawn_timeout_seconds`)."""
    base = base_url.rstrip("/")
    headers = {
        "content-type": "application/json",
        "x-modal-token-id": token_id,
        "x-modal-token-secret": token_secret,
    }

    def spawn(function_name: str, item_id: str, workstream_slug: str | None) -> str:
        url = f"{base}/v1/apps/{MODAL_APP}/functions/{function_name}/spawn"
        body = json.dumps({"args": [item_id, workstream_slug], "kwargs": {}}).encode()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["function_call_id"]
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError):
                detail = None
            raise RuntimeError(f"spawn {MODAL_APP}.{function_name}: HTTP {exc.code} {detail or exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(f"spawn {MODAL_APP}.{function_name}: cannot reach {base}: {reason}") from None

    return spawn


def modal_spawner() -> Spawn:
    """Spawn on the real Modal app (credentials: MODAL_TOKEN_ID / MODAL_TOKEN_SECRET or ~/.modal.toml)."""
    import modal
    from modal.config import config

    if not (config.get("token_id") and config.get("token_secret")):
        raise RuntimeError(
            "Modal credentials missing: MODAL_TOKEN_ID / MODAL_TOKEN_SECRET are not set in the run's "
            "environment (the deployment's env fills them from the Secret blocks modal-token-id and "
            "modal-token-secret); nothing was claimed"
        )
    functions: dict[str, object] = {}
    lock = threading.Lock()

    def spawn(function_name: str, item_id: str, workstream_slug: str | None) -> str:
        with lock:
            fn = functions.get(function_name)
            if fn is None:
                fn = functions[function_name] = modal.Function.from_name(MODAL_APP, function_name)
        return fn.spawn(item_id, workstream_slug).object_id

    return spawn


def spawner_from_env(timeout: float = SPAWN_TIMEOUT_SECONDS) -> Spawn:
    """The stand-in when ENRICHMENT_DISPATCH_URL is set, else real Modal. Raises before any claim."""
    url = os.environ.get(DISPATCH_URL_ENV)
    if not url:
        return modal_spawner()
    token_id, token_secret = os.environ.get("MODAL_TOKEN_ID"), os.environ.get("MODAL_TOKEN_SECRET")
    if not (token_id and token_secret):
        raise RuntimeError(
            f"{DISPATCH_URL_ENV} is set but MODAL_TOKEN_ID / MODAL_TOKEN_SECRET are not; nothing was claimed"
        )
    _logger().info("Dispatch backend: Modal HTTP endpoint %s", url)
    return http_spawner(url, token_id, token_secret, timeout)


# -- the two phases, as plain functions (the flows below, the tests and the benchmark use them) -------


def advance_completed(conn, *, batch_size: int = 50, batch_id: str | None = None,
                      time_budget_seconds: float = 600.0) -> dict:
    """Advance every COMPLETED, not yet advanced state to its blueprint's next step."""
    log = _logger()
    counts = {"processed": 0, "advanced": 0, "already_present": 0, "finished": 0, "not_in_blueprint": 0}
    deadline = time.monotonic() + time_budget_seconds
    with conn.cursor() as cur:
        while True:
            if time.monotonic() >= deadline:
                log.warning("Sequencer stopped on its time budget; the other COMPLETED states advance next run")
                break
            cur.execute(ADVANCE_SQL, {"batch_id": batch_id, "limit": batch_size})
            rows = cur.fetchall()
            for state_id, step, position, next_step, created in rows:
                counts["processed"] += 1
                if position is None:
                    counts["not_in_blueprint"] += 1
                    log.warning("State %s: step %r is not in its batch's blueprint; marked advanced", state_id, step)
                elif next_step is None:
                    counts["finished"] += 1
                else:
                    counts["advanced" if created else "already_present"] += 1
            if len(rows) < batch_size:
                break
    log.info("Sequencer: %s", counts)
    return counts


def requeue_expired_claims(conn, *, claim_lease_seconds: float = CLAIM_LEASE_SECONDS, batch_id: str | None = None,
                           max_dispatch_attempts: int = 3, requeued_by: str = "local") -> dict:
    """Put back every claim older than the lease that no sender took (see REQUEUE_EXPIRED_SQL), in one
    transaction whose `runbook.transition_reason` setting gives the audit trigger the reason.
    Returns {"reclaimed": back to PENDING, "failed": FAILED (no attempt left)}."""
    reason = (f"claim expired: still QUEUED after the claim lease of {claim_lease_seconds:g} s, no sender took it; "
              f"requeued by {requeued_by}")
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            cur.execute("SELECT set_config(%s, %s, true)", (TRANSITION_REASON_SETTING, reason))
            cur.execute(REQUEUE_EXPIRED_SQL, {"batch_id": batch_id, "lease": claim_lease_seconds,
                                              "lease_text": f"{claim_lease_seconds:g}",
                                              "max_attempts": max_dispatch_attempts, "requeued_by": requeued_by})
            statuses = Counter(status for _, status in cur.fetchall())
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
    counts = {"reclaimed": statuses["PENDING"], "failed": statuses["FAILED"]}
    if statuses:
        _logger().warning(
            "Requeued %d expired claim(s) (QUEUED for longer than the claim lease of %g s, no sender took them): "
            "%d back to PENDING, %d FAILED (no dispatch attempt left)",
            sum(statuses.values()), claim_lease_seconds, counts["reclaimed"], counts["failed"])
    return counts


def drain_pending(conn, spawn: Spawn, *, batch_size: int = 50, batch_id: str | None = None,
                  time_budget_seconds: float = 600.0, max_items: int | None = None,
                  max_dispatch_attempts: int = 3, retry_delay_seconds: float = 5.0,
                  dispatch_concurrency: int = 16, claimed_by: str = "local",
                  claim_lease_seconds: float | None = CLAIM_LEASE_SECONDS,
                  spawn_timeout_seconds: float = SPAWN_TIMEOUT_SECONDS) -> dict:
    """Requeue expired claims, then claim and spawn PENDING states chunk by chunk until none is left
    or the budget is spent. `claim_lease_seconds=None` skips the requeue.

    Counts: reclaimed (expired claims put back to PENDING first), processed (claims), queued,
    dispatched, skipped (no sender: FAILED), dispatch_errors (failed or timed-out spawns), failed
    (FAILED after the last attempt), requeued (PENDING again, retry due), pending_remaining (PENDING
    in scope when the run stopped early: budget spent, or every spawn of a chunk failed).
    """
    log = _logger()
    counts = dict.fromkeys(
        ["reclaimed", "processed", "queued", "dispatched", "skipped", "dispatch_errors", "failed", "requeued",
         "pending_remaining"], 0)
    if claim_lease_seconds is not None:
        expired = requeue_expired_claims(conn, claim_lease_seconds=claim_lease_seconds, batch_id=batch_id,
                                         max_dispatch_attempts=max_dispatch_attempts, requeued_by=claimed_by)
        counts["reclaimed"], counts["failed"] = expired["reclaimed"], expired["failed"]
    requeued: set[str] = set()
    deadline = time.monotonic() + time_budget_seconds
    locked_since = None
    stopped_early = False
    workers = _SpawnWorkers(spawn, dispatch_concurrency, spawn_timeout_seconds)
    try:
        with conn.cursor() as cur:
            while True:
                room = batch_size if max_items is None else min(batch_size, max_items - counts["processed"])
                if room <= 0 or time.monotonic() >= deadline:
                    stopped_early = True
                    break
                cur.execute(CLAIM_SQL, {"batch_id": batch_id, "limit": room, "claimed_by": claimed_by})
                rows = cur.fetchall()
                if rows:
                    locked_since = None
                    if _dispatch_chunk(cur, workers, rows, counts, requeued, max_dispatch_attempts,
                                       retry_delay_seconds, log):
                        continue
                    log.error("Every spawn of the last chunk failed; stopping this run so that the other "
                              "PENDING items keep their dispatch attempts")
                    stopped_early = True
                    break
                cur.execute(PENDING_PROBE_SQL, {"batch_id": batch_id})
                ready, next_retry, _ = cur.fetchone()
                if ready:  # PENDING rows another transaction holds: they move on in a moment, or we give up
                    locked_since = locked_since or time.monotonic()
                    if time.monotonic() - locked_since > LOCKED_PATIENCE_SECONDS:
                        stopped_early = True
                        break
                    wait = 0.1
                elif next_retry is None:
                    break  # nothing PENDING in scope
                else:
                    wait = float(next_retry) + 0.01
                if time.monotonic() + wait >= deadline:
                    stopped_early = True
                    break
                time.sleep(wait)
            if requeued:
                cur.execute("SELECT count(*) FROM public.workflow_states WHERE id = ANY(%s::uuid[]) AND status = 'PENDING'",
                            (list(requeued),))
                counts["requeued"] = cur.fetchone()[0]
            if stopped_early:
                cur.execute(PENDING_PROBE_SQL, {"batch_id": batch_id})
                counts["pending_remaining"] = cur.fetchone()[2]
    finally:
        workers.close()
    log.info("Dispatcher: %s", counts)
    return counts


def _dispatch_chunk(cur, workers: _SpawnWorkers, rows, counts, requeued, max_attempts, retry_delay, log) -> bool:
    """Spawn the claimed states concurrently; failed spawns go back to PENDING or to FAILED.
    Returns False when every spawn of the chunk failed (a systemic failure: bad credentials, Modal
    down), so the run stops instead of spending the attempts of every remaining item."""
    counts["processed"] += len(rows)
    mapped, unmapped = [], Counter()
    for state_id, item_id, step, workstream, sender, reason in rows:
        if reason:
            unmapped[reason] += 1
        else:
            mapped.append((state_id, item_id, workstream, sender))
    counts["skipped"] += sum(unmapped.values())
    for reason, n in unmapped.items():
        log.warning("%d state(s) set FAILED: %s", n, reason)
    counts["queued"] += len(mapped)
    errors = workers.run(mapped)
    counts["dispatched"] += len(mapped) - len(errors)
    if not errors:
        return True
    counts["dispatch_errors"] += len(errors)
    cur.execute(RECORD_SPAWN_FAILED_SQL, {"ids": list(errors), "errors": list(errors.values()),
                                          "max_attempts": max_attempts, "retry_delay": retry_delay})
    outcomes = Counter()
    for state_id, status in cur.fetchall():
        outcomes[(errors[state_id], status)] += 1
        if status == "FAILED":
            counts["failed"] += 1
            requeued.discard(state_id)
        else:
            requeued.add(state_id)
    counts["dispatched"] += len(errors) - sum(outcomes.values())  # the sender took them regardless
    for (error, status), n in outcomes.items():
        log.warning("%d spawn(s) failed (%s); state(s) now %s", n, error, status)
    return len(errors) < len(mapped)


class _Slot:
    """One spawn thread's identity: abandoned once its spawn in flight outlived the spawn timeout."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class _SpawnWorkers:
    """Daemon threads spawning a chunk's states, at most `concurrency` at a time, each taking the chunk's
    next state until none is left. One thread starts on a chunk; the others are woken only when the chunk
    is not done within SPAWN_RAMP_SECONDS (spawns that wait on the network, where concurrency pays), so a
    chunk of quick spawns costs one thread hand-off rather than `concurrency` of them. A spawn still
    running after `timeout` seconds is reported as failed at once; its thread is abandoned (a daemon: it
    never holds up the end of the run) and a new thread takes its place."""

    def __init__(self, spawn: Spawn, concurrency: int, timeout: float):
        self.spawn, self.concurrency, self.timeout = spawn, concurrency, timeout
        self.wake: queue.SimpleQueue = queue.SimpleQueue()  # one token wakes one idle thread; None ends it
        self.done = threading.Event()  # set when the chunk's last spawn is accounted for
        self.lock = threading.Lock()  # guards everything below
        self.todo: deque = deque()
        self.in_flight: dict[_Slot, tuple[str, str, float]] = {}  # (state id, sender, started)
        self.errors: dict[str, str] = {}
        self.outstanding = 0
        self.alive = 0

    def _wake(self, n: int, threads: int) -> None:
        """Wake `n` idle threads, first starting new ones until `threads` are alive."""
        while self.alive < threads:
            self.alive += 1
            threading.Thread(target=self._work, args=(_Slot(),), name="spawn", daemon=True).start()
        for _ in range(n):
            self.wake.put(True)

    def _work(self, slot: _Slot) -> None:
        lock, todo, in_flight, spawn = self.lock, self.todo, self.in_flight, self.spawn
        while self.wake.get() is not None:
            while True:
                with lock:
                    if not todo:
                        break
                    state_id, item_id, workstream, sender = todo.popleft()
                    in_flight[slot] = (state_id, sender, time.monotonic())
                try:
                    spawn(sender, item_id, workstream)
                    error = None
                except Exception as exc:  # any spawn failure is recorded on the state, never lost
                    error = (str(exc) or type(exc).__name__)[:500]
                with lock:
                    if slot.abandoned:  # reported as timed out; the other threads took the rest
                        return
                    del in_flight[slot]
                    if error:
                        self.errors[state_id] = error
                    self.outstanding -= 1
                    if not self.outstanding:
                        self.done.set()

    def run(self, mapped: list) -> dict[str, str]:
        """Spawn every (state, item, workstream, sender); return {state id: error} of those that failed."""
        if not mapped:
            return {}
        wanted = min(self.concurrency, len(mapped))
        with self.lock:
            errors = self.errors = {}
            self.todo.extend(mapped)
            self.outstanding = len(mapped)
            self.done.clear()
        self._wake(1, 1)
        if self.done.wait(SPAWN_RAMP_SECONDS):
            return errors
        self._wake(wanted - 1, wanted)
        tick = min(0.5, self.timeout / 4)
        while not self.done.wait(tick):
            now = time.monotonic()
            with self.lock:
                overdue = [(slot, *spawning) for slot, spawning in self.in_flight.items()
                           if now - spawning[2] > self.timeout]
                for slot, state_id, sender, _ in overdue:
                    slot.abandoned = True
                    del self.in_flight[slot]
                    errors[state_id] = (f"spawn {MODAL_APP}.{sender} did not answer within the spawn timeout "
                                        f"of {self.timeout:g}s")
                    self.outstanding -= 1
                finished, left = not self.outstanding, len(self.todo)
            self.alive -= len(overdue)
            if finished:
                break
            if overdue and left:
                self._wake(min(len(overdue), left), wanted)
        return errors

    def close(self) -> None:
        for _ in range(self.alive):
            self.wake.put(None)
        self.alive = 0


def incomplete_reason(counts: dict) -> str | None:
    """Why a dispatcher run is not a success, or None when every claimed item was dispatched."""
    parts = [f"{counts[k]} {what}" for k, what in (
        ("failed", "FAILED after the last dispatch attempt"),
        ("skipped", "FAILED with no Modal sender mapped"),
        ("requeued", "back to PENDING after a failed dispatch"),
        ("pending_remaining", "still PENDING when the run stopped (budget spent or dispatch failing)"),
    ) if counts.get(k)]
    return "; ".join(parts) or None


# -- flows -------------------------------------------------------------------------------------------


def _validate(batch_size: int, batch_id: str | None, time_budget_seconds: float, max_items: int | None = None,
              max_dispatch_attempts: int = 1, retry_delay_seconds: float = 0.0, dispatch_concurrency: int = 1,
              claim_lease_seconds: float = CLAIM_LEASE_SECONDS, spawn_timeout_seconds: float = SPAWN_TIMEOUT_SECONDS
              ) -> None:
    """Refuse bad parameters before anything is read or written. The claim lease must be longer than
    the longest dispatch of one chunk (its spawns, `dispatch_concurrency` at a time, each bounded by
    `spawn_timeout_seconds`), or a live run's claims could be taken from it."""
    try:
        batch_ok = batch_id is None or bool(uuid.UUID(batch_id))
    except (ValueError, TypeError, AttributeError):
        batch_ok = False
    problems = [msg for bad, msg in (
        (batch_size < 1, f"batch_size must be >= 1 (got {batch_size})"),
        (not batch_ok, f"batch_id must be a batch's UUID or None (got {batch_id!r})"),
        (time_budget_seconds <= 0, f"time_budget_seconds must be > 0 (got {time_budget_seconds})"),
        (max_items is not None and max_items < 1, f"max_items must be >= 1 or None (got {max_items})"),
        (max_dispatch_attempts < 1, f"max_dispatch_attempts must be >= 1 (got {max_dispatch_attempts})"),
        (retry_delay_seconds < 0, f"retry_delay_seconds must be >= 0 (got {retry_delay_seconds})"),
        (dispatch_concurrency < 1, f"dispatch_concurrency must be >= 1 (got {dispatch_concurrency})"),
        (not 0 < spawn_timeout_seconds < math.inf,
         f"spawn_timeout_seconds must be a finite number > 0 (got {spawn_timeout_seconds})"),
        (not 0 < claim_lease_seconds < math.inf,
         f"claim_lease_seconds must be a finite number > 0 (got {claim_lease_seconds})"),
    ) if bad]
    if not problems and batch_size >= 1 and dispatch_concurrency >= 1:
        longest = spawn_timeout_seconds * math.ceil(batch_size / dispatch_concurrency)
        if claim_lease_seconds <= longest:
            problems.append(
                f"claim_lease_seconds ({claim_lease_seconds:g}) must be longer than the longest dispatch of one chunk "
                f"({longest:g} s: spawn_timeout_seconds {spawn_timeout_seconds:g} x ceil(batch_size {batch_size} / "
                f"dispatch_concurrency {dispatch_concurrency})), or the claims of a run still dispatching would be "
                "taken from it")
    if problems:
        raise ValueError("; ".join(problems))


@flow(name="advance_completed_items")
def advance_completed_items(batch_size: int = 50, batch_id: Optional[str] = None,
                            time_budget_seconds: float = 600.0) -> dict:
    """Sequencer: insert the next blueprint step of every COMPLETED state as PENDING."""
    _validate(batch_size, batch_id, time_budget_seconds)
    with closing(connect()) as conn:
        return advance_completed(conn, batch_size=batch_size, batch_id=batch_id,
                                 time_budget_seconds=time_budget_seconds)


@flow(name="dispatch_pending_items")
def dispatch_pending_items(batch_size: int = 50, batch_id: Optional[str] = None,
                           time_budget_seconds: float = 600.0, max_items: Optional[int] = None,
                           max_dispatch_attempts: int = 3, retry_delay_seconds: float = 5.0,
                           dispatch_concurrency: int = 16, claim_lease_seconds: float = CLAIM_LEASE_SECONDS,
                           spawn_timeout_seconds: float = SPAWN_TIMEOUT_SECONDS) -> dict:
    """Dispatcher: requeue expired claims, then drain PENDING states to their Modal senders; FAILED run
    if anything was left behind."""
    _validate(batch_size, batch_id, time_budget_seconds, max_items, max_dispatch_attempts, retry_delay_seconds,
              dispatch_concurrency, claim_lease_seconds, spawn_timeout_seconds)
    spawn = spawner_from_env(spawn_timeout_seconds)
    with closing(connect()) as conn:
        counts = drain_pending(
            conn, spawn, batch_size=batch_size, batch_id=batch_id, time_budget_seconds=time_budget_seconds,
            max_items=max_items, max_dispatch_attempts=max_dispatch_attempts,
            retry_delay_seconds=retry_delay_seconds, dispatch_concurrency=dispatch_concurrency,
            claimed_by=f"flow-run/{flow_run.id}" if flow_run.id else "local",
            claim_lease_seconds=claim_lease_seconds, spawn_timeout_seconds=spawn_timeout_seconds,
        )
    reason = incomplete_reason(counts)
    if reason:
        raise OrchestratorIncomplete(f"Dispatch incomplete: {reason}. Counts: {json.dumps(counts)}", counts)
    return counts


@flow(name="orchestrator_main")
def orchestrator_main(batch_size: int = 50, batch_id: Optional[str] = None,
                      time_budget_seconds: float = 600.0, max_items: Optional[int] = None,
                      max_dispatch_attempts: int = 3, retry_delay_seconds: float = 5.0,
                      dispatch_concurrency: int = 16, claim_lease_seconds: float = CLAIM_LEASE_SECONDS,
                      spawn_timeout_seconds: float = SPAWN_TIMEOUT_SECONDS) -> dict:
    """Sequencer, then dispatcher. Returns both phases' counts; raises OrchestratorIncomplete (the run
    ends FAILED) when an item failed, was skipped or is still PENDING. `batch_id` limits the run to
    one batch (None, the production call, means all). Expired claims (QUEUED longer than
    `claim_lease_seconds`) are put back first; each spawn is bounded by `spawn_timeout_seconds`."""
    _validate(batch_size, batch_id, time_budget_seconds, max_items, max_dispatch_attempts, retry_delay_seconds,
              dispatch_concurrency, claim_lease_seconds, spawn_timeout_seconds)
    started = time.monotonic()
    sequencer = advance_completed_items(batch_size=batch_size, batch_id=batch_id,
                                        time_budget_seconds=time_budget_seconds)
    remaining = max(time_budget_seconds - (time.monotonic() - started), 1.0)
    state = dispatch_pending_items(
        batch_size=batch_size, batch_id=batch_id, time_budget_seconds=remaining, max_items=max_items,
        max_dispatch_attempts=max_dispatch_attempts, retry_delay_seconds=retry_delay_seconds,
        dispatch_concurrency=dispatch_concurrency, claim_lease_seconds=claim_lease_seconds,
        spawn_timeout_seconds=spawn_timeout_seconds, return_state=True,
    )
    if state.is_completed():
        return {"sequencer": sequencer, "dispatcher": state.result()}
    error = state.result(raise_on_failure=False)
    if isinstance(error, OrchestratorIncomplete):
        raise OrchestratorIncomplete(error.message, {"sequencer": sequencer, "dispatcher": error.counts})
    if isinstance(error, BaseException):
        raise error
    raise RuntimeError(f"dispatch_pending_items ended {state.type.value}: {state.message}")


if __name__ == "__main__":
    load_dotenv()
    print(json.dumps(orchestrator_main(), indent=2))
