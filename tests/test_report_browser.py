"""The report `compare` writes, as headless Chromium shows it in a 1280 px wide window."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless, and fit for a container: no sandbox (root), no GPU, no small /dev/shm.
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
WIDTH, HEIGHT = 1280, 800
SCREENSHOT = "report-1280.png"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium in a 1280x800 window, keeping the page's console log; a visible skip
    where Chromium, its driver or Selenium is not installed (.ci/run installs them)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"headless Chromium is not installed (no {', '.join(missing)}; Debian "
                    f"packages chromium and chromium-driver, which .ci/run installs)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*CHROMIUM_ARGS, f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The installed driver, named, so that Selenium Manager never looks for one online.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_window_size(WIDTH, HEIGHT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(demo_runs) -> Path:
    """report.html of a real compare over a pretrained eval of the tiny model and a fine-tuned
    run matched to it: leaderboard, per-cell and side-by-side tables, bars and training curves."""
    return demo_runs["report"]


@pytest.fixture(scope="module")
def page(browser, report, tmp_path_factory):
    """The browser showing the report, its console log read once (reading empties it), and a
    full-page screenshot saved to pytest's tmp folder, before any test looks, so that a failing
    test leaves the picture of what failed."""
    browser.get(report.as_uri())  # returns once the page and its data-URI images have loaded
    console = browser.get_log("browser")
    screenshot = full_page_png(browser)
    (tmp_path_factory.mktemp("screenshot") / SCREENSHOT).write_bytes(screenshot)
    return browser, console, screenshot


def full_page_png(driver) -> bytes:
    """The whole page, below the window too, as PNG at the window's width."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return window.innerWidth")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def test_the_console_has_no_errors(page):
    _, console, _ = page
    assert [entry for entry in console if entry["level"] == "SEVERE"] == []


def test_every_image_is_decoded(page):
    driver, _, _ = page
    images = driver.execute_script("return Array.from(document.images, img => "
                                   "[img.alt, img.complete && img.naturalWidth > 0])")
    assert images, "the report shows no image"
    assert [alt for alt, decoded in images if not decoded] == []


def test_nothing_scrolls_sideways_at_1280_px(page):
    driver, _, _ = page
    page_width, window_width = driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert window_width == WIDTH
    assert page_width <= window_width
    # Tables may scroll in their own box as a last resort; the leaderboard (the first) must not.
    box_width, box_shown = driver.execute_script(
        "const box = document.querySelector('div.table');"
        "return [box.scrollWidth, box.clientWidth]")
    assert box_width <= box_shown


def test_the_screenshot_is_the_whole_page_at_1280_px(page):
    driver, _, screenshot = page
    height = driver.execute_script("return document.documentElement.scrollHeight")
    assert Image.open(io.BytesIO(screenshot)).size == (WIDTH, height)
