"""The pipeline's Postgres (Supabase's, or the sandbox's), with psycopg 3.

Every SQL statement of the runbook is here. It reads what the checks look at (the schema contract:
tables, columns, enums, the unique key; the trigger and its function, pg_net's presence, queue and
responses, the registry, workflow states and their transitions) and launches a batch exactly as the
admin UI does, so the end-to-end test goes through the real trigger. Connection failures become a
`DatabaseError` with the password masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from psycopg.rows import dict_row

from runbook_lib.core.errors import DatabaseError
from runbook_lib.core.secrets import redact, register_secret
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.core.values import parse_dsn

TRIGGER_NAME = "trigger_batch_ready"
TRIGGER_FUNCTION = "public.notify_prefect_on_batch_insert"
HTTP_POST_SIGNATURE = "net.http_post(text,jsonb,jsonb,jsonb,integer)"
# Seconds a connection may take to open, unless the DSN's `connect_timeout` or PGCONNECT_TIMEOUT (libpq's own
# ways) says otherwise: libpq's default is to wait for ever.
CONNECT_TIMEOUT_SECONDS = 10
ITEM_COLUMNS = ("company_name", "company_domain", "company_linkedin_url", "person_first_name",
                "person_last_name", "person_linkedin_url", "person_title", "original_data")


@dataclass(frozen=True)
class TriggerInfo:
    name: str
    enabled: bool
    definition: str  # pg_get_triggerdef: timing, event, WHEN clause
    function: str
    security_definer: bool
    function_source: str  # pg_get_functiondef (holds the Edge Function URL and the anon key)

    @property
    def fires_on_initializing_to_pending(self) -> bool:
        d = " ".join(self.definition.split())
        return ("AFTER UPDATE ON public.batches" in d and "'INITIALIZING'" in d and "'PENDING'" in d
                and "old.status" in d.lower() and "new.status" in d.lower())

    def posts_to(self, url: str) -> bool:
        return f"'{url}'" in self.function_source

    @property
    def source_digest(self) -> str:
        """sha256 of the function's source (pg_get_functiondef), line endings and trailing blanks
        normalised: what a passing run records, and the health check compares."""
        text = "\n".join(line.rstrip() for line in self.function_source.strip().splitlines())
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LaunchedBatch:
    batch_id: str
    item_ids: list[str]
    trigger_request_ids: list[int]
    launched_at: datetime | None = None  # the database's clock when the batch became PENDING


def _chosen_connect_timeout(dsn: str) -> int | None:
    """The connect timeout the DSN's `connect_timeout` or PGCONNECT_TIMEOUT names, in seconds as psycopg applies
    it (libpq's rules: under 2 means 2; 0 or less no timeout, for which psycopg waits 130 s), or None when
    neither names one. A value that is not a number is refused without quoting the DSN."""
    try:
        params = conninfo_to_dict(dsn)
        if "connect_timeout" not in params and os.environ.get("PGCONNECT_TIMEOUT") is None:
            return None
        return timeout_from_conninfo(params)
    except psycopg.Error:  # its message may quote the DSN
        raise DatabaseError("the database URL's connect_timeout (or PGCONNECT_TIMEOUT) is not a number of seconds, "
                            "or the URL does not parse as a libpq connection string") from None


class Database:
    def __init__(self, dsn: str, *, connect_timeout: int | None = None):
        """`connect_timeout`: seconds; by default the DSN's `connect_timeout`, else PGCONNECT_TIMEOUT, else
        CONNECT_TIMEOUT_SECONDS."""
        self._dsn = dsn
        try:
            parts = parse_dsn(dsn)
        except ValueError as exc:  # its message never quotes the DSN
            raise DatabaseError(f"the database URL {exc}") from None
        register_secret(parts.password, "DATABASE_PASSWORD")
        self.where = f"{parts.host}:{parts.port}/{parts.database}"
        # Resolved here and always passed: psycopg's keyword overrides the DSN's own parameter.
        self.connect_timeout = connect_timeout or _chosen_connect_timeout(dsn) or CONNECT_TIMEOUT_SECONDS

    @classmethod
    def from_settings(cls, settings: RunbookSettings, **kwargs: Any) -> "Database":
        settings.require("database.url")
        return cls(settings.value("database.url"), **kwargs)

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection:
        try:
            return psycopg.connect(self._dsn, autocommit=autocommit, row_factory=dict_row,
                                   connect_timeout=self.connect_timeout)
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if isinstance(exc, psycopg.errors.ConnectionTimeout):
                reason += (f" (after {self.connect_timeout} s: the URL's connect_timeout, else PGCONNECT_TIMEOUT, sets it; "
                           f"{CONNECT_TIMEOUT_SECONDS} s when neither does)")
            raise DatabaseError(f"cannot connect to {self.where}: {redact(reason)}; check DATABASE_URL") from None

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self.connect() as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise DatabaseError(f"query failed on {self.where}: {redact(str(exc).strip())}") from None

    # -- structure ----------------------------------------------------------------------------
    def server_version(self) -> str:
        return self.query("SHOW server_version")[0]["server_version"]

    def identity(self) -> tuple[str, str, int]:
        """Which database this DSN reaches, whatever the route (a pooler, a proxy, another host name):
        (database name, the server's start time, the database's oid)."""
        row = self.query("SELECT current_database() AS name, pg_postmaster_start_time()::text AS started, "
                         "(SELECT oid FROM pg_database WHERE datname = current_database())::bigint AS oid")[0]
        return row["name"], row["started"], int(row["oid"])

    def has_relation(self, name: str) -> bool:
        """A table or view named `schema.name` exists."""
        return bool(self.query("SELECT to_regclass(%s) IS NOT NULL AS ok", (name,))[0]["ok"])

    def has_schema(self, name: str) -> bool:
        return bool(self.query("SELECT to_regnamespace(%s) IS NOT NULL AS ok", (name,))[0]["ok"])

    def columns(self, tables: Iterable[str], schema: str = "public") -> dict[str, set[str]]:
        """table -> its column names, for those of `tables` that exist."""
        rows = self.query(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = ANY(%s)", (schema, list(tables)),
        )
        have: dict[str, set[str]] = {}
        for r in rows:
            have.setdefault(r["table_name"], set()).add(r["column_name"])
        return have

    def enum_labels(self, enums: Iterable[str]) -> dict[str, list[str]]:
        """enum type -> its labels in order, for those of `enums` that exist."""
        rows = self.query(
            "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
            "WHERE t.typname = ANY(%s) ORDER BY t.typname, e.enumsortorder", (list(enums),),
        )
        labels: dict[str, list[str]] = {}
        for r in rows:
            labels.setdefault(r["typname"], []).append(r["enumlabel"])
        return labels

    def column_types(self, columns: Iterable[tuple[str, str]], schema: str = "public") -> dict[tuple[str, str], str]:
        """(table, column) -> its type name (udt_name), for those that exist."""
        wanted = list(columns)
        rows = self.query(
            "SELECT table_name, column_name, udt_name FROM information_schema.columns WHERE table_schema = %s "
            "AND (table_name || '.' || column_name) = ANY(%s)", (schema, [f"{t}.{c}" for t, c in wanted]),
        )
        return {(r["table_name"], r["column_name"]): r["udt_name"] for r in rows}

    def unique_keys(self, table: str) -> list[list[str]]:
        """The column sets of the table's unique indexes without a predicate."""
        rows = self.query(
            """
            SELECT array_agg(a.attname::text ORDER BY a.attname) AS cols
              FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL
             GROUP BY i.indexrelid
            """, (table,),
        )
        return [list(r["cols"]) for r in rows]

    def http_post_available(self) -> bool:
        """pg_net's `net.http_post` exists with the signature the trigger calls."""
        row = self.query("SELECT to_regprocedure(%s) IS NOT NULL AS ok", (HTTP_POST_SIGNATURE,))[0]
        return bool(row["ok"])

    def trigger(self) -> TriggerInfo | None:
        """The batch trigger and its function, or None when it is not installed."""
        rows = self.query(
            """
            SELECT t.tgname, t.tgenabled <> 'D' AS enabled, pg_get_triggerdef(t.oid) AS definition,
                   p.oid::regprocedure::text AS function, p.prosecdef, pg_get_functiondef(p.oid) AS source
              FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE t.tgrelid = to_regclass('public.batches') AND t.tgname = %s AND NOT t.tgisinternal
            """,
            (TRIGGER_NAME,),
        )
        if not rows:
            return None
        r = rows[0]
        return TriggerInfo(r["tgname"], r["enabled"], r["definition"], r["function"], r["prosecdef"], r["source"])

    # -- registry -----------------------------------------------------------------------------
    def registry(self, workstream: str | None = None) -> list[dict[str, Any]]:
        """Registry rows (all, or one workstream's): slug, workstream_slug, sender and receiver."""
        return self.query(
            """
            SELECT slug, workstream_slug, name, type::text AS type, modal_sender_fn, modal_receiver_fn
              FROM public.enrichment_registry
             WHERE %(ws)s::text IS NULL OR workstream_slug = %(ws)s
             ORDER BY workstream_slug NULLS FIRST, slug
            """,
            {"ws": workstream},
        )

    def client_exists(self, client_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM public.clients WHERE id = %s", (client_id,)))

    # -- batches ------------------------------------------------------------------------------
    def launch_batch(
        self, client_id: str, workstream: str, blueprint: list[str], items: Iterable[dict[str, Any]],
        *, direct_pending: bool = False,
    ) -> LaunchedBatch:
        """Launch a batch the way the admin UI does: insert it INITIALIZING with its items and one
        PENDING workflow state per item for blueprint[0] (one transaction), then flip it to
        PENDING (a second transaction), which fires the trigger. `direct_pending=True` takes the
        other UI path instead: the batch is inserted as PENDING at once, which never fires it."""
        if not blueprint:
            raise DatabaseError("a batch needs a non-empty blueprint")
        items = list(items)
        if not items:
            raise DatabaseError("a batch needs at least one item")
        for item in items:
            unknown = set(item) - set(ITEM_COLUMNS)
            if unknown:
                raise DatabaseError(f"unknown batch item field(s) {sorted(unknown)}; known: {list(ITEM_COLUMNS)}")
        batch_id = str(uuid.uuid4())
        columns = ITEM_COLUMNS
        with self.connect(autocommit=False) as conn:
            try:
                conn.execute(
                    "INSERT INTO public.batches (id, status, blueprint, client_id, workstream_slug) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (batch_id, "PENDING" if direct_pending else "INITIALIZING", json.dumps(blueprint), client_id,
                     workstream),
                )
                item_ids = []
                for item in items:
                    row = conn.execute(
                        "INSERT INTO public.batch_items (batch_id, " + ", ".join(columns) + ") "
                        "VALUES (%s, " + ", ".join(["%s"] * len(columns)) + ") RETURNING id",
                        (batch_id, *[json.dumps(item[c]) if c == "original_data" and c in item else item.get(c)
                                     for c in columns]),
                    ).fetchone()
                    item_ids.append(str(row["id"]))
                    conn.execute(
                        "INSERT INTO public.workflow_states (batch_id, item_id, step_name, status) "
                        "VALUES (%s, %s, %s, 'PENDING')",
                        (batch_id, row["id"], blueprint[0]),
                    )
                launched_at = conn.execute("SELECT clock_timestamp() AS at").fetchone()["at"]
                conn.commit()
            except psycopg.Error as exc:
                conn.rollback()
                raise DatabaseError(f"inserting the batch failed: {redact(str(exc).strip())}") from None
            if not direct_pending:
                try:
                    launched_at = conn.execute(
                        "UPDATE public.batches SET status = 'PENDING' WHERE id = %s AND status = 'INITIALIZING' "
                        "RETURNING clock_timestamp() AS at", (batch_id,),
                    ).fetchone()["at"]
                    conn.commit()
                except psycopg.Error as exc:
                    conn.rollback()
                    raise DatabaseError(f"flipping batch {batch_id} to PENDING failed: {redact(str(exc).strip())}") from None
        return LaunchedBatch(batch_id, item_ids, self.trigger_request_ids(batch_id), launched_at)

    def trigger_request_ids(self, batch_id: str) -> list[int]:
        """pg_net request ids the trigger queued for this batch (runbook.trigger_requests)."""
        rows = self.query("SELECT request_id FROM runbook.trigger_requests WHERE batch_id = %s ORDER BY request_id", (batch_id,))
        return [r["request_id"] for r in rows]

    def http_responses(self, request_ids: list[int]) -> list[dict[str, Any]]:
        """pg_net's recorded answers (net._http_response) for these request ids."""
        if not request_ids:
            return []
        return self.query(
            "SELECT id, status_code, content_type, content, timed_out, error_msg, created "
            "FROM net._http_response WHERE id = ANY(%s) ORDER BY id",
            (request_ids,),
        )

    def queued_requests(self, request_ids: list[int]) -> int:
        """How many of these pg_net requests are still waiting in net.http_request_queue."""
        return self.query("SELECT count(*) AS n FROM net.http_request_queue WHERE id = ANY(%s)", (request_ids,))[0]["n"]

    def item_states(self, batch_id: str, step_name: str) -> list[dict[str, Any]]:
        """The batch's workflow states of one step: item_id, status, meta, updated_at."""
        return self.query(
            "SELECT item_id, status::text AS status, meta, updated_at FROM public.workflow_states "
            "WHERE batch_id = %s AND step_name = %s ORDER BY item_id",
            (batch_id, step_name),
        )

    def claimed_count(self, batch_id: str, step_name: str) -> int:
        """How many recorded transitions of the batch's states (of one step) left their first status."""
        return self.query(
            "SELECT count(*) AS n FROM runbook.workflow_state_transitions WHERE batch_id = %s AND step_name = %s "
            "AND from_status IS NOT NULL", (batch_id, step_name),
        )[0]["n"]

    def state_counts(self, batch_id: str) -> dict[tuple[str, str], int]:
        """(step_name, status) -> number of workflow states of the batch."""
        rows = self.query(
            "SELECT step_name, status::text AS status, count(*) AS n FROM public.workflow_states "
            "WHERE batch_id = %s GROUP BY 1, 2",
            (batch_id,),
        )
        return {(r["step_name"], r["status"]): r["n"] for r in rows}

    def transitions(self, batch_id: str) -> list[dict[str, Any]]:
        """Every recorded status change of the batch's workflow states, in order."""
        return self.query(
            "SELECT state_id, item_id, step_name, from_status::text AS from_status, to_status::text AS to_status, at "
            "FROM runbook.workflow_state_transitions WHERE batch_id = %s ORDER BY at, id",
            (batch_id,),
        )

    def quiet_seconds(self, batch_id: str, step_name: str) -> float | None:
        """Seconds (on the database's clock) since any of the batch's states of one step last changed
        (its last recorded transition or row update); None when it has no states."""
        row = self.query(
            """
            SELECT extract(epoch FROM clock_timestamp() - greatest(
                       (SELECT max(updated_at) FROM public.workflow_states WHERE batch_id = %(b)s AND step_name = %(s)s),
                       (SELECT max(at) FROM runbook.workflow_state_transitions WHERE batch_id = %(b)s AND step_name = %(s)s)
                   ))::float8 AS quiet
            """,
            {"b": batch_id, "s": step_name},
        )[0]
        return row["quiet"]

    def e2e_test_batches(self, client_id: str) -> list[dict[str, Any]]:
        """The batches of the end-to-end test's client whose items carry the test marker
        (`original_data.runbook_e2e`), oldest first: batch_id, status, created_at, age_seconds (the
        database's clock), items, launched_by (who launched it, as step 05 recorded; None from older
        runbooks)."""
        return self.query(
            """
            SELECT b.id::text AS batch_id, b.status::text AS status, b.created_at,
                   extract(epoch FROM now() - b.created_at)::float8 AS age_seconds, count(*) AS items,
                   (array_agg(i.original_data -> 'launched_by' ORDER BY i.id))[1] AS launched_by
              FROM public.batches b JOIN public.batch_items i ON i.batch_id = b.id
             WHERE b.client_id = %s AND i.original_data @> '{"runbook_e2e": true}'::jsonb
             GROUP BY b.id
             ORDER BY b.created_at
            """,
            (client_id,),
        )

    def delete_batch(self, batch_id: str) -> bool:
        """Remove a (test) batch with its items, states and results; True if it existed."""
        with self.connect(autocommit=False) as conn:
            for table in ("runbook.trigger_requests", "runbook.workflow_state_transitions"):
                if conn.execute("SELECT to_regclass(%s) IS NOT NULL AS ok", (table,)).fetchone()["ok"]:
                    conn.execute(f"DELETE FROM {table} WHERE batch_id = %s", (batch_id,))
            existed = conn.execute("DELETE FROM public.batches WHERE id = %s", (batch_id,)).rowcount > 0
            conn.commit()
            return existed

    # -- health (step 06) ---------------------------------------------------------------------
    def has_column(self, table: str, column: str) -> bool:
        """`schema.table` has `column`."""
        schema, _, name = table.rpartition(".")
        return bool(self.query(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND table_name = %s AND column_name = %s",
            (schema or "public", name, column),
        ))

    def http_response_summary(self, since: datetime, examples: int) -> dict[str, Any]:
        """pg_net's answers (net._http_response) created after `since`: total, failures (non-2xx,
        timed out, error), the latest answer, and the newest failures (with the batch they were for,
        when runbook.trigger_requests knows it)."""
        failed = ("(r.timed_out IS TRUE OR r.error_msg IS NOT NULL OR r.status_code IS NULL "
                  "OR r.status_code NOT BETWEEN 200 AND 299)")
        window = "r.created > %(since)s"
        params = {"since": since, "n": examples}
        counts = self.query(
            f"SELECT count(*) AS total, count(*) FILTER (WHERE {failed}) AS failed FROM net._http_response r WHERE {window}",
            params)[0]
        batch = ("(SELECT t.batch_id::text FROM runbook.trigger_requests t WHERE t.request_id = r.id)"
                 if self.has_relation("runbook.trigger_requests") else "NULL::text")
        columns = (f"r.id, r.status_code, r.timed_out, r.error_msg, left(r.content, 200) AS content, r.created, "
                   f"{batch} AS batch_id, {failed} AS failed")
        latest = self.query(f"SELECT {columns} FROM net._http_response r WHERE {window} ORDER BY r.created DESC, r.id DESC "
                            "LIMIT 1", params)
        failures = self.query(f"SELECT {columns} FROM net._http_response r WHERE {window} AND {failed} "
                              "ORDER BY r.created DESC, r.id DESC LIMIT %(n)s", params)
        return {"total": counts["total"], "failed": counts["failed"], "latest": latest[0] if latest else None,
                "failures": failures}

    def states_summary(self, status: str, *, older_than_seconds: float | None = None,
                       changed_after: datetime | None = None, examples: int = 5) -> dict[str, Any]:
        """Workflow states at `status` whose last change (`updated_at`) is older than so many seconds
        and after `changed_after`: count, the oldest age, the batches, the oldest examples (state,
        batch, item, step, age in seconds, meta keys)."""
        where = ["s.status = %(status)s::workflowstatus"]
        params: dict[str, Any] = {"status": status, "n": examples}
        if older_than_seconds is not None:
            where.append("s.updated_at < now() - make_interval(secs => %(older)s)")
            params["older"] = float(older_than_seconds)
        if changed_after is not None:
            where.append("s.updated_at > %(after)s")
            params["after"] = changed_after
        cond = " AND ".join(where)
        head = self.query(
            "SELECT count(*) AS n, extract(epoch FROM now() - min(s.updated_at))::float8 AS oldest_seconds, "
            f"count(DISTINCT s.batch_id) AS batch_count FROM public.workflow_states s WHERE {cond}", params)[0]
        batches = self.query(
            "SELECT s.batch_id::text AS batch_id, count(*) AS n, min(s.updated_at) AS oldest FROM public.workflow_states s "
            f"WHERE {cond} GROUP BY s.batch_id ORDER BY min(s.updated_at) LIMIT %(n)s", params)
        rows = self.query(
            "SELECT s.id::text AS state_id, s.batch_id::text AS batch_id, s.item_id::text AS item_id, s.step_name, "
            "s.updated_at, extract(epoch FROM now() - s.updated_at)::float8 AS age_seconds, "
            "(SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(CASE WHEN jsonb_typeof(s.meta) = 'object' "
            "THEN s.meta ELSE '{}'::jsonb END) k) AS meta_keys "
            f"FROM public.workflow_states s WHERE {cond} ORDER BY s.updated_at, s.id LIMIT %(n)s", params)
        return {"count": head["n"], "oldest_seconds": head["oldest_seconds"], "batch_count": head["batch_count"],
                "batches": batches, "examples": rows}

    def queued_state_ids(self, older_than_seconds: float, limit: int = 10000) -> list[dict[str, Any]]:
        """Every state QUEUED for longer than `older_than_seconds` (oldest first): id, batch, item, step, since."""
        return self.query(
            "SELECT id::text AS state_id, batch_id::text AS batch_id, item_id::text AS item_id, step_name, updated_at "
            "FROM public.workflow_states WHERE status = 'QUEUED' AND updated_at < now() - make_interval(secs => %s) "
            "ORDER BY updated_at, id LIMIT %s", (float(older_than_seconds), limit))

    def requeue_queued(self, state_ids: list[str], older_than_seconds: float, reason: str) -> dict[str, Any]:
        """Put these QUEUED states back to PENDING, in one transaction, re-checking each is still QUEUED
        and older than `older_than_seconds` (a state the orchestrator moved meanwhile is left alone).
        The reason goes into each state's meta (`requeued`) and, where the audit table has a `reason`
        column, into the transitions this recorded (through the `runbook.transition_reason` setting the
        audit trigger reads, or written after it where the trigger does not read it). Returns the states reset and where the reason went."""
        with self.connect(autocommit=False) as conn:
            try:
                # The audit trigger (runbook_sandbox/sql/007) records this transaction's reason.
                conn.execute("SELECT set_config('runbook.transition_reason', %s, true)", (reason,))
                rows = conn.execute(
                    """
                    UPDATE public.workflow_states
                       SET status = 'PENDING', updated_at = now(),
                           meta = CASE WHEN jsonb_typeof(meta) = 'object' THEN meta ELSE '{}'::jsonb END
                                  || jsonb_build_object('requeued', jsonb_build_object(
                                         'at', now(), 'reason', %(reason)s::text, 'queued_since', updated_at))
                     WHERE id = ANY(%(ids)s::uuid[]) AND status = 'QUEUED'
                       AND updated_at < now() - make_interval(secs => %(age)s)
                    RETURNING id::text AS state_id, batch_id::text AS batch_id, item_id::text AS item_id, step_name
                    """,
                    {"ids": list(state_ids), "age": float(older_than_seconds), "reason": reason},
                ).fetchall()
                audited = conn.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = 'runbook' "
                    "AND table_name = 'workflow_state_transitions' AND column_name = 'reason'").fetchone() is not None
                if audited and rows:
                    conn.execute(
                        "UPDATE runbook.workflow_state_transitions SET reason = %s WHERE state_id = ANY(%s::uuid[]) "
                        "AND from_status = 'QUEUED' AND to_status = 'PENDING' AND reason IS NULL "
                        "AND at >= transaction_timestamp()", (reason, [r["state_id"] for r in rows]))
                conn.commit()
            except psycopg.Error as exc:
                conn.rollback()
                raise DatabaseError(f"requeueing the stuck states failed (nothing changed): {redact(str(exc).strip())}") from None
        return {"states": rows, "audit_reason": audited}

    def transition_reasons(self, state_ids: list[str]) -> list[dict[str, Any]]:
        """The audited QUEUED -> PENDING transitions of these states, with their reason."""
        return self.query(
            "SELECT state_id::text AS state_id, from_status::text AS from_status, to_status::text AS to_status, reason, at "
            "FROM runbook.workflow_state_transitions WHERE state_id = ANY(%s::uuid[]) AND reason IS NOT NULL ORDER BY at",
            (list(state_ids),))
