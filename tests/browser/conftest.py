"""The browser tests: JupyterLab and the run's records as a person meets them, in headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by Selenium; nothing is downloaded at run time).

Every test here carries the `browser` marker and runs over the session's shared sandbox. Without a
browser the tests are skipped, naming the install command; under CI (`CI=true`) a missing browser
fails them instead (`.ci/run` installs it). Each test keeps its screenshot and page next to its
results, in `outputs/browser-tests/<test>/` (`RUNBOOK_BROWSER_ARTIFACTS` moves it), which CI keeps
as an artifact (ci-examples/tests.yml).

Waits are on conditions with deadlines (WebDriverWait), never fixed sleeps: the machine is shared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import PROJECT_ROOT

HERE = Path(__file__).resolve().parent
INSTALL = "apt-get install -y chromium chromium-driver"
ARTIFACTS_ENV = "RUNBOOK_BROWSER_ARTIFACTS"
LAB_URL = re.compile(r"(http://127\.0\.0\.1:(\d+)/lab\?token=(\S+))")
WIDTH = 1300  # the reviewer's page must read at this width without scrolling sideways
UI_TIMEOUT = 120  # seconds for the UI to show something (the machine is loaded)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) of the system (RUNBOOK_CHROMIUM / RUNBOOK_CHROMEDRIVER name others), or None."""
    chromium = shutil.which(os.environ.get("RUNBOOK_CHROMIUM") or "chromium") or shutil.which("chromium-browser")
    driver = shutil.which(os.environ.get("RUNBOOK_CHROMEDRIVER") or "chromedriver")
    return (chromium, driver) if chromium and driver else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    missing = find_browser() is None and not _truthy(os.environ.get("CI"))
    for item in mine:
        item.add_marker(pytest.mark.browser)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"no Chromium and chromedriver on this machine: install them with `{INSTALL}` (as root)"))


# -- artifacts ---------------------------------------------------------------------------------------


@pytest.fixture
def artifacts(request) -> Path:
    """This test's directory for its results, screenshot and page: kept after the run."""
    base = Path(os.environ.get(ARTIFACTS_ENV) or PROJECT_ROOT / "outputs" / "browser-tests")
    path = base / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- the browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def browser_binaries() -> tuple[str, str]:
    """Chromium and its driver; first of every fixture, so a missing browser fails before the sandbox
    starts (only reached under CI: elsewhere the tests were skipped at collection)."""
    found = find_browser()
    if found is None:
        pytest.fail(f"CI=true and no Chromium and chromedriver here: install them with `{INSTALL}` (.ci/run does)")
    return found


