"""The records of one runbook run, in `outputs/<run-id>/`: `manifest.json`, each executed notebook
rendered to HTML, an `index.html` linking them, and the secret scan every record goes through.

The manifest is rewritten (atomically, redacted) at every step start and end, so a run that is
killed leaves a manifest saying how far it got. The HTML leaves out papermill's
injected-parameters cell. The secret scan looks for the raw value of every secret the runner
knows (and its URL-, JSON- and HTML-escaped forms) in every file of the run directory; a hit is
masked in place and reported by file and secret NAME, never by value.
"""

from __future__ import annotations

import html
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, Field, ValidationError

from runbook_lib.core.errors import RunbookError
from runbook_lib.core.secrets import MIN_SECRET_LENGTH, redact, redact_obj

MANIFEST = "manifest.json"
INDEX = "index.html"
INJECTED_PARAMETERS_TAG = "injected-parameters"

StepStatus = Literal["passed", "failed", "not_run", "running", "killed", "interrupted"]
RunStatus = Literal["running", "passed", "failed", "killed", "interrupted"]


class StepRecord(BaseModel):
    """One notebook of the sequence: how it ended and what it produced."""

    step: str  # the notebook's name without .ipynb, e.g. "03_deploy"
    notebook: str  # the source notebook
    status: StepStatus = "not_run"
    output: str | None = None  # executed notebook, relative to the run directory
    html: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None
    error_type: str | None = None
    error: str | None = None
    gate: dict[str, Any] | None = None  # the confirmation gate's decision (GateDecision)
    results: dict[str, Any] = Field(default_factory=dict)  # StepResults.values (deployment id, digests, ...)
    checks: list[dict[str, Any]] = Field(default_factory=list)  # id, title, status of each check
    result_files: list[str] = Field(default_factory=list)  # the StepResults the notebook wrote
    earlier: bool = False  # passed in an earlier attempt of this run and not re-run
    pid: int | None = None  # the step's process while it runs
    notes: list[str] = Field(default_factory=list)


class Attempt(BaseModel):
    """One invocation of the runner on this run directory (a resume with --from adds one)."""

    started_at: datetime
    ended_at: datetime | None = None
    status: RunStatus = "running"
    from_step: str | None = None
    only: str | None = None
    confirm: bool = False
    params: dict[str, Any] = Field(default_factory=dict)
    runner_pid: int


class SecretFinding(BaseModel):
    file: str
    secret: str  # the secret's NAME


class SecretScan(BaseModel):
    scanned_files: int
    secrets_known: list[str]  # names only
    findings: list[SecretFinding] = Field(default_factory=list)


