"""What every step shares: a step is a class built from the notebook's `StepContext` and the
notebook's parameters; its methods are the notebook's cells. It declares its typed output
(`OUTPUT`); `NAME` is the step's name (its notebook's stem)."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Protocol

from runbook_lib.core.errors import RunbookError
from runbook_lib.core.startup import warm_up
from runbook_lib.notebook.context import StepContext, show
from runbook_lib.records.outputs import StepOutput


class Plan(Protocol):
    """What a mutating step shows behind its gate."""

    def summary(self) -> str: ...

    def gate_plan(self) -> dict[str, Any]: ...

    @property
    def nothing_to_apply(self) -> str | None:
        """Why there is nothing to confirm (the live state already matches), else None."""


class Step:
    OUTPUT: ClassVar[type[StepOutput]]

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.settings = ctx.settings
        # What the step imports lazily (its module's WARM_IMPORTS: Prefect's client), imported now the
        # quick way: done already in a kernel the runner prewarmed, not in JupyterLab's. No freeze: a
        # long-lived kernel's own objects stay collectable.
        warm_up([type(self).__module__], freeze=False)

    @classmethod
    def name(cls) -> str:
        return cls.OUTPUT.STEP

    def publish(self, **fields: Any) -> StepOutput:
        """Record these fields of the step's output (the others keep their values)."""
        return self.ctx.publish(self.OUTPUT(**fields))

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """A RunbookError raised inside marks the step failed (with its message) and ends the cell; so
        does an interruption (Ctrl-C, or the runner's SIGTERM or death), which is recorded as such."""
        try:
            yield
        except RunbookError as exc:
            self.ctx.fail(exc)
            raise
        except KeyboardInterrupt:
            self.ctx.fail(RunbookError(f"step {self.ctx.name!r} was interrupted (KeyboardInterrupt) before it "
                                       "finished; nothing after that point ran"))
            raise

    def confirm(self, plan: Plan) -> None:
        """Show the plan behind the confirmation gate, unless there is nothing to apply."""
        if plan.nothing_to_apply:
            show(f"{plan.nothing_to_apply}; nothing to confirm.")
            return
        self.ctx.confirm_plan(plan.summary(), plan.gate_plan())
