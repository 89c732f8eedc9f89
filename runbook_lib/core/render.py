"""Rendering, in one place: every table the runbook shows (checks, diffs, timelines, plans, the run's
index page) is a `Table` here, drawn as HTML in a notebook (`_repr_html_`), with rich in a terminal
(`__rich__`) and as plain text (`str`). Every cell is masked (`core.secrets.redact`) before it is
drawn. Styles are CSS classes defined once (`STYLE`), not inline colours in each module.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from runbook_lib.core.secrets import redact

# status word -> (CSS class, rich style). Statuses of checks, steps, diffs and workflow states.
_STYLES: dict[str, tuple[str, str]] = {
    "pass": ("ok", "bold green"), "passed": ("ok", "bold green"), "approved": ("ok", "bold green"),
    "created": ("ok", "bold green"), "completed": ("ok", "bold green"),
    "warn": ("warn", "bold yellow"), "changed": ("warn", "bold yellow"), "pending": ("warn", "bold yellow"),
    "running": ("warn", "bold yellow"), "queued": ("warn", "bold yellow"),
    "fail": ("bad", "bold red"), "failed": ("bad", "bold red"), "rejected": ("bad", "bold red"),
    "killed": ("bad", "bold red"), "interrupted": ("bad", "bold red"), "not_confirmed": ("bad", "bold red"),
    "skip": ("muted", "dim"), "unchanged": ("muted", "dim"), "not_run": ("muted", "dim"),
    "in_progress": ("info", "bold blue"),
}
COLOURS = {"ok": "#116329", "warn": "#7d4e00", "bad": "#82071e", "muted": "#57606a", "info": "#0969da"}
BACKGROUNDS = {"ok": "#dafbe1", "warn": "#fff8c5", "bad": "#ffebe9", "muted": "#f6f8fa", "info": "#ddf4ff"}

STYLE = (
    "<style>"
    ".rb-table{border-collapse:collapse;width:100%;table-layout:auto}"
    ".rb-table th,.rb-table td{text-align:left;vertical-align:top;padding:3px 8px;border-bottom:1px solid #d0d7de}"
    ".rb-table td.rb-pre{white-space:pre-wrap;word-break:break-word}"
    ".rb-title{font-weight:bold;margin:0.4em 0}"
    ".rb-badge{display:inline-block;min-width:3.2em;text-align:center;padding:1px 6px;border-radius:4px;"
    "font-weight:bold;border:1px solid}"
    ".rb-id{font-size:85%;color:#57606a}"
    + "".join(f".rb-{k}{{color:{c};background:{BACKGROUNDS[k]};border-color:{c}}}" for k, c in COLOURS.items())
    + "</style>"
)


PRE_TD = '<td class="rb-pre">'


def style_of(status: str) -> tuple[str, str]:
    """(CSS class, rich style) of a status word; unknown words are shown plain."""
    return _STYLES.get(str(status).lower(), ("muted", ""))


def escape(value: Any) -> str:
    """`value` as masked, escaped HTML text."""
    return html.escape(redact(str(value)), quote=True)


def badge(status: str, text: str | None = None) -> str:
    css, _ = style_of(status)
    return f'<span class="rb-badge rb-{css}">{escape(text or str(status).replace("_", " ").upper())}</span>'


def as_text(value: Any) -> str:
    """A cell's text: JSON for structures, an em dash for None."""
    if value is None:
        return "—"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, indent=1, sort_keys=True, default=str)
    return str(value)


