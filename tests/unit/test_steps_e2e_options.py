"""runbook_lib.steps.e2e.options: the end-to-end test's options, the profile's [e2e] with the notebook's
parameters laid over and validated by the same model; a bad parameter is refused naming it, before
anything is launched."""

from __future__ import annotations

import math

import pytest

from runbook_lib.core.errors import RunbookError
from runbook_lib.steps.e2e.options import (
    PARAMETERS,
    E2EError,
    E2EOptions,
    batch_items_for_test,
)


@pytest.fixture
def production(make_settings):
    return make_settings()


def test_no_parameters_are_the_profiles_values(production):
    options = E2EOptions.from_settings(production)
    assert options.model_dump() == production.e2e.model_dump()
    assert options.item_count == 3 and options.blueprint == ["company-firmographics", "person-contact"]
    assert options.flow_run_timeout_seconds == 600 and options.expect_completed is False
    assert options.target_status == "IN_PROGRESS" and options.expected_path == ["PENDING", "QUEUED", "IN_PROGRESS"]


def test_none_and_empty_parameters_keep_the_profiles_values(production):
    options = E2EOptions.from_settings(production, **{name: None for name in PARAMETERS})
    assert options.model_dump() == production.e2e.model_dump()
    assert E2EOptions.from_settings(production, n_items="", blueprint=[], launch_mode="").model_dump() == (
        production.e2e.model_dump())


def test_parameters_are_laid_over_the_profile(production):
    options = E2EOptions.from_settings(production, n_items="5", blueprint=" company-firmographics , person-contact,",
                                       launch_mode=" Direct_Pending ", cleanup="false", expect_completed=True,
                                       completion_timeout=90.5, poll_interval="0.5")
    assert options.item_count == 5 and options.blueprint == ["company-firmographics", "person-contact"]
    assert options.launch_mode == "direct_pending" and options.cleanup is False
    assert options.expect_completed is True and options.target_status == "COMPLETED"
    assert options.completion_timeout_seconds == 90.5 and options.poll_interval_seconds == 0.5
    assert options.trigger_timeout_seconds == production.e2e.trigger_timeout_seconds  # not given: the profile's
    assert production.e2e.item_count == 3  # the settings are not changed
    assert E2EOptions.from_settings(production, blueprint=["person-contact"]).first_step == "person-contact"


@pytest.mark.parametrize("params,message", [
    ({"n_items": 0}, "n_items must be greater than 0, got 0"),
    ({"n_items": 1001}, "n_items must be at most 1000, got 1001"),
    ({"n_items": "many"}, "n_items must be an integer, got 'many'"),
    ({"n_items": 2.5}, "n_items must be an integer, got 2.5"),
    ({"launch_mode": "sideways"}, "launch_mode must be one of 'ui' or 'direct_pending', got 'sideways'"),
    ({"blueprint": [""]}, "blueprint must be a non-empty list of step slugs, got ['']"),
    ({"blueprint": ["ok", "  "]}, "blueprint must be a non-empty list of step slugs, got ['ok', '  ']"),
    ({"flow_run_timeout": math.inf}, "flow_run_timeout must be a finite number, got inf"),
    ({"trigger_timeout": "soon"}, "trigger_timeout must be a finite number, got 'soon'"),
    ({"poll_interval": -1}, "poll_interval must be greater than 0.0, got -1"),
    ({"cleanup": "maybe"}, "cleanup must be true or false, got 'maybe'"),
    ({"expect_completed": "perhaps"}, "expect_completed must be true or false, got 'perhaps'"),
])
def test_a_bad_parameter_is_refused_naming_it(production, params, message):
    with pytest.raises(E2EError) as err:
        E2EOptions.from_settings(production, **params)
    assert str(err.value) == f"end-to-end test parameters are not usable: {message}; nothing was launched"
    assert isinstance(err.value, RunbookError)


def test_every_bad_parameter_is_named_in_one_error(production):
    with pytest.raises(E2EError) as err:
        E2EOptions.from_settings(production, n_items=0, cleanup="maybe", completion_timeout=float("nan"))
    text = str(err.value)
    for part in ("n_items must be greater than 0, got 0", "cleanup must be true or false, got 'maybe'",
                 "completion_timeout must be a finite number, got nan"):
        assert part in text


def test_an_unknown_parameter_is_refused_listing_the_known_ones(production):
    with pytest.raises(E2EError) as err:
        E2EOptions.from_settings(production, n_itemz=3, timeout=5)
    assert str(err.value).startswith("unknown end-to-end test parameter(s) ['n_itemz', 'timeout']; known: [")
    assert "'n_items'" in str(err.value)


def test_the_test_batch_items_are_recognisable_fakes():
    items = batch_items_for_test("ab12", 2)
    assert [i["company_name"] for i in items] == ["Runbook E2E ab12 #1", "Runbook E2E ab12 #2"]
    assert items[1]["company_domain"] == "e2e-ab12-2.example.com"
    assert items[0]["original_data"] == {"runbook_e2e": True, "tag": "ab12", "index": 1}
    assert batch_items_for_test("x", 0) == []
