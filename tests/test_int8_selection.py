"""INT8 export: what the exporter decides on, and with which images.

The sensitivity fallback's stop criterion must be measured on held-out *seen* images (the holdout), never on
the images the verification reports on (the benchmark's unseen split), and the holdout, the calibration
images and the evaluation images must be pairwise disjoint. Also: the holdout split rules, the lower
prediction bound of the overlap, the MSE threshold search and the first/last float policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402
from zsbir_export import quantize, verify  # noqa: E402
from zsbir_export.bundle import ExportOptions, VerificationFailed, export_bundle  # noqa: E402
from zsbir_export.calibration import ImageSet, load_images, open_source, pick, split_holdout  # noqa: E402
from zsbir_export.onnx_export import export_onnx  # noqa: E402
from zsbir_export.quantize import mse_threshold, policy_float_nodes  # noqa: E402
from zsbir_export.verify import Tolerances, overlap_estimate  # noqa: E402

from zsbir_infer.preprocess import PreprocessSpec  # noqa: E402

SIZE = 32
SPEC = PreprocessSpec(size=(SIZE, SIZE)).to_dict()  # squash, bilinear, ImageNet mean/std, RGB
SOURCE = {"path": "tiny", "sha256": "0" * 64, "format": "zsbir", "method": "none"}


class Net(nn.Module):
    """Stem conv, two inner convs, linear embedding, L2 norm (unconditioned)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.a = nn.Conv2d(8, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Linear(8, 8)

    def embed(self, x: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))
        return nn.functional.normalize(self.head(h.mean(dim=(2, 3))), dim=1)


def net() -> Net:
    torch.manual_seed(1)
    return Net().eval()


