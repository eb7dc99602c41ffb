"""`zsbir export`: ONNX fp32/fp16/int8 graphs, verification, manifest, atomic bundles and CLI errors.

The models here are tiny torch modules defined in this file (a residual CNN with an optional
domain-conditioned squeeze-excitation, like CSE-ResNet) plus, where the checkpoint loader is present,
real checkpoints of ours and in the official DSN layout. Inputs are 32x32 so the whole file stays fast.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402
from zsbir_export.bundle import ExportOptions, ExportOptionsError, VerificationFailed, export_bundle  # noqa: E402
from zsbir_export.calibration import CalibrationError, ImageSet, open_source  # noqa: E402
from zsbir_export.fp16 import convert_to_fp16  # noqa: E402
from zsbir_export.onnx_export import ExportError, export_onnx  # noqa: E402
from zsbir_export.quantize import CalibMethod, quantize_int8  # noqa: E402
from zsbir_export.tensorrt_build import (  # noqa: E402
    INSTALL_HINT,
    EngineBuildError,
    EngineSpec,
    GpuInfo,
    PlanMismatchError,
    TensorRTUnavailable,
    build_engine,
    check_plan_compatible,
    tensorrt_available,
)
from zsbir_export.verify import Tolerances, compare, topk_overlap  # noqa: E402

from zsbir_infer.cli import main  # noqa: E402
from zsbir_infer.preprocess import PreprocessSpec  # noqa: E402

SIZE = 32
SPEC = PreprocessSpec(size=(SIZE, SIZE)).to_dict()  # squash, bilinear, ImageNet mean/std, RGB


class TinyNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, optional domain-conditioned SE gate, linear head, L2 norm."""

    def __init__(self, conditioned: bool, dim: int = 16, width: int = 16) -> None:
        super().__init__()
        self.conditioned = conditioned
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.se = nn.Linear(width + 1, width)
        self.head = nn.Linear(width, dim)
        for bn in (self.stem[1], self.block[1]):
            assert isinstance(bn, nn.BatchNorm2d)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

    def embed(self, x: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        pooled = h.mean(dim=(2, 3))
        if self.conditioned:
            gate = torch.sigmoid(self.se(torch.cat([pooled, tag.to(pooled.dtype)[:, None]], dim=1)))
            h = h * gate[:, :, None, None]
        return nn.functional.normalize(self.head(h.mean(dim=(2, 3))), dim=1)


def config_for(conditioned: bool) -> dict[str, Any]:
    return {
        "format": "zsbir-checkpoint",
        "version": 1,
        "method": "none",
        "arch": {"backbone": "tiny", "domain_conditioned": conditioned, "embed_dim": 16},
        "preprocess": {"photo": dict(SPEC), "sketch": dict(SPEC)},
    }


def tiny(conditioned: bool) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(conditioned).eval()


SOURCE = {"path": "tiny", "sha256": "0" * 64, "format": "zsbir", "method": "none"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic benchmark (CONTRACTS §1) for calibration and the unseen-split checks."""
    from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic

    root = tmp_path_factory.mktemp("bench") / "synth"
    cfg = SynthConfig(classes=8, unseen=4, photos_per_class=6, sketches_per_class=3, size=32, seed=3)
    generate_synthetic(root, cfg, workers=1, progress=False)
    return root


def run_onnx(path: Path, images: np.ndarray, domains: np.ndarray | None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"image": images}
    if domains is not None:
        feed["domain"] = domains
    return np.asarray(sess.run(["embedding"], feed)[0])


# ----------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_export_domain_input_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    model = tiny(True)
    info = export_onnx(model, tmp_path / "m.onnx", domain_conditioned=True, input_size=(SIZE, SIZE), exporter=exporter)
    assert info.embedding_dim == 16
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inputs = {i.name: i for i in graph.input}
    assert set(inputs) == {"image", "domain"}
    assert inputs["domain"].type.tensor_type.elem_type == TensorProto.INT64
    assert inputs["image"].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in graph.output] == ["embedding"]
    assert not any(n.op_type == "BatchNormalization" for n in graph.node), "BN should be folded into conv"
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        tags = (np.arange(batch) % 2).astype(np.int64)
        got = run_onnx(tmp_path / "m.onnx", x, tags)
        with torch.no_grad():
            ref = model.embed(torch.from_numpy(x), torch.from_numpy(tags)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the tag matters: the same image embeds differently as photo and as sketch
    x = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    photo = run_onnx(tmp_path / "m.onnx", x, np.array([1], dtype=np.int64))
    sketch = run_onnx(tmp_path / "m.onnx", x, np.array([0], dtype=np.int64))
    assert np.abs(photo - sketch).max() > 1e-4


def test_onnx_export_is_reproducible_and_free_of_source_locations(tmp_path: Path) -> None:
    """The fingerprint hashes the file: it must not change with stack traces or line numbers of the source."""
    model = tiny(True)
    for name in ("a.onnx", "b.onnx"):
        export_onnx(model, tmp_path / name, domain_conditioned=True, input_size=(SIZE, SIZE), exporter="dynamo")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    assert all(not n.doc_string and len(n.metadata_props) == 0 for n in graph.node)


def test_onnx_export_unconditioned_has_no_domain_input(tmp_path: Path) -> None:
    export_onnx(
        tiny(False), tmp_path / "m.onnx", domain_conditioned=False, input_size=(SIZE, SIZE), exporter="torchscript"
    )
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["image"]


def test_onnx_export_rejects_config_that_hides_domain_use(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="domain_conditioned false"):
        export_onnx(
            tiny(True), tmp_path / "m.onnx", domain_conditioned=False, input_size=(SIZE, SIZE), exporter="torchscript"
        )


def test_onnx_export_rejects_model_without_embed(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="embed"):
        export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", domain_conditioned=True, input_size=(SIZE, SIZE))


# ----------------------------------------------------------------------------------------------- FP16


def _hand_graph() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """y = normalize(x @ W + b): a MatMul/Add body and a ReduceL2/Div tail."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["z"], name="add"),
        helper.make_node("ReduceL2", ["z", "axes"], ["n"], keepdims=1, name="l2"),
        helper.make_node("Div", ["z", "n"], ["y"], name="div"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model, w, b


def test_fp16_converter_hand_graph() -> None:
    model, w, b = _hand_graph()
    half = convert_to_fp16(model)
    g = half.graph
    assert g.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {i.name: i for i in g.initializer}
    mm = next(n for n in g.node if n.name == "mm")
    assert inits[mm.input[1]].data_type == TensorProto.FLOAT16
    # the normalization tail (after the last MatMul) computes in float32
    l2 = next(n for n in g.node if n.name == "l2")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in g.value_info}
    assert types[l2.input[0]] == TensorProto.FLOAT
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    sess = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    # reference computed with the same fp16-rounded weights and inputs
    z = (x.astype(np.float16).astype(np.float32) @ w.astype(np.float16).astype(np.float32)) + b.astype(np.float16)
    ref = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=3e-3)


def test_fp16_converter_rejects_out_of_range_weights() -> None:
    from zsbir_export.fp16 import Fp16Error

    model, _, _ = _hand_graph()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((6, 4), 1e6, dtype=np.float32), "W"))
    with pytest.raises(Fp16Error, match="float16 range"):
        convert_to_fp16(model)


