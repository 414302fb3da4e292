"""docs/draw.py in a real browser:  python -m pytest docs/test_draw.py

It starts the page with the trained model in DRAW_MODEL_DIR (default: outputs), draws digits on
it with the mouse in headless Chromium, and checks what the page reads. It needs Gradio and
Playwright (pip install -r docs/draw-requirements.txt) and a Chromium: Debian's /usr/bin/chromium
(apt-get install chromium), or else Playwright's own (python -m playwright install chromium).
Without any of these, or without a model, it is skipped; with DRAW_TEST_REQUIRED=1, as in CI, it
fails instead. DRAW_SCREENSHOT=docs/draw.png saves a picture of the page with a digit drawn.
"""

import importlib.util
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / os.environ.get("DRAW_MODEL_DIR", "outputs")  # an absolute path stays as is
PROMPT = "Draw a digit in the box"  # what docs/draw.py shows on an empty canvas
REQUESTS = []  # every address that the page asks for
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def arc(cx, cy, rx, ry, start, end, points=10):
    """Points along an ellipse from angle start to end, in degrees: clockwise, as y is down."""
    return [(cx + rx * math.cos(math.radians(start + (end - start) * i / points)),
             cy + ry * math.sin(math.radians(start + (end - start) * i / points)))
            for i in range(points + 1)]


# One pen stroke for each digit, as points in a unit square (y downwards): a student's digits,
# which the default model reads surely once they are prepared.
STROKES = {0: arc(0.5, 0.5, 0.27, 0.4, 270, 630),
           1: [(0.42, 0.2), (0.52, 0.1), (0.52, 0.9)],
           3: arc(0.5, 0.3, 0.22, 0.2, 200, 450) + arc(0.5, 0.7, 0.24, 0.2, 270, 520),
           7: [(0.2, 0.1), (0.8, 0.1), (0.42, 0.9)]}


def unavailable(reason):
    """Skip, or fail where DRAW_TEST_REQUIRED=1 says that this test must run."""
    if os.environ.get("DRAW_TEST_REQUIRED") == "1":
        pytest.fail(f"{reason} (and DRAW_TEST_REQUIRED=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, once Gradio, Playwright and a model are there too."""
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            unavailable(f"{module} is not installed: pip install -r docs/draw-requirements.txt")
    if not (MODEL_DIR / "model.pt").is_file():
        unavailable(f"no model.pt in {MODEL_DIR}: run python mnist.py, or set DRAW_MODEL_DIR")
    from playwright.sync_api import Error, sync_playwright
    with sync_playwright() as playwright:
        debian = Path("/usr/bin/chromium")
        try:
            browser = playwright.chromium.launch(
                executable_path=debian if debian.exists() else None, args=BROWSER_FLAGS)
        except Error as error:
            unavailable(f"no Chromium to drive ({str(error).splitlines()[0]}): apt-get install "
                        "chromium, or python -m playwright install chromium")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def address(browser, tmp_path_factory):
    """Start `python docs/draw.py` on a free port; yield the address that it prints."""
    with socket.socket() as probe:  # a port that is free now (Gradio takes the next if not)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("draw") / "draw.log"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, ROOT / "docs" / "draw.py", "--output-dir",
                                   MODEL_DIR], stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"the page is at (http\S+)", log.read_text())):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docs/draw.py did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield found[1]
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def page(browser, address):
    """The page, opened once for all the tests; REQUESTS records every address it asks for."""
    page = browser.new_page(viewport={"width": 1280, "height": 720}, locale="en-US")
    page.on("request", lambda request: REQUESTS.append(request.url))
    page.set_default_timeout(20_000)
    page.goto(address)
    page.wait_for_selector("#canvas .empty", state="detached")  # the brush is chosen
    return page


def draw(page, points, height=0.7, centre=(0.5, 0.5)):
    """Draw one stroke with the mouse: height is a fraction of the canvas's side."""
    box = page.locator("#canvas canvas").first.bounding_box()
    side = min(box["width"], box["height"]) - 60  # the canvas is zoomed to fit, in 30 px margins
    left = box["x"] + box["width"] / 2 + (centre[0] - 0.5 - height / 2) * side
    top = box["y"] + box["height"] / 2 + (centre[1] - 0.5 - height / 2) * side
    page.mouse.move(left + points[0][0] * height * side, top + points[0][1] * height * side)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(left + x * height * side, top + y * height * side)
    page.mouse.up()


def read_and_clear(page, digit, screenshot=False, **where):
    """Draw the digit, check everything the page shows of it, then clear the canvas."""
    from playwright.sync_api import expect
    answer = page.locator("#answer textarea")
    draw(page, STROKES[digit], **where)
    start = time.monotonic()
    expect(answer).to_have_value(re.compile(rf"^{digit} \(\d+\.\d%\)$"), timeout=10_000)
    seconds = time.monotonic() - start  # about 1 on a 2-core machine
    print(f"drew {digit} {where}: read {answer.input_value()} after {seconds:.1f} s")
    assert seconds < 3, f"the page took {seconds:.1f} s to read the digit"
    bars = page.locator("#chart [data-testid$='-confidence-set']")
    expect(bars).to_have_count(10)
    expect(bars.first).to_have_attribute("data-testid", f"{digit}-confidence-set")  # the top bar
    seen = page.locator("#seen img")  # the 28 x 28 digit, drawn 10 times as large
    expect(seen).to_have_js_property("naturalWidth", 280)
    if screenshot and os.environ.get("DRAW_SCREENSHOT"):
        page.screenshot(path=ROOT / os.environ["DRAW_SCREENSHOT"])
    page.locator("#canvas button[aria-label='Clear canvas']").click()  # the bin above the canvas
    expect(answer).to_have_value(PROMPT)
    expect(seen).to_have_count(0)
    page.wait_for_selector("#canvas .empty", state="detached")  # the brush is chosen again


def test_an_empty_canvas_asks_for_a_digit(page):
    assert page.locator("#answer textarea").input_value() == PROMPT
    assert page.locator("#seen img").count() == 0
    assert page.locator("#chart [data-testid$='-confidence-set']").count() == 0
    # The canvas fits in its frame: a layout that moves after the canvas starts can leave it
    # wider than its frame, and partly hidden.
    frame = page.locator("#canvas").bounding_box()
    canvas = page.locator("#canvas canvas").first.bounding_box()
    assert canvas["x"] + canvas["width"] <= frame["x"] + frame["width"]


def test_reads_digits_drawn_with_the_mouse(page):
    for digit in (1, 7, 0, 3):
        read_and_clear(page, digit, screenshot=digit == 3)


def test_reads_a_small_digit_far_from_the_centre(page):
    # prepare_digit scales and centres the ink, as MNIST's digits were, so this reads as well.
    read_and_clear(page, 7, height=0.3, centre=(0.25, 0.3))


def test_the_page_fetches_nothing_from_the_internet(page):
    hosts = {urlsplit(url).hostname for url in REQUESTS if url.startswith("http")}
    print(f"{len(REQUESTS)} requests, to {sorted(hosts)}")
    assert hosts and hosts <= {"127.0.0.1", "localhost"}, hosts
