"""Masking of secret values wherever the runbook's output goes: text, logs, stdout, notebook display.

Known secrets (API keys, tokens, the database password, Secret block values once read) are
registered with `register_secret`; `redact(text)` replaces each with `[redacted:<label>]`, also in
its URL-encoded form. Two patterns are masked even when the value is not known: the password of a
URL (`scheme://user:password@host`) and a `Bearer <token>`.

The Supabase anon key is deliberately NOT treated as a secret: it is a public key (shipped in
browser code, and written into the trigger's SQL by design); the service_role key would be.

This module owns every rule about what a secret looks like: the shapes of credentials
(`CREDENTIAL_SHAPES`, `credential_kinds`), secret-like names (`looks_like_secret_name`), JWT roles,
and `clear_text_secrets` (what a text holds in clear, described, never the values).

`install()` puts the masking in front of logging (every record, whatever the logger), stdout and
stderr, and, inside IPython, rich display output and tracebacks.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import sys
import threading
from typing import Any
from urllib.parse import quote, quote_plus

# Shorter values are not masked: masking "abc" everywhere would garble the output, and such a
# value is no secret anyway.
MIN_SECRET_LENGTH = 4

_lock = threading.Lock()
_secrets: dict[str, str] = {}  # value -> label
_pattern: re.Pattern[str] | None = None

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]+:)(?P<pw>[^\s@/]+)(?=@)")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<tok>[A-Za-z0-9._~+/=\-]{8,})")

# -- what a secret looks like ------------------------------------------------------------------------

# Credentials recognisable by their shape, with how to name them (never the value).
CREDENTIAL_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a Supabase access token (sbp_...)", re.compile(r"\bsbp_[A-Za-z0-9]")),
    ("a Prefect API key (pnu_...)", re.compile(r"\bpnu_[A-Za-z0-9]")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]|github_pat_[A-Za-z0-9_])")),
    ("a URL with a password", re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]*:[^\s@/'\"]+@")),
    ("a password literal", re.compile(r"(?i)\bpassword\s*(?::=|=|:)\s*'[^']+'")),
)
JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
# Names under which only a secret (or a Secret block placeholder) belongs.
_SECRET_NAME = re.compile(
    r"key|token|secret|passw|pwd|dsn|credential|private|connection_string|database_url", re.IGNORECASE
)


def looks_like_secret_name(name: str) -> bool:
    """True for names such as API_KEY, MODAL_TOKEN_SECRET, db_password, dsn."""
    return bool(_SECRET_NAME.search(name))


def jwt_role(token: str) -> str | None:
    """The `role` claim of a JWT (not verified: only read), or None when it has none or is no JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return claims.get("role") if isinstance(claims, dict) else None


def credential_kinds(text: str, *, public: tuple[str, ...] = (), anon_jwt_is_public: bool = True) -> list[str]:
    """What credentials `text` holds, described (never the values): JWTs other than anon ones (all
    JWTs with `anon_jwt_is_public=False`), tokens by prefix, URLs with a password, password literals.
    `public` values (the anon key) are allowed."""
    found: list[str] = []
    for token in JWT.findall(text):
        if token in public:
            continue
        role = jwt_role(token)
        if not anon_jwt_is_public:
            found.append("a JWT")
        elif role != "anon":
            found.append(f"a JWT with role {role!r}" if role else "a JWT that is not the anon key")
    found += [what for what, pattern in CREDENTIAL_SHAPES if pattern.search(text)]
    return list(dict.fromkeys(found))


def clear_text_secrets(source: str, known: dict[str, str] | None = None, public: tuple[str, ...] = ()) -> list[str]:
    """What secrets a text (a SQL function's source, a job variable) holds in clear, described:
    credential shapes (`credential_kinds`) and any of the `known` secret values (label -> value)."""
    found = credential_kinds(source, public=public)
    found += [f"the value of {label}" for label, value in (known or {}).items()
              if value and len(value) >= 8 and value in source]
    return list(dict.fromkeys(found))


def register_secret(value: str | None, label: str = "secret") -> None:
    """Mask `value` (and its URL-encoded forms) from now on, shown as `[redacted:<label>]`."""
    global _pattern
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        for form in {value, quote(value, safe=""), quote_plus(value)}:
            _secrets.setdefault(form, label)
        # Longest first, so a secret containing another one is masked whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in alternatives))


def forget_secrets() -> None:
    """Drop every registered value (tests; a kernel switching profiles)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def registered_labels() -> list[str]:
    with _lock:
        return sorted(set(_secrets.values()))


def redact(text: str) -> str:
    """`text` with every known secret and every URL password / bearer token masked."""
    if not isinstance(text, str) or not text:
        return text
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(lambda m: f"[redacted:{_secrets.get(m.group(0), 'secret')}]", text)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)
    return _BEARER.sub(lambda m: m.group("head") + "***", text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like structure (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


# -- logging ---------------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """A handler/logger filter masking secrets in the formatted message and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to the handler to report
        return
    masked = redact(message)
    if masked != message:
        record.msg, record.args = masked, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


def install_log_redaction() -> None:
    """Mask secrets in every log record created from now on, whichever logger and handler."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_runbook_redaction", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        _redact_record(record)
        return record

    factory._runbook_redaction = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


# -- stdout / stderr -------------------------------------------------------------------------------


class RedactingStream:
    """A text stream proxy that masks secrets in what is written, delegating everything else."""

    _runbook_redaction = True

    def __init__(self, inner: Any):
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install_stream_redaction() -> None:
    """Wrap sys.stdout and sys.stderr (once) so printed secrets are masked."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not getattr(stream, "_runbook_redaction", False):
            setattr(sys, name, RedactingStream(stream))


# -- IPython ---------------------------------------------------------------------------------------


def install_ipython_redaction() -> bool:
    """Inside IPython, mask secrets in rich display data and in tracebacks. False outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    formatter = shell.display_formatter
    if not getattr(formatter, "_runbook_redaction", False):
        original_format = formatter.format

        def format(obj: Any, include: Any = None, exclude: Any = None) -> Any:
            data, metadata = original_format(obj, include=include, exclude=exclude)
            return redact_obj(data), metadata

        formatter.format = format
        formatter._runbook_redaction = True
    if not getattr(shell, "_runbook_traceback_redaction", False):
        original_showtraceback = shell._showtraceback

        def _showtraceback(etype: Any, evalue: Any, stb: Any) -> Any:
            # The kernel sends str(evalue) and stb to the front end: both masked.
            return original_showtraceback(etype, redact(str(evalue)), [redact(line) for line in stb])

        shell._showtraceback = _showtraceback
        shell._runbook_traceback_redaction = True
    return True


def install() -> None:
    """Every hook: logging, stdout/stderr, and IPython display when running in a kernel."""
    install_log_redaction()
    install_stream_redaction()
    install_ipython_redaction()
