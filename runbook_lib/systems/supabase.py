"""The Supabase Management API, for the Edge Function's secrets (httpx).

`GET /v1/projects/{ref}/secrets` lists names with a SHA-256 digest of each value (never the
plaintext), `POST` upserts `[{"name", "value"}]`, `DELETE` removes `["NAME", ...]`.
429 and 5xx are retried with backoff, waiting what `retry-after` or `x-ratelimit-reset` asks
(capped); 401/403/404 become errors saying which setting to fix. Inputs are validated before
any request, so a bad name or value changes nothing.
"""

from __future__ import annotations

import email.utils
import hashlib
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import httpx

from runbook_lib.core import tls
from runbook_lib.core.errors import SupabaseApiError
from runbook_lib.core.secrets import redact, register_secret
from runbook_lib.core.settings import RunbookSettings, SupabaseSettings

MAX_NAME_LENGTH = 256
MAX_VALUE_LENGTH = 24576
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secret_digest(value: str) -> str:
    """The digest the API lists for a secret value: SHA-256, hex."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SecretDigest:
    name: str
    digest: str
    updated_at: str | None = None

    def matches(self, value: str) -> bool:
        return self.digest.lower() == secret_digest(value)


def check_secret_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SupabaseApiError(f"invalid secret name {name!r}: letters, digits and '_', not starting with a digit")
    if len(name) > MAX_NAME_LENGTH:
        raise SupabaseApiError(f"secret name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if name.upper().startswith("SUPABASE_"):
        raise SupabaseApiError(f"secret name {name!r} starts with SUPABASE_, which is reserved by Supabase")


def check_secret_value(name: str, value: str) -> None:
    if not isinstance(value, str) or value == "":
        raise SupabaseApiError(f"secret {name}: the value must be a non-empty string")
    if len(value) > MAX_VALUE_LENGTH:
        raise SupabaseApiError(f"secret {name}: the value is longer than {MAX_VALUE_LENGTH} characters")


# A request's attempts (429 and 5xx are retried) unless the caller says otherwise: supabase.max_attempts's default.
MAX_ATTEMPTS: int = SupabaseSettings.model_fields["max_attempts"].default


class SupabaseManagementApi:
    def __init__(
        self,
        api_url: str,
        access_token: str,
        project_ref: str,
        *,
        timeout: float = 30.0,
        max_attempts: int = MAX_ATTEMPTS,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not re.match(r"^[a-z]{20}$", project_ref or ""):
            raise SupabaseApiError(f"project ref {project_ref!r} is not 20 lowercase letters: check SUPABASE_PROJECT_REF")
        self.api_url = api_url.rstrip("/")
        self.project_ref = project_ref
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self._sleep = sleep
        register_secret(access_token, "SUPABASE_ACCESS_TOKEN")
        self._client = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            timeout=timeout,
            verify=tls.httpx_default(),  # httpx's own default, shared by the process's clients
        )

    @classmethod
    def from_settings(cls, settings: RunbookSettings, **kwargs: Any) -> "SupabaseManagementApi":
        """A client for the settings' project; its attempts per request are supabase.max_attempts unless
        `max_attempts` is passed (a check's shorter budget)."""
        settings.require("supabase.api_url", "supabase.access_token", "supabase.project_ref")
        kwargs.setdefault("max_attempts", settings.supabase.max_attempts)
        return cls(
            settings.value("supabase.api_url"), settings.value("supabase.access_token"),
            settings.value("supabase.project_ref"), **kwargs,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SupabaseManagementApi":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def _secrets_path(self) -> str:
        return f"/v1/projects/{self.project_ref}/secrets"

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        what = f"{method} {path}"
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self._client.request(method, path, json=json)
            except httpx.TransportError as exc:
                if attempt == self.max_attempts:
                    raise SupabaseApiError(f"{what}: cannot reach {self.api_url}: {type(exc).__name__}: {exc}") from None
                self._sleep(self._backoff(attempt))
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                if attempt == self.max_attempts:
                    reason = "rate limited (429)" if status == 429 else f"server error {status}"
                    raise SupabaseApiError(
                        f"{what}: {reason} after {attempt} attempts; try again later", status
                    )
                self._sleep(self.retry_delay(response, attempt))
                continue
            if status == 401:
                raise SupabaseApiError(f"{what}: the access token was rejected (401): check SUPABASE_ACCESS_TOKEN", 401)
            if status == 403:
                raise SupabaseApiError(
                    f"{what}: forbidden (403): the access token may not manage project {self.project_ref}'s "
                    "secrets; use a token of an account (or a scoped token) with access to this project", 403,
                )
            if status == 404:
                raise SupabaseApiError(f"{what}: not found (404): check SUPABASE_PROJECT_REF ({self.project_ref})", 404)
            if status >= 400:
                raise SupabaseApiError(f"{what}: {status} {response.reason_phrase}: {_message(response)}", status)
            return response
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait, 0.5 * 2 ** (attempt - 1)) * (1 + random.random() * 0.1)

    def retry_delay(self, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying: `retry-after` (seconds or an HTTP date), else
        `x-ratelimit-reset`, else exponential backoff; capped at max_wait.

        Supabase documents `x-ratelimit-reset` as the seconds until the window resets. Values no
        window can have (over 1000) are read as milliseconds, and epoch-sized values as a
        time of reset, so other conventions of the header do not make the runbook stall."""
        now = time.time()
        retry_after = response.headers.get("retry-after")
        if retry_after:
            try:
                return _cap(float(retry_after), self.max_wait)
            except ValueError:
                pass
            try:
                return _cap(email.utils.parsedate_to_datetime(retry_after).timestamp() - now, self.max_wait)
            except (TypeError, ValueError):
                pass
        reset = response.headers.get("x-ratelimit-reset")
        if reset:
            try:
                value = float(reset)
            except ValueError:
                value = None
            if value is not None:
                if value > 1e12:  # epoch milliseconds
                    return _cap(value / 1000 - now, self.max_wait)
                if value > 1e9:  # epoch seconds
                    return _cap(value - now, self.max_wait)
                if value > 1000:  # milliseconds until the reset
                    return _cap(value / 1000, self.max_wait)
                return _cap(value, self.max_wait)
        return self._backoff(attempt)

    # -- secrets ------------------------------------------------------------------------------
    def list_secrets(self) -> list[SecretDigest]:
        """Every secret of the project (Supabase's own SUPABASE_* defaults included), as digests."""
        response = self._request("GET", self._secrets_path)
        try:
            rows = response.json()
            return [SecretDigest(r["name"], r["value"], r.get("updated_at")) for r in rows]
        except (ValueError, KeyError, TypeError):
            raise SupabaseApiError(f"GET {self._secrets_path}: unexpected answer: {_message(response)}") from None

    def secret_digests(self) -> dict[str, SecretDigest]:
        return {s.name: s for s in self.list_secrets()}

    def upsert_secrets(self, secrets: Mapping[str, str], *, mask_values: bool = True) -> None:
        """Create or update secrets; every name and value is validated before the request. The values
        are masked in all output from then on, unless `mask_values` is False (a value that is no
        secret, such as a deployment id, which the runbook records)."""
        if not secrets:
            raise SupabaseApiError("no secrets to upsert")
        for name, value in secrets.items():
            check_secret_name(name)
            check_secret_value(name, value)
            if mask_values:
                register_secret(value, name)
        self._request("POST", self._secrets_path, json=[{"name": n, "value": v} for n, v in secrets.items()])

    def delete_secrets(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            raise SupabaseApiError("no secrets to delete")
        for name in names:
            check_secret_name(name)
        self._request("DELETE", self._secrets_path, json=names)


@dataclass(frozen=True)
class FunctionAnswer:
    status: int
    message: str  # the answer's `message` / `code` (or the start of its text), masked


def preflight_function(url: str, *, timeout: float = 20.0) -> FunctionAnswer:
    """A CORS preflight (`OPTIONS`) to an Edge Function: it starts no work, yet only a deployed
    function that boots answers it (Supabase's gateway passes preflights to the function unchecked).
    SupabaseApiError when the function's URL cannot be reached at all."""
    headers = {"Origin": "https://runbook.invalid", "Access-Control-Request-Method": "POST"}
    try:
        response = httpx.options(url, headers=headers, timeout=timeout, verify=tls.httpx_default())
    except httpx.HTTPError as exc:
        raise SupabaseApiError(f"OPTIONS {url}: cannot reach the Edge Function: {type(exc).__name__}: {exc}") from None
    message = _message(response, 200)
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("code") and not isinstance(body["code"], int):
            message = f"{body['code']}: {message}"
    except ValueError:
        pass
    return FunctionAnswer(response.status_code, redact(message))


def _cap(seconds: float, limit: float) -> float:
    return max(0.0, min(seconds, limit))


def _message(response: httpx.Response, limit: int = 300) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "message" in body:
            return redact(str(body["message"]))[:limit]  # masked before it is cut short
    except ValueError:
        pass
    text = redact(response.text)
    return text if len(text) <= limit else text[:limit] + "..."


def invoke_edge_function(url: str, anon_key: str, body: dict[str, Any], *, timeout: float = 30.0) -> tuple[int, Any]:
    """POST `body` to the Edge Function as the database trigger does (`Authorization: Bearer <anon
    key>`); (status, the JSON answer or its text). A transport failure is a SupabaseApiError."""
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {anon_key}"}, timeout=timeout,
                              verify=tls.httpx_default())
    except httpx.HTTPError as exc:
        raise SupabaseApiError(f"POST {url}: cannot reach the Edge Function: {type(exc).__name__}: {exc}") from None
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text[:500]
