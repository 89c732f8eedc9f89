"""runbook_lib.core.values: the one parser of flags and UUIDs a person types (papermill and the runner
may pass text); a bad value raises an error naming the parameter."""

from __future__ import annotations

import uuid

import pytest

from runbook_lib.core.errors import ParameterError, RunbookError, SettingsError
from runbook_lib.core.values import parse_flag, parse_uuid

ID = "0b7e5c2a-1f3d-4c6e-9a8b-7d6c5e4f3a2b"


@pytest.mark.parametrize("value", [True, "true", "TRUE", " yes ", "y", "1", 1, "on"])
def test_true_flags(value):
    assert parse_flag("smoke_run", value) is True


@pytest.mark.parametrize("value", [False, "false", "No", "n", "0", 0, "OFF"])
def test_false_flags(value):
    assert parse_flag("smoke_run", value) is False


@pytest.mark.parametrize("value", [None, "", "  ", "None", "null", "NONE"])
def test_unset_flags(value):
    assert parse_flag("smoke_run", value) is None


@pytest.mark.parametrize("value", ["maybe", "2", 2, "tru", [True]])
def test_other_values_are_refused_naming_the_parameter(value):
    with pytest.raises(ParameterError) as err:
        parse_flag("smoke_run", value)
    assert str(err.value) == f"parameter smoke_run must be true or false, got {value!r}"


def test_the_error_type_can_be_chosen():
    with pytest.raises(SettingsError, match="parameter cleanup must be true or false, got 'sometimes'"):
        parse_flag("cleanup", "sometimes", error=SettingsError)
    assert issubclass(ParameterError, RunbookError)


def test_uuids_are_canonical_lowercase_text():
    assert parse_uuid(ID) == ID
    assert parse_uuid(f"  {ID.upper()}\n") == ID
    assert parse_uuid(ID.replace("-", "")) == ID
    assert parse_uuid(f"{{{ID}}}") == ID
    assert parse_uuid(uuid.UUID(ID)) == ID


@pytest.mark.parametrize("value", ["", "not-a-uuid", ID[:-1], None, 42, f"{ID}x"])
def test_bad_uuids_are_refused_saying_what_they_are(value):
    with pytest.raises(ParameterError) as err:
        parse_uuid(value)
    assert str(err.value) == f"deployment_id {str(value)!r} is not a UUID"


def test_the_uuid_error_names_what_was_expected_and_truncates_long_input():
    with pytest.raises(ParameterError, match=r"^flow_run_id 'abc' is not a UUID$"):
        parse_uuid("abc", "flow_run_id")
    with pytest.raises(ParameterError) as err:
        parse_uuid("x" * 500)
    assert str(err.value) == f"deployment_id {'x' * 80!r} is not a UUID"