@pytest.fixture
def driver(browser_binaries, artifacts, request) -> Iterator[Any]:
    """Headless Chromium at 1300 px wide; its screenshot and page are saved when the test ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # Chromium leaves its profile-lock directory (org.chromium.Chromium.*, a socket and a cookie) in
    # TMPDIR even after a clean quit: here it goes to a directory of this test's, removed afterwards
    # (a short path under /tmp, not tmp_path: a Unix socket's path is limited to 107 bytes).
    with tempfile.TemporaryDirectory(prefix="runbook-chromium-", ignore_cleanup_errors=True) as scratch:
        service = Service(chromedriver, log_output=str(artifacts / "chromedriver.log"),
                          env={**os.environ, "TMPDIR": scratch})
        browser = webdriver.Chrome(options=options, service=service)
        browser.set_page_load_timeout(UI_TIMEOUT)
        try:
            yield browser
        finally:
            try:
                save_page(browser, artifacts, "final")
            finally:
                browser.quit()


def save_page(browser: Any, directory: Path, name: str, show: Any = None) -> Path:
    """A full-height screenshot (`<name>.png`) and the DOM (`<name>.html`) of what the browser shows
    (scrolled to the element `show` first, when given)."""
    if show is not None:
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", show)
    try:
        height = browser.execute_script("return Math.max(document.documentElement.scrollHeight, "
                                        "document.body ? document.body.scrollHeight : 0)")
        browser.set_window_size(WIDTH, min(max(int(height or 1000) + 150, 1000), 6000))
    except Exception:  # noqa: BLE001 - a screenshot of the window as it is is still worth keeping
        pass
    path = directory / f"{name}.png"
    browser.save_screenshot(str(path))
    (directory / f"{name}.html").write_text(browser.page_source)
    return path


def wait(browser: Any, condition: Any, what: str, timeout: float = UI_TIMEOUT) -> Any:
    """WebDriverWait(condition), failing with `what` (and the page's state) after `timeout` seconds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- JupyterLab --------------------------------------------------------------------------------------


@dataclass
class Lab:
    """One JupyterLab server on loopback, with a token, on a copy of notebooks/."""

    url: str  # http://127.0.0.1:<port>
    token: str
    root: Path  # the notebooks it serves
    log: Path
    process: subprocess.Popen

    def open(self, browser: Any, notebook: str) -> None:
        browser.get(f"{self.url}/lab/tree/{notebook}?token={self.token}")


def lab_settings(directory: Path) -> Path:
    """JupyterLab user settings for a test: every cell rendered (no windowing: a cell out of view is
    still in the page), no news popup."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }
    for name, value in settings.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return directory


def copy_notebook(name: str, target_dir: Path, parameters: dict[str, Any]) -> Path:
    """notebooks/<name>.ipynb into target_dir, its parameters cell edited as a user would (each
    `key = ...` line of `parameters` replaced by the given value)."""
    import nbformat

    nb = nbformat.read(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = cell.source.splitlines()
    for key, value in parameters.items():
        index = next((i for i, line in enumerate(lines) if re.match(rf"^{key}\s*=", line)), None)
        assert index is not None, f"{name}: no parameter {key!r}"
        lines[index] = f"{key} = {value!r}  # set by the browser test"
    cell.source = "\n".join(lines)
    path = target_dir / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def wait_for_lab_url(log: Path, process: subprocess.Popen, timeout: float) -> re.Match:
    """The URL with its token that JupyterLab prints, read from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = LAB_URL.search(text)
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited ({process.returncode}) before serving:\n{text[-3000:]}")
        time.sleep(0.2)  # polling a log file for a condition, with a deadline
    pytest.fail(f"JupyterLab printed no URL within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)


@pytest.fixture
def lab(sandbox, tmp_path_factory) -> Iterator[Any]:
    """A factory: `lab(notebooks={"03_deploy": {"run_dir": ...}}, env={...})` starts JupyterLab on
    127.0.0.1 (a free port, a random token) over copies of those notebooks, its kernels seeing the
    sandbox profile of the shared sandbox (RUNBOOK_SANDBOX_DIR) and `env`; stopped at the end."""
    started: list[subprocess.Popen] = []

    def start(notebooks: dict[str, dict[str, Any]], env: dict[str, str] | None = None) -> Lab:
        home = tmp_path_factory.mktemp("lab")
        root = home / "notebooks"
        root.mkdir()
        for name, parameters in notebooks.items():
            copy_notebook(name, root, parameters)
        token = uuid.uuid4().hex + uuid.uuid4().hex
        kernel_env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_HEADLESS", "JUPYTER_CONFIG_DIR")}
        kernel_env.update({"RUNBOOK_SANDBOX_DIR": str(sandbox.state), "RUNBOOK_PROFILE": "sandbox",
                           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                           "JUPYTER_DATA_DIR": str(home / "data"), **(env or {})})
        log = home / "jupyterlab.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--LabApp.user_settings_dir={lab_settings(home / 'settings')}",
             f"--LabApp.workspaces_dir={home / 'workspaces'}", *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=root, env=kernel_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        started.append(process)  # stopped at the end, even when it never served
        found = wait_for_lab_url(log, process, UI_TIMEOUT)
        return Lab(f"http://127.0.0.1:{found.group(2)}", token, root, log, process)

    yield start
    for process in started:
        stop_process_group(process)


# -- a notebook in JupyterLab ------------------------------------------------------------------------

DONE_PROMPT = re.compile(r"\[\d+\]")


class Notebook:
    """The open notebook, as a user steps through it: find a cell by its code, run it (select it,
    Ctrl+Enter), wait for it to finish, read its output."""

    def __init__(self, browser: Any):
        self.browser = browser

    def wait_ready(self, first_code: str) -> None:
        """Wait until the notebook's content is shown (a cell with `first_code`) and its kernel is idle
        (the status bar says so)."""
        from selenium.webdriver.common.by import By

        wait(self.browser, lambda b: self._find(first_code), "the notebook's cells")
        wait(self.browser, lambda b: any("| Idle" in e.text for e in b.find_elements(
            By.CSS_SELECTOR, '.jp-StatusBar-TextItem[title^="Change kernel"]')), "the kernel to start (status bar: Idle)")

    def _find(self, code: str) -> Any:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        try:
            for cell in self.browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell"):
                source = cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").get_attribute("textContent")
                if code in (source or ""):
                    return cell
        except StaleElementReferenceException:
            return None
        return None

    def cell(self, code: str) -> Any:
        """The code cell whose source contains `code`."""
        return wait(self.browser, lambda b: self._find(code), f"a code cell containing {code!r}")

    def run(self, code: str, timeout: float = 600) -> Any:
        """Run the cell with `code` as a user does and wait until it has finished; returns the cell."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        cell = self.cell(code)
        prompt = cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt")
        self.browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        ActionChains(self.browser).click(prompt).perform()
        wait(self.browser, lambda b: "jp-mod-selected" in (cell.get_attribute("class") or ""), f"cell {code!r} selected")
        # Ctrl+Enter: run the selected cell and stay on it (Shift+Enter would add a cell at the end)
        ActionChains(self.browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        wait(self.browser, lambda b: DONE_PROMPT.search(prompt.text or ""), f"cell {code!r} to finish", timeout)
        return cell

    @staticmethod
    def output(cell: Any) -> str:
        from selenium.webdriver.common.by import By

        return "\n".join(e.text for e in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))

    @staticmethod
    def error(cell: Any) -> str:
        """The traceback a cell shows (empty when none)."""
        from selenium.webdriver.common.by import By

        return "\n".join(e.text for e in cell.find_elements(
            By.CSS_SELECTOR, '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))

    def button(self, cell: Any, label: str) -> Any:
        from selenium.webdriver.common.by import By

        def find(_b: Any) -> Any:
            return next((b for b in cell.find_elements(By.CSS_SELECTOR, "button.jupyter-widgets")
                         if b.text.strip() == label and b.is_displayed()), None)

        return wait(self.browser, find, f"the {label} button")

    def record_progress(self, cell: Any) -> None:
        """Start recording every text the cell's progress widgets show (a MutationObserver in the page)."""
        self.browser.execute_script("""
            const cell = arguments[0];
            window.__runbookProgress = [];
            const seen = () => cell.querySelectorAll('.runbook-progress').forEach(w => {
                const text = w.innerText.replace(/\\s+/g, ' ').trim() + (w.classList.contains('runbook-progress-done') ? ' [done]' : '');
                const all = window.__runbookProgress;
                if (text && all[all.length - 1] !== text) all.push(text);
            });
            window.__runbookObserver = new MutationObserver(seen);
            window.__runbookObserver.observe(cell, {subtree: true, childList: true, characterData: true, attributes: true});
        """, cell)

    def progress_seen(self) -> list[str]:
        return self.browser.execute_script("return window.__runbookProgress || []")
