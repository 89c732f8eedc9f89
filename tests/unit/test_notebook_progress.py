"""Progress while a step waits: plain lines headless, an ipywidgets bar (class runbook-progress) in a
notebook. (The widget updating in JupyterLab is proven in tests/browser/test_notebooks.py.)"""

from __future__ import annotations

import re
import threading

import pytest

from runbook_lib.notebook.progress import DONE_CLASS, WIDGET_CLASS, Activity, Progress


def test_headless_progress_prints_a_line_when_the_phase_or_counts_change():
    lines: list[str] = []
    p = Progress(3, interactive=False, every=3600, out=lines.append)
    p.update("link 1: waiting for the trigger", 0.5)
    p.update("link 1: waiting for the trigger", 0.7)  # nothing new: no line
    p.update("link 5: items moving", 2.0, {"QUEUED": 2, "IN_PROGRESS": 0}, done=0)
    p.close()
    assert len(lines) == 2
    assert lines[0].endswith("link 1: waiting for the trigger") and lines[1].endswith("| items: QUEUED 2")


def test_headless_activity_prints_its_start_phases_and_end():
    lines: list[str] = []
    with Activity("deploying flow/dep", interactive=False, every=3600, out=lines.append) as act:
        act.phase("reading it back")
    assert [line.split("] ", 1)[1] for line in lines] == ["deploying flow/dep", "reading it back",
                                                          f"deploying flow/dep: done in {lines[-1].split('done in ')[1]}"]


def test_a_failing_activity_says_so_and_lets_the_error_through():
    lines: list[str] = []
    with pytest.raises(RuntimeError):
        with Activity("deploying", interactive=False, out=lines.append):
            raise RuntimeError("boom")
    assert "deploying: failed after" in lines[-1] and "(RuntimeError)" in lines[-1]


def test_the_widget_ticks_while_the_block_runs_and_ends_marked_done():
    with Activity("deploying", interactive=True, tick=0.05) as act:
        bar = act._bar
        first = bar.label.value
        assert re.search(r"deploying · \d+ s$", first), first
        ticked = threading.Event()
        bar.label.observe(lambda change: ticked.set(), "value")
        assert ticked.wait(30), "the elapsed time did not tick while the block ran"
        assert bar.label.value != first
    assert WIDGET_CLASS in bar.box._dom_classes and DONE_CLASS in bar.box._dom_classes
    assert bar.bar.bar_style == "success" and "done in" in bar.label.value


def test_the_items_bar_counts_items_at_target():
    p = Progress(4, interactive=True)
    p.update("link 5: items moving", 3.0, {"COMPLETED": 2}, done=2)
    bar = p._bar
    assert bar.bar.value == 2 and bar.bar.max == 4 and "2/4 items at target" in bar.label.value
    p.close()
    assert DONE_CLASS in bar.box._dom_classes and bar.bar.value == 2 and bar.bar.bar_style == "warning"
    p = Progress(2, interactive=True)
    p.update("link 5: items moving", 3.0, {"COMPLETED": 2}, done=2)
    bar = p._bar
    p.close()
    assert bar.bar.value == 2 and bar.bar.bar_style == "success"
