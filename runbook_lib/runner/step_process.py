"""One step's process: papermill runs the notebook in its own kernel and writes the verdict the
runner reads (`python -m runbook_lib.runner.step_process SPEC`).

Stopping it is graceful: on SIGTERM or SIGINT (the runner forwards its own), or when the runner
disappears (killed, even with SIGKILL), the kernel is interrupted first (SIGINT: a KeyboardInterrupt
in the running cell, so its `finally` blocks run, e.g. step 05's cleanup of its test batch), given
`interrupt_grace` seconds (spec, default DEFAULT_INTERRUPT_GRACE) to finish, and only then killed."""

from __future__ import annotations

import ast
import gc
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
from runbook_lib.core.startup import without_iri_formats

PROCESS_START = time.time()
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


START_TIMEOUT = 60.0  # seconds for a kernel to start and answer (papermill's default)


def notebook_imports(notebook: str | Path) -> list[str]:
    """The modules a notebook's code cells import at their top level (absolute imports), in order."""
    import nbformat

    found: list[str] = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # magics, shell escapes: not Python
            continue
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [n for n in names if n not in found]
    return found


def warm_up_code(modules: list[str]) -> str:
    """Code that imports `modules` in a kernel, and what they declare they import lazily
    (`WARM_IMPORTS`: a step that calls Prefect names Prefect's client), and leaves no name behind; a
    failing import is left for the notebook's own cell to raise."""
    return ("def __runbook_warm_up(modules):\n"
            "    from runbook_lib.core.startup import warm_up\n"
            "    warm_up(modules)\n"
            f"__runbook_warm_up({modules!r})\n"
            "del __runbook_warm_up\n")


class _WarmKernel:
    """A kernel started (and its imports done) before the step is due: what papermill would start,
    through nbclient's own kernel manager, in the notebook's directory. The warm-up runs silently
    (no output, no history, no execution count): the executed notebook is what a cold start gives."""

    def __init__(self, spec: dict[str, Any], phases: dict[str, float]):
        import nbformat
        from nbclient import NotebookClient

        from runbook_lib.runner.kernel import KernelManager

        nb = nbformat.read(spec["input"], as_version=4)
        name = spec.get("kernel_name") or nb.metadata.get("kernelspec", {}).get("name")
        if not name:
            raise ValueError("No kernel name found in notebook and no override provided.")
        # timeout=None: the warm-up imports may take long on a busy machine; the runner's signals still stop it
        self.client = NotebookClient(nbformat.v4.new_notebook(), kernel_name=name, startup_timeout=START_TIMEOUT,
                                     timeout=None, kernel_manager_class=KernelManager)
        self.client.km = self.client.create_kernel_manager()
        self.km = self.client.km
        self.phases = phases
        try:
            self.client.start_new_kernel(cwd=spec["cwd"])  # launched: it boots while this process imports papermill
        except BaseException:
            self.shutdown()
            raise

    def warm_up(self, notebook: str) -> None:
        """Wait for the kernel, then import the notebook's modules in it, and what they import lazily."""
        try:
            self.client.start_new_kernel_client()
            self.phases["kernel_ready"] = time.time()
            kc = self.client.kc
            msg_id = kc.execute(warm_up_code(notebook_imports(notebook)),
                                silent=True, store_history=False)
            self.client.wait_for_reply(msg_id)
            self.phases["imports_done"] = time.time()
        except BaseException:
            self.shutdown()
            raise
        finally:
            if self.client.kc is not None:
                self.client.kc.stop_channels()
                self.client.kc = None

    def shutdown(self) -> None:
        from jupyter_core.utils import run_sync

        try:
            if run_sync(self.km.is_alive)():
                run_sync(self.km.shutdown_kernel)(now=False)
        except RuntimeError:
            pass
        finally:
            run_sync(self.km.cleanup_resources)()


def _wait_for_go(stopper: _Stopper) -> bool:
    """Prewarmed: wait until the runner writes `go` (True), or closes our stdin (False: not needed)."""
    answer: list[str] = []
    said = threading.Event()

    def read() -> None:
        try:
            answer.append(sys.stdin.readline().strip())
        except (OSError, ValueError):
            answer.append("")
        said.set()

    threading.Thread(target=read, daemon=True).start()
    while not said.wait(0.2):
        if stopper.why is not None:
            return False
    return answer == ["go"]


