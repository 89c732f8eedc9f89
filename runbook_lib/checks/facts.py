"""The facts checks read from live systems, read once per step and shared by every check.

Each fact is computed on first use and memoised, its value or the exception it raised. A check
that needs a fact another check owns calls `facts.need(...)`: when that fact failed, the calling
check becomes a skip naming the owner ("needs the Prefect API, which check prefect.api could not
establish"), so one failure is reported once, where it happens. A fact needs only what it truly
reads: the database is reached with DATABASE_URL, without the Prefect API; only the comparison
of the Secret block's DSN with it (database.block_dsn) needs both.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from runbook_lib.checks.base import Fail, Skip
from runbook_lib.core import secrets
from runbook_lib.core.settings import RunbookSettings, is_secret_block_placeholder
from runbook_lib.source.flow import FlowInfo, analyse_flow
from runbook_lib.systems.database import Database
from runbook_lib.systems.git import GitRepo
from runbook_lib.systems.prefect import PrefectApi
from runbook_lib.systems.supabase import SupabaseManagementApi

T = TypeVar("T")

WITHHELD = "[plaintext secret withheld]"


class Facts:
    """Settings plus the memoised reads of one step's checks. `job_variables` and
    `missing_pool_template` let a step (the fallback) plan another pool than the profile's."""

    def __init__(self, settings: RunbookSettings, step: str = "", *, job_variables: dict[str, Any] | None = None,
                 missing_pool_template: dict[str, Any] | None = None):
        self.settings = settings
        self.step = step
        self._job_variables = job_variables
        self.missing_pool_template = missing_pool_template
        self._memo: dict[str, tuple[bool, Any]] = {}

    # -- plumbing ---------------------------------------------------------------------------------
    def fact(self, name: str, compute: Callable[[], T]) -> T:
        """`compute()` once; its value, or the exception it raised, again on every later call."""
        if name not in self._memo:
            try:
                self._memo[name] = (True, compute())
            except Exception as exc:
                self._memo[name] = (False, exc)
        ok, value = self._memo[name]
        if ok:
            return value
        raise value

    @staticmethod
    def need(fact: Callable[[], T], check_id: str, what: str) -> T:
        """A fact another check owns: its failure makes the calling check a skip naming that check."""
        try:
            return fact()
        except Skip:
            raise
        except Exception:
            raise Skip(f"needs {what}, which check {check_id} could not establish") from None

    def where(self, path: str) -> str:
        return self.settings.where_to_set(path)

    def close(self) -> None:
        ok, repo = self._memo.get("git", (False, None))
        if ok and repo is not None:
            repo.close()

    # -- Prefect ----------------------------------------------------------------------------------
    def prefect(self) -> PrefectApi:
        """A Prefect client that was let in (owned by check prefect.api)."""
        def connect() -> PrefectApi:
            self.settings.require("prefect.api_url", "prefect.api_key")
            api = PrefectApi.from_settings(self.settings, call_timeout=60)
            api.check_access()
            return api
        return self.fact("prefect", connect)

    def prefect_for(self, check_id: str = "prefect.api") -> PrefectApi:
        return self.need(self.prefect, check_id, "the Prefect API")

    def work_pool(self) -> Any:
        """The live work pool (owned by check prefect.work_pool); None when it is missing and the step
        plans to create it (`missing_pool_template`)."""
        api = self.prefect_for()
        d = self.settings.deployment

        def read() -> Any:
            pool = api.read_work_pool(d.work_pool)
            if pool is None and self.missing_pool_template is None:
                raise Fail(
                    f"work pool {d.work_pool!r} does not exist in the workspace",
                    f"create it: `prefect work-pool create {d.work_pool} --type {d.work_pool_type}` (Prefect Cloud: "
                    f"Work Pools > Create), or set deployment.work_pool to an existing pool "
                    f"({self.where('deployment.work_pool')})",
                )
            return pool
        return self.fact("work_pool", read)

    def pool_for(self) -> Any:
        pool = self.need(self.work_pool, "prefect.work_pool", f"work pool {self.settings.deployment.work_pool!r}")
        if pool is None:
            raise Skip(f"work pool {self.settings.deployment.work_pool!r} does not exist yet: it is created by this step")
        return pool

    def pool_variables(self) -> dict[str, Any]:
        """The `variables` schema of the pool's base job template (of the template it will be created with)."""
        pool = self.need(self.work_pool, "prefect.work_pool", f"work pool {self.settings.deployment.work_pool!r}")
        template = self.missing_pool_template if pool is None else pool.base_job_template
        return (template or {}).get("variables") or {}

    def block_dsn(self) -> str:
        """The DSN in the Secret block the orchestrator loads (owned by check blocks.database_url)."""
        name = self.settings.blocks.database_url

        def read() -> str:
            api = self.prefect_for()
            remediation = (
                f"create the Secret block {name!r} holding the database DSN (by hand: "
                f"`Secret(value=<dsn>).save({name!r}, overwrite=True)`)"
            )
            value = api.read_secret_value(name)  # registered for redaction as soon as it is read
            if value is None:
                raise Fail(f"Secret block {name!r} does not exist: the orchestrator loads its DSN from it", remediation)
            if not value.strip():
                raise Fail(f"Secret block {name!r} is empty", remediation)
            if urlsplit(value.strip()).scheme not in ("postgresql", "postgres"):
                raise Fail(f"Secret block {name!r} does not hold a PostgreSQL URL (postgresql://...)", remediation)
            return value.strip()
        return self.fact("block_dsn", read)

    # -- database ---------------------------------------------------------------------------------
    def database(self) -> tuple[Database, str]:
        """(the pipeline's database, how it was reached), owned by check database.connect: with
        DATABASE_URL when it is set, which needs nothing else (not the Prefect API); without it,
        with the Secret block's DSN (which needs blocks.database_url)."""
        if self.settings.value("database.url"):
            return self.fact("database", lambda: _connected(Database.from_settings(self.settings))), "DATABASE_URL"
        name = self.settings.blocks.database_url
        dsn = self.need(self.block_dsn, "blocks.database_url", f"the DSN of Secret block {name!r} (DATABASE_URL is not set)")
        return self.fact("database", lambda: _connected(Database(dsn))), f"the DSN of Secret block {name!r}"

    def database_for(self) -> tuple[Database, str]:
        return self.need(self.database, "database.connect", "a connection to the database")

    def block_database(self) -> Database:
        """A connection with the Secret block's DSN (owned by check database.block_dsn)."""
        dsn = self.need(self.block_dsn, "blocks.database_url",
                        f"the DSN of Secret block {self.settings.blocks.database_url!r}")
        return self.fact("block_database", lambda: _connected(Database(dsn)))

    def schema_database(self) -> tuple[Database, str]:
        """The database the schema checks read: database.connect's."""
        return self.database_for()

    def trigger(self) -> Any:
        """The trigger as the catalog reads it (None when it does not exist; owned by database.trigger)."""
        return self.fact("trigger", lambda: self.schema_database()[0].trigger())

    # -- the repository ---------------------------------------------------------------------------
    def repo_url(self) -> str:
        """The clone URL (with .git) of the flow's repository (owned by check source.repo_url)."""
        def normalise() -> str:
            self.settings.require("source.repo_url")
            url = self.settings.value("source.repo_url")
            parts = urlsplit(url)
            if parts.username or parts.password:
                raise Fail(
                    "the repository URL carries credentials: they would be stored in the deployment for anyone to read",
                    f"remove them from the URL ({self.where('source.repo_url')}); the repository must be public",
                )
            return self.settings.source.clone_url
        return self.fact("repo_url", normalise)

    def refs(self) -> dict[str, str]:
        """The remote's refs, read anonymously as the managed runtime clones (owned by source.reachable)."""
        url = self.need(self.repo_url, "source.repo_url", "a usable repository URL")
        return self.fact("refs", lambda: GitRepo(url).ls_remote())

    def branch_sha(self) -> str:
        """The commit the branch points at (owned by check source.branch)."""
        refs = self.need(self.refs, "source.reachable", "the repository")
        branch = self.settings.source.branch
        sha = refs.get(f"refs/heads/{branch}")
        if sha is None:
            heads = sorted(r.removeprefix("refs/heads/") for r in refs if r.startswith("refs/heads/"))
            raise Fail(
                f"branch {branch!r} does not exist in the repository (branches: {', '.join(heads) or 'none'})",
                f"push the branch, or set source.branch to an existing one ({self.where('source.branch')})",
                branches=heads,
            )
        return sha

    def git(self) -> GitRepo:
        return self.fact("git", lambda: GitRepo(self.repo_url()))

    def files(self) -> dict[str, str]:
        """The branch head's Python files (owned by check source.entrypoint_file)."""
        sha = self.need(self.branch_sha, "source.branch", f"branch {self.settings.source.branch!r}")
        return self.fact("files", lambda: self.git().read_files(sha, ".py"))

    def entry_source(self) -> str:
        src = self.settings.source
        files = self.need(self.files, "source.entrypoint_file", f"the files of branch {src.branch!r}")
        if src.entrypoint_path not in files:
            raise Skip(f"{src.entrypoint_path} is not in the repository (see source.entrypoint_file)")
        return files[src.entrypoint_path]

    def flow(self) -> FlowInfo:
        """The entrypoint function as its syntax tree shows it (owned by check source.flow_function)."""
        src = self.settings.source
        source = self.entry_source()
        return self.fact("flow", lambda: analyse_flow(source, src.entrypoint_function, src.entrypoint_path))

    def flow_for(self) -> FlowInfo:
        info = self.need(self.flow, "source.flow_function", f"the analysis of {self.settings.source.entrypoint_function}")
        if not info.is_flow:
            raise Skip(f"{self.settings.source.entrypoint_function} is not a flow (see source.flow_function)")
        return info

    # -- job variables ----------------------------------------------------------------------------
    def job_variables(self) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """(the job variables to deploy, with every plaintext secret withheld; the findings)."""
        def compute() -> tuple[dict[str, Any], list[tuple[str, str]]]:
            planned = self._job_variables if self._job_variables is not None else self.settings.deployment.job_variables()
            return withhold(planned, "job_variables", self.settings)
        return self.fact("job_variables", compute)

    # -- Supabase ---------------------------------------------------------------------------------
    def supabase_secret_names(self) -> set[str]:
        """The project's secret names (owned by check supabase.api)."""
        def read() -> set[str]:
            with SupabaseManagementApi.from_settings(self.settings, max_attempts=3, max_wait=10) as api:
                return {s.name for s in api.list_secrets()}
        return self.fact("supabase_secrets", read)


