"""One step's process: papermill runs the notebook in its own kernel and writes the verdict the
runner reads (`python -m runbook_lib.runner.step_process SPEC`). It dies with its kernel when the
runner disappears."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from runbook_lib.core import secrets as redaction


def execute_step(spec: dict[str, Any]) -> int:
    """Run one notebook with papermill; write {"error_type", "error"} (empty on success) to the
    result file. Dies with its kernel when the runner disappears."""
    import papermill

    runner_pid = os.getppid()

    def watch_runner() -> None:
        while os.getppid() == runner_pid:
            time.sleep(0.3)
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os._exit(3)

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
        # Masked before it is cut short (a secret cut in two is no longer recognised).
        result = {"ok": False, "error_type": type(exc).__name__,
                  "error": redaction.redact(" ".join(m.strip() for m in message[:3]))[:1000]}
    result = redaction.redact_obj(result)
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(spec["result"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(execute_step(json.loads(sys.argv[1])))
