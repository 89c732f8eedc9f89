"""Progress while a step waits: a live bar in JupyterLab (tqdm's ipywidgets bar), plain log lines
headless (one when the phase or the counts change, else every `every` seconds)."""

from __future__ import annotations

import time
from typing import Any, Callable

from runbook_lib.notebook.gate import interactive_front_end


class Progress:
    def __init__(self, total: int, *, interactive: bool | None = None, every: float = 10.0,
                 out: Callable[[str], None] = print, desc: str = "end-to-end test"):
        self.total = total
        self.interactive = interactive_front_end() if interactive is None else interactive
        self.every = every
        self.out = out
        self.desc = desc
        self._bar: Any = None
        self._last: tuple[str, str] | None = None
        self._last_at = 0.0

    def update(self, phase: str, elapsed: float, counts: dict[str, int] | None = None, done: int | None = None) -> None:
        shown = ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v)
        if self.interactive:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total, desc=self.desc,
                                 bar_format="{desc}: {n}/{total} items at target |{bar}| {elapsed} {postfix}")
            self._bar.set_description_str(phase[:60])
            if done is not None:
                self._bar.n = done
            self._bar.set_postfix_str(shown)
            self._bar.refresh()
            return
        now = time.monotonic()
        if (phase, shown) != self._last or now - self._last_at >= self.every:
            self.out(f"[{elapsed:7.1f}s] {phase}" + (f" | items: {shown}" if shown else ""))
            self._last, self._last_at = (phase, shown), now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
