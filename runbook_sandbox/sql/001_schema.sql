-- The production schema of the data-enrichment pipeline (../shared/contract.md, "Database").
CREATE TYPE batchstatus AS ENUM ('INITIALIZING', 'PENDING', 'IN_PROGRESS', 'COMPLETED', 'FAILED');
CREATE TYPE workflowstatus AS ENUM ('PENDING', 'QUEUED', 'IN_PROGRESS', 'COMPLETED', 'FAILED');
CREATE TYPE enrichmenttype AS ENUM ('SYNC', 'ASYNC');

CREATE TABLE public.clients (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    company_name text,
    company_domain text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.batches (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status batchstatus NOT NULL DEFAULT 'PENDING',
    blueprint json NOT NULL,
    client_id uuid NOT NULL REFERENCES public.clients (id) ON DELETE CASCADE,
    workstream_slug text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.batch_items (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id uuid NOT NULL REFERENCES public.batches (id) ON DELETE CASCADE,
    company_name text,
    company_domain text,
    company_linkedin_url text,
    person_first_name text,
    person_last_name text,
    person_linkedin_url text,
    person_title text,
    original_data jsonb,
    raw_data jsonb
);
CREATE INDEX batch_items_batch_id_idx ON public.batch_items (batch_id);

CREATE TABLE public.workflow_states (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id uuid NOT NULL REFERENCES public.batches (id) ON DELETE CASCADE,
    item_id uuid NOT NULL REFERENCES public.batch_items (id) ON DELETE CASCADE,
    step_name varchar(255) NOT NULL,
    status workflowstatus NOT NULL DEFAULT 'PENDING',
    updated_at timestamptz NOT NULL DEFAULT now(),
    advanced_at timestamptz NULL,
    meta jsonb,
    CONSTRAINT workflow_states_batch_item_step_key UNIQUE (batch_id, item_id, step_name)
);
CREATE INDEX workflow_states_status_updated_idx ON public.workflow_states (status, updated_at);

CREATE TABLE public.enrichment_registry (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug text NOT NULL,
    workstream_slug text,
    name text NOT NULL,
    type enrichmenttype,
    modal_sender_fn text,
    modal_receiver_fn text,
    requires_clay boolean DEFAULT true,
    CONSTRAINT enrichment_registry_slug_workstream_key UNIQUE (slug, workstream_slug)
);

CREATE TABLE public.enrichment_results (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_item_id uuid NOT NULL REFERENCES public.batch_items (id) ON DELETE CASCADE,
    workflow_slug text NOT NULL,
    workstream_slug text,
    data jsonb NOT NULL,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE public.client_workflow_configs (
    client_id uuid REFERENCES public.clients (id) ON DELETE CASCADE,
    workflow_slug text,
    workstream_slug text,
    config jsonb
);
