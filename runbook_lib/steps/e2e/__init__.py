"""Step 05: the end-to-end test. A test batch goes through the real chain, and each link is proven
in order, with its timing:

1. the trigger fired: the pg_net request the trigger queued for this batch (matched by request id
   through `runbook.trigger_requests`) got a response (status, `timed_out`, `error_msg`);
2. the Edge Function answered 200 with a flow run id;
3. that flow run exists, belongs to the expected deployment and was created after the launch;
4. it ran on the expected work pool: RUNNING, then a terminal state (its logs and state message
   when it failed; "never started" within the timeout when no worker takes it);
5. every test item moved PENDING -> QUEUED -> IN_PROGRESS (-> COMPLETED when the profile expects
   it), as recorded in `runbook.workflow_state_transitions`. The verdict comes as soon as it is
   certain: once the flow run is over and the items are left where nothing moves them, or have not
   changed for `e2e.settle_seconds` (not the whole completion timeout). Stuck items are counted per
   state and grouped by cause, from the evidence: their states' meta, the registry, and the flow
   run's final state and logs (its subflows' too) read through the Prefect API, whose dispatch
   error lines are quoted (masked) and decide the remediation (Modal credentials, app or function
   not found, no sender mapped, Modal unreachable, Modal's own error).

A failing link makes the later links SKIP, so the step fails naming the link that broke. The batch
is launched the way the admin UI does (INITIALIZING, items and PENDING states, then the flip) for
the profile's dedicated test client, or inserted directly as PENDING (`launch_mode="direct_pending"`)
to reproduce that failure mode on purpose. Only the test batch's own rows are touched, and they are
deleted at the end (`cleanup=True`), also after a failure or an interrupt (Ctrl-C, the runner's
SIGTERM: a KeyboardInterrupt). The batch id is recorded as soon as it is launched, and its items
carry a marker (`original_data.runbook_e2e`, `launched_by`: host, pid, deadline) by which a later
run of this step finds a test batch whose test was killed before its cleanup (its process gone, or
past its deadline) and deletes it first, naming it (check `orphans`). The timeline (ms offsets from the launch,
on the database's and Prefect's clocks) feeds a figure and a table.

Modules: `options` (what to launch, against which deployment), `links` (the checks), `chain` (the
probes), `diagnosis` (why items are stuck, why a run never started), `timeline` (tables, figure).
"""

from __future__ import annotations

from typing import Any

from runbook_lib.notebook.context import StepContext, show
from runbook_lib.notebook.gate import in_kernel
from runbook_lib.notebook.progress import Progress
from runbook_lib.records.outputs import DeployOutput, E2EOutput
from runbook_lib.records.results import StepResults
from runbook_lib.steps.base import Step
from runbook_lib.steps.e2e import timeline
from runbook_lib.steps.e2e.chain import ChainTest, E2EResult
from runbook_lib.steps.e2e.links import (
    LINK_EDGE_FUNCTION, LINK_FLOW_RUN, LINK_ITEMS, LINK_TRIGGER, LINK_WORK_POOL, LINKS, follows,
)
from runbook_lib.steps.e2e.options import E2EError, E2EOptions, ExpectedDeployment, resolve_deployment
from runbook_lib.systems.database import Database
from runbook_lib.systems.prefect import CLIENT_MODULES, PrefectApi

__all__ = ["ChainTest", "E2EError", "E2EOptions", "E2EResult", "EndToEndTest", "ExpectedDeployment", "LINKS",
           "LINK_EDGE_FUNCTION", "LINK_FLOW_RUN", "LINK_ITEMS", "LINK_TRIGGER", "LINK_WORK_POOL", "Progress",
           "follows", "resolve_deployment"]

WARM_IMPORTS = CLIENT_MODULES  # the step calls Prefect: its client is imported in the prewarmed kernel


class EndToEndTest(Step):
    """The cells of step 05: confirm, run, show_timeline, verdict. Built from the notebook's
    parameters (None keeps the profile's `[e2e]` value); a bad one fails here, before any launch."""

    OUTPUT = E2EOutput

    def __init__(self, ctx: StepContext, *, deployment_id: Any = None, **params: Any):
        super().__init__(ctx)
        settings = ctx.settings
        with self.failing():
            options = E2EOptions.from_settings(settings, **params)
            settings.require("database.url", "prefect.api_url", "prefect.api_key")
            api = PrefectApi.from_settings(settings)
            deployment = resolve_deployment(settings, api, deployment_id=deployment_id,
                                            previous=lambda: ctx.output_of(DeployOutput))
            db = Database.from_settings(settings)
            if not db.client_exists(options.client_id):
                raise E2EError(
                    f"the e2e test client {options.client_id} is not in public.clients: insert it (a dedicated client, "
                    f"e.g. company_name 'Runbook E2E') or set e2e.client_id ({settings.where_to_set('e2e.client_id')}); "
                    "nothing was launched"
                )
        self.chain = ChainTest(settings, options, deployment, step=ctx.name, db=db, api=api)
        self.publish(deployment_id=deployment.id, deployment_source=deployment.source)

    def confirm(self, plan: Any = None) -> None:
        """The launch behind the confirmation gate (it starts a real flow run)."""
        super().confirm(plan or self.chain)

    def run(self) -> E2EResult:
        """Once approved: launch and prove each link; the checks and values are recorded in the step's
        results without ending the cell (`verdict` does that). The batch id is recorded the moment
        the batch is launched. Interrupted (KeyboardInterrupt: Ctrl-C, or the runner's SIGTERM), the
        test batch is still deleted, and the record says what was done before the interrupt goes on."""
        with self.failing():
            self.ctx.require_approved(self.chain.gate_plan())
        self.chain.on_launch = lambda launched: self.publish(batch_id=launched.batch_id, cleaned_up=False)
        try:
            result = self.chain.run()
        except KeyboardInterrupt:
            partial = self.chain.result
            if partial is not None:
                self._record(partial)
            batch = partial.batch_id if partial is not None else None
            outcome = ("no test batch had been launched" if batch is None else
                       f"test batch {batch} was deleted" if partial.cleaned_up else
                       f"test batch {batch} was NOT deleted: the next run of this step deletes it")
            self.ctx.fail(E2EError(f"the end-to-end test was interrupted (KeyboardInterrupt); {outcome}"))
            raise
        self._record(result)
        return result

    def _record(self, result: E2EResult) -> None:
        self.publish(**result.values())
        self.ctx.results.add_checks(result.report)
        self.ctx.save()

    def show_timeline(self, result: E2EResult) -> None:
        """The timeline figure (also saved as `<run_dir>/<step>.timeline.png`) and the tables of links,
        events and latencies."""
        png = timeline.png(timeline.figure(result))
        path = self.ctx.run_dir / f"{self.ctx.name}.timeline.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        self.publish(timeline_figure=path.name)
        if in_kernel():
            from IPython.display import Image, display

            display(Image(data=png, format="png"))
        else:
            print(f"timeline figure: {path}")
        show(timeline.tables(result))

    def verdict(self, result: E2EResult) -> StepResults:
        """Record the checks; fails here, naming the first link that broke, when any did."""
        self.ctx.record_checks(result.report)
        return self.ctx.finish()
