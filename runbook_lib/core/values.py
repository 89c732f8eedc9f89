"""Parsing of the values a person types: notebook parameters (papermill and the runner may pass
text), deployment ids, pip requirement strings, database URLs. One parser per kind, used everywhere; a bad value raises a RunbookError
subclass naming the parameter (nothing is changed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from runbook_lib.core.errors import ParameterError, RequirementError, RunbookError

_TRUE = frozenset({"1", "true", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "no", "n", "off"})
_UNSET = frozenset({"", "none", "null"})


def parse_flag(name: str, value: Any, *, error: type[RunbookError] = ParameterError) -> bool | None:
    """A true/false parameter: True / False / None (unset). Text such as "true", "no", "1", "None"
    is understood; anything else raises `error` naming the parameter."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _UNSET:
        return None
    raise error(f"parameter {name} must be true or false, got {value!r}")


def parse_uuid(value: Any, what: str = "deployment_id") -> str:
    """The canonical (lowercase) text of a UUID, or a ParameterError saying what is wrong."""
    try:
        return str(uuid.UUID(str(value).strip()))
    except (ValueError, AttributeError, TypeError):
        # Masked before it is cut short: a secret cut in two would no longer be recognised.
        from runbook_lib.core.secrets import redact

        raise ParameterError(f"{what} {redact(str(value))[:80]!r} is not a UUID") from None


def parse_requirement(text: str) -> Requirement:
    """A pip requirement string (`name[extras] specifier ; marker`), or a clear RequirementError."""
    if not isinstance(text, str) or not text.strip():
        raise RequirementError(f"empty pip requirement {text!r}")
    if text != text.strip():
        raise RequirementError(f"pip requirement {text!r} has surrounding whitespace")
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        raise RequirementError(f"invalid pip requirement {text!r}: {reason}") from None


def validate_requirements(texts: Iterable[str]) -> list[Requirement]:
    """Every requirement parsed; one error naming all the invalid ones and any duplicate."""
    parsed, problems, seen = [], [], {}
    for text in texts:
        try:
            req = parse_requirement(text)
        except RequirementError as exc:
            problems.append(str(exc))
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            problems.append(f"{req.name!r} is listed twice ({seen[name]!r} and {text!r})")
        seen[name] = text
        parsed.append(req)
    if problems:
        raise RequirementError("; ".join(problems))
    return parsed


@dataclass(frozen=True)
class Dsn:
    """A PostgreSQL URL's parts (the password percent-decoded). Never printed: it holds the password."""

    user: str | None
    password: str | None
    host: str
    port: int
    database: str

    def __repr__(self) -> str:  # a traceback or a debugger never shows the password
        return f"Dsn(host={self.host!r}, port={self.port}, database={self.database!r})"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def parse_dsn(text: str) -> Dsn:
    """A `postgresql://user:password@host:port/database` URL, or a ValueError saying what is wrong
    WITHOUT quoting any part of it (a misplaced character may be the password's)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("is empty")
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError("is not a PostgreSQL connection URL (postgresql://user:password@host:port/database)")
    userinfo, at, _ = rest.rpartition("@")
    if at and any(c in userinfo for c in "/?#"):
        raise ValueError("has a '/', '?' or '#' in its user or password that is not percent-encoded: write them "
                         "as %2F, %3F and %23 (e.g. urllib.parse.quote(password, safe=''))")
    if "@" in userinfo:
        raise ValueError("has an '@' in its user or password that is not percent-encoded: write it as %40")
    parts = urlsplit(text.strip())
    if not parts.hostname:
        raise ValueError("has no host (postgresql://user:password@host:port/database)")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return Dsn(user=unquote(parts.username) if parts.username else None,
               password=unquote(parts.password) if parts.password else None,
               host=parts.hostname, port=port or 5432, database=parts.path.lstrip("/") or "postgres")
