"""Flow sources for the unit tests, shaped like flows/src/orchestrator.py (module docstring, psycopg2,
dotenv, prefect's flow and Secret, subflows, an entrypoint `orchestrator_main` whose parameters all
have defaults, as the Edge Function starts runs with none)."""

ENTRYPOINT = "src/orchestrator.py"

ORCHESTRATOR = '''"""Data-enrichment orchestrator (test copy): advance completed steps, then drain PENDING work."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import psycopg2
from dotenv import load_dotenv
from prefect import flow, get_run_logger
from prefect.blocks.system import Secret

DSN_SECRET_BLOCK = "postgres-connection-string"


def get_database_url() -> str:
    return Secret.load(DSN_SECRET_BLOCK, _sync=True).get()


@flow(name="advance_completed_items")
def advance_completed_items(batch_size: int = 50, batch_id: Optional[str] = None) -> dict:
    return {"advanced": 0}


@flow(name="dispatch_pending_items")
def dispatch_pending_items(batch_size: int = 50, batch_id: Optional[str] = None) -> dict:
    import modal  # imported when the run dispatches: still needed by the runtime

    return {"dispatched": 0, "app": modal.__name__}


@flow(name="orchestrator_main")
def orchestrator_main(batch_size: int = 50, batch_id: Optional[str] = None,
                      time_budget_seconds: float = 600.0) -> dict:
    load_dotenv()
    with psycopg2.connect(get_database_url()):
        pass
    return {"sequencer": advance_completed_items(batch_size=batch_size, batch_id=batch_id),
            "dispatcher": dispatch_pending_items(batch_size=batch_size, batch_id=batch_id)}
'''

# The entrypoint is a task, not a flow (the module has two other flows).
NOT_A_FLOW = ORCHESTRATOR.replace("from prefect import flow, get_run_logger",
                                  "from prefect import flow, get_run_logger, task").replace(
    '@flow(name="orchestrator_main")', "@task(retries=2)")

# The entrypoint requires a parameter the deployment does not pass.
REQUIRED_PARAMETER = ORCHESTRATOR.replace(
    "def orchestrator_main(batch_size: int = 50,", "def orchestrator_main(client_id: str, batch_size: int = 50,")

# The flow's name is computed at import time.
COMPUTED_NAME = ORCHESTRATOR.replace('@flow(name="orchestrator_main")', '@flow(name=os.environ["FLOW_NAME"])')

# The entrypoint imports a repository module (from its own directory) that imports scikit-learn.
WITH_HELPER = ORCHESTRATOR.replace("import psycopg2\n", "import psycopg2\nfrom scoring import score_items\n")
HELPER = "import sklearn.linear_model\n\n\ndef score_items(items):\n    return sklearn.linear_model.LinearRegression()\n"

# An orchestrator with annotated parameters, helpers that load Secret blocks in several ways (some
# swallowing the error), and a function that is not a flow.

ANNOTATED_ORCHESTRATOR = '''
import os
import prefect
from prefect import flow as pflow
from prefect.blocks.system import Secret
import psycopg2
from dotenv import load_dotenv
from src.sequencer import advance_completed_items
from dispatcher import dispatch_pending_items


def get_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except Exception as exc:
        print("could not load", exc)
        return os.environ.get("DATABASE_URL", "")


def strict_dsn():
    try:
        return Secret.load("postgres-connection-string").get()
    except (KeyError, Exception):
        raise RuntimeError("no dsn")


def nested():
    try:
        try:
            return prefect.blocks.system.Secret.load("modal-token-id")
        except ValueError:
            raise
    except:
        return None


def narrow():
    try:
        return Secret.load(name="modal-token-secret")
    except KeyError:
        return None


@pflow(log_prints=True)
def orchestrator_main(batch_size: int = 50, dry_run: bool = False):
    import modal
    advance_completed_items()
    return dispatch_pending_items(batch_size, os.environ["MODAL_TOKEN_ID"])


def not_a_flow(x):
    return x
'''
