"""A screenshot of the sketch pad on the synthetic benchmark: ``zsbir serve`` on 127.0.0.1 over the unseen
classes' photos (see ``serve_fixture.py``), Debian's chromium (Playwright) drawing a sketch with pointer
events: a circle with four spokes and a handle, a shape of the unseen class ``circle-4spokes-plain-handle``.

    python benchmarks/screenshot_serve.py [--work /tmp/zsbir-serve-bench] [--out benchmarks/results/serve_pad.png]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zsbir serve exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("zsbir serve did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zsbir-serve-bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_pad.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    fx = serve_fixture.build(args.work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    zsbir = str(Path(sys.executable).parent / "zsbir")
    cmd = [zsbir, "serve", "--gallery", str(fx["gallery"]), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        wait_ready(url, proc)
        chromium = os.environ.get("ZSBIR_CHROMIUM") or shutil.which("chromium")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('gallery').textContent.includes('photos')")
            box = page.locator("#pad").bounding_box()
            assert box is not None

            def stroke(points: list[tuple[float, float]]) -> None:
                xy = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in points]
                page.mouse.move(*xy[0])
                page.mouse.down()
                for q in xy[1:]:
                    page.mouse.move(*q, steps=2)
                page.mouse.up()

            page.eval_on_selector("#size", "e => { e.value = '8'; e.dispatchEvent(new Event('input')); }")
            cx, cy, r = 0.5, 0.5, 0.26
            stroke(
                [(cx + r * math.cos(t / 40 * 2 * math.pi), cy + r * math.sin(t / 40 * 2 * math.pi)) for t in range(41)]
            )
            for a in (45, 135, 225, 315):  # four spokes from the rim outwards
                t = math.radians(a)
                stroke(
                    [
                        (cx + r * math.cos(t), cy + r * math.sin(t)),
                        (cx + 1.45 * r * math.cos(t), cy + 1.45 * r * math.sin(t)),
                    ]
                )
            stroke([(cx, cy + r), (cx, cy + r + 0.16)])  # the handle
            page.wait_for_function(
                "Number(document.body.dataset.searches || 0) > 0 && document.body.dataset.pending === '0'"
            )
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            print(page.inner_text("#status"))
            print(" ".join(page.eval_on_selector_all("#results .path", "els => els.map(e => e.textContent)")[:10]))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
