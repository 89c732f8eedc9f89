"""One step's process: papermill runs the notebook in its own kernel and writes the verdict the
runner reads (`python -m runbook_lib.runner.step_process SPEC`).

Stopping it is graceful: on SIGTERM or SIGINT (the runner forwards its own), or when the runner
disappears (killed, even with SIGKILL), the kernel is interrupted first (SIGINT: a KeyboardInterrupt
in the running cell, so its `finally` blocks run, e.g. step 05's cleanup of its test batch), given
`interrupt_grace` seconds (spec, default DEFAULT_INTERRUPT_GRACE) to finish, and only then killed."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from runbook_lib.core import secrets as redaction

DEFAULT_INTERRUPT_GRACE = 30.0  # seconds a kernel gets, after its KeyboardInterrupt, before it is killed


def _say(message: str) -> None:
    """A line for the runner's log; the runner may be gone (its end of the pipe closed)."""
    try:
        print(f"step process: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _kill_children() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class _Stopper:
    """Interrupts the kernel once (SIGINT to this process's direct children: the kernel), then kills
    every child when the notebook has not ended within the grace period."""

    def __init__(self, grace: float):
        self.grace = grace
        self.finished = threading.Event()  # papermill returned (the notebook ended, however)
        self._once = threading.Lock()
        self.why: str | None = None

    def stop(self, why: str) -> None:
        if not self._once.acquire(blocking=False):
            return
        self.why = why
        _say(f"{why}: interrupting the kernel (KeyboardInterrupt), {self.grace:g}s before it is killed")
        for child in psutil.Process().children():
            try:
                child.send_signal(signal.SIGINT)
            except psutil.NoSuchProcess:
                pass
        if not self.finished.wait(self.grace):
            _say(f"the kernel did not stop within {self.grace:g}s: killed")
            _kill_children()

    def on_signal(self, signum: int, _frame: Any) -> None:
        threading.Thread(target=self.stop, args=(f"received {signal.Signals(signum).name}",), daemon=True).start()


def execute_step(spec: dict[str, Any]) -> int:
    """Run one notebook with papermill; write {"error_type", "error"} (empty on success) to the
    result file. Interrupted gracefully on SIGTERM/SIGINT or when the runner disappears (module doc)."""
    import papermill

    runner_pid = os.getppid()
    stopper = _Stopper(float(spec.get("interrupt_grace") or DEFAULT_INTERRUPT_GRACE))

    def watch_runner() -> None:
        while os.getppid() == runner_pid:
            time.sleep(0.3)
        stopper.stop("the runner disappeared")
        stopper.finished.wait(10)  # the record of an interrupted notebook is written, nobody reads the verdict
        _kill_children()
        os._exit(3)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopper.on_signal)
    threading.Thread(target=watch_runner, daemon=True).start()
    result: dict[str, Any] = {"ok": True}
    try:
        papermill.execute_notebook(
            spec["input"], spec["output"], parameters=spec["parameters"], cwd=spec["cwd"],
            kernel_name=spec["kernel_name"], execution_timeout=spec["execution_timeout"],
            progress_bar=False, log_output=False, request_save_on_cell_execute=True,
        )
    except papermill.PapermillExecutionError as exc:
        result = {"ok": False, "error_type": exc.ename, "error": exc.evalue}
    except BaseException as exc:  # CellTimeoutError, DeadKernelError, NoSuchKernel...: all failures
        message = str(exc).strip().split("\n")
        result = {"ok": False, "error_type": type(exc).__name__, 
                  "error": redaction.redact(" ".join(m.strip() for m in message[:3]))[:1000]}  # masked, then cut short
    finally:
        stopper.finished.set()
    if stopper.why is not None:
        result["interrupted"] = stopper.why
    result = redaction.redact_obj(result)
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(spec["result"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(execute_step(json.loads(sys.argv[1])))
