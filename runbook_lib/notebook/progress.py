"""Live progress while a step waits, where the waits are long: 05 following the chain (`Progress`:
items at their target out of the batch), 03 deploying or waiting for its smoke run (`Activity`: a
wait of unknown length, its elapsed time ticking).

In JupyterLab (a kernel with a widget front end, see `notebook.gate.interactive_front_end`) each is
an ipywidgets bar with a label (what is happening, the counts, the elapsed time) that updates in
place; the widget carries the CSS class `runbook-progress` (and `runbook-progress-done` once
finished). Headless (papermill under the runner, a terminal) each is plain lines through `out`:
one when the phase or the counts change, otherwise one every `every` seconds, and one at the end.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from runbook_lib.core import render
from runbook_lib.core.secrets import redact
from runbook_lib.notebook.gate import interactive_front_end

WIDGET_CLASS = "runbook-progress"
DONE_CLASS = "runbook-progress-done"


def _elapsed(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class _Bar:
    """The widget: a bar and a label on one line, updated in place (ipywidgets)."""

    def __init__(self, desc: str, total: int):
        import ipywidgets as widgets
        from IPython.display import display

        self.bar = widgets.IntProgress(value=0, min=0, max=max(total, 1), bar_style="info",
                                       layout=widgets.Layout(width="40%"))
        self.label = widgets.HTML()
        self.box = widgets.HBox([widgets.HTML(f"<b>{render.escape(desc)}</b>&nbsp;"), self.bar, self.label])
        self.box.add_class(WIDGET_CLASS)
        display(self.box)

    def show(self, value: int, text: str) -> None:
        self.bar.value = min(value, self.bar.max)
        self.label.value = f"&nbsp;{render.escape(text)}"

    def finish(self, ok: bool, text: str, *, failed_style: str = "danger") -> None:
        self.bar.bar_style = "success" if ok else failed_style
        if ok:
            self.bar.value = self.bar.max
        self.label.value = f"&nbsp;{render.escape(text)}"
        self.box.add_class(DONE_CLASS)


class Progress:
    """05's wait: `total` items, `update(phase, elapsed, counts, done)` at every poll."""

    def __init__(self, total: int, *, interactive: bool | None = None, every: float = 10.0,
                 out: Callable[[str], None] = print, desc: str = "end-to-end test"):
        self.total = total
        self.interactive = interactive_front_end() if interactive is None else interactive
        self.every = every
        self.out = out
        self.desc = desc
        self._bar: _Bar | None = None
        self._done = 0
        self._last: tuple[str, str] | None = None
        self._last_at = 0.0
        self._elapsed = 0.0

    def update(self, phase: str, elapsed: float, counts: dict[str, int] | None = None, done: int | None = None) -> None:
        shown = ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v)
        self._elapsed = elapsed
        if done is not None:
            self._done = done
        if self.interactive:
            if self._bar is None:
                self._bar = _Bar(self.desc, self.total)
            self._bar.show(self._done, f"{phase} · {self._done}/{self.total} items at target"
                           + (f" · items: {shown}" if shown else "") + f" · {_elapsed(elapsed)}")
            return
        now = time.monotonic()
        if (phase, shown) != self._last or now - self._last_at >= self.every:
            self.out(redact(f"[{elapsed:7.1f}s] {phase}" + (f" | items: {shown}" if shown else "")))
            self._last, self._last_at = (phase, shown), now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.finish(self._done >= self.total, f"finished after {_elapsed(self._elapsed)} · "
                             f"{self._done}/{self.total} items at target", failed_style="warning")
            self._bar = None


class Activity:
    """A wait of unknown length (a deploy, a smoke run), as a context manager:

        with Activity("deploying flow/deployment") as activity:
            deploy(...)
            activity.phase("reading it back")

    The widget's elapsed time ticks every `tick` seconds while the block runs (a thread updates it,
    so the kernel can stay busy in the call); headless, one line at the start, one every `every`
    seconds, and one at the end (done, or failed with the exception's type)."""

    def __init__(self, desc: str, *, interactive: bool | None = None, every: float = 10.0, tick: float = 0.5,
                 out: Callable[[str], None] = print):
        self.desc = desc
        self.interactive = interactive_front_end() if interactive is None else interactive
        self.every = every
        self.tick = tick
        self.out = out
        self.current = desc
        self._t0 = 0.0
        self._bar: _Bar | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def __enter__(self) -> "Activity":
        self._t0 = time.monotonic()
        if self.interactive:
            self._bar = _Bar(self.desc, 1)
        self._show(force=True)
        self._thread = threading.Thread(target=self._ticker, name="runbook-progress", daemon=True)
        self._thread.start()
        return self

    def phase(self, text: str) -> None:
        """What is happening now (shown at once)."""
        with self._lock:
            self.current = text
        self._show(force=True)

    def _ticker(self) -> None:
        interval = self.tick if self.interactive else self.every
        while not self._stop.wait(interval):
            self._show(force=False)

    def _show(self, force: bool) -> None:
        with self._lock:
            text = f"{self.current} · {_elapsed(self.elapsed)}"
            if self._bar is not None:
                self._bar.show(0, text)
            elif force or not self.interactive:
                self.out(redact(f"[{self.elapsed:7.1f}s] {self.current}"))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        ok = exc_type is None
        verdict = (f"done in {_elapsed(self.elapsed)}" if ok
                   else f"failed after {_elapsed(self.elapsed)} ({exc_type.__name__})")
        with self._lock:
            if self._bar is not None:
                self._bar.finish(ok, verdict)  # the description is already on the bar's left
                self._bar = None
            else:
                self.out(redact(f"[{self.elapsed:7.1f}s] {self.desc}: {verdict}"))
