"""runbook_lib.systems.prefect against the sandbox's Cloud-shaped gateway: reads, a rejected key explained."""

from __future__ import annotations

import asyncio

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    RunbookError,
)

OTHER = "33333333-3333-4333-8333-333333333333"


@pytest.mark.timeout(120)
def test_prefect_api_reads_the_workspace_and_explains_a_rejected_key(sandbox_settings):
    from runbook_lib.systems.prefect import PrefectApi

    api = PrefectApi.from_settings(sandbox_settings)
    api.check_access()
    pool = api.read_work_pool("managed-production")
    assert (pool.name, pool.type) == ("managed-production", "prefect:managed")
    assert api.read_work_pool("no-such-pool") is None
    assert api.read_secret_block("modal-token-id") is not None and api.read_secret_block("no-such-block") is None
    value = api.read_secret_value("modal-token-id")
    assert value and redaction.redact(value) == "[redacted:secret block modal-token-id]"

    async def kernel_cell():  # the same client call from inside a running loop
        return api.read_work_pool("managed-production").name

    assert asyncio.run(kernel_cell()) == "managed-production"
    wrong = PrefectApi(sandbox_settings.prefect.api_url, "pnu_not_the_key_000", cloud=True)
    with pytest.raises(RunbookError, match=r"the API key was rejected \(401 Unauthorized\).*check PREFECT_API_KEY"):
        wrong.check_access()
    elsewhere = sandbox_settings.prefect.api_url.replace(sandbox_settings.prefect.workspace_id, OTHER)
    with pytest.raises(RunbookError, match=r"not found \(404\).*PREFECT_WORKSPACE_ID"):
        PrefectApi(elsewhere, sandbox_settings.value("prefect.api_key"), cloud=True).check_access()
