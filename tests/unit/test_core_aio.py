"""runbook_lib core: settings, redaction, checks, the confirmation gate, run_sync, step results,
flow-source analysis, requirement mapping, git reading, and the database helpers against the
sandbox's real Postgres. Every test is bounded in time; no service is mocked."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from pathlib import Path

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.aio import run_sync
from runbook_lib.core.profiles import load_settings

ACCOUNT = "11111111-1111-4111-8111-111111111111"

WORKSPACE = "22222222-2222-4222-8222-222222222222"

@pytest.fixture(autouse=True)
def _fresh_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()

def write_sandbox_env(directory: Path, **extra: str) -> Path:
    values = {
        "PREFECT_API_URL": f"http://127.0.0.1:4201/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}",
        "PREFECT_API_KEY": "pnu_sandboxkey0123456789",
        "PREFECT_ACCOUNT_ID": ACCOUNT,
        "PREFECT_WORKSPACE_ID": WORKSPACE,
        "DATABASE_URL": "postgresql://postgres:sandbox-pw-123@127.0.0.1:5433/postgres",
        "SUPABASE_API_URL": "http://127.0.0.1:5000",
        "SUPABASE_ACCESS_TOKEN": "sbp_sandboxtoken0123456789",
        "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
        "SUPABASE_FUNCTIONS_URL": "http://127.0.0.1:5000/functions/v1",
        "SUPABASE_ANON_KEY": "eyJhbGciOiJIUzI1NiJ9.anon.sig",
        "RUNBOOK_REPO_URL": "http://127.0.0.1:5200/bencrane/data-enrichment-orchestration-v1.git",
        "ENRICHMENT_DISPATCH_URL": "http://127.0.0.1:5100",
        "MODAL_TOKEN_ID": "ak-sandbox0123",
        "MODAL_TOKEN_SECRET": "as-sandboxsecret0123",
    }
    values.update(extra)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sandbox.env"
    path.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    return path

@pytest.fixture
def sandbox_environ(tmp_path) -> dict[str, str]:
    write_sandbox_env(tmp_path / "sbx")
    return {"RUNBOOK_SANDBOX_DIR": str(tmp_path / "sbx")}

async def _answer(value, delay=0.0):
    await asyncio.sleep(delay)
    return value, threading.current_thread().name

def test_run_sync_without_a_running_loop():
    assert run_sync(_answer(42))[0] == 42
    assert run_sync(7) == 7  # a plain value (a sync Prefect call outside a kernel) passes through

def test_run_sync_inside_a_running_loop_uses_a_worker_thread_with_the_callers_context():
    var = contextvars.ContextVar("var", default="unset")

    async def read_var():
        return var.get()

    async def kernel_cell():
        var.set("from the cell")
        blocked = _answer(1)
        with pytest.raises(RuntimeError):
            asyncio.run(blocked)  # what fails in a Jupyter kernel
        blocked.close()
        value, thread = run_sync(_answer(5))
        return value, thread, run_sync(read_var())

    value, thread, seen = asyncio.run(kernel_cell())
    assert value == 5 and thread.startswith("runbook-run-sync") and seen == "from the cell"

def test_run_sync_times_out():
    async def cell():
        return run_sync(_answer(1, delay=5), timeout=0.2)

    with pytest.raises(TimeoutError, match="gave up after"):
        asyncio.run(cell())

def test_prefect_settings_reach_prefect_inside_a_running_loop(sandbox_environ):
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    from runbook_lib.systems.prefect import prefect_settings

    settings = load_settings("sandbox", environ=sandbox_environ)

    async def read_prefect_settings():
        return PREFECT_API_URL.value(), PREFECT_API_KEY.value()

    async def cell():
        with prefect_settings(settings):
            return run_sync(read_prefect_settings())

    assert asyncio.run(cell()) == (settings.prefect.api_url, "pnu_sandboxkey0123456789")
