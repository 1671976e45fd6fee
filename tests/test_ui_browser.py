"""End to end in headless Chromium (Debian's `chromium`, driven by playwright): a slider moves, the preview follows."""

import io
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is absent: install Debian's `chromium` (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent: pip install adaptermerge[dev]")

from adaptermerge.ui import launch  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    port = free_port()
    app = launch(port=port, prevent_thread_lock=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#preview .am-merged", timeout=60_000)
        yield page
    finally:
        app.close()


@pytest.fixture(scope="module")
def pipeline_page(browser, tmp_path_factory):
    """The app on a user's diffusers pipeline (`--base`, a tiny SD saved to a folder) and a folder of kohya LoRAs."""
    from adaptermerge import save_adapter
    from adaptermerge.ui.diffusion import random_pipeline_loras, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("pipeline-ui")
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "base")
    for adapter in random_pipeline_loras(pipe):
        save_adapter(adapter, root / "adapters" / f"{adapter.name}.safetensors", format="kohya")
    port = free_port()
    app = launch(
        port=port, base=str(root / "base"), adapters_dir=root / "adapters", steps=3, size=32, prevent_thread_lock=True
    )
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#preview-image img").wait_for(state="visible", timeout=60_000)
        yield page
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


def shown_image(page, selector):
    """The pixels of the image `selector` shows, fetched from the server as the browser does."""
    from PIL import Image

    source = page.locator(f"{selector} img").evaluate("img => img.src")
    return source, np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB")).astype(int)


def slide_until_image_changes(page, slider: str, image: str) -> tuple[str, float]:
    """Click near the right end of `slider` and wait until `image` shows a new source; returns it and the seconds."""
    before_source = page.locator(f"{image} img").evaluate("img => img.src")
    track = page.locator(f"{slider} input[type=range]")
    track.scroll_into_view_if_needed()  # a mouse click lands only inside the viewport
    box = track.bounding_box()
    started = time.perf_counter()
    page.mouse.click(box["x"] + 0.9 * box["width"], box["y"] + box["height"] / 2)
    page.wait_for_function(
        "args => { const img = document.querySelector(args[0] + ' img'); return img && img.src !== args[1]; }",
        arg=[image, before_source],
        timeout=10_000,
    )
    return before_source, time.perf_counter() - started


