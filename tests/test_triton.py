"""zsbir_search on a real Triton Inference Server on loopback (the tritonserver of the nvidia-pytriton wheel, with
the repository's `--triton-encoder python` variant, since that server has the Python backend only): readiness,
the same hits as Retriever.search over HTTP and gRPC, dynamic batching seen in Triton's own statistics, bad
requests answered with errors while the server stays up, and `zsbir serve --engine triton` with a clean Ctrl-C.

The server starts once for the module (a few seconds). Where no tritonserver is installed the fixture installs
it (`python -m zsbir_infer.triton install`: the wheel from PyPI, unpacked into the cache) and skips, saying why,
only when that fails."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

import tritonclient.grpc as grpc
import tritonclient.http as http
from indexer_support import write_photos, write_sketch
from tiny_bundle import make_bundle
from tritonclient.utils import InferenceServerException

from zsbir_infer import Retriever
from zsbir_infer.encoder import Encoder
from zsbir_infer.indexer import index_folder
from zsbir_infer.triton import TritonError
from zsbir_infer.triton.repository import TritonRepositoryOptions, write_repository
from zsbir_infer.triton.server import (
    TritonServer,
    find_tritonserver,
    free_port_block,
    install_model_env,
    install_tritonserver,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # about 30 s for the module


def _install() -> Any:
    try:
        install = find_tritonserver()
        if install.stubs is not None:
            install_model_env()
        return install
    except TritonError:
        pass
    try:
        install = install_tritonserver()
        install_model_env()
        return install
    except TritonError as exc:
        pytest.skip(f"tritonserver is not installed and could not be installed here: {exc}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    install = _install()
    base = tmp_path_factory.mktemp("triton")
    bundle = make_bundle(base / "bundle")[0]  # domain-conditioned: the tag travels through the ensemble
    rels = write_photos(base / "photos", 30, sub="x") + write_photos(base / "photos", 10, seed=1, sub="y")
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle))
    finally:
        enc.close()
    sketches = [write_sketch(base / f"s{i}.png", seed=i).read_bytes() for i in range(6)]
    repo = write_repository(
        bundle,
        base / "repo",
        base / ".zsbir",
        TritonRepositoryOptions(encoder="python", max_queue_delay_us=20_000),
    )
    server = TritonServer(repo, port=free_port_block(), install=install, log_file=base / "tritonserver.log")
    server.start(timeout=180)
    retriever = Retriever.open(base / ".zsbir", backend="ort-cpu")
    try:
        yield {"base": base, "server": server, "retriever": retriever, "sketches": sketches, "rels": rels}
    finally:
        retriever.close()
        server.stop()


def _inputs(mod: Any, images: list[bytes], k: int | None = None, domain: str | None = None) -> list[Any]:
    img = mod.InferInput("IMAGE", [len(images), 1], "BYTES")
    img.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
    out = [img]
    if k is not None:
        kk = mod.InferInput("K", [len(images), 1], "INT32")
        kk.set_data_from_numpy(np.full((len(images), 1), k, dtype=np.int32))
        out.append(kk)
    if domain is not None:
        d = mod.InferInput("DOMAIN", [len(images), 1], "BYTES")
        d.set_data_from_numpy(np.array([[domain.encode()]] * len(images), dtype=object))
        out.append(d)
    return out


def _assert_same(result: Any, expected: list[list[Any]]) -> None:
    scores, ids, paths = result.as_numpy("SCORES"), result.as_numpy("IDS"), result.as_numpy("PATHS")
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == paths.shape == (len(expected), len(expected[0]))
    for row, hits in enumerate(expected):
        assert ids[row].tolist() == [h.id for h in hits]
        assert [p.decode() for p in paths[row]] == [h.relpath for h in hits]
        np.testing.assert_allclose(scores[row], [h.score for h in hits], rtol=0, atol=1e-5)


def test_server_ready_with_every_model(setup: dict[str, Any]) -> None:
    c = http.InferenceServerClient(setup["server"].http_url)
    assert c.is_server_live() and c.is_server_ready()
    for m in ("zsbir_search", "zsbir_preprocess", "zsbir_encoder", "zsbir_topk"):
        assert c.is_model_ready(m), m
    with urllib.request.urlopen(setup["server"].metrics_url, timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()


def test_search_over_http_equals_retriever(setup: dict[str, Any]) -> None:
    c = http.InferenceServerClient(setup["server"].http_url)
    for png in setup["sketches"]:
        r = c.infer("zsbir_search", _inputs(http, [png], k=7))
        _assert_same(r, setup["retriever"].search(png, k=7))
    # several images in one request, default K (10)
    r = c.infer("zsbir_search", _inputs(http, setup["sketches"][:3]))
    _assert_same(r, setup["retriever"].search(setup["sketches"][:3], k=10))


def test_search_over_grpc_equals_retriever(setup: dict[str, Any]) -> None:
    c = grpc.InferenceServerClient(setup["server"].grpc_url)
    pngs = setup["sketches"][2:5]
    r = c.infer("zsbir_search", _inputs(grpc, pngs, k=5))
    _assert_same(r, setup["retriever"].search(pngs, k=5))
    # photo queries take the photo preprocessing and tag
    photo = (setup["base"] / "photos" / setup["rels"][3]).read_bytes()
    r = c.infer("zsbir_search", _inputs(grpc, [photo], k=4, domain="photo"))
    expected = setup["retriever"].search(photo, k=4, domain="photo")
    _assert_same(r, expected)
    assert expected[0][0].relpath == setup["rels"][3]  # a photo finds itself first
    # a JPEG photo: the models' own packages decode it as the library does (reduced-scale libjpeg-turbo)
    jpeg = next(rel for rel in setup["rels"] if rel.endswith(".jpg"))
    data = (setup["base"] / "photos" / jpeg).read_bytes()
    r = c.infer("zsbir_search", _inputs(grpc, [data], k=4, domain="photo"))
    _assert_same(r, setup["retriever"].search(data, k=4, domain="photo"))
    # more results than photos: all of them
    r = c.infer("zsbir_search", _inputs(grpc, [pngs[0]], k=100))
    _assert_same(r, setup["retriever"].search(pngs[0], k=100))
    assert r.as_numpy("IDS").shape == (1, len(setup["rels"]))


def _batch_sizes(c: Any, model: str) -> dict[int, int]:
    stats = c.get_inference_statistics(model)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_concurrent_requests_are_batched(setup: dict[str, Any]) -> None:
    c = http.InferenceServerClient(setup["server"].http_url, concurrency=32)
    before = {m: _batch_sizes(c, m) for m in ("zsbir_preprocess", "zsbir_encoder", "zsbir_topk")}
    pngs = [setup["sketches"][i % len(setup["sketches"])] for i in range(48)]
    pending = [c.async_infer("zsbir_search", _inputs(http, [png], k=3)) for png in pngs]
    results = [p.get_result() for p in pending]
    expected = setup["retriever"].search(pngs, k=3)
    for r, e in zip(results, expected, strict=True):
        _assert_same(r, [e])
    for m, old in before.items():
        new = _batch_sizes(c, m)
        grown = {size: n - old.get(size, 0) for size, n in new.items() if n > old.get(size, 0)}
        assert sum(size * n for size, n in grown.items()) == len(pngs), (m, grown)
        if m != "zsbir_preprocess":  # the one-instance models behind it see the queue build up
            assert max(grown) > 1, (m, grown)
    assert max(size for size in _batch_sizes(c, "zsbir_encoder")) > 1


def test_bad_input_is_an_error_and_the_server_stays_up(setup: dict[str, Any]) -> None:
    c = http.InferenceServerClient(setup["server"].http_url)
    with pytest.raises(InferenceServerException, match=r"(?i)image"):
        c.infer("zsbir_search", _inputs(http, [b"this is not an image"]))
    with pytest.raises(InferenceServerException, match=r"(?i)image"):
        c.infer("zsbir_search", _inputs(http, [setup["sketches"][0][:60]]))  # a truncated PNG
    with pytest.raises(InferenceServerException, match="DOMAIN must be"):
        c.infer("zsbir_search", _inputs(http, [setup["sketches"][0]], domain="painting"))
    with pytest.raises(InferenceServerException, match="K must be"):
        c.infer("zsbir_search", _inputs(http, [setup["sketches"][0]], k=0))
    # a bad request batched with good ones fails alone
    cc = http.InferenceServerClient(setup["server"].http_url, concurrency=8)
    jobs = [cc.async_infer("zsbir_search", _inputs(http, [png], k=2)) for png in setup["sketches"][:4]]
    bad = cc.async_infer("zsbir_search", _inputs(http, [b"GIF89a broken"], k=2))
    for j, png in zip(jobs, setup["sketches"][:4], strict=True):
        _assert_same(j.get_result(), setup["retriever"].search(png, k=2))
    with pytest.raises(InferenceServerException):
        bad.get_result()
    assert setup["server"].running() and c.is_server_ready()
    _assert_same(c.infer("zsbir_search", _inputs(http, [setup["sketches"][1]], k=3)),
                 setup["retriever"].search(setup["sketches"][1], k=3))  # fmt: skip


def test_zsbir_serve_engine_triton_stops_cleanly_on_ctrl_c(setup: dict[str, Any]) -> None:
    port = free_port_block()
    cmd = [
        str(Path(sys.executable).parent / "zsbir"),
        "serve",
        "--engine",
        "triton",
        "--gallery",
        str(setup["base"] / ".zsbir"),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C's default action even where this test runs with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready:") for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        c = grpc.InferenceServerClient(f"127.0.0.1:{port + 1}")
        png = setup["sketches"][4]
        _assert_same(c.infer("zsbir_search", _inputs(grpc, [png], k=5)), setup["retriever"].search(png, k=5))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    out = "".join(lines)
    assert "tritonserver stopped" in out and "Traceback" not in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
