"""Gallery format 2 costs (issue 13): checksum verification on open against a cold ``zsbir query``, the full
``zsbir info --verify``, and a warm ``Retriever.search`` against ``Gallery.search`` on the same vectors.

* ``verify on open``: the time ``Gallery.open(G, readonly=True)._load()`` spends checking the CRC-32 of every
  segment, in a fresh process (the rest of ``_load()``, reading the catalog and mapping the files, was paid
  by the first search before format 2 too); the target is < 5% of a cold ``zsbir query``.
* ``cold zsbir query``: wall time of a fresh ``zsbir query SKETCH --gallery G`` process (as bench_query.py).
* ``full verify``: ``Gallery.verify(full=True)`` (quick_check, checksums, catalog, vector lengths).
* ``warm Retriever.search`` with a precomputed embedding against ``Gallery.search(exact=True)`` on the same
  gallery; the target is a ratio within 1.5x.

The gallery: ``--rows`` (default 100,000) clustered unit vectors of the default model's dimension, under its
fingerprint (``bench_query.build_gallery``). Medians of ``--repeats`` runs.

    python benchmarks/bench_gallery_verify.py [--rows 100000] [--repeats 7] [--out benchmarks/results/gallery_verify]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_query import build_gallery

_LOAD = """
import sys, time
t0 = time.perf_counter()
from zsbir_infer.gallery import Gallery, segments
spent = [0.0]
real = segments.crc_file
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return real(*a, **k)
    finally:
        spent[0] += time.perf_counter() - t
segments.crc_file = timed
g = Gallery.open(sys.argv[1], readonly=True)
t1 = time.perf_counter()
g._load()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, spent[0])
"""


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warm-repeats", type=int, default=50)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "zsbir-bench-verify")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gallery_verify"))
    args = ap.parse_args()

    from PIL import Image, ImageDraw

    from zsbir_infer.bundle import Bundle
    from zsbir_infer.gallery import Gallery
    from zsbir_infer.retriever import Retriever

    bundle = Bundle.open(None)
    args.cache.mkdir(parents=True, exist_ok=True)
    gal = args.cache / f"gallery_{bundle.fingerprint}_{args.rows}"
    build_gallery(gal, bundle.fingerprint, bundle.embedding_dim, args.rows)
    sketch = args.cache / "sketch.png"
    img = Image.new("L", (256, 256), 255)
    ImageDraw.Draw(img).ellipse((40, 40, 216, 216), outline=0, width=6)
    img.save(sketch)
    env = {**os.environ}
    env.pop("ZSBIR_GALLERY", None)

    opens, loads, crcs = [], [], []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _LOAD, str(gal)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        a, b, c = (float(x) for x in out.stdout.split())
        opens.append(a)
        loads.append(b)
        crcs.append(c)
    cmd = [
        sys.executable,
        "-c",
        "from zsbir_infer.cli import main; main()",
        "query",
        str(sketch),
        "--gallery",
        str(gal),
    ]
    cold = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        cold.append(time.perf_counter() - t)
        assert out.returncode == 0, out.stderr
    full = []
    for _ in range(max(1, args.repeats // 2)):
        with Gallery.open(gal, readonly=True) as g:
            t = time.perf_counter()
            problems = g.verify(full=True)
            full.append(time.perf_counter() - t)
            assert problems == [], problems

    with Retriever.open(gal) as r:
        emb = r.embed([str(sketch)])
        g = r.gallery
        for _ in range(5):
            r.search(emb, k=10)
            g.search(emb, k=10, exact=True)
        ret, gs = [], []
        for _ in range(args.warm_repeats):
            t = time.perf_counter()
            r.search(emb, k=10)
            ret.append(time.perf_counter() - t)
            t = time.perf_counter()
            g.search(emb, k=10, exact=True)
            gs.append(time.perf_counter() - t)
        assert [h.id for h in r.search(emb, k=10)[0]] == [h.id for h in g.search(emb, k=10, exact=True)[0]]

    vec_bytes = sum(f.stat().st_size for f in (gal / "segments").iterdir())
    res: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "rows": args.rows,
        "dim": bundle.embedding_dim,
        "vector_bytes": vec_bytes,
        "cpu_count": os.cpu_count(),
        "open_ms": median_ms(opens),
        "load_ms": median_ms(loads),
        "verify_on_open_ms": median_ms(crcs),
        "verify_throughput_gb_s": round(vec_bytes / statistics.median(crcs) / 1e9, 2),
        "cold_query_ms": median_ms(cold),
        "verify_share_of_cold_query": round(statistics.median(crcs) / statistics.median(cold), 4),
        "full_verify_ms": median_ms(full),
        "warm_retriever_search_ms": median_ms(ret),
        "warm_gallery_search_ms": median_ms(gs),
        "retriever_over_gallery": round(statistics.median(ret) / statistics.median(gs), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Gallery format 2: verification and Retriever overhead",
        "",
        f"`{res['command']}` ({args.rows} x {res['dim']} float16 = {vec_bytes / 1e6:.1f} MB of vectors, "
        f"{res['cpu_count']} CPUs; medians)",
        "",
        "| measurement | value | target |",
        "| --- | --- | --- |",
        f"| checksum verification on open (CRC-32 of every segment, fresh process) | {res['verify_on_open_ms']:.1f} "
        f"ms ({res['verify_throughput_gb_s']} GB/s) | |",
        f"| for scale: all of `Gallery._load()` (catalog read, maps, checksums) | {res['load_ms']:.1f} ms | |",
        f"| cold `zsbir query` (fresh process, wall) | {res['cold_query_ms']:.0f} ms | |",
        f"| verification / cold query | {100 * res['verify_share_of_cold_query']:.2f} % | < 5 % |",
        f"| `zsbir info --verify` (`Gallery.verify(full=True)`) | {res['full_verify_ms']:.1f} ms | |",
        f"| warm `Retriever.search` (precomputed embedding, k=10) | {res['warm_retriever_search_ms']:.2f} ms | |",
        f"| warm `Gallery.search(exact=True)`, same vectors | {res['warm_gallery_search_ms']:.2f} ms | |",
        f"| Retriever / Gallery | {res['retriever_over_gallery']:.2f}x | <= 1.5x |",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
