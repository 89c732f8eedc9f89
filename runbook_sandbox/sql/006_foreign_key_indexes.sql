-- Indexes on the foreign keys that ON DELETE CASCADE follows. Without them, deleting a batch (or a
-- client) scans workflow_states and enrichment_results once per deleted row: minutes for a batch of
-- 10,000 items. (The unique (batch_id, item_id, step_name) already covers lookups by batch_id.)
CREATE INDEX IF NOT EXISTS batches_client_id_idx ON public.batches (client_id);
CREATE INDEX IF NOT EXISTS workflow_states_item_id_idx ON public.workflow_states (item_id);
CREATE INDEX IF NOT EXISTS enrichment_results_batch_item_id_idx ON public.enrichment_results (batch_item_id);
CREATE INDEX IF NOT EXISTS client_workflow_configs_client_id_idx ON public.client_workflow_configs (client_id);
