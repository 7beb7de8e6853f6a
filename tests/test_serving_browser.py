"""The web UI in headless Chromium (Selenium + Debian's chromium-driver): upload an image, ask a
question, read the streamed answer, and check it is the model's answer about that image.

Skips with a reason when Chromium, chromedriver or selenium is missing
(scripts/install-browser.sh installs them).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1000,800"]
QUESTION = "What color is the circle?"


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium/chromedriver not installed (run scripts/install-browser.sh)")
    pytest.importorskip("selenium", reason="selenium not installed (run scripts/install-browser.sh)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_ask_and_read_the_streamed_answer(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from minigem.checkpoints.native import load_model
    from minigem.serving.api import create_app
    from minigem.serving.settings import ServeSettings
    from minigem.serving.testing import LiveServer, tiny_checkpoint

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model(tiny_checkpoint())
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(image)
    try:
        with LiveServer(create_app(model, ServeSettings(model_name="tiny"))) as srv:
            browser.get(srv.url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            assert browser.find_element(By.ID, "model").text == "tiny"
            toggle = browser.find_element(By.ID, "gen-image")
            assert not toggle.is_enabled()  # no image generation for this model
            browser.find_element(By.ID, "images").send_keys(str(image))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 1)
            tokens = browser.find_element(By.ID, "max-tokens")
            tokens.clear()
            tokens.send_keys("12")
            browser.find_element(By.ID, "prompt").send_keys(QUESTION)
            browser.find_element(By.ID, "send").click()
            log = browser.find_element(By.ID, "log")
            wait.until(lambda d: log.get_attribute("data-state") in ("done", "error"))
            assert log.get_attribute("data-state") == "done", log.text
            answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
            assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the upload is shown
            browser.save_screenshot(str(tmp_path / "ui.png"))
        with Image.open(image) as im:
            expected = model.chat(im.convert("RGB"), QUESTION, max_new_tokens=12)
        assert answer == expected and answer
    finally:
        torch.set_num_threads(before)
