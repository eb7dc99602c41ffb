#!/usr/bin/env python3
"""Benchmark the fused top-k CUDA kernels (zsbir_infer.gpu) against torch mm+topk, with roofline floors.

Run on a GPU machine with torch (CUDA build) and cuda-python installed, after `make kernels`:

    python benchmarks/bench_topk_gpu.py                    # default sweep, ~5 min on an H100
    python benchmarks/bench_topk_gpu.py --quick            # a handful of configurations
    python benchmarks/bench_topk_gpu.py --out-dir "$OUT"   # where the JSON + markdown go

For every configuration it reports the median of cudaEvent-timed repeats (after warm-up) of:
  * ours: one call of the C ABI (zsbir_topk_ip / zsbir_hamming_topk) on device-resident inputs, per path;
  * baseline: torch mm (fp16, cuBLAS) + torch.topk over gallery chunks, merged (Hamming: XOR + popcount
    table + topk);
and beside them the floors: bytes / measured device-to-device copy bandwidth and FLOPs / measured fp16
tensor-core rate (torch.mm 8192^3), the larger of the two, and our time over that floor. Each result is
checked against the baseline (float32 re-scoring of both index sets). Nothing here is a committed figure:
results are written next to the command, GPU, driver, CUDA and torch versions that produced them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zsbir_infer import gpu  # noqa: E402
from zsbir_infer.gpu import _cuda  # noqa: E402

PATH_CODES = {"auto": 0, "simt": 1, "tensor": 2, "tensor32": 3}

# (Q, N, D, k) inner-product configurations; the first two are the targets.
IP_TARGETS = [(1, 10_000_000, 64, 10), (1024, 10_000_000, 64, 100)]
IP_GRID = [(q, 1_000_000, d, k) for q in (1, 8, 64, 1024) for d in (64, 256) for k in (10, 100)] + [
    (1, 1_000_000, 64, 1024),
    (64, 1_000_000, 64, 1024),
    (16, 1_000_000, 2048, 10),
    (1, 10_000_000, 512, 10),
]
IP_INT8 = [(1, 10_000_000, 64, 10), (1024, 10_000_000, 64, 100)]
# (Q, N, code_bytes, k); the first is the target (100M 64-bit codes in <= 1 ms).
HAM = [(1, 100_000_000, 8, 10), (1, 10_000_000, 8, 10), (16, 10_000_000, 8, 10), (1, 10_000_000, 32, 10),
       (1, 10_000_000, 128, 100), (1, 10_000_000, 8, 1024)]  # fmt: skip

QUICK_IP = [(1, 10_000_000, 64, 10), (1024, 10_000_000, 64, 100), (64, 1_000_000, 128, 10)]
QUICK_INT8 = [(1, 10_000_000, 64, 10)]
QUICK_HAM = [(1, 100_000_000, 8, 10)]


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Timer:
    """cudaEvent timing on the legacy default stream (where torch and our calls run here)."""

    def __init__(self) -> None:
        self.rt = _cuda.runtime()
        self.start = _cuda.cuda_call(self.rt.cudaEventCreate(), "cudaEventCreate")
        self.stop = _cuda.cuda_call(self.rt.cudaEventCreate(), "cudaEventCreate")

    def time_ms(self, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        _cuda.synchronize(0)
        out = []
        for _ in range(repeats):
            _cuda.cuda_call(self.rt.cudaEventRecord(self.start, 0), "cudaEventRecord")
            fn()
            _cuda.cuda_call(self.rt.cudaEventRecord(self.stop, 0), "cudaEventRecord")
            _cuda.cuda_call(self.rt.cudaEventSynchronize(self.stop), "cudaEventSynchronize")
            out.append(float(_cuda.cuda_call(self.rt.cudaEventElapsedTime(self.start, self.stop), "elapsed")))
        return out


def measure_copy_bandwidth(torch: Any, timer: Timer) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    ms = statistics.median(timer.time_ms(lambda: dst.copy_(src), 3, 20))
    return 2 * n / (ms * 1e-3)


def measure_tensor_peak(torch: Any, timer: Timer) -> float:
    """fp16 matrix-product rate (FLOP/s) of torch.mm at 8192^3."""
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.float16)
    b = torch.randn(m, m, device="cuda", dtype=torch.float16)
    ms = statistics.median(timer.time_ms(lambda: torch.mm(a, b), 3, 10))
    return 2 * m**3 / (ms * 1e-3)


def torch_ip_topk(torch: Any, q: Any, g: Any, k: int, scales: Any = None) -> tuple[Any, Any]:
    """Baseline: chunked fp16 mm + topk, merged across chunks."""
    nq, n = q.shape[0], g.shape[0]
    chunk = max(k, min(n, (1 << 29) // max(nq, 1)))
    best_v = best_i = None
    for start in range(0, n, chunk):
        gc = g[start : start + chunk]
        if gc.dtype == torch.int8:
            gc = gc.half()
        s = torch.mm(q, gc.t())
        if scales is not None:
            s = s * scales[start : start + chunk].half()[None, :]
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        i = i + start
        if best_v is None:
            best_v, best_i = v, i
        else:
            cv, ci = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            best_v, pos = torch.topk(cv, min(k, cv.shape[1]), dim=1)
            best_i = torch.gather(ci, 1, pos)
    return best_v, best_i


def torch_hamming_topk(torch: Any, qc: Any, c: Any, k: int, lut: Any) -> tuple[Any, Any]:
    """Baseline: XOR + popcount table + topk (smallest), chunked, per query."""
    n = c.shape[0]
    chunk = max(k, min(n, (1 << 27) // c.shape[1]))
    outs_v, outs_i = [], []
    for r in range(qc.shape[0]):
        best_v = best_i = None
        for start in range(0, n, chunk):
            d = lut[torch.bitwise_xor(c[start : start + chunk], qc[r]).int()].sum(dim=1, dtype=torch.int32)
            v, i = torch.topk(d, min(k, d.shape[0]), largest=False)
            i = i + start
            if best_v is None:
                best_v, best_i = v, i
            else:
                cv, ci = torch.cat([best_v, v]), torch.cat([best_i, i])
                best_v, pos = torch.topk(cv, min(k, cv.shape[0]), largest=False)
                best_i = ci[pos]
        outs_v.append(best_v)
        outs_i.append(best_i)
    return torch.stack(outs_v), torch.stack(outs_i)


def check_ip(torch: Any, q: Any, g: Any, scales: Any, ours: Any, base: Any, rows: int = 4) -> str:
    """Re-score both index sets in float32 for a few queries: ours must be at least as good (within rounding)."""
    msgs = []
    for r in range(min(rows, q.shape[0])):
        qf = q[r].float()
        res = []
        for idx in (ours[r], base[r]):
            idx = idx[idx >= 0].long()
            gs = g[idx].float()
            s = gs @ qf
            if scales is not None:
                s = s * scales[idx]
            res.append(torch.sort(s, descending=True).values)
        if res[0].shape != res[1].shape:
            return f"FAIL (row {r}: {res[0].shape[0]} vs {res[1].shape[0]} results)"
        tol = 2e-3 * float(res[1].abs().max().item() + 1e-6) * max(1.0, q.shape[1] / 64) ** 0.5
        worst = float((res[1] - res[0]).max().item())
        if worst > tol:
            msgs.append(f"row {r}: worse by {worst:.3g} > {tol:.3g}")
    return "ok" if not msgs else "FAIL (" + "; ".join(msgs) + ")"


def c_call(fn: Any, args: tuple[Any, ...]) -> Callable[[], None]:
    """A no-argument call of a C ABI function that raises on a non-zero status."""

    def call() -> None:
        code = fn(*args)
        if code != 0:
            raise RuntimeError(_cuda.status_string(code))

    return call


def check_hamming(ours_d: Any, base_d: Any) -> str:
    return "ok" if bool((ours_d.cpu() == base_d.cpu().int()).all()) else "FAIL (distances differ)"


def run(args: argparse.Namespace) -> int:
    import torch

    ok, reason = gpu.availability()
    if not ok:
        print(f"GPU kernels unavailable: {reason}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch has no CUDA here; the baseline needs it", file=sys.stderr)
        return 2
    lib = _cuda.load_library()
    timer = Timer()
    torch.manual_seed(0)

    meta: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": sh(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"]
        ),
        "driver": sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cuda_runtime_of_torch": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "library": str(_cuda.library_path()),
        "git_commit": sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) if shutil.which("git") else "",
        "availability": reason,
    }
    rt = _cuda.runtime()
    meta["cuda_driver_version"] = int(_cuda.cuda_call(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
    print("measuring copy bandwidth and tensor-core rate ...", flush=True)
    bw = measure_copy_bandwidth(torch, timer)
    peak = measure_tensor_peak(torch, timer)
    meta["copy_bandwidth_GBps"] = bw / 1e9
    meta["tensor_fp16_TFLOPs_torch_mm"] = peak / 1e12
    print(f"  d2d copy {bw / 1e9:.0f} GB/s (read+write), torch.mm fp16 {peak / 1e12:.0f} TFLOP/s", flush=True)

    ip_cfgs = QUICK_IP if args.quick else IP_TARGETS + IP_GRID
    int8_cfgs = QUICK_INT8 if args.quick else IP_INT8
    ham_cfgs = QUICK_HAM if args.quick else HAM
    records: list[dict[str, Any]] = []
    galleries: dict[tuple[Any, ...], Any] = {}

    def gallery(n: int, d: int, dtype: str) -> Any:
        key = (n, d, dtype)
        if key not in galleries:
            galleries.clear()
            torch.cuda.empty_cache()
            if dtype == "f16":
                galleries[key] = torch.randn(n, d, device="cuda", dtype=torch.float16)
            elif dtype == "i8":
                galleries[key] = torch.randint(-127, 128, (n, d), device="cuda", dtype=torch.int8)
            else:
                galleries[key] = torch.randint(0, 256, (n, d), device="cuda", dtype=torch.uint8)
        return galleries[key]

    def ip_case(nq: int, n: int, d: int, k: int, dtype: str) -> None:
        g = gallery(n, d, dtype)
        q = torch.randn(nq, d, device="cuda", dtype=torch.float16)
        scales = torch.rand(n, device="cuda", dtype=torch.float32) * 0.01 + 0.001 if dtype == "i8" else None
        esize = 2 if dtype == "f16" else 1
        nbytes = n * d * esize + nq * d * 2 + nq * k * 12 + (n * 4 if scales is not None else 0)
        flops = 2.0 * nq * n * d
        floor_bw = nbytes / bw * 1e3
        floor_fl = flops / peak * 1e3
        base_ms = None
        base = None
        if not args.no_baseline:
            base_ms = statistics.median(
                timer.time_ms(lambda: torch_ip_topk(torch, q, g, k, scales), 1, args.baseline_repeats)
            )
            base = torch_ip_topk(torch, q, g, k, scales)
        paths = ["auto", "simt"] + (["tensor", "tensor32"] if nq >= 16 and k <= 256 else [])
        for path in paths:
            out_s = torch.empty(nq, k, device="cuda", dtype=torch.float32)
            out_i = torch.empty(nq, k, device="cuda", dtype=torch.int64)
            code_dtype = 1 if dtype == "i8" else 0
            sp = scales.data_ptr() if scales is not None else None

            call = c_call(
                lib.zsbir_topk_ip,
                (q.data_ptr(), g.data_ptr(), sp, code_dtype, nq, n, d, k, out_s.data_ptr(), out_i.data_ptr(),
                 PATH_CODES[path], 0),
            )  # fmt: skip
            out_s.fill_(float("nan"))
            out_i.fill_(-7)
            call()
            torch.cuda.synchronize()
            written = bool((~torch.isnan(out_s)).all()) and bool((out_i != -7).all())
            times = timer.time_ms(call, args.warmup, args.repeats)
            ms = statistics.median(times)
            check = "written" if written else "FAIL (unwritten outputs)"
            if base is not None and written:
                check = check_ip(torch, q, g, scales, out_i, base[1])
            rec = {
                "kind": "ip", "dtype": dtype, "Q": nq, "N": n, "D": d, "k": k, "path": path,
                "ms": ms, "ms_min": min(times), "ms_max": max(times), "repeats": len(times),
                "bytes": nbytes, "flops": flops, "floor_bw_ms": floor_bw, "floor_flops_ms": floor_fl,
                "floor_ms": max(floor_bw, floor_fl), "over_floor": ms / max(floor_bw, floor_fl),
                "pct_copy_bw": 100.0 * (nbytes / (ms * 1e-3)) / bw,
                "baseline_ms": base_ms, "speedup": (base_ms / ms) if base_ms else None, "check": check,
            }  # fmt: skip
            records.append(rec)
            print(fmt_row(rec), flush=True)

    def ham_case(nq: int, n: int, nbytes_code: int, k: int) -> None:
        c = gallery(n, nbytes_code, "u8")
        qc = torch.randint(0, 256, (nq, nbytes_code), device="cuda", dtype=torch.uint8)
        nbytes = n * nbytes_code + nq * nbytes_code + nq * k * 12
        floor_bw = nbytes / bw * 1e3
        base_ms = None
        base = None
        if not args.no_baseline:
            lut = torch.tensor([bin(i).count("1") for i in range(256)], device="cuda", dtype=torch.int32)
            base_ms = statistics.median(
                timer.time_ms(lambda: torch_hamming_topk(torch, qc, c, k, lut), 1, args.baseline_repeats)
            )
            base = torch_hamming_topk(torch, qc, c, k, lut)
        out_d = torch.empty(nq, k, device="cuda", dtype=torch.int32)
        out_i = torch.empty(nq, k, device="cuda", dtype=torch.int64)

        call = c_call(
            lib.zsbir_hamming_topk,
            (qc.data_ptr(), c.data_ptr(), nq, n, nbytes_code, k, out_d.data_ptr(), out_i.data_ptr(), 0),
        )
        out_d.fill_(-7)
        out_i.fill_(-7)
        call()
        torch.cuda.synchronize()
        written = bool((out_d != -7).all()) and bool((out_i != -7).all())
        times = timer.time_ms(call, args.warmup, args.repeats)
        ms = statistics.median(times)
        check = "written" if written else "FAIL (unwritten outputs)"
        if base is not None and written:
            check = check_hamming(out_d, base[0])
        rec = {
            "kind": "hamming", "dtype": f"{nbytes_code * 8}bit", "Q": nq, "N": n, "D": nbytes_code * 8, "k": k,
            "path": "simt", "ms": ms, "ms_min": min(times), "ms_max": max(times), "repeats": len(times),
            "bytes": nbytes, "flops": 0.0, "floor_bw_ms": floor_bw, "floor_flops_ms": 0.0, "floor_ms": floor_bw,
            "over_floor": ms / floor_bw, "pct_copy_bw": 100.0 * (nbytes / (ms * 1e-3)) / bw,
            "baseline_ms": base_ms, "speedup": (base_ms / ms) if base_ms else None, "check": check,
        }  # fmt: skip
        records.append(rec)
        print(fmt_row(rec), flush=True)

    print(HEADER, flush=True)
    for cfg in ip_cfgs:
        ip_case(*cfg, "f16")
    for cfg in int8_cfgs:
        ip_case(*cfg, "i8")
    for cfg in ham_cfgs:
        ham_case(*cfg)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    gpu_name = (meta["gpu"].split(",")[0] or "gpu").strip().replace(" ", "_")
    base_name = out_dir / f"topk_gpu_{gpu_name}_{stamp}"
    Path(f"{base_name}.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2))
    Path(f"{base_name}.md").write_text(markdown(meta, records))
    print(f"\nwrote {base_name}.json and {base_name}.md")
    failed = [r for r in records if r["check"].startswith("FAIL")]
    print(f"{len(records)} measurements, {len(failed)} failed checks")
    return 1 if failed else 0


HEADER = (
    f"{'kind':8} {'dtype':6} {'Q':>5} {'N':>10} {'D':>5} {'k':>5} {'path':6} {'ms':>9} {'floor':>8} "
    f"{'x floor':>7} {'%copyBW':>7} {'torch ms':>9} {'speedup':>7}  check"
)


def fmt_row(r: dict[str, Any]) -> str:
    base = f"{r['baseline_ms']:9.3f}" if r["baseline_ms"] is not None else f"{'-':>9}"
    sp = f"{r['speedup']:7.2f}" if r["speedup"] is not None else f"{'-':>7}"
    return (
        f"{r['kind']:8} {r['dtype']:6} {r['Q']:5d} {r['N']:10d} {r['D']:5d} {r['k']:5d} {r['path']:6} "
        f"{r['ms']:9.3f} {r['floor_ms']:8.3f} {r['over_floor']:7.2f} {r['pct_copy_bw']:7.1f} {base} {sp}  {r['check']}"
    )


def markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [
        "# Fused top-k kernels: measured on the device machine",
        "",
        f"- command: `{meta['command']}`",
        f"- time: {meta['time_utc']}; commit: {meta['git_commit'] or 'n/a'}",
        f"- GPU: {meta['gpu']}; driver {meta['driver']} (CUDA driver API {meta['cuda_driver_version']})",
        f"- torch {meta['torch']} (CUDA {meta['cuda_runtime_of_torch']}), python {meta['python']}",
        f"- measured device-to-device copy bandwidth: {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write)",
        f"- measured fp16 tensor rate (torch.mm 8192^3): {meta['tensor_fp16_TFLOPs_torch_mm']:.0f} TFLOP/s",
        "",
        "Times are medians of cudaEvent-timed calls (ms). floor = max(bytes / copy bandwidth, FLOPs / tensor "
        "rate); x floor = time / floor; %copyBW = achieved bytes/s over the copy bandwidth. Baseline: torch "
        "fp16 mm + topk over gallery chunks (Hamming: XOR + popcount table + topk).",
        "",
        "| kind | dtype | Q | N | D/bits | k | path | ms | floor ms | x floor | % copy BW | torch ms | speedup "
        "| check |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        base = f"{r['baseline_ms']:.3f}" if r["baseline_ms"] is not None else "-"
        sp = f"{r['speedup']:.2f}" if r["speedup"] is not None else "-"
        lines.append(
            f"| {r['kind']} | {r['dtype']} | {r['Q']} | {r['N']} | {r['D']} | {r['k']} | {r['path']} | "
            f"{r['ms']:.3f} | {r['floor_ms']:.3f} | {r['over_floor']:.2f} | {r['pct_copy_bw']:.1f} | {base} | "
            f"{sp} | {r['check']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the target configurations and one more")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline-repeats", type=int, default=5)
    p.add_argument("--no-baseline", action="store_true", help="skip torch mm+topk")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
