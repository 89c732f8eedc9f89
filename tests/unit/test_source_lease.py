"""The orchestrator's claim lease as the runbook reads it: one default, in the flow."""

from __future__ import annotations

import pytest

from runbook_lib.core.errors import FlowSourceError
from runbook_lib.source import lease


def test_the_default_is_read_from_the_flow_itself():
    assert lease.flow_default() == 900.0
    assert "CLAIM_LEASE_SECONDS = 900.0" in lease.flow_file().read_text()
    assert lease.claim_lease_seconds() == (900.0, "the flow's default (CLAIM_LEASE_SECONDS)")
    assert lease.claim_lease_seconds({"batch_size": 50}) == (900.0, "the flow's default (CLAIM_LEASE_SECONDS)")


def test_a_deployment_parameter_overrides_it():
    assert lease.claim_lease_seconds({"claim_lease_seconds": 1200}) == (
        1200.0, "the deployment's parameter claim_lease_seconds")
    for bad in (0, -5, float("inf"), True, "900"):
        with pytest.raises(FlowSourceError, match="must be a positive number of seconds"):
            lease.claim_lease_seconds({"claim_lease_seconds": bad})


def test_a_flow_without_a_usable_constant_is_an_error():
    assert lease.flow_default("CLAIM_LEASE_SECONDS: float = 60\n") == 60.0
    for source, message in (("x = 1\n", "defines no CLAIM_LEASE_SECONDS"),
                            ("CLAIM_LEASE_SECONDS = 'long'\n", "not a positive number literal"),
                            ("def (:\n", "cannot read CLAIM_LEASE_SECONDS")):
        with pytest.raises(FlowSourceError, match=message):
            lease.flow_default(source)
