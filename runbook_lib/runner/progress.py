"""The runner's live view: which step runs, for how long, and how each ended."""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from runbook_lib.core import render
from runbook_lib.core import secrets as redaction
from runbook_lib.records.manifest import StepRecord
from runbook_lib.runner.params import Step


class Progress:
    """Which step runs, for how long, and how each ended: a live rich table on a TTY, plain lines otherwise."""

    def __init__(self, steps: Sequence[Step], stream: Any = None, live: bool | None = None):
        from rich.console import Console

        self.console = Console(file=stream or sys.stdout, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.steps = list(steps)
        self.state: dict[str, tuple[str, float | None, float | None, str]] = {}  # name -> (status, start, duration, detail)
        self._live: Any = None

    def __enter__(self) -> "Progress":
        if self.live:
            from rich.live import Live

            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=True, header_style="bold", box=None)
        for col in ("step", "status", "elapsed", ""):
            table.add_column(col)
        for step in self.steps:
            status, started, duration, detail = self.state.get(step.name, ("not_run", None, None, ""))
            elapsed = duration if duration is not None else (time.monotonic() - started if started else None)
            table.add_row(step.name, Text(status.replace("_", " "), style=render.style_of(status)[1]),
                          f"{elapsed:.1f} s" if elapsed is not None else "", Text(detail))
        return table

    def note(self, text: str) -> None:
        self.console.print(redaction.redact(text), markup=False)

    def started(self, step: Step) -> None:
        self.state[step.name] = ("running", time.monotonic(), None, "")
        if not self.live:
            self.note(f"[{self._pos(step)}] {step.name}: running")

    def finished(self, step: Step, record: StepRecord) -> None:
        error = f" ({record.error_type}: {record.error})" if record.error_type else ""
        self.state[step.name] = (record.status, None, record.duration_seconds or 0.0, redaction.redact(error.strip(" ()"))[:120])
        if not self.live:
            self.note(f"[{self._pos(step)}] {step.name}: {record.status} in {record.duration_seconds or 0:.1f} s{error}")

    def skipped(self, step: Step, record: StepRecord) -> None:
        self.state[step.name] = (record.status, None, record.duration_seconds, "earlier attempt" if record.earlier else "")
        if not self.live:
            self.note(f"[{self._pos(step)}] {step.name}: {record.status.replace('_', ' ')}"
                      + (" (earlier attempt)" if record.earlier else ""))

    def _pos(self, step: Step) -> str:
        return f"{self.steps.index(step) + 1}/{len(self.steps)}"


