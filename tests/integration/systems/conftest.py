"""Fixtures of the system modules' tests: the profile's settings of the session's sandbox."""

from __future__ import annotations

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.profiles import load_settings


@pytest.fixture(autouse=True)
def _fresh_redaction():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


@pytest.fixture
def sandbox_settings(sandbox):
    return load_settings("sandbox", environ={"RUNBOOK_SANDBOX_DIR": str(sandbox.state)})
