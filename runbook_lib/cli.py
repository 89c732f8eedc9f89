"""Command line: `python -m runbook_lib sandbox up | status | down` and `python -m runbook_lib run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Deployment runbook for event-driven Prefect pipelines.")
sandbox_app = typer.Typer(no_args_is_help=True, help="The loopback stand-ins for Prefect Cloud, Supabase, GitHub and Modal.")
app.add_typer(sandbox_app, name="sandbox")

StateDir = typer.Option(None, "--state-dir", envvar="RUNBOOK_SANDBOX_DIR", help="Where the sandbox keeps its state (default .sandbox/).")


@sandbox_app.command("up")
def sandbox_up(
    state_dir: Optional[Path] = StateDir,
    database_url: Optional[str] = typer.Option(None, help="Use this Postgres server instead of the embedded one."),
    seed_merged: Optional[bool] = typer.Option(None, "--seed-merged/--seed-unmerged", help="Seed the repository with feature/secret-blocks already merged into main."),
) -> None:
    """Start every stand-in in the background; return once each one is healthy."""
    from runbook_sandbox import manager

    try:
        manager.up(state_dir, database_url=database_url, seed_merged=seed_merged, echo=typer.echo)
    except manager.SandboxError as exc:
        typer.secho(f"sandbox up failed: {exc}", fg="red", err=True)
        raise typer.Exit(1)
    cfg_dir = state_dir or manager.SandboxConfig.load_or_create(None).state
    typer.echo(f"sandbox is up; settings in {Path(cfg_dir) / 'sandbox.env'}")


@sandbox_app.command("status")
def sandbox_status(state_dir: Optional[Path] = StateDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show each service's health; exit 1 when any is unhealthy."""
    from runbook_sandbox import manager

    rows = manager.status(state_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            mark = "ok  " if r["healthy"] else "DOWN"
            typer.echo(f"  {mark} {r['name']:16} pid={r['pid'] or '-':<8} {r['url']}  {'' if r['healthy'] else r['reason']}")
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


@sandbox_app.command("down")
def sandbox_down(state_dir: Optional[Path] = StateDir, purge: bool = typer.Option(False, help="Also delete the sandbox's data.")) -> None:
    """Stop every process the sandbox started."""
    from runbook_sandbox import manager

    manager.down(state_dir, purge=purge, echo=typer.echo)
    typer.echo("sandbox is down")


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
    from runbook_lib.runner.run import EXIT_REFUSED, RunRefused, parse_param_args, run_runbook

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
