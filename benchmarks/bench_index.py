"""Indexing throughput: the full ``zsbir index`` pipeline against the model alone, same backend, same files.

* ``model_only``: the photos are decoded and preprocessed once, up front; then only
  ``Encoder.embed_arrays`` runs over the pre-decoded arrays (batches of ``--batch-size``): the ceiling.
* ``decode_only``: the pipeline's decoding thread pool over the same files, no model: the other bound
  (on a CPU backend decoding and the model share the same cores).
* ``pipeline``: ``zsbir_infer.indexer.index_folder`` on the same files into a fresh gallery: walk, plan,
  read + SHA-256 + reduced-size JPEG decode + preprocess on the thread pool (overlapped with inference),
  embed, atomic commits (fsync), skip bookkeeping. Timed end to end (``report.seconds``).

The two are interleaved within each repeat and the median of the per-repeat ratios is reported, so
that load from other processes hits both alike. Photos are synthetic (``zsbir_infer.datasets.synth``
photo renderer, JPEG, ``--photo-size`` pixels square; 256 is the Sketchy photo size).

    python benchmarks/bench_index.py [--model BUNDLE] [--photos 512] [--photo-size 256] [--repeats 5]
        [--out benchmarks/results/index_query]      # merges an "index" section into OUT.json, rewrites OUT.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_query_results import machine, merge_results


def make_photos(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` synthetic photos (JPEG, ``size`` x ``size``) in ``folder`` (kept between runs)."""
    from zsbir_infer.datasets.synth import SynthConfig, all_classes, render_image

    config = SynthConfig(size=size)
    classes = [c.name for c in all_classes()[:20]]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        cls = classes[i % len(classes)]
        p = folder / cls / f"{i:05d}.jpg"
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            render_image(config, cls, "photo", i).save(p, format="JPEG", quality=90)
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the embedded default model)")
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--photo-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: the encoder's)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "zsbir-bench-index")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/index_query"))
    ap.add_argument("--label", default="", help="stored as section 'index:LABEL' (several models side by side)")
    args = ap.parse_args()

    from zsbir_infer.encoder import Encoder
    from zsbir_infer.indexer import _decoded_batches, index_folder, walk
    from zsbir_infer.preprocess import preprocess_batch

    photos_dir = args.cache / f"photos_{args.photos}_{args.photo_size}"
    files = make_photos(photos_dir, args.photos, args.photo_size)
    enc = Encoder.open(args.model, backend=args.backend, batch_size=args.batch_size, workers=args.workers)
    print(f"model {enc.fingerprint} ({enc.describe()}), {len(files)} photos of {args.photo_size}px", flush=True)
    spec = enc.bundle.preprocess_spec("photo")
    arrays = preprocess_batch(files, spec)  # decoded once, outside the timing
    enc.embed_arrays(arrays[: args.batch_size], "photo")  # warm-up
    # Warm the page cache and the pipeline code paths once.
    gal = args.cache / "gallery"
    shutil.rmtree(gal, ignore_errors=True)
    index_folder(photos_dir, gal, enc, batch_size=args.batch_size, workers=args.workers, build_ann_from=0)

    # Time spent inside the model during the pipeline (the rest is waiting for decoding, committing, ...).
    busy = [0.0]
    real_embed = enc.embed_arrays

    def timed_embed(batch: Any, domain: str) -> Any:
        t = time.perf_counter()
        try:
            return real_embed(batch, domain)
        finally:
            busy[0] += time.perf_counter() - t

    model_rates, pipe_rates, ratios, embed_phase, decode_rates, busy_fracs = [], [], [], [], [], []
    for rep in range(args.repeats):
        # The decoding bound: the pipeline's thread pool reading and decoding every file, no model.
        t0 = time.perf_counter()
        for _ in _decoded_batches(list(walk(photos_dir).entries), enc, args.batch_size, args.workers):
            pass
        decode_rates.append(len(files) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for s in range(0, len(arrays), args.batch_size):
            enc.embed_arrays(arrays[s : s + args.batch_size], "photo")
        m = len(arrays) / (time.perf_counter() - t0)
        shutil.rmtree(gal, ignore_errors=True)
        busy[0] = 0.0
        enc.embed_arrays = timed_embed  # type: ignore[method-assign]
        report = index_folder(photos_dir, gal, enc, batch_size=args.batch_size, workers=args.workers, build_ann_from=0)
        enc.embed_arrays = real_embed  # type: ignore[method-assign]
        busy_fracs.append(busy[0] / report.seconds)
        assert report.indexed == len(files), report.to_dict()
        p = len(files) / report.seconds
        model_rates.append(m)
        pipe_rates.append(p)
        ratios.append(p / m)
        embed_phase.append(report.files_per_s)
        print(
            f"repeat {rep + 1}: model only {m:.1f} img/s, decode only {decode_rates[-1]:.1f} img/s, "
            f"pipeline {p:.1f} files/s, ratio {p / m:.3f}, model busy {busy_fracs[-1]:.1%} of the pipeline",
            flush=True,
        )
    describe = enc.describe()
    enc.close()
    shutil.rmtree(gal, ignore_errors=True)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "model": {
            "fingerprint": enc.fingerprint,
            "backend": enc.backend,
            "describe": describe,
            "input": list(spec.size),
            "path": str(enc.bundle.path),
        },
        "photos": len(files),
        "photo_size": args.photo_size,
        "batch_size": args.batch_size,
        "workers": enc.workers,
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ZSBIR_NUM_THREADS")},
        "repeats": args.repeats,
        "model_only_img_per_s": [round(x, 2) for x in model_rates],
        "pipeline_files_per_s": [round(x, 2) for x in pipe_rates],
        "pipeline_embed_phase_files_per_s": [round(x, 2) for x in embed_phase],
        "ratios": [round(x, 4) for x in ratios],
        "decode_only_img_per_s": [round(x, 2) for x in decode_rates],
        "pipeline_model_busy_fraction": [round(x, 4) for x in busy_fracs],
        "median_pipeline_model_busy_fraction": round(statistics.median(busy_fracs), 4),
        "median_decode_only_img_per_s": round(statistics.median(decode_rates), 2),
        "median_model_only_img_per_s": round(statistics.median(model_rates), 2),
        "median_pipeline_files_per_s": round(statistics.median(pipe_rates), 2),
        "median_ratio": round(statistics.median(ratios), 4),
        "target_ratio": 0.9,
    }
    print(f"median ratio {result['median_ratio']:.3f} (target >= 0.90)")
    merge_results(args.out, f"index:{args.label}" if args.label else "index", result)


if __name__ == "__main__":
    main()
