"""The health step's pure parts: the verdict from a report, the baseline read from a run's records
(real StepResults and manifests written in a temporary outputs directory), the settings' defaults,
the trigger function's digest, the record files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from runbook_lib.checks import REGISTRY
from runbook_lib.checks.base import Check, CheckReport
from runbook_lib.checks.health import GROUPS, Baseline, HealthFacts
from runbook_lib.core.errors import RunbookError
from runbook_lib.source import lease
from runbook_lib.records.manifest import RunManifest
from runbook_lib.records.outputs import DeployOutput, EdgeSecretOutput, HealthOutput, PrerequisitesOutput
from runbook_lib.records.results import StepResults
from runbook_lib.steps.health import VERDICTS, find_baseline, health_dir, verdict_of, write_record
from runbook_lib.systems.database import TriggerInfo

DEP = "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
OTHER = "9a8b7c6d-5e4f-4a3b-9c1d-2e3f4a5b6c7d"


def report(*statuses: str) -> CheckReport:
    r = CheckReport(step="06_health_check")
    for i, s in enumerate(statuses):
        r.add(Check(id=f"c{i}", title="t", status=s, detail="d", remediation="fix"))
    return r


def test_verdict_is_fail_on_any_failure_drift_on_a_warning_else_ok():
    assert verdict_of(report("pass", "skip")) == "ok"
    assert verdict_of(report("pass", "warn", "skip")) == "drift"
    assert verdict_of(report("warn", "fail")) == "fail"
    assert VERDICTS == {"ok": 0, "drift": 1, "fail": 2}


def test_every_health_group_check_is_defined_once_in_the_catalog():
    ids = [d.id for group in GROUPS.values() for d in group]
    assert len(ids) == len(set(ids))
    assert all(REGISTRY[i] is d for group in GROUPS.values() for d in group for i in [d.id])
    # the checks reuse the catalog where a check already proves the link
    for reused in ("prefect.work_pool_active", "database.trigger", "database.pg_net", "supabase.function_secrets",
                   "blocks.referenced"):
        assert reused in ids


def test_the_queued_threshold_defaults_to_the_orchestrators_lease(make_settings):
    """Unset, the QUEUED threshold is the lease the orchestrator's runs use: the live deployment's
    `claim_lease_seconds` parameter, else the flow's CLAIM_LEASE_SECONDS; the profile can override it."""

    class Deployed(HealthFacts):  # the live deployment's parameters, as read from Prefect
        parameters: dict = {}

        def deployment(self):
            return type("Deployment", (), {"parameters": self.parameters})()

    settings = make_settings()
    assert settings.health.queued_lease_seconds is None
    facts = Deployed(settings, "06_health_check", Baseline(source="the profile"))
    assert facts.queued_lease() == (lease.flow_default(), "the flow's default (CLAIM_LEASE_SECONDS)")
    facts.parameters = {"claim_lease_seconds": 1200}
    assert facts.queued_lease() == (1200.0, "the deployment's parameter claim_lease_seconds")
    facts.parameters = {"claim_lease_seconds": "soon"}  # malformed live value: the flow's default
    assert facts.queued_lease()[0] == lease.flow_default()
    pinned = Deployed(make_settings(health__queued_lease_seconds=60), "06_health_check", Baseline(source="p"))
    assert pinned.queued_lease() == (60, "health.queued_lease_seconds")
    assert make_settings(health__window_minutes=30).health.window_minutes == 30
    with pytest.raises(RunbookError):
        make_settings(health__queued_lease_seconds=0)


def test_the_trigger_digest_ignores_line_endings_and_trailing_blanks_but_not_edits():
    base = "CREATE OR REPLACE FUNCTION f()\n BEGIN\n  RETURN NEW;\n END;\n"
    info = TriggerInfo("t", True, "", "f()", True, base)
    same = TriggerInfo("t", True, "", "f()", True, base.replace("\n", "  \r\n"))
    edited = TriggerInfo("t", True, "", "f()", True, base.replace("RETURN NEW", "RETURN NULL"))
    assert info.source_digest == same.source_digest != edited.source_digest
    assert len(info.source_digest) == 64


