"""Running a notebook of the runbook the way a user does, headless through papermill, and reading
what it recorded. Shared by the notebook tests (01 to 05, the fallback notebook)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import papermill
from papermill.exceptions import PapermillExecutionError

from runbook_lib.runner.kernel import KernelManager
from tests.conftest import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"


@contextlib.contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the kernel papermill starts; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Run:
    """One executed notebook: its results file, the executed notebook, the error it stopped at."""

    results: dict[str, Any]
    notebook: Path
    error: PapermillExecutionError | None
    seconds: float = 0.0  # how long papermill took

    def check(self, id: str) -> dict[str, Any]:
        return next(c for c in self.results["checks"] if c["id"] == id)

    def ids(self, status: str) -> set[str]:
        return {c["id"] for c in self.results["checks"] if c["status"] == status}

    def statuses(self) -> dict[str, str]:
        return {c["id"]: c["status"] for c in self.results["checks"]}

    @property
    def values(self) -> dict[str, Any]:
        return self.results["values"]

    def outputs(self) -> list[dict[str, Any]]:
        """Every output of the executed notebook's code cells, in order."""
        cells = json.loads(self.notebook.read_text())["cells"]
        return [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]


def run_notebook(notebook: str, sandbox_dir: Path, run_dir: Path, parameters: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, *, step: str | None = None, output: Path | None = None,
                 timeout: int = 300) -> Run:
    """Execute notebooks/<notebook>.ipynb headless (cwd notebooks/, profile `sandbox` of the sandbox
    in `sandbox_dir`, kernel environment plus `env`), results in `run_dir`; `timeout` is per cell.
    The executed notebook goes to `output` (default: a new file in `run_dir`); the results are read
    from `run_dir/<step>.json` (default: the notebook's name)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    output = output or run_dir / f"{notebook}.executed-{uuid.uuid4().hex[:6]}.ipynb"
    kernel_env = {"RUNBOOK_SANDBOX_DIR": str(sandbox_dir), "RUNBOOK_HEADLESS": "1", "PYTHONPATH": str(PROJECT_ROOT),
                  "RUNBOOK_PROFILE": "sandbox", **(env or {})}
    error = None
    started = time.monotonic()
    with environ(kernel_env):
        try:
            papermill.execute_notebook(
                str(NOTEBOOKS / f"{notebook}.ipynb"), str(output), parameters={"run_dir": str(run_dir), **(parameters or {})},
                cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False, log_output=False, execution_timeout=timeout,
                kernel_manager_class=KernelManager,
            )
        except PapermillExecutionError as exc:
            error = exc
    seconds = time.monotonic() - started
    return Run(json.loads((run_dir / f"{step or notebook}.json").read_text()), output, error, seconds)


# -- no secret in what a run leaves ------------------------------------------------------------------


def secret_values(sandbox, sandbox_env: dict[str, str], *, service_role: bool = True) -> dict[str, str]:
    """The sandbox's secret values by name; the service_role key too unless `service_role` is False."""
    secrets = {
        "PREFECT_API_KEY": sandbox_env["PREFECT_API_KEY"],
        "SUPABASE_ACCESS_TOKEN": sandbox_env["SUPABASE_ACCESS_TOKEN"],
        "GITHUB_TOKEN": sandbox_env["GITHUB_TOKEN"],
        "DATABASE_PASSWORD": sandbox.postgres.password,
        "MODAL_TOKEN_ID": sandbox_env["MODAL_TOKEN_ID"],
        "MODAL_TOKEN_SECRET": sandbox_env["MODAL_TOKEN_SECRET"],
    }
    if service_role:
        secrets["service_role key"] = sandbox.supabase.service_role_key
    return secrets


def assert_no_secrets(run: Run, secrets: dict[str, str]) -> None:
    """No value of `secrets` in the executed notebook or the results."""
    texts = {"executed notebook": run.notebook.read_text(), "results": json.dumps(run.results)}
    for where, text in texts.items():
        for label, value in secrets.items():
            assert value not in text, f"{label} appears in the {where}"


def assert_no_secrets_under(directory: Path, secrets: dict[str, str]) -> None:
    """No known secret value in any file under `directory` (executed notebooks, results, figures...)."""
    for path in directory.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            leaked = [name for name, value in secrets.items() if value and value in text]
            assert not leaked, f"{leaked} appear in {path}"
