"""Step 04: point the Edge Function at the deployment, through its secret PREFECT_DEPLOYMENT_ID.

The deployment id comes from step 03's results (or the `deployment_id` parameter) and must be a
UUID naming an existing deployment of the expected flow (the profile's deployment name and
entrypoint). The Management API lists each secret as a SHA-256 digest of its value, so the
current value is compared by digest: equal means nothing to do (no write). Otherwise, behind the
confirmation gate, the secret is upserted (429/5xx retried with backoff, honouring the rate-limit
headers), the list is read back and the digest verified.

Every change is recorded in `<run_dir>/edge_function_secret_history.jsonl` (deployment ids and
digests only, never a secret value), write-ahead: the intended change (the digest it replaces, the
deployment id behind it, the new value and where it came from) is appended as `pending` BEFORE the
upsert, and finalised (`applied`, or `not_applied` when the value is known unchanged) by a line
with the same `change_id` after the read-back. A process that dies between, or a read-back that
fails, leaves the pending change on record, and `rollback=True` works from it. Right before the
write the secret's digest is read again: a change since the plan was shown refuses the write.

The deployment id behind the current digest is looked up in earlier records (this run directory,
its sibling run directories, `outputs/*` and `outputs/runs/*`), so that `rollback=True` can restore
the value the last change replaced, and verify the restored digest.

The function's other Prefect secrets are checked by name, and by digest where the runbook knows
the expected value (the account and workspace of PREFECT_API_URL, the API key, the API URL).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn

from runbook_lib.checks.base import Check, CheckReport, define
from runbook_lib.core.errors import ParameterError, PrefectApiError, ResultsError, RunbookError, SupabaseApiError
from runbook_lib.core.settings import RunbookSettings
from runbook_lib.core.values import parse_flag, parse_uuid
from runbook_lib.notebook.context import StepContext
from runbook_lib.records.outputs import DeployOutput, EdgeSecretOutput
from runbook_lib.records.results import StepResults, now
from runbook_lib.steps.base import Step
from runbook_lib.systems.prefect import CLIENT_MODULES, PrefectApi
from runbook_lib.systems.supabase import SupabaseManagementApi, secret_digest

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel
DEPLOY_STEP = DeployOutput.STEP
HISTORY_FILE = "edge_function_secret_history.jsonl"
STALE = "the live state changed since the plan was shown"
MAX_RUN_DIRS = 500  # run directories searched for earlier records

ID_FORMAT = define("deployment_id.format", "The deployment id is a UUID", proves="the value to set is a deployment id",
                   remediation="pass the deployment id step 03 recorded: -p deployment_id <uuid>")
DEPLOYMENT = define("deployment.exists", "The deployment id names the expected deployment",
                    proves="the id names an existing deployment of the orchestrator (name, entrypoint, flow) in this "
                           "workspace", remediation="check PREFECT_API_KEY and the workspace settings")
ACCESS = define("management_api.access", "The Management API lists the function's secrets",
                proves="the Supabase Management API answers with the token (secrets listed as digests)")
OTHER_SECRETS = define("function_secrets.present", "The function's other secrets are set",
                       proves="the Edge Function's other PREFECT_* secrets exist")
WORKSPACE = define("function_secrets.workspace", "The function targets this workspace",
                   proves="the function's PREFECT_ACCOUNT_ID / PREFECT_WORKSPACE_ID equal (by digest) the workspace of "
                          "PREFECT_API_URL")
API_URL = define("function_secrets.api_url", "The function's PREFECT_API_URL is the runbook's",
                 proves="an optional PREFECT_API_URL of the function equals (by digest) the runbook's")
API_KEY = define("function_secrets.api_key", "The function's PREFECT_API_KEY is the runbook's",
                 proves="the function's PREFECT_API_KEY equals (by digest) the runbook's (a warning otherwise)")
ROLLBACK = define("rollback.record", "A recorded change can be rolled back",
                  proves="a recorded change set the live value, and the record holds the deployment id it replaced")
CURRENT = define("secret.current", lambda s: f"Current value of {s.supabase.deployment_id_secret}" if s else
                 "Current value of the deployment id secret",
                 proves="the live digest of PREFECT_DEPLOYMENT_ID, and the deployment id behind it when a record knows it")
WRITE = define("secret.write", lambda s: f"{s.supabase.deployment_id_secret} written" if s else "Secret written",
               proves="the Management API accepted the upsert of the secret")
VERIFY = define("secret.verify", lambda s: f"{s.supabase.deployment_id_secret} holds the deployment" if s else
                "The secret holds the deployment",
                proves="read back, the secret's digest is sha256 of the deployment id",
                remediation="re-run this step; if it persists, something else writes this secret")


def parse_deployment_id(value: Any) -> str:
    """The canonical UUID text, or a ParameterError saying what is wrong (nothing is changed)."""
    try:
        return parse_uuid(value)
    except ParameterError as exc:
        raise ParameterError(f"{exc}: pass the id step 03 recorded (its results' deployment_id), e.g. -p "
                             "deployment_id 0f9d2c1e-...; nothing was changed") from None


# -- earlier records ---------------------------------------------------------------------------------


def _run_dirs(run_dir: Path, root: Path) -> Iterator[Path]:
    """The run directory, its siblings, and the project's run directories (the newest by name)."""
    seen: set[Path] = set()
    candidates = [run_dir]
    for base in (run_dir.parent, root / "outputs", root / "outputs" / "runs"):
        try:
            candidates += sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name)[-MAX_RUN_DIRS:]
        except OSError:  # missing or unreadable: nothing recorded there
            continue
    for path in candidates:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield resolved


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def history(run_dir: Path, root: Path) -> list[dict[str, Any]]:
    """Every recorded change of a function secret, newest first; a change written ahead and then
    finalised is one entry (its last line), a change never finalised stays `pending`."""
    entries = []
    by_id: dict[str, dict[str, Any]] = {}
    for directory in _run_dirs(run_dir, root):
        text = _read(directory / HISTORY_FILE)
        if text is None:
            continue
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "new_digest" in entry:
                if entry.get("change_id"):
                    by_id[str(entry["change_id"])] = entry  # the later line (the finalisation) wins
                else:
                    entries.append(entry)
    entries += by_id.values()
    return sorted(entries, key=lambda e: str(e.get("at", "")), reverse=True)


