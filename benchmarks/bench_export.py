"""Accuracy, size and CPU latency of a bundle's fp32 / fp16 / int8 models (ONNX Runtime CPU).

Two parts, in this order:

1. **INT8 recipe study on seen classes only** (``--study-folds``, default 5; 0 skips it): the seen classes
   are split into folds; for each fold the other seen classes calibrate and the fold's classes are held
   out, and every candidate recipe (calibration method, Q/DQ placement, first/last float policy,
   calibration images) is scored by its top-10 overlap with fp32 and its mAP@all change on the held-out
   classes. No unseen image is read. This is the evidence behind the exporter's defaults.
2. **Export and evaluation**: exports the checkpoint (default: the embedded default model) with all three
   precisions and the exporter's defaults (INT8 calibrated on seen classes, its sensitivity fallback
   decided on held-out seen classes), then evaluates every precision *once* on the *unseen* split (sketch
   queries against photos; mAP@all, P@100, mAP@200, P@200), the top-10 overlap of each query's results with
   fp32, the model size on disk and the CPU latency per image.

Writes a Markdown report and a JSON file with the command that produced them. Everything is seeded
(``--seed``), so the same command on the same checkpoint, benchmark and versions gives the same accuracy
figures (latency varies with the machine).

    python benchmarks/bench_export.py --bench data/synth            # default model
    python benchmarks/bench_export.py --checkpoint ckpt.safetensors --bench data/synth --out-stem my_model
    python benchmarks/bench_export.py --bundle bundles/x --bench data/synth   # measure an existing bundle

If ``--bench`` does not exist, the default synthetic benchmark (``zsbir data synth``) is generated there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardware import cpu_model

from zsbir_infer.bundle import PRECISIONS

ROOT = Path(__file__).resolve().parent
# The default synthetic benchmark as benchmarks/train_default.py leaves it, else data/synth (generated if absent).
DEFAULT_BENCHES = (ROOT.parent / "build" / "default_model" / "synth", ROOT.parent / "data" / "synth")


def _ensure_bench(path: Path) -> Path:
    if not path.exists():
        from zsbir_infer.datasets.synth import generate_synthetic

        print(f"generating the default synthetic benchmark in {path} ...", file=sys.stderr)
        generate_synthetic(path, progress=False)
    return path


def _export(checkpoint: Path, bench: Path, out: Path, calib_count: int, method: str, seed: int) -> dict[str, Any]:
    from zsbir_export.bundle import ExportOptions, export_bundle
    from zsbir_export.checkpoints import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    options = ExportOptions(
        precisions=PRECISIONS,
        calib_dir=bench,
        calib_count=calib_count,
        calib_method=method,  # type: ignore[arg-type]
        overwrite=True,
        seed=seed,
    )
    source = {
        "path": str(checkpoint),
        "sha256": loaded.sha256,
        "format": loaded.source_format,
        "method": loaded.config.get("method"),
    }
    t0 = time.perf_counter()
    result = export_bundle(
        loaded.model, loaded.config, out, options, source=source, log=lambda m: print(m, file=sys.stderr)
    )
    print(f"export took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return result.manifest


# The recipes compared on held-out seen classes: (label, quantize_int8 keyword arguments, calibration images).
STUDY_RECIPES: tuple[tuple[str, dict[str, Any], int], ...] = (
    (
        "percentile 99.999, Q/DQ on inputs and outputs, all layers (previous default)",
        {"method": "percentile", "output_qdq": True, "float_policy": "none"},
        512,
    ),
    ("percentile 99.999, Q/DQ on inputs only, all layers", {"method": "percentile", "float_policy": "none"}, 512),
    (
        "percentile 99.99, Q/DQ on inputs only, all layers",
        {"method": "percentile", "percentile": 99.99, "float_policy": "none"},
        512,
    ),
    ("minmax, Q/DQ on inputs only, all layers", {"method": "minmax", "float_policy": "none"}, 512),
    ("entropy, Q/DQ on inputs only, all layers", {"method": "entropy", "float_policy": "none"}, 512),
    ("mse, Q/DQ on inputs only, all layers", {"method": "mse", "float_policy": "none"}, 512),
    ("mse, Q/DQ on inputs only, first+last float (exporter default)", {"method": "mse"}, 512),
    ("mse, Q/DQ on inputs only, first+last float, 1024 images", {"method": "mse"}, 1024),
    ("mse, Q/DQ on inputs only, first+last float, 2048 images", {"method": "mse"}, 2048),
)


def _fp32_onnx(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Export the checkpoint's fp32 graph (as the bundle writer does) and return its preprocess specs."""
    from zsbir_export.bundle import _arch, _preprocess_specs
    from zsbir_export.checkpoints import load_checkpoint
    from zsbir_export.onnx_export import export_onnx

    loaded = load_checkpoint(checkpoint)
    specs = _preprocess_specs(loaded.config)
    size = specs["photo"]["size"]
    export_onnx(
        loaded.model,
        out,
        domain_conditioned=bool(_arch(loaded.config).get("domain_conditioned", False)),
        input_size=(int(size[0]), int(size[1])),
    )
    return specs


