"""runbook_lib.core.render: every table as HTML (escaped, masked, styled with CSS classes), as rich
and as plain text."""

from __future__ import annotations

import re

from rich.console import Console

from runbook_lib.core import render
from runbook_lib.core import secrets as redaction

SECRET = "pnu_tablesecret0123"


def _table() -> render.Table:
    return render.Table(
        "Plan <for> prod",
        ("Status", "Field", "Value"),
        [
            (render.Cell("changed", status="changed"), "work_pool_name", "<script>alert(1)</script>"),
            (render.Cell("pass", status="pass"), render.Cell("Key", note="prefect.api"), f"key={SECRET}"),
            ("plain", None, {"b": 2, "a": [1]}),
            (render.Cell("fail", status="fail"), "multi\nline", render.Cell("", status=None)),
        ],
        pre_columns=frozenset({2}),
        caption="see & fix",
        title_status="fail",
    )


def test_html_escapes_masks_and_styles_with_classes():
    redaction.register_secret(SECRET, "PREFECT_API_KEY")
    html = _table()._repr_html_()
    assert SECRET not in html and "key=[redacted:PREFECT_API_KEY]" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '<p class="rb-title rb-bad">Plan &lt;for&gt; prod</p>' in html
    assert "<p>see &amp; fix</p>" in html
    assert html.startswith('<div class="runbook-table"><style>') and html.endswith("</div>")
    assert "<thead><tr><th>Status</th><th>Field</th><th>Value</th></tr></thead>" in html
    assert html.count("<tr>") == 5
    # badges: CSS classes, no inline colour anywhere in the table
    assert '<span class="rb-badge rb-warn">changed</span>' in html
    assert '<span class="rb-badge rb-ok">pass</span>' in html and '<span class="rb-badge rb-bad">fail</span>' in html
    assert 'style="' not in html and "color:" not in html.split("</style>", 1)[1]
    # colours are defined once, in the style sheet
    for css, colour in render.COLOURS.items():
        assert f".rb-{css}{{color:{colour};background:{render.BACKGROUNDS[css]};border-color:{colour}}}" in render.STYLE
    # notes, pre columns, JSON cells and None
    assert '<b>Key</b><br><code class="rb-id">prefect.api</code>' in html
    assert '<td class="rb-pre">key=[redacted:PREFECT_API_KEY]</td>' in html
    assert '<td></td><td class="rb-pre">{' in html  # None: an empty cell in HTML (an em dash in text)
    assert '<td class="rb-pre">{\n &quot;a&quot;: [\n  1\n ],\n &quot;b&quot;: 2\n}</td>' in html
    assert "<td></td></tr>" in html  # an empty cell without status is empty


def test_plain_text_is_masked_one_line_per_row():
    redaction.register_secret(SECRET, "PREFECT_API_KEY")
    text = str(_table())
    assert SECRET not in text
    lines = text.splitlines()
    assert lines[0] == "Plan <for> prod"
    assert lines[1] == "  changed | work_pool_name | <script>alert(1)</script>"
    assert lines[2] == "  pass | Key prefect.api | key=[redacted:PREFECT_API_KEY]"
    assert lines[3].startswith("  plain | — | {")
    assert lines[-1] == "  fail | multi line | "
    assert repr(_table()) == text
    assert str(render.Table("", ("a",), [("x",)])) == "  x"


def test_rich_rendering_is_masked():
    redaction.register_secret(SECRET, "PREFECT_API_KEY")
    console = Console(record=True, width=200)
    console.print(_table())
    out = console.export_text()
    assert SECRET not in out and "[redacted:PREFECT_API_KEY]" in out
    assert "Plan <for> prod" in out and "prefect.api" in out


def test_status_words_map_to_one_class_each_and_unknown_words_are_plain():
    assert render.style_of("PASS") == ("ok", "bold green") and render.style_of("completed")[0] == "ok"
    assert render.style_of("changed")[0] == "warn" and render.style_of("rejected")[0] == "bad"
    assert render.style_of("not_run") == ("muted", "dim") and render.style_of("in_progress")[0] == "info"
    assert render.style_of("whatever") == ("muted", "")
    assert render.badge("not_confirmed") == '<span class="rb-badge rb-bad">NOT CONFIRMED</span>'
    assert render.badge("pass", "<ok>") == '<span class="rb-badge rb-ok">&lt;ok&gt;</span>'


def test_cells_with_links_and_folded_details():
    cell = render.Cell("run", links=(("logs", "https://x/?a=1&b=2"),), details={"k": "<v>"})
    html = cell.html()
    assert '<a href="https://x/?a=1&amp;b=2">logs</a>' in html
    assert "<details><summary>raw</summary><pre>{\n &quot;k&quot;: &quot;&lt;v&gt;&quot;\n}</pre></details>" in html
    assert cell.plain() == "run"
    assert render.as_text(None) == "—" and render.as_text((1, 2)) == "[\n 1,\n 2\n]" and render.as_text(3) == "3"


def test_groups_pages_and_preformatted_blocks_are_masked():
    redaction.register_secret(SECRET, "PREFECT_API_KEY")
    group = render.Group([render.Table("T", ("a",), [("1",)]), f"note {SECRET}"])
    assert group._repr_html_().endswith("<p>note [redacted:PREFECT_API_KEY]</p>")
    assert str(group).startswith("T\n  1\n\nnote ")
    page = render.page("Run <1>", "<p>body</p>")
    assert page.startswith("<!DOCTYPE html>") and "<title>Run &lt;1&gt;</title>" in page and render.STYLE in page
    block = render.preformatted("Plan", {"key": SECRET})
    assert SECRET not in block and re.search(r"<pre[^>]*>\{\n  &quot;key&quot;: &quot;\[redacted", block)
