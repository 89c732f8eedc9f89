"""runbook_lib.systems.database against the sandbox's real Postgres: the trigger, pg_net, the registry, a launch."""

from __future__ import annotations

from typing import Iterator

import pytest

from runbook_lib.core.errors import DatabaseError
from runbook_sandbox.config import SandboxConfig
from tests.conftest import partial_sandbox


@pytest.fixture(scope="module")
def postgres_sandbox() -> Iterator[SandboxConfig]:
    """Only the sandbox's Postgres (schema, pg_net stand-in, trigger): no flow is triggered."""
    with partial_sandbox("runbook-pg-", ["postgres"]) as cfg:
        yield cfg


def test_database_reads_trigger_pg_net_and_registry(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    assert db.server_version().startswith("16")
    assert db.http_post_available()
    trigger = db.trigger()
    assert trigger and trigger.enabled and trigger.security_definer
    assert trigger.fires_on_initializing_to_pending and trigger.posts_to(postgres_sandbox.edge_function_url)
    assert not trigger.posts_to("https://elsewhere.supabase.co/functions/v1/trigger-prefect-orchestrator")
    rows = db.registry("company-enrichment")
    assert [(r["slug"], r["modal_sender_fn"]) for r in rows] == [
        ("company-firmographics", "send_company_firmographics"), ("person-contact", "send_person_contact")]
    assert db.client_exists("00000000-0000-4000-8000-0000000000e2")

def test_launching_a_batch_like_the_ui_fires_the_trigger_once(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    items = [{"company_name": f"Co {i}", "company_domain": f"co{i}.example", "original_data": {"row": i}} for i in range(3)]
    batch = db.launch_batch("00000000-0000-4000-8000-0000000000e2", "company-enrichment",
                            ["company-firmographics", "person-contact"], items)
    try:
        assert len(batch.item_ids) == 3 and len(batch.trigger_request_ids) == 1
        assert db.state_counts(batch.batch_id) == {("company-firmographics", "PENDING"): 3}
        assert [(t["from_status"], t["to_status"]) for t in db.transitions(batch.batch_id)] == [(None, "PENDING")] * 3
        queued = db.query("SELECT url, convert_from(body, 'UTF8')::jsonb AS body FROM net.http_request_queue WHERE id = %s",
                          (batch.trigger_request_ids[0],))
        assert queued[0]["url"] == postgres_sandbox.edge_function_url and queued[0]["body"] == {"batch_id": batch.batch_id}
        assert db.http_responses(batch.trigger_request_ids) == []  # nothing relays in this Postgres-only sandbox
    finally:
        assert db.delete_batch(batch.batch_id)
    assert db.state_counts(batch.batch_id) == {} and db.trigger_request_ids(batch.batch_id) == []
    assert not db.delete_batch(batch.batch_id)

def test_bad_batch_input_changes_nothing_and_connection_errors_hide_the_password(postgres_sandbox):
    from runbook_lib.systems.database import Database

    db = Database(postgres_sandbox.database_url)
    before = db.query("SELECT count(*) AS n FROM public.batches")[0]["n"]
    with pytest.raises(DatabaseError, match=r"unknown batch item field\(s\) \['colour'\]"):
        db.launch_batch("00000000-0000-4000-8000-0000000000e2", "company-enrichment", ["company-firmographics"],
                        [{"company_name": "ok"}, {"colour": "blue"}])
    with pytest.raises(DatabaseError, match="inserting the batch failed"):
        db.launch_batch("99999999-9999-4999-8999-999999999999", "company-enrichment", ["company-firmographics"],
                        [{"company_name": "no such client"}])
    assert db.query("SELECT count(*) AS n FROM public.batches")[0]["n"] == before
    wrong = postgres_sandbox.database_url.replace(postgres_sandbox.postgres.password, "wrong-password-xyz")
    with pytest.raises(DatabaseError) as err:
        Database(wrong, connect_timeout=5).server_version()
    assert "wrong-password-xyz" not in str(err.value) and "check DATABASE_URL" in str(err.value)
