"""runbook_lib.core.aio: Prefect's coroutines run to completion from plain Python and from inside a running loop (a kernel), with the caller's context, and time out."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from runbook_lib.core.aio import run_sync
from runbook_lib.core.profiles import load_settings


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
