"""The run's pages: `index.html` (the run at a glance, linking every step's records) and each
executed notebook rendered to HTML without papermill's injected-parameters cell. Drawn with the
shared rendering (`core.render`), every value masked. A step whose change was refused (`rejected`,
`not_confirmed`) is shown as such, with what it means and how to apply it.

`index.html` is a reviewer's page, read in a minute at 1300 px without scrolling sideways: per step
its status, gate decision (who, when), duration, what it did in words (read from the step's typed
output, `records.outputs`: the commit merged, the deployment and what changed, the secret's digest
before and after, the flow run and the end-to-end latencies), its failed and warned checks with their
remediation (from the step's results file), links to its HTML and notebook; the timeline figure of
05; each step's raw values one click away (<details>)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from runbook_lib.core import render
from runbook_lib.core.errors import RunbookError
from runbook_lib.core.secrets import redact
from runbook_lib.records import outputs
from runbook_lib.records.manifest import MANIFEST, RunManifest, StepRecord
from runbook_lib.records.results import StepResults

INDEX = "index.html"
INJECTED_PARAMETERS_TAG = "injected-parameters"
# What a refused step means, and what to do.
REFUSAL_NOTES = {
    "not_confirmed": "not confirmed: the step's change needs an approval and none was given (headless without "
                     "--confirm); nothing was applied. Re-run with --confirm to apply it",
    "rejected": "rejected: the step's plan was refused (Reject, or confirm=False); nothing was applied",
}


@functools.lru_cache(maxsize=1)
def html_exporter() -> Any:
    """nbconvert's HTML exporter without papermill's injected-parameters cell (one per process:
    its templates are loaded once)."""
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_cell_tags = {INJECTED_PARAMETERS_TAG}
    return HTMLExporter(config=config)


def warm_html_exporter(notebook: Path | None = None) -> None:
    """Load the HTML exporter and compile what its first rendering would (the templates, the
    highlighter, the markdown renderer: ~1 s of the first notebook's HTML) by rendering `notebook`
    (a step's notebook, not executed) with outputs of every kind added, and throwing the result away."""
    import nbformat

    v4 = nbformat.v4
    nb = nbformat.read(notebook, as_version=4) if notebook is not None else v4.new_notebook()
    # What an IPython kernel records when it runs the notebook: the highlighter it names is imported
    info = nb.metadata.setdefault("language_info", {})
    for key, value in (("name", "python"), ("pygments_lexer", "ipython3"),
                       ("codemirror_mode", {"name": "ipython", "version": 3})):
        info.setdefault(key, value)
    nb.cells += [
        v4.new_markdown_cell("# Step\n\nA *paragraph* with `code` and a [link](https://example.org).\n\n| a | b |\n|---|---|\n| 1 | 2 |"),
        v4.new_code_cell("print('x')\n{'a': 1}", execution_count=1, metadata={"tags": [INJECTED_PARAMETERS_TAG]}),
        v4.new_code_cell("x = 1", execution_count=2, outputs=[
            v4.new_output("stream", name="stdout", text="a line\n"),
            v4.new_output("stream", name="stderr", text="\x1b[31mwarning\x1b[0m\n"),
            v4.new_output("display_data", data={"text/html": "<table><tr><td>1</td></tr></table>",
                                                "text/plain": "table"}),
            v4.new_output("display_data", data={"text/markdown": "**bold**", "text/plain": "bold"}),
            v4.new_output("execute_result", data={"text/plain": "{'a': 1}"}, execution_count=2),
            v4.new_output("error", ename="ValueError", evalue="x", traceback=["\x1b[0;31mValueError\x1b[0m: x"]),
        ]),
    ]
    html_exporter().from_notebook_node(nb)


def render_notebook_html(notebook: Path, target: Path) -> Path:
    """`notebook` as standalone HTML, without papermill's injected-parameters cell."""
    import nbformat

    body, _ = html_exporter().from_notebook_node(nbformat.read(notebook, as_version=4))
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


# -- the facts of each step, in words -------------------------------------------------------------


def _short(value: Any, n: int = 12) -> str:
    return str(value)[:n] if value else "?"


def _ms(value: float | None) -> str:
    if value is None:
        return "not reached"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _merge_facts(o: outputs.MergeOutput) -> list[str]:
    before, after = o.before or {}, o.after or {}
    target, feature = before.get("target") or after.get("target") or "the target", before.get("feature") or "the branch"
    facts = []
    if o.action:
        if o.action.startswith("none") or before.get("merged"):
            facts.append(f"nothing to merge: {target} already has the change of {feature} ({o.action})")
        else:
            facts.append(f"{o.action}: {target} now includes {feature}"
                         + (f", pushed {_short(o.pushed_sha)}" if o.pushed_sha else ""))
    sha = after.get("target_sha") or before.get("target_sha")
    if sha:
        facts.append(f"{target} is at commit {_short(sha)}")
    loads = after.get("target_loads_block") or before.get("target_loads_block")
    if loads:
        facts.append("the Secret block is loaded at " + ", ".join(map(str, loads)))
    return facts


def _deploy_facts(o: outputs.DeployOutput) -> list[str]:
    facts = []
    name = o.deployment_name or o.flow_name or "the deployment"
    ref = f"commit {_short(o.commit_sha)}" + (f" of {o.branch}" if o.branch else "") + (" (pinned)" if o.pinned else "")
    changed = [c.get("field") for c in (o.diff or []) if c.get("status") not in (None, "unchanged")]
    created = any(c.get("status") == "created" for c in (o.diff or []))
    if o.changed is False or o.no_changes:
        facts.append(f"no change: {name} already matched the plan; kept {o.deployment_id or '?'} without any write")
    elif o.changed:
        facts.append(f"{'created' if created else 'updated'} {name}: deployment id {o.deployment_id or '?'}, at {ref}")
    else:
        facts.append(f"planned {name} at {ref}: not applied")
    if changed and not o.no_changes:
        facts.append(("fields set: " if created else "changed: ") + ", ".join(map(str, changed)))
    return facts


def _secret_facts(o: outputs.EdgeSecretOutput) -> list[str]:
    name = o.secret_name or "PREFECT_DEPLOYMENT_ID"
    digests = f"digest {_short(o.previous_digest)} → {_short(o.new_digest)}"
    if o.no_change:
        held = _short(o.new_digest or o.previous_digest)
        return [f"{name} already held deployment {o.deployment_id or '?'} (digest {held}): no write"]
    if o.changed:
        verb = "rolled back to" if o.rollback else "now points at"
        facts = [f"{name} {verb} deployment {o.deployment_id or '?'} ({digests})"]
        if o.previous_deployment_id:
            facts.append(f"it named deployment {o.previous_deployment_id} before")
        if o.retries:
            facts.append(f"written after {o.retries} retr{'y' if o.retries == 1 else 'ies'}")
        return facts
    return [f"{name} to point at deployment {o.deployment_id or '?'}: not written ({digests})"] if o.deployment_id else []


LATENCY_WORDS = {
    "launch_to_pg_net_response": "launch → pg_net response", "launch_to_flow_run_created": "launch → flow run created",
    "flow_run_created_to_running": "flow run created → running", "flow_run_running_to_finished": "running → finished",
    "flow_run_running_to_first_queued": "running → first item queued",
    "first_queued_to_first_in_progress": "first queued → first in progress",
    "launch_to_last_in_progress": "launch → last item in progress", "launch_to_completed": "launch → all completed",
}


def _e2e_facts(o: outputs.E2EOutput) -> list[str]:
    facts = []
    if o.batch_id:
        facts.append(f"test batch {o.batch_id} of {o.item_count or '?'} item(s), launched {o.launch_mode or '?'}"
                     + (f", against {o.deployment_name or o.deployment_id}" if o.deployment_name or o.deployment_id else ""))
    if o.flow_run_id:
        facts.append(f"flow run {o.flow_run_id}")
    if o.failed_link:
        facts.append(f"the chain broke at {o.failed_link}")
    if o.latencies_ms:
        facts.append("latencies: " + "; ".join(f"{LATENCY_WORDS.get(k, k.replace('_', ' '))} {_ms(v)}"
                                               for k, v in o.latencies_ms.items()))
    if o.item_state_counts:
        facts.append("items: " + ", ".join(f"{v} {k}" for k, v in o.item_state_counts.items() if v))
    if o.stuck_items:
        facts.append(f"{len(o.stuck_items)} item(s) stuck (see the step's page)")
    if o.cleaned_up is not None:
        facts.append("test rows deleted" if o.cleaned_up else "test rows kept (cleanup off or failed)")
    return facts


def _fallback_facts(o: outputs.FallbackOutput) -> list[str]:
    facts = []
    if o.fallback_deployment_id:
        facts.append(f"fallback deployment {o.fallback_deployment_id} on work pool {o.work_pool or '?'}"
                     + (f" at commit {_short(o.commit_sha)}" if o.commit_sha else ""))
    if o.worker_command:
        facts.append(f"worker: {o.worker_command}")
    if o.switch_back_command:
        facts.append(f"switch back: {o.switch_back_command}")
    return facts


FACTS: dict[str, tuple[type[outputs.StepOutput], Callable[[Any], list[str]]]] = {
    kind.STEP: (kind, describe) for kind, describe in (
        (outputs.MergeOutput, _merge_facts), (outputs.DeployOutput, _deploy_facts),
        (outputs.EdgeSecretOutput, _secret_facts), (outputs.E2EOutput, _e2e_facts),
        (outputs.FallbackOutput, _fallback_facts),
    )
}


def step_facts(record: StepRecord) -> list[str]:
    """What the step did, in words, from its typed output (nothing when the output is unreadable)."""
    kind, describe = FACTS.get(record.step, (None, None))
    if kind is None or not record.results:
        return []
    try:
        return describe(kind.model_validate(record.results))
    except (ValidationError, TypeError, AttributeError):
        return []


def _problem_checks(record: StepRecord, run_dir: Path) -> list[dict[str, Any]]:
    """The step's failed and warned checks with detail and remediation (from its results files;
    the manifest keeps only id, title and status)."""
    found: dict[str, dict[str, Any]] = {}
    for name in record.result_files or [f"{record.step}.json"]:
        try:
            res = StepResults.load(run_dir, Path(name).stem)
        except (RunbookError, OSError):
            continue
        for c in res.checks:
            if c.status.value in ("fail", "warn"):
                found.setdefault(c.id, {"id": c.id, "title": c.title, "status": c.status.value, "detail": c.detail,
                                        "remediation": c.remediation})
    for c in record.checks:  # no results file: what the manifest knows
        if c.get("status") in ("fail", "warn"):
            found.setdefault(c["id"], {**c, "detail": "", "remediation": ""})
    return sorted(found.values(), key=lambda c: c["status"] != "fail")


def _when(at: Any) -> str:
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            return at
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(at, datetime) else ""


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _gate(record: StepRecord) -> str:
    g = record.gate
    if not g:
        return '<span class="rb-dim">no gate (read-only)</span>' if record.status == "passed" else ""
    return (f"{render.badge(g.get('decision', '?'))}<br>{render.escape(g.get('decided_by', ''))}"
            f"<br><span class=\"rb-dim\">{render.escape(_when(g.get('at')))}</span>")


def _checks_line(record: StepRecord) -> str:
    counts: dict[str, int] = {}
    for c in record.checks:
        counts[c.get("status", "?")] = counts.get(c.get("status", "?"), 0) + 1
    if not counts:
        return ""
    words = {"pass": "passed", "warn": "warned", "fail": "failed", "skip": "skipped"}
    return f"{len(record.checks)} checks: " + ", ".join(f"{n} {words.get(k, k)}" for k, n in counts.items())


def _step_row(i: int, s: StepRecord, run_dir: Path) -> str:
    status = render.badge(s.status) + (' <span class="rb-dim">(earlier attempt)</span>' if s.earlier else "")
    links = " · ".join(f'<a href="{render.escape(href)}">{label}</a>' for label, href in
                       (("HTML", s.html), ("notebook", s.output), *((f"results{'' if len(s.result_files) < 2 else ' ' + f}", f)
                                                                       for f in s.result_files)) if href)
    what = [f"<li>{render.escape(f)}</li>" for f in step_facts(s)]
    line = _checks_line(s)
    if line:
        what.append(f'<li class="rb-dim">{render.escape(line)}</li>')
    parts = [f"<ul>{''.join(what)}</ul>" if what else ""]
    if s.status in REFUSAL_NOTES:
        parts.append(f"<p>{render.escape(REFUSAL_NOTES[s.status])}</p>")
    if s.error_type or s.error:
        parts.append(f'<p class="rb-error"><b>{render.escape(s.error_type or "error")}</b>: {render.escape(s.error or "")}</p>')
    problems = _problem_checks(s, run_dir)
    if problems:
        items = "".join(
            f"<li>{render.badge(c['status'])} <b>{render.escape(c.get('title') or c['id'])}</b> "
            f"<code class=\"rb-id\">{render.escape(c['id'])}</code>"
            + (f"<br>{render.escape(c['detail'])}" if c.get("detail") else "")
            + (f"<br><i>Fix:</i> {render.escape(c['remediation'])}" if c.get("remediation") else "") + "</li>"
            for c in problems)
        parts.append(f'<ul class="rb-problems">{items}</ul>')
    if s.notes:
        parts.append("<ul>" + "".join(f'<li class="rb-dim">{render.escape(n)}</li>' for n in s.notes) + "</ul>")
    if s.results:
        parts.append("<details><summary>raw values (JSON)</summary>"
                     f"<pre>{render.escape(json.dumps(s.results, indent=1, default=str))}</pre></details>")
    started = f'<br><span class="rb-dim">{render.escape(_when(s.started_at))}</span>' if s.started_at else ""
    return (f'<tr id="step-{render.escape(s.step)}" data-step="{render.escape(s.step)}" data-status="{render.escape(s.status)}">'
            f"<td>{i}</td><td><b>{render.escape(s.step)}</b><br>{links}</td><td>{status}</td>"
            f"<td>{duration_text(s.duration_seconds)}{started}</td><td>{_gate(s)}</td><td>{''.join(parts)}</td></tr>")


def _timeline_figure(m: RunManifest, run_dir: Path) -> str:
    figures = []
    for s in m.steps:
        name = (s.results or {}).get("timeline_figure")
        if name and (run_dir / str(name)).is_file():
            figures.append(f'<figure id="timeline-{render.escape(s.step)}"><img class="rb-figure" src="{render.escape(name)}" '
                           f'alt="timeline of {render.escape(s.step)}"><figcaption>Timeline of {render.escape(s.step)}: '
                           "when each link of the chain was proven, and the test items' states over time"
                           "</figcaption></figure>")
    return "".join(figures)


INDEX_CSS = (
    ".rb-steps{border-collapse:collapse;width:100%;table-layout:fixed}"
    ".rb-steps th,.rb-steps td{text-align:left;vertical-align:top;padding:6px 8px;border-bottom:1px solid #d0d7de;"
    "overflow-wrap:anywhere}"
    ".rb-steps ul{margin:0;padding-left:1.1em}.rb-steps p{margin:0.3em 0}"
    ".rb-dim{color:#57606a;font-size:90%}.rb-error{color:#82071e}.rb-problems li{margin-bottom:0.3em}"
    "pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:85%;background:#f6f8fa;padding:6px}"
    ".rb-figure{max-width:100%;height:auto;border:1px solid #d0d7de}"
    ".rb-run td{overflow-wrap:anywhere}"
)


def render_index(manifest: RunManifest, run_dir: Path) -> Path:
    """`<run_dir>/index.html`: the run at a glance (see the module doc), linking every step's records."""
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
        ("profile", m.profile), ("started / ended", f"{_when(m.started_at)} / {_when(m.ended_at) or 'not finished'}"
                                 + (f" ({duration_text(m.duration_seconds)})" if m.duration_seconds is not None else "")),
        ("confirm", m.confirm), ("runbook commit", commit), ("run by", f"{m.user}@{m.host}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
        ("secret scan", render.Cell(scan, status="fail") if m.secret_scan and m.secret_scan.findings else scan),
        *((("error", m.error),) if m.error else ()),
    ])
    rows = "".join(_step_row(i, s, run_dir) for i, s in enumerate(m.steps, 1))
    steps = ('<h2>Steps</h2><table class="rb-steps"><colgroup><col style="width:2.5em"><col style="width:17em">'
             '<col style="width:8.5em"><col style="width:9em"><col style="width:15em"><col></colgroup>'
             "<thead><tr><th>#</th><th>step and records</th><th>status</th><th>duration</th><th>gate</th>"
             f"<th>what happened</th></tr></thead><tbody>{rows}</tbody></table>")
    outcome = _refusal_outcome(m)
    notes = "".join(f"<li>{render.escape(n)}</li>" for n in m.notes)
    figure = _timeline_figure(m, run_dir)
    error = f'<p class="rb-error">{render.escape(m.error)}</p>' if m.error and not outcome else ""
    body = (f"<h1>Runbook run {render.escape(m.run_id)}: {render.badge(m.status)}</h1>{outcome}{error}"
            + (f"<ul>{notes}</ul>" if notes else "") + steps
            + (f"<h2>End-to-end timeline</h2>{figure}" if figure else "")
            + f'<h2>The run</h2><div class="rb-run">{run._repr_html_()}</div>'
            + f'<p><a href="{MANIFEST}">manifest.json</a> (the whole record)</p>')
    path = run_dir / INDEX
    path.write_text(render.page(f"Runbook run {m.run_id}", body, INDEX_CSS))
    return path
