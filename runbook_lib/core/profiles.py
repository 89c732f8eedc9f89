"""Loading the settings of one target (a profile): what to deploy where, and with which credentials.

Layers, lowest precedence first:

1. the profile file `profiles/<name>.toml` (versioned; non-secret values only; `extends = "<other>"`
   inherits another profile, tables such as `[deployment.env]` merged key by key; `""` unsets);
2. the service settings a user exports (`PREFECT_API_KEY`, `DATABASE_URL`, ... see `ENV_SETTINGS`):
   - profile `production` (any non-sandbox profile): `<project>/.env` (git-ignored), then the environment;
   - profile `sandbox`: only `<sandbox dir>/sandbox.env` (`RUNBOOK_SANDBOX_DIR`, default
     `<project>/.sandbox`), written by `python -m runbook_lib sandbox up`. Ambient variables and
     `.env` of the same names are ignored there, so the sandbox profile can never pick up
     production credentials; every URL it uses must be on loopback;
3. `RUNBOOK_<SECTION>__<FIELD>` overrides of profile values (JSON for lists and tables), from
   `.env` or the environment, e.g. `RUNBOOK_E2E__ITEM_COUNT=5`;
4. the `overrides` argument of `load_settings` (dotted paths; tests and notebooks).

Secrets (`SECRET_SETTINGS`) may come only from layer 2 or 4. Credentials are optional when
loading: a step states what it needs with `settings.require(...)`, which fails with one error
naming each missing setting and where to set it. A malformed value fails at load, naming the
setting, where its value came from, and what is wrong.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from runbook_lib.core import paths as project
from runbook_lib.core.errors import SettingsError
from runbook_lib.core.settings import (
    _ENV_REFERENCE, _LOOPBACK, _PROFILE_NAME, DEFAULT_ENV_REFERENCES, DEFAULT_PROFILE, ENV_SETTINGS, OVERRIDE_PREFIX, PROFILE_ENV,
    SANDBOX_ENV_FILE, SECRET_SETTINGS, SETTING_ENV, URL_SETTINGS, RunbookSettings, one_message,
)

# -- loading -------------------------------------------------------------------------------------


class _Hints:
    """Where each setting is set, for error messages."""

    def __init__(self, profile: str, profile_file: Path, sandbox_env: Path | None, root: Path):
        self.profile, self.profile_file, self.sandbox_env, self.root = profile, profile_file, sandbox_env, root

    def where(self, path: str) -> str:
        env = SETTING_ENV.get(path)
        if path == "prefect.api_url":
            env = "PREFECT_API_URL (or PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID)"
        if path in ("supabase.functions_url", "supabase.edge_function_url"):
            env = f"{SETTING_ENV[path]} (or SUPABASE_PROJECT_REF)"
        if env and self.sandbox_env is not None:
            return f"{env} comes from {self.sandbox_env}, written by `python -m runbook_lib sandbox up`"
        if env:
            return f"set {env} in the environment or in {self.root / '.env'} (git-ignored)"
        section, _, field = path.partition(".")
        return (
            f"set `{field}` in section [{section}] of {self.profile_file}, "
            f"or override it with {OVERRIDE_PREFIX}{section.upper()}__{field.upper()}"
        )


def available_profiles(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in project.profiles_dir(root).glob("*.toml"))


def _flatten(data: dict[str, Any], origin: str) -> dict[str, tuple[Any, str]]:
    """Profile TOML -> {"section.field" or "key": (value, origin)}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in RunbookSettings.model_fields:
            for field, v in value.items():
                flat[f"{key}.{field}"] = (v, origin)
        else:
            flat[key] = (value, origin)
    return flat


