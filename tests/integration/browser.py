"""A headless Chromium for browser tests, driven by Selenium.

    from tests.integration.browser import chromium, wait_for_text

    with chromium() as driver:  # a selenium.webdriver.Chrome
        driver.get(url)
        wait_for_text(driver, "expected", "texts", timeout_s=60)

Debian's chromium and chromedriver (`make setup` installs them as root); Selenium never
downloads a browser or a driver. Each browser gets a fresh profile folder, removed with it, and
is quit on leaving the block, whatever happened inside.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_LOAD_TIMEOUT_S = 60


@contextmanager
def chromium(window_size: tuple[int, int] = (1600, 1000)) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a temporary profile, quit when the block ends."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"browser tests need {' and '.join(missing)}: `make setup` installs them as root "
            "(apt-get install --no-install-recommends chromium chromium-driver)"
        )
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={window_size[0]},{window_size[1]}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
            yield driver
        finally:
            driver.quit()


def page_text(driver: webdriver.Chrome) -> str:
    """The text the page shows now ("" while it has no body)."""
    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except WebDriverException:
        return ""


def wait_for_text(driver: webdriver.Chrome, *texts: str, timeout_s: float = 60) -> str:
    """Waits until the page shows every one of `texts`; returns the page's text then. Fails
    after `timeout_s`, naming what was missing and what the page showed."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = page_text(driver)
        missing = [text for text in texts if text not in shown]
        if not missing:
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout_s:.0f} s {driver.current_url} does not show {missing}; "
                f"it shows:\n{shown[:3000]}"
            )
        time.sleep(0.5)
