"""The explorer in a real browser: JupyterLab on localhost, headless Chromium, all cells run.

JupyterLab is started on a free 127.0.0.1 port with a token, rooted at a temporary folder that
holds a copy of ``notebooks/explore.ipynb`` whose parameters point at a tiny finished study (the
way papermill injects them). Debian's ``chromium`` is driven through Playwright's Python API via
``executable_path``; no browser is ever downloaded. The test runs every cell, checks that no cell
shows an error, that the field selector rendered and that choosing another field redraws the
view, and saves a screenshot under the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from biometry.config.paths import notebooks_dir

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
TOKEN = "biometry-browser-test"


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameterised_copy(target: Path, parameters: dict) -> Path:
    """explore.ipynb with an ``injected-parameters`` cell after its ``parameters`` cell."""
    nb = nbformat.read(notebooks_dir() / "explore.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    if nb.nbformat_minor < 5:  # cell ids exist from nbformat 4.5 on
        del cell["id"]
    nb.cells.insert(at + 1, cell)
    nbformat.write(nb, target)
    return target


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server rooted at ``tmp_path/lab``; yields (base URL, root)."""
    root = tmp_path / "lab"
    root.mkdir()
    port = _free_port()
    settings = tmp_path / "settings"
    # no "official Jupyter news?" pop-up over the screenshot
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
     ).write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True",
           "--MappingKernelManager.default_kernel_name=python3"]
    if os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()}")
                time.sleep(0.3)
        yield url, root
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


RUN_ALL = """async () => {
  const app = window.jupyterapp;
  await app.commands.execute('notebook:run-all-cells');
}"""

DONE = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


def test_explorer_runs_in_jupyterlab_in_chromium(finished_study, lab, tmp_path):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    study, runs = finished_study
    url, root = lab
    _parameterised_copy(root / "explore.ipynb",
                        {"study": str(study), "field": "22407", "runs_root": str(runs)})
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 2600})
            page.goto(f"{url}/lab/tree/explore.ipynb?token={TOKEN}&reset")
            page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
            # the kernel is up when the status bar says Idle
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=30_000)
            page.wait_for_function(
                "() => /Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent || '')", timeout=30_000)
            page.evaluate(RUN_ALL)
            page.wait_for_function(DONE, timeout=60_000)
            selector = page.locator(".widget-dropdown select")
            selector.wait_for(timeout=20_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-OutputArea-output h3')]"
                ".some(h => h.textContent.includes('MriVatVolume (22407)'))", timeout=20_000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                                  ", .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
            error_texts = [t for t in errors.all_inner_texts() if "Error" in t or "Traceback" in t]
            assert not error_texts, error_texts
            # (a tall window: JupyterLab scrolls inside its notebook panel, so the whole view of
            # a field is in the screenshots only when it fits)
            # the first field's view: the scatter/Bland-Altman figure and outlier images
            widget_area = page.locator(".widget-output").first
            assert widget_area.locator("img").count() >= 3
            widget_area.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "explore_22407.png"))
            widget_area.screenshot(path=str(tmp_path / "explore_22407_view.png"))
            # choosing another field redraws the view below the selector
            selector.select_option(label="weight (21002)")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-output h3')]"
                ".some(h => h.textContent.includes('weight (21002)'))", timeout=30_000)
            # its interval view, and (last in the view) the note for the stage not run
            page.wait_for_function(
                "() => ['95 % intervals', 'no saliency map yet'].every("
                "t => document.querySelector('.widget-output').textContent.includes(t))",
                timeout=30_000)
            text = widget_area.inner_text()
            assert "MriVatVolume (22407)" not in text
            assert "no saliency map yet" in text  # degraded with a note, no traceback
            assert "Traceback" not in page.locator(".jp-Notebook").inner_text()
            assert widget_area.locator("h3").count() == 1  # cleared, then redrawn
            widget_area.screenshot(path=str(tmp_path / "explore_21002.png"))
        finally:
            browser.close()
    shot = tmp_path / "explore_21002.png"
    assert shot.stat().st_size > 20_000
    print(f"screenshots: {tmp_path}")
