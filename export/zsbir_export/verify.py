"""Verification built into export: do the exported graphs compute what the torch model computes?

Checks, per exported precision, on images of both domains:

* agreement with the torch reference (``model.embed``): max abs difference and min/mean cosine between
  the embeddings (fp32 must reach cosine >= 0.99999, fp16 >= 0.999);
* for INT8 (and fp16 when a benchmark is given): retrieval agreement with the fp32 graph, i.e. the mean
  overlap of each sketch query's top-10 photos, and the retrieval metrics (mAP@all, mAP@200, P@100, P@200)
  on the benchmark's *unseen* split, whose classes calibration never saw. FP16 must keep |delta mAP@all|
  <= 0.002; INT8 top-10 overlap >= 0.9 and |delta mAP@all| <= 0.01.

These images only report: every choice the exporter makes (the INT8 sensitivity fallback) is measured on a
holdout of seen images instead (:func:`overlap_estimate` gives its lower prediction bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zsbir_export.calibration import DOMAIN_TAGS, ImageSet

EmbedFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail limits of the export verification."""

    fp32_min_cosine: float = 0.99999
    fp16_min_cosine: float = 0.999
    fp16_max_map_delta: float = 0.002
    int8_min_top10_overlap: float = 0.9
    int8_max_map_delta: float = 0.01

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)


class OnnxEmbedder:
    """Runs an exported graph with ONNX Runtime (CPU) over preprocessed batches."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def __call__(self, images: np.ndarray, domains: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) float32 of ``images`` (N,3,H,W) with tags ``domains`` (N,)."""
        feed: dict[str, np.ndarray] = {"image": np.ascontiguousarray(images, dtype=np.float32)}
        if "domain" in self.input_names:
            feed["domain"] = np.ascontiguousarray(domains, dtype=np.int64)
        return np.asarray(self.session.run(["embedding"], feed)[0], dtype=np.float32)


