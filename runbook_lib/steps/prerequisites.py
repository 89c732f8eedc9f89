"""Step 01: every prerequisite of the deployment, checked before anything is changed (reads only).

Groups, one notebook cell each: local tools, Prefect (API, work pool), Secret blocks, database
(schema contract, trigger, pg_net, secrets in clear in the trigger), repository (URL, branch,
entrypoint, `@flow`, parameters), packages (`pip_packages` against the flow's imports, no
plaintext secret in the job variables, which fit the pool's template) and the Edge Function's
secrets. The checks are the catalog's (`runbook_lib.checks`), the same the deploy step runs. Every
check runs whatever failed before it; a check that needs what a failed check could not provide is
skipped and names it. The verdict cell records the report, which fails the step naming every
failed check.
"""

from __future__ import annotations

from runbook_lib.checks import database, local, prefect, source, supabase
from runbook_lib.checks.base import CheckDef, CheckReport, run_checks
from runbook_lib.checks.facts import Facts
from runbook_lib.notebook.context import StepContext
from runbook_lib.records.outputs import PrerequisitesOutput
from runbook_lib.records.results import StepResults
from runbook_lib.steps.base import Step
from runbook_lib.systems.prefect import CLIENT_MODULES

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel
GROUPS: dict[str, list[CheckDef]] = {
    "local": local.LOCAL,
    "prefect": prefect.POOL,
    "secret_blocks": prefect.BLOCKS,
    "database": database.DATABASE,
    "repository": source.REPOSITORY,
    "packages": source.PACKAGES + prefect.JOB_VARIABLES,
    "edge_function": supabase.EDGE_FUNCTION,
}


class Prerequisites(Step):
    """The checks of step 01, by group; each group method runs its checks and returns them."""

    OUTPUT = PrerequisitesOutput

    def __init__(self, ctx: StepContext):
        super().__init__(ctx)
        self.facts = Facts(ctx.settings, ctx.name)
        self.report = CheckReport(step=ctx.name)

    def _group(self, name: str) -> CheckReport:
        return run_checks(self.facts, GROUPS[name], self.report)

    def local(self) -> CheckReport:
        """This machine: Python (3.14 warned), prefect, git."""
        return self._group("local")

    def prefect(self) -> CheckReport:
        """The API answers with the key; the work pool exists, has the expected type, runs, offers pip_packages."""
        return self._group("prefect")

    def secret_blocks(self) -> CheckReport:
        """The DSN block exists and is not empty; every block the runs need exists."""
        return self._group("secret_blocks")

    def database(self) -> CheckReport:
        """The block's DSN connects; the schema contract, trigger, pg_net; no secrets in clear in the trigger."""
        return self._group("database")

    def repository(self) -> CheckReport:
        """URL (with .git), public, branch, entrypoint file, @flow function, parameters."""
        return self._group("repository")

    def packages(self) -> CheckReport:
        """pip_packages are valid and cover the flow's imports; the job variables hold no secret and fit the pool."""
        return self._group("packages")

    def edge_function(self) -> CheckReport:
        """The Management API answers with the token; the function's PREFECT_* secrets exist (names only); the
        function answers a CORS preflight (which starts no flow run)."""
        return self._group("edge_function")

    def run_all(self) -> CheckReport:
        for name in GROUPS:
            self._group(name)
        return self.report

    def verdict(self) -> StepResults:
        """Record every check; fails here, naming every failed check, when any failed. The trigger
        function's source digest is recorded (the health check compares against it)."""
        self.facts.close()
        try:
            info = self.facts.trigger()
        except Exception:
            info = None
        if info is not None:
            self.publish(trigger_function=info.function, trigger_function_digest=info.source_digest)
        self.ctx.record_checks(self.report)
        return self.ctx.finish()
