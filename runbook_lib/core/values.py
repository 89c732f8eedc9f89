"""Parsing of the values a person types: notebook parameters (papermill and the runner may pass
text), deployment ids, pip requirement strings. One parser per kind, used everywhere; a bad value raises a RunbookError
subclass naming the parameter (nothing is changed)."""

from __future__ import annotations

import uuid
from typing import Any, Iterable

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
        raise ParameterError(f"{what} {str(value)[:80]!r} is not a UUID") from None


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
