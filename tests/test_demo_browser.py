"""The demo page in a real browser: `vocabseg demo` on a free localhost port with a tiny random model, driven by
headless Chromium (Debian's ``chromium`` + ``chromium-driver``) through Selenium, with background networking off.

Saves a screenshot to ``$VOCABSEG_ARTIFACTS`` (else the test's tmp folder) and copies it to
``/tmp/demo_screenshot.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
from demo_process import DemoProcess, demo_env
from PIL import Image

selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[test]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
           ".ci/run installs them)")

CLASSES = "person,bottle,chair,dining table|table"
LABELS = ["background", "person", "bottle", "chair", "dining table"]
METHODS = ["sclip", "clearclip"]
#: No component updates, sync, safe-browsing or field-trial fetches: the browser talks to the demo only.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
    "--no-first-run", "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--metrics-recording-only", "--no-default-browser-check",
    "--disable-features=OptimizationHints,MediaRouter,Translate", "--window-size=1440,1000",
]


@pytest.fixture
def demo(tiny_weights, tmp_path):
    process = DemoProcess(["demo", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"],
                          demo_env(tmp_path))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
                              options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VOCABSEG_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def canvas_digest(driver, card) -> str:
    return driver.execute_script(
        "const c = arguments[0].querySelector('canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let h = 0; for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0; return String(h);", card)


def wait_for_results(driver, expected_methods, timeout=240):
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_element(By.ID, "run").is_enabled()
               and len(d.find_elements(By.CSS_SELECTOR, "#grid article.card")) == len(expected_methods))
    return driver.find_elements(By.CSS_SELECTOR, "#grid article.card")


def test_demo_in_a_real_browser(demo, browser, voc, tmp_path):
    url = demo.wait_for_url()
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
    photo = tmp_path / "voc.png"
    Image.fromarray(voc[0]).save(photo)

    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "input[name=method]")) >= 2)
    assert browser.find_element(By.ID, "model").text.endswith("cpu")

    # upload the photo, type four classes, choose two methods
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: "voc.png" in d.find_element(By.ID, "filename").text)
    classes = browser.find_element(By.ID, "classes")
    classes.clear()
    classes.send_keys(CLASSES)
    assert browser.find_element(By.ID, "background").is_selected()
    for box in browser.find_elements(By.CSS_SELECTOR, "input[name=method]"):
        if box.is_selected() != (box.get_attribute("value") in METHODS):
            box.click()
    browser.find_element(By.ID, "run").click()

    # both overlays and their legends appear
    cards = wait_for_results(browser, METHODS)
    assert [c.get_attribute("data-method") for c in cards] == METHODS
    assert browser.find_elements(By.CSS_SELECTOR, "#grid article.failed") == []
    assert not browser.find_element(By.ID, "message").is_displayed()
    height, width = voc[0].shape[:2]
    legends = {}
    for card in cards:
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.overlay")
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == (str(width), str(height))
        assert canvas.size["width"] > 200 and canvas.is_displayed()
        items = card.find_elements(By.CSS_SELECTOR, "ul.legend li[data-index]")
        assert [li.get_attribute("data-name") for li in items] == LABELS
        assert [li.find_element(By.CLASS_NAME, "name").text for li in items] == LABELS
        assert all(li.find_element(By.CLASS_NAME, "pct").text.endswith("%") for li in items)
        fractions = {li.get_attribute("data-name"): float(li.get_attribute("data-fraction")) for li in items}
        assert sum(fractions.values()) == pytest.approx(1.0)
        legends[card.get_attribute("data-method")] = fractions
        assert card.find_element(By.CLASS_NAME, "time").text.endswith(" s")
    assert "2 method(s)" in browser.find_element(By.ID, "status").text

    # hover a class in the legend: the overlay highlights it; click pins it
    card = cards[0]
    plain = canvas_digest(browser, card)
    target = card.find_element(By.CSS_SELECTOR, "ul.legend li[data-name='dining table']")
    ActionChains(browser).move_to_element(target).perform()
    canvas = card.find_element(By.CSS_SELECTOR, "canvas.overlay")
    wait.until(lambda d: canvas.get_attribute("data-highlight") == "4")
    assert canvas_digest(browser, card) != plain
    target.click()
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "status")).perform()
    assert canvas.get_attribute("data-highlight") == "4" and "pinned" in target.get_attribute("class")
    target.click()
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "status")).perform()
    wait.until(lambda d: canvas.get_attribute("data-highlight") == "")
    assert canvas_digest(browser, card) == plain
    # switch to the label-map view and back
    card.find_element(By.CSS_SELECTOR, ".views button[data-view=labels]").click()
    assert canvas_digest(browser, card) != plain
    card.find_element(By.CSS_SELECTOR, ".views button[data-view=overlay]").click()
    assert canvas_digest(browser, card) == plain

    # the downloads: the JSON sidecar (through the browser's download) and the label PNG
    for card in cards:
        method = card.get_attribute("data-method")
        link = card.find_element(By.CSS_SELECTOR, "a.download-json")
        assert link.get_attribute("download") == f"voc_{method}.json"
        href = link.get_attribute("href")
        prefix = "data:application/json;charset=utf-8,"
        assert href.startswith(prefix)
        sidecar = json.loads(unquote(href[len(prefix):]))
        link.click()
        saved = browser.downloads / f"voc_{method}.json"
        WebDriverWait(browser, 30).until(lambda d, saved=saved: saved.exists() and saved.stat().st_size > 0)
        assert json.loads(saved.read_text(encoding="utf-8")) == sidecar
        assert sidecar["classes"] == LABELS
        assert sidecar["method"] == method
        assert sidecar["image"] == "voc.png"
        assert sidecar["names"][4] == ["dining table", "table"]
        assert sidecar["size"] == {"height": height, "width": width}
        assert sidecar["pixel_fraction"] == {k: pytest.approx(v) for k, v in legends[method].items()}
        assert sum(sidecar["pixel_fraction"].values()) == pytest.approx(1.0)
        label_href = card.find_element(By.CSS_SELECTOR, "a.download-labels").get_attribute("href")
        labels = Image.open(io.BytesIO(base64.b64decode(label_href.split(",", 1)[1])))
        assert labels.mode == "P" and labels.size == (width, height)

    # everything the page loaded came from the demo itself
    origin = url.rstrip("/")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith((origin, "data:", "blob:")) for r in resources), resources

    # screenshot of the whole page, as a test artifact
    browser.execute_script("window.scrollTo(0, 0)")
    page_height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1440, "height": max(900, int(page_height)), "deviceScaleFactor": 1, "mobile": False})
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, "header.top h1")).perform()
    shot = artifacts_dir(tmp_path) / "demo_screenshot.png"
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, "/tmp/demo_screenshot.png")
    assert Image.open(shot).size[0] >= 1000
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # a bad class list gets a clear message, not a stack trace
    classes.clear()
    classes.send_keys("cat, dog, Cat")
    browser.find_element(By.ID, "run").click()
    message = browser.find_element(By.ID, "message")
    WebDriverWait(browser, 60).until(lambda d: message.is_displayed())
    assert "Duplicate class name 'Cat'" in message.text and "Traceback" not in message.text

    # an example photo fills in its classes and segments
    browser.find_element(By.CSS_SELECTOR, ".examples button[data-example=chelsea]").click()
    wait.until(lambda d: classes.get_attribute("value") == "cat,floor")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 240).until(
        lambda d: d.find_element(By.ID, "run").is_enabled()
        and d.find_element(By.CSS_SELECTOR, "#grid article.card canvas").get_attribute("width") == "451")
    names = [li.get_attribute("data-name")
             for li in browser.find_elements(By.CSS_SELECTOR, "#grid article.card:first-child li[data-index]")]
    assert names == ["background", "cat", "floor"]
    assert not message.is_displayed()

    # Ctrl-C stops the server cleanly
    assert demo.stop() == 0, demo.output
    assert "vocabseg demo: stopped" in demo.output
    assert "Traceback" not in demo.output