def torch_embedder(model: Any) -> EmbedFn:
    """Wrap a torch model's ``embed`` as a numpy function (torch imported here, at build time only)."""
    import torch

    def run(images: np.ndarray, domains: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model.embed(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(domains))
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    return run


def embed_all(fn: EmbedFn, data: ImageSet, batch_size: int = 32) -> np.ndarray:
    """Embed every image of ``data`` in batches."""
    parts = [fn(images, domains) for images, domains in data.batches(batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs difference and min/mean cosine between matching rows of two embedding matrices."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {reference.shape} vs {candidate.shape}")
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = (ref * got).sum(axis=1) / np.maximum(denom, 1e-30)
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


def topk_overlap(
    query_a: np.ndarray, gallery_a: np.ndarray, query_b: np.ndarray, gallery_b: np.ndarray, k: int = 10
) -> float:
    """Mean fraction of each query's top-``k`` gallery items (by inner product) that two models share."""
    return float(per_query_overlap(query_a, gallery_a, query_b, gallery_b, k).mean())


def per_query_overlap(
    query_a: np.ndarray, gallery_a: np.ndarray, query_b: np.ndarray, gallery_b: np.ndarray, k: int = 10
) -> np.ndarray:
    """Each query's fraction of top-``k`` gallery items (by inner product) that two models share."""
    k = min(k, gallery_a.shape[0])
    if k == 0 or query_a.shape[0] == 0:
        raise ValueError("top-k overlap needs at least one query and one gallery item")
    top_a = np.argsort(-(query_a @ gallery_a.T), axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-(query_b @ gallery_b.T), axis=1, kind="stable")[:, :k]
    return np.asarray([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_a, top_b, strict=True)])


# One-sided 95% normal quantile: the lower prediction bound of the overlap holds for 95% of class sets.
LOWER_BOUND_Z = 1.645


def overlap_estimate(
    reference: np.ndarray, candidate: np.ndarray, data: ImageSet, k: int = 10, z: float = LOWER_BOUND_Z
) -> dict[str, float]:
    """Top-``k`` sketch->photo overlap of ``candidate`` with ``reference`` embeddings of ``data``, with a lower
    prediction bound for *another* set of classes of the same size.

    Queries are grouped by class (each query is its own group when labels are unknown), because queries of
    one class share their gallery neighbours. With G groups whose mean overlaps have standard deviation s,
    the mean over another G groups drawn alike is, with probability ~95%, above
    ``overlap - z * s * sqrt(1/G + 1/G)``. One group: no spread can be estimated and the bound is the mean.
    """
    q = data.domains == DOMAIN_TAGS["sketch"]
    g = data.domains == DOMAIN_TAGS["photo"]
    per_query = per_query_overlap(reference[q], reference[g], candidate[q], candidate[g], k=k)
    labels = data.labels[q]
    if (labels >= 0).all():
        groups = [per_query[labels == c].mean() for c in np.unique(labels)]
    else:
        groups = list(per_query)
    n = len(groups)
    spread = float(np.std(groups, ddof=1)) if n >= 2 else 0.0
    mean = float(per_query.mean())
    return {
        "overlap": mean,
        "lower_bound": mean - z * spread * float(np.sqrt(2.0 / n)),
        "group_sd": spread,
        "groups": float(n),
        "queries": float(per_query.size),
        "z": z,
    }


def retrieval_metrics(embeddings: np.ndarray, data: ImageSet) -> dict[str, float]:
    """mAP@all, mAP@200, P@100, P@200 of sketch queries against photos (labels must be known)."""
    from zsbir_infer.metrics import evaluate

    q = data.domains == DOMAIN_TAGS["sketch"]
    g = data.domains == DOMAIN_TAGS["photo"]
    if (data.labels < 0).any():
        raise ValueError("retrieval metrics need class labels")
    return evaluate(embeddings[q], data.labels[q], embeddings[g], data.labels[g])


@dataclass
class CheckResult:
    """One pass/fail check: ``name`` (e.g. "fp16 min cosine"), the measured value and its limit."""

    name: str
    value: float
    limit: float
    kind: str  # ">=" or "<="

    @property
    def passed(self) -> bool:
        """Whether the value is within the limit."""
        if not np.isfinite(self.value):
            return False
        return self.value >= self.limit if self.kind == ">=" else self.value <= self.limit

    def describe(self) -> str:
        """A one-line human summary, e.g. ``int8 top-10 overlap 0.85 < 0.9 (FAILED)``."""
        ok = "ok" if self.passed else "FAILED"
        op = self.kind if self.passed else ("<" if self.kind == ">=" else ">")
        return f"{self.name} {self.value:.6g} {op} {self.limit:g} ({ok})"


def verify_models(
    reference: EmbedFn,
    models: dict[str, EmbedFn],
    samples: ImageSet,
    tolerances: Tolerances,
    *,
    evaluation: ImageSet | None = None,
    sample_source: str = "",
    evaluation_source: str = "",
    batch_size: int = 32,
) -> tuple[dict[str, Any], list[CheckResult]]:
    """Run every check of the module doc; return the manifest's ``verification`` dict and the checks.

    ``models`` maps a precision ("fp32", "fp16", "int8") to its embedder; "fp32" must be present when any
    other precision is. ``samples`` are the agreement inputs; ``evaluation`` (labelled, both domains) enables
    the retrieval checks.
    """
    if "fp32" not in models:
        raise ValueError("verification needs the fp32 model")
    checks: list[CheckResult] = []
    report: dict[str, Any] = {
        "samples": {
            "source": sample_source,
            "photo": samples.count("photo"),
            "sketch": samples.count("sketch"),
        },
        "tolerances": tolerances.to_dict(),
        "runtime": "onnxruntime CPUExecutionProvider",
    }
    ref = embed_all(reference, samples, batch_size)
    min_cos = {"fp32": tolerances.fp32_min_cosine, "fp16": tolerances.fp16_min_cosine}
    for precision, fn in models.items():
        got = embed_all(fn, samples, batch_size)
        entry: dict[str, Any] = {"vs_torch": compare(ref, got)}
        norms = np.linalg.norm(got, axis=1)
        entry["max_norm_error"] = float(np.abs(norms - 1.0).max())
        if precision in min_cos:
            checks.append(
                CheckResult(
                    f"{precision} min cosine vs torch", entry["vs_torch"]["min_cosine"], min_cos[precision], ">="
                )
            )
        report[precision] = entry

    if evaluation is not None and len(evaluation):
        has_labels = bool((evaluation.labels >= 0).all())
        embeddings = {p: embed_all(fn, evaluation, batch_size) for p, fn in models.items()}
        q = evaluation.domains == DOMAIN_TAGS["sketch"]
        g = evaluation.domains == DOMAIN_TAGS["photo"]
        report["evaluation"] = {
            "source": evaluation_source,
            "queries": int(q.sum()),
            "gallery": int(g.sum()),
            "labelled": has_labels,
        }
        base = retrieval_metrics(embeddings["fp32"], evaluation) if has_labels else None
        for precision, emb in embeddings.items():
            entry = report[precision]
            if base is not None:
                metrics = base if precision == "fp32" else retrieval_metrics(emb, evaluation)
                entry["retrieval"] = metrics
                entry["delta_map_all"] = float(metrics["map_all"] - base["map_all"])
            if precision != "fp32":
                fp32 = embeddings["fp32"]
                entry["top10_overlap"] = topk_overlap(fp32[q], fp32[g], emb[q], emb[g], k=10)
        if "fp16" in embeddings and base is not None:
            checks.append(
                CheckResult(
                    "fp16 |delta mAP@all| vs fp32",
                    abs(report["fp16"]["delta_map_all"]),
                    tolerances.fp16_max_map_delta,
                    "<=",
                )
            )
        if "int8" in embeddings:
            checks.append(
                CheckResult(
                    "int8 top-10 overlap with fp32",
                    report["int8"]["top10_overlap"],
                    tolerances.int8_min_top10_overlap,
                    ">=",
                )
            )
            if base is not None:
                checks.append(
                    CheckResult(
                        "int8 |delta mAP@all| vs fp32",
                        abs(report["int8"]["delta_map_all"]),
                        tolerances.int8_max_map_delta,
                        "<=",
                    )
                )
    elif "int8" in models:
        report["evaluation"] = None

    report["checks"] = [{"name": c.name, "value": c.value, "limit": c.limit, "passed": c.passed} for c in checks]
    report["passed"] = all(c.passed for c in checks)
    return report, checks
