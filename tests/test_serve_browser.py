"""The sketch pad in a real browser: Debian's chromium driven by Playwright loads ``GET /`` from a uvicorn
server on 127.0.0.1, draws strokes with pointer events, and checks that results appear and change; it saves
a screenshot (``$ZSBIR_SCREENSHOT_DIR``, else the test's temporary folder).

Skipped, saying why, where chromium (``apt-get install chromium``) or Playwright is missing; Playwright's own
browser download is never used."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")

import uvicorn
from indexer_support import write_photos
from playwright import sync_api as playwright_api
from tiny_bundle import make_bundle

from zsbir_infer.encoder import Encoder
from zsbir_infer.indexer import index_folder
from zsbir_infer.serve.app import ServeConfig, create_app

CHROMIUM = os.environ.get("ZSBIR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does it)"
)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (a free port), stopped by :meth:`stop`."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def draw(page: Any, points: list[tuple[float, float]]) -> None:
    """One stroke on the pad through real pointer events (the browser's own mouse input)."""
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=3)
    page.mouse.up()


def wait_searches(page: Any, after: int, timeout_ms: int = 20_000) -> int:
    """Wait until a search newer than number ``after`` has been shown and no search is pending any more."""
    page.wait_for_function(
        f"Number(document.body.dataset.searches || 0) > {after} && document.body.dataset.pending === '0'",
        timeout=timeout_ms,
    )
    return int(page.evaluate("Number(document.body.dataset.searches || 0)"))


def results(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#results a", "els => els.map(e => e.textContent)"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("browser")
    bundle = make_bundle(base / "bundle")[0]
    write_photos(base / "photos", 40, size=(48, 48))
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle))
    enc.close()
    srv = ServerThread(create_app(base / ".zsbir", backend="ort-cpu", config=ServeConfig()))
    url = srv.start()
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_pad_draw_results_appear_and_change(server: str, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) else external.append(r.url))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('gallery').textContent.includes('40 photos')")
    assert page.locator("#results a").count() == 0

    draw(page, [(0.2, 0.2), (0.5, 0.3), (0.8, 0.2), (0.7, 0.7)])
    n = wait_searches(page, 0)
    page.wait_for_function("document.querySelectorAll('#results a').length === 24")
    first = results(page)
    status = page.inner_text("#status")
    assert "24 results in" in status and "ms on the server" in status
    # Thumbnails load (natural size > 0) and links open the photo by id.
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    href = page.get_attribute("#results a", "href")
    assert href is not None and href.startswith("/v1/photos/")

    # A thick brush (the range input, as a user sets it): a big change of the sketch.
    page.eval_on_selector("#size", "e => { e.value = '40'; e.dispatchEvent(new Event('input')); }")
    draw(page, [(0.1, 0.9), (0.9, 0.1)])
    draw(page, [(0.1, 0.5), (0.9, 0.55), (0.5, 0.95)])
    n2 = wait_searches(page, n)
    second = results(page)
    assert n2 > n and second != first, "the results did not change after more strokes"

    # Undo and clear are buttons (keyboard: Ctrl+Z / Escape).
    page.click("#undo")
    wait_searches(page, n2)
    page.focus("#pad")
    page.keyboard.press("Escape")
    page.wait_for_function("document.querySelectorAll('#results a').length === 0")

    # Keyboard drawing: arrow keys on the focused pad draw a stroke and search.
    n3 = int(page.evaluate("Number(document.body.dataset.searches || 0)"))
    for key in ["ArrowRight"] * 6 + ["ArrowDown"] * 6:
        page.keyboard.press(key)
    wait_searches(page, n3)
    page.wait_for_function("document.querySelectorAll('#results a').length === 24")

    shots = Path(os.environ.get("ZSBIR_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "serve_pad_test.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000
    assert not errors, errors
    assert not external, f"the page fetched external resources: {external}"
    page.close()


def test_pad_on_a_phone(server: str, browser: Any, tmp_path: Path) -> None:
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = ctx.new_page()
    page.goto(server + "/")
    box = page.locator("#pad").bounding_box()
    assert box is not None and box["width"] <= 390 and box["width"] > 300  # the pad fills the phone's width
    scroll_w = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_w <= 390, "the page scrolls sideways on a phone"
    # A touch stroke: pointer events of type 'touch' through CDP.
    cdp = ctx.new_cdp_session(page)
    pts = [(box["x"] + box["width"] * f, box["y"] + box["height"] * (0.3 + 0.4 * f)) for f in (0.1, 0.3, 0.5, 0.7)]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": pts[0][0], "y": pts[0][1]}]})
    for x, y in pts[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y, "force": 0.8}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    wait_searches(page, 0)
    page.wait_for_function("document.querySelectorAll('#results a').length === 24")
    page.screenshot(path=str(tmp_path / "serve_pad_phone.png"), full_page=True)
    ctx.close()


def test_upload_searches_with_the_file(server: str, browser: Any, tmp_path: Path) -> None:
    from indexer_support import write_sketch

    sketch = write_sketch(tmp_path / "upload.png")
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(sketch))
    wait_searches(page, 0)
    page.wait_for_function("document.querySelectorAll('#results a').length === 24")
    page.close()


def test_pen_pressure_changes_the_line(server: str, browser: Any) -> None:
    """A pen (CDP pointerType 'pen' with force): a firm stroke is drawn wider than a light one."""
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(server + "/")
    cdp = page.context.new_cdp_session(page)
    box = page.locator("#pad").bounding_box()

    def pen_stroke(y: float, force: float) -> None:
        xs = [0.15 + 0.1 * i for i in range(8)]
        pts = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x in xs]
        base = {"pointerType": "pen", "button": "left"}
        cdp.send(
            "Input.dispatchMouseEvent",
            {**base, "type": "mousePressed", "x": pts[0][0], "y": pts[0][1], "force": force, "clickCount": 1},
        )
        for x, yy in pts[1:]:
            cdp.send(
                "Input.dispatchMouseEvent",
                {**base, "type": "mouseMoved", "x": x, "y": yy, "force": force, "buttons": 1},
            )
        cdp.send(
            "Input.dispatchMouseEvent",
            {**base, "type": "mouseReleased", "x": pts[-1][0], "y": pts[-1][1], "force": force, "clickCount": 1},
        )

    pen_stroke(0.25, 1.0)
    pen_stroke(0.75, 0.1)
    wait_searches(page, 0)
    # Dark pixels in each half of the canvas: the firm stroke (top) covers more.
    dark = page.evaluate(
        """() => {
          const c = document.getElementById('pad');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let top = 0, bottom = 0;
          for (let i = 0; i < d.length; i += 4) {
            if (d[i] < 128) { if (i / 4 < c.width * c.height / 2) top++; else bottom++; }
          }
          return [top, bottom];
        }"""
    )
    assert dark[1] > 0 and dark[0] > 3 * dark[1], dark
    page.close()


def test_offline_api_docs_render(server: str, browser: Any) -> None:
    page = browser.new_page()
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) else external.append(r.url))
    page.goto(server + "/docs")
    page.wait_for_function("document.querySelectorAll('.op').length >= 8")
    assert "/v1/search" in page.inner_text("#ops") and "SearchResponse" in page.inner_text("#schemas")
    assert not external
    page.close()
