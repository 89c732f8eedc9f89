"""Step 01: every prerequisite of the deployment, checked before anything is changed (reads only).

Groups, one notebook cell each: local tools, Prefect (API, work pool), Secret blocks, database
(schema contract, trigger, pg_net, secrets in clear in the trigger), repository (URL, branch,
entrypoint, `@flow`, parameters), packages (`pip_packages` against the flow's imports) and the
Edge Function's secrets. Every check runs whatever failed before it (one failure never hides the
others); a check that needs what a failed check could not provide is skipped and names it. Each
FAIL carries a remediation saying what to do. `run_all(ctx)` runs every group; the notebook then
records the report, which fails the step naming every failed check.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
import shutil
import subprocess
import sys
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from packaging.utils import canonicalize_name

from runbook_lib.checks.base import Check, CheckReport
from runbook_lib.systems.database import TRIGGER_FUNCTION, TRIGGER_NAME, Database
from runbook_lib.core.errors import FlowSourceError, PrefectApiError, RunbookError, SupabaseApiError
from runbook_lib.source.flow import FlowInfo, analyse_flow, local_top_level_names, parse, repository_imports
from runbook_lib.systems.git import GitRepo
from runbook_lib.source.packages import missing_imports, parse_requirement, redundant_packages, validate_requirements
from runbook_lib.systems.prefect import PrefectApi
from runbook_lib.core.settings import BLOCK_VALUE_SETTINGS, SETTING_ENV, RunbookSettings
from runbook_lib.systems.supabase import SupabaseManagementApi

STEP = "01_verify_prerequisites"

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

# Credentials recognisable by their shape (the anon JWT is public and not among them).
_TOKEN_PATTERNS = (
    (re.compile(r"\bsbp_[A-Za-z0-9]{20,}"), "a Supabase access token (sbp_...)"),
    (re.compile(r"\bpnu_[A-Za-z0-9]{20,}"), "a Prefect API key (pnu_...)"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), "a GitHub token"),
    (re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]+:[^\s@/'\"]+@"), "a URL with a password"),
    (re.compile(r"(?i)\bpassword\s*(?::=|=|:)\s*'[^']+'"), "a password literal"),
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}")
_URL_IN_SQL = re.compile(r"'(https?://[^'\s]+)'")


class _Skip(Exception):
    """The check cannot run: something it needs failed in another check (named in the message)."""


class _Fail(RunbookError):
    """A failed check with its own remediation (instead of the check's default one)."""

    def __init__(self, detail: str, remediation: str, **data: Any):
        super().__init__(detail)
        self.remediation = remediation
        self.data = data


# -- pure checks (also used directly by tests) -----------------------------------------------------


def normalise_repo_url(url: str) -> tuple[str, bool]:
    """(the URL flow.from_source treats as a git repository, whether `.git` had to be added).

    Prefect 3.9's `from_source` clones only URLs ending in `.git` (or git scheme / ssh); a plain
    `https://github.com/owner/repo` goes to fsspec remote storage and the deploy fails."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url, False
    path = parts.path.rstrip("/")
    if path.endswith(".git"):
        return urlunsplit(parts._replace(path=path)), False
    return urlunsplit(parts._replace(path=path + ".git")), True


def _jwt_role(token: str) -> str | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return claims.get("role") if isinstance(claims, dict) else None


def clear_text_secrets(source: str, known: dict[str, str] | None = None, public: tuple[str, ...] = ()) -> list[str]:
    """What secrets a SQL function's source holds in clear, described (never the values).

    JWTs other than anon ones (service_role, ...), sbp_/pnu_/GitHub tokens, URLs with a password,
    password literals, and any of the `known` secret values (label -> value). `public` values
    (the anon key) are allowed: Supabase ships them to browsers by design."""
    found: list[str] = []
    for token in _JWT.findall(source):
        if token in public:
            continue
        role = _jwt_role(token)
        if role != "anon":
            found.append(f"a JWT with role {role!r}" if role else "a JWT that is not the anon key")
    for pattern, what in _TOKEN_PATTERNS:
        if pattern.search(source):
            found.append(what)
    for label, value in (known or {}).items():
        if value and len(value) >= 8 and value in source:
            found.append(f"the value of {label}")
    return list(dict.fromkeys(found))


# -- the step ---------------------------------------------------------------------------------------


class Prerequisites:
    """The checks of step 01, grouped; each group method adds its checks to `report` and returns them.

    Groups may run in any order: what one needs from another (the Prefect client, the DSN of the
    Secret block, the repository's files) is computed once, on first use, and shared."""

    def __init__(self, settings: RunbookSettings, step: str = STEP):
        self.settings = settings
        self.report = CheckReport(step=step)
        self._facts: dict[str, tuple[bool, Any]] = {}

    @classmethod
    def for_step(cls, ctx: Any) -> "Prerequisites":
        return cls(ctx.settings, ctx.name)

    def groups(self) -> list[Callable[[], CheckReport]]:
        return [self.local, self.prefect, self.secret_blocks, self.database, self.repository, self.packages,
                self.edge_function]

    def run_all(self) -> CheckReport:
        for group in self.groups():
            group()
        return self.report

    # -- plumbing ---------------------------------------------------------------------------------
    def _check(self, id: str, title: str, probe: Callable[[], Check], remediation: str = "") -> Check:
        try:
            check = probe()
        except _Skip as skip:
            check = Check.skipped(id, title, f"skipped: {skip}")
        except _Fail as exc:
            check = Check.failed(id, title, str(exc), exc.remediation, **exc.data)
        except RunbookError as exc:
            check = Check.failed(id, title, str(exc), remediation)
        except Exception as exc:  # an unexpected error is still a failed check, with its type
            check = Check.failed(id, title, f"{type(exc).__name__}: {exc}", remediation)
        self.report.checks = [c for c in self.report.checks if c.id != id]  # a re-run cell replaces its checks
        return self.report.add(check)

    def _group(self, checks: list[Check]) -> CheckReport:
        return CheckReport(step=self.report.step, checks=checks)

    def _fact(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once; its value, or the exception it raised, again on every later call."""
        if name not in self._facts:
            try:
                self._facts[name] = (True, compute())
            except Exception as exc:
                self._facts[name] = (False, exc)
        ok, value = self._facts[name]
        if ok:
            return value
        raise value

    @staticmethod
    def _need(fact: Callable[[], Any], check_id: str, what: str) -> Any:
        """A fact another check owns: its failure makes the calling check a skip naming that check."""
        try:
            return fact()
        except _Skip:
            raise
        except Exception:
            raise _Skip(f"needs {what}, which check {check_id} could not establish") from None

    def _where(self, path: str) -> str:
        return self.settings.where_to_set(path)

    # -- local --------------------------------------------------------------------------------------
    def local(self) -> CheckReport:
        """This machine: Python (3.14 warned), prefect, git."""
        runtime = self.settings.deployment.runtime_python
        return self._group([
            self._check("local.python", "Python version", lambda: self._python(runtime)),
            self._check("local.prefect", "Prefect installed (3.x)", self._prefect_version,
                        'install the project\'s requirements: `pip install -r requirements.txt` (prefect 3.x)'),
            self._check("local.git", "git available", self._git_version,
                        "install git (Debian/Ubuntu: `apt-get install git`; macOS: `xcode-select --install`)"),
        ])

    @staticmethod
    def _python(runtime: str) -> Check:
        here = ".".join(map(str, sys.version_info[:3]))
        if sys.version_info[:2] >= (3, 14):
            return Check.warned(
                "local.python", "Python version",
                f"Python {here} here; the managed runtime image runs Python {runtime}. On 3.14 some of the flow's "
                "packages may have no wheels yet, and Prefect's sync-looking calls (from_source, deploy, Secret.load) "
                "return coroutines inside a notebook kernel: the deploy and the runtime would not behave alike",
                f"run the runbook with Python {runtime}, the runtime's version (e.g. `uv venv --python {runtime}` or "
                f"`python{runtime} -m venv .venv`), so what passes here also imports in the runtime",
                python=here, runtime_python=runtime,
            )
        note = "the same version" if f"{sys.version_info[0]}.{sys.version_info[1]}" == runtime else f"Python {runtime}"
        return Check.passed("local.python", "Python version",
                            f"Python {here} here; the managed runtime image runs {note}", python=here, runtime_python=runtime)

    @staticmethod
    def _prefect_version() -> Check:
        try:
            import prefect
        except ImportError as exc:
            raise RunbookError(f"prefect is not importable: {exc}") from None
        version = prefect.__version__
        major = int(re.match(r"\d+", version).group()) if re.match(r"\d+", version) else 0
        if major < 3:
            raise RunbookError(f"prefect {version} is installed; the runbook deploys with Prefect 3 (flow.from_source)")
        return Check.passed("local.prefect", "Prefect installed (3.x)", f"prefect {version}", version=version)

    @staticmethod
    def _git_version() -> Check:
        git = shutil.which("git")
        if not git:
            raise RunbookError("the git command is not on PATH (the runbook reads and merges the flow's repository with it)")
        out = subprocess.run([git, "--version"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RunbookError(f"`git --version` failed: {out.stderr.strip()}")
        return Check.passed("local.git", "git available", out.stdout.strip(), path=git)

    # -- Prefect ------------------------------------------------------------------------------------
    def _api(self) -> PrefectApi:
        def connect() -> PrefectApi:
            api = PrefectApi.from_settings(self.settings, call_timeout=60)
            api.check_access()
            return api
        return self._fact("prefect_api", connect)

    def _api_remediation(self, exc: Exception) -> str:
        status = getattr(exc, "status", None)
        if status in (401, 403):
            return (f"set PREFECT_API_KEY to a valid key with access to this workspace (Prefect Cloud: your profile, "
                    f"API keys); {self._where('prefect.api_key')}")
        if status == 404:
            return (f"check PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID (or PREFECT_API_URL): they must name the "
                    f"workspace of the deployment; {self._where('prefect.api_url')}")
        if isinstance(exc, PrefectApiError):
            return f"check that PREFECT_API_URL is right and reachable from here; {self._where('prefect.api_url')}"
        return "set the missing settings named above"

    def _pool(self) -> Any:
        api = self._need(self._api, "prefect.api", "the Prefect API")
        name = self.settings.deployment.work_pool

        def read() -> Any:
            pool = api.read_work_pool(name)
            if pool is None:
                raise _Fail(
                    f"work pool {name!r} does not exist in the workspace",
                    f"create it: `prefect work-pool create {name} --type {self.settings.deployment.work_pool_type}` "
                    f"(Prefect Cloud), or set deployment.work_pool to an existing pool ({self._where('deployment.work_pool')})",
                )
            return pool
        return self._fact("work_pool", read)

    def prefect(self) -> CheckReport:
        """The API answers with the key; the work pool exists, has the expected type, runs, offers pip_packages."""
        d = self.settings.deployment

        def api_check() -> Check:
            try:
                self._api()
            except RunbookError as exc:
                raise _Fail(str(exc), self._api_remediation(exc)) from None
            return Check.passed("prefect.api", "Prefect API reachable and authenticated",
                                f"{self.settings.value('prefect.api_url')} accepted the API key")

        def pool_check() -> Check:
            pool = self._pool()
            return Check.passed("prefect.work_pool", f"Work pool {d.work_pool!r} exists", f"type {pool.type}, id {pool.id}")

        def pool_for() -> Any:
            return self._need(self._pool, "prefect.work_pool", f"work pool {d.work_pool!r}")

        def type_check() -> Check:
            pool = pool_for()
            if pool.type != d.work_pool_type:
                raise _Fail(
                    f"work pool {d.work_pool!r} has type {pool.type!r}, not {d.work_pool_type!r}: its workers would "
                    "not run the deployment as planned (a Prefect Managed pool installs pip_packages at run start)",
                    f"deploy to a pool of type {d.work_pool_type!r} (create one: `prefect work-pool create <name> --type "
                    f"{d.work_pool_type}`, then set deployment.work_pool), or correct deployment.work_pool_type if "
                    f"{pool.type!r} is intended ({self._where('deployment.work_pool_type')})",
                )
            return Check.passed("prefect.work_pool_type", "Work pool type", f"{pool.type}", type=pool.type)

        def paused_check() -> Check:
            pool = pool_for()
            if pool.is_paused:
                raise _Fail(
                    f"work pool {d.work_pool!r} is paused: flow runs of the deployment would stay Scheduled, then Late, "
                    "and no batch would ever be processed",
                    f"resume it: `prefect work-pool resume {d.work_pool}` (or Resume in the Prefect UI, Work Pools)",
                )
            status = getattr(pool.status, "value", pool.status)
            return Check.passed("prefect.work_pool_active", "Work pool not paused", f"not paused (status {status})")

        def pip_check() -> Check:
            pool = pool_for()
            props = ((pool.base_job_template or {}).get("variables") or {}).get("properties") or {}
            if "pip_packages" not in props:
                raise _Fail(
                    f"the base job template of work pool {d.work_pool!r} offers no pip_packages variable "
                    f"(it offers: {', '.join(sorted(props)) or 'nothing'}): the deployment's pip_packages would be "
                    "ignored and the flow's imports would fail at run start",
                    "use a prefect:managed pool (its default template offers pip_packages), or add a pip_packages "
                    "variable to this pool's base job template (Prefect UI: Work Pools, Edit, Base Job Template)",
                )
            return Check.passed("prefect.work_pool_pip_packages", "Work pool offers pip_packages",
                                f"job variables offered: {', '.join(sorted(props))}")

        return self._group([
            self._check("prefect.api", "Prefect API reachable and authenticated", api_check),
            self._check("prefect.work_pool", f"Work pool {d.work_pool!r} exists", pool_check),
            self._check("prefect.work_pool_type", "Work pool type", type_check),
            self._check("prefect.work_pool_active", "Work pool not paused", paused_check),
            self._check("prefect.work_pool_pip_packages", "Work pool offers pip_packages", pip_check),
        ])

    # -- Secret blocks ------------------------------------------------------------------------------
    def _block_dsn(self) -> str:
        name = self.settings.blocks.database_url

        def read() -> str:
            api = self._need(self._api, "prefect.api", "the Prefect API")
            remediation = (
                f"create the Secret block {name!r} holding the database DSN (the runbook's secret-blocks step writes it "
                f"from DATABASE_URL; by hand: `Secret(value=<dsn>).save({name!r}, overwrite=True)`)"
            )
            value = api.read_secret_value(name)  # registered for redaction as soon as it is read
            if value is None:
                raise _Fail(f"Secret block {name!r} does not exist: the orchestrator loads its DSN from it", remediation)
            if not value.strip():
                raise _Fail(f"Secret block {name!r} is empty", remediation)
            if urlsplit(value.strip()).scheme not in ("postgresql", "postgres"):
                raise _Fail(f"Secret block {name!r} does not hold a PostgreSQL URL (postgresql://...)", remediation)
            return value.strip()
        return self._fact("block_dsn", read)

    def secret_blocks(self) -> CheckReport:
        """The DSN block exists and is not empty; every block the job variables refer to exists."""
        name = self.settings.blocks.database_url
        referenced = self.settings.deployment.referenced_secret_blocks()

        def dsn_check() -> Check:
            self._block_dsn()
            return Check.passed("blocks.database_url", f"Secret block {name!r}", "exists and holds a PostgreSQL URL (value hidden)")

        def referenced_check() -> Check:
            if not referenced:
                return Check.passed("blocks.referenced", "Secret blocks of the job variables", "the job variables refer to no Secret block")
            api = self._need(self._api, "prefect.api", "the Prefect API")
            missing = [b for b in referenced if api.read_secret_block(b) is None]
            if missing:
                sources = {getattr(self.settings.blocks, role): SETTING_ENV[path] for role, path in BLOCK_VALUE_SETTINGS.items()}
                how = "; ".join(f"{b} from {sources[b]}" if b in sources else b for b in missing)
                raise _Fail(
                    f"the deployment's job_variables.env refers to {', '.join('{{ prefect.blocks.secret.%s }}' % b for b in missing)}, "
                    f"but no such Secret block exists: every run would CRASH at submission",
                    f"create the Secret block(s) ({how}) with the runbook's secret-blocks step or "
                    "`Secret(value=...).save(<name>)`, or remove the placeholder from deployment.env",
                    missing=missing,
                )
            return Check.passed("blocks.referenced", "Secret blocks of the job variables",
                                f"all exist: {', '.join(referenced)}", blocks=referenced)

        return self._group([
            self._check("blocks.database_url", f"Secret block {name!r}", dsn_check),
            self._check("blocks.referenced", "Secret blocks of the job variables", referenced_check),
        ])

    # -- database -----------------------------------------------------------------------------------
    def _block_database(self) -> Database:
        dsn = self._need(self._block_dsn, "blocks.database_url",
                         f"the DSN of Secret block {self.settings.blocks.database_url!r}")

        def connect() -> Database:
            db = Database(dsn)
            db.server_version()
            return db
        return self._fact("block_database", connect)

    def _schema_database(self) -> tuple[Database, str]:
        """The block's database when it connects, else DATABASE_URL's: the schema checks still run."""
        try:
            return self._block_database(), f"the DSN of Secret block {self.settings.blocks.database_url!r}"
        except Exception:
            pass
        if not self.settings.value("database.url"):
            raise _Skip("no usable database connection: the Secret block's DSN is unusable (database.connect) and DATABASE_URL is not set")

        def connect() -> Database:
            db = Database.from_settings(self.settings)
            db.server_version()
            return db
        return self._need(lambda: self._fact("env_database", connect), "database.connect", "a database connection"), "DATABASE_URL"

    def database(self) -> CheckReport:
        """The block's DSN connects; the schema contract, trigger, pg_net; no secrets in clear in the trigger."""
        block = self.settings.blocks.database_url

        def connect_check() -> Check:
            try:
                db = self._block_database()
            except _Skip:
                raise
            except RunbookError as exc:
                raise _Fail(
                    f"the DSN of Secret block {block!r} does not connect: {exc}",
                    f"update Secret block {block!r} with a DSN that connects (Supabase: Project Settings, Database, "
                    "Connection string; the session pooler URL where IPv6 is not available)",
                ) from None
            return Check.passed("database.connect", "The Secret block's DSN connects",
                                f"connected to {db.where} (PostgreSQL {db.server_version()})")

        def tables_check() -> Check:
            db, via = self._schema_database()
            rows = db.query(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name = ANY(%s)", (list(CONTRACT_TABLES),),
            )
            have: dict[str, set[str]] = {}
            for r in rows:
                have.setdefault(r["table_name"], set()).add(r["column_name"])
            problems = [f"table public.{t} is missing" for t in CONTRACT_TABLES if t not in have]
            problems += [f"public.{t} lacks column(s) {', '.join(c for c in cols if c not in have[t])}"
                         for t, cols in CONTRACT_TABLES.items() if t in have and not set(cols) <= have[t]]
            if problems:
                raise _Fail("; ".join(problems) + f" (checked with {via})",
                            "apply the pipeline's schema (the contract's tables and columns) to this database "
                            "before deploying: the orchestrator's queries use every one of them")
            return Check.passed("database.tables", "Contract tables and columns",
                                f"{len(CONTRACT_TABLES)} tables with their columns (checked with {via})")

        def enums_check() -> Check:
            db, via = self._schema_database()
            rows = db.query(
                "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                "WHERE t.typname = ANY(%s) ORDER BY t.typname, e.enumsortorder", (list(CONTRACT_ENUMS),),
            )
            labels: dict[str, list[str]] = {}
            for r in rows:
                labels.setdefault(r["typname"], []).append(r["enumlabel"])
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
            columns = db.query(
                "SELECT table_name, column_name, udt_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND (table_name, column_name) IN (('batches','status'), ('workflow_states','status'), ('enrichment_registry','type'))"
            )
            for r in columns:
                wanted_type = ENUM_COLUMNS[(r["table_name"], r["column_name"])]
                if r["udt_name"] != wanted_type:
                    problems.append(f"{r['table_name']}.{r['column_name']} is {r['udt_name']}, not {wanted_type}")
            if problems:
                why = (" (without INITIALIZING the admin UI cannot insert a batch before its items, and the trigger, "
                       "which fires on INITIALIZING -> PENDING, never fires)"
                       if any("INITIALIZING" in p for p in problems) else "")
                raise _Fail("; ".join(problems) + why + f" (checked with {via})",
                            "bring the enums to the contract: " + (" ".join(fixes) or "fix the column types named above"))
            return Check.passed("database.enums", "Contract enum values",
                                "; ".join(f"{e}: {', '.join(v)}" for e, v in labels.items()))

        def unique_check() -> Check:
            db, via = self._schema_database()
            rows = db.query(
                """
                SELECT array_agg(a.attname::text ORDER BY a.attname) AS cols
                  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = to_regclass('public.workflow_states') AND i.indisunique AND i.indpred IS NULL
                 GROUP BY i.indexrelid
                """
            )
            if any(sorted(r["cols"]) == sorted(UNIQUE_STATE_KEY) for r in rows):
                return Check.passed("database.unique_constraint", "Unique (batch_id, item_id, step_name)",
                                    "public.workflow_states has it")
            raise _Fail(
                "public.workflow_states has no unique constraint on (batch_id, item_id, step_name): the sequencer's "
                "INSERT ... ON CONFLICT (batch_id, item_id, step_name) DO NOTHING fails, and items could get a step twice"
                f" (checked with {via})",
                "ALTER TABLE public.workflow_states ADD CONSTRAINT workflow_states_batch_item_step_key "
                "UNIQUE (batch_id, item_id, step_name);",
            )

        def pg_net_check() -> Check:
            db, via = self._schema_database()
            schema = db.query("SELECT to_regnamespace('net') IS NOT NULL AS ok")[0]["ok"]
            if not schema or not db.http_post_available():
                raise _Fail(
                    "pg_net is not installed: " + ("there is no net schema" if not schema else "net.http_post(url, body, "
                    "params, headers, timeout_milliseconds) does not exist") + ", so the trigger cannot call the Edge Function",
                    "enable pg_net: `CREATE EXTENSION IF NOT EXISTS pg_net;` (Supabase: Database, Extensions, pg_net)",
                )
            return Check.passed("database.pg_net", "pg_net present", "the net schema and net.http_post exist")

        trigger_sql = (
            f"CREATE TRIGGER {TRIGGER_NAME} AFTER UPDATE ON public.batches FOR EACH ROW "
            f"WHEN (OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING') EXECUTE FUNCTION {TRIGGER_FUNCTION}();"
        )

        def trigger_info() -> Any:
            db, _ = self._schema_database()
            return db.trigger()

        def trigger_check() -> Check:
            info = self._fact("trigger", trigger_info)
            if info is None:
                raise _Fail(f"trigger {TRIGGER_NAME} is not on public.batches: no batch would ever start a flow run",
                            f"create it (after {TRIGGER_FUNCTION}()): {trigger_sql}")
            if not info.enabled:
                raise _Fail(f"trigger {TRIGGER_NAME} is disabled: no batch would start a flow run",
                            f"ALTER TABLE public.batches ENABLE TRIGGER {TRIGGER_NAME};")
            if not info.fires_on_initializing_to_pending:
                raise _Fail(f"trigger {TRIGGER_NAME} does not fire on the INITIALIZING -> PENDING update: {info.definition}",
                            f"DROP TRIGGER {TRIGGER_NAME} ON public.batches; then {trigger_sql}")
            return Check.passed("database.trigger", f"Trigger {TRIGGER_NAME}",
                                f"AFTER UPDATE, WHEN OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING', calls {info.function}")

        def needs_trigger() -> Any:
            info = self._need(lambda: self._fact("trigger", trigger_info), "database.trigger", f"trigger {TRIGGER_NAME}")
            if info is None:
                raise _Skip(f"trigger {TRIGGER_NAME} does not exist (see database.trigger)")
            return info

        def target_check() -> Check:
            info = needs_trigger()
            url = self.settings.supabase.edge_function_url
            if not url:
                raise _Fail("the Edge Function URL is not set, so the trigger's target cannot be verified",
                            self._where("supabase.edge_function_url"))
            if "net.http_post" not in info.function_source:
                raise _Fail(f"{info.function} does not call net.http_post",
                            f"re-create {TRIGGER_FUNCTION}() so that it posts {{\"batch_id\": NEW.id}} to {url} with net.http_post")
            if not info.posts_to(url):
                found = _URL_IN_SQL.findall(info.function_source)
                raise _Fail(
                    f"{info.function} posts to {', '.join(found) or 'a URL that is not a literal'}, not to the configured "
                    f"Edge Function {url}",
                    f"re-create {TRIGGER_FUNCTION}() with url := '{url}' (CREATE OR REPLACE FUNCTION ...), or correct "
                    f"the Edge Function URL setting ({self._where('supabase.edge_function_url')})",
                )
            return Check.passed("database.trigger_target", "Trigger posts to the Edge Function", f"net.http_post to {url}")

        def secrets_check() -> Check:
            info = needs_trigger()
            anon = self.settings.supabase.anon_key
            found = clear_text_secrets(info.function_source, self.settings.secret_values(), (anon,) if anon else ())
            if found:
                return Check.warned(
                    "database.trigger_secrets", "No secrets in clear in the trigger function",
                    f"{info.function}'s source holds {', '.join(found)} in clear: anyone who can read the schema "
                    "(pg_get_functiondef) can read it",
                    "keep only the anon key (public by design) in the function; read anything else from Supabase Vault "
                    "(vault.decrypted_secrets), and rotate the credential that was exposed",
                    found=found,
                )
            public = " (the anon key there is public by design)" if anon and anon in info.function_source else ""
            return Check.passed("database.trigger_secrets", "No secrets in clear in the trigger function",
                                f"no credential found in {info.function}{public}")

        return self._group([
            self._check("database.connect", "The Secret block's DSN connects", connect_check),
            self._check("database.tables", "Contract tables and columns", tables_check),
            self._check("database.enums", "Contract enum values", enums_check),
            self._check("database.unique_constraint", "Unique (batch_id, item_id, step_name)", unique_check),
            self._check("database.pg_net", "pg_net present", pg_net_check),
            self._check("database.trigger", f"Trigger {TRIGGER_NAME}", trigger_check),
            self._check("database.trigger_target", "Trigger posts to the Edge Function", target_check),
            self._check("database.trigger_secrets", "No secrets in clear in the trigger function", secrets_check),
        ])

    # -- repository ---------------------------------------------------------------------------------
    def _repo_url(self) -> str:
        def normalise() -> str:
            self.settings.require("source.repo_url")
            url = self.settings.value("source.repo_url")
            parts = urlsplit(url)
            if parts.username or parts.password:
                raise _Fail(
                    "the repository URL carries credentials: they would be stored in the deployment for anyone to read",
                    f"remove them from the URL ({self._where('source.repo_url')}); the repository must be public",
                )
            return normalise_repo_url(url)[0]
        return self._fact("repo_url", normalise)

    def _refs(self) -> dict[str, str]:
        url = self._need(self._repo_url, "source.repo_url", "a usable repository URL")
        return self._fact("refs", lambda: GitRepo(url).ls_remote())  # anonymous, as the managed runtime clones

    def _files(self) -> dict[str, str]:
        refs = self._need(self._refs, "source.reachable", "the repository")
        branch = self.settings.source.branch
        if f"refs/heads/{branch}" not in refs:
            raise _Skip(f"branch {branch!r} does not exist (see source.branch)")
        url = self._repo_url()

        def read() -> dict[str, str]:
            with GitRepo(url) as repo:
                return repo.read_files(branch, ".py")
        return self._fact("files", read)

    def _entry_source(self) -> str:
        path = self.settings.source.entrypoint_path
        files = self._need(self._files, "source.entrypoint_file", f"the files of branch {self.settings.source.branch!r}")
        if path not in files:
            raise _Skip(f"{path} is not in the repository (see source.entrypoint_file)")
        return files[path]

    def _analysed_flow(self) -> FlowInfo:
        src = self.settings.source
        source = self._entry_source()
        return self._fact("flow", lambda: analyse_flow(source, src.entrypoint_function, src.entrypoint_path))

    def repository(self) -> CheckReport:
        """URL (with .git), public, branch, entrypoint file, @flow function, parameters."""
        src = self.settings.source
        branch = src.branch

        def url_check() -> Check:
            url = self._repo_url()
            given = self.settings.value("source.repo_url")
            if normalise_repo_url(given)[1]:
                return Check.warned(
                    "source.repo_url", "Repository URL ends in .git",
                    f"{given} does not end in .git; the runbook uses {url}. Without .git, flow.from_source treats an "
                    "https URL as fsspec remote storage instead of a git repository, and the deploy fails",
                    f"set the URL with .git: {url} ({self._where('source.repo_url')})", url=url,
                )
            return Check.passed("source.repo_url", "Repository URL ends in .git", url, url=url)

        def reachable_check() -> Check:
            self._need(self._repo_url, "source.repo_url", "a usable repository URL")
            try:
                refs = self._refs()
            except RunbookError as exc:
                raise _Fail(
                    f"{exc}",
                    "the managed runtime clones the repository without credentials: make it public (or fix the URL, "
                    f"{self._where('source.repo_url')})",
                ) from None
            heads = sum(1 for r in refs if r.startswith("refs/heads/"))
            return Check.passed("source.reachable", "Repository readable anonymously",
                                f"{heads} branch(es), read without credentials")

        def branch_check() -> Check:
            refs = self._need(self._refs, "source.reachable", "the repository")
            sha = refs.get(f"refs/heads/{branch}")
            if sha is None:
                heads = sorted(r.removeprefix("refs/heads/") for r in refs if r.startswith("refs/heads/"))
                raise _Fail(
                    f"branch {branch!r} does not exist in the repository (branches: {', '.join(heads) or 'none'})",
                    f"push the branch, or set source.branch to an existing one ({self._where('source.branch')})",
                    branches=heads,
                )
            return Check.passed("source.branch", f"Branch {branch!r} exists", f"at {sha[:12]}", sha=sha)

        def entrypoint_check() -> Check:
            try:
                files = self._files()
            except _Skip:
                raise
            except RunbookError as exc:
                raise _Fail(f"cannot read the files of branch {branch!r}: {exc}",
                            "check that the repository can be cloned anonymously") from None
            if src.entrypoint_path not in files:
                near = sorted(files)[:20]
                raise _Fail(
                    f"{src.entrypoint_path} does not exist at {branch!r} (Python files there: {', '.join(near) or 'none'})",
                    "set source.entrypoint to '<path from the repository root>:<function>' "
                    f"({self._where('source.entrypoint')}), or push the file to {branch!r}",
                )
            return Check.passed("source.entrypoint_file", "Entrypoint file exists", f"{src.entrypoint_path} at {branch!r}")

        def flow_check() -> Check:
            source = self._entry_source()
            try:
                info = self._analysed_flow()
            except FlowSourceError as exc:
                flows = _flows_in(source, src.entrypoint_path)
                raise _Fail(str(exc), f"set source.entrypoint to a @flow function ({', '.join(flows) or 'none in this file'}; "
                            f"{self._where('source.entrypoint')})") from None
            if not info.is_flow:
                flows = _flows_in(source, src.entrypoint_path)
                raise _Fail(
                    f"{src.entrypoint_function} (line {info.line}) is not decorated with @flow "
                    f"(decorators: {', '.join(info.decorators) or 'none'}): Prefect cannot deploy it",
                    f"point source.entrypoint at a @flow function ({', '.join(f'{src.entrypoint_path}:{f}' for f in flows) or 'none in this file'}; "
                    f"{self._where('source.entrypoint')}), or decorate {src.entrypoint_function} with @flow",
                    flows=flows,
                )
            return Check.passed("source.flow_function", "Entrypoint is a @flow",
                                f"{src.entrypoint_function} (line {info.line}) is a flow named {info.flow_name!r}",
                                flow_name=info.flow_name)

        def parameters_check() -> Check:
            info = self._need(self._analysed_flow, "source.flow_function", f"the analysis of {src.entrypoint_function}")
            if not info.is_flow:
                raise _Skip(f"{src.entrypoint_function} is not a flow (see source.flow_function)")
            wanted = self.settings.deployment.parameters
            names = [p.name for p in info.parameters]
            unknown = [k for k in wanted if k not in names]
            required = [p.name for p in info.parameters if p.required and p.name not in wanted]
            problems = []
            if unknown:
                problems.append(f"the deployment passes {', '.join(unknown)}, which {src.entrypoint_function}"
                                f"({', '.join(names)}) does not take: every run would fail validating its parameters")
            if required:
                problems.append(f"{src.entrypoint_function} requires {', '.join(required)}, which the deployment does not "
                                "pass (the Edge Function starts runs with no parameters)")
            if problems:
                raise _Fail("; ".join(problems),
                            "make deployment.parameters match the flow's signature "
                            f"({self._where('deployment.parameters')}), or give the flow's parameters defaults")
            shown = ", ".join(f"{k}={v!r}" for k, v in wanted.items()) or "none"
            return Check.passed("source.flow_parameters", "Flow takes the deployment's parameters",
                                f"deployment parameters {shown}; flow parameters: {', '.join(names) or 'none'}")

        return self._group([
            self._check("source.repo_url", "Repository URL ends in .git", url_check),
            self._check("source.reachable", "Repository readable anonymously", reachable_check),
            self._check("source.branch", f"Branch {branch!r} exists", branch_check),
            self._check("source.entrypoint_file", "Entrypoint file exists", entrypoint_check),
            self._check("source.flow_function", "Entrypoint is a @flow", flow_check),
            self._check("source.flow_parameters", "Flow takes the deployment's parameters", parameters_check),
        ])

    # -- packages -----------------------------------------------------------------------------------
    def packages(self) -> CheckReport:
        """pip_packages are valid requirements and cover every third-party import of the flow."""
        d = self.settings.deployment
        where = self._where("deployment.pip_packages")

        def requirements_check() -> Check:
            try:
                validate_requirements(d.pip_packages)
            except RunbookError as exc:
                raise _Fail(str(exc), f"fix deployment.pip_packages ({where})") from None
            redundant = redundant_packages(d.pip_packages, d.runtime_python)
            # Unpinned, an image package is a no-op for pip; prefect itself or a pinned one may change the image.
            risky = [r for r in redundant
                     if canonicalize_name(parse_requirement(r).name) == "prefect" or parse_requirement(r).specifier]
            if risky:
                return Check.warned(
                    "packages.requirements", "pip_packages are valid requirements",
                    f"{', '.join(risky)}: already in the managed runtime image (prefect and its dependencies); "
                    "listing it again may change the image's versions at every run start",
                    f"remove {', '.join(risky)} from deployment.pip_packages ({where})", redundant=risky,
                )
            also = f" ({', '.join(redundant)} also in the runtime image)" if redundant else ""
            return Check.passed("packages.requirements", "pip_packages are valid requirements",
                                (", ".join(d.pip_packages) or "no packages") + also)

        def imports_check() -> Check:
            try:
                validate_requirements(d.pip_packages)
            except RunbookError:
                raise _Skip("pip_packages are not valid requirements (see packages.requirements)") from None
            self._entry_source()
            files = self._files()
            entry = self.settings.source.entrypoint
            external, visited = repository_imports(files, entry)
            local = local_top_level_names(files, entry)
            missing = missing_imports([i.module for i in external], d.pip_packages, python=d.runtime_python, local_modules=local)
            if missing:
                add = [m.distribution for m in missing]
                raise _Fail(
                    "; ".join(f"import {m.module} is provided neither by the runtime image nor by pip_packages "
                              f"(add {m.distribution!r})" for m in missing)
                    + ": the run would crash at start with ModuleNotFoundError",
                    f"add {', '.join(repr(a) for a in add)} to deployment.pip_packages ({where})",
                    missing={m.module: m.distribution for m in missing},
                )
            names = sorted({i.module.split('.')[0] for i in external})
            return Check.passed("packages.imports", "The flow's imports are installed at run time",
                                f"{len(names)} top-level imports in {len(visited)} file(s) covered: {', '.join(names)}")

        return self._group([
            self._check("packages.requirements", "pip_packages are valid requirements", requirements_check),
            self._check("packages.imports", "The flow's imports are installed at run time", imports_check),
        ])

    # -- Edge Function ------------------------------------------------------------------------------
    def _supabase_secrets(self) -> set[str]:
        def read() -> set[str]:
            with SupabaseManagementApi.from_settings(self.settings, max_attempts=3, max_wait=10) as api:
                return {s.name for s in api.list_secrets()}
        return self._fact("supabase_secrets", read)

    def edge_function(self) -> CheckReport:
        """The Management API answers with the token; the function's PREFECT_* secrets exist (names only)."""
        wanted = self.settings.supabase.function_secrets
        function = self.settings.supabase.function_name

        def api_check() -> Check:
            try:
                names = self._supabase_secrets()
            except SupabaseApiError as exc:
                status = exc.status
                fix = {401: f"set SUPABASE_ACCESS_TOKEN to a valid personal access token; {self._where('supabase.access_token')}",
                       403: "use an access token of an account with access to this project",
                       404: f"check SUPABASE_PROJECT_REF; {self._where('supabase.project_ref')}"}.get(
                    status, f"check SUPABASE_API_URL and that the Management API is reachable; {self._where('supabase.api_url')}")
                raise _Fail(str(exc), fix) from None
            return Check.passed("supabase.api", "Supabase Management API reachable with the token",
                                f"{len(names)} secret(s) listed for project {self.settings.supabase.project_ref}")

        def secrets_check() -> Check:
            names = self._need(self._supabase_secrets, "supabase.api", "the project's secret names")
            missing = [n for n in wanted if n not in names]
            if missing:
                raise _Fail(
                    f"the Edge Function {function} reads {', '.join(wanted)}, but {', '.join(missing)} "
                    "is not set: it would answer 500 'Server configuration error' and start no flow run",
                    f"set {', '.join(missing)} (the runbook's Edge Function secrets step writes them; by hand: "
                    f"`supabase secrets set {missing[0]}=...`)",
                    missing=missing,
                )
            return Check.passed("supabase.function_secrets", "The Edge Function's secrets exist",
                                f"{', '.join(wanted)} are set (names checked; values are digests only)")

        return self._group([
            self._check("supabase.api", "Supabase Management API reachable with the token", api_check),
            self._check("supabase.function_secrets", "The Edge Function's secrets exist", secrets_check),
        ])


def _flows_in(source: str, path: str) -> list[str]:
    """Names of the module-level @flow functions of a file."""
    tree = parse(source, path)
    names = dict.fromkeys(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [n for n in names if analyse_flow(source, n, path).is_flow]


def run_all(ctx: Any) -> CheckReport:
    """Every check of step 01 for the step context `ctx` (its settings); the report, not yet recorded."""
    return Prerequisites.for_step(ctx).run_all()
