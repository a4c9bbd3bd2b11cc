"""The dashboard in a real browser: headless Debian chromium driven by Playwright.

The page must show the memory bar, the models table and its buttons; Unload must remove the
model on the server; a prompt's text must stream in. Screenshots go under the test's tmp dir.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from dashboardprocess import DashboardProcess
from kit import ServerProcess, TinyModels, never_ending_copy
from mymps_magic import Client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (scripts/dev.sh test installs it)"),
]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"



@pytest.fixture
def browser_page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 900})
        finally:
            browser.close()


def test_the_page_unloads_and_streams(dashboard: tuple[ServerProcess, DashboardProcess], browser_page: Page,
                                      tiny_models: TinyModels, tmp_path: Path) -> None:
    server, process = dashboard
    page = browser_page
    with Client(port=server.port, token=server.token) as client:
        client.load_model("tiny-gpt2", path=str(tiny_models.text_gpt2), dtype="float32", progress=False)
        llama = never_ending_copy(tiny_models.text_llama, tmp_path / "tiny-llama")
        client.load_model("tiny-llama", path=str(llama), dtype="float32", progress=False)
        seen: list[str] = []
        page.on("response", lambda response: seen.append(response.text()) if response.ok else None)
        page.goto(process.url)

        expect(page.locator(".memory .bar .fill")).to_be_visible()
        expect(page.locator("#models")).to_contain_text("tiny-gpt2")
        expect(page.locator("#models button", has_text="Unload")).to_have_count(2)
        expect(page.locator("#load-form button")).to_be_visible()

        page.fill("#generate-form input[name=model]", "tiny-llama")
        page.fill("#generate-form input[name=max_new_tokens]", "24")
        page.fill("#generate-form textarea[name=prompt]", "Once upon a time")
        page.click("#generate-form button")
        # Each piece bumps data-updates; at least two before the done line arrives.
        page.wait_for_function("Number(document.getElementById('generate-output').dataset.updates) >= 2")
        expect(page.locator("#generate-message")).to_contain_text("done: 24 tokens", timeout=60_000)
        assert page.locator("#generate-output").inner_text().strip()
        page.screenshot(path=str(tmp_path / "dashboard.png"))

        page.locator("#models tr", has_text="tiny-gpt2").get_by_role("button", name="Unload").click()
        expect(page.locator("#models")).not_to_contain_text("tiny-gpt2")
        assert [model["name"] for model in client.models()] == ["tiny-llama"]
        page.screenshot(path=str(tmp_path / "dashboard-after-unload.png"))
    assert seen and all(server.token not in text for text in seen)
