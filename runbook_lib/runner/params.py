"""What a run is asked: the `-p key=value` parameters (refused when they look secret: papermill writes
parameters into the executed notebooks in clear) and the sequence of steps (every `NN_name.ipynb`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import RunbookError

RESERVED_PARAMS = {"profile": "--profile", "confirm": "--confirm", "run_dir": "--run-id / --outputs-dir"}
STEP_FILE = re.compile(r"^\d+_[A-Za-z0-9_.\-]+\.ipynb$")
_PARAM_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RunRefused(RunbookError):
    """The run did not start (bad option, lock held, nothing to resume); nothing was changed."""


# -- parameters ----------------------------------------------------------------------------------


def parse_param_args(args: Sequence[str]) -> dict[str, Any]:
    """`["key=value", ...]` -> dict; values are JSON when they parse as JSON (5, true, [..]), else text."""
    params: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise RunRefused(f"-p {arg!r}: expected key=value")
        try:
            params[key.strip()] = json.loads(raw)
        except ValueError:
            params[key.strip()] = raw
    return params


def check_params(params: Mapping[str, Any], known_secrets: Mapping[str, str]) -> None:
    """Refuse parameter overrides that are reserved, malformed or look secret (by key or value)."""
    problems = []
    for key, value in params.items():
        if not _PARAM_KEY.match(str(key)):
            problems.append(f"{key!r} is not a valid parameter name")
        elif key in RESERVED_PARAMS:
            problems.append(f"{key!r} is set by the runner: use {RESERVED_PARAMS[key]}")
        elif redaction.looks_like_secret_name(key):
            problems.append(f"{key!r} looks like a secret's name")
        text = json.dumps(value) if not isinstance(value, str) else value
        looks = redaction.credential_kinds(text, anon_jwt_is_public=False)
        looks += [f"the value of {name}" for name, secret in known_secrets.items()
                  if len(secret) >= redaction.MIN_SECRET_LENGTH and secret in text]
        if looks:
            problems.append(f"the value of {key!r} looks like {', '.join(looks)}")
    if problems:
        raise RunRefused(
            "refused -p parameter(s): " + "; ".join(problems) + ". Parameters are written in clear into the "
            "executed notebooks; secrets come from the profile's settings (environment, .env or sandbox.env)"
        )


# -- steps ---------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str  # "03_deploy"
    notebook: Path

    @property
    def short(self) -> str:
        return self.name.split("_", 1)[1] if STEP_FILE.match(self.notebook.name) else self.name


def discover_steps(notebooks_dir: Path) -> list[Step]:
    """The default sequence: every `NN_name.ipynb` in `notebooks_dir`, in order."""
    found = sorted(p for p in notebooks_dir.glob("*.ipynb") if STEP_FILE.match(p.name))
    return [Step(p.stem, p) for p in sorted(found, key=lambda p: (int(p.name.split("_", 1)[0]), p.name))]


def find_step(steps: Sequence[Step], wanted: str, option: str) -> int:
    """The index of `wanted` ("03", "03_deploy", "deploy", "03_deploy.ipynb") in `steps`."""
    key = wanted.strip().removesuffix(".ipynb")
    for i, step in enumerate(steps):
        number = step.name.split("_", 1)[0]
        if key in (step.name, step.short) or (key.isdigit() and number.isdigit() and int(key) == int(number)):
            return i
    raise RunRefused(f"{option} {wanted!r}: no such step; the steps are: {', '.join(s.name for s in steps) or 'none'}")


