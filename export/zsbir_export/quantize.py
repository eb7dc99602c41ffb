"""INT8 post-training quantization in explicit (QDQ) form, usable by ONNX Runtime and TensorRT.

``onnxruntime.quantization.quantize_static`` inserts QuantizeLinear/DequantizeLinear pairs in front of the
heavy ops (Conv, Gemm, MatMul) with

* int8 weights, symmetric, per output channel;
* int8 activations, symmetric (zero point 0, as TensorRT requires), per tensor, ranges calibrated on real
  images of both domains: ``mse`` (the default: the clipping threshold that minimizes the int8 rounding and
  clipping error of the calibration values, searched over an 8192-bin histogram of |x|), ``percentile``
  (the 99.999th percentile of |x| over a 2048-bin histogram), ``entropy`` (the KL-divergence threshold of
  TensorRT's classic calibrator, 2048 bins folded to 128) or ``minmax`` (the observed range);
* Q/DQ only on the *inputs* of those ops (activations and weights), not on their outputs: the placement
  TensorRT recommends for explicit quantization (it fuses Conv+bias+ReLU and requantizes at the next
  quantized input); quantizing a Conv's pre-ReLU output as well rounds the same values twice;
* biases left in float (TensorRT fuses them; it has no int32 bias dequantization);
* residual Adds, pooling and the other cheap ops left in float;
* the domain path (nodes fed by the ``domain`` input before any heavy op, and the heavy ops that read it
  directly) and the L2-normalization tail left in float;
* by policy (``float_policy="first-last"``, the default), the first heavy op (the stem convolution that reads
  the image) and the last one (the embedding layer) left in float, as commonly recommended for
  post-training quantization: they are cheap and the first and last layers are the most exposed to it;
* optionally (``max_float_layers``), the few layers most sensitive to quantization left in float when the
  int8 rankings drift from fp32 (see :func:`quantize_int8`; the export measures that on held-out seen
  classes, never on the images its verification reports).

How these defaults were chosen (on held-out *seen* classes only) is in
``benchmarks/results/export_default.md``. That is the form TensorRT 10 builds as a strongly typed network:
every int8 tensor is explicit in the graph.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from zsbir_export.calibration import ImageSet
from zsbir_export.fp16 import HEAVY_OPS
from zsbir_infer.errors import ModelError

CalibMethod = Literal["mse", "entropy", "percentile", "minmax"]
CALIB_METHODS: tuple[CalibMethod, ...] = ("mse", "entropy", "percentile", "minmax")
FloatPolicy = Literal["first-last", "none"]
FLOAT_POLICIES: tuple[FloatPolicy, ...] = ("first-last", "none")
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")
PERCENTILE = 99.999
MSE_BINS = 8192
MSE_CANDIDATES = 1024
QMAX = 127  # symmetric int8


@dataclass(frozen=True)
class Measure:
    """One measurement of an int8 model for the sensitivity fallback.

    ``score`` is compared with the fallback's target (the bundle writer passes a lower prediction bound of
    the top-10 overlap on held-out seen classes); ``ok`` carries the caller's other conditions (e.g. the
    |delta mAP@all| limit); ``details`` is recorded in the report.
    """

    score: float
    ok: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def passes(self, target: float) -> bool:
        """Whether the fallback may stop here."""
        return bool(np.isfinite(self.score) and self.score >= target and self.ok)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"score": float(self.score), "ok": bool(self.ok), **self.details}


class QuantizationError(ModelError, RuntimeError):
    """Raised when INT8 quantization fails or is asked for something unsupported."""


class CalibrationMemoryError(QuantizationError):
    """Raised before INT8 calibration when its activations would not fit in the memory available."""


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_int8` did (recorded under ``calibration`` in the manifest)."""

    method: CalibMethod
    images: int
    per_domain: dict[str, int]
    quantized_nodes: int
    float_nodes: list[str]
    batch_size: int
    fallback_nodes: list[str] = field(default_factory=list)
    heavy_nodes: int = 0
    fallback_report: dict[str, Any] = field(default_factory=dict)
    float_reasons: dict[str, list[str]] = field(default_factory=dict)
    float_policy: FloatPolicy = "first-last"
    percentile: float = PERCENTILE
    output_qdq: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "method": self.method,
            "images": self.images,
            "per_domain": dict(self.per_domain),
            "format": "QDQ",
            "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor",
            "bias": "float",
            "op_types": list(QUANTIZED_OP_TYPES),
            "qdq_placement": "inputs and outputs" if self.output_qdq else "inputs only (activations and weights)",
            "float_policy": self.float_policy,
            "quantized_nodes": self.quantized_nodes,
            "float_heavy_nodes": list(self.float_nodes),
            "float_heavy_reasons": {k: list(v) for k, v in self.float_reasons.items()},
            "heavy_nodes": self.heavy_nodes,
            "sensitivity_fallback_nodes": list(self.fallback_nodes),
            "sensitivity_fallback": dict(self.fallback_report),
            "batch_size": self.batch_size,
        }
        if self.method == "mse":
            out["histogram_bins"] = MSE_BINS
            out["threshold_candidates"] = MSE_CANDIDATES
        elif self.method == "percentile":
            out["percentile"] = self.percentile
            out["histogram_bins"] = 2048
        elif self.method == "entropy":
            out["histogram_bins"] = 2048
            out["quantized_bins"] = 128
        return out


