"""The integration tests: every test here runs against the sandbox (the session's shared one, started
by `tests/conftest.py`'s `sandbox` fixture, or one of its own) and carries the `integration` marker."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
