"""runbook_lib.steps.e2e.diagnosis: what the flow run's logs say about a failed dispatch decides the
cause and the remediation; the quoted lines are masked and grouped; stuck items are grouped by state
and cause with that evidence. (The same over the sandbox: tests/integration/steps/test_e2e_diagnosis.py.)"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.steps.e2e.diagnosis import RunEvidence, dispatch_cause, stuck_items
from runbook_lib.systems.prefect import LogLine

SENDER = "send_company_firmographics"
ITEMS = ["3f2a9c1e-0d4b-4c55-9a1e-5b7c2d9e8f01", "8b1e4d2f-6a3c-4f70-b2d9-1c4e5a6f7b02"]
AT = datetime(2025, 6, 5, 12, 0, 1, tzinfo=timezone.utc)


def line(message: str, level: int = logging.ERROR) -> LogLine:
    return LogLine(AT, level, "11111111-1111-4111-8111-111111111111", redaction.redact(message))


@pytest.mark.parametrize("messages, kind, needle", [
    # flows/src/orchestrator.py's http spawner, against the stand-in or Modal's HTTP shape
    ([f"2 spawn(s) failed (spawn data-enrichment-workers.{SENDER}: HTTP 401 Token missing or invalid); state(s) now PENDING"],
     "modal_auth", "modal-token-id"),
    ([f"Failed to dispatch item 3f2a9c1e... to {SENDER}: spawn data-enrichment-workers.{SENDER}: HTTP 404 "
      f"Function data-enrichment-workers.{SENDER} not found"], "not_found", "modal deploy"),
    ([f"Failed to dispatch item 3f2a9c1e... to {SENDER}: spawn data-enrichment-workers.{SENDER}: cannot reach "
      "http://127.0.0.1:5100: [Errno 111] Connection refused"], "unreachable", "egress"),
    ([f"Failed to dispatch item 3f2a9c1e... to {SENDER}: spawn data-enrichment-workers.{SENDER}: HTTP 500 injected spawn failure"],
     "modal_error", "modal app logs"),
    # the real Modal client
    (["Modal credentials missing: MODAL_TOKEN_ID / MODAL_TOKEN_SECRET are not set in the run's environment"],
     "modal_credentials_missing", "Secret blocks modal-token-id / modal-token-secret"),
    ([f"Failed to dispatch item 3f2a9c1e... to {SENDER}: AuthError: Token ID is malformed"], "modal_auth", "valid token"),
    ([f"Failed to dispatch item 3f2a9c1e... to {SENDER}: Lookup failed for Function '{SENDER}' from the "
      "'data-enrichment-workers' app: App 'data-enrichment-workers' not found in environment 'main'"],
     "not_found", "modal deploy"),
    # the registry
    (["No modal_sender_fn for step 'company-firmographics', skipping item 3f2a9c1e..."], "no_sender", "enrichment_registry"),
    (["3 state(s) set FAILED: no Modal sender mapped: no enrichment_registry row for step 'x' in workstream 'y'"],
     "no_sender", "modal_sender_fn"),
])
def test_the_dispatch_errors_decide_the_cause_and_the_remediation(messages, kind, needle):
    found = dispatch_cause(messages, sender=SENDER)
    assert found.kind == kind, (found, messages)
    assert needle in found.remediation, found.remediation
    assert found.function == SENDER or kind in ("modal_credentials_missing", "no_sender")


def test_quoted_lines_are_masked_grouped_and_matched_to_the_test_items():
    redaction.register_secret("as-modal-secret-0123456789", "MODAL_TOKEN_SECRET")
    failed = [line(f"Failed to dispatch item {item[:8]}... to {SENDER} (credentials ak-id:as-modal-secret-0123456789): "
                   f"spawn data-enrichment-workers.{SENDER}: HTTP 500 injected spawn failure") for item in ITEMS]
    evidence = RunEvidence("11111111-1111-4111-8111-111111111111", "brave-otter", "COMPLETED", "Completed", None,
                           problems=[line("Unrelated slow query", logging.WARNING), *failed],
                           summary=["Dispatcher run complete: {'processed': 2, 'failed': 2}"])
    assert [x.message for x in evidence.dispatch_lines] == [x.message for x in failed]
    quoted = evidence.quoted()
    assert len(quoted) == 1 and quoted[0].endswith("(logged 2 times)")  # one error, two items
    assert "12:00:01 ERROR Failed to dispatch item" in quoted[0] and "HTTP 500 injected spawn failure" in quoted[0]
    assert "as-modal-secret-0123456789" not in quoted[0] and "[redacted:MODAL_TOKEN_SECRET]" in quoted[0]
    assert evidence.names_items(ITEMS + ["00000000-0000-4000-8000-000000000000"]) == 2
    text = evidence.describe()
    assert "flow run brave-otter ended Completed" in text and "2 dispatch warning/error line(s)" in text
    assert "Dispatcher run complete" in text and "as-modal-secret" not in text

    quiet = RunEvidence("r", state="COMPLETED", problems=[line("Unrelated slow query", logging.WARNING)])
    assert quiet.quoted() == [] and "no dispatch error" in quiet.describe()
    unread = RunEvidence("r", unavailable="Prefect API: 503")
    assert "could not be read: Prefect API: 503" in unread.describe()


def options() -> SimpleNamespace:
    return SimpleNamespace(first_step="company-firmographics", workstream="company-enrichment",
                           target_status="COMPLETED", expected_path=["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED"])


def test_stuck_queued_items_get_the_evidence_based_cause_and_remediation():
    rows = [{"item_id": item, "status": "QUEUED", "meta": {}} for item in ITEMS]
    paths = {item: ["PENDING", "QUEUED"] for item in ITEMS}
    registry = [{"slug": "company-firmographics", "modal_sender_fn": SENDER}]
    evidence = RunEvidence("r", state="COMPLETED", problems=[
        line(f"Failed to dispatch item {ITEMS[0][:8]}... to {SENDER}: spawn data-enrichment-workers.{SENDER}: "
             "HTTP 401 Token missing or invalid")])
    [group] = stuck_items(options(), rows, paths, [], registry=registry, run_state="COMPLETED", batch_size=50,
                          evidence=evidence)
    assert group["status"] == "QUEUED" and group["count"] == 2
    assert "Modal refused the runtime's credentials" in group["cause"] and "ended COMPLETED" in group["cause"]
    assert "modal-token-id" in group["remediation"] and "reset the stuck states to PENDING" in group["remediation"]
    assert "read the flow run's logs" not in group["remediation"]  # it has read them

    # The logs read, no dispatch error in them: the sender is the suspect, not the credentials.
    clean = RunEvidence("r", state="COMPLETED", problems=[])
    [group] = stuck_items(options(), rows, paths, [], registry=registry, run_state="COMPLETED", batch_size=50,
                          evidence=clean)
    assert "dispatched without error" in group["cause"] and "modal app logs" in group["remediation"]

    # No sender mapped: the registry says so, whatever the logs.
    [group] = stuck_items(options(), rows, paths, [], registry=[], run_state="COMPLETED", batch_size=50, evidence=clean)
    assert "no Modal sender is mapped" in group["cause"]


def test_items_put_back_to_pending_quote_their_last_dispatch_error():
    rows = [{"item_id": item, "status": "PENDING",
             "meta": {"dispatch_attempts": 1, "last_dispatch_error":
                      f"spawn data-enrichment-workers.{SENDER}: HTTP 404 Function data-enrichment-workers.{SENDER} not found"}}
            for item in ITEMS]
    paths = {item: ["PENDING", "QUEUED", "PENDING"] for item in ITEMS}
    [group] = stuck_items(options(), rows, paths, [], registry=[{"slug": "company-firmographics", "modal_sender_fn": SENDER}],
                          run_state="FAILED", batch_size=50, evidence=None)
    assert group["cause"].startswith("dispatch failed (1 attempt(s)): ") and "HTTP 404" in group["cause"]
    assert "modal deploy" in group["remediation"]
