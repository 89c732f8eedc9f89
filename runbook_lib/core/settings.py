"""The settings of one target (a profile): what to deploy where, and with which credentials, as
validated models (`RunbookSettings` and its sections). How they are loaded, from which layers, is
`runbook_lib.core.profiles` (`load_settings`)."""

from __future__ import annotations

import json
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runbook_lib.core.errors import ParameterError, RequirementError, SettingsError
from runbook_lib.core.secrets import jwt_role
from runbook_lib.core.values import parse_dsn, parse_uuid, validate_requirements

# The settings a production user exports, and the setting each one fills.
ENV_SETTINGS: dict[str, str] = {
    "PREFECT_API_URL": "prefect.api_url",
    "PREFECT_API_KEY": "prefect.api_key",
    "PREFECT_ACCOUNT_ID": "prefect.account_id",
    "PREFECT_WORKSPACE_ID": "prefect.workspace_id",
    "PREFECT_CLOUD_API_URL": "prefect.cloud_api_url",
    "DATABASE_URL": "database.url",
    "SUPABASE_API_URL": "supabase.api_url",
    "SUPABASE_ACCESS_TOKEN": "supabase.access_token",
    "SUPABASE_PROJECT_REF": "supabase.project_ref",
    "SUPABASE_FUNCTIONS_URL": "supabase.functions_url",
    "SUPABASE_ANON_KEY": "supabase.anon_key",
    "SUPABASE_EDGE_FUNCTION_URL": "supabase.edge_function_url",
    "RUNBOOK_REPO_URL": "source.repo_url",
    "GITHUB_TOKEN": "source.github_token",
    "ENRICHMENT_DISPATCH_URL": "modal.dispatch_url",
    "MODAL_TOKEN_ID": "modal.token_id",
    "MODAL_TOKEN_SECRET": "modal.token_secret",
}
SETTING_ENV: dict[str, str] = {path: env for env, path in ENV_SETTINGS.items()}
SECRET_SETTINGS = frozenset(
    {"prefect.api_key", "supabase.access_token", "database.url", "source.github_token", "modal.token_id", "modal.token_secret"}
)
URL_SETTINGS = (
    "prefect.api_url", "prefect.cloud_api_url", "supabase.api_url", "supabase.functions_url", "supabase.edge_function_url",
    "source.repo_url", "modal.dispatch_url", "database.url",
)
OVERRIDE_PREFIX = "RUNBOOK_"
PROFILE_ENV = "RUNBOOK_PROFILE"
DEFAULT_PROFILE = "sandbox"
SANDBOX_ENV_FILE = "sandbox.env"

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_BLOCK_REFERENCE = re.compile(r"\{\{\s*prefect\.blocks\.secret\.([A-Za-z0-9_-]+)\s*\}\}")
_SECRET_BLOCK_PLACEHOLDER = re.compile(r"^\{\{\s*prefect\.blocks\.secret\.[A-Za-z0-9_-]+\s*\}\}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# The non-secret variables the flow reads (contract.md, flows/src/orchestrator.py): the default of
# deployment.env_references_allowed.
DEFAULT_ENV_REFERENCES = ("ENRICHMENT_DISPATCH_URL",)


def git_clone_url(url: str) -> tuple[str, bool]:
    """(the URL `flow.from_source` treats as a git repository, whether `.git` had to be added).

    Prefect 3.9's `from_source` clones only URLs ending in `.git` (or git scheme / ssh); a plain
    `https://github.com/owner/repo` goes to fsspec remote storage and the deploy fails. The one
    place this rule lives: everything else asks `settings.source.clone_url`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url, False
    path = parts.path.rstrip("/")
    if path.endswith(".git"):
        return urlunsplit(parts._replace(path=path)), False
    return urlunsplit(parts._replace(path=path + ".git")), True


def is_secret_block_placeholder(value: str) -> bool:
    """True for exactly `{{ prefect.blocks.secret.<name> }}` (resolved by the worker at run time)."""
    return bool(_SECRET_BLOCK_PLACEHOLDER.match(value.strip()))


def one_message(head: str, lines: list[str]) -> str:
    """Several problems as one message: the head, then one line each."""
    if len(lines) == 1:
        return f"{head}: {lines[0]}"
    return head + ":\n" + "\n".join(f"  - {line}" for line in lines)


# -- value checks -------------------------------------------------------------------------------


def _uuid(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_uuid(value)
    except ParameterError:
        raise ValueError("is not a UUID") from None


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http(s) URL")
    return value.rstrip("/")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefectSettings(_Section):
    """Prefect Cloud (or the sandbox's Cloud-shaped gateway)."""

    api_url: str | None = None
    api_key: SecretStr | None = None
    account_id: str | None = None
    workspace_id: str | None = None
    # With no api_url, it is built as <cloud_api_url>/accounts/<account_id>/workspaces/<workspace_id>.
    # Prefect's clients treat an api_url under it as Cloud (bearer auth on WebSockets too).
    cloud_api_url: str | None = None

    @property
    def is_cloud(self) -> bool:
        return bool(self.api_url and self.cloud_api_url and self.api_url.startswith(self.cloud_api_url))

    _check_ids = field_validator("account_id", "workspace_id")(_uuid)
    _check_urls = field_validator("api_url", "cloud_api_url")(_http_url)

    @model_validator(mode="after")
    def _resolve_api_url(self) -> "PrefectSettings":
        if self.api_url is None and self.cloud_api_url and self.account_id and self.workspace_id:
            self.api_url = f"{self.cloud_api_url}/accounts/{self.account_id}/workspaces/{self.workspace_id}"
        match = re.search(r"/accounts/([^/]+)/workspaces/([^/]+)", self.api_url or "")
        if match:
            for label, given, in_url in (("account", self.account_id, match.group(1)),
                                         ("workspace", self.workspace_id, match.group(2))):
                if given and given != in_url.lower():
                    raise ValueError(
                        f"PREFECT_API_URL points at {label} {in_url} but PREFECT_{label.upper()}_ID is {given}: "
                        "the runbook and the Edge Function would talk to different workspaces"
                    )
        return self


class SourceSettings(_Section):
    """The flow's git repository."""

    repo_url: str | None = None
    branch: str = "main"
    entrypoint: str
    github_token: SecretStr | None = None

    @field_validator("repo_url")
    @classmethod
    def _repo_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.password or (parts.username and parts.scheme in ("http", "https")):
            # Never echoed: git would put it on its command line (ps) and the deployment's pull step.
            raise ValueError("carries credentials (user:token@): they would reach git's command line and the "
                             "deployment's pull step, readable by anyone; use the public URL without them (step 02 "
                             "pushes with GITHUB_TOKEN, passed to git out of its command line)")
        if parts.scheme in ("http", "https", "ssh", "git") and parts.hostname:
            return value
        if parts.scheme == "file" or re.match(r"^[\w.-]+@[\w.-]+:", value):
            return value
        raise ValueError("is not a git repository URL (https://..., ssh://..., git@host:path or file://...)")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        if not re.match(r"^[^:\s]+\.py:[A-Za-z_][A-Za-z0-9_]*$", value):
            raise ValueError("must look like 'path/to/file.py:function_name'")
        return value

    @property
    def clone_url(self) -> str:
        """The repository URL as git and `flow.from_source` need it (ending in .git)."""
        return git_clone_url(self.repo_url)[0] if self.repo_url else ""

    @property
    def clone_url_was_fixed(self) -> bool:
        """True when the configured URL lacks the .git that `clone_url` adds."""
        return bool(self.repo_url) and git_clone_url(self.repo_url)[1]

    @property
    def entrypoint_path(self) -> str:
        return self.entrypoint.split(":", 1)[0]

    @property
    def entrypoint_function(self) -> str:
        return self.entrypoint.split(":", 1)[1]


class DeploymentSettings(_Section):
    """The Prefect deployment and its managed work pool's job variables."""

    name: str
    work_pool: str
    work_pool_type: str
    pip_packages: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    runtime_python: str = "3.12"
    # Step 03 starts one flow run of the deployment after deploying (its `smoke_run` parameter overrides).
    smoke_run: bool = False
    # The only environment variables `${NAME}` in `env` may bring into the job variables (readable by
    # anyone who can read the deployment): the non-secret ones the flow reads (contract.md).
    env_references_allowed: list[str] = Field(default_factory=lambda: list(DEFAULT_ENV_REFERENCES))

    @field_validator("name")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        return _object_name(value, "a deployment name")

    @field_validator("work_pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        return _object_name(value, "a work pool name")

    @field_validator("env_references_allowed")
    @classmethod
    def _allowed_names(cls, value: list[str]) -> list[str]:
        bad = [k for k in value if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"invalid environment variable name(s) {bad}")
        return value

    @field_validator("pip_packages")
    @classmethod
    def _requirements(cls, value: list[str]) -> list[str]:
        try:
            validate_requirements(value)
        except RequirementError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"invalid environment variable name(s) {bad}")
        return value

    @field_validator("runtime_python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.match(r"^3\.\d+$", value):
            raise ValueError("must be a Python version like '3.12'")
        return value

    def job_variables(self) -> dict[str, Any]:
        return {"pip_packages": list(self.pip_packages), "env": dict(self.env)}

    def referenced_secret_blocks(self) -> list[str]:
        """Secret block names used as `{{ prefect.blocks.secret.<name> }}` in env."""
        found = []
        for value in self.env.values():
            found += [m for m in _SECRET_BLOCK_REFERENCE.findall(value) if m not in found]
        return found


def _object_name(value: str, what: str) -> str:
    """A Prefect object's name (deployment, work pool): Prefect refuses '/', '%', '&', '>', '<' in it,
    and '/' would split `<flow>/<deployment>` lookups."""
    if not value or not value.strip() or value != value.strip():
        raise ValueError(f"{what} must be non-empty, without surrounding spaces")
    bad = sorted({c for c in value if c in "/%&<>\\" or not c.isprintable()})
    if bad:
        raise ValueError(f"{what} cannot contain {' '.join(repr(c) for c in bad)}")
    return value


class BlockNames(_Section):
    """Names of the Secret blocks the runtime needs; each holds the value of one setting."""

    database_url: str = "postgres-connection-string"
    modal_token_id: str = "modal-token-id"
    modal_token_secret: str = "modal-token-secret"

    @field_validator("*")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _BLOCK_NAME.match(value):
            raise ValueError("block names are lowercase letters, digits and dashes")
        return value


# Which setting supplies each Secret block's value.
BLOCK_VALUE_SETTINGS = {"database_url": "database.url", "modal_token_id": "modal.token_id", "modal_token_secret": "modal.token_secret"}


class SupabaseSettings(_Section):
    """The Supabase project: Management API (secrets) and the Edge Function."""

    api_url: str | None = None
    access_token: SecretStr | None = None
    project_ref: str | None = None
    anon_key: str | None = None  # public by design (browser code, the trigger's SQL): not a secret
    functions_url: str | None = None
    edge_function_url: str | None = None
    function_name: str = "trigger-prefect-orchestrator"
    deployment_id_secret: str = "PREFECT_DEPLOYMENT_ID"
    function_secrets: list[str] = Field(default_factory=list)
    # Attempts per Management API request in step 04 (a 429 or 5xx is retried, waiting what `retry-after`
    # or `x-ratelimit-reset` asks, else 0.5 s doubling: 6 attempts give up after about 15 s).
    max_attempts: int = Field(default=6, ge=1, le=10)

    _check_urls = field_validator("api_url", "functions_url", "edge_function_url")(_http_url)

    @field_validator("anon_key")
    @classmethod
    def _anon(cls, value: str | None) -> str | None:
        if value is None:
            return None
        role = jwt_role(value)
        if role != "anon":  # the value is never echoed: a service_role key here is a secret
            found = f"a JWT with role {role!r}" if role else "not a JWT"
            raise ValueError(f"must be the project's anon key (a JWT with role 'anon'), but it is {found}; "
                             "a service_role key would be written into the trigger's SQL and the records")
        return value

    @field_validator("project_ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-z]{20}$", value):
            raise ValueError("a project ref is 20 lowercase letters")
        return value

    @field_validator("deployment_id_secret")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        _check_function_secret_name(value)
        return value

    @field_validator("function_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_function_secret_name(name)
        return value

    @model_validator(mode="after")
    def _resolve_urls(self) -> "SupabaseSettings":
        if self.functions_url is None and self.project_ref:
            self.functions_url = f"https://{self.project_ref}.supabase.co/functions/v1"
        if self.edge_function_url is None and self.functions_url:
            self.edge_function_url = f"{self.functions_url}/{self.function_name}"
        return self


def _check_function_secret_name(name: str) -> None:
    if not _ENV_NAME.match(name) or len(name) > 256:
        raise ValueError(f"{name!r} is not a valid secret name")
    if name.upper().startswith("SUPABASE_"):
        raise ValueError(f"{name!r}: secret names must not start with SUPABASE_ (reserved)")


class DatabaseSettings(_Section):
    url: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_dsn(value.get_secret_value())  # its ValueError never quotes the DSN
        return value

    @property
    def password(self) -> str | None:
        return parse_dsn(self.url.get_secret_value()).password if self.url is not None else None


class ModalSettings(_Section):
    app_name: str = "data-enrichment-workers"
    token_id: SecretStr | None = None
    token_secret: SecretStr | None = None
    # Where the sandbox's orchestrator dispatches instead of Modal (unset in production).
    dispatch_url: str | None = None

    _check_url = field_validator("dispatch_url")(_http_url)


class E2ESettings(_Section):
    """The end-to-end test: a dedicated client's batch launched the way the admin UI does."""

    client_id: str
    workstream: str
    blueprint: list[str] = Field(min_length=1)
    item_count: int = Field(default=3, gt=0, le=1000)
    trigger_timeout_seconds: float = Field(default=30, gt=0, allow_inf_nan=False)
    flow_run_timeout_seconds: float = Field(default=300, gt=0, allow_inf_nan=False)
    completion_timeout_seconds: float = Field(default=600, gt=0, allow_inf_nan=False)
    poll_interval_seconds: float = Field(default=2, gt=0, allow_inf_nan=False)
    # Once the flow run is over, items that have not changed for this long will not move without
    # another trigger: the test concludes then instead of waiting out completion_timeout_seconds
    # (items IN_PROGRESS, in the enrichment service's hands, are still waited for). Long enough for
    # a sender spawned at the end of the run to start (Modal's cold start).
    settle_seconds: float = Field(default=30, gt=0, allow_inf_nan=False)
    expect_completed: bool = True
    # "ui": inserted INITIALIZING, then flipped to PENDING (fires the trigger); "direct_pending": the
    # UI path that inserts PENDING at once and never fires it (to reproduce that failure mode).
    launch_mode: Literal["ui", "direct_pending"] = "ui"
    cleanup: bool = True  # delete the test batch's rows at the end

    _check_client = field_validator("client_id")(_uuid)

    @field_validator("blueprint")
    @classmethod
    def _slugs(cls, value: list[str]) -> list[str]:
        if any(not isinstance(s, str) or not s.strip() for s in value):
            raise ValueError("step slugs must be non-empty")
        return value

    @property
    def first_step(self) -> str:
        return self.blueprint[0]

    @property
    def target_status(self) -> str:
        return "COMPLETED" if self.expect_completed else "IN_PROGRESS"

    @property
    def expected_path(self) -> list[str]:
        return ["PENDING", "QUEUED", "IN_PROGRESS"] + (["COMPLETED"] if self.expect_completed else [])


class FallbackSettings(_Section):
    """The plan's fallback when Managed is not usable: the same flow on a process work pool,
    served by a worker on an always-on host (whose own environment must hold the flow's packages)."""

    deployment_name: str = "data-enrichment-orchestrator-process"
    work_pool: str = "default-agent-pool"
    work_pool_type: str = "process"
    worker_name: str = "runbook-fallback-worker"
    # true: the runbook starts the worker here as a background process (pid file, log);
    # false: it prints the command and writes a service definition for the worker's host.
    start_worker: bool = False
    worker_start_timeout_seconds: float = Field(default=90, gt=0, allow_inf_nan=False)

    @field_validator("deployment_name")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        return _object_name(value, "a deployment name")

    @field_validator("work_pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        return _object_name(value, "a work pool name")
    worker_query_seconds: int = Field(default=10, ge=1)  # how often the worker polls for runs


class HealthSettings(_Section):
    """The health check (step 06, `runbook health`): its window and thresholds."""

    # Flow runs, pg_net responses and FAILED items are looked at over this window (pg_net keeps its
    # responses about 6 hours).
    window_minutes: float = Field(default=360, gt=0, allow_inf_nan=False)
    # A state QUEUED longer than this was claimed and never dispatched. Unset: the orchestrator's claim
    # lease (the deployment's `claim_lease_seconds`, else the flow's CLAIM_LEASE_SECONDS: source.lease).
    queued_lease_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # A state PENDING longer than this, with no flow run of the deployment since, waits for a trigger.
    pending_threshold_seconds: float = Field(default=900, gt=0, allow_inf_nan=False)
    # A flow run Scheduled / Pending longer than this is not being picked up.
    scheduled_threshold_seconds: float = Field(default=600, gt=0, allow_inf_nan=False)
    examples: int = Field(default=5, ge=1, le=50)  # rows quoted per finding


class RunbookSettings(BaseSettings):
    """Everything a runbook step needs about its target. Build it with `load_settings`."""

    model_config = SettingsConfigDict(extra="forbid")

    profile: str
    description: str = ""
    sandbox: bool = False
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    source: SourceSettings
    deployment: DeploymentSettings
    blocks: BlockNames = Field(default_factory=BlockNames)
    supabase: SupabaseSettings = Field(default_factory=SupabaseSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    modal: ModalSettings = Field(default_factory=ModalSettings)
    e2e: E2ESettings
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    _hints: Any = PrivateAttr(default=None)  # core.profiles: where each setting is set, for messages

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # load_settings merges the layers itself, so that every value's origin is known.
        return (init_settings,)

    # -- reading ------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        """The value at a dotted path (`"prefect.api_key"`); secrets stay SecretStr."""
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def value(self, path: str) -> Any:
        """The value at a dotted path, secrets revealed: for handing to a client, never to display."""
        v = self.get(path)
        return v.get_secret_value() if isinstance(v, SecretStr) else v

    def origin(self, path: str) -> str:
        """Where a setting's value came from (a file, an environment variable, a default)."""
        return self._origins.get(path, "default")

    def where_to_set(self, path: str) -> str:
        return self._hints.where(path) if self._hints else f"set {path}"

    def require(self, *paths: str) -> None:
        """Raise one SettingsError naming every unset setting among `paths` and where to set it."""
        missing = [p for p in paths if self.get(p) in (None, "", [], {})]
        if missing:
            lines = [f"{p} is not set: {self.where_to_set(p)}" for p in missing]
            raise SettingsError(one_message(f"profile {self.profile!r}: missing setting(s)", lines))

    def secret_values(self) -> dict[str, str]:
        """Every secret value that is set, by label (for redaction)."""
        out = {}
        for path in sorted(SECRET_SETTINGS):
            v = self.value(path)
            if v:
                out[SETTING_ENV.get(path, path)] = v
        if self.database.password:
            out["DATABASE_PASSWORD"] = self.database.password
        return out

    def secret_block_values(self) -> dict[str, str]:
        """Secret block name -> the value it must hold; raises if a source setting is unset."""
        self.require(*BLOCK_VALUE_SETTINGS.values())
        return {getattr(self.blocks, role): self.value(path) for role, path in BLOCK_VALUE_SETTINGS.items()}

    def describe(self) -> list[dict[str, str]]:
        """One row per setting (secrets as set/unset only), with its origin: for display."""
        rows = []
        for section in ("prefect", "source", "deployment", "blocks", "supabase", "database", "modal", "e2e"):
            for field, v in getattr(self, section):
                path = f"{section}.{field}"
                if path in SECRET_SETTINGS:
                    shown = "set (hidden)" if v is not None else "not set"
                else:
                    shown = json.dumps(v) if isinstance(v, (list, dict)) else ("not set" if v is None else str(v))
                rows.append({"setting": path, "value": shown, "origin": self.origin(path)})
        return rows


