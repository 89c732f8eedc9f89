-- Seed rows a launch needs: a client, a dedicated client for the runbook's end-to-end test, and
-- registry rows for a two-step blueprint in one workstream (a sender and receiver per step).
INSERT INTO public.clients (id, company_name, company_domain) VALUES
    ('00000000-0000-4000-8000-000000000001', 'Acme Data', 'acme.example'),
    ('00000000-0000-4000-8000-0000000000e2', 'Runbook E2E Test Client', 'runbook-e2e.example');

INSERT INTO public.enrichment_registry
    (slug, workstream_slug, name, type, modal_sender_fn, modal_receiver_fn, requires_clay) VALUES
    ('company-firmographics', 'company-enrichment', 'Company firmographics', 'ASYNC',
     'send_company_firmographics', 'receive_company_firmographics', true),
    ('person-contact', 'company-enrichment', 'Person contact details', 'ASYNC',
     'send_person_contact', 'receive_person_contact', true);

INSERT INTO public.client_workflow_configs (client_id, workflow_slug, workstream_slug, config) VALUES
    ('00000000-0000-4000-8000-000000000001', 'company-firmographics', 'company-enrichment',
     '{"webhook_url": "https://hooks.example/acme/company-firmographics"}'),
    ('00000000-0000-4000-8000-000000000001', 'person-contact', 'company-enrichment',
     '{"webhook_url": "https://hooks.example/acme/person-contact"}');
