"""End to end in headless Chromium (Debian's `chromium`, driven by playwright): a slider moves, the preview follows."""

import shutil
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is absent: install Debian's `chromium` (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent: pip install adaptermerge[dev]")

from adaptermerge.ui import launch  # noqa: E402


@pytest.fixture(scope="module")
def page():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = launch(port=port, prevent_thread_lock=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#preview .am-merged", timeout=60_000)
            yield page
            browser.close()
    finally:
        app.close()


def test_moving_a_slider_updates_the_preview_within_a_second(page, tmp_path):
    before = page.inner_text("#preview")
    track = page.locator("#weight-0 input[type=range]").bounding_box()
    started = time.perf_counter()
    page.mouse.click(track["x"] + 0.95 * track["width"], track["y"] + track["height"] / 2)
    page.wait_for_function("old => document.querySelector('#preview').innerText !== old", arg=before, timeout=10_000)
    elapsed = time.perf_counter() - started
    assert float(page.input_value("#weight-0 input[type=number]")) > 1.5
    screenshot = tmp_path / "ui-after-slider.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"slider click → preview changed in the browser: {1000 * elapsed:.0f} ms; screenshot {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert elapsed < 1.0


def test_choosing_a_method_shows_its_parameters_only(page):
    assert not page.locator("#param-density").is_visible()
    page.locator("#method input").click()
    page.get_by_role("option", name="ties", exact=True).click()
    page.locator("#param-density").wait_for(state="visible", timeout=10_000)
    assert page.locator("#param-majority_sign_method").is_visible()
    assert not page.locator("#param-fuse_weight").is_visible()
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('merged')")
