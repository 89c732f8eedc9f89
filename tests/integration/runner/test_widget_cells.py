"""runner.step_process (no sandbox: a plain notebook): cells that draw rich's live progress, as Prefect's
`deploy` does in step 03 (an ipywidgets Output refreshed from a thread while the call runs in a worker
thread), each finish when the kernel has answered, cold or prewarmed. nbclient answers the widget on
the shell socket while it waits there for the reply; with jupyter_client's own channel a reply could
then go unnoticed until the cell timeout (seen: 7 of 99 such cells waited their whole 40 s on a busy
machine). See runbook_lib.runner.kernel; its unit test shows the mechanism deterministically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from runbook_lib.core.paths import project_root

ROOT = project_root()
CELLS = 12

SETUP = '''
import asyncio, concurrent.futures, contextvars
from rich.console import Console
from rich.progress import track

def in_worker_thread(coro):  # what runbook_lib.core.aio.run_sync does in a kernel
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, asyncio.run, coro).result()

async def deploy_like():
    console = Console()
    for _ in track([1], description="Creating/updating deployments...", console=console, transient=True):
        await asyncio.sleep(0.3)
    console.print("Successfully created/updated all deployments!", style="green")
    return "done"
'''


@pytest.mark.parametrize("prewarm", [False, True], ids=["cold", "prewarmed"])
def test_cells_with_a_live_progress_widget_end_when_the_kernel_answers(tmp_path, prewarm):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP)] + [nbformat.v4.new_code_cell("in_worker_thread(deploy_like())")
                                                    for _ in range(CELLS)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = tmp_path / "03_widgets.ipynb"
    nbformat.write(nb, notebook)
    spec = {"input": str(notebook), "output": str(tmp_path / "out.ipynb"), "cwd": str(tmp_path), "parameters": {},
            "kernel_name": None, "execution_timeout": 60, "result": str(tmp_path / "result.json"),
            "interrupt_grace": 5, "prewarm": prewarm}
    proc = subprocess.run([sys.executable, "-m", "runbook_lib.runner.step_process", json.dumps(spec)],
                          input="go\n" if prewarm else None, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(Path(spec["result"]).read_text())["ok"]
    cells = nbformat.read(spec["output"], as_version=4).cells[1:]
    assert [c.outputs[-1]["data"]["text/plain"] for c in cells] == ["'done'"] * CELLS
    assert any(o.get("data", {}).get("text/plain") == "Output()" for o in cells[0].outputs)  # rich drew its widget
    durations = [round(c.metadata["papermill"]["duration"], 2) for c in cells]
    assert max(durations) < 10, f"a cell waited for its reply: {durations}"
