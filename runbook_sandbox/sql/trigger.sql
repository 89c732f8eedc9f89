-- The production trigger (../shared/contract.md): the Edge Function URL and the anon key are written
-- into the function body, as in production. Rendered and re-applied at every `sandbox up`, since the
-- sandbox's ports change. :edge_function_url and :anon_key are substituted as SQL literals.
CREATE OR REPLACE FUNCTION public.notify_prefect_on_batch_insert()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $fn$
DECLARE
    request_id bigint;
BEGIN
    request_id := net.http_post(
        url := :edge_function_url,
        body := jsonb_build_object('batch_id', NEW.id::text),
        headers := jsonb_build_object(
            'Content-Type', 'application/json',
            'Authorization', 'Bearer ' || :anon_key
        )
    );
    INSERT INTO runbook.trigger_requests (request_id, batch_id) VALUES (request_id, NEW.id);
    RETURN NEW;
END;
$fn$;

DROP TRIGGER IF EXISTS trigger_batch_ready ON public.batches;
CREATE TRIGGER trigger_batch_ready
    AFTER UPDATE ON public.batches
    FOR EACH ROW
    WHEN (OLD.status = 'INITIALIZING' AND NEW.status = 'PENDING')
    EXECUTE FUNCTION public.notify_prefect_on_batch_insert();
