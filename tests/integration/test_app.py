"""`segclip app` as a user runs it: the installed command's module in its own process, on the
untrained `tiny` profile, driven by headless Chromium through Selenium, plus plain HTTP checks.

Every wait is bounded; the browser is quit and the server's process group ended in `finally`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.integration.browser import chromium
from tests.multipart import post_form

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
STARTUP_S = 180  # python, torch and open_clip imports plus the tiny model, on a busy 2-core box
RESULT_S = 120  # one tiny-model prediction; the first also warms torch up
STOP_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def end_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Signal the server's process group, wait (bounded), then kill it if it is still there."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            return process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait(timeout=STOP_S)


def default_sigint() -> None:
    """In the child: Ctrl-C's default action even when this run ignores SIGINT (a background
    job does), so that Python turns it into KeyboardInterrupt as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def app_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`python -m flows.cli app --checkpoint tiny` on a free port: (URL, process, log file)."""
    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    command = [sys.executable, "-m", "flows.cli", "app", "--checkpoint", "tiny"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--device", "cpu"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, ended as a whole
            preexec_fn=default_sigint,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"segclip app exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"segclip app not answering after {STARTUP_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, process, log
    finally:
        end_process_group(process)


def scene_png(path: Path) -> Path:
    """Two flat halves with a square: something for the overlay to colour."""
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[:, :64] = (30, 90, 200)
    rgb[:, 64:] = (40, 160, 60)
    rgb[30:66, 48:84] = (220, 40, 40)
    Image.fromarray(rgb).save(path)
    return path


def test_upload_classes_and_method_give_the_overlay_with_its_legend(tmp_path):
    image = scene_png(tmp_path / "scene.png")
    timings = {}
    with app_server(tmp_path) as (url, process, log), chromium() as browser:
        start = time.monotonic()
        browser.get(url)
        browser.find_element(By.ID, "image").send_keys(str(image))
        browser.find_element(By.ID, "classes-input").send_keys("red square, blue sky, grass")
        browser.find_element(By.ID, "threshold-input").send_keys("0.2")
        Select(browser.find_element(By.ID, "method-input")).select_by_value("maskclip")
        browser.find_element(By.ID, "submit").click()

        overlay = WebDriverWait(browser, RESULT_S).until(
            expected_conditions.visibility_of_element_located((By.ID, "overlay"))
        )
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script(
                "const i = arguments[0]; return i.complete && i.naturalWidth > 0;", overlay
            )
        )
        timings["upload to overlay"] = time.monotonic() - start
        natural = browser.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight];", overlay
        )
        assert overlay.is_displayed()
        assert overlay.size["width"] > 0 and overlay.size["height"] > 0
        assert natural[0] == 2 * 128 and natural[1] > 96  # image | prediction, legend below

        assert browser.find_element(By.ID, "method").text == "maskclip"
        assert browser.find_element(By.ID, "classes").text == "red square, blue sky, grass"
        assert browser.find_element(By.ID, "threshold").text == "0.2"
        legend = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert legend and set(legend) <= {"background", "red square", "blue sky", "grass"}
        assert not browser.find_elements(By.ID, "error")

        # A second submission from the result page: bad input is reported on the page.
        browser.find_element(By.ID, "classes-input").clear()
        browser.find_element(By.ID, "image").send_keys(str(image))
        browser.find_element(By.ID, "submit").click()
        error = WebDriverWait(browser, 60).until(
            expected_conditions.visibility_of_element_located((By.ID, "error"))
        )
        assert error.text.startswith("No classes: type at least one class name")
        assert "Traceback" not in browser.page_source
        assert process.poll() is None, log.read_text()
    print(f"timings: {timings}")


def test_missing_image_is_a_400_with_its_message_and_ctrl_c_stops_the_server(tmp_path):
    with app_server(tmp_path) as (url, process, log):
        status, page = post_form(url + "segment", {"classes": "cat, sky"}, timeout=60)
        assert status == 400
        assert re.search(r'<p id="error"[^>]*>No image: choose an image file to upload\.</p>', page)
        assert "Traceback" not in page
        ok, result = post_form(
            url + "segment",
            {"image": ("s.png", scene_png(tmp_path / "s.png").read_bytes()), "classes": "cat"},
            timeout=RESULT_S,
        )
        assert ok == 200 and 'id="overlay" src="data:image/png;base64,' in result

        assert f"segclip app: {url}" in log.read_text()
        assert end_process_group(process, signal.SIGINT) == 0  # Ctrl-C: a clean exit
        assert "segclip app: stopped" in log.read_text()
