"""Checks of the Supabase side: the Management API answers with the token; the Edge Function's
secrets exist (names only: the API lists digests, never values); the Edge Function answers (a CORS
preflight, which starts nothing)."""

from __future__ import annotations

from runbook_lib.checks.base import Fail, Outcome, check, ok
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import SupabaseApiError
from runbook_lib.systems.supabase import preflight_function


@check("supabase.api", "Supabase Management API reachable with the token",
       proves="the Management API lists the project's secrets with SUPABASE_ACCESS_TOKEN",
       remediation="set SUPABASE_ACCESS_TOKEN (a personal access token) and SUPABASE_PROJECT_REF, as the detail says")
def api(facts: Facts) -> Outcome:
    try:
        names = facts.supabase_secret_names()
    except SupabaseApiError as exc:
        fix = {401: f"set SUPABASE_ACCESS_TOKEN to a valid personal access token; {facts.where('supabase.access_token')}",
               403: "use an access token of an account with access to this project",
               404: f"check SUPABASE_PROJECT_REF; {facts.where('supabase.project_ref')}"}.get(
            exc.status, f"check SUPABASE_API_URL and that the Management API is reachable; {facts.where('supabase.api_url')}")
        raise Fail(str(exc), fix) from None
    return ok(f"{len(names)} secret(s) listed for project {facts.settings.supabase.project_ref}")


@check("supabase.function_secrets", "The Edge Function's secrets exist",
       proves="every secret the Edge Function reads (PREFECT_API_KEY, _ACCOUNT_ID, _WORKSPACE_ID, _DEPLOYMENT_ID) is set")
def function_secrets(facts: Facts) -> Outcome:
    s = facts.settings.supabase
    names = facts.need(facts.supabase_secret_names, "supabase.api", "the project's secret names")
    missing = [n for n in s.function_secrets if n not in names]
    if missing:
        raise Fail(
            f"the Edge Function {s.function_name} reads {', '.join(s.function_secrets)}, but {', '.join(missing)} "
            "is not set: it would answer 500 'Server configuration error' and start no flow run",
            f"set {', '.join(missing)} (the runbook's Edge Function secret step writes PREFECT_DEPLOYMENT_ID; by hand: "
            f"`supabase secrets set {missing[0]}=...`)",
            missing=missing,
        )
    return ok(f"{', '.join(s.function_secrets)} are set (names checked; values are digests only)")


@check("supabase.edge_function", "The Edge Function answers",
       proves="the Edge Function is deployed and boots: it answers a CORS preflight (OPTIONS, which starts no flow run)")
def edge_function(facts: Facts) -> Outcome:
    s = facts.settings.supabase
    url = s.edge_function_url
    if not url:
        raise Fail("the Edge Function's URL is not set", f"set SUPABASE_EDGE_FUNCTION_URL ({facts.where('supabase.edge_function_url')})")
    fix_logs = (f"read the function's logs (Supabase: Edge Functions, {s.function_name}, Logs), fix it and redeploy: "
                f"`supabase functions deploy {s.function_name}`; until then no batch starts a flow run")
    try:
        answer = preflight_function(url)
    except SupabaseApiError as exc:
        raise Fail(str(exc), f"check SUPABASE_EDGE_FUNCTION_URL ({facts.where('supabase.edge_function_url')}) and "
                   "that Supabase's functions gateway is reachable from here") from None
    if answer.status == 404:
        raise Fail(f"{url} answered 404 ({answer.message}): the function {s.function_name} is not deployed",
                   f"deploy it: `supabase functions deploy {s.function_name}`, or correct SUPABASE_EDGE_FUNCTION_URL")
    if not 200 <= answer.status < 300:
        raise Fail(f"{url} answered {answer.status} ({answer.message}) to a preflight: the function does not serve "
                   "requests", fix_logs)
    return ok(f"{url} answered {answer.status} to a CORS preflight (no flow run started)")


EDGE_FUNCTION = [api, function_secrets, edge_function]
