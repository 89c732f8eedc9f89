"""The JupyterLab configuration of `make lab` (`jupyter lab --config jupyter/jupyter_server_config.py`):
the runbook's notebooks are versioned without outputs. Outputs hold what a step showed (plans,
live values, error text): they belong in a run's records (outputs/), which the runner scans for
secrets, never in a notebook committed to git. Every save strips them from the file (the open
notebook keeps showing them); tests/unit/test_notebooks_committed.py fails on a committed
notebook that has any.

Ctrl-C stops the server at once, in a terminal or not: the server's own stop-signal handler is installed for
SIGINT (as JupyterHub does). Jupyter's default is a confirmation prompt on a terminal (answered by
`--ServerApp.answer_yes`) and otherwise Python's KeyboardInterrupt, which can land inside code that catches
it and be lost (seen once in the `make lab` browser test under load: the server ran on after Ctrl-C)."""

import signal
from typing import Any

from jupyter_server.serverapp import ServerApp


def strip_outputs(model: dict[str, Any], **_: Any) -> None:
    """A contents manager pre_save_hook: a notebook is saved without outputs or execution counts."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    for cell in model["content"].get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)  # timings of the last run


c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file
c.ContentsManager.pre_save_hook = strip_outputs


_init_signal = ServerApp.init_signal


def _init_signal_stopping_on_sigint(self: ServerApp) -> None:
    _init_signal(self)
    signal.signal(signal.SIGINT, self._signal_stop)


ServerApp.init_signal = _init_signal_stopping_on_sigint