def _connected(db: Database) -> Database:
    db.server_version()
    return db


# -- plaintext secrets in what is deployed ------------------------------------------------------------


def public_values(settings: RunbookSettings) -> tuple[str, ...]:
    """Values that look like credentials but are public by design (the Supabase anon key)."""
    return (settings.supabase.anon_key,) if settings.supabase.anon_key else ()


def plaintext_secrets(obj: Any, known: dict[str, str], where: str = "job_variables",
                      public: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(path, why) for every string of `obj` that holds a secret in clear: the value of a known
    secret, something shaped like a credential, or a literal under a secret-like name (only a
    `{{ prefect.blocks.secret.<name> }}` placeholder may stand there). Never returns the values."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, path: str, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}", str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", key)
        elif isinstance(value, str) and value:
            what = secrets.clear_text_secrets(value, dict(known), public)
            if what:
                found.append((path, "holds " + ", ".join(what)))
            elif key and secrets.looks_like_secret_name(key) and not is_secret_block_placeholder(value):
                found.append((path, "is a literal value under a secret-like name, not a Secret block placeholder"))

    walk(obj, where, None)
    return found


def _mask(obj: Any, paths: set[str], path: str, register: bool) -> Any:
    if path in paths:
        if register and isinstance(obj, str):
            secrets.register_secret(obj, f"plaintext in {path}")
        return WITHHELD
    if isinstance(obj, dict):
        return {k: _mask(v, paths, f"{path}.{k}", register) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, paths, f"{path}[{i}]", register) for i, v in enumerate(obj)]
    return obj


def withhold(obj: Any, where: str, settings: RunbookSettings) -> tuple[Any, list[tuple[str, str]]]:
    """`obj` with every plaintext secret replaced by WITHHELD (each one also registered for
    redaction), and the findings."""
    findings = plaintext_secrets(obj, settings.secret_values(), where, public_values(settings))
    return _mask(obj, {p for p, _ in findings}, where, register=True), findings
