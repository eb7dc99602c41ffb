"""`zsbir embed` and `zsbir eval` on tiny bundles and a hand-made benchmark folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnx")

from tiny_bundle import make_bundle

from zsbir_infer.cli import main
from zsbir_infer.encoder import Encoder
from zsbir_infer.metrics import evaluate


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZSBIR_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("cli") / "b")[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        p = d / f"f{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 18 + i, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------------------------------- embed


def test_embed_writes_npy_in_file_order(bundle: Path, files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "e.npy"
    order = [files[3], files[0], files[6], files[1]]
    res = run("embed", "--model", bundle, "--domain", "sketch", *order, "-o", out, "--batch-size", 3, "-q")
    assert res.exit_code == 0, res.output
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (4, 6)
    with Encoder.open(bundle, backend="ort-cpu") as enc:
        np.testing.assert_allclose(emb, enc.embed(order, "sketch"), atol=1e-6)
        assert np.abs(emb - enc.embed(order, "photo")).max() > 1e-3  # the domain was honoured
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]  # no temporary files left


def test_embed_files_from_and_summary(bundle: Path, files: list[Path], tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text(f"# photos\n{files[2]}\n\n{files[4]}\n")
    out = tmp_path / "e.npy"
    res = run("embed", "--model", bundle, "--domain", "photo", files[5], "--files-from", lst, "-o", out)
    assert res.exit_code == 0, res.output
    assert "3 x 6 float32 embeddings" in res.output and "images/s" in res.output
    with Encoder.open(bundle, backend="ort-cpu") as enc:
        np.testing.assert_allclose(np.load(out), enc.embed([files[5], files[2], files[4]], "photo"), atol=1e-6)


def test_embed_bad_file_writes_nothing(bundle: Path, files: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "e.npy"
    out.write_bytes(b"previous")
    res = run("embed", "--model", bundle, "--domain", "photo", files[0], bad, files[1], "-o", out, "-q")
    assert res.exit_code != 0
    assert "corrupt.png" in res.output and "nothing written" in res.output
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.png", "e.npy"]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--domain", "photo", "-o", "x.npy"], "no image files"),
        (["--domain", "drawing", "a.png", "-o", "x.npy"], "drawing"),
        (["--model", "/no/such/bundle", "--domain", "photo", "a.png", "-o", "x.npy"], "not found"),
        (["--backend", "tensorrt", "--domain", "photo", "a.png", "-o", "x.npy"], "TensorRT"),
        (["--precision", "int8", "--domain", "photo", "a.png", "-o", "x.npy"], "no int8 model"),
    ],
)
def test_embed_errors(bundle: Path, args: list[str], msg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "--model" not in args:
        args = ["--model", str(bundle), *args]
    if "--backend" in args:
        import tensorrt

        if hasattr(tensorrt, "Builder"):
            pytest.skip("real TensorRT installed")
    res = run("embed", *args)
    assert res.exit_code != 0
    assert msg in res.output


def test_embed_output_folder_missing(bundle: Path, files: list[Path], tmp_path: Path) -> None:
    res = run("embed", "--model", bundle, "--domain", "photo", files[0], "-o", tmp_path / "no" / "e.npy", "-q")
    assert res.exit_code != 0 and "does not exist" in res.output


# ---------------------------------------------------------------------------------------------------- eval

COLORS = {
    "apple": (220, 30, 30),
    "bus": (30, 200, 40),
    "cat": (40, 40, 230),
    "dog": (240, 240, 20),
    "eel": (20, 220, 220),
    "fox": (230, 20, 220),
}


def make_benchmark(root: Path, photos: int = 3, sketches: int = 2) -> Path:
    """Our folder layout; every image of a class is the same solid colour, in both domains."""
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "seen.txt").write_text("apple\nbus\ncat\n")
    (root / "splits" / "unseen.txt").write_text("dog\neel\nfox\n")
    for cls, color in COLORS.items():
        for domain, n, ext in (("photo", photos, "png"), ("sketch", sketches, "png")):
            d = root / domain / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 20), color).save(d / f"{i}.{ext}")
    return root


def test_eval_perfect_retrieval_when_classes_are_separable(tmp_path: Path) -> None:
    # An unconditioned model embeds identical images identically, so every sketch's nearest photos
    # are exactly the photos of its class: mAP must be 1. A mix-up of labels or order would break it.
    root, _ = make_bundle(tmp_path / "b", domain_input=False)
    data = make_benchmark(tmp_path / "data")
    res = run("eval", "--model", root, "--data", data, "--split", "unseen", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["map_all"] == pytest.approx(1.0) and out["map_200"] == pytest.approx(1.0)
    assert out["queries"] == 6 and out["gallery"] == 9 and out["classes"] == 3
    assert out["backend"] == "ort-cpu" and out["split"] == "unseen" and out["protocol"] == "sake"
    assert out["images_per_second"] > 0


def test_eval_on_a_named_split_set_of_a_folder_benchmark(tmp_path: Path) -> None:
    # Split set "21" (splits/seen21.txt + unseen21.txt) moves dog to the seen classes.
    root, _ = make_bundle(tmp_path / "b", domain_input=False)
    data = make_benchmark(tmp_path / "data")
    (data / "splits" / "seen21.txt").write_text("apple\nbus\ncat\ndog\n")
    (data / "splits" / "unseen21.txt").write_text("eel\nfox\n")
    res = run("eval", "--model", root, "--data", data, "--zeroshot", "21", "--split", "unseen", "--json", "-q")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["classes"] == 2 and out["queries"] == 4 and out["gallery"] == 6
    assert out["map_all"] == pytest.approx(1.0)
    res = run("eval", "--model", root, "--data", data, "--zeroshot", "7", "-q")
    assert res.exit_code != 0 and "seen7.txt" in res.output and "default, 21" in res.output


def test_eval_matches_library_pipeline(bundle: Path, tmp_path: Path) -> None:
    data = make_benchmark(tmp_path / "data", photos=4, sketches=3)
    # Break the perfect separation: add noise images to the photo folders.
    rng = np.random.default_rng(2)
    for cls in COLORS:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / "photo" / cls / "noise.png")
    from zsbir_infer.datasets import open_benchmark

    for protocol in ("sake", "zse"):
        res = run("eval", "--model", bundle, "--data", data, "--split", "all", "--protocol", protocol, "--json")
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        part = open_benchmark(data).split("all")
        with Encoder.open(bundle, backend="ort-cpu") as enc:
            q = enc.embed([s.path for s in part.sketches], "sketch")
            g = enc.embed([s.path for s in part.photos], "photo")
        ref = evaluate(q, [s.label for s in part.sketches], g, [s.label for s in part.photos], protocol=protocol)
        for key in ("map_all", "map_200", "p_100", "p_200"):
            assert got[key] == pytest.approx(ref[key], abs=1e-6), key
        assert got["queries"] == 18 and got["gallery"] == 30


def test_eval_text_output(bundle: Path, tmp_path: Path) -> None:
    data = make_benchmark(tmp_path / "data")
    res = run("eval", "--model", bundle, "--data", data, "-q")
    assert res.exit_code == 0, res.output
    for label in ("mAP@all", "mAP@200", "P@100", "P@200", "images/s"):
        assert label in res.output


def test_eval_errors(bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("eval", "--model", bundle, "--data", empty)
    assert res.exit_code != 0 and "Error" in res.output
    data = make_benchmark(tmp_path / "data")
    res = run("eval", "--model", bundle, "--data", data, "--split", "bogus")
    assert res.exit_code != 0 and "split" in res.output
    (data / "sketch" / "dog" / "0.png").write_bytes(b"broken")
    res = run("eval", "--model", bundle, "--data", data, "-q")
    assert res.exit_code != 0 and "0.png" in res.output
