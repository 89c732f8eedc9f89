"""Command line: `runbook run`, `runbook health`, `runbook checks`, and `runbook sandbox up | status |
down` (the sandbox's own commands, mounted here when the sandbox is installed). `python -m runbook_lib ...`
is the same program. Commands parse and print; the work is in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Deployment runbook for event-driven Prefect pipelines.")

try:  # the sandbox is an extra: `runbook sandbox ...` exists where it is installed
    from runbook_sandbox.cli import app as sandbox_app
except ImportError:  # pragma: no cover - a production install without the sandbox extra
    sandbox_app = None
if sandbox_app is not None:
    app.add_typer(sandbox_app, name="sandbox")


@app.command("run")
def run(
    profile: str = typer.Option("sandbox", "--profile", help="sandbox or production (profiles/<name>.toml)."),
    confirm: bool = typer.Option(False, "--confirm", help="Approve every confirmation gate (headless)."),
    from_step: Optional[str] = typer.Option(None, "--from", help="Resume a run from this step (03, 03_deploy or deploy)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only this step."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="The run's id and directory under the outputs directory."),
    param: list[str] = typer.Option([], "-p", "--param", help="key=value passed to every notebook (never a secret)."),
    notebooks_dir: Optional[Path] = typer.Option(None, "--notebooks-dir", help="Default notebooks/."),
    outputs_dir: Optional[Path] = typer.Option(None, "--outputs-dir", help="Default outputs/."),
    cell_timeout: float = typer.Option(3600.0, "--cell-timeout", help="Seconds one cell may run before the step fails."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="Jupyter kernel (default: the notebook's)."),
) -> None:
    """Execute the runbook's notebooks in order with papermill; records in outputs/<run-id>/."""
    from runbook_lib.runner.params import RunRefused, parse_param_args
    from runbook_lib.runner.run import EXIT_REFUSED, run_runbook

    try:
        outcome = run_runbook(
            profile=profile, confirm=confirm, from_step=from_step, only=only, run_id=run_id,
            params=parse_param_args(param), notebooks_dir=notebooks_dir, outputs_dir=outputs_dir,
            cell_timeout=cell_timeout, kernel_name=kernel,
        )
    except RunRefused as exc:
        typer.secho(f"run refused: {exc}", fg="red", err=True)
        raise typer.Exit(EXIT_REFUSED)
    raise typer.Exit(outcome.exit_code)


@app.command("checks")
def checks() -> None:
    """Print every check the runbook can record (id, title, what it proves) as a Markdown table."""
    from runbook_lib.checks import catalog_markdown
    from runbook_lib.steps import load_all

    load_all()  # the steps define the checks of their own actions
    typer.echo(catalog_markdown())


@app.command("health")
def health(
    profile: str = typer.Option("sandbox", "--profile", help="sandbox or production (profiles/<name>.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout (the tables go to stderr)."),
    requeue_stuck: bool = typer.Option(False, "--requeue-stuck",
                                       help="Show the states QUEUED past the lease; with --confirm, reset them to "
                                            "PENDING and start one flow run through the Edge Function."),
    confirm: bool = typer.Option(False, "--confirm", help="Approve the requeue (headless); without it nothing changes."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Compare with this run (a run id or directory) "
                                           "instead of the last passing one."),
    outputs_dir: Optional[Path] = typer.Option(None, "--outputs-dir", help="Default outputs/ (records in outputs/health/)."),
) -> None:
    """Check the live chain against the last passing run: verdict ok / drift / fail (exit 0 / 1 / 2).
    Read-only, except the requeue of stuck items behind --requeue-stuck --confirm."""
    import json

    from runbook_lib.core.errors import RunbookError
    from runbook_lib.steps.health import run_health

    try:
        outcome = run_health(profile, requeue_stuck=requeue_stuck, confirm=True if confirm else None,
                             outputs_dir=outputs_dir, baseline=baseline, quiet=as_json)
    except RunbookError as exc:
        typer.secho(f"health check could not run: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(outcome.record, indent=2, default=str))
    else:
        typer.echo(f"health: {outcome.verdict} (exit {outcome.exit_code}); record: {outcome.record_dir}")
    raise typer.Exit(outcome.exit_code)
