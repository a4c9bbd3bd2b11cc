"""The panel in a real browser: JupyterLab and Notebook 7 on loopback, headless Chromium driven
by Playwright.

What a user sees in either: the memory bar, the models table with its Unload buttons, the
Load form and the jobs table render from the widget's own front end, and a click on Unload
unloads the model on the server (checked over the server's API). A screenshot of the page and
one of the panel are saved under the test's temp dir (the README's docs/panel.png came from one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit import ServerProcess, TinyModels, auth, wait_for
from mymps_magic.cli.localserver import free_port

CHROMIUM = "/usr/bin/chromium"
MODEL = "panel-browser-llama"
TOKEN = "panel-browser-test"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def jupyter(app: str, tmp_path: Path, server: ServerProcess) -> Iterator[str]:
    """`jupyter lab` or `jupyter notebook` on a free loopback port, its kernels reaching `server`,
    serving panel.ipynb; yields the server's base URL (the token goes as a query, see TOKEN)."""
    root, home = tmp_path / "notebooks", tmp_path / "jupyter"
    root.mkdir()
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token}
    port, log_path = free_port(), tmp_path / f"{app}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), app, "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--ServerApp.port_retries=0", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter {app} exited with {process.returncode}; see {log_path}")
            return _answers(f"{url}/api/status?token={TOKEN}")

        wait_for(up, f"jupyter {app} to answer (see {log_path})", timeout=90)
        notebook = {
            "cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                       "source": "%load_ext mymps_magic\n%mymps status --interval 1"}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5,
        }
        (root / "panel.ipynb").write_text(json.dumps(notebook))
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def lab(tmp_path: Path, server: ServerProcess) -> Iterator[str]:
    """JupyterLab; yields the notebook's URL."""
    with jupyter("lab", tmp_path, server) as url:
        yield f"{url}/lab/tree/panel.ipynb?token={TOKEN}"


@pytest.fixture
def notebook7(tmp_path: Path, server: ServerProcess) -> Iterator[str]:
    """Notebook 7 (same components as JupyterLab, its own URLs and page layout); yields the
    notebook's URL."""
    with jupyter("notebook", tmp_path, server) as url:
        yield f"{url}/notebooks/panel.ipynb?token={TOKEN}"


def model_names(server: ServerProcess) -> list[str]:
    answer = httpx.get(f"{server.url}/models", headers=auth(server.token), timeout=30, trust_env=False)
    return [m["name"] for m in answer.json()]


def run_all_cells(page: Any, panel: Any) -> None:
    """Run > Run All Cells until the panel shows: a click that lands while the page still wires
    the kernel up runs nothing (the cell keeps its "[ ]"), and running the cell again is harmless."""
    from playwright.sync_api import expect

    for attempt in range(5):
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            expect(panel).to_be_visible(timeout=20_000)
            return
        except AssertionError:
            if attempt == 4:
                raise


def load_the_model(server: ServerProcess, tiny_models: TinyModels) -> None:
    body = {"name": MODEL, "path": str(tiny_models.text_llama), "kind": "text"}
    loaded = httpx.post(f"{server.url}/models/load", json=body, headers=auth(server.token), timeout=120,
                        trust_env=False)
    assert loaded.status_code == 200, loaded.text


def check_the_panel_and_unload(page: Any, server: ServerProcess, tmp_path: Path, page_shot: str) -> None:
    """Runs the notebook once its kernel is idle, checks what the panel shows, clicks Unload and
    checks the server; the same for every front end, as the widget's front end is the same."""
    from playwright.sync_api import expect

    panel = page.locator(".mymps-panel")
    run_all_cells(page, panel)
    expect(panel.locator(".widget-hprogress").first).to_be_visible()
    expect(panel.get_by_text("allocated of")).to_be_visible()
    expect(panel.get_by_text("connected")).to_be_visible()
    row = panel.locator(".widget-hbox").filter(has_text=MODEL).filter(
        has=page.get_by_role("button", name="Unload", exact=True))
    expect(row).to_have_count(1, timeout=30_000)
    expect(row.get_by_text("float32")).to_be_visible()
    expect(panel.get_by_role("button", name="Load", exact=True)).to_be_visible()
    page.screenshot(path=str(tmp_path / page_shot))
    panel.screenshot(path=str(tmp_path / "panel.png"))

    row.get_by_role("button", name="Unload", exact=True).click()
    wait_for(lambda: MODEL not in model_names(server), "the click on Unload to unload the model", timeout=90)
    expect(row).to_have_count(0, timeout=30_000)  # the panel refreshed after acting
    page.screenshot(path=str(tmp_path / "after-unload.png"))


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_panel_renders_in_jupyterlab_and_its_unload_button_unloads(
        lab: str, server: ServerProcess, tiny_models: TinyModels, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    load_the_model(server, tiny_models)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(lab)
            expect(page.get_by_role("button", name="Python 3 (ipykernel) | Idle")).to_be_visible(timeout=90_000)
            check_the_panel_and_unload(page, server, tmp_path, "jupyterlab.png")
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_panel_renders_in_notebook_7_and_its_unload_button_unloads(
        notebook7: str, server: ServerProcess, tiny_models: TinyModels, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    load_the_model(server, tiny_models)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(notebook7)
            # Notebook 7 shows the kernel's state as a circle in the toolbar, not as a named button.
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
                1, timeout=90_000)
            check_the_panel_and_unload(page, server, tmp_path, "notebook7.png")
        finally:
            browser.close()