def known_deployment_ids(run_dir: Path, root: Path) -> set[str]:
    """Deployment ids any earlier record mentions (step 03 and 04 results, the change history)."""
    ids: set[str] = set()
    for entry in history(run_dir, root):
        ids.update(str(entry.get(k)) for k in ("deployment_id", "previous_deployment_id") if entry.get(k))
    for directory in _run_dirs(run_dir, root):
        for step in (DEPLOY_STEP, EdgeSecretOutput.STEP):
            text = _read(StepResults.path(directory, step))
            if text is not None:
                try:
                    values = json.loads(text).get("values") or {}
                except (ValueError, AttributeError):
                    continue
                ids.update(str(values[k]) for k in ("deployment_id", "previous_deployment_id") if values.get(k))
    return ids


def deployment_id_for_digest(digest: str | None, candidates: set[str]) -> str | None:
    if not digest:
        return None
    return next((c for c in sorted(candidates) if secret_digest(c) == digest.lower()), None)


def append_history(run_dir: Path, entry: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


# -- plan --------------------------------------------------------------------------------------------


@dataclass
class SecretPlan:
    secret: str
    deployment_id: str  # the value to set (or restore)
    target_digest: str
    current_digest: str | None
    previous_deployment_id: str | None  # the deployment id behind current_digest, when a record knows it
    rollback: bool = False
    source: str = ""  # where the value to set comes from (the parameter, step 03's results, a recorded change)

    @property
    def no_change(self) -> bool:
        return self.current_digest is not None and self.current_digest.lower() == self.target_digest

    @property
    def nothing_to_apply(self) -> str | None:
        if not self.no_change:
            return None
        return f"No change: {self.secret} already holds deployment {self.deployment_id} (equal digest)"

    def summary(self) -> str:
        verb = "restore" if self.rollback else "set"
        return f"{verb} the Edge Function secret {self.secret} to deployment {self.deployment_id}"

    def gate_plan(self) -> dict[str, Any]:
        return {
            "secret": self.secret,
            "rollback": self.rollback,
            "source": self.source,
            "from": {"digest": self.current_digest, "deployment_id": self.previous_deployment_id},
            "to": {"digest": self.target_digest, "deployment_id": self.deployment_id},
        }


def _deployment_checks(prefect: PrefectApi, settings: RunbookSettings, deployment_id: str, flow_name: str | None) -> list[Check]:
    """The id names an existing deployment of the expected flow (name and entrypoint from the profile)."""
    try:
        deployment = prefect.read_deployment_by_id(deployment_id)
    except PrefectApiError as exc:
        return [DEPLOYMENT.failed(str(exc), "check PREFECT_API_KEY and the workspace settings")]
    if deployment is None:
        return [DEPLOYMENT.failed(f"no deployment {deployment_id} in workspace {settings.value('prefect.api_url')}",
            f"pass the id step {DEPLOY_STEP} recorded (or run it first); an id from another workspace or a deleted "
            "deployment would make every trigger fail with 404",
        )]
    flow_actual = prefect.read_flow_name(deployment)
    problems = []
    if deployment.name != settings.deployment.name:
        problems.append(f"its name is {deployment.name!r}, not {settings.deployment.name!r}")
    if deployment.entrypoint != settings.source.entrypoint:
        problems.append(f"its entrypoint is {deployment.entrypoint!r}, not {settings.source.entrypoint!r}")
    if flow_name and flow_actual != flow_name:
        problems.append(f"its flow is {flow_actual!r}, not {flow_name!r} (step {DEPLOY_STEP})")
    if problems:
        return [DEPLOYMENT.failed(f"deployment {deployment_id} ({flow_actual}/{deployment.name}) is not the "
            "orchestrator: " + "; ".join(problems),
            f"pass the id of {settings.deployment.name} that step {DEPLOY_STEP} recorded",
        )]
    return [DEPLOYMENT.passed(f"{flow_actual}/{deployment.name} ({deployment_id}) on pool "
                         f"{deployment.work_pool_name}", deployment_id=deployment_id)]


def workspace_of(settings: RunbookSettings) -> tuple[str | None, str | None]:
    """(account id, workspace id) of PREFECT_API_URL, else of PREFECT_ACCOUNT_ID / PREFECT_WORKSPACE_ID."""
    match = re.search(r"/accounts/([0-9a-fA-F-]{36})/workspaces/([0-9a-fA-F-]{36})", settings.value("prefect.api_url") or "")
    if match:
        return match.group(1).lower(), match.group(2).lower()
    return settings.prefect.account_id, settings.prefect.workspace_id


def _function_secret_checks(settings: RunbookSettings, digests: dict[str, Any], secret: str) -> list[Check]:
    """The function's other secrets: present, and equal by digest where the runbook knows the value."""
    checks = []
    others = [n for n in settings.supabase.function_secrets if n != secret]
    missing = [n for n in others if n not in digests]
    if missing:
        checks.append(OTHER_SECRETS.failed(f"missing {missing}: the function "
            "answers 500 'Server configuration error' to every trigger",
            f"set them: `supabase secrets set {' '.join(f'{n}=<value>' for n in missing)}` (or the dashboard: Edge "
            "Functions > Secrets)",
        ))
    else:
        checks.append(OTHER_SECRETS.passed(", ".join(others)))
    expected = dict(zip(("PREFECT_ACCOUNT_ID", "PREFECT_WORKSPACE_ID"), workspace_of(settings)))
    comparable = {n: v for n, v in expected.items() if v and n in digests}
    if not comparable:
        checks.append(WORKSPACE.skipped("the account and workspace ids are not known here (PREFECT_API_URL is not Cloud-shaped)"))
    else:
        wrong = [n for n, v in comparable.items() if not digests[n].matches(v)]
        if wrong:
            checks.append(WORKSPACE.failed(f"{wrong} differ (by digest) from the workspace of PREFECT_API_URL: the function would create flow "
                "runs in another workspace, where this deployment does not exist (404)",
                f"set {wrong} to the ids in PREFECT_API_URL (`supabase secrets set {wrong[0]}=<id>`)",
            ))
        else:
            checks.append(WORKSPACE.passed(f"{sorted(comparable)} match PREFECT_API_URL (by digest)"))
    if "PREFECT_API_URL" in digests:  # optional: replaces the Cloud URL built from the ids
        if digests["PREFECT_API_URL"].matches(settings.value("prefect.api_url")):
            checks.append(API_URL.passed("equal by digest"))
        else:
            checks.append(API_URL.failed("the function's PREFECT_API_URL differs (by digest) from the API this runbook deploys to",
                "set it to the runbook's PREFECT_API_URL, or delete it to use the Prefect Cloud URL built from the ids",
            ))
    key = settings.value("prefect.api_key")
    if key and "PREFECT_API_KEY" in digests and not digests["PREFECT_API_KEY"].matches(key):
        checks.append(API_KEY.warned("it differs (by digest) from the key this runbook uses; fine for a dedicated service-account key of "
            "the same workspace",
            "if triggers fail with 401/403 from Prefect, set PREFECT_API_KEY to a valid key of this workspace",
        ))
    elif key and "PREFECT_API_KEY" in digests:
        checks.append(API_KEY.passed("equal by digest"))
    return checks


def _access_remediation(status: int | None) -> str:
    if status == 401:
        return ("SUPABASE_ACCESS_TOKEN was rejected: create a personal access token (supabase.com > Account > Access "
                "Tokens) and set SUPABASE_ACCESS_TOKEN; nothing was changed")
    if status == 403:
        return "use an access token of an account (or a scoped token) allowed to manage this project's secrets"
    if status == 404:
        return "check SUPABASE_PROJECT_REF (the 20 letters of https://<ref>.supabase.co)"
    if status == 429:
        return "the Management API rate limit (about 120 requests a minute) is exhausted: wait a minute and re-run"
    if status is not None and status >= 500:
        return "the Management API is failing (check status.supabase.com); re-run this step later, nothing was changed"
    return "check SUPABASE_API_URL and the network, then re-run this step"


def _rollback_target(report: CheckReport, settings: RunbookSettings, entries: list[dict[str, Any]],
                     current: Any) -> tuple[str, str, str] | None:
    """(deployment id, digest, source) the last recorded change replaced, when that change is what is live
    (a change recorded as pending counts: its write may have happened)."""
    secret = settings.supabase.deployment_id_secret
    if current is None:
        report.add(ROLLBACK.failed(f"{secret} is not set: there is nothing to roll back",
                                "set it with -p deployment_id <uuid> (rollback false)"))
        return None
    live = current.digest.lower()
    entry = next((e for e in entries if e.get("new_digest") == live and e.get("status") != "not_applied"), None)
    if entry is None:
        report.add(ROLLBACK.failed(f"no recorded change set the current value of {secret} (digest {live[:16]}...): "
            "it was set outside this runbook, or by a run whose records are gone",
            "set the deployment id explicitly: -p deployment_id <uuid> with rollback false",
        ))
        return None
    previous_id, previous_digest = entry.get("previous_deployment_id"), entry.get("previous_digest")
    if not previous_digest:
        report.add(ROLLBACK.failed(f"the change of {entry.get('at')} created {secret}: there "
                                "is no earlier value to restore", "set a deployment id explicitly: -p deployment_id <uuid>"))
        return None
    if not previous_id or secret_digest(str(previous_id)) != previous_digest:
        report.add(ROLLBACK.failed(f"the change of {entry.get('at')} replaced a value known only by its digest "
            f"({previous_digest[:16]}...): no record holds the deployment id behind it",
            "set the deployment id explicitly: -p deployment_id <uuid> with rollback false",
        ))
        return None
    pending = (" (recorded before its write and never confirmed by a read-back; the live value is the one it "
               "wrote)") if entry.get("status") == "pending" else ""
    report.add(ROLLBACK.passed(f"the change of {entry.get('at')}{pending} replaced deployment "
                            f"{previous_id}; restoring it", deployment_id=previous_id, change_id=entry.get("change_id")))
    return str(previous_id), previous_digest, f"rollback of the change of {entry.get('at')}"


def build_plan(
    settings: RunbookSettings, run_dir: Path, root: Path, *, deployment_id: Any = None, rollback: bool = False,
    flow_name: str | None = None, source: str = "the deployment_id parameter",
) -> tuple[SecretPlan | None, CheckReport]:
    """Read-only: the checks, and the change to make (None when no target could be chosen)."""
    settings.require("supabase.api_url", "supabase.access_token", "supabase.project_ref",
                     "prefect.api_url", "prefect.api_key")
    report = CheckReport(step=EdgeSecretOutput.STEP)
    secret = settings.supabase.deployment_id_secret
    prefect = PrefectApi.from_settings(settings)
    target: tuple[str, str, str] | None = None
    if rollback and deployment_id not in (None, ""):
        report.add(ID_FORMAT.failed("rollback restores the value the last recorded "
            "change replaced; a deployment_id cannot be given with it", "pass either rollback true or deployment_id",
        ))
        return None, report
    if not rollback:
        try:
            if deployment_id in (None, ""):
                raise RunbookError(f"no deployment id: run step {DEPLOY_STEP} with this run_dir first, or pass "
                                   "-p deployment_id <uuid>")
            target_id = parse_deployment_id(deployment_id)
        except RunbookError as exc:
            report.add(ID_FORMAT.failed(str(exc)))
        else:
            report.add(ID_FORMAT.passed(target_id))
            report.checks.extend(_deployment_checks(prefect, settings, target_id, flow_name))
            target = (target_id, secret_digest(target_id), source)
    try:
        with SupabaseManagementApi.from_settings(settings) as supabase:
            digests = supabase.secret_digests()
    except SupabaseApiError as exc:
        report.add(ACCESS.failed(str(exc),
                                _access_remediation(exc.status)))
        return None, report
    report.add(ACCESS.passed(f"{len(digests)} secret(s) of project {settings.supabase.project_ref}"))
    report.checks.extend(_function_secret_checks(settings, digests, secret))
    current = digests.get(secret)
    if rollback:
        entries = [
            e for e in history(run_dir, root)
            if e.get("profile") == settings.profile and e.get("project_ref") == settings.supabase.project_ref
            and e.get("secret") == secret
        ]
        target = _rollback_target(report, settings, entries, current)
        if target is not None:
            for check in _deployment_checks(prefect, settings, target[0], flow_name):
                if check.status.value == "fail":  # restoring what was there is still what was asked
                    check = DEPLOYMENT.warned(check.detail, "after the rollback, set a valid "
                                         "deployment id: the function fails its triggers with this one")
                report.add(check)
    if target is None:
        return None, report
    current_digest = current.digest.lower() if current else None
    known = known_deployment_ids(run_dir, root)
    the_plan = SecretPlan(
        secret=secret, deployment_id=target[0], target_digest=target[1], current_digest=current_digest,
        previous_deployment_id=deployment_id_for_digest(current_digest, known), rollback=rollback, source=target[2],
    )
    now_text = (f"{secret} is not set" if current is None else
                f"{secret} has digest {current_digest[:16]}... (deployment "
                f"{the_plan.previous_deployment_id or 'unknown to earlier records'})")
    report.add(CURRENT.passed(settings=settings, detail=now_text + ("; it already holds the target: nothing to write" if the_plan.no_change else
                    f"; to be {'restored' if rollback else 'set'} to {target[0]}"),
    ))
    return the_plan, report


class EdgeSecret(Step):
    """The cells of step 04: plan, confirm, apply."""

    OUTPUT = EdgeSecretOutput

    def __init__(self, ctx: StepContext, *, deployment_id: Any = None, rollback: Any = False):
        super().__init__(ctx)
        with self.failing():
            self.rollback = bool(parse_flag("rollback", rollback))
        self.deployment_id = deployment_id

    def plan(self) -> SecretPlan | None:
        """The checks and the change; a FAIL ends the cell. The deployment id: the `deployment_id`
        parameter, else what step 03 handed on in this run directory."""
        ctx, deployment_id = self.ctx, self.deployment_id
        try:
            deployed = ctx.output_of(DeployOutput)  # step 03 in this run directory: its id and flow
        except ResultsError:
            deployed = DeployOutput()
        source = "the deployment_id parameter"
        if not self.rollback and deployment_id in (None, ""):
            deployment_id = deployed.deployment_id  # None: build_plan reports it as a failed check
            source = f"step {DEPLOY_STEP}'s results in {ctx.run_dir}"
        with self.failing():
            the_plan, report = build_plan(self.settings, ctx.run_dir, ctx.root, deployment_id=deployment_id,
                                          rollback=self.rollback, flow_name=deployed.flow_name, source=source)
        self.publish(secret_name=self.settings.supabase.deployment_id_secret, rollback=self.rollback)
        if the_plan is not None:
            self.publish(deployment_id=the_plan.deployment_id, new_digest=the_plan.target_digest,
                         previous_digest=the_plan.current_digest, previous_deployment_id=the_plan.previous_deployment_id,
                         no_change=the_plan.no_change)
        ctx.record_checks(report)
        return the_plan

    def _refuse_if_stale(self, supabase: SupabaseManagementApi, the_plan: SecretPlan) -> None:
        """Read the secret's digest again right before the write: refuse when it changed since the plan."""
        settings = self.settings
        try:
            live = supabase.secret_digests().get(the_plan.secret)
        except SupabaseApiError as exc:
            self.ctx.record_failure(WRITE.failed(f"the live state could not be read again before writing ({exc}); "
                                                 "nothing was written", _access_remediation(exc.status),
                                                 settings=settings), exc)
            raise
        digest = live.digest.lower() if live is not None else None
        if digest != the_plan.current_digest:
            shown = lambda d: f"digest {d[:16]}..." if d else "not set"  # noqa: E731
            exc = RunbookError(f"{STALE}: {the_plan.secret} is now {shown(digest)}, the plan was made when it was "
                               f"{shown(the_plan.current_digest)}. Nothing was written; re-run this step to see and "
                               "confirm the new plan")
            self.ctx.record_failure(WRITE.failed(str(exc), "re-run this step: it shows the plan for the live value "
                                                           "as it is now", settings=settings), exc)
            raise exc

    def _write_failed(self, exc: SupabaseApiError, entry: dict[str, Any], state: str, unchanged: bool) -> NoReturn:
        """Record the failed write with what the secret is known to hold (`state`), and raise `exc`. Known
        unchanged: the change is finalised as not applied; else it stays pending, for a rollback."""
        if unchanged:
            self._finalise(entry, "not_applied")
        detail = (f"{exc}; {state}" + ("" if unchanged else "; the change stays on record as pending: "
                  "rollback=True restores the previous value from it"))
        self.ctx.record_failure(WRITE.failed(detail, _access_remediation(exc.status), settings=self.settings), exc)
        raise exc

    def _finalise(self, entry: dict[str, Any], status: str) -> None:
        """The second line of a write-ahead change: its outcome."""
        append_history(self.ctx.run_dir, {**entry, "status": status, "finalised_at": now().isoformat()})
        self.publish(change_status=status)

    def apply(self, the_plan: SecretPlan) -> Check:
        """Once approved: read the digest again (refuse if it changed since the plan), record the change
        ahead (pending), write the secret, read the list back, verify the digest, finalise the record."""
        ctx, settings = self.ctx, self.settings
        if the_plan.no_change:
            self.publish(changed=False)
            return ctx.record_checks([VERIFY.passed(
                f"already holds deployment {the_plan.deployment_id} (digest {the_plan.target_digest[:16]}...): no write",
                settings=settings,
            )]).checks[0]
        with self.failing():  # NotConfirmed, or no plan was shown for confirmation
            ctx.require_approved(the_plan.gate_plan())
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

        with SupabaseManagementApi.from_settings(settings, sleep=sleep) as supabase:
            self._refuse_if_stale(supabase, the_plan)
            entry = {
                "change_id": uuid.uuid4().hex, "at": now().isoformat(), "status": "pending", "profile": ctx.profile,
                "project_ref": settings.supabase.project_ref, "secret": the_plan.secret,
                "deployment_id": the_plan.deployment_id, "new_digest": the_plan.target_digest,
                "source": the_plan.source, "previous_digest": the_plan.current_digest,
                "previous_deployment_id": the_plan.previous_deployment_id, "rollback": the_plan.rollback,
            }
            append_history(ctx.run_dir, entry)  # write-ahead: on record before the secret can change
            self.publish(change_id=entry["change_id"], change_status="pending")
            try:
                supabase.upsert_secrets({the_plan.secret: the_plan.deployment_id}, mask_values=False)  # an id, no secret
            except SupabaseApiError as exc:
                self._write_failed(exc, entry, *_state_after_failure(supabase, the_plan))
            try:
                after = supabase.secret_digests().get(the_plan.secret)
            except SupabaseApiError as exc:  # after the client's retries: reading again would only repeat them
                self._write_failed(exc, entry, f"the API accepted the write of {the_plan.secret}, but it could not be "
                                   "read back to verify it", False)
        retried = (f" after {len(waits)} retr{'y' if len(waits) == 1 else 'ies'} (waited {sum(waits):.1f}s as the API "
                   "asked)") if waits else ""
        self.publish(retries=len(waits))
        if after is None or after.digest.lower() != the_plan.target_digest:
            seen = after.digest[:16] + "..." if after else "no secret"
            return ctx.record_checks([VERIFY.failed(
                f"written{retried}, but the list shows {seen}, not {the_plan.target_digest[:16]}... (deployment "
                f"{the_plan.deployment_id}); the change stays on record as pending", settings=settings,
            )]).checks[0]
        self._finalise(entry, "applied")
        self.publish(changed=True)
        verb = "restored" if the_plan.rollback else "set"
        return ctx.record_checks([VERIFY.passed(
            f"{verb} to deployment {the_plan.deployment_id}{retried}; the list shows digest "
            f"{the_plan.target_digest[:16]}... (was {(the_plan.current_digest or 'unset')[:16]}...)", settings=settings,
        )]).checks[0]


def _state_after_failure(supabase: SupabaseManagementApi, the_plan: SecretPlan) -> tuple[str, bool]:
    """What the secret holds after a failed write, and whether it is known to be unchanged."""
    try:
        now_digest = supabase.secret_digests().get(the_plan.secret)
    except SupabaseApiError as exc:
        return f"whether {the_plan.secret} changed could not be read back ({exc})", False
    if now_digest is None:
        unset = the_plan.current_digest is None
        return (f"{the_plan.secret} is not set" if unset else f"{the_plan.secret} is now unset"), unset
    if now_digest.digest.lower() == (the_plan.current_digest or ""):
        return f"{the_plan.secret} is unchanged (digest {now_digest.digest[:16]}...)", True
    if now_digest.digest.lower() == the_plan.target_digest:
        return f"{the_plan.secret} nevertheless holds the new value: re-run this step to verify and record it", False
    return f"{the_plan.secret} now has another digest {now_digest.digest[:16]}...", False
