"""The web UI in headless Chromium (Selenium + Debian's chromium-driver): upload an image, ask a
question, read the streamed answer, and check it is the model's answer about that image; with an
image generator attached, tick "generate an image" and see the picture; with a Mini-Gemini
model, tick "show mining heat map" and see the heat map under the answer.

Skips with a reason when Chromium, chromedriver or selenium is missing
(scripts/install-browser.sh installs them).
"""

from __future__ import annotations

import base64
import io
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ANSWER, SHOWN, build_tiny_model, build_tiny_sd, mgm_config, scripted
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1000,800"]
QUESTION = "What color is the circle?"

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture
def red_png(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


@contextmanager
def open_ui(browser, model, image_generator=None, **settings):
    """Serve ``model`` on a live server, open the UI in ``browser`` and wait until it is ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    from minigem.serving.api import create_app
    from minigem.serving.settings import ServeSettings
    from minigem.serving.testing import LiveServer

    app = create_app(model, ServeSettings(model_name="tiny", **settings),
                     image_generator=image_generator)
    with LiveServer(app) as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 60).until(lambda d: by_id(d, "model").text == "tiny" and
                                         d.execute_script("return document.body.dataset.ready") == "true")
        yield srv


def ask(browser, question: str, max_tokens: int, image: Path | None = None):
    """Attach ``image`` (if any), send ``question`` and wait for the answer: its bubble."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    if image is not None:
        by_id(browser, "images").send_keys(str(image))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 1)
    tokens = by_id(browser, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    by_id(browser, "prompt").send_keys(question)
    by_id(browser, "send").click()
    log = by_id(browser, "log")
    wait.until(lambda d: log.get_attribute("data-state") in ("done", "error"))
    assert log.get_attribute("data-state") == "done", log.text
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def text_of(bubble) -> str:
    from selenium.webdriver.common.by import By

    return bubble.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")


def png_from_data_url(url: str) -> Image.Image:
    head, _, payload = url.partition(",")
    assert head == "data:image/png;base64", url[:60]
    im = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert im.format == "PNG"
    im.load()
    return im


def test_upload_ask_and_read_the_streamed_answer(browser, tmp_path, red_png):
    from selenium.webdriver.common.by import By

    from minigem.checkpoints.native import load_model
    from minigem.serving.testing import tiny_checkpoint

    model = load_model(tiny_checkpoint())
    with open_ui(browser, model):
        assert not by_id(browser, "gen-image").is_enabled()  # no image generation for this model
        assert not by_id(browser, "mining-label").is_displayed()  # not a Mini-Gemini model
        answer = text_of(ask(browser, QUESTION, 12, image=red_png))
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the upload is shown
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant img")
        browser.save_screenshot(str(tmp_path / "ui.png"))
    with Image.open(red_png) as im:
        expected = model.chat(im.convert("RGB"), QUESTION, max_new_tokens=12)
    assert answer == expected and answer


def test_generate_an_image(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from minigem.imagegen.bridge import DiffusionBridge
    from minigem.serving.testing import tiny_model

    bridge = DiffusionBridge(build_tiny_sd(tmp_path / "t2i"), device="cpu", steps=2, size=(32, 32))
    with open_ui(browser, scripted(tiny_model(), ANSWER), image_generator=bridge):
        toggle = by_id(browser, "gen-image")
        assert toggle.is_enabled()
        assert by_id(browser, "gen-label").get_attribute("aria-disabled") == "false"
        assert not by_id(browser, "mining-label").is_displayed()
        toggle.click()
        assert toggle.is_selected()
        bubble = ask(browser, "draw a green triangle", 20)
        assert text_of(bubble) == SHOWN  # the <h>...</h> markers are not shown
        [img] = bubble.find_elements(By.CSS_SELECTOR, "img.generated")
        assert png_from_data_url(img.get_attribute("src")).size == (32, 32)
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32
        assert not bubble.find_elements(By.CSS_SELECTOR, ".note")
        browser.save_screenshot(str(tmp_path / "ui-gen.png"))


def test_mining_heat_map(browser, tmp_path, tiny_tokenizer, red_png):
    from selenium.webdriver.common.by import By

    mgm = build_tiny_model(mgm_config(), tiny_tokenizer)
    with open_ui(browser, mgm, max_tokens_limit=16):
        label = by_id(browser, "mining-label")
        assert label.is_displayed()
        assert not by_id(browser, "gen-image").is_enabled()
        by_id(browser, "show-mining").click()
        bubble = ask(browser, QUESTION, 4, image=red_png)
        [img] = bubble.find_elements(By.CSS_SELECTOR, "img.heatmap")
        heat = png_from_data_url(img.get_attribute("src"))
        assert heat.width % 48 == 0 and heat.height > heat.width  # HR 48 px, caption band below
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == heat.width
        notes = [n.get_attribute("textContent") for n in bubble.find_elements(By.CSS_SELECTOR, ".mining-note")]
        assert len(notes) == 1 and notes[0].startswith("relied on most: #1 (")
        assert "single-turn" not in notes[0]  # one turn: the explanation's answer is the chat's
        answer = text_of(bubble)
        browser.save_screenshot(str(tmp_path / "ui-mining.png"))
    with Image.open(red_png) as im:
        assert answer == mgm.chat(im.convert("RGB"), QUESTION, max_new_tokens=4)
