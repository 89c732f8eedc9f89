-- A stand-in for Supabase's pg_net extension, which exists only on Supabase: the same `net` schema,
-- tables and `net.http_post` signature. pg_net's background worker is replaced by the sandbox's
-- relay process (runbook_sandbox/pgnet_relay.py): NOTIFY is delivered only when the inserting
-- transaction commits, so, as with pg_net, nothing is sent for a transaction that rolls back.
CREATE SCHEMA IF NOT EXISTS net;

CREATE TABLE net.http_request_queue (
    id bigserial PRIMARY KEY,
    method text NOT NULL,
    url text NOT NULL,
    headers jsonb NOT NULL,
    body bytea,
    timeout_milliseconds integer NOT NULL
);

CREATE UNLOGGED TABLE net._http_response (
    id bigint,
    status_code integer,
    content_type text,
    headers jsonb,
    content text,
    timed_out boolean,
    error_msg text,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX _http_response_created_idx ON net._http_response (created);

CREATE FUNCTION net.http_post(
    url text,
    body jsonb DEFAULT '{}'::jsonb,
    params jsonb DEFAULT '{}'::jsonb,
    headers jsonb DEFAULT '{"Content-Type": "application/json"}'::jsonb,
    timeout_milliseconds integer DEFAULT 5000
) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    request_id bigint;
    params_array text[];
    full_url text := url;
BEGIN
    SELECT coalesce(array_agg(format('%s=%s', key, value)), '{}')
      INTO params_array
      FROM jsonb_each_text(params);
    IF array_length(params_array, 1) > 0 THEN
        full_url := url || CASE WHEN position('?' in url) > 0 THEN '&' ELSE '?' END
                    || array_to_string(params_array, '&');
    END IF;
    INSERT INTO net.http_request_queue (method, url, headers, body, timeout_milliseconds)
    VALUES ('POST', full_url, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds)
    RETURNING id INTO request_id;
    PERFORM pg_notify('net_http_request', request_id::text);
    RETURN request_id;
END;
$$;
