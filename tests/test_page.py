"""The page at ``/``: its files in-process, then a real browser (headless Chromium driven by Selenium)
making images through a gateway with API keys in front of the session cluster.

Set ``TRIPTYCH_DOCS_SCREENSHOT=1`` to also write the browser test's screenshot to docs/page.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.messages import StatusReply
from tests.support import ROOT, serving_app
from triptych.http import create_app

KEY = "sk-page-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PROMPT = "a lighthouse on a cliff at dusk"


class OneModel:
    """A broker connection that serves "m" and makes nothing."""

    def status(self, timeout: float = 5.0) -> StatusReply:
        node = {"service": "denoiser", "model": "m", "node": "h:1", "state": "idle", "jobs_done": 0, "info": {}}
        return StatusReply(request_id="s", nodes=[node], queues={"denoiser/m": 0})

    def close(self) -> None:
        pass


def fetch(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_and_its_files_are_served_without_a_key_and_the_api_still_wants_one():
    with serving_app(create_app("tcp://unused:1", client_factory=OneModel, api_keys=[KEY])) as url:
        status, headers, body = fetch(f"{url}/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        page = body.decode()
        assert '<textarea name="prompt"' in page and 'id="gallery"' in page and "/static/app.js" in page
        assert "default-src 'self'" in headers["content-security-policy"]  # its own files only: no CDN
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            status, headers, _ = fetch(f"{url}/static/{name}")
            assert status == 200 and headers["content-type"].startswith(kind)
        assert fetch(f"{url}/static/secrets.txt")[0] == 404
        assert fetch(f"{url}/v1/status")[0] == 401
        status, _, body = fetch(f"{url}/v1/status", {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and json.loads(body)["nodes"][0]["model"] == "m"


@pytest.mark.e2e
def test_the_status_api_lists_the_nodes_with_their_job_times(gateway):
    status, _, body = fetch(f"{gateway}/v1/status")
    reply = json.loads(body)
    assert status == 200 and set(reply) == {"nodes", "queues", "requests_in_flight", "models"}
    services = {(node["service"], node["model"]) for node in reply["nodes"]}
    assert {("encoder", "sd-tiny"), ("denoiser", "sd-tiny"), ("decoder", "sd-tiny")} <= services
    assert all("mean_job_s" in node for node in reply["nodes"])


# --- in a browser ---------------------------------------------------------------------------------


@contextlib.contextmanager
def browser(profile: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1180",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


PIXELS = """
const img = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth;
canvas.height = img.naturalHeight;
canvas.getContext("2d").drawImage(img, 0, 0);
return canvas.toDataURL("image/png");
"""


def api_images(url: str, body: dict) -> list[np.ndarray]:
    request = urllib.request.Request(
        f"{url}/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        data = json.loads(response.read())["data"]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB")) for item in data]


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver")
def test_the_page_makes_images_equal_to_the_apis_with_a_key_and_shows_the_cluster(cluster, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    app = create_app(cluster.address, timeout=60, api_keys=[KEY])
    with serving_app(app) as url, browser(tmp_path / "profile") as driver:
        driver.get(f"{url}/")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(KEY, Keys.TAB)  # the change event: kept, then the models are asked for
        wait = WebDriverWait(driver, 60)
        wait.until(
            lambda d: "sd-tiny" in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")]
        )
        Select(driver.find_element(By.ID, "model")).select_by_value("sd-tiny")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler option")) > 1)  # the model's samplers
        driver.find_element(By.CSS_SELECTOR, "textarea[name=prompt]").send_keys(PROMPT)
        for name, value in (("width", "64"), ("height", "64"), ("steps", "4"), ("seed", "13"), ("n", "2")):
            field = driver.find_element(By.CSS_SELECTOR, f"input[name={name}]")
            field.clear()
            field.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "#generate button[type=submit]").click()

        def finished(d) -> list:
            images = d.find_elements(By.CSS_SELECTOR, "#gallery img")
            loaded = [
                img
                for img in images
                if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            ]
            return loaded if len(loaded) == 2 else []

        shown = WebDriverWait(driver, 180).until(finished)
        expected = api_images(
            url, {"model": "sd-tiny", "prompt": PROMPT, "size": "64x64", "seed": 13, "n": 2, "num_inference_steps": 4}
        )
        for img in shown:
            index = int(img.get_attribute("data-seed")) - 13
            data_url = driver.execute_script(PIXELS, img)
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
            assert np.array_equal(pixels, expected[index]), f"image {index} differs from the API's"

        assert driver.execute_script("return localStorage.getItem('triptych.apiKey')") == KEY
        wait.until(lambda d: "denoiser" in d.find_element(By.ID, "cluster-body").text)
        assert "sd-tiny" in driver.find_element(By.ID, "cluster-body").text
        wait.until(lambda d: "Stage times" in d.find_element(By.ID, "cluster-body").text)

        first = driver.find_elements(By.CSS_SELECTOR, "#gallery figure")[-1]  # the oldest: seed 13
        driver.find_element(By.CSS_SELECTOR, "input[name=seed]").clear()
        first.find_element(By.CSS_SELECTOR, "button.reuse").click()
        assert driver.find_element(By.CSS_SELECTOR, "input[name=seed]").get_attribute("value") == "13"
        assert driver.find_element(By.CSS_SELECTOR, "textarea[name=prompt]").get_attribute("value") == PROMPT
        assert first.find_element(By.LINK_TEXT, "download").get_attribute("download") == "triptych-13.png"

        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("TRIPTYCH_DOCS_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", ROOT / "docs" / "page.png")
