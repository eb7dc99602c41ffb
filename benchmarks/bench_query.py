"""Query latency: a warm library query on a 100k-photo gallery, and ``zsbir query`` from a cold start.

* ``warm_library_query``: ``Retriever.search(sketch_path, k=10)`` on an opened :class:`Retriever`
  (decode + preprocess + embed the sketch with the model, search, path lookup): what a server pays
  per request. Also split into its parts: ``embed_sketch`` and ``search_only`` (precomputed embedding).
* ``cold_zsbir_query``: wall time of a fresh ``zsbir query SKETCH --gallery G --model M`` process
  (interpreter start, imports, bundle + ONNX session, gallery open, embed, search, print).
* ``python -X importtime`` over the same command: total import time and the largest top-level imports.

The gallery holds ``--rows`` (default 100,000) synthetic unit vectors of the model's dimension (clustered
like real embeddings), written through ``Gallery.add`` under the model's fingerprint, so that the model
can query it. Repeats: median (and p90) of ``--repeats`` runs.

    python benchmarks/bench_query.py [--model BUNDLE] [--rows 100000] [--repeats 30]
        [--out benchmarks/results/index_query]      # merges a "query" section into OUT.json, rewrites OUT.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_query_results import machine, merge_results


def build_gallery(path: Path, fingerprint: str, dim: int, rows: int, seed: int = 0) -> None:
    """A gallery of ``rows`` clustered unit vectors (kept between runs when it matches)."""
    from zsbir_infer.gallery import FileRecord, Gallery

    if (path / "manifest.json").exists():
        with Gallery.open(path) as g:
            if g.fingerprint == fingerprint and len(g) == rows and g.dim == dim:
                return
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(500, dim)).astype(np.float32)
    g = Gallery.create(path, fingerprint=fingerprint, dim=dim)
    chunk = 20_000
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        v = centers[rng.integers(0, len(centers), n)] + 0.7 * rng.normal(size=(n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        g.add([FileRecord(f"c{(s + i) % 500:03d}/photo_{s + i:07d}.jpg", 1000, 1) for i in range(n)], v)
    g.close()


def stats_ms(samples: list[float]) -> dict[str, float]:
    xs = sorted(samples)
    return {
        "median_ms": round(statistics.median(xs) * 1000, 3),
        "p90_ms": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))] * 1000, 3),
        "min_ms": round(xs[0] * 1000, 3),
    }


def importtime(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` (a python command line) with -X importtime; total self time and top cumulative imports."""
    out = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True)
    total = 0
    top: list[tuple[str, float]] = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        total += int(m.group(1))
        if len(m.group(3)) == 1:  # top-level import
            top.append((m.group(4), int(m.group(2)) / 1000))
    top.sort(key=lambda t: -t[1])
    return {"total_ms": round(total / 1000, 1), "top": [(n, round(ms, 1)) for n, ms in top[:12]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the embedded default model)")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cold-repeats", type=int, default=7)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "zsbir-bench-query")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/index_query"))
    args = ap.parse_args()

    from PIL import Image

    from zsbir_infer.bundle import Bundle, default_bundle_path
    from zsbir_infer.datasets.synth import SynthConfig, all_classes, render_image
    from zsbir_infer.retriever import Retriever

    bundle = Bundle.open(args.model)
    model_path = args.model if args.model is not None else default_bundle_path()
    args.cache.mkdir(parents=True, exist_ok=True)
    gal = args.cache / f"gallery_{bundle.fingerprint}_{args.rows}"
    t0 = time.perf_counter()
    build_gallery(gal, bundle.fingerprint, bundle.embedding_dim, args.rows)
    print(f"gallery {gal}: {args.rows} x {bundle.embedding_dim} ({time.perf_counter() - t0:.1f} s)", flush=True)
    sketch = args.cache / "sketch.png"
    render_image(SynthConfig(size=256), all_classes()[3].name, "sketch", 0).save(sketch)
    assert Image.open(sketch).size == (256, 256)

    rows_out: list[dict[str, Any]] = []
    with Retriever.open(gal, model=args.model) as r:
        emb = r.embed([str(sketch)])
        for _ in range(3):  # warm-up (session, memory maps, scorer)
            r.search(str(sketch), k=args.k)
        full, embed_t, search_t = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r.search(str(sketch), k=args.k)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            r.embed([str(sketch)])
            embed_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            r.search(emb, k=args.k)
            search_t.append(time.perf_counter() - t)
        describe = r.encoder.describe()
    rows_out.append(
        {"name": "warm library query (Retriever.search on a sketch file)", **stats_ms(full), "target": "< 50 ms"}
    )
    rows_out.append({"name": "  of which: embed the sketch", **stats_ms(embed_t)})
    rows_out.append({"name": "  of which: search only (precomputed embedding)", **stats_ms(search_t)})

    env = {**os.environ}
    env.pop("ZSBIR_GALLERY", None)
    cmd = [
        sys.executable,
        "-c",
        "from zsbir_infer.cli import main; main()",
        "query",
        str(sketch),
        "--gallery",
        str(gal),
        "-k",
        str(args.k),
    ]
    if args.model is not None:
        cmd += ["--model", str(args.model)]
    cold = []
    for _ in range(args.cold_repeats):
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        cold.append(time.perf_counter() - t)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip().splitlines()) == args.k
    rows_out.append({"name": "cold `zsbir query` (fresh process, wall time)", **stats_ms(cold), "target": "< 1.5 s"})
    start = [sys.executable, "-c", "pass"]
    bare = []
    for _ in range(args.cold_repeats):
        t = time.perf_counter()
        subprocess.run(start, env=env, check=True)
        bare.append(time.perf_counter() - t)
    rows_out.append({"name": "  for scale: bare `python -c pass`", **stats_ms(bare)})
    imp = importtime(cmd, env)
    for row in rows_out:
        print(f"{row['name']}: median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms")
    print(f"imports: {imp['total_ms']:.0f} ms; top {imp['top'][:5]}")
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "model": {
            "fingerprint": bundle.fingerprint,
            "describe": describe,
            "path": str(model_path),
            "input": list(bundle.preprocess_spec("sketch").size),
        },
        "gallery_rows": args.rows,
        "dim": bundle.embedding_dim,
        "k": args.k,
        "repeats": args.repeats,
        "cold_repeats": args.cold_repeats,
        "rows": rows_out,
        "importtime": imp,
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ZSBIR_NUM_THREADS")},
    }
    merge_results(args.out, "query", result)


if __name__ == "__main__":
    main()
