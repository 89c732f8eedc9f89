"""Start-up helpers (runbook_lib/core/startup.py) that the runner and the sandbox's processes share."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from runbook_lib.core.startup import lower_this_threads_priority


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
