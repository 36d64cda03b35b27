"""Screenshots of what a user sees after `make demo`: the experiment's runs and their charts (the
saved view), a train run's per-taxa table in the artifact view, and the report.

    make demo
    .venv/bin/python docs/screenshots.py            # writes docs/*.png

It starts `mlflow server` on the demo's store (sqlite:///mlflow.db) on a free port and drives
headless Chromium (Debian: apt-get install chromium chromium-driver) through Selenium.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from taxonclip.tracking.experiments import view_link

DOCS = Path(__file__).resolve().parent
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1600, 1000)
SETTLE_S = 6.0  # the UI loads its runs and draws its charts after the page itself


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: str, port: int) -> subprocess.Popen:
    """`mlflow server` on `store`, once it answers its health check."""
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server",
                               "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"mlflow server on {store} did not answer on port {port}")


def browser() -> webdriver.Chrome:
    """Headless Chromium at WINDOW size."""
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def close_assistant(driver: webdriver.Chrome) -> None:
    """Close the MLflow Assistant panel, which takes a third of the window."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            time.sleep(1)
            return


def shoot(driver: webdriver.Chrome, url: str, out: Path, clicks: tuple[str, ...] = ()) -> None:
    """Open `url`, click the elements showing the texts `clicks` in turn, save a screenshot."""
    driver.get(url)
    time.sleep(SETTLE_S)
    close_assistant(driver)
    for text in clicks:
        driver.find_element(By.XPATH, f"//*[text()='{text}']").click()
        time.sleep(SETTLE_S / 2)
    driver.save_screenshot(str(out))
    print(f"wrote {out}")


def shoot_page(driver: webdriver.Chrome, url: str, out: Path, width: int = 1280) -> None:
    """A screenshot of the whole page at `url` in a window `width` pixels wide."""
    driver.set_window_size(width, 1000)
    driver.get(url)
    time.sleep(SETTLE_S / 2)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 200)  # headless windows keep part of it for chrome
    time.sleep(1)
    driver.save_screenshot(str(out))
    print(f"wrote {out}")


def main() -> None:
    """Write the screenshots of the demo's experiment into docs/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="taxonclip-demo")
    parser.add_argument("--report", default="reports/demo/report.html")
    args = parser.parse_args()
    port = free_port()
    server = start_server(args.store, port)
    base = f"http://127.0.0.1:{port}"
    try:
        client = MlflowClient(base)
        experiment = client.get_experiment_by_name(args.experiment).experiment_id
        train = client.search_runs([experiment], "tags.`taxonclip.entry` = 'train'",
                                   order_by=["attributes.start_time DESC"], max_results=1)[0]
        run_page = f"{base}/#/experiments/{experiment}/runs/{train.info.run_id}"
        driver = browser()
        try:
            shoot(driver, view_link(base, experiment), DOCS / "experiment_runs.png")
            shoot(driver, f"{view_link(base, experiment)}&compareRunsMode=CHART",
                  DOCS / "experiment_charts.png")
            shoot(driver, f"{run_page}/artifacts", DOCS / "train_run_table.png",
                  clicks=("eval", "per_taxa.md"))
            shoot_page(driver, Path(args.report).resolve().as_uri(), DOCS / "report.png")
        finally:
            driver.quit()
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
