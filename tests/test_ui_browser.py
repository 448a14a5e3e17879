"""`anytext2-lcm ui` in a real browser: the command is started on a free localhost port (tiny model, a student LoRA
made here), and headless Chromium (the OS packages ``chromium`` + ``chromium-driver``, driven by Selenium; nothing
downloads a browser) fills the prompt, uploads a position mask, draws a second region on the canvas, generates,
and checks that a real image comes back; then a bad input, the compare view, and a font mimicked from a brushed
photo with a style LoRA (the original demo's "Mimic From Image" and "LoRA Path and Ratio").

Artifacts: ``test-artifacts/ui_screenshot.png`` (after the generation), ``test-artifacts/ui_compare.png``,
``test-artifacts/ui_mimic_style.png`` and ``test-artifacts/ui_browser_timing.json`` (server start and click-to-image
seconds).

Skipped, with the reason, only when the OS packages are missing (``make browser`` installs them).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("ANYTEXT2_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ANYTEXT2_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1800")
PROMPT = 'a shop sign that says "Hello" and "World"'
SIZE = 256  # the UI's default image size on the CPU
GENERATE_LIMIT_S = 30.0

if not os.path.isfile(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: the OS package 'chromium' is not installed (`make browser` or "
                "`apt-get install chromium chromium-driver`)", allow_module_level=True)
if not os.path.isfile(CHROMEDRIVER):
    pytest.skip(f"{CHROMEDRIVER} not found: the OS package 'chromium-driver' is not installed (`make browser` or "
                "`apt-get install chromium-driver`)", allow_module_level=True)

# Python packages are part of the test extra: a missing one is an error (run `make setup`), not a skip.
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

TIMINGS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy
    with opener.open(url, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A student LoRA for the tiny model (random, non-zero lora_B), as the distillation would save it."""
    from test_community import save_random_student

    from anytext2_lcm.factory import build_model

    return save_random_student(build_model("tiny"), tmp_path_factory.mktemp("ui") / "adapter", seed=0)


@pytest.fixture(scope="module")
def server(adapter):
    """``anytext2-lcm ui --model tiny --lora ADAPTER --port N`` in a subprocess; yields its URL."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "anytext2_lcm", "ui", "--model", "tiny", "--lora", str(adapter),
           "--host", "127.0.0.1", "--port", str(port), "--size", str(SIZE)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "running on http" in line and not url:
                url.append(line.split("running on ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(180)
        if not url:
            pytest.fail(f"`anytext2-lcm ui` did not start (exit {proc.poll()}):\n" + "\n".join(lines[-40:]))
        TIMINGS["server_start_s"] = round(time.perf_counter() - t0, 2)
        print(f"\nanytext2-lcm ui started in {TIMINGS['server_start_s']:.1f} s at {url[0]}")
        yield url[0]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module", autouse=True)
def write_timings():
    yield
    if TIMINGS:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "ui_browser_timing.json").write_text(json.dumps(TIMINGS, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Page helpers
# ---------------------------------------------------------------------------------------------------------------


def open_page(d, url):
    t0 = time.perf_counter()
    d.get(url)
    WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    TIMINGS.setdefault("first_page_load_s", round(time.perf_counter() - t0, 2))


def error_toasts(d) -> list[str]:
    found = d.find_elements(By.CSS_SELECTOR, '.toast-body.error [data-testid="toast-text"]')
    return [t for t in ((e.get_attribute("textContent") or "").strip() for e in found) if t]


def set_prompt(d, text):
    ta = d.find_element(By.CSS_SELECTOR, "#prompt textarea")
    ta.clear()
    ta.send_keys(text)
    WebDriverWait(d, 10).until(lambda d: ta.get_attribute("value") == text)


def upload_mask(d, path: Path):
    d.find_element(By.CSS_SELECTOR, "#mask_upload input[type=file]").send_keys(str(path))
    WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#mask_upload img"))


def draw_stroke(d, y: int, x0: int, x1: int, editor: str = "#positions_canvas"):
    """Drag the brush across an image editor's canvas (offsets in CSS pixels from the canvas centre)."""
    canvas = [c for c in d.find_elements(By.CSS_SELECTOR, f"{editor} canvas") if c.is_displayed()][0]
    chain = ActionChains(d).move_to_element_with_offset(canvas, x0, y).click_and_hold()
    for x in range(x0, x1 + 1, 10):
        chain.move_to_element_with_offset(canvas, x, y)
    chain.release().perform()


