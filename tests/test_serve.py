"""zsbir serve: the HTTP API (status codes, schemas, limits, traversal attempts, auth, micro-batching, a
re-index picked up without a restart) on galleries built with the tiny test bundle."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("starlette")
pytest.importorskip("httpx")

from indexer_support import write_photos, write_sketch
from starlette.testclient import TestClient
from tiny_bundle import make_bundle

from zsbir_infer import Retriever
from zsbir_infer.encoder import Encoder
from zsbir_infer.indexer import index_folder
from zsbir_infer.serve import is_loopback
from zsbir_infer.serve.app import ServeConfig, create_app
from zsbir_infer.serve.batching import MicroBatcher


def _index(base: Path, bundle: Path) -> None:
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle))
    finally:
        enc.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("serve")
    bundle = make_bundle(base / "bundle")[0]
    rels = write_photos(base / "photos", 30, sub="x") + write_photos(base / "photos", 10, seed=1, sub="y")
    sketch = write_sketch(base / "s.png").read_bytes()
    _index(base, bundle)
    return {"base": base, "bundle": bundle, "rels": rels, "sketch": sketch}


@pytest.fixture(scope="module")
def client(setup: dict[str, Any]) -> Any:
    app = create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=ServeConfig(max_bytes=200_000))
    with TestClient(app) as c:
        yield c


def _png(size: tuple[int, int] = (40, 40), color: int = 255) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ search


def test_search_multipart_matches_library(client: TestClient, setup: dict[str, Any]) -> None:
    resp = client.post("/v1/search", files={"image": ("s.png", setup["sketch"], "image/png")}, data={"k": "7"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert set(doc) >= {"hits", "model", "took_ms"} and doc["k"] == 7 and doc["took_ms"] >= 0
    assert [h["rank"] for h in doc["hits"]] == list(range(1, 8))
    for h in doc["hits"]:
        assert set(h) >= {"rank", "score", "id", "path", "thumbnail"}
        assert h["thumbnail"] == f"/v1/photos/{h['id']}/thumbnail" and not h["path"].startswith("/")
        assert h["path"] in setup["rels"]
    with Retriever.open(setup["base"] / ".zsbir", backend="ort-cpu") as r:
        want = r.search(Image.open(io.BytesIO(setup["sketch"])), k=7)[0]
        assert doc["model"] == r.fingerprint
    assert [h["path"] for h in doc["hits"]] == [h.relpath for h in want]
    np.testing.assert_allclose([h["score"] for h in doc["hits"]], [h.score for h in want], atol=1e-5)


def test_search_json_image_and_embedding_agree(client: TestClient, setup: dict[str, Any]) -> None:
    b64 = base64.b64encode(setup["sketch"]).decode()
    a = client.post("/v1/search", json={"image": b64, "k": 5})
    b = client.post("/v1/search?k=5", json={"image": "data:image/png;base64," + b64})
    assert a.status_code == b.status_code == 200
    assert a.json()["hits"] == b.json()["hits"]
    with Retriever.open(setup["base"] / ".zsbir", backend="ort-cpu") as r:
        emb = r.embed(Image.open(io.BytesIO(setup["sketch"])))[0]
    c = client.post("/v1/search", json={"embedding": [float(x) for x in emb], "k": 5})
    assert c.status_code == 200
    assert [h["id"] for h in c.json()["hits"]] == [h["id"] for h in a.json()["hits"]]
    d = client.post("/v1/search", json={"image": b64, "domain": "photo"})
    assert d.status_code == 200 and len(d.json()["hits"]) == 10 and d.json()["domain"] == "photo"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"files": {"image": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "not-an-image"),
        ({"files": {"image": ("a.png", b"", "image/png")}}, 400, "not-an-image"),
        ({"files": {"image": ("a.png", _png()[:30], "image/png")}}, 400, "not-an-image"),
        ({"files": {"other": ("a.png", _png(), "image/png")}}, 400, "no-image"),
        ({"json": {"image": "!!!not base64!!!"}}, 400, "not-an-image"),
        ({"json": {"image": 5}}, 400, "not-an-image"),
        ({"json": {}}, 400, "no-query"),
        ({"json": [1, 2]}, 400, "bad-json"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad-json"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported-media-type"),
        ({"json": {"embedding": [1.0, 2.0]}}, 422, "bad-embedding"),
        ({"json": {"embedding": [0.0] * 6}}, 422, "bad-embedding"),
        ({"json": {"embedding": ["a"] * 6}}, 422, "bad-embedding"),
        ({"json": {"embedding": [1.0] * 6, "k": 0}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "k": -3}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "k": "ten"}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "k": 1.5}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "k": True}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "k": 10**9}}, 422, "bad-k"),
        ({"json": {"embedding": [1.0] * 6, "domain": "video"}}, 422, "bad-domain"),
    ],
)
def test_bad_input_is_a_json_4xx(client: TestClient, kwargs: dict[str, Any], status: int, code: str) -> None:
    resp = client.post("/v1/search", **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"]


def test_nan_embedding_refused(client: TestClient) -> None:
    body = '{"embedding": [NaN, 1, 1, 1, 1, 1]}'  # Python's json accepts NaN; the server must refuse it
    resp = client.post("/v1/search", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "bad-embedding"


def test_size_and_pixel_limits(client: TestClient, tmp_path: Path) -> None:
    big = os.urandom(300_000)  # over the fixture's 200 kB body limit
    resp = client.post("/v1/search", files={"image": ("big.png", big, "image/png")})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too-large"
    # A bomb: few bytes, many pixels (over the default 25 MP).
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    resp = client.post("/v1/search", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too-many-pixels"

    # A body without Content-Length (chunked) is counted as it streams in.
    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 30_000

    resp = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413


# ------------------------------------------------------------------------------------------ photos


def test_photos_by_id_and_thumbnails(client: TestClient, setup: dict[str, Any]) -> None:
    hits = client.post("/v1/search", files={"image": ("s.png", setup["sketch"], "image/png")}).json()["hits"]
    h = hits[0]
    photo = client.get(f"/v1/photos/{h['id']}")
    assert photo.status_code == 200 and photo.headers["content-type"].startswith("image/")
    assert photo.content == (setup["base"] / "photos" / h["path"]).read_bytes()
    thumb = client.get(h["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    # An id no search returned yet is found too (the catalog is read once per gallery generation).
    with Retriever.open(setup["base"] / ".zsbir", backend="ort-cpu") as r:
        ids = [i for _, i in r.gallery.indexed()]
    unseen = next(i for i in ids if i not in {x["id"] for x in hits})
    assert client.get(f"/v1/photos/{unseen}/thumbnail").status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "/v1/photos/999999",
        "/v1/photos/-1",
        "/v1/photos/../../etc/passwd",
        "/v1/photos/..%2F..%2Fetc%2Fpasswd",
        "/v1/photos/%2e%2e/%2e%2e/etc/passwd",
        "/v1/photos/x/y.jpg",
        "/v1/photos/1/../../../../etc/passwd",
        "/v1/photos/1%2F..%2F..%2Fsecret",
        "/v1/photos//etc/passwd",
        "/v1/photos/0x1",
        "/v1/photos/1.0",
        "/v1/photos/999999/thumbnail",
        "/v1/photos/..%2Fsecret/thumbnail",
    ],
)
def test_traversal_attempts_are_404(client: TestClient, url: str) -> None:
    resp = client.get(url)
    assert resp.status_code == 404, (url, resp.status_code, resp.text[:200])
    assert "error" in resp.json()
    assert b"root:" not in resp.content


def test_symlink_out_of_photo_folder_not_served(tmp_path: Path) -> None:
    base = tmp_path
    bundle = make_bundle(base / "bundle")[0]
    write_photos(base / "photos", 4)
    secret = base / "secret.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(secret)
    os.symlink(secret, base / "photos" / "link.png")
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle), follow_links=True)
    enc.close()
    app = create_app(base / ".zsbir", backend="ort-cpu")
    with TestClient(app) as c:
        hits = c.post("/v1/search", json={"embedding": [1.0] * 6, "k": 10}).json()["hits"]
        link = [h for h in hits if h["path"] == "link.png"]
        assert link, hits
        assert c.get(f"/v1/photos/{link[0]['id']}").status_code == 404
        assert c.get(f"/v1/photos/{link[0]['id']}/thumbnail").status_code == 404
        other = next(h for h in hits if h["path"] != "link.png")
        assert c.get(f"/v1/photos/{other['id']}").status_code == 200


# ------------------------------------------------------------------------------------------ other routes


def test_info_health_ready_metrics_docs(client: TestClient, setup: dict[str, Any]) -> None:
    info = client.get("/v1/info").json()
    assert info["files_indexed"] == 40 and info["dim"] == 6 and info["server"]["max_batch"] == 32
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["photos"] == 40
    client.post("/v1/search", json={"embedding": [1.0] * 6})
    text = client.get("/metrics").text
    for name in (
        "zsbir_http_requests_total",
        "zsbir_http_request_seconds_bucket",
        "zsbir_search_batch_size_bucket",
        "zsbir_gallery_rows 40.0",
    ):
        assert name in text, name
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/search" in spec["paths"]
    for page in ("/", "/docs"):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        # Self-contained: no external scripts, styles, fonts or images.
        assert "http://" not in html.text and "https://" not in html.text and "//cdn" not in html.text
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://evil"}).headers
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not-found"
    assert client.get("/v1/search").status_code == 405


def test_cors_only_when_asked(setup: dict[str, Any]) -> None:
    cfg = ServeConfig(cors_origins=("http://example.test",))
    with TestClient(create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=cfg)) as c:
        resp = c.get("/healthz", headers={"Origin": "http://example.test"})
        assert resp.headers["access-control-allow-origin"] == "http://example.test"
        other = c.get("/healthz", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_auth_on(setup: dict[str, Any]) -> None:
    cfg = ServeConfig(token="s3cret")
    with TestClient(create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=cfg)) as c:
        body = {"embedding": [1.0] * 6}
        for url in ("/v1/info", "/metrics", "/v1/photos/0", "/v1/photos/0/thumbnail", "/openapi.json"):
            resp = c.get(url)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", url
        assert c.post("/v1/search", json=body).status_code == 401
        assert c.post("/v1/search", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/search", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["hits"]
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # public
        assert c.get("/?token=wrong").status_code == 401
        # The browser: /?token= sets an HttpOnly cookie, which then authenticates.
        resp = c.get("/?token=s3cret", follow_redirects=False)
        assert resp.status_code == 303 and "httponly" in resp.headers["set-cookie"].lower()
        assert c.post("/v1/search", json=body).status_code == 200
        assert c.get("/v1/info").status_code == 200


def test_auth_off_by_default(client: TestClient) -> None:
    assert client.get("/v1/info").status_code == 200


def test_loopback_check_and_cli_refuses_public_host_without_token(setup: dict[str, Any]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.com")
    from click.testing import CliRunner

    from zsbir_infer.cli import main

    res = CliRunner().invoke(main, ["serve", "--gallery", str(setup["base"] / ".zsbir"), "--host", "0.0.0.0"])
    assert res.exit_code != 0 and "without --token" in res.output
    res = CliRunner().invoke(main, ["serve", "--gallery", str(setup["base"] / "nothing-here")])
    assert res.exit_code != 0 and "Error" in res.output


# ------------------------------------------------------------------------------------------ re-index


def test_new_photos_picked_up_after_reindex(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")[0]
    write_photos(tmp_path / "photos", 5, sub="a")
    _index(tmp_path, bundle)
    with TestClient(create_app(tmp_path / ".zsbir", backend="ort-cpu")) as c:
        first = c.post("/v1/search", json={"embedding": [1.0] * 6, "k": 50}).json()["hits"]
        assert len(first) == 5
        new = write_photos(tmp_path / "photos", 7, seed=4, sub="b")
        _index(tmp_path, bundle)  # a later `zsbir index`, while the server runs
        after = c.post("/v1/search", json={"embedding": [1.0] * 6, "k": 50}).json()["hits"]
        assert len(after) == 12 and set(new) <= {h["path"] for h in after}
        added = next(h for h in after if h["path"] in new)
        assert c.get(f"/v1/photos/{added['id']}").status_code == 200
        assert c.get("/readyz").json()["photos"] == 12
        assert "zsbir_gallery_rows 12.0" in c.get("/metrics").text
        # Deleted photos disappear too, and their ids stop being served.
        gone = next(h for h in after if h["path"].startswith("a/"))
        (tmp_path / "photos" / gone["path"]).unlink()
        _index(tmp_path, bundle)
        final = c.post("/v1/search", json={"embedding": [1.0] * 6, "k": 50}).json()["hits"]
        assert len(final) == 11 and gone["path"] not in {h["path"] for h in final}
        assert c.get(f"/v1/photos/{gone['id']}").status_code == 404


# ------------------------------------------------------------------------------------------ batching


def test_concurrent_requests_are_batched_and_answered_correctly(setup: dict[str, Any]) -> None:
    cfg = ServeConfig(max_batch=16, max_wait_ms=50)
    app = create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=cfg)
    sketches = [write_sketch(setup["base"] / f"c{i}.png", seed=10 + i).read_bytes() for i in range(12)]
    with Retriever.open(setup["base"] / ".zsbir", backend="ort-cpu") as r:
        want = [[h.id for h in r.search(Image.open(io.BytesIO(s)), k=3 + i % 4)[0]] for i, s in enumerate(sketches)]
    with TestClient(app) as c:
        out: list[Any] = [None] * len(sketches)

        def go(i: int) -> None:
            files = {"image": ("s.png", sketches[i], "image/png")}
            out[i] = c.post("/v1/search", files=files, data={"k": str(3 + i % 4)})

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(sketches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(o.status_code == 200 for o in out)
        assert [[h["id"] for h in o.json()["hits"]] for o in out] == want
        text = c.get("/metrics").text
    count = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("zsbir_search_batch_size_count")
    )
    total = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("zsbir_search_batch_size_sum")
    )
    assert total == 12 and count < 12  # fewer batches than queries: some were embedded together


def test_batcher_isolates_a_failing_query() -> None:
    calls: list[int] = []

    def search(queries: list[Any], k: int, domain: str) -> list[list[Any]]:
        calls.append(len(queries))
        if any(q == "bad" for q in queries):
            raise ValueError("bad query")
        return [[f"{q}-{i}" for i in range(k)] for q in queries]

    async def main() -> list[Any]:
        b = MicroBatcher(search, max_batch=8, max_wait_ms=20)
        for _ in range(3):
            b.expect()
        res = await asyncio.gather(
            b.submit("a", 2, "sketch"), b.submit("bad", 2, "sketch"), b.submit("c", 3, "sketch"), return_exceptions=True
        )
        await b.aclose()
        return list(res)

    res = asyncio.run(main())
    assert res[0] == ["a-0", "a-1"] and res[2] == ["c-0", "c-1", "c-2"]
    assert isinstance(res[1], ValueError)
    assert calls[0] == 3  # tried together first


def test_batching_off_searches_one_by_one(setup: dict[str, Any]) -> None:
    cfg = ServeConfig(max_batch=1)
    with TestClient(create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=cfg)) as c:
        assert c.post("/v1/search", files={"image": ("s.png", setup["sketch"], "image/png")}).status_code == 200
        assert "zsbir_search_batch_size_sum 1.0" in c.get("/metrics").text


def test_serve_does_not_import_torch() -> None:
    code = (
        "import sys, zsbir_infer.serve.app, zsbir_infer.cli.serve; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cli_help_lists_serve() -> None:
    from click.testing import CliRunner

    from zsbir_infer.cli import main

    res = CliRunner().invoke(main, ["serve", "--help"])
    assert res.exit_code == 0
    for opt in ("--gallery", "--model", "--host", "--port", "--device", "--token", "--max-batch", "--max-wait-ms"):
        assert opt in res.output
    assert json.loads(json.dumps({"ok": True}))


def test_stalled_body_gets_408(setup: dict[str, Any]) -> None:
    app = create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=ServeConfig(read_timeout_s=0.2))
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        chunks = [{"type": "http.request", "body": b'{"embedding": [1', "more_body": True}]

        async def receive() -> dict[str, Any]:
            if chunks:
                return chunks.pop()
            await asyncio.sleep(3600)  # the client stops sending
            raise AssertionError

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/search",
            "raw_path": b"/v1/search",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=20)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body)["error"]["code"] == "timeout"


def test_factory_uses_zsbir_gallery(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import zsbir_infer.serve

    monkeypatch.setenv("ZSBIR_GALLERY", str(setup["base"] / ".zsbir"))
    monkeypatch.setenv("ZSBIR_SERVE_TOKEN", "tok")
    with TestClient(zsbir_infer.serve.create_app()) as c:  # what `uvicorn --factory zsbir_infer.serve:create_app` calls
        assert c.get("/v1/info").status_code == 401
        assert c.get("/v1/info", headers={"Authorization": "Bearer tok"}).json()["files_indexed"] == 40


def test_zsbir_serve_process(setup: dict[str, Any]) -> None:
    """The real command: uvicorn on 127.0.0.1, a search over HTTP, a clean stop on SIGTERM."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    zsbir = str(Path(sys.executable).parent / "zsbir")
    cmd = [zsbir, "serve", "--gallery", str(setup["base"] / ".zsbir"), "--port", str(port), "--backend", "ort-cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert json.loads(r.read())["photos"] == 40
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "zsbir serve did not start"
                time.sleep(0.2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/search",
            data=json.dumps({"embedding": [1.0] * 6, "k": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert [h["rank"] for h in json.loads(r.read())["hits"]] == [1, 2, 3]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught (exit status 0 or -SIGTERM).
    assert proc.returncode in (0, -15), err.decode()[-2000:]
    assert b"Application shutdown complete" in err, err.decode()[-2000:]
    assert b"sketch pad: http://127.0.0.1:" in err


def test_a_broken_image_in_a_batch_fails_alone(setup: dict[str, Any]) -> None:
    """A PNG whose header is fine but whose pixels are cut off is found only when decoding, inside the batch:
    it gets its 400 and the queries batched with it their results."""
    good = setup["sketch"]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    broken = buf.getvalue()[: len(buf.getvalue()) // 2]
    app = create_app(setup["base"] / ".zsbir", backend="ort-cpu", config=ServeConfig(max_batch=16, max_wait_ms=100))
    bodies = [good, broken, good, good, broken, good]
    with TestClient(app) as c:
        out: list[Any] = [None] * len(bodies)

        def go(i: int) -> None:
            out[i] = c.post("/v1/search", files={"image": ("s.png", bodies[i], "image/png")})

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for body, resp in zip(bodies, out, strict=True):
        if body is broken:
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "not-an-image", resp.text
        else:
            assert resp.status_code == 200 and len(resp.json()["hits"]) == 10
