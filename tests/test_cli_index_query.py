"""`zsbir index`, `zsbir query`, `zsbir info` and `zsbir demo`: the user story exactly as written, JSON output,
the HTML page, errors (model mismatch, no gallery, bad sketch)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnx")

from indexer_support import write_photos, write_sketch
from tiny_bundle import make_bundle, make_weights

import zsbir_infer.bundle as bundle_mod
from zsbir_infer.cli import main
from zsbir_infer.encoder import Encoder
from zsbir_infer.gallery import Gallery


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZSBIR_NUM_THREADS", "1")
    monkeypatch.delenv("ZSBIR_GALLERY", raising=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bundles")
    return make_bundle(base / "default")[0], make_bundle(base / "other", weights=make_weights(seed=11))[0]


@pytest.fixture()
def default_model(bundles: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand the tiny bundle in for the embedded default model."""
    monkeypatch.setattr(bundle_mod, "default_bundle_path", lambda: bundles[0])
    return bundles[0]


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_user_story_exactly_as_written(tmp_path: Path, default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rels = write_photos(tmp_path / "photos", 12, sub="cats") + write_photos(tmp_path / "photos", 5, seed=1)
    write_sketch(tmp_path / "sketch.png")
    r1 = run("index", "./photos")
    assert r1.exit_code == 0, r1.output
    assert "indexed 17 of 17 new or changed files" in r1.stdout
    assert (tmp_path / ".zsbir" / "manifest.json").is_file()
    r2 = run("query", "sketch.png")
    assert r2.exit_code == 0, r2.output
    lines = r2.stdout.strip().splitlines()
    assert len(lines) == 10
    # The best photos, by rank, with the scores of a brute force over the same embeddings.
    enc = Encoder.open(default_model, backend="ort-cpu")
    q = enc.embed(["sketch.png"], "sketch")[0]
    p = enc.embed([tmp_path / "photos" / r for r in rels], "photo")
    enc.close()
    s = p @ q
    order = np.argsort(-s, kind="stable")[:10]
    for rank, (line, j) in enumerate(zip(lines, order, strict=True), start=1):
        m = re.fullmatch(r"\s*(\d+)\s+(-?\d\.\d{4})\s+(.+)", line)
        assert m, line
        assert int(m.group(1)) == rank
        assert m.group(3) == os.path.join("photos", rels[j])  # shown relative to the current folder
        assert abs(float(m.group(2)) - s[j]) < 2e-3
    # From a subfolder the gallery is still found (walking up).
    monkeypatch.chdir(tmp_path / "photos" / "cats")
    r3 = run("query", tmp_path / "sketch.png", "-k", "3", "--json")
    doc = json.loads(r3.stdout)
    assert [h["relpath"] for h in doc["queries"][0]["results"]] == [rels[j] for j in order[:3]]
    assert all(Path(h["path"]).is_file() for h in doc["queries"][0]["results"])


def test_user_story_with_the_embedded_default_model(tmp_path: Path) -> None:
    """The real thing, in a subprocess: only runs once the default bundle is in the tree."""
    if not (bundle_mod.default_bundle_path() / "manifest.json").is_file():
        pytest.skip("the embedded default model (zsbir_infer/assets/default) is not built yet")
    write_photos(tmp_path / "photos", 6)
    write_sketch(tmp_path / "sketch.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_NUM_THREADS": "1"}
    env.pop("ZSBIR_GALLERY", None)
    zsbir = [sys.executable, "-c", "from zsbir_infer.cli import main; main()"]
    a = subprocess.run([*zsbir, "index", "./photos"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    b = subprocess.run([*zsbir, "query", "sketch.png"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    assert len(b.stdout.strip().splitlines()) == 6
    assert all(line.split()[-1].startswith("photos/") for line in b.stdout.strip().splitlines())


def test_index_json_incremental_and_info(tmp_path: Path, default_model: Path) -> None:
    rels = write_photos(tmp_path / "p", 6)
    (tmp_path / "p" / "notes.txt").write_text("x")
    gal = tmp_path / "g"
    d1 = json.loads(run("index", tmp_path / "p", "-o", gal, "--json", "-q").stdout)
    assert (d1["indexed"], d1["unchanged"], d1["skip_counts"]) == (6, 0, {"not-an-image": 1})
    (tmp_path / "p" / rels[0]).unlink()
    write_photos(tmp_path / "p", 2, seed=4)
    d2 = json.loads(run("index", tmp_path / "p", "-o", gal, "--json", "-q").stdout)
    assert (d2["indexed"], d2["unchanged"], d2["deleted"], d2["skipped"]) == (2, 6, 1, [])
    info = json.loads(run("info", gal, "--json").stdout)
    assert (info["files_indexed"], info["files_skipped"], info["files_deleted"]) == (7, 1, 1)
    assert info["fingerprint"] == bundle_mod.Bundle.open(default_model).fingerprint
    assert info["format_version"] == 2 and info["bytes_total"] > info["bytes_vectors"] > 0
    assert info["root"] == str((tmp_path / "p").resolve()) and info["model"] is None
    text = run("info", gal).stdout
    assert "7 indexed, 1 skipped, 1 deleted" in text and info["fingerprint"] in text


def test_query_many_sketches_json_and_html(tmp_path: Path, default_model: Path) -> None:
    write_photos(tmp_path / "p", 8)
    sk = [write_sketch(tmp_path / f"s{i}.png", seed=i) for i in range(3)]
    (tmp_path / "p" / "a<b>&c.jpg").write_bytes((tmp_path / "p" / "p0_001.jpg").read_bytes())
    run("index", tmp_path / "p", "-o", tmp_path / "g", "-q")
    html_out = tmp_path / "out" / "res.html"
    r = run("query", *sk, "--gallery", tmp_path / "g", "-k", "9", "--json", "--html", html_out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [q["query"] for q in doc["queries"]] == [str(s) for s in sk]
    assert all(len(q["results"]) == 9 for q in doc["queries"])
    page = html_out.read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3 * (1 + 9)  # each sketch and its results
    for u in uris:
        im = Image.open(io.BytesIO(base64.b64decode(u)))
        assert im.format == "JPEG" and max(im.size) <= 160
    assert "a&lt;b&gt;&amp;c.jpg" in page and "a<b>&c.jpg" not in page  # names are escaped
    assert "http" not in page.replace("http-equiv", "")  # self-contained: no external resources
    # Text output: one block per sketch when several are given.
    t = run("query", *sk, "--gallery", tmp_path / "g", "-k", "2").stdout
    assert t.count(":\n") == 3 and len(t.strip().splitlines()) == 3 * 3


def test_query_with_another_model_is_a_clear_error(tmp_path: Path, default_model: Path, bundles: Any) -> None:
    write_photos(tmp_path / "p", 3)
    write_sketch(tmp_path / "s.png")
    run("index", tmp_path / "p", "-o", tmp_path / "g", "-q")
    r = run("query", tmp_path / "s.png", "--gallery", tmp_path / "g", "--model", bundles[1])
    assert r.exit_code == 1
    assert "fingerprint" in r.output and "not comparable" in r.output and "Traceback" not in r.output
    # Indexing into it with another model is refused the same way.
    r2 = run("index", tmp_path / "p", "-o", tmp_path / "g", "--model", bundles[1])
    assert r2.exit_code == 1 and "fingerprint" in r2.output


def test_recorded_model_is_used_by_default(tmp_path: Path, bundles: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_mod, "default_bundle_path", lambda: tmp_path / "no-default")
    write_photos(tmp_path / "p", 3)
    write_sketch(tmp_path / "s.png")
    assert run("index", tmp_path / "p", "-o", tmp_path / "g", "--model", bundles[1], "-q").exit_code == 0
    r = run("query", tmp_path / "s.png", "--gallery", tmp_path / "g", "-k", "1")
    assert r.exit_code == 0, r.output
    assert run("index", tmp_path / "p", "-o", tmp_path / "g", "-q", "--json").exit_code == 0  # no --model needed


def test_query_errors(tmp_path: Path, default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_sketch(tmp_path / "s.png")
    r = run("query", "s.png")
    assert r.exit_code == 1 and "no gallery found" in r.output and "zsbir index" in r.output
    r = run("query", "missing.png")
    assert r.exit_code == 1 and "sketch not found: missing.png" in r.output
    write_photos(tmp_path / "p", 2)
    run("index", "p", "-q")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = run("query", "bad.png")
    assert r.exit_code == 1 and "bad.png" in r.output and "Traceback" not in r.output
    r = run("info", tmp_path / "p")
    assert r.exit_code == 1 and "not a gallery" in r.output
    r = run("index", "s.png")
    assert r.exit_code == 1 and "not a folder" in r.output


def test_index_of_another_root_into_the_same_gallery(tmp_path: Path, default_model: Path) -> None:
    write_photos(tmp_path / "a", 2)
    write_photos(tmp_path / "b", 2)
    assert run("index", tmp_path / "a", "-o", tmp_path / "g", "-q").exit_code == 0
    r = run("index", tmp_path / "b", "-o", tmp_path / "g", "-q")
    assert r.exit_code == 1 and "indexes" in r.output and "-o DIR" in r.output
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 2


def test_demo_quick(tmp_path: Path, default_model: Path, bundles: Any) -> None:
    r = run("demo", "--quick", "--out", tmp_path / "d", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["photos"] == 6 * 12 and doc["sketches"] == 6 * 4
    assert set(doc["metrics"]) >= {"map_all", "map_200", "p_100", "p_200"}
    assert 0.0 <= doc["metrics"]["map_all"] <= 1.0
    page = Path(doc["html"])
    assert page.is_file() and page.read_text().count("data:image/jpeg;base64,") == 4 * (1 + 5)
    assert "results page:" in r.stderr and "mAP@all" in r.stderr
    # The demo's classes are the synthetic benchmark's unseen ones.
    from zsbir_infer.datasets.synth import SynthConfig, make_classes

    unseen = {c.name for c in make_classes(SynthConfig())[1]}
    assert set(doc["classes"]) <= unseen
    # A rerun with another model rebuilds the demo's gallery instead of failing.
    r2 = run("demo", "--quick", "--out", tmp_path / "d", "--json", "--model", bundles[1])
    assert r2.exit_code == 0, r2.output
    assert "rebuilding" in r2.stderr and json.loads(r2.stdout)["photos"] == 6 * 12


def test_query_path_imports_no_torch_and_nothing_heavy_eagerly() -> None:
    code = (
        "import sys\n"
        "import zsbir_infer.cli.query, zsbir_infer.cli.index, zsbir_infer.cli.info, zsbir_infer.cli.demo\n"
        "import zsbir_infer.retriever, zsbir_infer.indexer, zsbir_infer.report\n"
        "from zsbir_infer import Retriever\n"
        "bad = [m for m in ('torch', 'onnxruntime', 'usearch', 'cuda', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_query_on_an_empty_gallery(tmp_path: Path, default_model: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.txt").write_text("x")
    write_sketch(tmp_path / "s.png")
    assert run("index", tmp_path / "p", "-o", tmp_path / "g", "-q").exit_code == 0
    r = run("query", tmp_path / "s.png", "--gallery", tmp_path / "g", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["queries"][0]["results"] == []


def test_report_page_details(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from zsbir_infer.report import QueryResult, render_html, thumbnail_data_uri

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 600, 3), dtype=np.uint8)).save(big)
    uri = thumbnail_data_uri(big, size=100)
    assert uri is not None
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == (100, 50) and thumb.format == "JPEG"  # longest side, aspect kept
    assert thumbnail_data_uri(tmp_path / "gone.jpg") is None
    hits = [
        SimpleNamespace(path=str(big), relpath="big.png", score=0.5, relevant=True),
        SimpleNamespace(path=str(tmp_path / "gone.jpg"), relpath="gone.jpg", score=0.25, relevant=False),
    ]
    page = render_html([QueryResult("<script>x</script>", big, hits)], title="t & t")
    assert page.count('class="missing"') == 1 and page.count("data:image/jpeg;base64,") == 2
    assert "<script>" not in page and "&lt;script&gt;" in page and "t &amp; t" in page
    assert 'class="ok"' in page and 'class="bad"' in page and "0.500" in page and "0.250" in page


def test_demo_quick_with_the_embedded_default_model(tmp_path: Path) -> None:
    if not (bundle_mod.default_bundle_path() / "manifest.json").is_file():
        pytest.skip("the embedded default model (zsbir_infer/assets/default) is not built yet")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_NUM_THREADS": "1"}
    zsbir = [sys.executable, "-c", "from zsbir_infer.cli import main; main()"]
    out = subprocess.run([*zsbir, "demo", "--quick", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert Path(doc["html"]).is_file() and doc["html"].startswith(str(tmp_path.resolve()))
    assert 0.0 <= doc["metrics"]["map_all"] <= 1.0