def click_label(d, container: str, text: str):
    for label in d.find_elements(By.CSS_SELECTOR, f"{container} label"):
        if label.text.strip() == text:
            label.click()
            return
    raise AssertionError(f"no option {text!r} in {container}")


def wait_images(d, selector: str, count: int, timeout: float):
    """Wait for ``count`` loaded images under ``selector``; fail with the UI's error message if one appears."""
    def done(d):
        errs = error_toasts(d)
        if errs:
            return ("error", errs)
        imgs = [i for i in d.find_elements(By.CSS_SELECTOR, f"{selector} img")
                if i.get_attribute("src") and d.execute_script("return arguments[0].complete && "
                                                               "arguments[0].naturalWidth", i)]
        return imgs if len(imgs) >= count else False

    try:
        out = WebDriverWait(d, timeout, poll_frequency=0.1).until(done)
    except TimeoutException:
        d.save_screenshot(str(ARTIFACTS / "ui_timeout.png"))
        raise
    if isinstance(out, tuple):
        d.save_screenshot(str(ARTIFACTS / "ui_error.png"))
        pytest.fail(f"the UI reported an error: {out[1]}")
    return out


def decoded(img_el) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(_fetch(img_el.get_attribute("src")))).convert("RGB"))


def mask_file(tmp_path: Path, *boxes) -> Path:
    from PIL import Image

    m = np.zeros((SIZE, SIZE), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(m).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_generate_from_the_browser(server, browser, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    d = browser
    open_page(d, server)
    set_prompt(d, PROMPT)
    upload_mask(d, mask_file(tmp_path, (30, 30, 226, 90)))  # line 1: the uploaded region at the top
    draw_stroke(d, y=70, x0=-80, x1=80)  # line 2: a region drawn across the lower half of the canvas
    t0 = time.perf_counter()
    d.find_element(By.CSS_SELECTOR, "#generate_btn").click()
    imgs = wait_images(d, "#result_gallery", 1, timeout=120)
    wall = time.perf_counter() - t0
    TIMINGS["generate_click_to_image_s"] = round(wall, 2)
    device = "GPU" if " · cuda" in d.find_element(By.TAG_NAME, "body").text else "CPU"
    print(f"\ngenerate (teacher, DDIM 20 steps + CFG, {SIZE}x{SIZE}, tiny model, {device}): {wall:.2f} s from the "
          "click to the image")

    img = decoded(imgs[0])
    assert img.shape == (SIZE, SIZE, 3)
    assert img.std() > 1.0 and len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # a real picture, not a blank
    info = d.find_element(By.CSS_SELECTOR, "#result_info").text
    assert 'lines: "Hello", "World"' in info  # both positions were used: the uploaded one and the drawn one
    assert "teacher" in info and "DDIM 20 steps" in info and " s (" in info
    captions = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#result_gallery .caption-label")]
    glyphs = wait_images(d, "#glyph_preview", 1, timeout=20)
    g = decoded(glyphs[0])
    assert g[30:90].max() == 255 and g[150:220].max() == 255  # glyphs rendered into both regions
    shot = ARTIFACTS / "ui_screenshot.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert not error_toasts(d)
    assert any(c.startswith("seed 0 · ") and c.endswith(" s") for c in captions), captions
    assert wall < GENERATE_LIMIT_S, f"generation took {wall:.1f} s from the click (limit {GENERATE_LIMIT_S} s)"


def test_bad_input_shows_a_readable_message(server, browser):
    d = browser
    open_page(d, server)
    set_prompt(d, 'three lines "a" "b" "c"')
    d.find_element(By.CSS_SELECTOR, "#generate_btn").click()  # nothing drawn, nothing uploaded
    msgs = WebDriverWait(d, 30, poll_frequency=0.1).until(lambda d: error_toasts(d))
    assert any("The position mask is empty" in m and "3 quoted lines" in m for m in msgs), msgs
    assert "Traceback" not in d.page_source


def test_compare_teacher_and_student_from_the_browser(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    set_prompt(d, PROMPT)
    upload_mask(d, mask_file(tmp_path, (30, 30, 226, 90), (40, 150, 216, 210)))
    click_label(d, "#model_mode", "teacher + student LoRA")
    WebDriverWait(d, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#sampler input").get_attribute("value") == "lcm")
    assert d.find_element(By.CSS_SELECTOR, "#steps input[type=number]").get_attribute("value") == "4"
    t0 = time.perf_counter()
    d.find_element(By.CSS_SELECTOR, "#compare_btn").click()
    for tab in d.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if tab.text.strip() == "Compare":
            tab.click()
    imgs = wait_images(d, "#compare_gallery", 5, timeout=180)
    TIMINGS["compare_click_to_images_s"] = round(time.perf_counter() - t0, 2)
    shapes = {decoded(i).shape for i in imgs[:5]}
    assert shapes == {(SIZE, SIZE, 3)}
    table = d.find_element(By.CSS_SELECTOR, "#compare_info").text
    for label in ("teacher · DDIM 20 steps · CFG 7.5", "LCM 1 step", "LCM 2 steps", "LCM 4 steps", "LCM 8 steps"):
        assert label in table, table
    assert table.count("teacher + student LoRA") == 4
    d.save_screenshot(str(ARTIFACTS / "ui_compare.png"))


@pytest.fixture(scope="module")
def style_file(tmp_path_factory) -> Path:
    """A kohya style LoRA (LoRA and LoCon modules, UNet and text encoder) for the tiny model."""
    from test_community import fresh, write_style

    path, _ = write_style(fresh(), tmp_path_factory.mktemp("style") / "style.safetensors")
    return path


def photo_file(tmp_path: Path) -> Path:
    """A photo with dark text on a light background: the font to mimic."""
    from PIL import Image, ImageDraw, ImageFont

    from anytext2_lcm.data.fonts import find_default_font

    f = find_default_font()
    img = Image.new("RGB", (256, 128), (230, 220, 200))
    ImageDraw.Draw(img).text((40, 30), "Hello", font=ImageFont.truetype(f.path, 48, index=f.index),
                             fill=(20, 30, 40))
    path = tmp_path / "photo.png"
    img.save(path)
    return path


def open_accordion(d, elem_id: str, inside: str):
    if not d.find_elements(By.CSS_SELECTOR, inside):
        d.find_element(By.CSS_SELECTOR, f"#{elem_id} button.label-wrap").click()
    WebDriverWait(d, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, inside))


def choose(d, dropdown: str, value: str):
    d.find_element(By.CSS_SELECTOR, f"{dropdown} input").click()
    option = WebDriverWait(d, 10).until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]")
                                                   if o.get_attribute("aria-label") == value])
    option[0].click()
    WebDriverWait(d, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, f"{dropdown} input")
                               .get_attribute("value") == value)