def test_diffusion_section_renders_a_new_image_when_a_slider_moves(page, tmp_path):
    page.get_by_text("diffusion: a tiny Stable Diffusion pipeline").click()  # opening it builds the pipeline
    page.locator("#diffusion-image img").wait_for(state="visible", timeout=60_000)
    _, before = shown_image(page, "#diffusion-image")
    before_source, elapsed = slide_until_image_changes(page, "#diffusion-weight-0", "#diffusion-image")
    after_source, after = shown_image(page, "#diffusion-image")
    assert float(page.input_value("#diffusion-weight-0 input[type=number]")) > 1.0
    assert after_source != before_source and before.shape == after.shape == (256, 256, 3)
    assert np.abs(after - before).mean() > 5  # the merged LoRA changes the picture, not just its URL
    screenshot = tmp_path / "ui-diffusion-after-slider.png"
    page.screenshot(path=str(screenshot), full_page=True)
    timing = page.inner_text("#diffusion-timing")
    print(f"diffusion slider click → new image in the browser: {1000 * elapsed:.0f} ms ({timing}); {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert elapsed < 3.0


def test_pipeline_base_shows_a_new_image_when_a_slider_moves(pipeline_page, tmp_path):
    page = pipeline_page
    assert page.locator("#prompt").is_visible() and not page.locator("#preview").is_visible()
    _, before = shown_image(page, "#preview-image")
    _, elapsed = slide_until_image_changes(page, "#weight-1", "#preview-image")
    _, after = shown_image(page, "#preview-image")
    assert before.shape == after.shape == (32, 32, 3)
    assert np.abs(after - before).mean() > 2
    screenshot = tmp_path / "ui-pipeline-after-slider.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"pipeline base slider click → new image in the browser: {1000 * elapsed:.0f} ms; {screenshot}")
    assert elapsed < 3.0


def set_slider(page, slider: str, fraction: float) -> float:
    """Click `slider` at `fraction` of its track; returns the value its number box then shows."""
    track = page.locator(f"{slider} input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)
    return float(page.input_value(f"{slider} input[type=number]"))


def render_and_wait(page, button: str, image: str) -> np.ndarray:
    """Click `button` and wait for `image` to show a new source; returns its pixels."""
    before = page.locator(f"{image} img").evaluate("img => img.src") if page.locator(f"{image} img").count() else ""
    page.locator(button).click()
    page.wait_for_function(
        "args => { const img = document.querySelector(args[0] + ' img'); return img && img.src !== args[1]; }",
        arg=[image, before],
        timeout=30_000,
    )
    return shown_image(page, image)[1]


def test_fusion_section_mu_slider_schedule_editor_and_xy_grid(pipeline_page, tmp_path):
    page = pipeline_page
    page.get_by_text("subject + style", exact=True).click()
    page.locator("#fusion-render").wait_for(state="visible", timeout=10_000)
    projected = render_and_wait(page, "#fusion-render", "#fusion-image")
    assert set_slider(page, "#fusion-mu", 0.0) == 0.0
    summed = render_and_wait(page, "#fusion-render", "#fusion-image")
    assert projected.shape == (32, 32, 3) and np.abs(projected - summed).mean() > 0.5
    assert "np_lora" in page.inner_text("#fusion-timing")

    page.locator("#fusion-mode").get_by_text("schedule", exact=True).click()
    assert set_slider(page, "#fusion-style-start", 0.6) >= 0.5
    scheduled = render_and_wait(page, "#fusion-render", "#fusion-image")
    assert np.abs(scheduled - summed).mean() > 0.5  # the style starts half-way: another picture than the sum
    assert "schedule" in page.inner_text("#fusion-timing")

    page.locator("#fusion-mode").get_by_text("np_lora", exact=True).click()
    grid = render_and_wait(page, "#grid-render", "#grid-image")
    assert grid.shape[0] > 2 * 128 and grid.shape[1] > 3 * 128  # 2 mu rows × 3 style-weight columns
    link = page.locator("#grid-file a").first
    link.wait_for(timeout=10_000)
    assert link.get_attribute("href").endswith(".png")
    screenshot = tmp_path / "ui-fusion-grid.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"fusion section: grid {grid.shape}, screenshot {screenshot}")


def test_typing_a_weight_and_pressing_enter_refreshes_the_preview(page):
    before = page.inner_text("#preview")
    box = page.locator("#weight-1 input[type=number]")
    box.fill("1.35")
    box.press("Enter")
    page.wait_for_function("old => document.querySelector('#preview').innerText !== old", arg=before, timeout=10_000)
    assert float(box.input_value()) == 1.35


def test_similarity_table_stays_inside_its_column(page):
    page.wait_for_selector("#heatmap table")
    column = page.locator("#heatmap").bounding_box()
    table = page.locator("#heatmap table").bounding_box()
    assert table["x"] >= column["x"] - 1 and table["x"] + table["width"] <= column["x"] + column["width"] + 1
    assert page.locator("#heatmap th[title]").count() >= 2  # numbered columns, the names in tooltips


def test_advanced_weights_example_names_the_loaded_adapters(page, pipeline_page):
    demo = page.locator("#advanced-weights textarea").get_attribute("placeholder")
    theirs = pipeline_page.locator("#advanced-weights textarea").get_attribute("placeholder")
    first_slider = pipeline_page.locator("#weight-0 label, #weight-0 [data-testid='block-info']").first.inner_text()
    assert first_slider.strip() in theirs and theirs != demo and "digit" not in theirs


def test_an_uploaded_adapter_appears_in_the_fusion_dropdowns_and_fuses(pipeline_page, tmp_path):
    from adaptermerge import save_adapter
    from adaptermerge.ui.diffusion import random_pipeline_loras, tiny_sd_pipeline

    page = pipeline_page
    fresh = random_pipeline_loras(tiny_sd_pipeline(seed=0), ["x", "y", "fresh"])[2]
    page.locator("#upload input[type=file]").set_input_files(str(save_adapter(fresh, tmp_path / "fresh.safetensors")))
    page.wait_for_function("document.querySelector('#upload-status').innerText.includes('Added fresh')")
    if not page.locator("#fusion-render").is_visible():
        page.get_by_text("subject + style", exact=True).click()
    page.locator("#fusion-style input").click()
    option = page.get_by_role("option", name="fresh", exact=True)
    option.wait_for(timeout=10_000)
    option.click()
    assert page.input_value("#fusion-style input") == "fresh"
    render_and_wait(page, "#fusion-render", "#fusion-image")
    assert "ms" in page.inner_text("#fusion-timing")
