"""The orchestrator's claim lease, for the runbook (the health check flags QUEUED items older than it).

The flow cannot import the runbook (it runs alone on the managed pool), so the default lives in one
place, the flow itself: `CLAIM_LEASE_SECONDS` at the top of `flows/src/orchestrator.py`, read here
from its syntax tree. A deployment may set the flow parameter `claim_lease_seconds` (in the
profile: `[deployment.parameters] claim_lease_seconds = ...`); its runs then use that value.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runbook_lib.core import paths as project
from runbook_lib.core.errors import FlowSourceError

CONSTANT = "CLAIM_LEASE_SECONDS"
PARAMETER = "claim_lease_seconds"


def flow_file() -> Path:
    return project.project_root() / "flows" / "src" / "orchestrator.py"


def flow_default(source: str | None = None) -> float:
    """`CLAIM_LEASE_SECONDS` of the flow's source (default: the project's flows/src/orchestrator.py)."""
    where = "the given source" if source is not None else str(flow_file())
    text = flow_file().read_text() if source is None else source
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise FlowSourceError(f"cannot read {CONSTANT} from {where}: {exc}") from None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == CONSTANT and node.value is not None:
            value = node.value.value if isinstance(node.value, ast.Constant) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
                return float(value)
            raise FlowSourceError(f"{CONSTANT} in {where} is not a positive number literal")
    raise FlowSourceError(f"{where} defines no {CONSTANT}")


def claim_lease_seconds(parameters: Mapping[str, Any] | None = None, source: str | None = None) -> tuple[float, str]:
    """(the lease the orchestrator's runs use, where it comes from): the deployment's parameter
    `claim_lease_seconds` when `parameters` (a deployment's, or the profile's
    `deployment.parameters`) set it, else the flow's default."""
    value = (parameters or {}).get(PARAMETER)
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise FlowSourceError(f"deployment parameter {PARAMETER} must be a positive number of seconds, got {value!r}")
        return float(value), f"the deployment's parameter {PARAMETER}"
    return flow_default(source), f"the flow's default ({CONSTANT})"