def test_mimic_font_and_style_lora_from_the_browser(server, browser, tmp_path, style_file):
    d = browser
    open_page(d, server)
    set_prompt(d, 'a shop sign that says "Hello"')
    upload_mask(d, mask_file(tmp_path, (30, 30, 226, 120)))
    open_accordion(d, "line_styles", "#font_1 input")
    choose(d, "#font_1", "mimic from image")  # the line's image editor appears, as in the original demo
    WebDriverWait(d, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, "#mimic_1").is_displayed())
    d.find_element(By.CSS_SELECTOR, "#mimic_1 input[type=file]").send_keys(str(photo_file(tmp_path)))
    WebDriverWait(d, 30).until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#mimic_1 canvas")
                                          if c.is_displayed()])
    brush = d.find_elements(By.CSS_SELECTOR, '#mimic_1 button[aria-label="Brush"]')
    if brush:
        brush[0].click()
    for y in (-20, 0, 20):  # brush over the word
        draw_stroke(d, y=y, x0=-140, x1=60, editor="#mimic_1")
    open_accordion(d, "own_models", "#style_loras textarea")
    box = d.find_element(By.CSS_SELECTOR, "#style_loras textarea")
    box.send_keys(f"{style_file}:0.8")
    WebDriverWait(d, 10).until(lambda d: box.get_attribute("value") == f"{style_file}:0.8")
    d.find_element(By.CSS_SELECTOR, "#generate_btn").click()
    imgs = wait_images(d, "#result_gallery", 1, timeout=120)
    assert decoded(imgs[0]).shape == (SIZE, SIZE, 3)
    info = d.find_element(By.CSS_SELECTOR, "#result_info").text
    assert f"style {style_file} × 0.8" in " ".join(info.replace("`", "").split()), info
    debug = wait_images(d, "#debug_gallery", 4, timeout=30)
    captions = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#debug_gallery .caption-label")]
    assert "mimic_line1" in captions, captions
    crop = decoded(debug[captions.index("mimic_line1")])
    assert crop.max() == 255 and 0.02 < (crop[..., 0] > 127).mean() < 0.5  # the word's strokes, cut upright
    assert "style" in d.find_element(By.TAG_NAME, "body").text and not error_toasts(d)
    d.save_screenshot(str(ARTIFACTS / "ui_mimic_style.png"))

