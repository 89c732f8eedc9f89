"""Checks: what a step verified, with evidence, and the one mechanism that defines and runs them.

- A `Check` is one result: id, title, status (pass / warn / fail / skip), detail (the evidence,
  masked), remediation (what to do when it is not a pass) and machine-readable `data`.
- A `CheckDef` is a check's definition, made once with `define(...)` (or the `@check` decorator,
  which adds a probe): its id, title, what it proves and its default remediation. Every id any
  step records is defined once, in `runbook_lib.checks`' catalog modules; `REGISTRY` lists them
  (the README's table of checks is generated from it).
- A probe (`@check`) reads what it needs from a `Facts` object (shared, memoised reads of live
  systems: see `checks.facts`) and returns `ok(...)` / `warn(...)`, or raises `Fail` (a failure with
  its own remediation) or `Skip` (it needs something another check could not establish). Any other
  error becomes a failed check with the definition's remediation. `run_checks` runs definitions in
  order into a `CheckReport`; one failure never hides the others.
- Steps that record the outcome of an action (a deploy, a secret write, a link of the chain) build
  the result from the definition: `DEPLOY_APPLY.passed("...")`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Protocol

from pydantic import BaseModel, Field, field_validator

from runbook_lib.core import render
from runbook_lib.core.errors import ChecksFailed, RunbookError
from runbook_lib.core.secrets import redact, redact_obj
from runbook_lib.core.settings import RunbookSettings


class Facts(Protocol):
    """What a probe reads (`runbook_lib.checks.facts.Facts`): the settings and the shared reads."""

    settings: RunbookSettings
    step: str


class Status(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


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

    def replace(self, check: Check) -> Check:
        """Add `check`, replacing an earlier one with its id (a notebook cell run again)."""
        self.checks = [c for c in self.checks if c.id != check.id]
        self.checks.append(check)
        return check

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

    def table(self) -> render.Table:
        rows = [
            (render.Cell(c.status.value, status=c.status.value), render.Cell(c.title, note=c.id),
             render.Cell(c.detail, pre=True), render.Cell("" if c.status == Status.PASS else c.remediation, pre=True))
            for c in self.checks
        ]
        return render.Table(self.summary_line(), ("Status", "Check", "Detail", "Remediation"), rows,
                            title_status="fail" if self.failures else "pass")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __rich__(self) -> Any:
        return self.table().__rich__()

    def render_terminal(self, console: Any = None) -> None:
        from rich.console import Console

        (console or Console()).print(self)


# -- the mechanism ---------------------------------------------------------------------------------------


class Skip(Exception):
    """The check cannot run: something it needs failed in another check (named in the message)."""


class Fail(RunbookError):
    """A failed check with its own remediation (instead of the definition's default one)."""

    def __init__(self, detail: str, remediation: str, **data: Any):
        super().__init__(detail)
        self.remediation = remediation
        self.data = data


@dataclass(frozen=True)
class Outcome:
    """What a probe found: a pass or a warning, with the evidence."""

    status: Status
    detail: str
    remediation: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def ok(detail: str, **data: Any) -> Outcome:
    return Outcome(Status.PASS, detail, "", data)


def warn(detail: str, remediation: str, **data: Any) -> Outcome:
    return Outcome(Status.WARN, detail, remediation, data)


Title = str | Callable[[Any], str]  # a text, or built from the settings (e.g. the pool's name)


@dataclass(frozen=True)
class CheckDef:
    """One check's definition: its id, title, what it proves and its default remediation; with a
    probe when it can run on its own (`run`), else its results are built by a step (`passed`...)."""

    id: str
    title: Title
    proves: str
    remediation: str = ""
    probe: Callable[[Facts], Outcome] | None = None

    def title_for(self, settings: RunbookSettings | None = None) -> str:
        return self.title(settings) if callable(self.title) else self.title

    # results built by a step
    def passed(self, detail: str = "", *, settings: RunbookSettings | None = None, **data: Any) -> Check:
        return Check.passed(self.id, self.title_for(settings), detail, **data)

    def warned(self, detail: str, remediation: str | None = None, *, settings: RunbookSettings | None = None, **data: Any) -> Check:
        return Check.warned(self.id, self.title_for(settings), detail, self.remediation if remediation is None else remediation, **data)

    def failed(self, detail: str, remediation: str | None = None, *, settings: RunbookSettings | None = None, **data: Any) -> Check:
        return Check.failed(self.id, self.title_for(settings), detail, self.remediation if remediation is None else remediation, **data)

    def skipped(self, detail: str, *, settings: RunbookSettings | None = None, **data: Any) -> Check:
        return Check.skipped(self.id, self.title_for(settings), detail, **data)

    def attempt(self, probe: Callable[[], "Outcome | Check"], settings: RunbookSettings | None = None) -> Check:
        """Call `probe()`; an `Outcome` (or a Check it built) is the result, and whatever it raises
        becomes this check's failure (`Fail`: with its own remediation; other errors: the
        definition's) or skip (`Skip`)."""
        try:
            outcome = probe()
        except Skip as skip:
            return self.skipped(f"skipped: {skip}", settings=settings)
        except Fail as exc:
            return self.failed(str(exc), exc.remediation, settings=settings, **exc.data)
        except RunbookError as exc:
            return self.failed(str(exc), settings=settings)
        except Exception as exc:  # an unexpected error is still a failed check, with its type
            return self.failed(f"{type(exc).__name__}: {exc}", settings=settings)
        if isinstance(outcome, Check):
            return outcome
        return Check(id=self.id, title=self.title_for(settings), status=outcome.status, detail=outcome.detail,
                     remediation=outcome.remediation, data=outcome.data)

    def run(self, facts: Facts) -> Check:
        """Run the probe against `facts` (see `attempt`)."""
        if self.probe is None:
            raise TypeError(f"check {self.id!r} has no probe: the step that records it builds its result")
        probe = self.probe
        return self.attempt(lambda: probe(facts), facts.settings)


REGISTRY: dict[str, CheckDef] = {}


def define(id: str, title: Title, *, proves: str, remediation: str = "",
           probe: Callable[[Facts], Outcome] | None = None) -> CheckDef:
    """Define a check once; a second definition of the same id is a programming error."""
    if id in REGISTRY:
        raise ValueError(f"check {id!r} is defined twice")
    definition = CheckDef(id, title, proves, remediation, probe)
    REGISTRY[id] = definition
    return definition


def check(id: str, title: Title, *, proves: str, remediation: str = "") -> Callable[[Callable[[Facts], Outcome]], CheckDef]:
    """Decorator: define a check whose probe is the decorated function."""
    def register(probe: Callable[[Facts], Outcome]) -> CheckDef:
        return define(id, title, proves=proves, remediation=remediation, probe=probe)
    return register


def run_checks(facts: Facts, definitions: Iterable[CheckDef], report: CheckReport | None = None) -> CheckReport:
    """Run each definition in order; the results go to `report` (replacing earlier results of the
    same ids) and the returned report holds just these."""
    group = CheckReport(step=report.step if report is not None else facts.step)
    for definition in definitions:
        result = definition.run(facts)
        group.add(result)
        if report is not None:
            report.replace(result)
    return group