def config(class_names: list[str] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "format": "zsbir-checkpoint",
        "version": 1,
        "method": "none",
        "arch": {"backbone": "tiny", "domain_conditioned": False, "embed_dim": 8},
        "preprocess": {"photo": dict(SPEC), "sketch": dict(SPEC)},
    }
    if class_names is not None:
        cfg["class_names"] = class_names
    return cfg


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 seen classes (2 of them form the holdout) and 3 unseen ones."""
    from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic

    root = tmp_path_factory.mktemp("bench") / "synth"
    cfg = SynthConfig(classes=13, unseen=3, photos_per_class=4, sketches_per_class=2, size=32, seed=5)
    generate_synthetic(root, cfg, workers=1, progress=False)
    return root


def _paths(items: dict[str, list[Any]]) -> set[str]:
    return {str(it.path) for domain in items.values() for it in domain}


# ------------------------------------------------------------------------------------------ holdout split


def test_holdout_split_is_disjoint_and_deterministic(bench: Path) -> None:
    data = open_source(bench)
    assert data.evaluation is not None
    split = split_holdout(data, seed=0)
    seen = data.classes["seen"]
    assert len(seen) == 10 and len(split.holdout_classes) == 2 and split.usable()
    assert set(split.holdout_classes) <= set(seen)
    assert not set(split.holdout_classes) & set(data.classes["unseen"])
    calib, hold, evaluation = _paths(split.calibration), _paths(split.holdout), _paths(data.evaluation)
    assert calib and hold and evaluation
    assert not calib & hold and not calib & evaluation and not hold & evaluation
    assert calib | hold == _paths(data.calibration)  # nothing of the seen split is lost
    # whole classes: every holdout image belongs to a holdout class and no calibration image does
    for items in split.holdout.values():
        assert {seen[it.label] for it in items} == set(split.holdout_classes)
    for items in split.calibration.values():
        assert not {seen[it.label] for it in items} & set(split.holdout_classes)
    again = split_holdout(data, seed=0)
    assert again.holdout_classes == split.holdout_classes and _paths(again.holdout) == hold
    assert split.describe()["holdout_pool"] == {"photo": 8, "sketch": 4}


def test_holdout_prefers_classes_the_model_was_not_trained_on(bench: Path) -> None:
    data = open_source(bench)
    seen = data.classes["seen"]
    # a checkpoint trained on 7 of the 10 seen classes: the other 3 are the holdout (zero-shot for it)
    split = split_holdout(data, seed=0, trained_classes=seen[:7])
    assert split.holdout_classes == seen[7:]
    assert split.rule == "seen classes the checkpoint was not trained on"
    # one untrained class: topped up with a seeded choice to 20% of the seen classes
    split = split_holdout(data, seed=0, trained_classes=seen[:9])
    assert len(split.holdout_classes) == 2 and seen[9] in split.holdout_classes
    # names that match no seen class say nothing about training: the seeded rule applies
    split = split_holdout(data, seed=0, trained_classes=["no-such-class"])
    assert split.holdout_classes == split_holdout(data, seed=0).holdout_classes


def test_holdout_split_of_a_plain_folder(tmp_path: Path, bench: Path) -> None:
    plain = tmp_path / "plain"
    for domain in ("photo", "sketch"):
        (plain / domain).mkdir(parents=True)
        for i, f in enumerate(sorted((bench / domain).rglob("*.*"))[:10]):
            (plain / domain / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    data = open_source(plain)
    split = split_holdout(data, seed=3)
    assert {d: len(v) for d, v in split.holdout.items()} == {"photo": 2, "sketch": 2}
    assert not _paths(split.holdout) & _paths(split.calibration)
    assert split.holdout_classes == [] and "images of each domain" in split.rule


# -------------------------------------------------------------------- the fallback never sees evaluation


def test_fallback_never_measures_on_evaluation_images(
    tmp_path: Path, bench: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spy on every embedding the export computes: outside the verification, none may touch an image of
    the evaluation (unseen) split; the fallback's check must run, on holdout images only."""
    data = open_source(bench)
    assert data.evaluation is not None
    evaluation = _paths(data.evaluation)
    holdout = _paths(split_holdout(data, seed=0).holdout)
    seen_calls: list[tuple[str, set[str]]] = []
    phase = ["export"]
    real_embed, real_verify, real_quantize = verify.embed_all, verify.verify_models, quantize.quantize_int8

    def spy_embed(fn: Any, images: ImageSet, batch_size: int = 32) -> np.ndarray:
        seen_calls.append((phase[0], set(images.paths)))
        return real_embed(fn, images, batch_size)

    def spy_verify(*args: Any, **kwargs: Any) -> Any:
        phase[0] = "verification"
        try:
            return real_verify(*args, **kwargs)
        finally:
            phase[0] = "export"

    calib_paths: list[set[str]] = []

    def spy_quantize(fp32: Any, out: Any, calibration: ImageSet, **kwargs: Any) -> Any:
        calib_paths.append(set(calibration.paths))
        assert kwargs["check"] is not None and set(kwargs["check"].data.paths) == holdout
        return real_quantize(fp32, out, calibration, **kwargs)

    monkeypatch.setattr(verify, "embed_all", spy_embed)
    monkeypatch.setattr(verify, "verify_models", spy_verify)
    monkeypatch.setattr(quantize, "quantize_int8", spy_quantize)
    options = ExportOptions(
        precisions=("int8",),
        calib_dir=bench,
        calib_count=16,
        exporter="torchscript",
        verify_count=4,
        int8_fallback=2,
        int8_float_policy="none",
        tolerances=Tolerances(int8_min_top10_overlap=1.0, int8_max_map_delta=1.0),  # fallback target 1.0
    )
    try:
        result = export_bundle(net(), config(), tmp_path / "b", options, source=SOURCE)
        manifest = result.manifest
    except VerificationFailed:
        manifest = json.loads((tmp_path / "b.failed" / "manifest.json").read_text())
    # calibration: seen images outside the holdout
    assert len(calib_paths) == 1 and calib_paths[0]
    assert not calib_paths[0] & holdout and not calib_paths[0] & evaluation
    # the fallback's check embedded the holdout (fp32 once, then each candidate int8 model)
    export_calls = [paths for phase_, paths in seen_calls if phase_ == "export"]
    assert sum(1 for paths in export_calls if paths == holdout) >= 2
    for paths in export_calls:
        assert not paths & evaluation, "an automatic choice looked at the evaluation images"
    # the verification, and only it, reads the evaluation images
    assert any(paths & evaluation for phase_, paths in seen_calls if phase_ == "verification")
    cal = manifest["calibration"]
    assert cal["sensitivity_fallback"]["measured_on"].startswith("holdout: ")
    assert cal["split"]["holdout_images"] == {"photo": 8, "sketch": 4}
    assert sorted(cal["split"]["holdout_classes"]) == sorted(split_holdout(data, seed=0).holdout_classes)
    assert cal["split"]["used_for"]["evaluation"] == "the verification report only"
    for step in cal["sensitivity_fallback"]["steps"]:
        assert step["groups"] == 2 and step["queries"] == 4 and "delta_map_all" in step


