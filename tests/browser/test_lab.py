"""`make lab` as a newcomer uses it: it brings the sandbox up (here: the shared one, through
RUNBOOK_SANDBOX_DIR, as a user who moved it), starts JupyterLab on notebooks/ and prints the URL with
its token; a kernel of that JupyterLab imports the runbook and sees the sandbox profile; one Ctrl-C
stops JupyterLab, and the sandbox stays up with its state (what the README says)."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from runbook_sandbox import manager
from tests.browser.conftest import UI_TIMEOUT, save_page, stop_process_group, wait, wait_for_lab_url
from tests.conftest import PROJECT_ROOT

PROBE = ("from runbook_lib.core.profiles import load_settings; s = load_settings('sandbox'); "
         "print('PROFILE', s.profile, s.prefect.api_url)")


def test_make_lab_serves_the_notebooks_with_the_sandbox_profile_and_ctrl_c_leaves_the_sandbox_up(
        sandbox, driver, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_HEADLESS", "MAKEFLAGS", "MFLAGS")}
    env.update(RUNBOOK_SANDBOX_DIR=str(sandbox.state), JUPYTER_CONFIG_DIR=str(artifacts / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(artifacts / "jupyter-runtime"))
    log = artifacts / "make-lab.log"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "lab",
         f"LAB_ARGS=--no-browser --ServerApp.port=0 --LabApp.workspaces_dir={artifacts / 'workspaces'}"],
        cwd=PROJECT_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the terminal's Ctrl-C is sent to it below
    )
    try:
        found = wait_for_lab_url(log, make, UI_TIMEOUT + 120)
        assert len(found.group(3)) >= 32, "the printed URL has no token"

        # The printed URL (with its token) opens JupyterLab on notebooks/; a console's kernel sees the profile.
        driver.get(found.group(1))
        wait(driver, lambda b: any("05_end_to_end_test.ipynb" in e.text for e in b.find_elements(
            By.CSS_SELECTOR, ".jp-DirListing-item")), "the notebooks in the file browser")
        card = wait(driver, lambda b: next(iter(b.find_elements(
            By.CSS_SELECTOR, '.jp-LauncherCard[data-category="Console"]')), None), "the launcher's Console card")
        card.click()
        prompt = wait(driver, lambda b: next(iter(b.find_elements(
            By.CSS_SELECTOR, ".jp-CodeConsole-promptCell .cm-content")), None), "the console's prompt")
        wait(driver, lambda b: any("| Idle" in e.text for e in b.find_elements(
            By.CSS_SELECTOR, '.jp-StatusBar-TextItem[title^="Change kernel"]')), "the console's kernel to start")
        prompt.click()
        ActionChains(driver).send_keys(PROBE).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        expected = f"PROFILE sandbox {sandbox.prefect_api_url}"
        shown = wait(driver, lambda b: next((e.text for e in b.find_elements(
            By.CSS_SELECTOR, ".jp-CodeConsole-content .jp-OutputArea-output") if "PROFILE" in e.text), None),
            "the console's answer")
        save_page(driver, artifacts, "console")
        assert shown.strip() == expected, f"the kernel does not see this sandbox's profile: {shown}"

        # One Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) stops JupyterLab.
        os.killpg(make.pid, signal.SIGINT)
        try:
            make.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"make lab still runs 60 s after Ctrl-C:\n{log.read_text()[-2000:]}") from None
        with pytest.raises(httpx.TransportError):  # JupyterLab no longer answers
            httpx.get(found.group(1), timeout=10)
    finally:
        stop_process_group(make)
    # The sandbox is as the README says: still up, every service healthy.
    unhealthy = [(s["name"], s["reason"]) for s in manager.status(sandbox.state) if not s["healthy"]]
    assert not unhealthy, f"after Ctrl-C of make lab, sandbox services are down: {unhealthy}"
