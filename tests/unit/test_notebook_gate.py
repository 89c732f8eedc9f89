"""runbook_lib.notebook.gate: the confirmation gate fails closed headless, is decided by `confirm`, binds to the plan, and waits for a click in a notebook."""

from __future__ import annotations

import pytest

from runbook_lib.core.errors import (
    NotConfirmed,
)
from runbook_lib.notebook.gate import ConfirmationGate, parse_confirm


def test_gate_headless_without_confirm_fails_closed_and_records_it():
    decisions = []
    with pytest.raises(NotConfirmed, match=r"not confirmed: pass -p confirm true"):
        ConfirmationGate.open("deploy", "deploy 1 flow", {"x": 1}, None, interactive=False, on_decision=decisions.append)
    assert [(d.decision, d.mode) for d in decisions] == [("rejected", "headless")]
    assert "headless run without confirm" in decisions[0].decided_by

def test_gate_confirm_parameter_decides_and_binds_to_the_plan():
    decisions = []
    gate = ConfirmationGate.open("deploy", "deploy", {"x": 1}, "true", interactive=False, on_decision=decisions.append)
    gate.require_approved({"x": 1})
    assert decisions[-1].decision == "approved" and decisions[-1].mode == "parameter"
    assert decisions[-1].decided_by.startswith("parameter confirm=True")
    with pytest.raises(NotConfirmed, match="plan changed since it was approved"):
        gate.require_approved({"x": 2})
    rejected = ConfirmationGate.open("deploy", "deploy", {"x": 1}, False, interactive=False)
    with pytest.raises(NotConfirmed, match="rejected"):
        rejected.require_approved()
    with pytest.raises(NotConfirmed, match="confirm must be true or false"):
        parse_confirm("maybe")
    assert (parse_confirm("yes"), parse_confirm("0"), parse_confirm(None), parse_confirm("None")) == (True, False, None, None)

def test_gate_widget_waits_for_a_click():
    decisions = []
    gate = ConfirmationGate.open("deploy", "deploy", {"x": 1}, None, interactive=True, on_decision=decisions.append)
    with pytest.raises(NotConfirmed, match="click Approve above"):
        gate.require_approved()
    box = gate.widget()
    approve_button = box.children[1].children[0]
    approve_button.click()
    gate.require_approved({"x": 1})
    assert [d.decision for d in decisions] == ["pending", "approved"]
    assert decisions[-1].mode == "widget" and "clicked Approve" in decisions[-1].decided_by
    assert "APPROVED" in box.children[2].value
