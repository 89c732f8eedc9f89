"""Check results: what a step verified, shown in a notebook (HTML), a terminal (rich) or as JSON.

A `Check` has an id, a title, a status (pass / warn / fail / skip), a detail and a remediation
(what to do when it is not a pass). A `CheckReport` collects a step's checks; its
`raise_for_failures()` ends the step with `ChecksFailed` naming the failed checks, so papermill
marks the notebook failed at that cell.
"""

from __future__ import annotations

import html
import json
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, Field, field_validator

from runbook_lib.core.errors import ChecksFailed, RunbookError
from runbook_lib.core.secrets import redact, redact_obj


class Status(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


_COLOURS = {  # foreground, background (notebook) and rich style (terminal)
    Status.PASS: ("#116329", "#dafbe1", "bold green"),
    Status.WARN: ("#7d4e00", "#fff8c5", "bold yellow"),
    Status.FAIL: ("#82071e", "#ffebe9", "bold red"),
    Status.SKIP: ("#57606a", "#f6f8fa", "dim"),
}


class Check(BaseModel):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$")
    title: str
    status: Status
    detail: str = ""
    remediation: str = ""
    data: dict[str, Any] = Field(default_factory=dict)  # machine-readable facts (ids, counts)

    @field_validator("detail", "remediation", "title")
    @classmethod
    def _redacted(cls, value: str) -> str:
        return redact(value)

    @field_validator("data")
    @classmethod
    def _redacted_data(cls, value: dict[str, Any]) -> dict[str, Any]:
        return redact_obj(value)

    @classmethod
    def passed(cls, id: str, title: str, detail: str = "", **data: Any) -> "Check":
        return cls(id=id, title=title, status=Status.PASS, detail=detail, data=data)

    @classmethod
    def warned(cls, id: str, title: str, detail: str, remediation: str = "", **data: Any) -> "Check":
        return cls(id=id, title=title, status=Status.WARN, detail=detail, remediation=remediation, data=data)

    @classmethod
    def failed(cls, id: str, title: str, detail: str, remediation: str, **data: Any) -> "Check":
        return cls(id=id, title=title, status=Status.FAIL, detail=detail, remediation=remediation, data=data)

    @classmethod
    def skipped(cls, id: str, title: str, detail: str, **data: Any) -> "Check":
        return cls(id=id, title=title, status=Status.SKIP, detail=detail, data=data)


class CheckReport(BaseModel):
    """The checks of one step, in the order they ran."""

    step: str
    checks: list[Check] = Field(default_factory=list)

    def add(self, check: Check) -> Check:
        if any(c.id == check.id for c in self.checks):
            raise ValueError(f"check id {check.id!r} is already in the report of step {self.step!r}")
        self.checks.append(check)
        return check

    def run(self, id: str, title: str, probe: Callable[[], Check], remediation: str = "") -> Check:
        """Add what `probe()` returns; a probe that raises becomes a failed check with its message."""
        try:
            check = probe()
        except RunbookError as exc:
            check = Check.failed(id, title, str(exc), remediation)
        except Exception as exc:  # an unexpected error is still a failed check, with its type
            check = Check.failed(id, title, f"{type(exc).__name__}: {exc}", remediation)
        return self.add(check)

    def by_status(self, status: Status) -> list[Check]:
        return [c for c in self.checks if c.status == status]

    @property
    def failures(self) -> list[Check]:
        return self.by_status(Status.FAIL)

    @property
    def ok(self) -> bool:
        return not self.failures

    def get(self, id: str) -> Check:
        for c in self.checks:
            if c.id == id:
                return c
        raise KeyError(f"no check {id!r} in step {self.step!r}")

    def counts(self) -> dict[str, int]:
        return {s.value: len(self.by_status(s)) for s in Status}

    def raise_for_failures(self) -> None:
        """End the step (ChecksFailed naming each failed check) when any check failed."""
        if self.failures:
            raise ChecksFailed(self.step, [(c.id, c.title) for c in self.failures])

    # -- renderings ---------------------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "CheckReport":
        return cls.model_validate_json(text)

    def summary_line(self) -> str:
        c = self.counts()
        verdict = "FAILED" if self.failures else "passed"
        return f"{self.step}: {verdict} ({c['pass']} pass, {c['warn']} warn, {c['fail']} fail, {c['skip']} skip)"

    def _repr_html_(self) -> str:
        rows = []
        for c in self.checks:
            fg, bg, _ = _COLOURS[c.status]
            badge = (
                f'<span style="display:inline-block;min-width:3.2em;text-align:center;padding:1px 6px;'
                f'border-radius:4px;font-weight:bold;color:{fg};background:{bg};border:1px solid {fg}">'
                f"{c.status.value.upper()}</span>"
            )
            remediation = "" if c.status == Status.PASS else _cell_text(c.remediation)
            rows.append(
                f'<tr style="background:{bg}">'
                f'<td style="vertical-align:top;text-align:left">{badge}</td>'
                f'<td style="vertical-align:top;text-align:left"><b>{_cell_text(c.title)}</b><br>'
                f'<code style="font-size:85%;color:#57606a">{html.escape(c.id)}</code></td>'
                f'<td style="vertical-align:top;text-align:left;white-space:pre-wrap">{_cell_text(c.detail)}</td>'
                f'<td style="vertical-align:top;text-align:left;white-space:pre-wrap">{remediation}</td></tr>'
            )
        fg = _COLOURS[Status.FAIL if self.failures else Status.PASS][0]
        return (
            f'<div class="runbook-checks"><p style="font-weight:bold;color:{fg}">{html.escape(self.summary_line())}</p>'
            '<table style="border-collapse:collapse;width:100%"><thead><tr>'
            '<th style="text-align:left">Status</th><th style="text-align:left">Check</th>'
            '<th style="text-align:left">Detail</th><th style="text-align:left">Remediation</th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.summary_line(), show_lines=True, expand=True)
        table.add_column("Status", no_wrap=True)
        table.add_column("Check")
        table.add_column("Detail")
        table.add_column("Remediation")
        for c in self.checks:
            style = _COLOURS[c.status][2]
            table.add_row(
                Text(c.status.value.upper(), style=style),
                Text(f"{redact(c.title)}\n", style="bold") + Text(c.id, style="dim"),
                Text(redact(c.detail)),
                Text("" if c.status == Status.PASS else redact(c.remediation), style="yellow" if c.remediation else ""),
            )
        return table

    def render_terminal(self, console: Any = None) -> None:
        from rich.console import Console

        (console or Console()).print(self)


def _cell_text(text: str) -> str:
    return html.escape(redact(text))
