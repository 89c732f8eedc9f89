-- An audit of every workflow state's status: one row per insert and per status change, stamped with
-- clock_timestamp(), so that "PENDING -> QUEUED -> IN_PROGRESS -> COMPLETED" is recorded, not inferred.
-- Part of the runbook's database additions (like runbook.trigger_requests); harmless in production.
CREATE TABLE runbook.workflow_state_transitions (
    id bigserial PRIMARY KEY,
    state_id uuid NOT NULL,
    batch_id uuid NOT NULL,
    item_id uuid NOT NULL,
    step_name varchar(255) NOT NULL,
    from_status workflowstatus,
    to_status workflowstatus NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX workflow_state_transitions_batch_idx ON runbook.workflow_state_transitions (batch_id, at);

CREATE FUNCTION runbook.record_workflow_state_transition() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO runbook.workflow_state_transitions (state_id, batch_id, item_id, step_name, from_status, to_status)
        VALUES (NEW.id, NEW.batch_id, NEW.item_id, NEW.step_name,
                CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER workflow_state_transition_audit
    AFTER INSERT OR UPDATE OF status ON public.workflow_states
    FOR EACH ROW EXECUTE FUNCTION runbook.record_workflow_state_transition();
