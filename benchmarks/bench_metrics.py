"""Time zsbir_infer.metrics.evaluate on a large synthetic retrieval problem.

Default: 10,000 queries x 50,000 gallery items, 64-d float embeddings, 50 classes (cosine ranking),
then the same with 64-bit ITQ codes (Hamming ranking). Prints the median wall time of the repeats.

    python benchmarks/bench_metrics.py [--queries 10000] [--gallery 50000] [--dim 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from zsbir_infer.itq import ITQ
from zsbir_infer.metrics import evaluate


def _make(nq: int, ng: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    ql = rng.integers(0, n_classes, nq)
    gl = rng.integers(0, n_classes, ng)
    q = centres[ql] + 1.5 * rng.standard_normal((nq, dim)).astype(np.float32)
    g = centres[gl] + 1.5 * rng.standard_normal((ng, dim)).astype(np.float32)
    return q, ql, g, gl


def _time(fn: object, repeats: int) -> tuple[float, list[float], dict[str, float]]:
    times: list[float] = []
    res: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, res


def main() -> None:
    """Run the benchmark and print (and optionally save) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--gallery", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ranking threads (default: min(4, CPUs))")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    q, ql, g, gl = _make(args.queries, args.gallery, args.dim, args.classes, seed=0)
    print(
        f"evaluate: {args.queries} queries x {args.gallery} gallery, dim {args.dim}, {args.classes} classes, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, load average before {os.getloadavg()[0]:.2f}"
    )
    figures: dict[str, object] = {
        "queries": args.queries,
        "gallery": args.gallery,
        "dim": args.dim,
        "classes": args.classes,
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "loadavg_1min_before": os.getloadavg()[0],
    }
    for protocol in ("sake", "zse"):
        med, times, res = _time(
            lambda protocol=protocol: evaluate(
                q, ql, g, gl, protocol=protocol, batch_size=args.batch_size, n_threads=args.threads
            ),
            args.repeats,
        )
        print(f"  cosine  {protocol:4s}: median {med:.2f} s  (runs {', '.join(f'{t:.2f}' for t in times)})  {res}")
        figures[f"cosine_{protocol}_s"] = med
        figures[f"cosine_{protocol}_metrics"] = res

    t0 = time.perf_counter()
    itq = ITQ.fit(q, n_bits=64, n_iter=50, seed=0)
    qc, gc = itq.transform(q), itq.transform(g)
    fit_s = time.perf_counter() - t0
    print(f"  ITQ fit (50 iterations on the queries) + encode: {fit_s:.2f} s")
    figures["itq_fit_encode_s"] = fit_s
    med, times, res = _time(
        lambda: evaluate(qc, ql, gc, gl, metric="hamming", batch_size=args.batch_size, n_threads=args.threads),
        args.repeats,
    )
    print(f"  hamming sake: median {med:.2f} s  (runs {', '.join(f'{t:.2f}' for t in times)})  {res}")
    figures["hamming_sake_s"] = med
    figures["hamming_sake_metrics"] = res
    figures["loadavg_1min_after"] = os.getloadavg()[0]
    print(f"load average after {os.getloadavg()[0]:.2f} (other processes share these CPUs: compare with care)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
