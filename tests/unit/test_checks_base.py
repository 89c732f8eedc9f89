"""runbook_lib.checks.base: results built from a definition (`CheckDef.attempt`, `passed`...), the
registry (`define` / `@check`, one definition per id), `run_checks` into a step's report (a re-run
replaces earlier results of the same id), and the report's renderings."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from runbook_lib.checks import REGISTRY, Facts, source
from runbook_lib.checks.base import (
    Check,
    CheckDef,
    CheckReport,
    Fail,
    Outcome,
    Skip,
    Status,
    check,
    define,
    ok,
    run_checks,
    warn,
)
from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import ChecksFailed, RunbookError, SettingsError

POOL = CheckDef("prefect.pool", "Work pool exists", proves="the pool exists", remediation="create the pool")


@pytest.fixture
def scratch_ids() -> Iterator[list[str]]:
    """Ids a test defines; removed from the registry afterwards (the README lists REGISTRY)."""
    ids: list[str] = []
    yield ids
    for id in ids:
        REGISTRY.pop(id, None)


# -- attempt -----------------------------------------------------------------------------------------


def test_an_outcome_becomes_the_result_with_its_status_detail_and_data():
    passed = POOL.attempt(lambda: ok("type prefect:managed", type="prefect:managed"))
    assert passed == Check(id="prefect.pool", title="Work pool exists", status=Status.PASS,
                           detail="type prefect:managed", data={"type": "prefect:managed"})
    warned = POOL.attempt(lambda: warn("paused", "resume it", paused=True))
    assert (warned.status, warned.detail, warned.remediation, warned.data) == (Status.WARN, "paused", "resume it",
                                                                              {"paused": True})
    assert ok("x") == Outcome(Status.PASS, "x", "", {})


def test_a_check_built_by_the_probe_is_the_result_as_it_is():
    built = Check.warned("prefect.pool", "Custom title", "built by hand", "do this")
    assert POOL.attempt(lambda: built) is built


def test_what_a_probe_raises_becomes_a_failure_or_a_skip():
    own = POOL.attempt(lambda: (_ for _ in ()).throw(Fail("no pool 'x'", "create x", pool="x")))
    assert (own.status, own.detail, own.remediation, own.data) == (Status.FAIL, "no pool 'x'", "create x", {"pool": "x"})
    runbook = POOL.attempt(lambda: (_ for _ in ()).throw(SettingsError("prefect.api_key is not set")))
    assert (runbook.status, runbook.detail, runbook.remediation) == (Status.FAIL, "prefect.api_key is not set",
                                                                     "create the pool")
    crash = POOL.attempt(lambda: {}["missing"])
    assert crash.status is Status.FAIL and crash.detail == "KeyError: 'missing'" and crash.remediation == "create the pool"
    skip = POOL.attempt(lambda: (_ for _ in ()).throw(Skip("needs the Prefect API, which check prefect.api could not "
                                                           "establish")))
    assert skip.status is Status.SKIP and skip.remediation == ""
    assert skip.detail == "skipped: needs the Prefect API, which check prefect.api could not establish"


def test_a_title_built_from_the_settings(make_settings):
    settings = make_settings(source__branch="release")
    assert source.branch.title_for(None) == "Branch exists"
    assert source.branch.title_for(settings) == "Branch 'release' exists"
    assert source.branch.failed("gone", settings=settings).title == "Branch 'release' exists"
    assert source.branch.attempt(lambda: ok("here"), settings).title == "Branch 'release' exists"


def test_results_built_by_a_step_take_the_definitions_remediation_unless_given():
    assert POOL.passed("ok", pool_id="1") == Check.passed("prefect.pool", "Work pool exists", "ok", pool_id="1")
    assert POOL.failed("missing").remediation == "create the pool"
    assert POOL.failed("missing", "do something else").remediation == "do something else"
    assert POOL.warned("odd").remediation == "create the pool"
    assert POOL.warned("odd", "").remediation == ""
    assert POOL.skipped("not requested").status is Status.SKIP


def test_a_definition_without_a_probe_cannot_run(make_settings):
    with pytest.raises(TypeError, match="has no probe: the step that records it builds its result"):
        POOL.run(Facts(make_settings(), "s"))


def test_check_ids_are_lowercase_dotted_names():
    with pytest.raises(ValueError):
        Check.passed("Prefect Pool", "t")
    with pytest.raises(ValueError):
        Check.passed(".hidden", "t")
    assert Check.passed("link1.trigger-x_2", "t").id == "link1.trigger-x_2"


# -- the registry ------------------------------------------------------------------------------------


def test_define_registers_once_and_refuses_a_second_definition(scratch_ids):
    scratch_ids.append("unit.defined")
    first = define("unit.defined", "Defined once", proves="ids are unique", remediation="rename it")
    assert REGISTRY["unit.defined"] is first and first.probe is None
    with pytest.raises(ValueError, match="check 'unit.defined' is defined twice"):
        define("unit.defined", "Another", proves="something else")
    assert REGISTRY["unit.defined"] is first
    with pytest.raises(ValueError, match="check 'source.branch' is defined twice"):
        define("source.branch", "Branch", proves="a duplicate of the catalog's")
    assert REGISTRY["source.branch"] is source.branch


def test_the_check_decorator_defines_a_check_whose_probe_reads_the_facts(scratch_ids, make_settings):
    scratch_ids.append("unit.decorated")

    @check("unit.decorated", lambda s: f"Pool {s.deployment.work_pool}" if s else "Pool", proves="it decorates")
    def probe(facts: Facts) -> Outcome:
        return ok(f"step {facts.step}")

    assert isinstance(probe, CheckDef) and REGISTRY["unit.decorated"] is probe
    result = probe.run(Facts(make_settings(), "03_deploy"))
    assert (result.title, result.detail, result.status) == ("Pool managed-production", "step 03_deploy", Status.PASS)


# -- run_checks --------------------------------------------------------------------------------------


def _counting(id: str, outcomes: list) -> CheckDef:
    def probe(facts: Facts) -> Outcome:
        value = outcomes.pop(0)
        if isinstance(value, Exception):
            raise value
        return value
    return CheckDef(id, id.title(), proves="-", remediation="fix " + id, probe=probe)


def test_run_checks_runs_in_order_and_one_failure_hides_nothing(make_settings):
    facts = Facts(make_settings(), "01_verify_prerequisites")
    a = _counting("a.first", [RunbookError("broken")])
    b = _counting("b.second", [ok("fine")])
    c = _counting("c.third", [Skip("needs a.first")])
    report = run_checks(facts, [a, b, c])
    assert report.step == "01_verify_prerequisites"
    assert [(x.id, x.status.value) for x in report.checks] == [("a.first", "fail"), ("b.second", "pass"),
                                                               ("c.third", "skip")]
    with pytest.raises(ChecksFailed) as err:
        report.raise_for_failures()
    assert err.value.failed == ["a.first"] and err.value.step == "01_verify_prerequisites"


def test_run_checks_replaces_earlier_results_of_the_same_id_in_a_report(make_settings):
    facts = Facts(make_settings(), "ignored-when-a-report-is-given")
    a = _counting("a.first", [RunbookError("broken"), ok("repaired")])
    b = _counting("b.second", [ok("fine")])
    report = CheckReport(step="03_deploy")
    report.add(Check.passed("z.earlier", "Earlier"))
    first = run_checks(facts, [a, b], report)
    assert first.step == "03_deploy" and [c.id for c in first.checks] == ["a.first", "b.second"]
    assert [c.id for c in report.checks] == ["z.earlier", "a.first", "b.second"] and not report.ok
    again = run_checks(facts, [a], report)  # the cell run again
    assert [c.id for c in again.checks] == ["a.first"] and again.get("a.first").detail == "repaired"
    assert [c.id for c in report.checks] == ["z.earlier", "b.second", "a.first"]  # replaced, not duplicated
    assert report.get("a.first").status is Status.PASS and report.ok


def test_a_report_refuses_an_id_twice_but_replace_takes_it():
    report = CheckReport(step="s")
    report.add(Check.passed("x", "X"))
    with pytest.raises(ValueError, match="check id 'x' is already in the report of step 's'"):
        report.add(Check.failed("x", "X", "d", "r"))
    report.replace(Check.failed("x", "X", "d", "r"))
    assert len(report.checks) == 1 and report.failures[0].detail == "d"
    with pytest.raises(KeyError, match="no check 'y' in step 's'"):
        report.get("y")


# -- the report's renderings -------------------------------------------------------------------------


def _report() -> CheckReport:
    return CheckReport(step="01_verify_prerequisites", checks=[
        Check.passed("a.ok", "All good", "fine", n=1),
        Check.warned("b.warn", "Odd", "looks odd", "have a look"),
        Check.failed("c.fail", "Broken", "it <broke>", "fix <it>"),
        Check.skipped("d.skip", "Not run", "skipped: needs c.fail"),
    ])


def test_counts_summary_and_json_round_trip():
    report = _report()
    assert report.counts() == {"pass": 1, "warn": 1, "fail": 1, "skip": 1}
    assert report.summary_line() == "01_verify_prerequisites: FAILED (1 pass, 1 warn, 1 fail, 1 skip)"
    assert [c.id for c in report.by_status(Status.WARN)] == ["b.warn"]
    assert CheckReport.from_json(report.to_json()) == report
    assert json.loads(report.to_json(indent=None))["checks"][0] == {
        "id": "a.ok", "title": "All good", "status": "pass", "detail": "fine", "remediation": "", "data": {"n": 1}}
    passing = CheckReport(step="s", checks=[Check.passed("a", "A")])
    assert passing.summary_line() == "s: passed (1 pass, 0 warn, 0 fail, 0 skip)"


def test_the_table_shows_badges_ids_and_remediation_only_when_not_passed():
    report = _report()
    table = report.table()
    assert table.title == report.summary_line() and table.title_status == "fail"
    assert table.columns == ("Status", "Check", "Detail", "Remediation")
    html = report._repr_html_()
    assert '<span class="rb-badge rb-ok">pass</span>' in html and '<span class="rb-badge rb-bad">fail</span>' in html
    assert '<code class="rb-id">c.fail</code>' in html and "it &lt;broke&gt;" in html and "fix &lt;it&gt;" in html
    assert '<p class="rb-title rb-bad">' in html
    text = str(table)
    assert text.splitlines()[0] == report.summary_line()
    assert "  fail | Broken c.fail | it <broke> | fix <it>" in text.splitlines()
    assert CheckReport(step="s", checks=[Check.passed("a", "A")]).table().title_status == "pass"


def _preflight_report() -> CheckReport:
    report = CheckReport(step="preflight")
    report.add(Check.passed("prefect.key", "Prefect API key accepted", "200 from the workspace"))
    report.add(Check.warned("packages.redundant", "Redundant packages", "prefect is in the image", "drop it"))
    report.add(Check.failed("source.git-suffix", "Source URL ends in .git", "https://github.com/o/r <b>",
                            "append .git to the repository URL"))
    report.add(Check.skipped("e2e", "End-to-end", "not requested"))
    return report

def test_check_report_html_shows_colours_status_and_remediation():
    html = _preflight_report()._repr_html_()
    assert "preflight: FAILED (1 pass, 1 warn, 1 fail, 1 skip)" in html
    for colour in ("#dafbe1", "#fff8c5", "#ffebe9", "#f6f8fa"):
        assert colour in html
    assert "append .git to the repository URL" in html and "&lt;b&gt;" in html and "<b>https" not in html
    assert html.count("<tr") == 5  # header + 4 checks

def test_check_report_terminal_and_json_renderings():
    from rich.console import Console

    report = _preflight_report()
    console = Console(record=True, width=160)
    report.render_terminal(console)
    text = console.export_text()
    assert "FAIL" in text and "append .git to the repository URL" in text and "source.git-suffix" in text
    again = CheckReport.from_json(report.to_json())
    assert again == report and again.get("packages.redundant").status is Status.WARN

def test_failed_checks_raise_naming_them_and_probes_that_raise_become_failures():
    report = _preflight_report()
    pool = CheckDef("prefect.pool", "Work pool exists", proves="the pool exists", remediation="create it")
    report.add(pool.attempt(lambda: (_ for _ in ()).throw(RunbookError("pool missing"))))
    with pytest.raises(ChecksFailed) as err:
        report.raise_for_failures()
    assert err.value.failed == ["source.git-suffix", "prefect.pool"]
    assert "source.git-suffix (Source URL ends in .git)" in str(err.value) and "2 check(s) failed" in str(err.value)
    assert report.get("prefect.pool").detail == "pool missing" and report.get("prefect.pool").remediation == "create it"
    with pytest.raises(ValueError, match="already in the report"):
        report.add(Check.passed("prefect.key", "again"))
    CheckReport(step="ok", checks=[Check.passed("a", "A")]).raise_for_failures()
    # A probe's own remediation wins; a skip names what it needed; an outcome is the result.
    fail = pool.attempt(lambda: (_ for _ in ()).throw(Fail("no pool 'x'", "create x", pool="x")))
    assert (fail.status, fail.remediation, fail.data) == (Status.FAIL, "create x", {"pool": "x"})
    skip = pool.attempt(lambda: (_ for _ in ()).throw(Skip("needs the Prefect API")))
    assert skip.status is Status.SKIP and "needs the Prefect API" in skip.detail
    passed = pool.attempt(lambda: ok("exists", id="1"))
    assert (passed.id, passed.title, passed.status, passed.data) == ("prefect.pool", "Work pool exists", Status.PASS, {"id": "1"})
    crash = pool.attempt(lambda: 1 / 0)
    assert crash.status is Status.FAIL and crash.detail.startswith("ZeroDivisionError") and crash.remediation == "create it"

def test_check_texts_are_redacted():
    redaction.register_secret("pnu_checksecret1", "PREFECT_API_KEY")
    check = Check.failed("k", "Key", "sent pnu_checksecret1", "rotate pnu_checksecret1", key="pnu_checksecret1")
    dumped = CheckReport(step="s", checks=[check]).to_json()
    assert "pnu_checksecret1" not in dumped and "[redacted:PREFECT_API_KEY]" in dumped