class RunManifest(BaseModel):
    run_id: str
    profile: str
    status: RunStatus = "running"
    started_at: datetime
    ended_at: datetime | None = None
    duration_seconds: float | None = None
    confirm: bool = False
    params: dict[str, Any] = Field(default_factory=dict)
    from_step: str | None = None
    only: str | None = None
    cell_timeout_seconds: float | None = None
    runbook: dict[str, Any] = Field(default_factory=dict)  # commit, dirty, root
    host: str
    user: str
    versions: dict[str, str] = Field(default_factory=dict)
    runner_pid: int
    steps: list[StepRecord] = Field(default_factory=list)
    attempts: list[Attempt] = Field(default_factory=list)
    secret_scan: SecretScan | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)

    def step(self, name: str) -> StepRecord:
        for record in self.steps:
            if record.step == name:
                return record
        raise KeyError(name)

    def save(self, run_dir: Path) -> Path:
        """Write `<run_dir>/manifest.json` atomically, every string redacted."""
        path = Path(run_dir) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(redact_obj(self.model_dump(mode="json")), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "RunManifest":
        path = Path(run_dir) / MANIFEST
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise RunbookError(f"no run record {path}") from None
        except (ValidationError, ValueError) as exc:
            raise RunbookError(f"run record {path} is unreadable: {exc}") from None


# -- HTML ----------------------------------------------------------------------------------------


def render_notebook_html(notebook: Path, target: Path) -> Path:
    """`notebook` as standalone HTML, without papermill's injected-parameters cell."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_cell_tags = {INJECTED_PARAMETERS_TAG}
    body, _ = HTMLExporter(config=config).from_notebook_node(nbformat.read(notebook, as_version=4))
    target.write_text(redact(body))
    return target


_STATUS_COLOURS = {
    "passed": "#116329", "failed": "#82071e", "killed": "#82071e", "interrupted": "#82071e",
    "running": "#7d4e00", "not_run": "#57606a",
}


def _e(value: Any) -> str:
    return html.escape(redact(str(value)), quote=True)


def _status(status: str) -> str:
    return f'<b style="color:{_STATUS_COLOURS.get(status, "#000")}">{_e(status.replace("_", " "))}</b>'


def render_index(manifest: RunManifest, run_dir: Path) -> Path:
    """`<run_dir>/index.html`: the run at a glance, linking every step's records."""
    m = manifest
    commit = m.runbook.get("commit") or "unknown"
    if m.runbook.get("dirty"):
        commit += " (uncommitted changes)"
    rows = []
    for i, s in enumerate(m.steps, 1):
        links = [f'<a href="{_e(s.html)}">HTML</a>' if s.html else "",
                 f'<a href="{_e(s.output)}">notebook</a>' if s.output else ""]
        duration = f"{s.duration_seconds:.1f} s" if s.duration_seconds is not None else ""
        gate = f"{_e(s.gate.get('decision'))} ({_e(s.gate.get('decided_by'))})" if s.gate else ""
        error = f"<b>{_e(s.error_type)}</b>: {_e(s.error)}" if s.error_type or s.error else ""
        values = f"<pre>{_e(json.dumps(s.results, indent=1, default=str))}</pre>" if s.results else ""
        status = _status(s.status) + (" <i>(earlier attempt)</i>" if s.earlier else "")
        notes = "".join(f"<div><i>{_e(n)}</i></div>" for n in s.notes)
        if s.checks:
            failed = [c["id"] for c in s.checks if c.get("status") == "fail"]
            notes += f"<div>{len(s.checks)} check(s)" + (f", failed: {_e(', '.join(failed))}" if failed else ", none failed") + "</div>"
        rows.append(
            f"<tr><td>{i}</td><td>{_e(s.step)}</td><td>{status}</td><td>{_e(s.started_at or '')}</td>"
            f"<td>{duration}</td><td>{gate}</td><td>{error}{notes}</td><td>{values}</td>"
            f"<td>{' '.join(x for x in links if x)}</td></tr>"
        )
    scan = "not done"
    if m.secret_scan:
        found = "; ".join(f"{_e(f.file)}: {_e(f.secret)}" for f in m.secret_scan.findings)
        scan = (f"{m.secret_scan.scanned_files} files checked for {len(m.secret_scan.secrets_known)} secret(s): "
                + (f'<b style="color:#82071e">FOUND {found}</b>' if found else "none found"))
    notes = "".join(f"<li>{_e(n)}</li>" for n in m.notes)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Runbook run {_e(m.run_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}} pre{{margin:0;font-size:85%}}</style>
</head><body>
<h1>Runbook run {_e(m.run_id)}: {_status(m.status)}</h1>
<table>
<tr><th>profile</th><td>{_e(m.profile)}</td></tr>
<tr><th>started / ended</th><td>{_e(m.started_at)} / {_e(m.ended_at or 'not finished')}</td></tr>
<tr><th>confirm</th><td>{_e(m.confirm)}</td></tr>
<tr><th>runbook commit</th><td>{_e(commit)}</td></tr>
<tr><th>run by</th><td>{_e(m.user)}@{_e(m.host)}</td></tr>
<tr><th>versions</th><td>{_e(', '.join(f'{k} {v}' for k, v in m.versions.items()))}</td></tr>
<tr><th>secret scan</th><td>{scan}</td></tr>
<tr><th>error</th><td>{_e(m.error or '')}</td></tr>
</table>
{f'<ul>{notes}</ul>' if notes else ''}
<h2>Steps</h2>
<table><tr><th>#</th><th>step</th><th>status</th><th>started</th><th>duration</th><th>gate</th><th>error</th><th>results</th><th>records</th></tr>
{''.join(rows)}
</table>
<p><a href="{MANIFEST}">manifest.json</a></p>
</body></html>
"""
    path = run_dir / INDEX
    path.write_text(page)
    return path


# -- secret scan ---------------------------------------------------------------------------------


def _forms(value: str) -> set[str]:
    """The ways a value can appear in a file: raw, URL-encoded, JSON-escaped, HTML-escaped."""
    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1], html.escape(value, quote=True)}


def scan_for_secrets(run_dir: Path, secrets: dict[str, str]) -> SecretScan:
    """Look for every secret value (by NAME -> value) in every file under `run_dir`; mask each hit in
    place (the record keeps its shape, the value is gone) and report it by file and name."""
    secrets = {name: v for name, v in secrets.items() if v and len(v) >= MIN_SECRET_LENGTH}
    # Longest values first, so that a secret containing another one is masked whole.
    needles = sorted(((form.encode(), name) for name, v in secrets.items() for form in _forms(v)),
                     key=lambda item: len(item[0]), reverse=True)
    findings: list[SecretFinding] = []
    files = sorted(p for p in Path(run_dir).rglob("*") if p.is_file())
    for path in files:
        data = path.read_bytes()
        names: list[str] = []
        for needle, name in needles:
            if needle in data:
                data = data.replace(needle, f"[redacted:{name}]".encode())
                if name not in names:
                    names.append(name)
        if names:
            path.write_bytes(data)
            rel = str(path.relative_to(run_dir))
            findings.extend(SecretFinding(file=rel, secret=name) for name in names)
    return SecretScan(scanned_files=len(files), secrets_known=sorted(secrets), findings=findings)
