"""Checks of the Supabase side: the Management API answers with the token; the Edge Function's
secrets exist (names only: the API lists digests, never values)."""

from __future__ import annotations

from runbook_lib.checks.base import Fail, Outcome, check, ok
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import SupabaseApiError


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


EDGE_FUNCTION = [api, function_secrets]