@dataclass
class Cell:
    """A cell with more than text: a status badge, a secondary line (an id), or preformatted text."""

    text: Any
    status: str | None = None  # drawn as a badge
    note: str = ""  # a second, dimmed line (e.g. a check's id)
    pre: bool = False  # keep line breaks
    links: tuple[tuple[str, str], ...] = ()  # (label, href) shown after the text
    details: Any = None  # JSON shown folded ("raw JSON, one click away")

    def html(self) -> str:
        body = badge(self.status, str(self.text)) if self.status else escape(as_text(self.text))
        if self.text in (None, "") and not self.status:
            body = ""
        if self.links:
            body += " ".join(f' <a href="{escape(href)}">{escape(label)}</a>' for label, href in self.links)
        if self.details is not None:
            body += (f"<details><summary>raw</summary><pre>{escape(json.dumps(self.details, indent=1, default=str))}"
                     "</pre></details>")
        if self.note:
            body = f'<b>{body}</b><br><code class="rb-id">{escape(self.note)}</code>'
        return body

    def plain(self) -> str:
        return redact(as_text(self.text) + (f"\n{self.note}" if self.note else ""))


@dataclass
class Table:
    """Columns and rows of values or `Cell`s; shown as HTML, rich or text. Tables can be grouped
    (`Table.group`) to show several under one another."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    pre_columns: frozenset[int] = frozenset()  # columns whose text keeps its line breaks
    caption: str = ""
    title_status: str | None = None  # colours the title (e.g. a report that failed)

    def _cell(self, value: Any, index: int) -> Cell:
        if isinstance(value, Cell):
            return value
        return Cell(value, pre=index in self.pre_columns)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = []
        for row in self.rows:
            cells = [self._cell(v, i) for i, v in enumerate(row)]
            body.append("<tr>" + "".join((PRE_TD if c.pre else "<td>") + c.html() + "</td>" for c in cells) + "</tr>")
        css = f' rb-{style_of(self.title_status)[0]}' if self.title_status else ""
        title = f'<p class="rb-title{css}">{escape(self.title)}</p>' if self.title else ""
        caption = f"<p>{escape(self.caption)}</p>" if self.caption else ""
        return (f'<div class="runbook-table">{STYLE}{title}<table class="rb-table"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>{caption}</div>")

    def __rich__(self) -> Any:
        from rich.table import Table as RichTable
        from rich.text import Text

        title_style = style_of(self.title_status)[1] if self.title_status else None
        table = RichTable(title=redact(self.title), title_style=title_style, show_lines=True, expand=True)
        for column in self.columns:
            table.add_column(redact(column))
        for row in self.rows:
            texts = []
            for i, value in enumerate(row):
                cell = self._cell(value, i)
                text = Text(redact(as_text(cell.text)), style=style_of(cell.status)[1] if cell.status else "")
                if cell.note:
                    text = Text(redact(as_text(cell.text)) + "\n", style="bold") + Text(redact(cell.note), style="dim")
                texts.append(text)
            table.add_row(*texts)
        return table

    def __str__(self) -> str:
        lines = [redact(self.title)] if self.title else []
        for row in self.rows:
            lines.append("  " + " | ".join(self._cell(v, i).plain().replace("\n", " ") for i, v in enumerate(row)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


@dataclass
class Group:
    """Several renderables shown one under the other."""

    parts: list[Any]

    def _repr_html_(self) -> str:
        return "".join(p._repr_html_() if hasattr(p, "_repr_html_") else f"<p>{escape(p)}</p>" for p in self.parts)

    def __rich__(self) -> Any:
        from rich.console import Group as RichGroup

        return RichGroup(*(p if hasattr(p, "__rich__") else redact(str(p)) for p in self.parts))

    def __str__(self) -> str:
        return "\n\n".join(redact(str(p)) for p in self.parts)


def preformatted(title: str, obj: Any) -> str:
    """A titled block of JSON (a plan), as HTML."""
    return (f'<div class="rb-title">{escape(title)}</div>'
            f'<pre style="white-space:pre-wrap">{escape(json.dumps(obj, indent=2, default=str))}</pre>')


def page(title: str, body: str, extra_css: str = "") -> str:
    """A standalone HTML page (the run's index) with the shared styles."""
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>{STYLE}'
            f"<style>body{{font-family:sans-serif;margin:2em;max-width:1250px}}{extra_css}</style></head>"
            f"<body>{body}</body></html>\n")
