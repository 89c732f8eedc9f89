"""The runbook's notebooks are committed without outputs (what a step showed belongs in a run's
records, which are scanned for secrets), and `make lab` saves them that way: its Jupyter config
(jupyter/jupyter_server_config.py) strips outputs on every save, through Jupyter's own contents manager."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import nbformat
import pytest
from traitlets.config.loader import PyFileConfigLoader

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT_ROOT / "jupyter" / "jupyter_server_config.py"


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_a_committed_notebook_has_no_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} keep outputs or execution counts; clear them "
                       "(`make lab` saves without them; or `jupyter nbconvert --clear-output --inplace`)")


def test_the_makefile_lab_target_uses_the_config():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    lab = makefile.split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "jupyter lab --config jupyter/jupyter_server_config.py " in lab and lab.rstrip().endswith("notebooks/")


def test_saving_through_jupyters_contents_manager_strips_outputs(tmp_path: Path):
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

    config = PyFileConfigLoader(CONFIG.name, path=str(CONFIG.parent)).load_config()
    manager = AsyncLargeFileManager(root_dir=str(tmp_path), config=config)  # ServerApp's default contents manager
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(plan)", execution_count=3)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="env: as-0123456789abcdef (live)\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# Deploy"), cell]
    model = {"type": "notebook", "format": "json", "content": nb}

    async def save() -> None:
        result = manager.save(model, "03_deploy.ipynb")
        if inspect.isawaitable(result):
            await result
    asyncio.run(save())
    saved = nbformat.read(tmp_path / "03_deploy.ipynb", as_version=4)
    assert saved.cells[1].source == "print(plan)"
    assert saved.cells[1].outputs == [] and saved.cells[1].execution_count is None
    assert "as-0123456789abcdef" not in (tmp_path / "03_deploy.ipynb").read_text()