def _reader(images: ImageSet, input_names: list[str], batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the calibration images batch by batch, with their domain tags when the graph has that input."""

        def __init__(self) -> None:
            self._it: Iterator[tuple[np.ndarray, np.ndarray]] = images.batches(batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            feed = {"image": np.ascontiguousarray(batch[0])}
            if "domain" in input_names:
                feed["domain"] = np.ascontiguousarray(batch[1])
            return feed

        def rewind(self) -> None:
            self._it = images.batches(batch_size)

    return _Reader()


def float_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the nodes kept in float: (all excluded nodes, the heavy ones among them).

    Excluded: everything downstream of the last heavy op (the normalization tail), the nodes that compute
    from the ``domain`` input before any heavy op, and heavy ops that read such a value directly.
    """
    from zsbir_export.fp16 import _tail_nodes

    graph = model.graph
    tail = _tail_nodes(graph)
    domain_values = {vi.name for vi in graph.input if vi.name == "domain"}
    domain_nodes: set[int] = set()
    for i, node in enumerate(graph.node):
        if any(name in domain_values for name in node.input):
            domain_nodes.add(i)
            if node.op_type not in HEAVY_OPS:
                domain_values.update(node.output)
    excluded = sorted(tail | domain_nodes)
    names = [graph.node[i].name for i in excluded]
    heavy = [graph.node[i].name for i in excluded if graph.node[i].op_type in HEAVY_OPS]
    return names, heavy


def policy_float_nodes(model: onnx.ModelProto, policy: FloatPolicy, excluded: Sequence[str] = ()) -> list[str]:
    """The quantizable nodes ``policy`` keeps in float (``excluded`` ones are already float).

    ``"first-last"``: the heavy ops with no heavy op upstream (the stem convolution reading the image) and
    those with no heavy op downstream (the embedding layer feeding the normalization); ``"none"``: nothing.
    """
    if policy not in FLOAT_POLICIES:
        raise QuantizationError(f"unknown float policy {policy!r}; choose one of {', '.join(FLOAT_POLICIES)}")
    if policy == "none":
        return []
    graph = model.graph
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    # after_heavy: tensors computed from the output of some heavy op (graph order is topological)
    after_heavy: set[str] = set()
    has_heavy_upstream: dict[int, bool] = {}
    for i, node in enumerate(nodes):
        upstream = any(name in after_heavy for name in node.input)
        has_heavy_upstream[i] = upstream
        if upstream or node.op_type in HEAVY_OPS:
            after_heavy.update(node.output)
    # feeds_heavy[i]: node i is heavy or some heavy op is downstream of it
    feeds_heavy: dict[int, bool] = {}
    for i in reversed(range(len(nodes))):
        below = any(feeds_heavy.get(j, False) for o in nodes[i].output for j in consumers.get(o, []))
        feeds_heavy[i] = nodes[i].op_type in HEAVY_OPS or below
    skip = set(excluded)
    chosen: list[str] = []
    for i, node in enumerate(nodes):
        if node.op_type not in QUANTIZED_OP_TYPES or node.name in skip:
            continue
        downstream = any(feeds_heavy.get(j, False) for o in node.output for j in consumers.get(o, []))
        if not has_heavy_upstream[i] or not downstream:
            chosen.append(node.name)
    return chosen


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _calib_method(method: CalibMethod) -> Any:
    """ORT's calibration method for ``method`` ("mse" collects ORT's percentile histograms)."""
    from onnxruntime.quantization import CalibrationMethod

    return {
        "mse": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
    }[method]


def mse_threshold(hist: np.ndarray, edges: np.ndarray, qmax: int = QMAX, candidates: int = MSE_CANDIDATES) -> float:
    """The symmetric clipping threshold ``t`` (scale ``t / qmax``) with the least squared int8 error.

    ``hist``/``edges`` are a histogram of |x| over the calibration values. The error of a threshold is the
    sum over bins of count * (center - dequantize(quantize(center)))^2, i.e. rounding *and* clipping error of
    the values actually seen, so a threshold that puts the frequent values (flat image backgrounds give large
    point masses) between two int8 levels is penalized. Candidates: up to ``candidates`` bin edges from
    1/16 of the range to the maximum.
    """
    counts = np.asarray(hist, dtype=np.float64)
    bounds = np.asarray(edges, dtype=np.float64)
    if counts.size == 0 or bounds[-1] <= 0:
        return float(max(bounds[-1], 0.0)) if bounds.size else 0.0
    centers = 0.5 * (bounds[:-1] + bounds[1:])
    used = counts > 0
    c, h = centers[used], counts[used]
    n = len(bounds) - 1
    ks = np.unique(np.linspace(max(1, n // 16), n, min(candidates, n)).astype(np.int64))
    ks = ks[bounds[ks] > 0]
    if ks.size == 0:
        return float(bounds[-1])
    best_err, best = np.inf, float(bounds[-1])
    for chunk in np.array_split(ks, max(1, ks.size // 64)):
        t = bounds[chunk][:, None]
        step = t / qmax
        err = ((c[None, :] - np.minimum(np.round(c[None, :] / step), qmax) * step) ** 2 * h[None, :]).sum(axis=1)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best_err, best = float(err[i]), float(t[i, 0])
    return best


def _calibrate(
    src: Path,
    cache: Path,
    calibration: ImageSet,
    method: CalibMethod,
    batch_size: int,
    tmp: Path,
    percentile: float = PERCENTILE,
) -> int:
    """Collect activation ranges of ``src`` on ``calibration`` into the ORT calibration cache ``cache``.

    quantize_static would build its calibrator with 128 histogram bins for "entropy", which leaves the KL
    search a single candidate (the full range, i.e. min-max); calibrating here uses TensorRT's settings (2048
    bins folded to 128 quantized bins). "mse" collects ORT's |x| histograms (8192 bins) and picks each
    tensor's threshold with :func:`mse_threshold`. Returns the batch size used.
    """
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data

    options: dict[str, Any] = {"symmetric": True}
    if method == "entropy":
        options.update(num_bins=2048, num_quantized_bins=128)
    elif method == "percentile":
        options.update(num_bins=2048, percentile=percentile)
    elif method == "mse":
        options.update(num_bins=MSE_BINS, percentile=PERCENTILE)
    # ORT's histogram collectors stack per-batch arrays, so every batch must have the same size.
    batch_size = max(b for b in range(1, min(batch_size, len(calibration)) + 1) if len(calibration) % b == 0)
    order = _interleave(calibration.domains)  # batches mix photos and sketches
    mixed = calibration.take(order)
    input_names = [vi.name for vi in onnx.load(str(src), load_external_data=False).graph.input]
    with _quiet():
        calibrator = create_calibrator(
            src,
            list(QUANTIZED_OP_TYPES),
            augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=_calib_method(method),
            providers=["CPUExecutionProvider"],
            extra_options=options,
        )
        chunk = calibration_chunk(calibrator, _reader(mixed, input_names, batch_size), len(mixed.images), batch_size)
        for start in range(0, len(mixed), chunk):
            piece = mixed.take(np.arange(start, min(start + chunk, len(mixed))))
            calibrator.collect_data(_reader(piece, input_names, batch_size))
        if method == "mse":
            ranges = {}
            for name, (hist, edges, *_rest) in calibrator.collector.histogram_dict.items():
                t = np.float32(mse_threshold(hist, edges))
                ranges[name] = TensorData(lowest=-t, highest=t)
            save_tensors_data(TensorsData(_calib_method(method), ranges), cache)
        else:
            save_tensors_data(calibrator.compute_data(), cache)
    return batch_size


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``); ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: Share of the available memory one chunk of calibration activations may take (the rest: the model, the
#: images, ONNX Runtime's arena and the collector's per-tensor copies). Measured: the 192 px default model
#: probes at 74 MiB per image, and 256 images in one ORT ``collect_data`` call grew the export to 24.2 GB
#: resident (94 MB per image) and an OOM kill on a 24 GiB machine; 128 images ran.
CALIB_MEMORY_SHARE = 0.65


def calibration_chunk(calibrator: Any, probe: Any, n_images: int, batch_size: int) -> int:
    """How many calibration images one ``collect_data`` call may take so that its activations fit in memory.

    ONNX Runtime's calibrators keep the outputs of every batch (each calibrated tensor) until the end of a
    ``collect_data`` call, so memory grows with the images per call times the activation size of one image,
    which grows with the square of the input size. One probe batch measures the latter; the calibration
    then streams in chunks of the returned size (a multiple of ``batch_size``) that keep the activations
    within :data:`CALIB_MEMORY_SHARE` of the available memory. The calibrators merge what each call
    collected: min-max ranges exactly; histograms keep the first chunk's bin width and grow more bins where a
    later chunk reaches further. :class:`CalibrationMemoryError` is raised, before the long run, only where
    not even one batch fits (the process would otherwise be killed by the kernel's OOM killer, with no
    message, after minutes of work).
    """
    avail = available_memory()
    if avail is None:
        return n_images
    feed = probe.get_next()
    if not feed:
        return n_images
    per_image = sum(int(o.nbytes) for o in calibrator.infer_session.run(None, feed)) / max(1, batch_size)
    budget = CALIB_MEMORY_SHARE * avail
    if per_image * n_images <= budget:
        return n_images
    batches = int(budget // max(per_image * batch_size, 1.0))
    if batches < 1:
        raise CalibrationMemoryError(
            f"INT8 calibration needs about {per_image * batch_size / 2**20:.1f} MiB of activations for one batch "
            f"of {batch_size} images at this input size, and {avail / 2**20:.1f} MiB of memory is available: "
            "free some memory or export a smaller input size"
        )
    return batches * batch_size


def _quantize(
    src: Path, out: Path, cache: Path, method: CalibMethod, excluded: Sequence[str], output_qdq: bool = False
) -> onnx.ModelProto:
    """Insert the QDQ nodes with the cached ranges, keeping ``excluded`` nodes in float; save and return it.

    ``output_qdq=False`` (the default) quantizes only the inputs of the heavy ops, not their outputs.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    if not output_qdq:
        extra["OpTypesToExcludeOutputQuantization"] = list(QUANTIZED_OP_TYPES)
    with _quiet():
        quantize_static(
            str(src),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(excluded),
            calibrate_method=_calib_method(method),
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
    qmodel = onnx.load(str(out))
    _strip_qdq_into(qmodel, set(excluded))
    onnx.save_model(qmodel, str(out))
    return qmodel


def _embed(path: Path, data: ImageSet) -> np.ndarray:
    from zsbir_export.verify import OnnxEmbedder, embed_all

    return embed_all(OnnxEmbedder(path), data, batch_size=64)


def _proxy_overlap(ref: np.ndarray, got: np.ndarray, data: ImageSet) -> float:
    """Top-10 overlap of sketch->photo rankings on the calibration images (seen classes, no labels needed)."""
    from zsbir_export.verify import topk_overlap

    q = data.domains == 0
    g = data.domains == 1
    return topk_overlap(ref[q], ref[g], got[q], got[g], k=10)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: ImageSet,
    *,
    method: CalibMethod = "mse",
    batch_size: int = 16,
    max_float_layers: int = 0,
    target_overlap: float = 0.92,
    sensitivity_samples: int = 32,
    check: Callable[[Path], Measure] | None = None,
    check_source: str = "",
    float_policy: FloatPolicy = "first-last",
    percentile: float = PERCENTILE,
    output_qdq: bool = False,
) -> QuantizationReport:
    """Quantize the fp32 model at ``fp32_path`` to a QDQ int8 model at ``out_path`` (see module doc).

    ``float_policy`` keeps the first and last heavy ops in float (``"none"``: quantize them too);
    ``percentile`` is the percentile of ``method="percentile"``; ``output_qdq=True`` also quantizes the heavy
    ops' outputs (the placement quantize_static uses by default; kept for comparisons).

    Sensitivity fallback: with ``max_float_layers > 0``, when the int8 model's measure misses
    ``target_overlap``, each remaining quantized layer's sensitivity is measured on the calibration images
    (quantize that layer alone, 1 - mean cosine to fp32 on ``sensitivity_samples`` images per domain) and the
    most sensitive layers are kept in float, one more at a time, until the measure reaches the target or
    ``max_float_layers`` layers are float. ``check(path) -> Measure`` is that measure (the bundle writer
    measures on held-out seen classes, disjoint from both the calibration images and the images its
    verification reports; ``check_source`` says which, for the report). Without ``check`` the measure is the
    top-10 overlap on the calibration images themselves (optimistic: they set the ranges).
    """
    from onnxruntime.quantization import quantize_static

    if method not in CALIB_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise QuantizationError(f"the percentile must be in (0, 100], got {percentile}")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise QuantizationError("INT8 export needs a newer onnxruntime (quantize_static(calibration_cache_path=...))")
    per_domain = {"photo": calibration.count("photo"), "sketch": calibration.count("sketch")}
    if min(per_domain.values()) == 0:
        raise QuantizationError(f"calibration needs images of both domains, got {per_domain}")
    out_path = Path(out_path)
    model = onnx.load(str(fp32_path))
    _name_nodes(model)
    excluded, heavy_float = float_nodes(model)
    by_policy = policy_float_nodes(model, float_policy, excluded)
    reasons: dict[str, list[str]] = {"domain path or normalization tail": list(heavy_float)}
    if by_policy:
        reasons[f"policy {float_policy}"] = list(by_policy)
    excluded = [*excluded, *by_policy]
    heavy_float = [*heavy_float, *by_policy]
    fallback: list[str] = []
    proxy: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zsbir-quant-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "model.named.onnx"
        cache = tmp / "ranges.json"
        onnx.save_model(model, str(src))
        try:
            batch_size = _calibrate(src, cache, calibration, method, batch_size, tmp, percentile)
            qmodel = _quantize(src, out_path, cache, method, excluded, output_qdq)
            if max_float_layers > 0:
                fallback, proxy = _fallback(
                    _FallbackJob(model, src, out_path, cache, method, excluded, output_qdq, tmp),
                    calibration,
                    max_float_layers,
                    target_overlap,
                    sensitivity_samples,
                    check,
                    check_source,
                )
                if fallback:
                    qmodel = onnx.load(str(out_path))
        except QuantizationError:
            raise
        except Exception as exc:
            raise QuantizationError(f"onnxruntime INT8 calibration/quantization failed: {exc}") from exc
    try:
        onnx.checker.check_model(qmodel, full_check=True)
    except Exception as exc:
        raise QuantizationError(f"the int8 graph failed onnx.checker: {exc}") from exc
    heavy_total = sum(1 for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES)
    quantized = _count_quantized(qmodel)
    if quantized == 0 and heavy_total > len(heavy_float) + len(fallback):
        raise QuantizationError("quantize_static inserted no QuantizeLinear/DequantizeLinear nodes")
    if fallback:
        reasons["sensitivity fallback"] = list(fallback)
    return QuantizationReport(
        method,
        len(calibration),
        per_domain,
        quantized,
        heavy_float,
        batch_size,
        fallback,
        heavy_total,
        proxy,
        reasons,
        float_policy,
        percentile,
        output_qdq,
    )


@dataclass(frozen=True)
class _FallbackJob:
    """What the fallback needs to requantize: the named fp32 model, its ranges and the fixed float nodes."""

    model: onnx.ModelProto
    src: Path
    out_path: Path
    cache: Path
    method: CalibMethod
    excluded: list[str]
    output_qdq: bool
    tmp: Path

    def quantize(self, out: Path, extra_float: Sequence[str]) -> None:
        _quantize(self.src, out, self.cache, self.method, [*self.excluded, *extra_float], self.output_qdq)


def _fallback(
    job: _FallbackJob,
    calibration: ImageSet,
    max_float_layers: int,
    target: float,
    samples: int,
    check: Callable[[Path], Measure] | None = None,
    check_source: str = "",
) -> tuple[list[str], dict[str, Any]]:
    """The sensitivity fallback of :func:`quantize_int8`; returns the float layers and a report.

    Cost: one quantization and one embedding of ``2 * samples`` images per quantizable layer, then one
    measurement per layer moved to float; it only runs when the first INT8 model misses the target.
    """
    keep = np.concatenate([np.flatnonzero(calibration.domains == d)[:256] for d in (1, 0)])
    calibration = calibration.take(keep)
    ref = _embed(job.src, calibration)

    def measure(path: Path) -> Measure:
        if check is not None:
            return check(path)
        overlap = _proxy_overlap(ref, _embed(path, calibration), calibration)
        return Measure(overlap, True, {"overlap": overlap})

    first = measure(job.out_path)
    report: dict[str, Any] = {
        "target": target,
        "measured_on": check_source or ("caller's check" if check is not None else "calibration images (optimistic)"),
        "initial": first.score,
        "steps": [{"float_layers": [], **first.to_dict()}],
    }
    if first.passes(target):
        report["final"] = first.score
        report["reached_target"] = True
        return [], report
    # Sensitivity of each quantizable layer, on a subset of the calibration images.
    idx = np.concatenate([np.flatnonzero(calibration.domains == d)[:samples] for d in (1, 0)])
    subset = calibration.take(idx)
    ref_sub = ref[idx]
    candidates = [
        n.name for n in job.model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.name not in job.excluded
    ]
    probe = job.tmp / "probe.onnx"
    sensitivity: dict[str, float] = {}
    for name in candidates:
        job.quantize(probe, [c for c in candidates if c != name])
        got = _embed(probe, subset)
        cos = (ref_sub * got).sum(axis=1) / np.maximum(
            np.linalg.norm(ref_sub, axis=1) * np.linalg.norm(got, axis=1), 1e-30
        )
        sensitivity[name] = float(1.0 - cos.mean())
    ranked = sorted(candidates, key=lambda c: -sensitivity[c])
    report["sensitivity_measured_on"] = f"{len(subset)} calibration images"
    report["sensitivity_top"] = {c: sensitivity[c] for c in ranked[:10]}
    chosen: list[str] = []
    current = first
    for name in ranked[:max_float_layers]:
        chosen.append(name)
        job.quantize(job.out_path, chosen)
        current = measure(job.out_path)
        report["steps"].append({"float_layers": list(chosen), **current.to_dict()})
        if current.passes(target):
            break
    report["final"] = current.score
    report["reached_target"] = current.passes(target)
    return chosen, report


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence quantize_static's prints and root-logger advice (errors still propagate)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _strip_qdq_into(model: onnx.ModelProto, float_names: set[str]) -> None:
    """Remove activation Q/DQ pairs whose dequantized value only feeds nodes kept in float.

    quantize_static also quantizes the *output* of a quantized op; when that output goes straight into the
    normalization tail this would round the embedding to 8 bits before it is normalized.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    remove: list[onnx.NodeProto] = []
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        users = consumers.get(dq.output[0], [])
        if not users or dq.output[0] in graph_outputs or any(u.name not in float_names for u in users):
            continue
        for user in users:
            user.input[:] = [q.input[0] if name == dq.output[0] else name for name in user.input]
        remove.append(dq)
        if all(c is dq for c in consumers.get(q.output[0], [])):
            remove.append(q)
    for node in remove:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _interleave(domains: np.ndarray) -> np.ndarray:
    """An order of indices that alternates between the domains (the larger one's rest at the end)."""
    a = np.flatnonzero(domains == 1)
    b = np.flatnonzero(domains != 1)
    n = min(len(a), len(b))
    head = np.stack([a[:n], b[:n]], axis=1).reshape(-1)
    return np.concatenate([head, a[n:], b[n:]]).astype(np.int64)


def _count_quantized(model: onnx.ModelProto) -> int:
    """Heavy ops whose weight input comes from a DequantizeLinear."""
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(
        1
        for n in model.graph.node
        if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and produced_by.get(n.input[1]) == "DequantizeLinear"
    )