def _read_profile(name: str, root: Path, chain: tuple[str, ...] = ()) -> dict[str, tuple[Any, str]]:
    if not _PROFILE_NAME.match(name):
        raise SettingsError(f"profile name {name!r} is not valid (lowercase letters, digits, '-', '_')")
    path = project.profiles_dir(root) / f"{name}.toml"
    if not path.is_file():
        raise SettingsError(
            f"unknown profile {name!r}: no file {path}. Available profiles: {', '.join(available_profiles(root)) or 'none'}"
        )
    if name in chain:
        raise SettingsError(f"profile {name!r} extends itself (through {' -> '.join(chain)})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"profile file {path} is not valid TOML: {exc}") from None
    origin = f"{path.relative_to(root) if path.is_relative_to(root) else path}"
    secrets_inside = [p for p in _flatten(data, origin) if p in SECRET_SETTINGS]
    if secrets_inside:
        raise SettingsError(
            f"profile file {path} contains secret setting(s) {secrets_inside}: profiles are versioned and hold "
            f"no secrets; remove them and set {', '.join(SETTING_ENV[p] for p in secrets_inside)} in the "
            f"environment or in {root / '.env'} (git-ignored)"
        )
    parent = data.pop("extends", None)
    merged: dict[str, tuple[Any, str]] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise SettingsError(f"profile file {path}: `extends` must be a profile name")
        merged = _read_profile(parent, root, chain + (name,))
    for key, (value, where) in _flatten(data, origin).items():
        if isinstance(value, dict) and isinstance(merged.get(key, (None,))[0], dict):
            value = {**merged[key][0], **value}
        merged[key] = (value, where)
    return merged


def _read_env_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _field_annotation(path: str) -> Any:
    section, _, field = path.partition(".")
    model = RunbookSettings.model_fields[section].annotation
    return model.model_fields[field].annotation  # type: ignore[union-attr]


def _overrides_from_env(env: Mapping[str, tuple[str, str]], problems: list[str]) -> dict[str, tuple[Any, str]]:
    """`RUNBOOK_<SECTION>__<FIELD>` variables -> dotted settings."""
    out = {}
    for key, (raw, origin) in env.items():
        if not key.startswith(OVERRIDE_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(OVERRIDE_PREFIX):].lower().partition("__")
        path = f"{section}.{field}"
        model = RunbookSettings.model_fields.get(section)
        if model is None or not isinstance(model.annotation, type) or not issubclass(model.annotation, BaseModel) \
                or field not in model.annotation.model_fields:
            problems.append(f"{key} ({origin}) does not name a setting: expected {OVERRIDE_PREFIX}<SECTION>__<FIELD>")
            continue
        if path in SECRET_SETTINGS:
            problems.append(f"{key} ({origin}): {path} is a secret; set {SETTING_ENV[path]} instead")
            continue
        value: Any = raw
        if typing.get_origin(_field_annotation(path)) in (list, dict):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"{key} ({origin}) must be JSON for {path}: {exc.msg}")
                continue
        out[path] = (value, origin)
    return out


