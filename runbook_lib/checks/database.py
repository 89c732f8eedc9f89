"""Checks of the pipeline's database: it connects (with DATABASE_URL, needing nothing else); the
Secret block's DSN reaches the same database; the schema contract (tables, columns, enum values, the
unique key the sequencer needs); pg_net; the trigger, its target and no secrets in clear in its
function. The schema checks read database.connect's connection, so neither a Prefect outage nor a
broken block hides the schema's state."""

from __future__ import annotations

import re

from runbook_lib.checks.base import Fail, Outcome, Skip, check, ok, warn
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import RunbookError
from runbook_lib.core.secrets import clear_text_secrets
from runbook_lib.systems.database import TRIGGER_FUNCTION, TRIGGER_NAME

# The schema contract (shared/contract.md, "Database"): tables with the columns the pipeline uses.
CONTRACT_TABLES: dict[str, tuple[str, ...]] = {
    "clients": ("id", "company_name", "company_domain", "created_at"),
    "batches": ("id", "status", "blueprint", "client_id", "workstream_slug", "created_at"),
    "batch_items": ("id", "batch_id", "company_name", "company_domain", "company_linkedin_url", "person_first_name",
                    "person_last_name", "person_linkedin_url", "person_title", "original_data", "raw_data"),
    "workflow_states": ("id", "batch_id", "item_id", "step_name", "status", "updated_at", "advanced_at", "meta"),
    "enrichment_registry": ("id", "slug", "workstream_slug", "name", "type", "modal_sender_fn", "modal_receiver_fn",
                            "requires_clay"),
    "enrichment_results": ("id", "batch_item_id", "workflow_slug", "workstream_slug", "data", "created_at"),
    "client_workflow_configs": ("client_id", "workflow_slug", "workstream_slug", "config"),
}
CONTRACT_ENUMS: dict[str, tuple[str, ...]] = {
    "batchstatus": ("INITIALIZING", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED"),
    "workflowstatus": ("PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"),
    "enrichmenttype": ("SYNC", "ASYNC"),
}
ENUM_COLUMNS = {("batches", "status"): "batchstatus", ("workflow_states", "status"): "workflowstatus",
                ("enrichment_registry", "type"): "enrichmenttype"}
UNIQUE_STATE_KEY = ("batch_id", "item_id", "step_name")
TRIGGER_SQL = (
    f"CREATE TRIGGER {TRIGGER_NAME} AFTER UPDATE ON public.batches FOR EACH ROW "
    f"WHEN (OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING') EXECUTE FUNCTION {TRIGGER_FUNCTION}();"
)
_URL_IN_SQL = re.compile(r"'(https?://[^'\s]+)'")


@check("database.connect", "The pipeline's database connects",
       proves="the database connects with DATABASE_URL (needing nothing else); without DATABASE_URL, with the "
              "Secret block's DSN")
def connect(facts: Facts) -> Outcome:
    try:
        db, via = facts.database()
    except (Skip, Fail):
        raise
    except RunbookError as exc:
        via = "DATABASE_URL" if facts.settings.value("database.url") else \
            f"the DSN of Secret block {facts.settings.blocks.database_url!r}"
        raise Fail(
            f"the database does not connect with {via}: {exc}",
            "check that the database is up and reachable from here, and that "
            + (f"DATABASE_URL is right ({facts.where('database.url')})" if via == "DATABASE_URL" else
               f"Secret block {facts.settings.blocks.database_url!r} holds a DSN that connects")
            + " (Supabase: Project Settings, Database, Connection string; the session pooler URL where IPv6 is "
            "not available)",
        ) from None
    return ok(f"connected to {db.where} with {via} (PostgreSQL {db.server_version()})")


@check("database.block_dsn", "The Secret block's DSN reaches the same database",
       proves="the DSN in the Secret block the orchestrator loads connects, to the database DATABASE_URL names "
              "(needs both the block and the database)")
def block_dsn(facts: Facts) -> Outcome:
    block = facts.settings.blocks.database_url
    env_db, via = facts.database_for()
    if via != "DATABASE_URL":
        return ok(f"DATABASE_URL is not set: database.connect connected with the DSN of Secret block {block!r}")
    fix = (f"update Secret block {block!r} with the DSN of the pipeline's database (Supabase: Project Settings, "
           "Database, Connection string; the session pooler URL where IPv6 is not available)")
    try:
        block_db = facts.block_database()
    except Skip:
        raise
    except RunbookError as exc:
        raise Fail(f"the DSN of Secret block {block!r} does not connect: {exc}", fix) from None
    ours, theirs = env_db.identity(), block_db.identity()
    if ours != theirs:
        raise Fail(
            f"the DSN of Secret block {block!r} reaches database {theirs[0]!r} at {block_db.where}, not the one of "
            f"DATABASE_URL ({ours[0]!r} at {env_db.where}): the orchestrator would work on another database than "
            "the one the runbook checks",
            fix + ", or correct DATABASE_URL",
        )
    return ok(f"connects to {block_db.where}, the database of DATABASE_URL ({ours[0]!r})")


@check("database.tables", "Contract tables and columns",
       proves="the contract's tables exist with every column the orchestrator's queries use",
       remediation="apply the pipeline's schema (the contract's tables and columns) to this database before deploying")
def tables(facts: Facts) -> Outcome:
    db, via = facts.schema_database()
    have = db.columns(CONTRACT_TABLES)
    problems = [f"table public.{t} is missing" for t in CONTRACT_TABLES if t not in have]
    problems += [f"public.{t} lacks column(s) {', '.join(c for c in cols if c not in have[t])}"
                 for t, cols in CONTRACT_TABLES.items() if t in have and not set(cols) <= have[t]]
    if problems:
        raise Fail("; ".join(problems) + f" (checked with {via})",
                   "apply the pipeline's schema (the contract's tables and columns) to this database "
                   "before deploying: the orchestrator's queries use every one of them")
    return ok(f"{len(CONTRACT_TABLES)} tables with their columns (checked with {via})")


@check("database.enums", "Contract enum values",
       proves="the enums hold the contract's values (INITIALIZING included) and the status columns use them")
def enums(facts: Facts) -> Outcome:
    db, via = facts.schema_database()
    labels = db.enum_labels(CONTRACT_ENUMS)
    problems, fixes = [], []
    for enum, wanted in CONTRACT_ENUMS.items():
        if enum not in labels:
            problems.append(f"enum {enum} is missing")
            fixes.append(f"CREATE TYPE public.{enum} AS ENUM ({', '.join(repr(v) for v in wanted)});")
            continue
        for value in wanted:
            if value not in labels[enum]:
                problems.append(f"{enum} lacks {value}")
                fixes.append(f"ALTER TYPE public.{enum} ADD VALUE '{value}';")
    for (table, column), type_name in db.column_types(ENUM_COLUMNS).items():
        wanted_type = ENUM_COLUMNS[(table, column)]
        if type_name != wanted_type:
            problems.append(f"{table}.{column} is {type_name}, not {wanted_type}")
    if problems:
        why = (" (without INITIALIZING the admin UI cannot insert a batch before its items, and the trigger, "
               "which fires on INITIALIZING -> PENDING, never fires)"
               if any("INITIALIZING" in p for p in problems) else "")
        raise Fail("; ".join(problems) + why + f" (checked with {via})",
                   "bring the enums to the contract: " + (" ".join(fixes) or "fix the column types named above"))
    return ok("; ".join(f"{e}: {', '.join(v)}" for e, v in labels.items()))


@check("database.unique_constraint", "Unique (batch_id, item_id, step_name)",
       proves="workflow_states has the unique key the sequencer's ON CONFLICT needs")
def unique_constraint(facts: Facts) -> Outcome:
    db, via = facts.schema_database()
    if any(sorted(cols) == sorted(UNIQUE_STATE_KEY) for cols in db.unique_keys("public.workflow_states")):
        return ok("public.workflow_states has it")
    raise Fail(
        "public.workflow_states has no unique constraint on (batch_id, item_id, step_name): the sequencer's "
        "INSERT ... ON CONFLICT (batch_id, item_id, step_name) DO NOTHING fails, and items could get a step twice"
        f" (checked with {via})",
        "ALTER TABLE public.workflow_states ADD CONSTRAINT workflow_states_batch_item_step_key "
        "UNIQUE (batch_id, item_id, step_name);",
    )


@check("database.pg_net", "pg_net present", proves="the net schema and net.http_post (pg_net) exist")
def pg_net(facts: Facts) -> Outcome:
    db, _ = facts.schema_database()
    schema = db.has_schema("net")
    if not schema or not db.http_post_available():
        raise Fail(
            "pg_net is not installed: " + ("there is no net schema" if not schema else "net.http_post(url, body, "
            "params, headers, timeout_milliseconds) does not exist") + ", so the trigger cannot call the Edge Function",
            "enable pg_net: `CREATE EXTENSION IF NOT EXISTS pg_net;` (Supabase: Database, Extensions, pg_net)",
        )
    return ok("the net schema and net.http_post exist")


@check("database.trigger", f"Trigger {TRIGGER_NAME}",
       proves="the trigger exists, is enabled and fires on the INITIALIZING -> PENDING update of a batch")
def trigger(facts: Facts) -> Outcome:
    info = facts.trigger()
    if info is None:
        raise Fail(f"trigger {TRIGGER_NAME} is not on public.batches: no batch would ever start a flow run",
                   f"create it (after {TRIGGER_FUNCTION}()): {TRIGGER_SQL}")
    if not info.enabled:
        raise Fail(f"trigger {TRIGGER_NAME} is disabled: no batch would start a flow run",
                   f"ALTER TABLE public.batches ENABLE TRIGGER {TRIGGER_NAME};")
    if not info.fires_on_initializing_to_pending:
        raise Fail(f"trigger {TRIGGER_NAME} does not fire on the INITIALIZING -> PENDING update: {info.definition}",
                   f"DROP TRIGGER {TRIGGER_NAME} ON public.batches; then {TRIGGER_SQL}")
    return ok(f"AFTER UPDATE, WHEN OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING', calls {info.function}")


def _existing_trigger(facts: Facts):
    info = facts.need(facts.trigger, "database.trigger", f"trigger {TRIGGER_NAME}")
    if info is None:
        raise Skip(f"trigger {TRIGGER_NAME} does not exist (see database.trigger)")
    return info


@check("database.trigger_target", "Trigger posts to the Edge Function",
       proves="the trigger's function calls net.http_post with the configured Edge Function URL")
def trigger_target(facts: Facts) -> Outcome:
    info = _existing_trigger(facts)
    url = facts.settings.supabase.edge_function_url
    if not url:
        raise Fail("the Edge Function URL is not set, so the trigger's target cannot be verified",
                   facts.where("supabase.edge_function_url"))
    if "net.http_post" not in info.function_source:
        raise Fail(f"{info.function} does not call net.http_post",
                   f"re-create {TRIGGER_FUNCTION}() so that it posts {{\"batch_id\": NEW.id}} to {url} with net.http_post")
    if not info.posts_to(url):
        found = _URL_IN_SQL.findall(info.function_source)
        raise Fail(
            f"{info.function} posts to {', '.join(found) or 'a URL that is not a literal'}, not to the configured "
            f"Edge Function {url}",
            f"re-create {TRIGGER_FUNCTION}() with url := '{url}' (CREATE OR REPLACE FUNCTION ...), or correct "
            f"the Edge Function URL setting ({facts.where('supabase.edge_function_url')})",
        )
    return ok(f"net.http_post to {url}")


@check("database.trigger_secrets", "No secrets in clear in the trigger function",
       proves="the trigger's function holds no credential in clear but the (public) anon key")
def trigger_secrets(facts: Facts) -> Outcome:
    info = _existing_trigger(facts)
    anon = facts.settings.supabase.anon_key
    found = clear_text_secrets(info.function_source, facts.settings.secret_values(), (anon,) if anon else ())
    if found:
        return warn(
            f"{info.function}'s source holds {', '.join(found)} in clear: anyone who can read the schema "
            "(pg_get_functiondef) can read it",
            "keep only the anon key (public by design) in the function; read anything else from Supabase Vault "
            "(vault.decrypted_secrets), and rotate the credential that was exposed",
            found=found,
        )
    public = " (the anon key there is public by design)" if anon and anon in info.function_source else ""
    return ok(f"no credential found in {info.function}{public}")


DATABASE = [connect, block_dsn, tables, enums, unique_constraint, pg_net, trigger, trigger_target, trigger_secrets]
