"""How our Python processes start and end faster: import-time tuning shared by the runner's step
processes and kernels and the sandbox's Prefect server and managed worker; work done ahead of need at
a lower priority (the runner's warm-up, the worker's scan); no collections at exit (the runner, the
sandbox's commands).

The bottom layer: the standard library only.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator


def without_iri_formats() -> None:
    """Leave out jsonschema's optional `iri` / `iri-reference` format checks in this process: jsonschema
    imports `rfc3987_syntax` for them, which builds a Lark grammar as it is imported (a fifth of the
    Prefect server's import, ~2 s of every process that imports nbformat or Prefect under load). No
    schema of nbformat's or Prefect's uses those formats; every other check stays."""
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]  # import -> ImportError


def without_httpx_cli() -> None:
    """Leave out httpx's command-line client in this process, before httpx is imported: `import httpx`
    imports it (`httpx._main`) whenever click, rich and pygments are installed, as they are here
    (Prefect's and typer's dependencies): ~75 ms of CPU and ~6 MiB resident in a process that never runs
    it. httpx's own fallback stands in for `httpx.main`; nothing else of httpx changes. Where httpx is
    already imported, nothing changes at all."""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # import -> ImportError


@contextmanager
def no_collections_while_importing(*, freeze: bool = False) -> Iterator[None]:
    """Cyclic garbage collection off for a block of heavy imports (Prefect's: millions of objects and
    no garbage worth a collection; about a third less CPU time), then on again. With `freeze`, what the
    block left behind is moved out of the collector's sight: it lives as long as the process."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


_exit_collections_skipped = False


def skip_exit_collections() -> None:
    """At this process's exit (atexit: once every handler registered before has run, files closed),
    skip the interpreter's last cyclic garbage collections over what the process imported and built
    (Prefect, nbconvert, pydantic, psycopg): they cost 0.2-1.5 s after the work has ended, and the
    process's end is what its caller waits for. The OS frees the memory; nothing is left unwritten.
    Registered once, whatever the number of calls."""
    global _exit_collections_skipped
    if not _exit_collections_skipped:
        _exit_collections_skipped = True
        atexit.register(gc.freeze)


def lower_this_threads_priority(niceness: int = 10) -> None:
    """Run the calling thread (only it: Linux schedules threads apart) at a lower priority, for work done
    ahead of need while something else is what a user waits for. It cannot be raised back without
    privilege, so it is for threads that end with their work; where threads have no nice value of
    their own, nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def declared_warm_imports(modules: Iterable[str]) -> list[str]:
    """What `modules` (imported here) name in their `WARM_IMPORTS`: the modules they import lazily when
    their code runs (a step that calls Prefect names Prefect's client: seconds of CPU at the first
    call). A module that cannot be imported names nothing."""
    found: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - left for the code that imports it to raise
            continue
        found += [m for m in getattr(module, "WARM_IMPORTS", ()) if m not in found]
    return found


def warm_up(modules: Iterable[str], *, freeze: bool = True) -> None:
    """Import `modules` and what they declare in `WARM_IMPORTS` (a prewarmed kernel, before its notebook
    is due; a step as it starts, in any kernel), without jsonschema's `iri` formats and without cyclic
    collections; with `freeze`, what they import is moved out of the collector's sight (it lives as long
    as the kernel). A failing import is left for the code that needs the module to raise."""
    without_iri_formats()
    with no_collections_while_importing(freeze=freeze):
        for name in declared_warm_imports(modules):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - as above
                pass
