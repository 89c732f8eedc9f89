"""Run Prefect's async API from a notebook cell and from plain Python alike.

In a Jupyter kernel an event loop is already running in the main thread, so `asyncio.run` fails
("cannot be called from a running event loop") and Prefect's sync-looking calls (`from_source`,
`.deploy()`, `Secret.load()`) return coroutines. `run_sync(x)` takes either a coroutine or a
plain value: a value is returned as is; a coroutine is run to completion, on a fresh loop in a
worker thread when a loop is already running here, else with `asyncio.run`. The caller's
context variables (Prefect's settings context among them) are carried into the worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
from typing import Any, Awaitable, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run_sync(value: Awaitable[T] | T, timeout: float | None = DEFAULT_TIMEOUT) -> T:
    """The result of `value`: awaited to completion if awaitable, else `value` itself.

    Raises TimeoutError when a coroutine run in a worker thread takes longer than `timeout`
    seconds (None: no limit); the coroutine is then cancelled.
    """
    if not inspect.isawaitable(value):
        return value  # type: ignore[return-value]
    coro = value if inspect.iscoroutine(value) else _as_coroutine(value)
    if _running_loop() is None:
        return asyncio.run(_with_timeout(coro, timeout))
    context = contextvars.copy_context()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="runbook-run-sync") as pool:
        future = pool.submit(context.run, asyncio.run, _with_timeout(coro, timeout))
        return future.result()


async def _with_timeout(coro: Awaitable[T], timeout: float | None) -> T:
    if timeout is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {getattr(coro, '__qualname__', 'a coroutine')}") from None


def call_sync(fn: Any, *args: Any, timeout: float | None = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
    """Call a Prefect function that may return a coroutine (inside a kernel) or a value, and
    return its result either way."""
    return run_sync(fn(*args, **kwargs), timeout=timeout)
