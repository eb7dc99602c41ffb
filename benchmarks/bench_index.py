"""Indexing throughput: the full ``zsbir index`` pipeline against the model alone, same backend, same files.

* ``model_only``: the photos are decoded and preprocessed once, up front; then only
  ``Encoder.embed`` runs over the pre-decoded arrays (batches of ``--batch-size``): the ceiling.
* ``decode_only``: the pipeline's decoding thread pool over the same files, no model: the other bound
  (on a CPU backend decoding and the model share the same cores).
* ``pipeline``: ``zsbir_infer.indexer.index_folder`` on the same files into a fresh gallery: walk, plan,
  read + SHA-256 + reduced-size JPEG decode + preprocess on the thread pool (overlapped with inference),
  embed, atomic commits (fsync), skip bookkeeping. Timed end to end (``report.seconds``).

The three are interleaved within each repeat and the median of the per-repeat ratios is reported, so
that load from other processes hits them alike. Photos are synthetic (``zsbir_infer.datasets.synth``
photo renderer, JPEG, ``--photo-size`` pixels square; 256 is the Sketchy photo size).

Each phase is also timed in CPU seconds of this process (``time.process_time``, all threads), which
other processes on the machine hardly disturb. With a CPU backend, decoding and the model compete for
the same cores, so the pipeline's ratio to the model alone is bounded by about
``bound = t_model / (t_model + t_decode)`` (CPU seconds per image of the model-only and decode-only
phases; exact when the model alone keeps every core busy, see ``model_only_core_use``), and
``efficiency = ratio / bound`` says how close the pipeline gets to that bound. It is the product of
``cpu_efficiency = (t_model + t_decode) / t_pipeline`` (CPU the pipeline spends beyond its two parts:
walk, hashing, commits, contention) and the ratio of the CPU shares the two runs got
(``pipeline_core_use / model_only_core_use``): on a loaded machine the pipeline, with more runnable
threads, can get a larger share than the model alone and beat the bound.

    python benchmarks/bench_index.py [--model BUNDLE] [--photos 512] [--photo-size 256] [--repeats 5]
        [--out benchmarks/results/index_query]      # merges an "index" section into OUT.json, rewrites OUT.md

Stand-in models (random weights: the speed depends on the architecture only) are made with

    python benchmarks/bench_index.py --make-standin /tmp/h8/standin64px --standin-width 16 --standin-size 64
    python benchmarks/bench_index.py --make-standin /tmp/h8/standin64 --standin-width 64 --standin-size 224

which write DIR/ckpt.{json,safetensors} (ResNet-18 of that width, 64-d embedding, no domain input,
torch seed 0; needs the ``train`` extra) and export DIR/bundle with ``zsbir export``; then pass
``--model DIR/bundle``. The results were measured with ``/tmp/h8/standin64px`` (the default model's
architecture, 64 px), ``/tmp/h8/standin`` (width 16, 96 px) and ``/tmp/h8/standin64`` (width 64, 224 px).
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


def make_standin(out: Path, width: int, size: int) -> Path:
    """A random-init ResNet-18 checkpoint (``width``, ``size`` px input) in ``out`` and its bundle ``out/bundle``."""
    import subprocess

    import torch
    from zsbir_export.checkpoints import save_checkpoint
    from zsbir_export.models.factory import build_model
    from zsbir_export.train.data import make_spec

    torch.manual_seed(0)
    arch = {"backbone": "resnet18", "width": width, "embed_dim": 64, "domain_conditioned": False, "num_classes": 0}
    model = build_model(arch).eval()
    out.mkdir(parents=True, exist_ok=True)
    spec = make_spec(size)
    save_checkpoint(model, {"preprocess": {"photo": spec, "sketch": spec}}, out / "ckpt")
    bundle = out / "bundle"
    cmd = [sys.executable, "-c", "from zsbir_infer.cli import main; main()", "export", str(out / "ckpt.json")]
    subprocess.run([*cmd, "-o", str(bundle), "--overwrite", "-q"], check=True)
    return bundle


def _cpu_phase(fn: Any) -> tuple[float, float]:
    """Run ``fn()``; (wall seconds, CPU seconds of this process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


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
    ap.add_argument(
        "--baseline-decoder",
        choices=["none", "pil"],
        default="pil",
        help="also time decode-only and the pipeline with PIL's draft decoder (no libjpeg-turbo N/8 scaling) "
        "in every repeat, side by side",
    )
    ap.add_argument("--make-standin", type=Path, default=None, metavar="DIR", help="make a stand-in bundle and exit")
    ap.add_argument("--standin-width", type=int, default=16)
    ap.add_argument("--standin-size", type=int, default=64)
    args = ap.parse_args()
    if args.make_standin is not None:
        print(make_standin(args.make_standin, args.standin_width, args.standin_size))
        return

    from zsbir_infer.encoder import Encoder
    from zsbir_infer.indexer import _decoded_batches, index_folder, walk
    from zsbir_infer.preprocess import preprocess_batch

    photos_dir = args.cache / f"photos_{args.photos}_{args.photo_size}"
    files = make_photos(photos_dir, args.photos, args.photo_size)
    enc = Encoder.open(args.model, backend=args.backend, batch_size=args.batch_size, workers=args.workers)
    print(f"model {enc.fingerprint} ({enc.describe()}), {len(files)} photos of {args.photo_size}px", flush=True)
    spec = enc.bundle.preprocess_spec("photo")
    arrays = preprocess_batch(files, spec)  # decoded once, outside the timing
    enc.embed(arrays[: args.batch_size], "photo")  # warm-up
    # Warm the page cache and the pipeline code paths once.
    gal = args.cache / "gallery"
    shutil.rmtree(gal, ignore_errors=True)
    index_folder(photos_dir, gal, enc, batch_size=args.batch_size, workers=args.workers, build_ann_from=0)

    # Time spent inside the model during the pipeline (the rest is waiting for decoding, committing, ...).
    busy = [0.0]
    real_embed = enc.embed

    def timed_embed(batch: Any, domain: str) -> Any:
        t = time.perf_counter()
        try:
            return real_embed(batch, domain)
        finally:
            busy[0] += time.perf_counter() - t

    model_rates, pipe_rates, ratios, embed_phase, decode_rates, busy_fracs = [], [], [], [], [], []
    cpu_model, cpu_decode, cpu_pipe, model_core_use, bounds, effs = [], [], [], [], [], []
    pipe_core_use, cpu_effs = [], []
    base_decode_rates, base_cpu_decode, base_pipe_rates, base_ratios = [], [], [], []
    cpus = len(os.sched_getaffinity(0))
    entries = list(walk(photos_dir).entries)
    n = len(files)

    def decode_pass() -> None:
        for _ in _decoded_batches(entries, enc, args.batch_size, args.workers):
            pass

    def model_pass() -> None:
        for s in range(0, len(arrays), args.batch_size):
            enc.embed(arrays[s : s + args.batch_size], "photo")

    import zsbir_infer.preprocess as preprocess_module

    scaled_decoder = preprocess_module._simplejpeg

    def baseline_phases(m: float) -> None:
        """Decode-only and the pipeline once more with PIL's draft decoder (the decoder before N/8 scaling)."""
        preprocess_module._simplejpeg = None
        try:
            wall, cpu = _cpu_phase(decode_pass)
            base_decode_rates.append(n / wall)
            base_cpu_decode.append(cpu / n)
            shutil.rmtree(gal, ignore_errors=True)
            report = index_folder(
                photos_dir, gal, enc, batch_size=args.batch_size, workers=args.workers, build_ann_from=0
            )
            assert report.indexed == n, report.to_dict()
            base_pipe_rates.append(n / report.seconds)
            base_ratios.append(base_pipe_rates[-1] / m)
        finally:
            preprocess_module._simplejpeg = scaled_decoder

    for rep in range(args.repeats):
        # The decoding bound: the pipeline's thread pool reading and decoding every file, no model.
        wall, cpu = _cpu_phase(decode_pass)
        decode_rates.append(n / wall)
        cpu_decode.append(cpu / n)
        wall, cpu = _cpu_phase(model_pass)
        m = n / wall
        cpu_model.append(cpu / n)
        model_core_use.append(cpu / wall / cpus)
        shutil.rmtree(gal, ignore_errors=True)
        busy[0] = 0.0
        enc.embed = timed_embed  # type: ignore[method-assign]
        c0 = time.process_time()
        report = index_folder(photos_dir, gal, enc, batch_size=args.batch_size, workers=args.workers, build_ann_from=0)
        cpu_pipe.append((time.process_time() - c0) / n)
        pipe_core_use.append(cpu_pipe[-1] * n / report.seconds / cpus)
        enc.embed = real_embed  # type: ignore[method-assign]
        busy_fracs.append(busy[0] / report.seconds)
        assert report.indexed == n, report.to_dict()
        p = n / report.seconds
        model_rates.append(m)
        pipe_rates.append(p)
        ratios.append(p / m)
        bounds.append(cpu_model[-1] / (cpu_model[-1] + cpu_decode[-1]))
        effs.append(ratios[-1] / bounds[-1])
        cpu_effs.append((cpu_model[-1] + cpu_decode[-1]) / cpu_pipe[-1])
        embed_phase.append(report.files_per_s)
        if args.baseline_decoder == "pil" and scaled_decoder is not None:
            baseline_phases(m)
            print(
                f"  baseline (PIL draft decoder): decode only {base_decode_rates[-1]:.1f} img/s "
                f"({base_cpu_decode[-1] * 1e3:.3f} CPU ms/img), pipeline {base_pipe_rates[-1]:.1f} files/s, "
                f"ratio {base_ratios[-1]:.3f}",
                flush=True,
            )
        print(
            f"repeat {rep + 1}: model only {m:.1f} img/s ({cpu_model[-1] * 1e3:.3f} CPU ms/img, "
            f"{model_core_use[-1]:.0%} of {cpus} cores), decode only {decode_rates[-1]:.1f} img/s "
            f"({cpu_decode[-1] * 1e3:.3f} CPU ms/img), pipeline {p:.1f} files/s ({cpu_pipe[-1] * 1e3:.3f} CPU ms/img), "
            f"ratio {p / m:.3f}, bound {bounds[-1]:.3f}, efficiency {effs[-1]:.3f} (CPU {cpu_effs[-1]:.3f}, "
            f"pipeline on {pipe_core_use[-1]:.0%} of {cpus} cores), model busy {busy_fracs[-1]:.1%} of the pipeline",
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
        "decode_only_ms_per_img": [round(1e3 / x, 4) for x in decode_rates],
        "pipeline_model_busy_fraction": [round(x, 4) for x in busy_fracs],
        "median_pipeline_model_busy_fraction": round(statistics.median(busy_fracs), 4),
        "median_decode_only_img_per_s": round(statistics.median(decode_rates), 2),
        "median_model_only_img_per_s": round(statistics.median(model_rates), 2),
        "median_pipeline_files_per_s": round(statistics.median(pipe_rates), 2),
        "median_ratio": round(statistics.median(ratios), 4),
        "target_ratio": 0.9,
        "model_only_cpu_ms_per_img": [round(x * 1e3, 4) for x in cpu_model],
        "decode_only_cpu_ms_per_img": [round(x * 1e3, 4) for x in cpu_decode],
        "pipeline_cpu_ms_per_img": [round(x * 1e3, 4) for x in cpu_pipe],
        "model_only_core_use": [round(x, 4) for x in model_core_use],
        "pipeline_core_use": [round(x, 4) for x in pipe_core_use],
        "cpu_efficiency": [round(x, 4) for x in cpu_effs],
        "bound_ratio": [round(x, 4) for x in bounds],
        "efficiency": [round(x, 4) for x in effs],
        "median_model_only_cpu_ms_per_img": round(statistics.median(cpu_model) * 1e3, 4),
        "median_decode_only_cpu_ms_per_img": round(statistics.median(cpu_decode) * 1e3, 4),
        "median_pipeline_cpu_ms_per_img": round(statistics.median(cpu_pipe) * 1e3, 4),
        "median_model_only_core_use": round(statistics.median(model_core_use), 4),
        "median_bound_ratio": round(statistics.median(bounds), 4),
        "median_efficiency": round(statistics.median(effs), 4),
        "median_pipeline_core_use": round(statistics.median(pipe_core_use), 4),
        "median_cpu_efficiency": round(statistics.median(cpu_effs), 4),
        "decoder": "libjpeg-turbo N/8 scaling (simplejpeg)" if scaled_decoder is not None else "PIL draft",
        **(
            {
                "baseline_decoder": "PIL draft (1/2, 1/4, 1/8), same repeats",
                "baseline_decode_only_img_per_s": [round(x, 2) for x in base_decode_rates],
                "baseline_decode_only_cpu_ms_per_img": [round(x * 1e3, 4) for x in base_cpu_decode],
                "baseline_pipeline_files_per_s": [round(x, 2) for x in base_pipe_rates],
                "baseline_ratios": [round(x, 4) for x in base_ratios],
                "median_baseline_ratio": round(statistics.median(base_ratios), 4),
                "median_baseline_decode_only_cpu_ms_per_img": round(statistics.median(base_cpu_decode) * 1e3, 4),
            }
            if base_ratios
            else {}
        ),
        "bound_definition": "t_model / (t_model + t_decode), CPU seconds per image of the model-only and "
        "decode-only phases (time.process_time, all threads); efficiency = ratio / bound, per repeat; "
        "cpu_efficiency = (t_model + t_decode) / t_pipeline; core_use = CPU seconds / wall seconds / CPUs. "
        "ratio = (t_model / t_pipeline) * (pipeline core_use / model-only core_use), so "
        "efficiency = cpu_efficiency * (pipeline core_use / model-only core_use)",
    }
    print(
        f"median ratio {result['median_ratio']:.3f} (target >= 0.90), median bound {result['median_bound_ratio']:.3f}, "
        f"median efficiency {result['median_efficiency']:.3f}"
    )
    merge_results(args.out, f"index:{args.label}" if args.label else "index", result)


if __name__ == "__main__":
    main()