def test_loaded_sets_are_disjoint(bench: Path) -> None:
    """The images the export loads for each role: calibration, holdout and evaluation share nothing."""
    data = open_source(bench)
    assert data.evaluation is not None
    split = split_holdout(data, seed=0)
    specs = {"photo": SPEC, "sketch": SPEC}
    calib = load_images(split.calibration, specs, 8, seed=0)
    hold = load_images(split.holdout, specs, None, seed=2)
    evaluation = load_images(data.evaluation, specs, None, seed=1)
    sets = [set(calib.paths), set(hold.paths), set(evaluation.paths)]
    assert all(sets)
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert {str(it.path) for it in pick(split.calibration["photo"], 8, 0, "photo")} <= sets[0]


# ----------------------------------------------------------------------------------------- pieces


def test_overlap_estimate_lower_bound_by_class() -> None:
    # 2 classes x 2 sketch queries, 4 photos; the candidate swaps the top-1 of class 1's queries only
    photos = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0.5, 0, 0], [1, 0.4, 0, 0], [0, 0, 1, 0.5], [0, 0, 1, 0.4]], dtype=np.float32)
    moved = queries.copy()
    moved[2:] = [[0, 0, 0.5, 1], [0, 0, 0.4, 1]]
    data = ImageSet(
        np.zeros((8, 1), dtype=np.float32),
        np.array([1, 1, 1, 1, 0, 0, 0, 0]),
        np.array([0, 0, 1, 1, 0, 0, 1, 1]),
    )
    ref = np.concatenate([photos, queries])
    got = np.concatenate([photos, moved])
    est = overlap_estimate(ref, got, data, k=1)
    assert est["overlap"] == 0.5 and est["groups"] == 2 and est["queries"] == 4
    sd = float(np.std([1.0, 0.0], ddof=1))
    assert est["group_sd"] == pytest.approx(sd)
    assert est["lower_bound"] == pytest.approx(0.5 - 1.645 * sd * np.sqrt(2 / 2))
    same = overlap_estimate(ref, ref, data, k=1)
    assert same["overlap"] == same["lower_bound"] == 1.0


def test_mse_threshold_aligns_point_masses_and_clips_outliers() -> None:
    rng = np.random.default_rng(0)
    values = np.abs(rng.standard_normal(200_000))
    values[:3] = 6.0  # a few values past the bulk: clipping them costs less than a coarser grid
    hist, edges = np.histogram(values, bins=8192)
    t = mse_threshold(hist, edges)

    def err(threshold: float) -> float:
        step = threshold / 127
        return float(((values - np.minimum(np.round(values / step), 127) * step) ** 2).sum())

    assert t < 0.9 * float(values.max())
    for other in (float(values.max()), *np.quantile(values, [0.999, 0.9999, 0.99999])):
        assert err(t) <= err(float(other)) * 1.01
    # a large point mass (a flat background) lands on an int8 level
    flat = np.concatenate([np.full(100_000, 1.013), rng.uniform(0, 2.0, 10_000)])
    hist, edges = np.histogram(flat, bins=8192)
    t = mse_threshold(hist, edges)
    step = t / 127
    assert abs(1.013 / step - round(1.013 / step)) < 0.1


def test_first_last_policy_nodes(tmp_path: Path) -> None:
    export_onnx(net(), tmp_path / "m.onnx", domain_conditioned=False, input_size=(SIZE, SIZE), exporter="torchscript")
    model = onnx.load(str(tmp_path / "m.onnx"))
    quantize._name_nodes(model)
    heavy = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(heavy) == 4
    chosen = policy_float_nodes(model, "first-last")
    assert chosen == [heavy[0].name, heavy[-1].name]
    assert policy_float_nodes(model, "none") == []
    rng = np.random.default_rng(0)
    calib = ImageSet(
        rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32),
        (np.arange(16) % 2).astype(np.int64),
        np.full(16, -1, dtype=np.int64),
    )
    report = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", calib)
    assert report.method == "mse" and report.float_policy == "first-last"
    assert report.quantized_nodes == 2 and report.float_reasons["policy first-last"] == chosen
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    for name in chosen:  # float weights and a float input
        node = by_name[name]
        assert all(x not in producer or producer[x].op_type != "DequantizeLinear" for x in node.input)
