"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
upload -> picture shown and downloadable; a non-image -> the server's error shown; BGMv2 with a
plate, and its webcam mode on Chromium's fake camera.

Skips when chromium or playwright is missing, except in CI (``CI`` or ``DETSEG_REQUIRE_SHARED=1``),
where it must run. ``DETSEG_SCREENSHOTS=DIR`` saves the page's screenshots there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from detseg.serve.app import create_app
from tests.serve.tiny import decode_png, image, live_server, png

CHROMIUM = (
    os.environ.get("DETSEG_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)


def _browser_or_skip():
    required = bool(os.environ.get("CI")) or os.environ.get("DETSEG_REQUIRE_SHARED") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = (
        "playwright (pip)" if sync_playwright is None else None if CHROMIUM else "chromium (apt)"
    )
    if missing:
        if required:
            pytest.fail(f"{missing} is required in CI for the browser test")
        pytest.skip(f"{missing} not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def page(predictors):
    sync_playwright = _browser_or_skip()
    served = {k: predictors[k] for k in ("unet", "fcos_mnv2_fpn", "bgmv2_base_mobilenetv2")}
    with live_server(create_app(served)) as (_, _, url), sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
            ],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(120_000)  # a loaded CI machine: slow, not broken
        page.goto(url)
        page.wait_for_selector("#model option", state="attached")
        yield page
        browser.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("DETSEG_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def _downloaded(page) -> np.ndarray:
    with page.expect_download() as download:
        page.click("#download")
    return decode_png(Path(download.value.path()).read_bytes())


def test_upload_shows_the_overlay_and_downloads_it(page, predictors, tmp_path) -> None:
    img = image(60, 80)
    (tmp_path / "street.png").write_bytes(png(img))
    page.select_option("#model", "unet")
    page.set_input_files("#image", str(tmp_path / "street.png"))  # choosing a file runs it
    page.wait_for_function("document.getElementById('result').naturalWidth > 0")
    assert page.is_hidden("#error") and page.is_visible("#figure")
    assert page.eval_on_selector("#result", "e => [e.naturalWidth, e.naturalHeight]") == [80, 60]
    assert np.array_equal(_downloaded(page), predictors["unet"](img).render(img))
    _shot(page, "serve_semantic.png")


def test_a_non_image_shows_the_error(page, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    page.select_option("#model", "fcos_mnv2_fpn")
    assert page.is_visible("#score-row") and page.is_hidden("#plate-row")
    page.set_input_files("#image", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])")
    assert "not a readable image" in page.inner_text("#error")
    assert page.is_hidden("#figure")  # the previous picture is not left beside the error
    _shot(page, "serve_error.png")


def test_matting_needs_the_plate_and_shows_the_cut_out(page, tmp_path) -> None:
    (tmp_path / "photo.png").write_bytes(png(image(64, 64)))
    (tmp_path / "plate.png").write_bytes(png(image(64, 64, seed=1)))
    page.select_option("#model", "bgmv2_base_mobilenetv2")
    assert page.is_visible("#plate-row") and page.is_visible("#webcam")
    page.set_input_files("#image", str(tmp_path / "photo.png"))
    assert page.is_disabled("#run")  # no plate yet
    page.set_input_files("#plate", str(tmp_path / "plate.png"))
    page.eval_on_selector("#result", "e => e.removeAttribute('src')")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    assert _downloaded(page).shape == (64, 64, 4)
    _shot(page, "serve_matting.png")


def test_webcam_mode_mattes_live_frames(page) -> None:
    page.select_option("#model", "bgmv2_base_mobilenetv2")
    page.click("#webcam")
    page.wait_for_function("document.getElementById('camera').videoWidth > 0")
    page.click("#capture-plate")
    page.wait_for_function("document.getElementById('result').src.startsWith('blob:')")
    page.wait_for_function(
        "document.getElementById('result').naturalWidth === document.getElementById('camera').videoWidth"
    )
    assert page.is_hidden("#error")
    page.click("#stop")
    assert page.is_hidden("#camera")
