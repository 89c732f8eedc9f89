"""The records as a reviewer opens them: `outputs/<run-id>/index.html` of a real runner run (the
`runbook run` of `make run`, headless with --confirm: the session's `fresh_runbook`, on a fresh sandbox
of its own, tests/integration/fresh_runbook.py), read in Chromium at 1300 px: no sideways scrolling,
every step's status as the manifest says, the gate's decision, the facts in words, every link
resolving, the raw values one click away, the timeline figure of 05. The run's records are copied into
the test's artifacts and read from there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from runbook_lib.runner.index import duration_text
from tests.browser.conftest import WIDTH, save_page, wait
from tests.conftest import PROJECT_ROOT
from tests.integration.fresh_runbook import failure


@pytest.fixture
def run_dir(fresh_runbook, artifacts) -> Path:
    """A whole runner run (01-06), its records in the test's artifacts."""
    proc = fresh_runbook.full
    (artifacts / "runner.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, failure(proc, "the run")
    return Path(shutil.copytree(fresh_runbook.run_dir, artifacts / "run"))


def first_heading(notebook: Path) -> str:
    """The first line of a notebook's first markdown cell, without its '#'."""
    nb = nbformat.read(notebook, as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "markdown")
    return source.splitlines()[0].lstrip("# ").strip()


@pytest.mark.xdist_group("fresh_runbook")
@pytest.mark.timeout(1800)  # the first test of the session to ask for the fresh runbook waits for it
def test_the_index_of_a_run_is_a_reviewers_page(run_dir, driver, artifacts):
    from selenium.webdriver.common.by import By

    manifest = json.loads((run_dir / "manifest.json").read_text())
    driver.get((run_dir / "index.html").as_uri())
    wait(driver, lambda b: b.find_elements(By.CSS_SELECTOR, "table.rb-steps tbody tr"), "the steps table")

    # Readable at 1300 px: nothing wider than the window.
    assert driver.execute_script("return window.innerWidth") == WIDTH
    scroll_width = driver.execute_script("return document.documentElement.scrollWidth")
    assert scroll_width <= WIDTH, f"the page is {scroll_width} px wide: it scrolls sideways"

    # Every step as the manifest has it: status, duration, gate decision and who made it.
    rows = driver.find_elements(By.CSS_SELECTOR, "table.rb-steps tbody tr")
    assert [r.get_attribute("data-step") for r in rows] == [s["step"] for s in manifest["steps"]]
    for row, step in zip(rows, manifest["steps"]):
        cells = row.find_elements(By.TAG_NAME, "td")
        assert cells[2].text.strip() == step["status"].replace("_", " ").upper(), step["step"]
        assert duration_text(step["duration_seconds"]) in cells[3].text
        if step["gate"]:
            assert step["gate"]["decision"].upper() in cells[4].text and step["gate"]["decided_by"] in cells[4].text
    text = {r.get_attribute("data-step"): r.find_elements(By.TAG_NAME, "td")[5].text for r in rows}
    values = {s["step"]: s["results"] for s in manifest["steps"]}
    deploy, secret, e2e = values["03_deploy"], values["04_update_edge_function_secret"], values["05_end_to_end_test"]
    # The facts in words: the deployment and what changed, the digests, the flow run and its latencies.
    assert f"created {deploy['deployment_name']}: deployment id {deploy['deployment_id']}" in text["03_deploy"]
    assert f"now points at deployment {secret['deployment_id']}" in text["04_update_edge_function_secret"]
    assert f"{secret['previous_digest'][:12]} → {secret['new_digest'][:12]}" in text["04_update_edge_function_secret"]
    assert f"flow run {e2e['flow_run_id']}" in text["05_end_to_end_test"]
    assert "launch → flow run created" in text["05_end_to_end_test"]
    assert all("{" not in t for t in text.values()), "raw JSON shown unfolded"

    # The raw values stay one click away.
    row = driver.find_element(By.ID, "step-03_deploy")
    raw = row.find_element(By.CSS_SELECTOR, "details pre")
    assert not raw.is_displayed()
    row.find_element(By.CSS_SELECTOR, "details summary").click()
    wait(driver, lambda b: raw.is_displayed(), "the raw values to unfold")
    assert deploy["deployment_id"] in raw.text

    # The timeline figure of 05 is displayed (loaded, not a broken image).
    image = driver.find_element(By.CSS_SELECTOR, "#timeline-05_end_to_end_test img")
    wait(driver, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
         "the timeline figure to load")
    assert image.is_displayed() and image.size["width"] <= WIDTH
    save_page(driver, artifacts, "index")

    # Every step's link resolves: the HTML page of the right step, the notebook, the results.
    links = [(row.get_attribute("data-step"), a.text, a.get_attribute("href")) for row in rows
             for a in row.find_elements(By.CSS_SELECTOR, "td:nth-child(2) a")]
    assert {label for _, label, _ in links} >= {"HTML", "notebook", "results"}
    for step, label, href in links:
        path = Path(unquote(urlsplit(href).path))
        assert path.is_file() and path.parent == run_dir, f"{step}: {label} -> {href} does not resolve"
        if label == "HTML":
            driver.get(href)
            heading = first_heading(PROJECT_ROOT / "notebooks" / f"{step}.ipynb")
            wait(driver, lambda b, heading=heading: heading in b.find_element(By.TAG_NAME, "body").text,
                 f"{step}'s page: {heading!r}")
        elif label == "notebook":
            assert nbformat.read(path, as_version=4).cells
        else:
            assert json.loads(path.read_text())["step"] == step
