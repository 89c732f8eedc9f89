"""Every check, defined once (one id, one title, one implementation), and the one mechanism that
runs them (`checks.base`). The catalog modules group the checks by what they look at; a step runs
the groups it needs (`run_checks(facts, GROUP)`), so steps 01 and 03 (and the fallback) hold the
same things to the same rules. `REGISTRY` lists every check id; `catalog_markdown()` renders it
for the README."""

from runbook_lib.checks import database, deployment, health, local, prefect, source, supabase
from runbook_lib.checks.base import REGISTRY, Check, CheckDef, CheckReport, Status, check, define, run_checks
from runbook_lib.checks.facts import Facts

__all__ = ["REGISTRY", "Check", "CheckDef", "CheckReport", "Facts", "Status", "catalog_markdown", "check", "define",
           "run_checks", "database", "deployment", "health", "local", "prefect", "source", "supabase"]


def catalog_markdown() -> str:
    """The table of every defined check (id, title, what it proves), in id order. Step-specific
    checks are defined in their step modules: import `runbook_lib.steps` first for the whole list."""
    lines = ["| id | check | what it proves |", "| --- | --- | --- |"]
    for id in sorted(REGISTRY):
        d = REGISTRY[id]
        lines.append(f"| `{id}` | {d.title_for(None)} | {d.proves} |")
    return "\n".join(lines)
