"""Checks of this machine: Python, Prefect, git."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from runbook_lib.checks.base import Outcome, check, ok, warn
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import RunbookError


def python_outcome(runtime: str) -> Outcome:
    """This interpreter against the runtime's Python version `runtime` (e.g. "3.12")."""
    here = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= (3, 14):
        return warn(
            f"Python {here} here; the managed runtime image runs Python {runtime}. On 3.14 some of the flow's "
            "packages may have no wheels yet, and Prefect's sync-looking calls (from_source, deploy, Secret.load) "
            "return coroutines inside a notebook kernel: the deploy and the runtime would not behave alike",
            f"run the runbook with Python {runtime}, the runtime's version (e.g. `uv venv --python {runtime}` or "
            f"`python{runtime} -m venv .venv`), so what passes here also imports in the runtime",
            python=here, runtime_python=runtime,
        )
    note = "the same version" if f"{sys.version_info[0]}.{sys.version_info[1]}" == runtime else f"Python {runtime}"
    return ok(f"Python {here} here; the managed runtime image runs {note}", python=here, runtime_python=runtime)


@check("local.python", "Python version",
       proves="this machine's Python behaves like the managed runtime's (3.14 is warned: no wheels, coroutines in kernels)")
def python_version(facts: Facts) -> Outcome:
    return python_outcome(facts.settings.deployment.runtime_python)


@check("local.prefect", "Prefect installed (3.x)", proves="Prefect 3 is importable here (flow.from_source)",
       remediation="install the project: `make venv` (prefect 3.x, pinned in constraints.txt)")
def prefect_version(facts: Facts) -> Outcome:
    try:
        import prefect
    except ImportError as exc:
        raise RunbookError(f"prefect is not importable: {exc}") from None
    version = prefect.__version__
    major = re.match(r"\d+", version)
    if not major or int(major.group()) < 3:
        raise RunbookError(f"prefect {version} is installed; the runbook deploys with Prefect 3 (flow.from_source)")
    return ok(f"prefect {version}", version=version)


@check("local.git", "git available", proves="the git command runs here (the runbook reads and merges the repository)",
       remediation="install git (Debian/Ubuntu: `apt-get install git`; macOS: `xcode-select --install`)")
def git_version(facts: Facts) -> Outcome:
    git = shutil.which("git")
    if not git:
        raise RunbookError("the git command is not on PATH (the runbook reads and merges the flow's repository with it)")
    out = subprocess.run([git, "--version"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RunbookError(f"`git --version` failed: {out.stderr.strip()}")
    return ok(out.stdout.strip(), path=git)


LOCAL = [python_version, prefect_version, git_version]
