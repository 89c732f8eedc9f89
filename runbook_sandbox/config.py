"""The sandbox's configuration: ports, identities and credentials of every stand-in.

One JSON file (`<state_dir>/config.json`) is written by `sandbox up` before any service starts;
every service process is started as `python -m runbook_sandbox.<module> --config <that file>` and
reads what it needs from it. Identities (tokens, ids, keys) are generated once per state directory
and kept, so a restart keeps the data and the credentials; ports are chosen free at each `up` when
the service is not already running.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from runbook_lib.core.paths import default_sandbox_dir, project_root

PROJECT_ROOT = project_root()  # the one rule (RUNBOOK_PROJECT_ROOT, else the checkout): runbook_lib.core.paths


def default_state_dir() -> Path:
    return default_sandbox_dir()


def _project_ref() -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(20))


def _anon_key(jwt_secret: str, ref: str, role: str = "anon") -> str:
    # The same claims Supabase puts in a project's anon / service_role keys.
    import jwt  # here: every service loads this module, few need PyJWT (and cryptography under it)

    return jwt.encode(
        {"iss": "supabase", "ref": ref, "role": role, "iat": 1700000000, "exp": 2000000000},
        jwt_secret,
        algorithm="HS256",
    )


class PostgresConfig(BaseModel):
    port: int = 0
    user: str = "postgres"
    password: str = Field(default_factory=lambda: secrets.token_urlsafe(18))
    database: str = "postgres"
    # When set, the sandbox uses this server instead of starting the embedded one.
    external_url: str | None = None

    def url(self, database: str | None = None) -> str:
        if self.external_url and database is None:
            return self.external_url
        if self.external_url:
            from urllib.parse import urlsplit, urlunsplit

            parts = urlsplit(self.external_url)
            return urlunsplit(parts._replace(path="/" + database))
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
            f"{database or self.database}"
        )


class SupabaseConfig(BaseModel):
    port: int = 0  # Management API and the functions gateway share this port
    deno_port: int = 0  # internal: the Edge Function's own Deno.serve
    project_ref: str = Field(default_factory=_project_ref)
    access_token: str = Field(default_factory=lambda: "sbp_" + secrets.token_hex(20))
    jwt_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32))
    anon_key: str = ""
    service_role_key: str = ""
    function_name: str = "trigger-prefect-orchestrator"


class ModalConfig(BaseModel):
    port: int = 0
    app_name: str = "data-enrichment-workers"
    token_id: str = Field(default_factory=lambda: "ak-" + secrets.token_hex(10))
    token_secret: str = Field(default_factory=lambda: "as-" + secrets.token_hex(16))


class PrefectConfig(BaseModel):
    server_port: int = 0  # internal: the real Prefect server
    gateway_port: int = 0  # public: Cloud-shaped URL with bearer auth
    account_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    workspace_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    api_key: str = Field(default_factory=lambda: "pnu_" + secrets.token_hex(18))
    work_pool: str = "managed-production"
    work_pool_type: str = "prefect:managed"


class GitConfig(BaseModel):
    port: int = 0
    token: str = Field(default_factory=lambda: "ghp_" + secrets.token_hex(18))
    owner: str = "bencrane"
    repo: str = "data-enrichment-orchestration-v1"
    # Seed the repository with feature/secret-blocks already merged into main.
    seed_merged: bool = False
    # The repository `sandbox up --repo` seeded it from (a URL as given, an absolute path); None: the
    # seeded story from flows/. A later `up` keeps the repository; a missing one is seeded from it.
    seed_source: str | None = None


class ProxyConfig(BaseModel):
    """The fault proxy (`fault_proxy`): one loopback port per proxied service, and its control API.
    A port of 0 means the proxy is not part of this sandbox: clients then connect directly."""

    control_port: int = 0
    database_port: int = 0
    prefect_port: int = 0
    git_port: int = 0
    modal_port: int = 0


class SandboxConfig(BaseModel):
    state_dir: str
    instance_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    # Guards the stand-ins' `/_sandbox/*` fault and rate-limit endpoints and the fault proxy's control
    # API (header `X-Sandbox-Token`): tests and the CLI use them, the runbook never does.
    admin_token: str = Field(default_factory=lambda: "sbx_" + secrets.token_hex(20))
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)
    supabase: SupabaseConfig = Field(default_factory=SupabaseConfig)
    modal: ModalConfig = Field(default_factory=ModalConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    git: GitConfig = Field(default_factory=GitConfig)

    # -- paths -------------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def config_path(self) -> Path:
        return self.state / "config.json"

    def path(self, *parts: str) -> Path:
        p = self.state.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log_path(self, service: str) -> Path:
        return self.path("logs", f"{service}.log")

    def request_log_path(self, service: str) -> Path:
        """JSON lines, one per request a stand-in served (method, path, status; never secrets)."""
        return self.path("requests", f"{service}.jsonl")

    # -- derived URLs ----------------------------------------------------------------------------
    @property
    def database_url(self) -> str:
        """The pipeline's database as its clients reach it: through the fault proxy when the sandbox
        runs one (`postgres.url()` is the server itself, for the sandbox's own set-up and Prefect)."""
        direct = self.postgres.url()
        if not self.proxy.database_port:
            return direct
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(direct)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.proxy.database_port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def _public_port(self, direct: int, proxied: int) -> int:
        return proxied or direct

    @property
    def supabase_api_url(self) -> str:
        return f"http://127.0.0.1:{self.supabase.port}"

    @property
    def functions_url(self) -> str:
        return f"http://127.0.0.1:{self.supabase.port}/functions/v1"

    @property
    def edge_function_url(self) -> str:
        return f"{self.functions_url}/{self.supabase.function_name}"

    @property
    def modal_url(self) -> str:
        return f"http://127.0.0.1:{self._public_port(self.modal.port, self.proxy.modal_port)}"

    @property
    def prefect_server_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect.server_port}/api"

    @property
    def prefect_api_url(self) -> str:
        p = self.prefect
        return (
            f"http://127.0.0.1:{self.prefect_public_port}/api/accounts/{p.account_id}"
            f"/workspaces/{p.workspace_id}"
        )

    def prefect_client_settings(self) -> dict[str, str]:
        """The settings that point a Prefect client, CLI or worker at the sandbox, as at Cloud (the
        gateway's `exports` and the managed worker's environment)."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_KEY": self.prefect.api_key,
            "PREFECT_CLOUD_API_URL": f"http://127.0.0.1:{self.prefect_public_port}/api",
        }

    @property
    def prefect_public_port(self) -> int:
        """The gateway's port as clients reach it (through the fault proxy when there is one)."""
        return self._public_port(self.prefect.gateway_port, self.proxy.prefect_port)

    @property
    def git_base_url(self) -> str:
        return f"http://127.0.0.1:{self._public_port(self.git.port, self.proxy.git_port)}"

    @property
    def repo_url(self) -> str:
        return f"{self.git_base_url}/{self.git.owner}/{self.git.repo}.git"

    # -- persistence -----------------------------------------------------------------------------
    def save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.config_path)

    @classmethod
    def load(cls, path: str | Path) -> "SandboxConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))

    @classmethod
    def load_or_create(cls, state_dir: Path | None = None) -> "SandboxConfig":
        state_dir = (state_dir or default_state_dir()).resolve()
        path = state_dir / "config.json"
        if path.exists():
            cfg = cls.load(path)
        else:
            cfg = cls(state_dir=str(state_dir))
        cfg.state_dir = str(state_dir)
        s = cfg.supabase
        if not s.anon_key:
            s.anon_key = _anon_key(s.jwt_secret, s.project_ref, "anon")
            s.service_role_key = _anon_key(s.jwt_secret, s.project_ref, "service_role")
        return cfg


def config_from_argv(argv: list[str] | None = None) -> SandboxConfig:
    """Parse `--config PATH` for a service's `__main__`."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return SandboxConfig.load(args.config)
