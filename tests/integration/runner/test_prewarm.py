"""runner.step_process prewarmed (no sandbox: a plain notebook): the kernel is started and the notebook's imports done before the step is
due; on `go` papermill runs the notebook in it and the record is what a cold start writes (parameters
injected, execution counts from 1, no output of the warm-up); on EOF nothing runs, nothing is written and
no process is left."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil

from runbook_lib.core.paths import project_root
from runbook_lib.core.startup import declared_warm_imports
from runbook_lib.runner.step_process import notebook_imports, warm_up_code
from runbook_lib.systems.prefect import CLIENT_MODULES

ROOT = project_root()


def _notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('note = "default"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params,
                nbformat.v4.new_code_cell("import json\nimport sys\nfrom pathlib import Path as _P\n"
                                          "warm = sorted(n for n in dir() if 'warm' in n)\nprint(note, warm)"),
                nbformat.v4.new_code_cell("import email.mime.text\n'prewarmed' if 'email.mime.text' in sys.modules else 'cold'")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _spawn(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    notebook = _notebook(tmp_path / "01_probe.ipynb")
    spec = {"input": str(notebook), "output": str(tmp_path / "out.ipynb"), "cwd": str(tmp_path),
            "parameters": {"note": "injected"}, "kernel_name": None, "execution_timeout": 120,
            "result": str(tmp_path / "result.json"), "interrupt_grace": 5, "prewarm": True}
    proc = subprocess.Popen([sys.executable, "-m", "runbook_lib.runner.step_process", json.dumps(spec)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return proc, spec


def _wait_for_kernel(proc: subprocess.Popen, deadline: float = 120.0) -> list[psutil.Process]:
    began = time.monotonic()
    while time.monotonic() - began < deadline:
        kids = psutil.Process(proc.pid).children()
        if kids:
            return kids
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError("no kernel was started")


def test_the_notebook_imports_are_what_its_code_cells_import():
    assert notebook_imports(ROOT / "notebooks" / "03_deploy.ipynb") == [
        "runbook_lib.notebook.context", "runbook_lib.steps.deploy"]
    namespace: dict = {}
    exec(warm_up_code(["json", "no_such_module_xyz"]), namespace)  # a failing import is left to the notebook
    assert "__runbook_warm_up" not in namespace


def test_prefects_client_is_warmed_for_the_steps_that_call_prefect_and_only_for_them():
    """A step module names in WARM_IMPORTS what it imports lazily (Prefect's client: seconds of CPU); the
    warm-up imports it. A notebook of the runbook's that calls no Prefect (02, git only), or one that
    imports only the step context, gets no Prefect import in its kernel."""
    declared = {nb.stem: declared_warm_imports(notebook_imports(nb)) for nb in (ROOT / "notebooks").glob("*.ipynb")}
    assert declared.pop("02_merge_check") == []
    assert declared and all(modules == list(CLIENT_MODULES) for modules in declared.values()), declared
    for modules, warmed in ((["runbook_lib.notebook.context"], False),
                            (notebook_imports(ROOT / "notebooks" / "03_deploy.ipynb"), True)):
        code = warm_up_code(modules) + "import sys\nprint(sorted(m for m in %r if m in sys.modules))\n" % (CLIENT_MODULES,)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(sorted(CLIENT_MODULES) if warmed else []), (modules, out.stdout)


def test_go_runs_the_notebook_in_the_warm_kernel_and_the_record_is_a_cold_starts(tmp_path):
    proc, spec = _spawn(tmp_path)
    kernel = _wait_for_kernel(proc)[0]
    assert not Path(spec["output"]).exists()  # nothing runs before `go`
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(180) == 0, proc.stderr.read()
    result = json.loads(Path(spec["result"]).read_text())
    assert result["ok"] and result["phases"]["imports_done"] <= result["phases"]["go"]
    nb = nbformat.read(spec["output"], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3, 4]  # the warm-up left no execution count
    assert "injected-parameters" in code[1].metadata.tags
    assert code[2].outputs[0]["text"] == "injected []\n"  # the warm-up left no name behind
    assert code[3].outputs[0]["data"]["text/plain"] == "'prewarmed'"
    assert not kernel.is_running()


def test_eof_before_go_stops_the_kernel_and_writes_nothing(tmp_path):
    proc, spec = _spawn(tmp_path)
    kernel = _wait_for_kernel(proc)[0]
    proc.stdin.close()
    assert proc.wait(120) == 0
    assert not Path(spec["output"]).exists() and not Path(spec["result"]).exists()
    psutil.wait_procs([kernel], timeout=10)
    assert not kernel.is_running()
