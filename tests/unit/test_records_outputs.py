"""runbook_lib.records.outputs: the typed hand-off of each step (ids canonicalised, a bad id refused,
unknown keys of an older record ignored, `values()` holding what is set)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runbook_lib.records import outputs
from runbook_lib.records.outputs import (
    DeployOutput,
    E2EOutput,
    EdgeSecretOutput,
    FallbackOutput,
    HealthOutput,
    MergeOutput,
    PrerequisitesOutput,
    StepOutput,
)

ID = "0b7e5c2a-1f3d-4c6e-9a8b-7d6c5e4f3a2b"
OTHER = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
OUTPUTS = [PrerequisitesOutput, MergeOutput, DeployOutput, EdgeSecretOutput, E2EOutput, FallbackOutput, HealthOutput]


def test_every_output_names_its_steps_notebook_once():
    subclasses = {c for c in vars(outputs).values() if isinstance(c, type) and issubclass(c, StepOutput)} - {StepOutput}
    assert subclasses == set(OUTPUTS)
    steps = [c.STEP for c in OUTPUTS]
    assert len(set(steps)) == len(steps)
    for step in steps:
        assert (NOTEBOOKS / f"{step}.ipynb").is_file(), step


def test_deployment_ids_are_canonicalised():
    assert DeployOutput(deployment_id=f"  {ID.upper()} ").deployment_id == ID
    assert E2EOutput(deployment_id=ID.replace("-", "")).deployment_id == ID
    assert FallbackOutput(fallback_deployment_id=ID.upper()).fallback_deployment_id == ID
    edge = EdgeSecretOutput(deployment_id=ID.upper(), previous_deployment_id=OTHER.upper())
    assert (edge.deployment_id, edge.previous_deployment_id) == (ID, OTHER)
    assert DeployOutput(deployment_id="").deployment_id is None and DeployOutput().deployment_id is None


@pytest.mark.parametrize("model,field", [(DeployOutput, "deployment_id"), (E2EOutput, "deployment_id"),
                                         (EdgeSecretOutput, "previous_deployment_id"),
                                         (FallbackOutput, "fallback_deployment_id")])
def test_a_bad_id_is_refused(model, field):
    with pytest.raises(ValidationError) as err:
        model(**{field: "not-a-uuid"})
    assert "deployment_id 'not-a-uuid' is not a UUID" in str(err.value) and field in str(err.value)


def test_assignment_is_validated_as_the_step_fills_its_output():
    out = DeployOutput()
    out.deployment_id = ID.upper()
    assert out.deployment_id == ID
    with pytest.raises(ValidationError, match="is not a UUID"):
        out.deployment_id = "12345"
    assert out.deployment_id == ID
    with pytest.raises(ValidationError):
        out.changed = "perhaps"


def test_unknown_keys_of_an_older_record_are_ignored_on_read():
    record = {"deployment_id": ID, "flow_name": "orchestrator_main", "legacy_field": 1, "removed": {"x": 2}}
    out = DeployOutput.model_validate(record)
    assert out.deployment_id == ID and out.flow_name == "orchestrator_main"
    assert not hasattr(out, "legacy_field") and "legacy_field" not in out.values()


def test_values_hold_only_what_is_set_as_json():
    out = E2EOutput(deployment_id=ID, item_count=3, latencies_ms={"trigger": 12.5, "items": None}, cleaned_up=False)
    assert out.values() == {"deployment_id": ID, "item_count": 3, "latencies_ms": {"trigger": 12.5, "items": None},
                            "cleaned_up": False}
    assert PrerequisitesOutput().values() == {}
    merge = MergeOutput(before={"main": "abc"}, action="fast-forward", pushed_sha="abc123")
    assert MergeOutput.model_validate(merge.values()) == merge
    assert "STEP" not in DeployOutput(deployment_id=ID).values()
