"""The run's pages: `index.html` (the run at a glance, linking every step's records) and each
executed notebook rendered to HTML without papermill's injected-parameters cell. Drawn with the
shared rendering (`core.render`), every value masked. A step whose change was refused (`rejected`,
`not_confirmed`) is shown as such, with what it means and how to apply it."""

from __future__ import annotations

from pathlib import Path

from runbook_lib.core import render
from runbook_lib.core.secrets import redact
from runbook_lib.records.manifest import MANIFEST, RunManifest

INDEX = "index.html"
INJECTED_PARAMETERS_TAG = "injected-parameters"
# What a refused step means, and what to do.
REFUSAL_NOTES = {
    "not_confirmed": "not confirmed: the step's change needs an approval and none was given (headless without "
                     "--confirm); nothing was applied. Re-run with --confirm to apply it",
    "rejected": "rejected: the step's plan was refused (Reject, or confirm=False); nothing was applied",
}


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


def _refusal_outcome(m: RunManifest) -> str:
    """A run that stopped on a refused change: which step, what it means, how to apply it."""
    step = next((s for s in m.steps if s.status in REFUSAL_NOTES), None)
    if step is None or m.status not in REFUSAL_NOTES:
        return ""
    how = f" (resume: runbook run --from {step.step} --confirm)" if step.status == "not_confirmed" else ""
    return (f"<p>{render.badge(step.status)} The run stopped at step {render.escape(step.step)}: "
            f"{render.escape(REFUSAL_NOTES[step.status] + how)}.</p>")


def render_index(manifest: RunManifest, run_dir: Path) -> Path:
    """`<run_dir>/index.html`: the run at a glance, linking every step's records."""
    m = manifest
    commit = m.runbook.get("commit") or "unknown"
    if m.runbook.get("dirty"):
        commit += " (uncommitted changes)"
    scan = "not done"
    if m.secret_scan:
        found = "; ".join(f"{f.file}: {f.secret}" for f in m.secret_scan.findings)
        scan = (f"{m.secret_scan.scanned_files} files checked for {len(m.secret_scan.secrets_known)} secret(s): "
                + (f"FOUND {found}" if found else "none found"))
    run = render.Table("", ("", ""), [
        ("profile", m.profile), ("started / ended", f"{m.started_at} / {m.ended_at or 'not finished'}"),
        ("confirm", m.confirm), ("runbook commit", commit), ("run by", f"{m.user}@{m.host}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
        ("secret scan", render.Cell(scan, status="fail") if m.secret_scan and m.secret_scan.findings else scan),
        ("error", m.error or ""),
    ])
    rows = []
    for i, s in enumerate(m.steps, 1):
        links = tuple((label, href) for label, href in (("HTML", s.html), ("notebook", s.output)) if href)
        gate = f"{s.gate.get('decision')} ({s.gate.get('decided_by')})" if s.gate else ""
        error = f"{s.error_type}: {s.error}" if s.error_type or s.error else ""
        notes = ([REFUSAL_NOTES[s.status]] if s.status in REFUSAL_NOTES else []) + list(s.notes)
        if s.checks:
            failed = [c["id"] for c in s.checks if c.get("status") == "fail"]
            notes.append(f"{len(s.checks)} check(s)" + (f", failed: {', '.join(failed)}" if failed else ", none failed"))
        status = s.status + (" (earlier attempt)" if s.earlier else "")
        rows.append((i, s.step, render.Cell(status, status=s.status), s.started_at or "",
                     f"{s.duration_seconds:.1f} s" if s.duration_seconds is not None else "", gate,
                     render.Cell("\n".join(x for x in [error, *notes] if x), pre=True),
                     render.Cell("", details=s.results or None), render.Cell("", links=links)))
    steps = render.Table("Steps", ("#", "step", "status", "started", "duration", "gate", "error and notes", "results",
                                   "records"), rows)
    outcome = _refusal_outcome(m)
    notes = "".join(f"<li>{render.escape(n)}</li>" for n in m.notes)
    body = (f"<h1>Runbook run {render.escape(m.run_id)}: {render.badge(m.status)}</h1>{outcome}{run._repr_html_()}"
            + (f"<ul>{notes}</ul>" if notes else "") + steps._repr_html_()
            + f'<p><a href="{MANIFEST}">manifest.json</a></p>')
    path = run_dir / INDEX
    path.write_text(render.page(f"Runbook run {m.run_id}", body))
    return path
