"""Accuracy, size and CPU latency of a bundle's fp32 / fp16 / int8 models (ONNX Runtime CPU).

Exports the checkpoint (default: the embedded default model) with all three precisions, calibrating INT8
on the benchmark's *seen* split, then evaluates every precision on the *unseen* split (sketch queries
against photos; mAP@all, P@100, mAP@200, P@200), the top-10 overlap of each query's results with fp32,
the model size on disk and the CPU latency per image. Writes a Markdown table and a JSON file.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "fp16", "int8")
# The default synthetic benchmark as benchmarks/train_default.py leaves it, else data/synth (generated if absent).
DEFAULT_BENCHES = (ROOT.parent / "build" / "default_model" / "synth", ROOT.parent / "data" / "synth")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ensure_bench(path: Path) -> Path:
    if not path.exists():
        from zsbir_infer.datasets.synth import generate_synthetic

        print(f"generating the default synthetic benchmark in {path} ...", file=sys.stderr)
        generate_synthetic(path, progress=False)
    return path


def _export(checkpoint: Path, bench: Path, out: Path, calib_count: int, method: str) -> dict[str, Any]:
    from zsbir_export.bundle import ExportOptions, export_bundle
    from zsbir_export.checkpoints import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    options = ExportOptions(
        precisions=PRECISIONS,
        calib_dir=bench,
        calib_count=calib_count,
        calib_method=method,  # type: ignore[arg-type]
        overwrite=True,
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
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "ort_threads": threads,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "input_shape": list(shape),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The results table with its context."""
    b = report["benchmark"]
    m = report["machine"]
    cal = report.get("calibration") or {}
    fallback = cal.get("sensitivity_fallback_nodes", [])
    initial = float(cal.get("sensitivity_fallback", {}).get("initial", float("nan")))
    lines = [
        "# Export precision comparison (ONNX Runtime CPU)",
        "",
        f"Bundle fingerprint `{report['fingerprint']}`; source `{report['source'].get('path')}` "
        f"({report['source'].get('format')}). Evaluated on the **unseen** split of `{b['path']}`: "
        f"{b['queries']} sketch queries against {b['gallery']} photos. INT8: QDQ, {cal.get('method', '?')} "
        f"calibration on {cal.get('images', '?')} seen-split images ({cal.get('per_domain', {})}).",
        "",
        f"INT8 sensitivity fallback: {len(fallback)} of {cal.get('heavy_nodes', '?')} quantizable layers kept in "
        f"float ({', '.join(fallback) or 'none'}); verification overlap before the fallback {initial:.3f}.",
        "",
        f"Latency: median wall time per image, ONNX Runtime {m['onnxruntime']} CPU, {m['ort_threads']} thread(s), "
        f"input {report['input_shape']}, on {m['cpu']} ({m['cores']} cores, shared machine: expect noise).",
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
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to export (default: the embedded default model)")
    ap.add_argument("--bundle", type=Path, help="measure this existing bundle instead of exporting")
    ap.add_argument("--bench", type=Path, default=None, help="benchmark folder (default: see DEFAULT_BENCHES)")
    ap.add_argument("--calib-count", type=int, default=512)
    ap.add_argument("--calib-method", default="percentile", choices=["entropy", "percentile", "minmax"])
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out-stem", default="export_default", help="results/<stem>.md and .json")
    args = ap.parse_args(argv)

    bench = _ensure_bench(args.bench or next((p for p in DEFAULT_BENCHES if p.exists()), DEFAULT_BENCHES[-1]))
    with tempfile.TemporaryDirectory(prefix="zsbir-bench-export-") as tmp:
        bundle = args.bundle
        if bundle is None:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from zsbir_infer.cli.export import default_checkpoint_path

                checkpoint = default_checkpoint_path()
            bundle = Path(tmp) / "bundle"
            _export(checkpoint, bench, bundle, args.calib_count, args.calib_method)
        report = measure(bundle, bench, args.threads, args.reps)
    out_dir = ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.out_stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{args.out_stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