def execute_step(spec: dict[str, Any]) -> int:
    """Run one notebook with papermill; write {"error_type", "error"} (empty on success) to the
    result file. Interrupted gracefully on SIGTERM/SIGINT or when the runner disappears (module doc).

    With `prewarm` in the spec, the kernel is started and the notebook's imports done at once; the
    notebook runs only when the runner writes `go` on stdin (EOF: not needed, the kernel is stopped,
    nothing is written). The result's `phases` are the wall-clock times (epoch seconds) of each phase."""
    phases: dict[str, float] = {"process_start": PROCESS_START}
    runner_pid = os.getppid()
    stopper = _Stopper(float(spec.get("interrupt_grace") or DEFAULT_INTERRUPT_GRACE))

    def watch_runner() -> None:
        while os.getppid() == runner_pid:
            time.sleep(0.3)
        stopper.stop("the runner disappeared")
        stopper.finished.wait(10)  # the record of an interrupted notebook is written, nobody reads the verdict
        _kill_children()
        kernels = sys.modules.get("runbook_lib.runner.kernel")  # imported once a kernel is started
        if kernels is not None:
            kernels.remove_connection_files()  # what the kernel managers' cleanup would have removed
        os._exit(3)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopper.on_signal)
    threading.Thread(target=watch_runner, daemon=True).start()
    warm: _WarmKernel | None = None
    if spec.get("prewarm"):
        try:
            warm = _WarmKernel(spec, phases)
        except Exception as exc:  # noqa: BLE001 - papermill starts its own kernel at go, and fails as it would
            _say(f"could not prewarm a kernel ({type(exc).__name__}: {redaction.redact(str(exc))[:300]}); "
                 "papermill starts one when the step is due")
    import papermill

    from runbook_lib.runner.kernel import KernelManager

    phases["papermill_imported"] = time.time()
    if spec.get("prewarm"):
        if warm is not None:
            try:
                warm.warm_up(spec["input"])
            except Exception as exc:  # noqa: BLE001 - as above
                _say(f"could not prewarm a kernel ({type(exc).__name__}: {redaction.redact(str(exc))[:300]}); "
                     "papermill starts one when the step is due")
                warm = None
        if not _wait_for_go(stopper):
            stopper.finished.set()
            if warm is not None:
                warm.shutdown()
            _kill_children()
            return 0
        phases["go"] = time.time()
    result: dict[str, Any] = {"ok": True}
    try:
        papermill.execute_notebook(
            spec["input"], spec["output"], parameters=spec["parameters"], cwd=spec["cwd"],
            kernel_name=spec["kernel_name"], execution_timeout=spec["execution_timeout"],
            progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            kernel_manager_class=KernelManager, **({"km": warm.km} if warm is not None else {}),
        )
    except papermill.PapermillExecutionError as exc:
        result = {"ok": False, "error_type": exc.ename, "error": exc.evalue}
    except BaseException as exc:  # CellTimeoutError, DeadKernelError, NoSuchKernel...: all failures
        message = str(exc).strip().split("\n")
        result = {"ok": False, "error_type": type(exc).__name__, 
                  "error": redaction.redact(" ".join(m.strip() for m in message[:3]))[:1000]}  # masked, then cut short
    finally:
        phases["notebook_done"] = time.time()
        if warm is None:
            stopper.finished.set()
    if stopper.why is not None:
        result["interrupted"] = stopper.why
    result = redaction.redact_obj(result)
    result["phases"] = phases
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(spec["result"])  # the verdict: the runner goes on while this process stops its kernel
    if warm is not None:  # papermill stops only the kernels it started
        try:
            warm.shutdown()
        except Exception as exc:  # noqa: BLE001 - the verdict stands; a leftover kernel is killed
            _say(f"stopping the kernel: {type(exc).__name__}: {exc}")
            _kill_children()
        stopper.finished.set()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    without_iri_formats()
    code = execute_step(json.loads(sys.argv[1]))
    # The verdict is written and the kernel stopped: the interpreter's last cyclic garbage collections
    # over papermill's and nbclient's objects (~0.3 s, which the runner waits for) are skipped.
    gc.freeze()
    sys.exit(code)
