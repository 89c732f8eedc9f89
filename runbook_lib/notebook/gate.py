"""The confirmation gate in front of every change: nothing is applied without an approval.

- `confirm=True` / `confirm=False` (the notebook parameter, e.g. `papermill -p confirm true`)
  decides, whatever the front end.
- Interactive (a Jupyter kernel with a widget front end, `confirm` unset): the cell shows the plan
  with Approve / Reject buttons and returns at once (the kernel is not blocked); the NEXT cell's
  apply call runs `require_approved()`, which raises unless the button was clicked.
- Headless (plain Python, or `RUNBOOK_HEADLESS=1` as set by the runner, `confirm` unset): fails
  closed at once with NotConfirmed ("pass -p confirm true").

The decision, who or what made it, and the digest of the plan it applies to are reported to
`on_decision` (the step's results). Approval is bound to the plan: if the plan to apply differs
from the one shown, `require_approved(plan)` refuses.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from typing import Any, Callable

from runbook_lib.core import render
from runbook_lib.core.errors import NotConfirmed, ParameterError
from runbook_lib.core.secrets import redact, redact_obj
from runbook_lib.core.values import parse_flag
from runbook_lib.records.results import GateDecision, now

HEADLESS_ENV = "RUNBOOK_HEADLESS"


def parse_confirm(value: Any) -> bool | None:
    """The `confirm` parameter as True / False / None (unset); papermill may pass a string. A value
    that is neither refuses (NotConfirmed): nothing is applied."""
    try:
        return parse_flag("confirm", value)
    except ParameterError:
        raise NotConfirmed(f"confirm must be true or false, got {value!r}; pass -p confirm true to apply") from None


def plan_digest(plan: Any) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _who() -> str:
    user = os.environ.get("JUPYTERHUB_USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def in_kernel() -> bool:
    """True inside a Jupyter kernel (a notebook, papermill), False in plain Python or a terminal."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def interactive_front_end() -> bool:
    """True inside a Jupyter kernel (which can show widgets), unless RUNBOOK_HEADLESS is set."""
    try:
        headless = parse_flag(HEADLESS_ENV, os.environ.get(HEADLESS_ENV))
    except ParameterError:
        headless = True  # fail closed: an unreadable value means no one is there to click
    if headless:
        return False
    return in_kernel()


class ConfirmationGate:
    """One plan awaiting (or holding) a decision. Create with `ConfirmationGate.open(...)`."""

    def __init__(
        self,
        step: str,
        summary: str,
        plan: Any,
        decision: GateDecision,
        on_decision: Callable[[GateDecision], None] | None = None,
    ):
        self.step = step
        self.summary = redact(summary)
        self.plan = redact_obj(json.loads(json.dumps(plan, default=str)))
        self.decision = decision
        self._on_decision = on_decision
        self._widget: Any = None

    @classmethod
    def open(
        cls,
        step: str,
        summary: str,
        plan: Any,
        confirm: Any = None,
        *,
        interactive: bool | None = None,
        on_decision: Callable[[GateDecision], None] | None = None,
    ) -> "ConfirmationGate":
        """A gate for `plan`. Headless without `confirm`, the decision is recorded as rejected and
        NotConfirmed is raised: nothing may be applied."""
        confirm = parse_confirm(confirm)
        interactive = interactive_front_end() if interactive is None else interactive
        digest = plan_digest(plan)
        if confirm is not None:
            decision = GateDecision(
                decision="approved" if confirm else "rejected",
                decided_by=f"parameter confirm={confirm} (run by {_who()})",
                mode="parameter", plan_digest=digest, summary=redact(summary),
            )
        elif interactive:
            decision = GateDecision(
                decision="pending", decided_by="nobody yet: waiting for Approve in the notebook",
                mode="widget", plan_digest=digest, summary=redact(summary),
            )
        else:
            decision = GateDecision(
                decision="rejected", decided_by=f"headless run without confirm (run by {_who()})",
                mode="headless", plan_digest=digest, summary=redact(summary),
            )
        gate = cls(step, summary, plan, decision, on_decision)
        gate._report()
        if decision.mode == "headless":
            raise NotConfirmed(
                f"step {step!r}: not confirmed: pass -p confirm true to apply this plan "
                f"({redact(summary)}); nothing was applied"
            )
        return gate

    # -- decisions ----------------------------------------------------------------------------
    def _decide(self, approved: bool, by: str) -> None:
        self.decision = self.decision.model_copy(
            update={"decision": "approved" if approved else "rejected", "decided_by": by, "at": now()}
        )
        self._report()
        self._refresh_widget()

    def approve(self, by: str | None = None) -> None:
        self._decide(True, by or f"{_who()} clicked Approve")

    def reject(self, by: str | None = None) -> None:
        self._decide(False, by or f"{_who()} clicked Reject")

    @property
    def approved(self) -> bool:
        return self.decision.decision == "approved"

    def require_approved(self, plan: Any = None) -> None:
        """Raise NotConfirmed unless approved (and, if given, `plan` is the plan that was approved)."""
        if self.decision.decision == "pending":
            raise NotConfirmed(
                f"step {self.step!r}: not confirmed: click Approve above and re-run this cell, "
                "or pass -p confirm true when running headless; nothing was applied"
            )
        if self.decision.decision == "rejected":
            raise NotConfirmed(
                f"step {self.step!r}: not confirmed: the plan was rejected ({self.decision.decided_by}); "
                "pass -p confirm true to apply it; nothing was applied"
            )
        if plan is not None and plan_digest(plan) != self.decision.plan_digest:
            raise NotConfirmed(
                f"step {self.step!r}: the plan changed since it was approved; show the new plan and "
                "approve it again; nothing was applied"
            )

    def _report(self) -> None:
        if self._on_decision:
            self._on_decision(self.decision)

    # -- display ------------------------------------------------------------------------------
    def _status_text(self) -> str:
        d = self.decision
        return f"{d.decision.upper()} — {d.decided_by}"

    def _plan_html(self) -> str:
        return render.preformatted(f"Plan for step {self.step}: {self.summary}", self.plan)

    def _status_html(self) -> str:
        return render.STYLE + f"<p>{render.badge(self.decision.decision)} {render.escape(self.decision.decided_by)}</p>"

    def _repr_html_(self) -> str:
        return self._plan_html() + self._status_html()

    def __str__(self) -> str:
        return f"Plan for step {self.step}: {self.summary}\n{json.dumps(self.plan, indent=2)}\n{self._status_text()}"

    def widget(self) -> Any:
        """The plan with Approve / Reject buttons (ipywidgets); clicking records the decision."""
        if self._widget is None:
            import ipywidgets as widgets

            approve = widgets.Button(description="Approve", button_style="success", icon="check")
            reject = widgets.Button(description="Reject", button_style="danger", icon="times")
            status = widgets.HTML()
            approve.on_click(lambda _b: self.approve())
            reject.on_click(lambda _b: self.reject())
            self._widget = widgets.VBox([widgets.HTML(self._plan_html()), widgets.HBox([approve, reject]), status])
            self._status = status
            self._refresh_widget()
        return self._widget

    def _refresh_widget(self) -> None:
        if self._widget is not None:
            self._status.value = self._status_html()

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        if self.decision.mode == "widget":
            display(self.widget())
        else:
            display(HTML(self._repr_html_()))