def _nest(flat: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, (value, _) in flat.items():
        if value == "":
            continue  # "" unsets: the setting falls back to its default
        section, _, field = path.partition(".")
        if field:
            nested.setdefault(section, {})[field] = value
        else:
            nested[section] = value
    return nested


def load_settings(
    profile: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    root: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunbookSettings:
    """The settings of `profile` (default: $RUNBOOK_PROFILE, else "sandbox"); see the module doc."""
    root = (root or project.project_root()).resolve()
    environ = dict(os.environ if environ is None else environ)
    name = profile or environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    flat = _read_profile(name, root)
    profile_file = project.profiles_dir(root) / f"{name}.toml"
    is_sandbox = bool(flat.get("sandbox", (False,))[0])

    dotenv_path = root / ".env"
    user_env: dict[str, tuple[str, str]] = {}
    if dotenv_path.is_file():
        user_env.update({k: (v, f"{dotenv_path} ({k})") for k, v in _read_env_file(dotenv_path).items()})
    user_env.update({k: (v, f"environment variable {k}") for k, v in environ.items()})

    sandbox_env_path = None
    if is_sandbox:
        sandbox_env_path = project.default_sandbox_dir(environ, root) / SANDBOX_ENV_FILE
        if not sandbox_env_path.is_file():
            raise SettingsError(
                f"profile {name!r} reads {sandbox_env_path}, which does not exist: start the sandbox with "
                "`python -m runbook_lib sandbox up` (or point RUNBOOK_SANDBOX_DIR at its state directory)"
            )
        service_env = {k: (v, f"{sandbox_env_path} ({k})") for k, v in _read_env_file(sandbox_env_path).items()}
    else:
        service_env = user_env
    hints = _Hints(name, profile_file, sandbox_env_path, root)

    problems: list[str] = []
    for env_name, path in ENV_SETTINGS.items():
        if env_name in service_env and service_env[env_name][0] != "":
            flat[path] = service_env[env_name]
    flat.update(_overrides_from_env(user_env, problems))
    for path, value in (overrides or {}).items():
        flat[path] = (value, "override argument")
    flat["profile"] = (name, str(profile_file))
    _interpolate_env_references(flat, service_env, problems)
    if problems:
        raise SettingsError(one_message(f"settings of profile {name!r} are not usable", problems))

    try:
        settings = RunbookSettings(**_nest(flat))
    except ValidationError as exc:
        raise SettingsError(one_message(f"settings of profile {name!r} are not usable", _explain(exc, flat, hints))) from None
    settings._origins = {path: origin for path, (_, origin) in flat.items()}
    for path, built_from in _BUILT_FROM.items():
        if settings.get(path) and path not in flat:
            settings._origins[path] = built_from
    settings._hints = hints
    problems = _clear_text_secrets(settings) + (_non_loopback(settings) if is_sandbox else [])
    if problems:
        raise SettingsError(one_message(f"settings of profile {name!r} are not usable", problems))
    return settings


_BUILT_FROM = {
    "prefect.api_url": "built from PREFECT_ACCOUNT_ID and PREFECT_WORKSPACE_ID",
    "supabase.functions_url": "built from SUPABASE_PROJECT_REF",
    "supabase.edge_function_url": "built from the functions URL and supabase.function_name",
}


def _interpolate_env_references(flat: dict[str, tuple[Any, str]], env: Mapping[str, tuple[str, str]], problems: list[str]) -> None:
    """Replace `${NAME}` in deployment.env values with NAME's value: only names on the allow-list
    (deployment.env_references_allowed), never a secret; anything else is refused, naming the key."""
    if "deployment.env" not in flat:
        return
    values, origin = flat["deployment.env"]
    if not isinstance(values, dict):
        return
    allowed, allowed_origin = flat.get("deployment.env_references_allowed", (list(DEFAULT_ENV_REFERENCES), "default"))
    if not isinstance(allowed, list):
        return  # the model refuses it, naming where it came from
    resolved = {}
    for key, value in values.items():
        if not isinstance(value, str):
            resolved[key] = value
            continue
        for ref in _ENV_REFERENCE.findall(value):
            if ENV_SETTINGS.get(ref) in SECRET_SETTINGS:
                problems.append(
                    f"deployment.env.{key} ({origin}) would put the secret {ref} in clear into the deployment's "
                    "job variables: use a Secret block placeholder {{ prefect.blocks.secret.<name> }}"
                )
            elif ref not in allowed:
                problems.append(
                    f"deployment.env.{key} ({origin}) refers to ${{{ref}}}, which is not on the allow-list of "
                    f"deployment.env_references_allowed ({allowed_origin}: {', '.join(allowed) or 'empty'}): the job "
                    "variables are readable by anyone who can read the deployment; add the name there if it is not a secret"
                )
            elif ref not in env or env[ref][0] == "":
                problems.append(f"deployment.env.{key} ({origin}) refers to ${{{ref}}}, which is not set")
        resolved[key] = _ENV_REFERENCE.sub(lambda m: env.get(m.group(1), ("",))[0], value)
    flat["deployment.env"] = (resolved, origin)


# Settings whose refused value may be a credential (a token in a URL, a service_role key): never quoted.
_NEVER_ECHOED = frozenset({"source.repo_url", "supabase.anon_key"})


def _explain(exc: ValidationError, flat: dict[str, tuple[Any, str]], hints: _Hints) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc[:2])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{path} is not set: {hints.where(path)}")
            continue
        if err["type"] == "extra_forbidden":
            origin = flat.get(path, (None, "?"))[1]
            lines.append(f"{path} ({origin}) is not a known setting")
            continue
        where = flat.get(path, (None, None))[1]
        if where is None and len(loc) == 1:  # a whole-section check: name the section's sources
            where = ", ".join(sorted({o for p, (_, o) in flat.items() if p.startswith(loc[0] + ".")})) or "defaults"
        item = path + "".join(f"[{p}]" for p in loc[2:])
        hidden = path in SECRET_SETTINGS or path in _NEVER_ECHOED or "input" not in err or len(loc) == 1
        shown = "" if hidden else f" = {err['input']!r}"
        fix = hints.where(path) if len(loc) > 1 else "fix the values it is built from"
        lines.append(f"{item}{shown} (from {where or 'default'}) {msg}; {fix}")
    return lines


def _clear_text_secrets(settings: RunbookSettings) -> list[str]:
    """Secret values written in clear into job variables or parameters (visible to anyone who can
    read the deployment)."""
    problems = []
    secrets = {label: v for label, v in settings.secret_values().items() if len(v) >= 4}
    places = {f"deployment.env.{k}": v for k, v in settings.deployment.env.items()}
    places.update({f"deployment.parameters.{k}": json.dumps(v) for k, v in settings.deployment.parameters.items()})
    for where, text in places.items():
        for label, secret in secrets.items():
            if secret in str(text):
                problems.append(
                    f"{where} contains the value of {label} in clear: use a Secret block placeholder "
                    "{{ prefect.blocks.secret.<name> }} instead"
                )
    return problems


def _non_loopback(settings: RunbookSettings) -> list[str]:
    problems = []
    for path in URL_SETTINGS:
        url = settings.value(path)
        if not url:
            continue
        host = urlsplit(url).hostname
        if urlsplit(url).scheme != "file" and host not in _LOOPBACK:
            problems.append(
                f"{path} points at {host} (from {settings.origin(path)}), but the sandbox profile only talks to "
                "loopback services; use the production profile for real services"
            )
    return problems
