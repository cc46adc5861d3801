"""The viewer page in a real headless Chromium while frames are being written to the store."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from pn2v_live.core.context import Context
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.store import Store

FRAME_SHAPE = (96, 128)
BAR_WIDTH = 8
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,800",
)
# Pixel statistics of a panel's <img>, read back through a canvas (same-origin blob URLs).
IMAGE_STATS_JS = """
const img = document.getElementById(arguments[0]);
if (!img.complete || !img.naturalWidth) return null;
const canvas = document.createElement("canvas");
[canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
const g = canvas.getContext("2d");
g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, canvas.width, canvas.height).data;
const columns = new Float64Array(canvas.width);
let sum = 0, sum2 = 0;
for (let i = 0; i < d.length; i += 4) {
  sum += d[i]; sum2 += d[i] * d[i]; columns[(i / 4) % canvas.width] += d[i];
}
const n = d.length / 4, mean = sum / n;
return {width: canvas.width, mean: mean, std: Math.sqrt(sum2 / n - mean * mean),
        brightest_column: columns.indexOf(Math.max(...columns))};
"""


def bar_left(t: int) -> int:
    return (6 * t) % (FRAME_SHAPE[1] - BAR_WIDTH)


def clean_frame(t: int) -> np.ndarray:
    """Float32 scene of frame t: dim gradient plus a bright vertical bar that moves with t."""
    frame = np.tile(np.linspace(200, 400, FRAME_SHAPE[1], dtype=np.float32), (FRAME_SHAPE[0], 1))
    frame[:, bar_left(t) : bar_left(t) + BAR_WIDTH] = 3000
    return frame


def write_frames(store: Store, stop: threading.Event, frames: int, fps: float) -> None:
    """Play an acquisition: noisy raw frames, each followed shortly by its denoised twin."""
    rng = np.random.default_rng(0)
    acquisition = store.create("browser01", FRAME_SHAPE, "uint16")
    for t in range(frames):
        if stop.wait(1 / fps):
            return
        clean = clean_frame(t)
        acquisition.write_raw(t, rng.poisson(clean).astype(np.uint16))
        window = Context(1, 1) if t % 2 else Context(1, 0)  # refined and live twins
        acquisition.write_denoised(t, clean, model_version=1, window=window)


@pytest.fixture()
def browser(tmp_path: Path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    require(
        chromium is not None and chromedriver is not None,
        "chromium and chromedriver not found: apt-get install -y chromium chromium-driver",
    )
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_page_follows_scrubs_and_changes_contrast_while_frames_stream(
    tmp_path: Path, browser, artifacts_dir: Path
) -> None:
    store = Store(tmp_path / "store")
    stop = threading.Event()
    writer = threading.Thread(target=write_frames, args=(store, stop, 600, 8.0))
    status = {
        "model_version": 1,
        "model_source": "pn2v",
        "model_estimated_gain_db": 6.24,
        "model_estimated_gain_uncertainty_db": 0.31,
        "waiting_for_model": False,
        "backlog": 0,
        "trainer_state": "waiting",
        "loss_history": [
            {"round": r, "time": r, "training_loss": 3 - r / 4, "validation_loss": 3.2 - r / 5}
            for r in range(1, 6)
        ],
    }
    server = ViewerServer(store, "127.0.0.1:0", status=lambda: status, poll_seconds=0.1)
    server.start()
    writer.start()
    try:
        browser.get(server.url)
        browser.execute_script("window.notReloaded = true;")

        def stats(panel: str) -> dict:
            # An <img> is briefly incomplete while a new rendering loads: wait until it is not.
            return wait_for(
                lambda: browser.execute_script(IMAGE_STATS_JS, f"{panel}-image"),
                what=f"the {panel} image to load",
            )

        def image_source(panel: str) -> str:
            return browser.find_element("id", f"{panel}-image").get_attribute("src")

        def shown_t() -> int | None:
            text = browser.find_element("id", "frame-counter").get_attribute("data-t")
            return int(text) if text else None

        for panel in ("raw", "denoised"):
            assert stats(panel)["std"] > 10, f"{panel} panel is blank"  # bar on a background

        first = wait_for(shown_t, what="a frame number")
        wait_for(lambda: shown_t() >= first + 3, what="the frame counter to advance")
        assert browser.execute_script("return window.notReloaded === true;")
        # The denoised panel shows the clean scene: far smoother than raw within the bar.
        assert browser.find_element("id", "model-version").text == "1"
        assert browser.find_element("id", "model-gain").text == "≈ +6.2 ± 0.3 dB over raw"
        assert browser.find_element("id", "trainer-state").text == "waiting for inference"

        slider = browser.find_element("id", "t-slider")
        browser.execute_script(
            "arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'));", slider
        )
        wait_for(lambda: shown_t() == 2, what="the page to show frame 2 after scrubbing")
        expected = bar_left(2) + BAR_WIDTH // 2
        wait_for(
            lambda: abs(stats("raw")["brightest_column"] - expected) <= BAR_WIDTH // 2,
            what="the raw panel to show frame 2's bar position",
        )
        assert abs(stats("denoised")["brightest_column"] - expected) <= BAR_WIDTH // 2
        caption = browser.find_element("id", "denoised-caption").text
        assert caption == "t = 2, model v1, live, frames t−1…t", caption
        shown_sources = [image_source(panel) for panel in ("raw", "denoised")]
        time.sleep(1.0)  # about 8 new frames arrive meanwhile
        assert shown_t() == 2, "scrubbed-back view must not jump to the newest frame"
        assert [image_source(panel) for panel in ("raw", "denoised")] == shown_sources, (
            "a scrubbed-back view must not fetch its frame again as new frames arrive"
        )

        auto_mean = stats("raw")["mean"]
        browser.find_element("id", "c-min").send_keys("0")
        browser.find_element("id", "c-max").send_keys("20000")
        browser.execute_script(
            "document.getElementById('c-max').dispatchEvent(new Event('change'));"
        )
        wait_for(lambda: stats("raw")["mean"] < auto_mean / 2, what="manual contrast to apply")
        assert stats("denoised")["mean"] < auto_mean / 2  # same window on both panels
        assert "[0.000, 2.000e+4]" in browser.find_element("id", "contrast-used").text

        # Zooming one panel zooms both, by the same transform.
        browser.execute_script(
            "document.getElementById('raw-viewport').dispatchEvent(new WheelEvent('wheel', "
            "{deltaY: -300, clientX: 500, clientY: 400, bubbles: true, cancelable: true}));"
        )
        transforms = [
            browser.find_element("id", f"{panel}-image").value_of_css_property("transform")
            for panel in ("raw", "denoised")
        ]
        assert transforms[0] == transforms[1] and transforms[0] not in ("none", "")
        assert not transforms[0].startswith("matrix(1, 0, 0, 1,")  # scaled, not only moved
        browser.find_element("id", "reset-view").click()

        # Back to auto contrast and live following for the screenshot a person looks at.
        browser.find_element("css selector", "input[name=contrast][value=auto]").click()
        browser.find_element("id", "follow").click()
        wait_for(lambda: shown_t() > 2, what="following the newest frame again")
        time.sleep(0.5)
        browser.save_screenshot(str(artifacts_dir / "viewer.png"))
    finally:
        stop.set()
        writer.join()
        server.stop()
        store.close()


def test_page_shows_raw_as_learning_until_a_model_beats_raw(tmp_path: Path, browser) -> None:
    store = Store(tmp_path / "store")
    acquisition = store.create("cells", (96, 128), "uint16")
    for t in range(3):
        acquisition.write_raw(t, (clean_frame(t) + 100).astype(np.uint16))
    status = {"model_version": None, "waiting_for_model": True, "backlog": 3}
    server = ViewerServer(store, "127.0.0.1:0", status=lambda: status, poll_seconds=0.1)
    server.start()
    try:
        browser.get(server.url)
        overlay = browser.find_element("id", "denoised-missing")
        wait_for(lambda: overlay.is_displayed(), what="the learning overlay")
        assert overlay.text == "learning: no model beats raw yet"
        caption = browser.find_element("id", "denoised-caption")
        wait_for(lambda: caption.text.endswith("raw while learning"), what="the caption")
        panels = [
            wait_for(lambda p=p: browser.execute_script(IMAGE_STATS_JS, f"{p}-image"))
            for p in ("raw", "denoised")
        ]
        assert panels[0] == panels[1]  # the raw frame, not an empty or worse panel
        assert browser.find_element("id", "model-version").text == "none yet"
    finally:
        server.stop()
        store.close()


def test_page_opens_from_a_token_link_beyond_loopback_and_says_when_the_server_is_busy(
    tmp_path: Path, browser
) -> None:
    store = Store(tmp_path / "store")
    acquisition = store.create("cells", (96, 128), "uint16")
    for t in range(3):
        acquisition.write_raw(t, (clean_frame(t) + 100).astype(np.uint16))
    token = "a-long-random-token-for-the-browser"
    status = {"model_version": None, "waiting_for_model": True, "backlog": 3}
    server = ViewerServer(
        store,
        "0.0.0.0:0",
        status=lambda: status,
        poll_seconds=0.1,
        token=token,
        max_streams=1,
        max_connections=16,
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}/"
    try:
        browser.get(base)  # no token: refused, nothing of the store shown
        assert "viewer.token" in browser.find_element("tag name", "body").text
        browser.get(f"{base}?token={token}")  # the link: a cookie, and the token leaves the URL
        wait_for(lambda: browser.current_url == base, what="the token to leave the address bar")
        badge = browser.find_element("id", "connection")
        wait_for(lambda: badge.text == "live", what="the event stream with the cookie")
        wait_for(lambda: browser.execute_script(IMAGE_STATS_JS, "raw-image"), what="the raw frame")
        # A second tab past viewer.max_streams: refused (503), said so, retried later.
        browser.switch_to.new_window("tab")
        browser.get(base)
        badge = browser.find_element("id", "connection")
        wait_for(lambda: badge.text == "server busy, retrying…", what="the busy badge")
    finally:
        server.stop()
        store.close()


def test_header_shows_the_inference_device_and_the_unused_gpu_warning(
    tmp_path: Path, browser
) -> None:
    import torch

    from pn2v_live.core.device import describe_device, gpu_advice, torch_build

    store = Store(tmp_path / "store")
    cpu = describe_device(torch.device("cpu"))
    warning = gpu_advice("/proc/driver/nvidia/version", torch.__version__, None)
    device = {"inference": cpu, "training": cpu, "torch": torch_build(), "warning": None}

    def status() -> dict:  # a fresh dict each time, as the daemon's: changes are pushed
        return {"model_version": None, "waiting_for_model": True, "device": dict(device)}

    server = ViewerServer(store, "127.0.0.1:0", status=status, poll_seconds=0.1)
    server.start()
    try:
        browser.get(server.url)
        info = browser.find_element("id", "device-info")
        wait_for(lambda: info.is_displayed(), what="the device in the header")
        assert info.text == f"inference on {cpu}"
        assert info.get_attribute("title") == f"training on {cpu}; {torch_build()}"
        assert not browser.find_element("id", "device-warning").is_displayed()
        device["warning"] = warning  # the next status event carries it
        badge = browser.find_element("id", "device-warning")
        wait_for(lambda: badge.is_displayed(), what="the unused-GPU badge")
        assert badge.text == "GPU unused" and badge.get_attribute("title") == warning
    finally:
        server.stop()
        store.close()
