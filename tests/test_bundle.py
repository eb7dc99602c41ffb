"""zsbir_infer.bundle: manifest validation, lazy hash checks, fingerprint, default path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")

from tiny_bundle import SPEC, make_bundle

from zsbir_infer.bundle import (
    Bundle,
    BundleError,
    canonical_preprocess_json,
    compute_fingerprint,
    default_bundle_path,
)
from zsbir_infer.preprocess import PreprocessSpec


def edit_manifest(root: Path, fn: Any) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


ENGINE = {
    "precision": "fp16",
    "file": "model.fp16.h100.plan",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "tensorrt": "10.13.0.35",
    "min_batch": 1,
    "opt_batch": 32,
    "max_batch": 256,
}


def test_open_reads_fields(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", extra_precisions=("fp16",), engines=[ENGINE])
    b = Bundle.open(root)
    assert b.embedding_dim == 6
    assert b.domain_handling == "input" and b.domain_conditioned
    assert b.image_input == "image" and b.domain_input == "domain" and b.output_name == "embedding"
    assert b.input_size == (16, 16)
    assert b.precisions == ["fp32", "fp16"]
    assert b.domain_tag("photo") == 1 and b.domain_tag("sketch") == 0
    assert b.preprocess_spec("sketch") == PreprocessSpec.from_dict(SPEC)
    assert len(b.engines) == 1 and b.engines_for("fp16")[0].max_batch == 256
    assert b.engines_for("fp32") == []
    assert b.engines[0].path == root / "model.fp16.h100.plan"
    assert b.model_path("fp16") == root / "model.fp16.onnx"
    assert Bundle.open(root / "manifest.json").fingerprint == b.fingerprint
    assert b.describe()["precisions"] == ["fp32", "fp16"]
    b.verify()
    with pytest.raises(ValueError, match="domain"):
        b.domain_tag("drawing")


def test_unconditioned_bundle(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", domain_input=False)
    b = Bundle.open(root)
    assert b.domain_input is None and not b.domain_conditioned
    assert b.domain_tag("photo") == 1  # contract defaults


def test_fingerprint_definition(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    pre = m["preprocess"]
    canon = json.dumps(
        {d: PreprocessSpec.from_dict(s).to_dict() for d, s in pre.items()}, sort_keys=True, separators=(",", ":")
    )
    assert canonical_preprocess_json(pre) == canon
    expect = hashlib.sha256((root / "model.onnx").read_bytes() + canon.encode()).hexdigest()[:16]
    assert compute_fingerprint(root / "model.onnx", pre) == expect
    assert compute_fingerprint((root / "model.onnx").read_bytes(), pre) == expect
    # Filling defaults does not change the fingerprint; changing a value does.
    assert compute_fingerprint(root / "model.onnx", {"photo": {**SPEC, "color": "bgr"}, "sketch": SPEC}) != expect
    sparse = {"photo": {**SPEC}, "sketch": {k: v for k, v in SPEC.items() if k != "background"}}
    assert compute_fingerprint(root / "model.onnx", sparse) == expect


@pytest.mark.parametrize(
    ("mutate", "msg"),
    [
        (lambda m: m.update(format_version=2), "format_version 2"),
        (lambda m: m.update(format="something"), "not a zsbir bundle"),
        (lambda m: m.pop("embedding_dim"), "missing field 'embedding_dim'"),
        (lambda m: m.update(embedding_dim="64"), "'embedding_dim' must be int"),
        (lambda m: m.update(embedding_dim=True), "'embedding_dim' must be int"),
        (lambda m: m.pop("fingerprint"), "'fingerprint'"),
        (lambda m: m["inputs"].pop("domain"), "inputs.'domain'"),
        (lambda m: m["inputs"]["image"].pop("name"), "inputs.image.'name'"),
        (lambda m: m["outputs"]["embedding"].update(shape=["batch", 7]), "disagrees with embedding_dim"),
        (lambda m: m["preprocess"].pop("sketch"), "preprocess.'sketch'"),
        (lambda m: m["preprocess"]["photo"].update(resize="crop"), "preprocess.photo"),
        (lambda m: m["preprocess"]["photo"].update(size=[32, 32]), "does not match the model input"),
        (lambda m: m.update(models={}), "no model"),
        (lambda m: m["models"].update(fp8={"file": "x.onnx"}), "unknown precision 'fp8'"),
        (lambda m: m["models"]["fp32"].update(file="../escape.onnx"), "inside the bundle"),
        (lambda m: m.update(domain_handling="maybe"), "domain_handling"),
        (lambda m: m.update(metric="l2"), "metric"),
        (lambda m: m.update(engines=[{**ENGINE, "min_batch": 8, "opt_batch": 4}]), "batch sizes"),
        (lambda m: m.update(engines=[{k: v for k, v in ENGINE.items() if k != "gpu"}]), "engines\\[0\\].'gpu'"),
    ],
)
def test_manifest_errors(tmp_path: Path, mutate: Any, msg: str) -> None:
    root, _ = make_bundle(tmp_path / "b")
    edit_manifest(root, mutate)
    with pytest.raises(BundleError, match=msg) as info:
        Bundle.open(root)
    assert "manifest.json" in str(info.value)


def test_missing_bundle_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Bundle.open(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path / "bad")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="is a file"):
        Bundle.open(tmp_path / "model.onnx")


def test_hash_mismatch_detected_lazily(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", extra_precisions=("fp16",))
    data = bytearray((root / "model.fp16.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (root / "model.fp16.onnx").write_bytes(bytes(data))
    b = Bundle.open(root)  # opening does not hash
    assert b.model_path("fp32") == root / "model.onnx"
    with pytest.raises(BundleError, match="does not match the manifest"):
        b.model_path("fp16")
    assert b.model_path("fp16", verify=False) == root / "model.fp16.onnx"
    with pytest.raises(BundleError, match="does not match"):
        b.verify()


def test_size_mismatch_and_missing_file(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", extra_precisions=("int8",))
    with open(root / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    (root / "model.int8.onnx").unlink()
    b = Bundle.open(root)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        b.model_path("fp32", verify=False)
    with pytest.raises(BundleError, match="file missing"):
        b.model_path("int8")
    with pytest.raises(BundleError, match="no fp16 model"):
        b.model_path("fp16")


def test_default_bundle_path() -> None:
    p = default_bundle_path()
    assert p.parts[-3:] == ("zsbir_infer", "assets", "default")
    if not (p / "manifest.json").exists():
        with pytest.raises(BundleError, match="default model bundle is missing"):
            Bundle.open(None)
    else:
        assert Bundle.open(None).embedding_dim > 0


def test_golden_fingerprint() -> None:
    """Pinned values: a change to PreprocessSpec.to_dict (a new default, a renamed key, another float
    spelling) or to the fingerprint's definition changes every bundle's fingerprint and orphans every
    gallery built before; it must be a deliberate, versioned decision, so this literal fails first."""
    spec = PreprocessSpec(size=(16, 16)).to_dict()
    assert canonical_preprocess_json({"photo": spec, "sketch": spec}) == (
        '{"photo":{"background":"white","color":"rgb","interpolation":"bilinear","mean":[0.485,0.456,0.406],'
        '"resize":"squash","size":[16,16],"std":[0.229,0.224,0.225]},"sketch":{"background":"white",'
        '"color":"rgb","interpolation":"bilinear","mean":[0.485,0.456,0.406],"resize":"squash","size":[16,16],'
        '"std":[0.229,0.224,0.225]}}'
    )
    assert compute_fingerprint(b"zsbir golden model bytes", {"photo": spec, "sketch": spec}) == "4ae2c59f360356bf"


def test_manifest_type_round_trip(tmp_path: Path) -> None:
    """The manifest tiny_bundle writes is BundleManifest.to_dict(); reading it back gives the same manifest,
    and the descriptive sections pass through untouched."""
    from zsbir_infer.bundle import BundleManifest

    root, _ = make_bundle(tmp_path / "b", extra_precisions=("fp16",), engines=[{**ENGINE, "strongly_typed": True}])
    raw = json.loads((root / "manifest.json").read_text())
    m = BundleManifest.from_dict(raw)
    assert m.to_dict() == raw
    assert BundleManifest.from_dict(m.to_dict()) == m
    assert m.engines[0].extra == {"strongly_typed": True} and m.extra["source"]["path"] == "tiny"
    assert Bundle.open(root).spec == m
    with pytest.raises(BundleError, match="fp32"):
        BundleManifest.create(
            root,
            models={"fp16": "model.fp16.onnx"},
            embedding_dim=6,
            domain_conditioned=True,
            input_size=(16, 16),
            preprocess={"photo": SPEC, "sketch": SPEC},
        )