def write_run(outputs, run_id: str, *, status: str = "passed", profile: str = "production", started=None,
              deploy: bool = True, digest: str = "ab" * 32):
    run_dir = outputs / run_id
    run_dir.mkdir(parents=True)
    started = started or datetime.now(timezone.utc)
    RunManifest(run_id=run_id, profile=profile, status=status, started_at=started, host="h", user="u",
                runner_pid=1).save(run_dir)
    if deploy:
        StepResults(step=DeployOutput.STEP, profile=profile, status="passed", finished_at=started, values=DeployOutput(
            deployment_id=DEP, deployment_name="orchestrator/data-enrichment-orchestrator",
            diff=[{"field": "entrypoint", "status": "unchanged", "live": "a.py:f", "desired": "a.py:f"}]).values()
        ).save(run_dir)
    StepResults(step=EdgeSecretOutput.STEP, profile=profile, status="passed", finished_at=started + timedelta(seconds=5),
                values=EdgeSecretOutput(deployment_id=DEP, new_digest=digest).values()).save(run_dir)
    StepResults(step=PrerequisitesOutput.STEP, profile=profile, status="passed", finished_at=started,
                values=PrerequisitesOutput(trigger_function_digest="cd" * 32).values()).save(run_dir)
    return run_dir


def test_the_baseline_is_the_newest_passed_run_of_the_profile(tmp_path):
    outputs = tmp_path / "outputs"
    now = datetime.now(timezone.utc)
    write_run(outputs, "old", started=now - timedelta(hours=2), digest="11" * 32)
    write_run(outputs, "new", started=now - timedelta(hours=1))
    write_run(outputs, "failed", status="failed", started=now)
    write_run(outputs, "other-profile", profile="sandbox", started=now)
    write_run(outputs, "no-deploy", started=now, deploy=False)
    b = find_baseline("production", None, outputs)
    assert b.recorded and b.run_dir.endswith("new") and "run new (passed" in b.source
    assert (b.deployment_id, b.edge_digest, b.trigger_digest) == (DEP, "ab" * 32, "cd" * 32)
    assert b.deployment_name == "orchestrator/data-enrichment-orchestrator"
    assert b.fields == {"entrypoint": "a.py:f"}
    assert b.recorded_at == now - timedelta(hours=1) + timedelta(seconds=5)


def test_the_run_a_step_belongs_to_comes_first_and_an_explicit_baseline_must_hold_a_deploy(tmp_path):
    outputs = tmp_path / "outputs"
    write_run(outputs, "passed-run")
    current = write_run(tmp_path / "elsewhere", "current", status="running", digest="ee" * 32)
    assert find_baseline("production", current, outputs).edge_digest == "ee" * 32
    assert find_baseline("production", None, outputs, "passed-run").run_dir.endswith("passed-run")
    empty = write_run(outputs, "empty", deploy=False)
    with pytest.raises(RunbookError, match="no passed step 03"):
        find_baseline("production", None, outputs, str(empty))


def test_without_a_passing_run_the_baseline_is_the_profile(tmp_path):
    b = find_baseline("production", None, tmp_path / "nothing")
    assert not b.recorded and "the profile 'production'" in b.source and b.deployment_id is None


def test_the_record_holds_the_verdict_checks_and_an_index_page(tmp_path):
    r = report("pass", "warn")
    directory = health_dir(tmp_path)
    assert directory.parent.name == "health" and directory != health_dir(tmp_path)
    path = write_record(directory, "production", "drift", r, Baseline(source="the profile"), {"requeued": []})
    record = json.loads(path.read_text())
    assert record["verdict"] == "drift" and record["exit_code"] == 1
    assert [c["status"] for c in record["checks"]] == ["pass", "warn"]
    assert record["checks"][0]["remediation"] == "" and record["checks"][1]["remediation"] == "fix"
    assert record["requeue"] == {"requeued": []}
    assert "DRIFT" in (directory / "health.html").read_text()
    assert HealthOutput.STEP == "06_health_check"


def test_drift_is_shown_key_by_key():
    from runbook_lib.checks.health import _differences

    want = {"env": {"A": "{{ prefect.blocks.secret.a }}", "B": "x"}, "pip_packages": ["modal"]}
    got = {"env": {"A": "[plaintext secret withheld]", "B": "x", "C": "new"}, "pip_packages": ["modal", "prefect"]}
    assert _differences("job_variables", want, got) == [
        ("job_variables.env.A", "{{ prefect.blocks.secret.a }}", "[plaintext secret withheld]"),
        ("job_variables.env.C", None, "new"),
        ("job_variables.pip_packages", ["modal"], ["modal", "prefect"]),
    ]
    assert _differences("parameters", {"batch_size": 50}, {"batch_size": 50}) == []
