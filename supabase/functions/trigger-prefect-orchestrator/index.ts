// Supabase Edge Function `trigger-prefect-orchestrator`.
//
// Called by the database trigger `trigger_batch_ready` (through pg_net) with `{"batch_id": "<uuid>"}`
// when a batch flips from INITIALIZING to PENDING; starts a run of the Prefect deployment named by the
// secret PREFECT_DEPLOYMENT_ID. Like production, it passes no flow parameters: the orchestrator picks
// up every PENDING workflow state by itself.
//
// Secrets (set with `supabase secrets set` or the Management API):
//   PREFECT_API_KEY, PREFECT_ACCOUNT_ID, PREFECT_WORKSPACE_ID, PREFECT_DEPLOYMENT_ID (required);
//   PREFECT_API_URL (optional): replaces the Prefect Cloud workspace URL built from the account and
//   workspace ids.
//
// No imports: it runs unchanged on Supabase and under a plain `deno run`.

const REQUIRED_SECRETS = [
  "PREFECT_API_KEY",
  "PREFECT_ACCOUNT_ID",
  "PREFECT_WORKSPACE_ID",
  "PREFECT_DEPLOYMENT_ID",
] as const;

const corsHeaders: Record<string, string> = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Headers": "authorization, x-client-info, apikey, content-type",
  "Access-Control-Allow-Methods": "POST, OPTIONS",
};

function json(body: unknown, status: number): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...corsHeaders, "Content-Type": "application/json" },
  });
}

/** The Prefect workspace API base: PREFECT_API_URL when set, else the Prefect Cloud URL. */
function prefectApiBase(accountId: string, workspaceId: string): string {
  const override = Deno.env.get("PREFECT_API_URL");
  if (override) return override.replace(/\/+$/, "");
  return `https://api.prefect.cloud/api/accounts/${accountId}/workspaces/${workspaceId}`;
}

/** Reads `batch_id` from a JSON body; null when the body is not JSON or has no usable batch_id. */
async function readBatchId(req: Request): Promise<string | null> {
  let body: unknown;
  try {
    body = await req.json();
  } catch {
    return null;
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) return null;
  const value = (body as Record<string, unknown>).batch_id;
  if (typeof value === "string" && value.trim() !== "") return value.trim();
  if (typeof value === "number") return String(value);
  return null;
}

async function handler(req: Request): Promise<Response> {
  if (req.method === "OPTIONS") {
    return new Response("ok", { headers: corsHeaders });
  }
  if (req.method !== "POST") {
    return json({ error: "Method not allowed" }, 405);
  }

  const missing = REQUIRED_SECRETS.filter((name) => !Deno.env.get(name));
  if (missing.length > 0) {
    console.error(`Missing secrets: ${missing.join(", ")}`);
    return json({ error: "Server configuration error", missing }, 500);
  }
  const apiKey = Deno.env.get("PREFECT_API_KEY")!;
  const deploymentId = Deno.env.get("PREFECT_DEPLOYMENT_ID")!;
  const base = prefectApiBase(Deno.env.get("PREFECT_ACCOUNT_ID")!, Deno.env.get("PREFECT_WORKSPACE_ID")!);

  const batchId = await readBatchId(req);
  if (batchId === null) {
    return json({ error: "batch_id is required" }, 400);
  }

  console.log(`Triggering deployment ${deploymentId} for batch ${batchId}`);
  let response: Response;
  try {
    response = await fetch(`${base}/deployments/${deploymentId}/create_flow_run`, {
      method: "POST",
      headers: {
        "Authorization": `Bearer ${apiKey}`,
        "Content-Type": "application/json",
      },
      body: JSON.stringify({
        state: { type: "SCHEDULED", message: `Triggered by Supabase for batch ${batchId}` },
      }),
    });
  } catch (err) {
    const details = err instanceof Error ? err.message : String(err);
    console.error(`Prefect unreachable: ${details}`);
    return json({ error: "Failed to trigger Prefect flow run", status: 502, details }, 500);
  }

  const text = await response.text();
  if (!response.ok) {
    console.error(`Prefect answered ${response.status} for batch ${batchId}`);
    return json({ error: "Failed to trigger Prefect flow run", status: response.status, details: text }, 500);
  }

  let flowRun: Record<string, unknown>;
  try {
    flowRun = JSON.parse(text);
  } catch {
    return json({
      error: "Failed to trigger Prefect flow run",
      status: response.status,
      details: `Prefect answered a body that is not JSON: ${text.slice(0, 500)}`,
    }, 500);
  }
  const flowRunId = flowRun.id;
  console.log(`Created flow run ${flowRunId} for batch ${batchId}`);
  return json({
    success: true,
    batch_id: batchId,
    flow_run_id: flowRunId,
    message: `Prefect flow run triggered for batch ${batchId}`,
  }, 200);
}

Deno.serve(handler);
