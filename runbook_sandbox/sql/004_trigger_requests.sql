-- Makes the trigger's pg_net request findable: net._http_response has no URL column and
-- net.http_request_queue rows are gone once sent, so the trigger records which request id it
-- queued for which batch. The runbook's end-to-end check reads this; apply it in production too.
CREATE SCHEMA IF NOT EXISTS runbook;
CREATE TABLE runbook.trigger_requests (
    request_id bigint PRIMARY KEY,
    batch_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trigger_requests_batch_idx ON runbook.trigger_requests (batch_id);
