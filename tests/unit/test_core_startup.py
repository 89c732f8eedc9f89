"""Start-up helpers (runbook_lib/core/startup.py) that the runner and the sandbox's processes share."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from runbook_lib.core.startup import lower_this_threads_priority
from tests.conftest import run_fresh


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have nice values of their own on Linux")
def test_lowering_a_threads_priority_leaves_the_rest_of_the_process_as_it_was():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def work() -> None:
        lower_this_threads_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["thread"] == max(main_before, 10)  # an absolute value; never raised above where it was
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
    # A thread started after it, from the main thread, runs at the process's priority.
    later: list[int] = []
    after = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    after.start()
    after.join()
    assert later == [main_before]


def test_exit_collections_are_skipped_once_registered_however_often_asked():
    seen = run_fresh(
        "import atexit, gc, json\n"
        "from runbook_lib.core.startup import skip_exit_collections\n"
        "before = atexit._ncallbacks()\n"
        "skip_exit_collections(); skip_exit_collections()\n"
        "registered = atexit._ncallbacks() - before\n"
        "frozen = gc.get_freeze_count()\n"
        "atexit._run_exitfuncs()  # what the interpreter runs at its exit, before its last collections: then\n"
        "# nothing is left for them (every tracked object frozen)\n"
        "print(json.dumps([registered, frozen, gc.get_freeze_count() > 1_000 and not gc.get_objects()]))\n"
    )
    assert seen == [1, 0, True]


# httpx's command-line client and what it loads.
HTTPX_CLI = ("httpx._main", "click", "rich", "pygments")
LOADED_CLI = f"[m for m in {HTTPX_CLI!r} if sys.modules.get(m) is not None]"

REPORT_HTTPX = (
    "import json, sys, httpx\n"
    f"cli = {LOADED_CLI}\n"
    "with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(204))) as c:\n"
    "    status = c.get('http://x.invalid/').status_code\n"
    "real = sys.modules.get('httpx._main') is not None and httpx.main is sys.modules['httpx._main'].main\n"
    "print(json.dumps({'cli': cli, 'status': status, 'main': 'the CLI' if real else 'the fallback'}))\n"
)


def test_httpx_without_its_command_line_client_works_as_before():
    # Without the helper, this environment's httpx loads its CLI and what the CLI needs.
    plain = run_fresh(REPORT_HTTPX)
    assert plain["cli"] == list(HTTPX_CLI) and plain["main"] == "the CLI", plain
    lean = run_fresh("from runbook_lib.core.startup import without_httpx_cli\nwithout_httpx_cli()\n" + REPORT_HTTPX)
    assert lean == {"cli": [], "status": 204, "main": "the fallback"}, lean  # httpx's own
    # Once httpx is imported, the helper changes nothing.
    late = run_fresh("import httpx\nfrom runbook_lib.core.startup import without_httpx_cli\nwithout_httpx_cli()\n"
                  + REPORT_HTTPX)
    assert late["main"] == "the CLI", late


def test_the_sandbox_services_that_speak_httpx_start_without_its_command_line_client():
    # As `python -m runbook_sandbox.<module>` imports them: the package first.
    for module in ("pgnet_relay", "supabase", "prefect_gateway"):
        seen = run_fresh(f"import json, sys, runbook_sandbox.{module}\n"
                      f"print(json.dumps({{'httpx': 'httpx' in sys.modules, 'cli': {LOADED_CLI}}}))\n")
        assert seen == {"httpx": True, "cli": []}, (module, seen)
