"""Performance model of the fused inner-product top-k kernels on a GPU: how the time of one call moves with
Q, N, k and the kernel path, to tell which part (gallery stream, tensor math, selection) limits a point.

    python benchmarks/profile_topk_gpu.py                 # the sweep below, one line per point (median ms)
    python benchmarks/profile_topk_gpu.py --one 1024 10000000 64 100 tensor   # a single call (for ncu)

Data are standard-normal fp16 (like the benchmark); timing is cudaEvent-based, median of repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_topk_gpu import PATH_CODES, Timer, c_call  # noqa: E402

from zsbir_infer.gpu import _cuda  # noqa: E402

SWEEP = [
    # (Q, N, D, k, path)
    (1024, 10_000_000, 64, 100, "tensor"),
    (1024, 10_000_000, 64, 100, "tensor32"),
    (1024, 10_000_000, 64, 10, "tensor"),
    (1024, 10_000_000, 64, 1, "tensor"),
    (1024, 10_000_000, 64, 256, "tensor"),
    (64, 10_000_000, 64, 100, "tensor"),
    (64, 10_000_000, 64, 1, "tensor"),
    (16, 10_000_000, 64, 1, "tensor"),
    (1024, 1_000_000, 64, 100, "tensor"),
    (1024, 10_000_000, 128, 100, "tensor"),
]


def one_call(torch: Any, lib: Any, nq: int, n: int, d: int, k: int, path: str) -> Any:
    g = torch.randn(n, d, device="cuda", dtype=torch.float16)
    q = torch.randn(nq, d, device="cuda", dtype=torch.float16)
    s = torch.empty(nq, k, device="cuda", dtype=torch.float32)
    i = torch.empty(nq, k, device="cuda", dtype=torch.int64)
    args = (q.data_ptr(), g.data_ptr(), None, 0, nq, n, d, k, s.data_ptr(), i.data_ptr(), PATH_CODES[path], None)
    return c_call(lib.zsbir_topk_ip, args), (g, q, s, i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=5, metavar=("Q", "N", "D", "K", "PATH"), help="run one call once (for a profiler)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    lib = _cuda.load_library()
    if args.one:
        nq, n, d, k = (int(x) for x in args.one[:4])
        call, _keep = one_call(torch, lib, nq, n, d, k, args.one[4])
        call()
        torch.cuda.synchronize()
        return 0
    timer = Timer()
    print(f"{'Q':>6} {'N':>10} {'D':>5} {'k':>5} {'path':<9} {'ms':>9}")
    for nq, n, d, k, path in SWEEP:
        call, keep = one_call(torch, lib, nq, n, d, k, path)
        ms = statistics.median(timer.time_ms(call, 2, args.repeats))
        print(f"{nq:>6} {n:>10} {d:>5} {k:>5} {path:<9} {ms:>9.3f}", flush=True)
        del keep
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
