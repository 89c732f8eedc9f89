"""The sandbox's command line: `up | status | down` (mounted by `python -m runbook_lib` as `sandbox`;
also `python -m runbook_sandbox.cli`). The commands import the manager when they run, so mounting
this app costs the host CLI nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from runbook_lib.core.startup import skip_exit_collections  # the standard library only

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The loopback stand-ins for Prefect Cloud, Supabase, GitHub and Modal.")

StateDir = typer.Option(None, "--state-dir", envvar="RUNBOOK_SANDBOX_DIR", help="Where the sandbox keeps its state (default .sandbox/).")


@app.command("up")
def up(
    state_dir: Optional[Path] = StateDir,
    database_url: Optional[str] = typer.Option(
        None, envvar="RUNBOOK_SANDBOX_DATABASE_URL", show_envvar=True,
        help="Use this Postgres server instead of the embedded one. Prefer the environment variable (or "
        "--database-url-file): a DSN given here is visible to every user in `ps`.",
    ),
    database_url_file: Optional[Path] = typer.Option(
        None, "--database-url-file", exists=True, dir_okay=False,
        help="Read the Postgres DSN from this file (keep it 0600).",
    ),
    seed_merged: Optional[bool] = typer.Option(None, "--seed-merged/--seed-unmerged", help="Seed the repository with feature/secret-blocks already merged into main."),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="SERVICE", help="Start only this service (repeatable), e.g. postgres.",
    ),
    repo: Optional[str] = typer.Option(
        None, "--repo", metavar="PATH_OR_URL",
        help="Seed the sandbox's GitHub repository with every branch of this git repository (a path: its "
        "local branches; a URL: its remote heads) instead of the story from flows/. Kept on later `up`s; "
        "a different --repo replaces it.",
    ),
) -> None:
    """Start every stand-in in the background; return once each one is healthy."""
    from . import manager

    skip_exit_collections()

    if database_url_file is not None:
        if database_url is not None:
            typer.secho("sandbox up: give --database-url or --database-url-file, not both", fg="red", err=True)
            raise typer.Exit(2)
        database_url = database_url_file.read_text().strip()
    try:
        manager.up(state_dir, database_url=database_url, seed_merged=seed_merged, repo=repo, only=only or None,
                   echo=typer.echo)
    except manager.SandboxError as exc:
        typer.secho(f"sandbox up failed: {exc}", fg="red", err=True)
        raise typer.Exit(1)
    cfg_dir = state_dir or manager.SandboxConfig.load_or_create(None).state
    typer.echo(f"sandbox is up; settings in {Path(cfg_dir) / 'sandbox.env'}")


@app.command("status")
def status(state_dir: Optional[Path] = StateDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show each service's health; exit 1 when any is unhealthy."""
    from . import manager

    skip_exit_collections()
    rows = manager.status(state_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            mark = "ok  " if r["healthy"] else "DOWN"
            typer.echo(f"  {mark} {r['name']:16} pid={r['pid'] or '-':<8} {r['url']}  {'' if r['healthy'] else r['reason']}")
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


@app.command("down")
def down(state_dir: Optional[Path] = StateDir, purge: bool = typer.Option(False, help="Also delete the sandbox's data.")) -> None:
    """Stop every process the sandbox started."""
    from . import manager

    skip_exit_collections()

    manager.down(state_dir, purge=purge, echo=typer.echo)
    typer.echo("sandbox is down")


@app.command("fault")
def fault(
    service: str = typer.Argument(..., help="database, prefect_api, git, modal, supabase_api, edge_function; or all (with clear)."),
    mode: str = typer.Argument(..., help="down, reset, slow, clear; error too for supabase_api, edge_function and prefect_api."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", min=0, help="slow: the delay (default 3000 ms)."),
    status: Optional[int] = typer.Option(None, "--status", help="error: the HTTP status to answer."),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="error: for this many requests (default: until cleared)."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Cut one service alone (or put it back): the sandbox's one fault switch."""
    from . import faults

    try:
        if service == "all":
            if mode != "clear":
                raise faults.FaultError("`all` only takes the mode clear")
            faults.clear_all(state_dir=state_dir)
            typer.echo("every fault cleared")
            return
        current = faults.set_fault(service, mode, state_dir=state_dir, delay_ms=delay_ms, status=status, count=count)
    except faults.FaultError as exc:
        typer.secho(f"sandbox fault: {exc}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{service}: {json.dumps(current) if current else 'no fault'}")


@app.command("faults")
def list_faults(state_dir: Optional[Path] = StateDir) -> None:
    """List the faults in effect."""
    from . import faults

    try:
        current = faults.active(state_dir=state_dir)
    except faults.FaultError as exc:
        typer.secho(f"sandbox faults: {exc}", fg="red", err=True)
        raise typer.Exit(1)
    for service, fault in current.items():
        typer.echo(f"  {service:14} {json.dumps(fault)}")
    if not current:
        typer.echo("  no fault")


if __name__ == "__main__":
    app()