# ----------------------------------------------------------------------------------------------- INT8


def _tiny_int8_inputs(tmp_path: Path, n: int, *, seed: int) -> ImageSet:
    """A tiny domain-conditioned model exported to ``tmp_path/m.onnx`` and ``n`` random calibration images."""
    export_onnx(
        tiny(True), tmp_path / "m.onnx", domain_conditioned=True, input_size=(SIZE, SIZE), exporter="torchscript"
    )
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    return ImageSet(images, (np.arange(n) % 2).astype(np.int64), np.full(n, -1, dtype=np.int64))


def test_int8_qdq_structure(tmp_path: Path) -> None:
    model = tiny(True)
    export_onnx(model, tmp_path / "m.onnx", domain_conditioned=True, input_size=(SIZE, SIZE), exporter="torchscript")
    rng = np.random.default_rng(0)
    calib = ImageSet(
        rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32),
        (np.arange(16) % 2).astype(np.int64),
        np.full(16, -1, dtype=np.int64),
    )
    report = quantize_int8(
        tmp_path / "m.onnx", tmp_path / "q.onnx", calib, method="percentile", batch_size=4, float_policy="none"
    )
    assert report.per_domain == {"photo": 8, "sketch": 8}
    q = onnx.load(str(tmp_path / "q.onnx"))
    g = q.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    qnodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqnodes = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert qnodes and dqnodes
    for n in qnodes + dqnodes:  # symmetric int8 everywhere: zero point 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(producer[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    # weights per output channel: one scale per filter
    w_scale = inits[producer[convs[0].input[1]].input[1]]
    assert w_scale.ndim == 1 and w_scale.size == 16
    # Q/DQ on the inputs of the heavy ops only, never on their outputs (TensorRT's recommended placement)
    heavy_outputs = {o for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") for o in n.output}
    assert not any(n.input[0] in heavy_outputs for n in qnodes)
    # the domain input and the normalization stay float: nothing quantizes them
    assert not any("domain" in n.input for n in qnodes)
    l2 = next(n for n in g.node if n.op_type == "ReduceL2")
    assert producer[l2.input[0]].op_type != "DequantizeLinear"
    x = rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    tags = np.array([0, 1, 0, 1], dtype=np.int64)
    got = run_onnx(tmp_path / "q.onnx", x, tags)
    with torch.no_grad():
        ref = model.embed(torch.from_numpy(x), torch.from_numpy(tags)).numpy()
    assert compare(ref, got)["min_cosine"] > 0.99


def _calibration_cache(
    tmp_path: Path, calib: ImageSet, method: CalibMethod, name: str, monkeypatch: pytest.MonkeyPatch, memory: int
) -> tuple[dict[str, tuple[float, float]], list[int], int]:
    """The ranges one calibration of ``m.onnx`` writes with ``memory`` bytes available, its chunk sizes and
    the activation bytes of one batch of 4 (measured as the calibration's own probe does)."""
    import zsbir_export.quantize as quantize_module
    from onnxruntime.quantization.calibrate import load_tensors_data

    chunks: list[int] = []
    per_batch: list[int] = []
    real_chunk = quantize_module.calibration_chunk

    def spy(calibrator: Any, probe: Any, n_images: int, batch_size: int) -> int:
        per_batch.append(sum(int(o.nbytes) for o in calibrator.infer_session.run(None, probe.get_next())))
        chunks.append(real_chunk(calibrator, probe, n_images, batch_size))
        return chunks[-1]

    monkeypatch.setattr(quantize_module, "calibration_chunk", spy)
    monkeypatch.setattr(quantize_module, "available_memory", lambda: memory)
    work = tmp_path / name
    work.mkdir()
    quantize_module._calibrate(tmp_path / "m.onnx", work / "cache", calib, method, 4, work)
    data = load_tensors_data(work / "cache")
    ranges = {k: (float(np.ravel(v.range_value)[0]), float(np.ravel(v.range_value)[-1])) for k, v in data.data.items()}
    return ranges, chunks, per_batch[0]


def test_int8_calibration_streams_what_would_not_fit_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's calibrators keep every batch's activations until the end of a collect call: a calibration set
    whose activations would not fit is collected in chunks that fit (the 192 px default's 256 images were
    killed by the OOM killer in one call). min-max ranges are exactly those of one call; mse thresholds stay
    close (the histogram keeps the first chunk's bin width); a batch that cannot fit is refused up front."""
    import zsbir_export.quantize as quantize_module
    from zsbir_export.quantize import CalibrationMemoryError

    calib = _tiny_int8_inputs(tmp_path, 32, seed=1)
    calib.images[29, 0, 3, 3] = 6.0  # the largest value, in the last chunk: the histogram must grow to cover it
    # Budgets with room for 2 batches of 4, not 3, measured per method (min-max keeps only reductions).
    one, chunks, per_batch = _calibration_cache(tmp_path, calib, "minmax", "one", monkeypatch, 2**40)
    assert chunks == [32]
    budget = int(2.5 * per_batch / quantize_module.CALIB_MEMORY_SHARE)
    streamed, chunks, _ = _calibration_cache(tmp_path, calib, "minmax", "streamed", monkeypatch, budget)
    assert chunks == [8]  # 4 collect calls of 2 batches
    assert streamed.keys() == one.keys() and streamed == one
    assert max(hi for _, hi in one.values()) >= 6.0  # the later chunk's outlier is in the image input's range
    mse_one, _, per_batch = _calibration_cache(tmp_path, calib, "mse", "mse_one", monkeypatch, 2**40)
    budget = int(2.5 * per_batch / quantize_module.CALIB_MEMORY_SHARE)
    mse_streamed, chunks, _ = _calibration_cache(tmp_path, calib, "mse", "mse_streamed", monkeypatch, budget)
    assert chunks == [8] and mse_streamed.keys() == mse_one.keys()
    for name, (_, hi) in mse_one.items():
        assert mse_streamed[name][1] == pytest.approx(hi, rel=0.05, abs=1e-6), name
    # quantize_int8 end to end with the small budget, then with no room for one batch.
    monkeypatch.undo()
    monkeypatch.setattr(quantize_module, "available_memory", lambda: budget)
    quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", calib, method="mse", batch_size=4, float_policy="none")
    assert (tmp_path / "q.onnx").is_file()
    monkeypatch.setattr(quantize_module, "available_memory", lambda: 64 * 2**10)  # 64 KiB: not one batch fits
    with pytest.raises(CalibrationMemoryError, match=r"MiB of activations for one batch of 4 images"):
        quantize_int8(tmp_path / "m.onnx", tmp_path / "q2.onnx", calib, method="mse", batch_size=4, float_policy="none")
    assert not (tmp_path / "q2.onnx").exists()
    assert quantize_module.available_memory() is None or quantize_module.available_memory() > 0


def test_int8_calibration_methods_ranges(tmp_path: Path) -> None:
    """minmax: the image input's scale is max|x| / 127 (computed by hand); percentile and entropy clip
    below that, and entropy is a real KL search (not silently the full range)."""
    export_onnx(
        tiny(True), tmp_path / "m.onnx", domain_conditioned=True, input_size=(SIZE, SIZE), exporter="torchscript"
    )
    rng = np.random.default_rng(5)
    images = rng.standard_normal((64, 3, SIZE, SIZE)).astype(np.float32)
    images[0, 0, 0, 0] = 9.0  # one outlier in ~2e5 values: min-max must cover it, the clipping methods should not
    calib = ImageSet(images, (np.arange(64) % 2).astype(np.int64), np.full(64, -1, dtype=np.int64))
    scales: dict[str, dict[str, float]] = {}
    for method in ("minmax", "percentile", "entropy", "mse"):
        quantize_int8(
            tmp_path / "m.onnx", tmp_path / f"{method}.onnx", calib, method=method, batch_size=16, float_policy="none"
        )
        g = onnx.load(str(tmp_path / f"{method}.onnx")).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        scales[method] = {n.input[0]: float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear"}
    assert scales["minmax"]["image"] == pytest.approx(9.0 / 127, rel=1e-6)
    # percentile: the smallest |x| covering 99.999% of the values (here the second largest, 4.82, not the
    # outlier), to within the 2048-bin histogram's resolution
    expected = float(np.quantile(np.abs(images), 0.99999, method="higher"))
    assert 4.5 < expected < 5.0
    assert scales["percentile"]["image"] * 127 == pytest.approx(expected, abs=0.05)
    assert scales["entropy"]["image"] < 0.6 * scales["minmax"]["image"]
    # mse: a threshold inside the observed range that clips the lone outlier too
    assert scales["mse"]["image"] < 0.8 * scales["minmax"]["image"]
    for method in ("percentile", "entropy", "mse"):
        assert all(scales[method][k] <= scales["minmax"][k] * (1 + 1e-6) for k in scales["minmax"])


def test_int8_sensitivity_fallback(tmp_path: Path) -> None:
    calib = _tiny_int8_inputs(tmp_path, 24, seed=6)
    # reachable target: nothing falls back
    easy = quantize_int8(
        tmp_path / "m.onnx", tmp_path / "a.onnx", calib, max_float_layers=3, target_overlap=0.0, float_policy="none"
    )
    assert easy.fallback_nodes == [] and easy.fallback_report["initial"] == easy.fallback_report["final"]
    assert easy.fallback_report["measured_on"] == "calibration images (optimistic)"
    # unreachable target: exactly max_float_layers layers, the most sensitive first, end up in float
    hard = quantize_int8(
        tmp_path / "m.onnx", tmp_path / "b.onnx", calib, max_float_layers=2, target_overlap=1.01, float_policy="none"
    )
    assert len(hard.fallback_nodes) == 2
    assert hard.fallback_report["reached_target"] is False
    assert [s["float_layers"] for s in hard.fallback_report["steps"]] == [
        [],
        hard.fallback_nodes[:1],
        hard.fallback_nodes,
    ]
    sens = hard.fallback_report["sensitivity_top"]
    assert list(sens)[:2] == hard.fallback_nodes and sens[hard.fallback_nodes[0]] >= sens[hard.fallback_nodes[1]]
    g = onnx.load(str(tmp_path / "b.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    for name in hard.fallback_nodes:  # float weights: no DequantizeLinear in front of them
        node = by_name[name]
        assert node.input[1] not in producer or producer[node.input[1]].op_type != "DequantizeLinear"
    assert hard.quantized_nodes == easy.quantized_nodes - 2
    assert hard.to_dict()["sensitivity_fallback_nodes"] == hard.fallback_nodes


# ------------------------------------------------------------------------------------------ verification


def test_compare_and_overlap_hand_cases() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32) / np.array([[1.0], [np.sqrt(2)]], dtype=np.float32)
    res = compare(a, b)
    assert res["min_cosine"] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert res["mean_cosine"] == pytest.approx((1 + 1 / np.sqrt(2)) / 2, abs=1e-6)
    assert res["max_abs_diff"] == pytest.approx(1 / np.sqrt(2), abs=1e-6)  # row 2, first coordinate
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g1 = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)  # top-2: items 0, 1
    g2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], dtype=np.float32)  # top-2: items 0, 2
    assert topk_overlap(q, g1, q, g1, k=2) == 1.0
    assert topk_overlap(q, g1, q, g2, k=2) == 0.5


# -------------------------------------------------------------------------------------------- bundles


def _assert_manifest(bundle: Path, manifest: dict[str, Any], conditioned: bool, precisions: list[str]) -> None:
    on_disk = json.loads((bundle / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "zsbir-bundle" and manifest["format_version"] == 1
    assert manifest["metric"] == "ip" and manifest["normalized"] is True
    assert manifest["embedding_dim"] == 16
    assert manifest["domain_handling"] == ("input" if conditioned else "none")
    assert manifest["inputs"]["image"] == {"name": "image", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"}
    if conditioned:
        assert manifest["inputs"]["domain"] == {
            "name": "domain",
            "shape": ["batch"],
            "dtype": "int64",
            "photo": 1,
            "sketch": 0,
        }
    else:
        assert "domain" not in manifest["inputs"]
    assert manifest["outputs"]["embedding"] == {"name": "embedding", "shape": ["batch", 16], "dtype": "float32"}
    assert manifest["preprocess"] == {"photo": SPEC, "sketch": SPEC}
    assert sorted(manifest["models"]) == sorted(precisions)
    for entry in manifest["models"].values():
        data = (bundle / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    fp32 = (bundle / "model.onnx").read_bytes()
    canon = json.dumps({"photo": SPEC, "sketch": SPEC}, sort_keys=True, separators=(",", ":"))
    assert manifest["fingerprint"] == hashlib.sha256(fp32 + canon.encode()).hexdigest()[:16]
    assert manifest["source"] == SOURCE
    assert manifest["engines"] == []
    for key in ("torch", "onnx", "onnxruntime"):
        assert manifest["versions"][key]
    assert manifest["verification"]["passed"] is True
    assert manifest["created"]
    # the runtime reader accepts what the writer wrote
    from zsbir_infer.bundle import Bundle

    opened = Bundle.open(bundle)
    opened.verify()
    assert opened.fingerprint == manifest["fingerprint"]


def test_bundle_all_precisions_with_benchmark(tmp_path: Path, bench: Path) -> None:
    out = tmp_path / "bundle"
    options = ExportOptions(
        precisions=("fp16", "int8"),
        calib_dir=bench,
        calib_count=24,
        calib_method="percentile",
        exporter="torchscript",
        verify_count=8,
    )
    result = export_bundle(tiny(True), config_for(True), out, options, source=SOURCE)
    m = result.manifest
    _assert_manifest(out, m, True, ["fp32", "fp16", "int8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "no temporary folder may remain"
    v = m["verification"]
    assert v["fp32"]["vs_torch"]["min_cosine"] >= 0.99999
    assert v["fp16"]["vs_torch"]["min_cosine"] >= 0.999
    assert v["samples"]["photo"] == 8 and v["samples"]["sketch"] == 8
    assert "unseen" in v["samples"]["source"]
    # retrieval checks on the unseen split: 4 classes x 6 photos, 4 x 3 sketches
    assert v["evaluation"] == {
        "source": f"benchmark {bench}, unseen split",
        "queries": 12,
        "gallery": 24,
        "labelled": True,
    }
    for p in ("fp16", "int8"):
        assert 0.0 <= v[p]["top10_overlap"] <= 1.0
        assert v[p]["delta_map_all"] == pytest.approx(v[p]["retrieval"]["map_all"] - v["fp32"]["retrieval"]["map_all"])
    assert abs(v["fp16"]["delta_map_all"]) <= 0.002
    names = {c["name"] for c in v["checks"]}
    assert {
        "fp16 |delta mAP@all| vs fp32",
        "fp32 min cosine vs torch",
        "fp16 min cosine vs torch",
        "int8 top-10 overlap with fp32",
        "int8 |delta mAP@all| vs fp32",
    } <= names
    cal = m["calibration"]
    assert cal["method"] == "percentile" and cal["format"] == "QDQ" and cal["percentile"] == 99.999
    # one of the 4 seen classes is the holdout: 3 classes x 6 photos, 3 x 3 sketches are left to calibrate
    assert cal["per_domain"] == {"photo": 12, "sketch": 9}
    assert cal["source"]["kind"] == "benchmark" and cal["source"]["calibration_split"] == "seen"
    split = cal["split"]
    assert split["calibration_pool"] == {"photo": 18, "sketch": 9} and split["holdout_pool"] == {
        "photo": 6,
        "sketch": 3,
    }
    assert split["calibration_images"] == {"photo": 12, "sketch": 9} and split["holdout_images"] == {
        "photo": 6,
        "sketch": 3,
    }
    assert len(split["holdout_classes"]) == 1 and split["evaluation"] == f"benchmark {bench}, unseen split"
    assert cal["float_policy"] == "first-last" and cal["qdq_placement"].startswith("inputs only")


def test_bundle_fp32_unconditioned_random_samples(tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = export_bundle(
        tiny(False), config_for(False), out, ExportOptions(exporter="torchscript", verify_count=4), source=SOURCE
    )
    _assert_manifest(out, result.manifest, False, ["fp32"])
    assert result.manifest["calibration"] is None
    assert "random" in result.manifest["verification"]["samples"]["source"]


def test_bundle_plain_calibration_folder(tmp_path: Path, bench: Path) -> None:
    plain = tmp_path / "plain"
    for domain in ("photo", "sketch"):
        files = sorted((bench / domain).rglob("*.*"))[:10]
        (plain / domain).mkdir(parents=True)
        for i, f in enumerate(files):
            (plain / domain / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    src = open_source(plain)
    assert src.kind == "folder" and len(src.calibration["photo"]) == 10
    options = ExportOptions(
        precisions=("int8",),
        calib_dir=plain,
        calib_count=10,
        calib_method="minmax",
        exporter="torchscript",
        verify_count=4,
    )
    result = export_bundle(tiny(True), config_for(True), tmp_path / "b", options, source=SOURCE)
    v = result.manifest["verification"]
    assert v["evaluation"]["labelled"] is False
    assert v["evaluation"]["source"] == f"folder {plain}, images not used for calibration or the holdout"
    # 10 per domain: 2 held out, 5 of the other 8 calibrate, 3 verify
    assert v["evaluation"]["queries"] == 3 and v["evaluation"]["gallery"] == 3
    split = result.manifest["calibration"]["split"]
    assert split["holdout_images"] == {"photo": 2, "sketch": 2}
    assert split["calibration_images"] == {"photo": 5, "sketch": 5}
    assert "retrieval" not in v["int8"] and 0.0 <= v["int8"]["top10_overlap"] <= 1.0
    assert result.manifest["calibration"]["method"] == "minmax"


def test_overwrite_keeps_other_files(tmp_path: Path, bench: Path) -> None:
    """Re-exporting into a folder that also holds a checkpoint (like assets/default) keeps the checkpoint
    and drops the old bundle's stale files."""
    out = tmp_path / "default"
    options = ExportOptions(
        precisions=("int8",),
        calib_dir=bench,
        calib_count=8,
        exporter="torchscript",
        verify_count=4,
        tolerances=Tolerances(int8_min_top10_overlap=0.0, int8_max_map_delta=1.0),
    )
    export_bundle(tiny(True), config_for(True), out, options, source=SOURCE)
    (out / "checkpoint.safetensors").write_bytes(b"weights")
    (out / "checkpoint.json").write_text("{}")
    assert (out / "model.int8.onnx").exists()
    result = export_bundle(
        tiny(False),
        config_for(False),
        out,
        ExportOptions(exporter="torchscript", overwrite=True, verify_count=4),
        source=SOURCE,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.json",
        "checkpoint.safetensors",
        "manifest.json",
        "model.onnx",
    ]
    assert (out / "checkpoint.safetensors").read_bytes() == b"weights"
    _assert_manifest(out, result.manifest, False, ["fp32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]


def test_failed_verification_is_not_a_bundle(tmp_path: Path, bench: Path) -> None:
    out = tmp_path / "b"
    options = ExportOptions(
        precisions=("int8",),
        calib_dir=bench,
        calib_count=8,
        exporter="torchscript",
        verify_count=4,
        tolerances=Tolerances(int8_min_top10_overlap=1.01),  # impossible on purpose
        int8_fallback=2,
    )
    with pytest.raises(VerificationFailed, match=r"int8 top-10 overlap with fp32 .* < 1\.01 \(FAILED\)") as err:
        export_bundle(tiny(True), config_for(True), out, options, source=SOURCE)
    assert not out.exists()
    failed = tmp_path / "b.failed"
    assert err.value.failed_dir == failed
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is False
    # the sensitivity fallback measured on the holdout, never on the verification's images (its target is
    # capped at 1.0: when the int8 rankings already match fp32 there is nothing to fall back, else it spends
    # its budget on the layers left after the first/last policy)
    fb = manifest["calibration"]["sensitivity_fallback"]
    assert fb["measured_on"].startswith("holdout: seeded choice of 20% of the seen classes") and fb["target"] == 1.0
    assert "unseen" not in fb["measured_on"]
    nodes = manifest["calibration"]["sensitivity_fallback_nodes"]
    assert (fb["initial"] >= 1.0 and nodes == []) or (nodes and nodes == list(fb["sensitivity_top"])[: len(nodes)])
    assert fb["final"] == fb["steps"][-1]["score"] == fb["steps"][-1]["lower_bound"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.failed"]


def test_bundle_option_errors(tmp_path: Path, bench: Path) -> None:
    model, cfg = tiny(True), config_for(True)
    with pytest.raises(ExportOptionsError, match="--calib"):
        export_bundle(model, cfg, tmp_path / "b", ExportOptions(precisions=("int8",)), source=SOURCE)
    with pytest.raises(ExportOptionsError, match="unknown precision int4"):
        export_bundle(model, cfg, tmp_path / "b", ExportOptions(precisions=("int4",)), source=SOURCE)
    with pytest.raises(ExportOptionsError, match="opt-batch"):
        export_bundle(model, cfg, tmp_path / "b", ExportOptions(opt_batch=64, max_batch=8), source=SOURCE)
    bad = dict(cfg, preprocess={"photo": SPEC, "sketch": dict(SPEC, size=[64, 64])})
    with pytest.raises(ExportOptionsError, match="sizes differ"):
        export_bundle(model, bad, tmp_path / "b", ExportOptions(), source=SOURCE)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportOptionsError, match="--overwrite"):
        export_bundle(model, cfg, tmp_path / "exists", ExportOptions(), source=SOURCE)
    empty = tmp_path / "empty"
    (empty / "photo").mkdir(parents=True)
    (empty / "sketch").mkdir()
    with pytest.raises(CalibrationError, match="no photo and no sketch images"):
        open_source(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists"]


# ------------------------------------------------------------------------------------------- TensorRT


def test_tensorrt_absent_message(tmp_path: Path) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    spec = EngineSpec("fp16", tmp_path / "m.onnx", tmp_path / "m.plan", (3, SIZE, SIZE), True)
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'zsbir\[tensorrt\]'"):
        build_engine(spec)
    with pytest.raises(ExportOptionsError, match="TensorRT is not installed"):
        export_bundle(tiny(True), config_for(True), tmp_path / "b", ExportOptions(trt=True), source=SOURCE)
    assert not any(tmp_path.iterdir())


def test_plan_compatibility_check() -> None:
    engine = {
        "precision": "int8",
        "file": "model.int8.h100.plan",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "tensorrt": "10.13.0.35",
    }
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    assert h100.slug == "h100-80gb-hbm3"
    check_plan_compatible(engine, gpu=h100, tensorrt_version="10.13.0.40")  # build number may differ
    check_plan_compatible(engine, gpu=GpuInfo("nvidia  h100 80GB HBM3", "9.0"), tensorrt_version="10.13.0")
    with pytest.raises(PlanMismatchError, match="GPU 'NVIDIA H100 80GB HBM3'"):
        check_plan_compatible(engine, gpu=GpuInfo("NVIDIA H100 PCIe", "9.0"), tensorrt_version="10.13.0.35")
    with pytest.raises(PlanMismatchError, match=r"compute capability 9\.0 \(this GPU: 8\.9\).*--precision int8 --trt"):
        check_plan_compatible(engine, gpu=GpuInfo("NVIDIA L4", "8.9"), tensorrt_version="10.13.0.35")
    with pytest.raises(PlanMismatchError, match=r"TensorRT 10\.13\.0\.35 \(installed: 10\.14\.1\)"):
        check_plan_compatible(engine, gpu=h100, tensorrt_version="10.14.1")


class _FakeTRT:
    """Just enough of the TensorRT 10 Python API to exercise build_engine without a GPU.

    It records what the builder was asked for; the "plan" it serializes is a JSON description of that.
    """

    __version__ = "10.13.0.35"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class BuilderFlag:
        FP16 = "FP16"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Dims(list):  # type: ignore[type-arg]
        pass

    def __init__(self, parse_ok: bool = True, build_ok: bool = True) -> None:
        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.calls: dict[str, Any] = {}
        fake = self

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, list[list[int]]] = {}

            def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
                self.shapes[name] = [list(lo), list(opt), list(hi)]

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+tuned"

        class Config:
            def __init__(self) -> None:
                self.flags: list[str] = []
                self.builder_optimization_level = 3
                self.profiles: list[Profile] = []
                self.cache: Cache | None = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["workspace"] = size

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return 0

            def create_timing_cache(self, data: bytes) -> Cache:
                fake.calls["cache_in"] = bytes(data)
                return Cache(bytes(data))

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> Cache:
                assert self.cache is not None
                return self.cache

        class Parser:
            num_errors = 1

            def __init__(self, network: Any, logger: Any) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = Path(path).name
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "node Foo: unsupported operator"

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> str:
                fake.calls["network_flags"] = flags
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Config) -> bytes | None:
                if not fake.build_ok:
                    return None
                desc = {
                    "flags": config.flags,
                    "level": config.builder_optimization_level,
                    "shapes": config.profiles[0].shapes,
                }
                return json.dumps(desc).encode()

        self.Builder = Builder
        self.OnnxParser = Parser


def test_build_engine_with_fake_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    onnx_path = tmp_path / "model.int8.onnx"
    onnx_path.write_bytes(b"onnx")
    cache = tmp_path / "cache" / "trt.timing"
    spec = EngineSpec(
        "int8",
        onnx_path,
        tmp_path / "model.int8.h100.plan",
        (3, 32, 32),
        True,
        1,
        8,
        64,
        optimization_level=5,
        timing_cache=cache,
    )
    entry = build_engine(spec, gpu)
    assert fake.calls["network_flags"] == 1 << 1  # STRONGLY_TYPED
    plan = json.loads(spec.plan_path.read_bytes())
    assert plan == {
        "flags": [],
        "level": 5,
        "shapes": {"image": [[1, 3, 32, 32], [8, 3, 32, 32], [64, 3, 32, 32]], "domain": [[1], [8], [64]]},
    }
    assert entry == {
        "precision": "int8",
        "file": "model.int8.h100.plan",
        "source": "model.int8.onnx",
        "gpu": gpu.name,
        "compute_capability": "9.0",
        "tensorrt": "10.13.0.35",
        "min_batch": 1,
        "opt_batch": 8,
        "max_batch": 64,
        "strongly_typed": True,
        "builder_optimization_level": 5,
    }
    assert fake.calls["cache_in"] == b"" and cache.read_bytes() == b"+tuned"
    # fp16: weakly typed network with the FP16 flag; the saved timing cache is loaded again
    spec16 = EngineSpec("fp16", onnx_path, tmp_path / "f.plan", (3, 32, 32), False, timing_cache=cache)
    build_engine(spec16, gpu)
    assert fake.calls["network_flags"] == 0 and fake.calls["cache_in"] == b"+tuned"
    assert json.loads(spec16.plan_path.read_bytes())["flags"] == ["FP16"]
    assert "domain" not in json.loads(spec16.plan_path.read_bytes())["shapes"]
    # parser and builder failures are reported, not swallowed
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT(parse_ok=False))
    with pytest.raises(EngineBuildError, match=r"could not parse model\.int8\.onnx:\n  node Foo: unsupported operator"):
        build_engine(spec, gpu)
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT(build_ok=False))
    with pytest.raises(EngineBuildError, match="failed to build the int8 engine"):
        build_engine(spec, gpu)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        build_engine(EngineSpec("fp16", onnx_path, tmp_path / "x.plan", (3, 32, 32), False, 1, 64, 8), gpu)


def test_bundle_with_fake_tensorrt_engines(tmp_path: Path, bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zsbir_export.tensorrt_build as tb

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT())
    monkeypatch.setattr(tb, "current_gpu", lambda device=0: GpuInfo("NVIDIA L4", "8.9"))
    options = ExportOptions(
        precisions=("fp16", "int8"),
        calib_dir=bench,
        calib_count=8,
        exporter="torchscript",
        verify_count=4,
        trt=True,
        opt_batch=4,
        max_batch=16,
        timing_cache=tmp_path / "t.cache",
        tolerances=Tolerances(int8_min_top10_overlap=0.0, int8_max_map_delta=1.0),
    )
    result = export_bundle(tiny(True), config_for(True), tmp_path / "b", options, source=SOURCE)
    engines = result.manifest["engines"]
    assert [(e["precision"], e["file"], e["source"]) for e in engines] == [
        ("fp32", "model.fp32.l4.plan", "model.onnx"),
        ("fp16", "model.fp16.l4.plan", "model.onnx"),
        ("int8", "model.int8.l4.plan", "model.int8.onnx"),
    ]
    for e in engines:
        data = (tmp_path / "b" / e["file"]).read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["gpu"] == "NVIDIA L4" and e["compute_capability"] == "8.9" and e["opt_batch"] == 4
    from zsbir_infer.bundle import Bundle

    opened = Bundle.open(tmp_path / "b")
    opened.verify()
    assert [e.precision for e in opened.engines] == ["fp32", "fp16", "int8"]


@pytest.mark.gpu
def test_tensorrt_engines_build(tmp_path: Path, bench: Path) -> None:
    if not tensorrt_available():
        pytest.skip("TensorRT is not installed")
    options = ExportOptions(
        precisions=("fp16", "int8"),
        calib_dir=bench,
        calib_count=16,
        exporter="torchscript",
        trt=True,
        opt_batch=4,
        max_batch=16,
        timing_cache=tmp_path / "cache.bin",
        tolerances=Tolerances(int8_min_top10_overlap=0.0, int8_max_map_delta=1.0),
    )
    result = export_bundle(tiny(True), config_for(True), tmp_path / "b", options, source=SOURCE)
    engines = result.manifest["engines"]
    assert [e["precision"] for e in engines] == ["fp32", "fp16", "int8"]
    assert engines[2]["strongly_typed"] is True
    assert (tmp_path / "cache.bin").stat().st_size > 0
    for e in engines:
        assert (tmp_path / "b" / e["file"]).stat().st_size == e["bytes"]


# ------------------------------------------------------------------------------------------------ CLI


class _Loaded:
    def __init__(self, conditioned: bool) -> None:
        self.model = tiny(conditioned)
        self.config = config_for(conditioned)
        self.source_format = "zsbir"
        self.sha256 = "ab" * 32


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import zsbir_export.cli.export as cli_export

    monkeypatch.setattr(cli_export, "_load", lambda path, log: _Loaded(True))


def test_cli_export_writes_bundle(tmp_path: Path, bench: Path, fake_loader: None) -> None:
    res = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "ckpt.safetensors"),
            "-o",
            str(tmp_path / "b"),
            "--precision",
            "fp32,fp16",
            "--calib",
            str(bench),
            "--exporter",
            "torchscript",
            "--verify-count",
            "4",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "model.fp16.onnx" in res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == "ab" * 32 and manifest["source"]["format"] == "zsbir"
    # exporting again without --overwrite refuses; with it, replaces
    res = CliRunner().invoke(main, ["export", "x", "-o", str(tmp_path / "b"), "--exporter", "torchscript", "-q"])
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = CliRunner().invoke(
        main, ["export", "x", "-o", str(tmp_path / "b"), "--exporter", "torchscript", "-q", "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(json.loads((tmp_path / "b" / "manifest.json").read_text())["models"]) == ["fp32"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "int8"], "INT8 needs calibration images: pass --calib DIR"),
        (["--precision", "fp64"], "give a comma-separated list of fp32, fp16, int8"),
        (["--calib-method", "kl"], "Invalid value for '--calib-method'"),
        (["--int8-float-policy", "all"], "Invalid value for '--int8-float-policy'"),
        (["--precision", "int8", "--calib", "/no/such/folder"], "calibration folder does not exist"),
        (["--opt-batch", "64", "--max-batch", "8"], "1 <= --opt-batch <= --max-batch"),
        (["--default"], "either CHECKPOINT or --default"),
        (["--int8-min-overlap", "1.5"], "Invalid value for '--int8-min-overlap'"),
        (["--int8-fallback", "-1"], "Invalid value for '--int8-fallback'"),
    ],
)
def test_cli_export_option_errors(tmp_path: Path, fake_loader: None, args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["export", "ckpt", "-o", str(tmp_path / "b"), *args])
    assert res.exit_code != 0
    assert message in res.output
    assert not any(tmp_path.iterdir())


def test_cli_export_without_checkpoint(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "b")])
    assert res.exit_code != 0 and "missing CHECKPOINT" in res.output


def test_cli_export_default_model(tmp_path: Path) -> None:
    """--default exports the embedded checkpoint; its graph computes what the embedded bundle's does."""
    from zsbir_infer.cli.export import default_checkpoint_path

    ckpt = default_checkpoint_path()
    if not ckpt.is_file():
        pytest.skip("the embedded default checkpoint is not built yet")
    out = tmp_path / "b"
    res = CliRunner().invoke(
        main, ["export", "--default", "-o", str(out), "--exporter", "torchscript", "--verify-count", "2", "-q"]
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["source"]["path"]) == ckpt
    embedded = ckpt.parent / "model.onnx"
    if embedded.is_file():
        shape = manifest["inputs"]["image"]["shape"]
        x = np.random.default_rng(0).standard_normal((4, 3, shape[2], shape[3])).astype(np.float32)
        tags = np.array([0, 1, 0, 1], dtype=np.int64) if manifest["domain_handling"] == "input" else None
        a, b = run_onnx(out / "model.onnx", x, tags), run_onnx(embedded, x, tags)
        assert compare(a, b)["min_cosine"] > 0.9999


def test_cli_trt_absent_leaves_nothing(tmp_path: Path, fake_loader: None) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    res = CliRunner().invoke(main, ["export", "ckpt", "-o", str(tmp_path / "b"), "--trt"])
    assert res.exit_code != 0
    assert INSTALL_HINT in res.output
    assert not any(tmp_path.iterdir())


def test_cli_import_does_not_pull_torch() -> None:
    import subprocess

    code = "import sys, zsbir_infer.cli.export\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- real checkpoints (loader)


def test_cli_bad_checkpoint_files(tmp_path: Path) -> None:
    pytest.importorskip("zsbir_export.checkpoints")
    garbage = tmp_path / "model_best.pth.tar"
    garbage.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["export", str(garbage), "-o", str(out)])
    assert res.exit_code != 0 and "cannot load checkpoint" in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path / "missing.safetensors"), "-o", str(out)])
    assert res.exit_code != 0 and "cannot load checkpoint" in res.output
    assert not out.exists()


def test_export_our_checkpoint_and_official_dsn_layout(tmp_path: Path, bench: Path) -> None:
    ckpts = pytest.importorskip("zsbir_export.checkpoints")
    models = pytest.importorskip("zsbir_export.models")
    torch.manual_seed(0)
    plain = models.build_model({"backbone": "resnet18", "width": 8, "embed_dim": 16}).eval()
    ckpts.save_checkpoint(plain, {"preprocess": {"photo": SPEC, "sketch": SPEC}}, tmp_path / "ours")
    res = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "ours.safetensors"),
            "-o",
            str(tmp_path / "b1"),
            "--precision",
            "fp16",
            "--exporter",
            "torchscript",
            "--verify-count",
            "4",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    m1 = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert m1["domain_handling"] == "none" and m1["source"]["format"] == "zsbir"
    assert m1["source"]["sha256"] == hashlib.sha256((tmp_path / "ours.safetensors").read_bytes()).hexdigest()

    # A CSE-ResNet50 (DSN architecture, narrow so that the test is quick) saved as the official
    # model_best.pth.tar: {"state_dict": ...} with the DSN key names.
    cse = models.build_model(
        {"backbone": "cse_resnet50", "width": 8, "embed_dim": 16, "domain_conditioned": True}
    ).eval()
    official = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": cse.state_dict()}, official)
    try:
        loaded = ckpts.load_checkpoint(official)
    except ckpts.CheckpointError as exc:  # pragma: no cover - depends on the loader's official layout
        pytest.skip(f"loader does not take this synthetic DSN file: {exc}")
    assert loaded.source_format in ("dsn", "sake")
    res = CliRunner().invoke(
        main,
        [
            "export",
            str(official),
            "-o",
            str(tmp_path / "b2"),
            "--precision",
            "fp16",
            "--exporter",
            "torchscript",
            "--verify-count",
            "2",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    m2 = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert m2["domain_handling"] == "input" and m2["inputs"]["domain"]["photo"] == 1
    assert m2["source"]["format"] == loaded.source_format
    assert m2["verification"]["fp16"]["vs_torch"]["min_cosine"] >= 0.999
