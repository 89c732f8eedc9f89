"""One module per runbook step; steps never import each other and hand results on as typed outputs
(`runbook_lib.records.outputs`). Each exposes one class built from the notebook's step context and
parameters, whose methods are the notebook's cells."""

import importlib

MODULES = ("prerequisites", "merge_check", "deploy", "edge_secret", "e2e", "fallback", "health")


def load_all() -> None:
    """Import every step module (each defines the checks it records)."""
    for name in MODULES:
        importlib.import_module(f"runbook_lib.steps.{name}")