def holdout_study(checkpoint: Path, bench: Path, folds: int, seed: int, tmp: Path) -> dict[str, Any]:
    """Score every recipe of ``STUDY_RECIPES`` on ``folds`` folds of held-out seen classes (no unseen image)."""
    import numpy as np
    from zsbir_export.calibration import load_images, open_source
    from zsbir_export.quantize import quantize_int8
    from zsbir_export.verify import OnnxEmbedder, embed_all, overlap_estimate, retrieval_metrics

    fp32 = tmp / "study.fp32.onnx"
    specs = _fp32_onnx(checkpoint, fp32)
    source = open_source(bench)
    seen = source.classes["seen"]
    if len(seen) < folds or folds < 2:
        raise SystemExit(f"--study-folds {folds}: need 2 .. {len(seen)} for {len(seen)} seen classes")
    order = np.random.default_rng([seed, 0x57D]).permutation(len(seen))
    parts = np.array_split(order, folds)
    rows: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in STUDY_RECIPES}
    t0 = time.perf_counter()
    for f, part in enumerate(parts):
        held = {int(i) for i in part}
        hold_items = {d: [it for it in items if it.label in held] for d, items in source.calibration.items()}
        pool = {d: [it for it in items if it.label not in held] for d, items in source.calibration.items()}
        holdout = load_images(hold_items, specs, 1000, seed=seed + 2)
        base = embed_all(OnnxEmbedder(fp32), holdout)
        base_map = retrieval_metrics(base, holdout)["map_all"]
        for label, kwargs, images in STUDY_RECIPES:
            calib = load_images(pool, specs, images // 2, seed=seed + f)
            out = tmp / "study.int8.onnx"
            quantize_int8(fp32, out, calib, **kwargs)
            emb = embed_all(OnnxEmbedder(out), holdout)
            est = overlap_estimate(base, emb, holdout)
            rows[label].append(
                {
                    "overlap": est["overlap"],
                    "lower_bound": est["lower_bound"],
                    "delta_map_all": float(retrieval_metrics(emb, holdout)["map_all"] - base_map),
                }
            )
        print(f"study fold {f + 1}/{folds} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = []
    for label, kwargs, images in STUDY_RECIPES:
        r = rows[label]
        summary.append(
            {
                "recipe": label,
                "quantize_int8": kwargs,
                "calibration_images": images,
                "overlap_mean": float(np.mean([x["overlap"] for x in r])),
                "overlap_min": float(np.min([x["overlap"] for x in r])),
                "lower_bound_mean": float(np.mean([x["lower_bound"] for x in r])),
                "delta_map_mean": float(np.mean([x["delta_map_all"] for x in r])),
                "delta_map_worst": float(max((x["delta_map_all"] for x in r), key=abs)),
                "folds": r,
            }
        )
    return {
        "folds": folds,
        "seed": seed,
        "seen_classes": len(seen),
        "held_out_per_fold": [len(p) for p in parts],
        "holdout_images_per_domain_cap": 1000,
        "recipes": summary,
    }


def _latency_ms(path: Path, shape: tuple[int, int], conditioned: bool, batch: int, threads: int, reps: int) -> float:
    """Median wall time per image (ms) of ``reps`` runs at ``batch``, after two warm-up runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"image": rng.standard_normal((batch, 3, *shape)).astype(np.float32)}
    if conditioned:
        feed["domain"] = (np.arange(batch) % 2).astype(np.int64)
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


def measure(bundle: Path, bench: Path, threads: int, reps: int) -> dict[str, Any]:
    """Evaluate every precision of ``bundle`` on the unseen split of ``bench``."""
    from zsbir_export.calibration import ImageSet, load_images, open_source
    from zsbir_export.verify import OnnxEmbedder, embed_all, retrieval_metrics, topk_overlap

    manifest = json.loads((bundle / "manifest.json").read_text())
    source = open_source(bench)
    if source.evaluation is None:
        raise SystemExit(f"{bench} is not a benchmark with an unseen split")
    precisions = [p for p in PRECISIONS if p in manifest["models"]]
    embedders = {p: OnnxEmbedder(bundle / manifest["models"][p]["file"]) for p in precisions}
    # Stream the split in chunks so that memory stays bounded whatever the input size.
    parts: dict[str, list[np.ndarray]] = {p: [] for p in precisions}
    domains: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    chunk = 256
    for domain, items in source.evaluation.items():
        for start in range(0, len(items), chunk):
            data = load_images({domain: items[start : start + chunk]}, manifest["preprocess"], None)
            for p in precisions:
                parts[p].append(embed_all(embedders[p], data, batch_size=64))
            domains.append(data.domains)
            labels.append(data.labels)
    all_domains = np.concatenate(domains)
    all_labels = np.concatenate(labels)
    meta = ImageSet(np.zeros((len(all_domains), 0), dtype=np.float32), all_domains, all_labels)
    q = all_domains == 0
    g = all_domains == 1
    shape = tuple(manifest["inputs"]["image"]["shape"][2:])
    conditioned = manifest["domain_handling"] == "input"
    rows: list[dict[str, Any]] = []
    base = np.concatenate(parts["fp32"])
    for precision in precisions:
        path = bundle / manifest["models"][precision]["file"]
        emb = np.concatenate(parts[precision])
        metrics = retrieval_metrics(emb, meta)
        row = {
            "precision": precision,
            **{k: float(v) for k, v in metrics.items()},
            "top10_overlap": topk_overlap(base[q], base[g], emb[q], emb[g], k=10),
            "bytes": path.stat().st_size,
            "latency_ms_b1": _latency_ms(path, shape, conditioned, 1, threads, reps),
            "latency_ms_b32": _latency_ms(path, shape, conditioned, 32, threads, max(3, reps // 4)),
        }
        rows.append(row)
        print(f"{precision}: {row}", file=sys.stderr)
    fp32_map = rows[0]["map_all"]
    for row in rows:
        row["delta_map_all"] = row["map_all"] - fp32_map
    import onnxruntime

    return {
        "bundle": str(bundle),
        "fingerprint": manifest["fingerprint"],
        "source": manifest["source"],
        "benchmark": {"path": str(bench), "split": "unseen", "queries": int(q.sum()), "gallery": int(g.sum())},
        "calibration": manifest.get("calibration"),
        "rows": rows,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "ort_threads": threads,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "input_shape": list(shape),
    }


def _study_markdown(study: dict[str, Any]) -> list[str]:
    lines = [
        "## How the INT8 recipe was chosen (seen classes only)",
        "",
        f"{study['folds']}-fold study over the {study['seen_classes']} seen classes (seed {study['seed']}): in each "
        f"fold {study['held_out_per_fold'][0]} seen classes are held out (up to "
        f"{study['holdout_images_per_domain_cap']} images per domain) and the recipe calibrates on a seeded "
        "sample of the other seen classes. Scores are top-10 sketch->photo overlap with fp32 and the change of "
        "mAP@all on the held-out classes (no fallback, no unseen image). 'lower bound' is the one-sided 95% "
        "lower prediction bound of the overlap for another class set of the same size (per-class spread), the "
        "quantity the exporter's fallback stops on.",
        "",
        "| recipe | calib. images | overlap mean | overlap min | lower bound mean | Δ mAP@all mean | Δ mAP@all worst |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in study["recipes"]:
        lines.append(
            f"| {r['recipe']} | {r['calibration_images']} | {r['overlap_mean']:.3f} | {r['overlap_min']:.3f} | "
            f"{r['lower_bound_mean']:.3f} | {r['delta_map_mean']:+.4f} | {r['delta_map_worst']:+.4f} |"
        )
    lines += [
        "",
        "Exporter defaults taken from this study: Q/DQ on the inputs of the heavy ops only (TensorRT's recommended "
        "placement), `mse` calibration and the first/last layers in float (an a-priori policy; compare the two "
        "mse rows with all layers and with first+last float). Asymmetric activations are not a candidate: "
        "TensorRT requires zero point 0. The calibration count stays 512 by default (export time); the last "
        "rows show what `--calib-count 1024/2048` changes. "
        "Whatever remains is left to the sensitivity fallback, decided on the exporter's own holdout below.",
        "",
    ]
    return lines


def _fallback_markdown(cal: dict[str, Any]) -> list[str]:
    split = cal.get("split") or {}
    fb = cal.get("sensitivity_fallback") or {}
    reasons = cal.get("float_heavy_reasons") or {}
    float_by = "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items() if v) or "none"
    lines = [
        "## INT8 as exported",
        "",
        f"Recipe: {cal.get('format')} {cal.get('weights')} weights, {cal.get('activations')} activations, "
        f"{cal.get('method')} calibration on {cal.get('images')} seen-split images ({cal.get('per_domain')}), "
        f"Q/DQ on {cal.get('qdq_placement')}, float policy {cal.get('float_policy')}. Float layers ("
        f"{len(cal.get('float_heavy_nodes', [])) + len(cal.get('sensitivity_fallback_nodes', []))} of "
        f"{cal.get('heavy_nodes')} heavy ops): {float_by}.",
        "",
        f"Holdout ({split.get('rule', '?')}): {len(split.get('holdout_classes', []))} classes, "
        f"{split.get('holdout_images')} images; calibration pool {split.get('calibration_pool')}; "
        f"{split.get('disjoint', '')}. The fallback's stop criterion is measured on the holdout only: "
        f"{fb.get('measured_on', '?')} >= {fb.get('target', float('nan')):.3f} and holdout |Δ mAP@all| within "
        "the verification's limit. Layers are ranked by sensitivity on calibration images "
        f"({fb.get('sensitivity_measured_on', 'not needed')}). The unseen split below was read once, after "
        "these choices, by the verification and by this table.",
        "",
        "| float layers (fallback) | holdout overlap | lower bound | holdout Δ mAP@all | stop? |",
        "|---|---|---|---|---|",
    ]
    target = float(fb.get("target", float("nan")))
    for step in fb.get("steps", []):
        delta = step.get("delta_map_all")
        stop = step["score"] >= target and step.get("ok", True)
        lines.append(
            f"| {', '.join(step['float_layers']) or '(none)'} | {step.get('overlap', float('nan')):.4f} | "
            f"{step['score']:.4f} | {'n/a' if delta is None else f'{delta:+.4f}'} | {'yes' if stop else 'no'} |"
        )
    lines.append("")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The results tables with their context."""
    b = report["benchmark"]
    m = report["machine"]
    cal = report.get("calibration") or {}
    lines = [
        "# Export precision comparison (ONNX Runtime CPU)",
        "",
        f"Command: `{report.get('command', '?')}` (commit {report.get('commit', '?')}).",
        "",
        f"Bundle fingerprint `{report['fingerprint']}`; source `{report['source'].get('path')}` "
        f"({report['source'].get('format')}, sha256 {str(report['source'].get('sha256', ''))[:16]}). Benchmark "
        f"`{b['path']}` ({b.get('meta', '')}).",
        "",
    ]
    if report.get("study"):
        lines += _study_markdown(report["study"])
    if cal:
        lines += _fallback_markdown(cal)
    lines += [
        "## Unseen split (evaluated once)",
        "",
        f"{b['queries']} sketch queries against {b['gallery']} photos of the **unseen** classes. Latency: median "
        f"wall time per image, ONNX Runtime {m['onnxruntime']} CPU, {m['ort_threads']} thread(s), input "
        f"{report['input_shape']}, on {m['cpu']} ({m['cores']} cores, shared machine: expect noise).",
        "",
        "| precision | mAP@all | Δ mAP@all | P@100 | mAP@200 | P@200 | top-10 overlap | size (MB) | ms/img b=1 | "
        "ms/img b=32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['precision']} | {r['map_all']:.4f} | {r['delta_map_all']:+.4f} | {r['p_100']:.4f} | "
            f"{r['map_200']:.4f} | {r['p_200']:.4f} | {r['top10_overlap']:.3f} | {r['bytes'] / 1e6:.2f} | "
            f"{r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.2f} |"
        )
    lines += [
        "",
        "Targets (issue #4): fp16 |Δ mAP@all| <= 0.002; int8 |Δ mAP@all| <= 0.01 and top-10 overlap >= 0.9.",
        "",
        "INT8 latency on ONNX Runtime CPU: with Q/DQ on the inputs only, ONNX Runtime runs each quantized "
        "convolution as dequantize + float convolution (it fuses a QDQ Conv into QLinearConv only when the "
        "output is quantized too), so the int8 file is slower than fp32 here; it is meant for TensorRT "
        "(explicit quantization). On a CPU, use fp32 or fp16.",
        "",
    ]
    return "\n".join(lines)


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "export", "zsbir_infer", "benchmarks/bench_export.py"],
            cwd=ROOT.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bench_meta(bench: Path) -> str:
    try:
        meta = json.loads((bench / "meta.json").read_text())
    except (OSError, ValueError):
        return "no meta.json"
    counts = meta.get("counts", {})
    return f"{meta.get('generator', '?')} v{meta.get('version', '?')}, seed {meta.get('seed', '?')}, {counts}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to export (default: the embedded default model)")
    ap.add_argument("--bundle", type=Path, help="measure this existing bundle instead of exporting")
    ap.add_argument("--bench", type=Path, default=None, help="benchmark folder (default: see DEFAULT_BENCHES)")
    ap.add_argument("--calib-count", type=int, default=512)
    ap.add_argument("--calib-method", default="mse", choices=["mse", "entropy", "percentile", "minmax"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the export and of the study")
    ap.add_argument("--study-folds", type=int, default=5, help="folds of the seen-class INT8 recipe study (0: skip it)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out-stem", default="export_default", help="results/<stem>.md and .json")
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite results/<stem>.md from results/<stem>.json, run nothing"
    )
    args = ap.parse_args(argv)
    out_dir = ROOT / "results"
    if args.render_only:
        saved = json.loads((out_dir / f"{args.out_stem}.json").read_text())
        (out_dir / f"{args.out_stem}.md").write_text(to_markdown(saved))
        return 0

    bench = _ensure_bench(args.bench or next((p for p in DEFAULT_BENCHES if p.exists()), DEFAULT_BENCHES[-1]))
    command = shlex.join(["python", "benchmarks/bench_export.py", *(sys.argv[1:] if argv is None else argv)])
    checkpoint = args.checkpoint
    if checkpoint is None:
        from zsbir_infer.cli.export import default_checkpoint_path

        checkpoint = default_checkpoint_path()
    with tempfile.TemporaryDirectory(prefix="zsbir-bench-export-") as tmp:
        study = None
        if args.study_folds and args.bundle is None:
            study = holdout_study(checkpoint, bench, args.study_folds, args.seed, Path(tmp))
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            _export(checkpoint, bench, bundle, args.calib_count, args.calib_method, args.seed)
        report = measure(bundle, bench, args.threads, args.reps)
    report["command"] = command
    report["commit"] = _commit()
    report["benchmark"]["meta"] = _bench_meta(bench)
    if study is not None:
        report["study"] = study
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.out_stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{args.out_stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
