-- Why a state changed, when the change was not the pipeline's own: the runbook's health check
-- (`runbook health --requeue-stuck`) writes the reason of the QUEUED -> PENDING resets it makes.
-- Part of the runbook's database additions (like runbook.workflow_state_transitions); apply it in production too.
ALTER TABLE runbook.workflow_state_transitions ADD COLUMN IF NOT EXISTS reason text;
