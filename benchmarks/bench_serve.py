"""A bounded loopback load test of ``zsbir serve``: 1, 8 and 32 concurrent clients, micro-batching on and off.

The server is a ``zsbir serve`` process on 127.0.0.1 over the synthetic benchmark's unseen classes (see
``serve_fixture.py``); each client posts the benchmark's sketches (PNG, multipart, ``k=10``) in a closed
loop for ``--seconds`` per phase. Recorded per phase: requests/s, p50/p90/p99 latency, errors (any non-200,
a response without 10 hits, or a transport error), the server's resident memory before and after, the mean
batch size (from ``/metrics``), and the ratio of served searches/s to the library's own rate in the same
run: ``Retriever.search`` on the same PNG bytes (decoded per call, as the server does), one query per call,
in this process.

Every loop is bounded by time and count; only 127.0.0.1 is contacted. The issue's command (30 s a phase):

    python benchmarks/bench_serve.py --seconds 30 --out benchmarks/results/serve_load

The client runs on the same machine as the server (it takes CPU from it: on a 2-core box the figures are a
lower bound for the server alone).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_fixture
from index_query_results import machine

MAX_REQUESTS_PER_PHASE = 200_000  # a bound on top of the time bound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (e.g. Triton's HTTP, gRPC and metrics)."""
    from zsbir_infer.triton.server import free_port_block

    return free_port_block(n)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zsbir serve exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("zsbir serve did not become ready")


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's zsbir_search_batch_size histogram."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("zsbir_search_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("zsbir_search_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def multipart(png: bytes, k: int = 10) -> tuple[bytes, str]:
    """A multipart/form-data body with the file field ``image`` and the field ``k``."""
    boundary = "zsbirbenchboundary7MA4YWxkTrZu0gW"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def closed_loop(
    port: int, requests: list[bytes], clients: int, seconds: float, check: Callable[[int, bytes], bool]
) -> dict[str, Any]:
    """``clients`` keep-alive connections, each sending the raw HTTP/1.1 ``requests`` in turn in a closed loop
    for ``seconds``; ``check(status, body)`` says whether a response is a correct answer.

    The client is a minimal HTTP/1.1 one on asyncio streams: a general-purpose client (httpx) costs more CPU
    per request than the server and, on the same 2 cores, measured itself rather than the server."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        j = i
        try:
            while time.perf_counter() < stop and sent < MAX_REQUESTS_PER_PHASE:
                sent += 1
                req = requests[j % len(requests)]
                j += clients
                t0 = time.perf_counter()
                try:
                    writer.write(req)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
                    lines = head.decode("latin-1").split("\r\n")
                    status = int(lines[0].split()[1])
                    length = next(int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:"))
                    payload = await asyncio.wait_for(reader.readexactly(length), timeout=60)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - t0)
                if not check(status, payload):
                    errors.append(f"{status}: {payload[:160]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = len(latencies) - len(errors)
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:5],
        "rps": round(ok / wall, 1),
        "p50_ms": round(pct(latencies, 0.50) * 1000, 2),
        "p90_ms": round(pct(latencies, 0.90) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


async def load(port: int, sketches: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` connections posting ``zsbir serve`` searches (multipart sketches) for ``seconds``."""
    requests = []
    for png in sketches:
        body, ctype = multipart(png)
        head = (
            f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return await closed_loop(
        port, requests, clients, seconds, lambda status, body: status == 200 and len(json.loads(body)["hits"]) == 10
    )


def library_rate(gallery: Path, sketches: list[bytes], seconds: float) -> dict[str, Any]:
    from PIL import Image

    from zsbir_infer import Retriever

    with Retriever.open(gallery) as r:
        for b in sketches[:5]:
            r.search(Image.open(io.BytesIO(b)), k=10)
        n, t0 = 0, time.perf_counter()
        lat = []
        while time.perf_counter() - t0 < seconds and n < MAX_REQUESTS_PER_PHASE:
            t1 = time.perf_counter()
            r.search(Image.open(io.BytesIO(sketches[n % len(sketches)])), k=10)
            lat.append(time.perf_counter() - t1)
            n += 1
        wall = time.perf_counter() - t0
        encoder = r.encoder.describe()
    return {
        "searches": n,
        "seconds": round(wall, 2),
        "rps": round(n / wall, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "encoder": encoder,
    }


def run_server(
    gallery: Path, max_batch: int, max_wait_ms: float, sketches: list[bytes], levels: list[int], seconds: float
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    zsbir = str(Path(sys.executable).parent / "zsbir")
    cmd = [
        zsbir,
        "serve",
        "--gallery",
        str(gallery),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        str(max_wait_ms),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    phases = []
    try:
        wait_ready(url, proc)
        asyncio.run(load(port, sketches, 2, 1.0))  # warm-up (sessions, thread pool, thumbnails not involved)
        rss_start = rss_mib(proc.pid)
        for c in levels:
            before = batch_stats(url)
            res = asyncio.run(load(port, sketches, c, seconds))
            after = batch_stats(url)
            batches = after[1] - before[1]
            res["mean_batch"] = round((after[0] - before[0]) / batches, 2) if batches else None
            res["server_rss_mib_after"] = rss_mib(proc.pid)
            phases.append(res)
            print(
                f"  batch<={max_batch:<3d} clients={c:<3d} {res['rps']:7.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  mean batch {res['mean_batch']}",
                flush=True,
            )
        rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "server_rss_mib_start": rss_start,
        "server_rss_mib_end": rss_end,
        "phases": phases,
    }


def write_md(doc: dict[str, Any], path: Path) -> None:
    lib = doc["library"]["rps"]
    m = doc["machine"]
    lines = [
        "# `zsbir serve` under load (loopback)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m.get('cpu')}, {m.get('cpus_usable')} usable cores, {m.get('memory_gib')} GiB; load average at "
        f"start {[round(x, 2) for x in m.get('load_avg_at_start') or []]}; commit {m.get('git_commit')}; "
        f"versions {m.get('versions')}.  ",
        f"Gallery: {doc['gallery']['photos']} photos (the synthetic benchmark's {doc['gallery']['classes']} unseen "
        f"classes), model `{doc['gallery']['model']}` ({doc['library']['encoder']}); queries: "
        f"{doc['gallery']['sketches']} sketches (PNG, multipart, k=10), {doc['seconds']} s per phase.",
        "",
        f"Library baseline (`Retriever.search`, one PNG query per call, same process as the client): "
        f"**{lib} searches/s** (p50 {doc['library']['p50_ms']} ms).",
        "",
        "| batching | clients | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | served / library | "
        "server RSS after (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in doc["runs"]:
        label = "off (max batch 1)" if run["max_batch"] == 1 else f"on ({run['max_batch']}, {run['max_wait_ms']} ms)"
        for p in run["phases"]:
            lines.append(
                f"| {label} | {p['clients']} | {p['rps']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | "
                f"{p['errors']} | {p['mean_batch']} | {p['ratio_to_library']:.2f} | {p['server_rss_mib_after']} |"
            )
    lines.append("")
    for run in doc["runs"]:
        lines.append(
            f"- max batch {run['max_batch']}: server RSS {run['server_rss_mib_start']} MiB at start, "
            f"{run['server_rss_mib_end']} MiB at the end."
        )
    on = {p["clients"]: p["rps"] for r in doc["runs"] if r["max_batch"] > 1 for p in r["phases"]}
    off = {p["clients"]: p["rps"] for r in doc["runs"] if r["max_batch"] == 1 for p in r["phases"]}
    gains = [f"{c} clients x{on[c] / off[c]:.2f}" for c in sorted(on) if off.get(c)]
    if gains:
        lines.append(f"- micro-batching on vs off (req/s): {', '.join(gains)}.")
    lines.append(f"- errors in all phases: {sum(p['errors'] for r in doc['runs'] for p in r['phases'])}.")
    if doc.get("note"):
        lines += ["", doc["note"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zsbir-serve-bench"))
    ap.add_argument("--seconds", type=float, default=10.0, help="Per phase (the issue asks for 30).")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=None, help="Write OUT.json and OUT.md.")
    ap.add_argument("--note", default="", help="A line added to the Markdown (e.g. why the phases were short).")
    args = ap.parse_args()
    if args.seconds <= 0 or args.seconds > 120:
        raise SystemExit("--seconds must be in (0, 120]")
    levels = [int(c) for c in args.clients.split(",")]
    if any(c < 1 or c > 256 for c in levels):
        raise SystemExit("--clients: 1..256 each")
    mach = machine()
    fx = serve_fixture.build(args.work)
    sketches = [Path(p).read_bytes() for p in fx["sketches"]]  # type: ignore[attr-defined]
    print(f"library baseline, {args.seconds:g} s ...", flush=True)
    lib = library_rate(Path(str(fx["gallery"])), sketches, args.seconds)
    print(f"  Retriever.search: {lib['rps']} searches/s (p50 {lib['p50_ms']} ms)", flush=True)
    runs = []
    for max_batch in (args.max_batch, 1):
        runs.append(run_server(Path(str(fx["gallery"])), max_batch, args.max_wait_ms, sketches, levels, args.seconds))
    for run in runs:
        for p in run["phases"]:
            p["ratio_to_library"] = round(p["rps"] / lib["rps"], 3) if lib["rps"] else None
    from zsbir_infer.bundle import Bundle

    shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    cmd = "python benchmarks/bench_serve.py " + shlex.join(shown)
    doc = {
        "command": cmd.strip(),
        "seconds": args.seconds,
        "machine": mach,
        "gallery": {
            "photos": sum(1 for _ in Path(str(fx["photos"])).rglob("*.jpg")),
            "classes": len(fx["unseen"]),  # type: ignore[arg-type]
            "sketches": len(sketches),
            "model": Bundle.open(Path(str(fx["bundle"]))).fingerprint,
            "bundle": Path(str(fx["bundle"])).name,
        },
        "library": lib,
        "runs": runs,
        "note": args.note,
    }
    print(json.dumps({"library_rps": lib["rps"], "runs": runs}, indent=1)[:2000])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        write_md(doc, args.out.with_suffix(".md"))
        print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
