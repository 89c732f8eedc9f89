-- Why a workflow state changed, when the writer says so: the audit row takes the transaction's
-- `runbook.transition_reason` setting (set_config(..., true)), NULL otherwise. The orchestrator sets
-- it when it puts expired claims (QUEUED longer than its claim lease) back to PENDING.
-- Part of the runbook's database additions, like 005; harmless in production (a custom setting
-- that nobody sets reads as NULL).
ALTER TABLE runbook.workflow_state_transitions ADD COLUMN IF NOT EXISTS reason text;

CREATE OR REPLACE FUNCTION runbook.record_workflow_state_transition() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO runbook.workflow_state_transitions
            (state_id, batch_id, item_id, step_name, from_status, to_status, reason)
        VALUES (NEW.id, NEW.batch_id, NEW.item_id, NEW.step_name,
                CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status,
                nullif(current_setting('runbook.transition_reason', true), ''));
    END IF;
    RETURN NEW;
END;
$$;
