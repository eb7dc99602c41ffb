"""Triton Inference Server vs ``zsbir serve`` vs the library, in one run: 1, 8 and 32 concurrent loopback clients.

The gallery is ``serve_fixture.py``'s (the synthetic benchmark's unseen classes, synthetic-shapes bundle). In the
same run, repeated ``--repeats`` times with the systems interleaved (the machine is shared: medians of the
repeats are reported):

* the library: ``Retriever.search`` on the PNG bytes, one query per call, in this process;
* ``zsbir serve`` (micro-batching up to 32 in 5 ms), posting multipart PNGs to ``/v1/search``
  (``bench_serve.py``'s client and server start);
* Triton: ``tritonserver`` (``zsbir_infer.triton.server``: the nvidia-pytriton build, Python backend only) on a
  repository from ``write_repository(..., encoder="python")``, posting to ``/v2/models/zsbir_search/infer`` over
  HTTP/1.1 with the image as a binary tensor (KServe v2 binary extension) and JSON outputs, with the same minimal
  asyncio client as ``zsbir serve`` gets (a general-purpose client costs more CPU than the server here).

A request counts as an error unless it is answered 200 with 10 hits. Triton's mean batch is read from its
statistics (``zsbir_encoder``), ``zsbir serve``'s from ``/metrics``. Only 127.0.0.1 is contacted; every loop is
bounded by time and count. The committed figures::

    python benchmarks/bench_triton.py --seconds 10 --repeats 3 --out benchmarks/results/triton_load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve
import serve_fixture
from index_query_results import machine

MAX_REQUESTS_PER_PHASE = 200_000


def triton_body(png: bytes, k: int = 10) -> tuple[bytes, int]:
    """A KServe v2 inference request: JSON header + binary IMAGE and K tensors; outputs as JSON."""
    header = {
        "inputs": [
            {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(png)}},
            {"name": "K", "shape": [1, 1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in ("SCORES", "IDS", "PATHS")],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + len(png).to_bytes(4, "little") + png + int(k).to_bytes(4, "little", signed=True), len(head)


async def load_triton(port: int, sketches: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` keep-alive connections posting zsbir_search requests in a closed loop for ``seconds``."""
    requests = []
    for png in sketches:
        body, head_len = triton_body(png)
        head = (
            f"POST /v2/models/zsbir_search/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {head_len}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests.append(head + body)

    def check(status: int, payload: bytes) -> bool:
        if status != 200:
            return False
        outs = {o["name"]: o for o in json.loads(payload)["outputs"]}
        return bool(outs["IDS"]["shape"] == [1, 10] and len(outs["PATHS"]["data"]) == 10)

    return await bench_serve.closed_loop(port, requests, clients, seconds, check)


def triton_batches(port: int, model: str = "zsbir_encoder") -> tuple[int, int]:
    """(queries, executions) of ``model`` from Triton's statistics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    queries = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []))
    runs = sum(int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []))
    return queries, runs


def run_triton(
    gallery: Path,
    bundle: Path,
    sketches: list[bytes],
    levels: list[int],
    seconds: float,
    instances: int,
    delay_us: int,
) -> dict[str, Any]:
    from zsbir_infer.triton.repository import TritonRepositoryOptions, write_repository
    from zsbir_infer.triton.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="zsbir-bench-triton-") as tmp:
        repo = write_repository(
            bundle,
            Path(tmp) / "repo",
            gallery,
            TritonRepositoryOptions(encoder="python", instances=instances, max_queue_delay_us=delay_us, max_batch=32),
        )
        server = TritonServer(repo, port=bench_serve.free_ports(3), log_file=Path(tmp) / "tritonserver.log")
        server.start(timeout=180)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v2", timeout=10) as r:
            version = json.loads(r.read())["version"]
        phases = []
        try:
            asyncio.run(load_triton(server.port, sketches, 2, 1.0))  # warm-up
            rss_start = _tree_rss(server)
            for c in levels:
                before = triton_batches(server.port)
                res = asyncio.run(load_triton(server.port, sketches, c, seconds))
                after = triton_batches(server.port)
                runs = after[1] - before[1]
                res["mean_batch"] = round((after[0] - before[0]) / runs, 2) if runs else None
                res["server_rss_mib_after"] = _tree_rss(server)
                phases.append(res)
                print(
                    f"  triton {delay_us:>5d} us clients={c:<3d} {res['rps']:7.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                    f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  mean batch {res['mean_batch']}",
                    flush=True,
                )
        finally:
            server.stop()
    return {
        "instances": instances,
        "delay_us": delay_us,
        "version": version,
        "server_rss_mib_start": rss_start,
        "phases": phases,
    }


def _tree_rss(server: Any) -> float | None:
    """Resident memory of tritonserver plus its Python-backend stub processes (MiB)."""
    if server.proc is None:
        return None
    total = 0.0
    pids = [server.proc.pid]
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if any(line.startswith("PPid:") and int(line.split()[1]) == server.proc.pid for line in text.splitlines()):
            pids.append(int(status.parent.name))
    for pid in pids:
        v = bench_serve.rss_mib(pid)
        total += v or 0.0
    return round(total, 1)


def _median_phases(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, first in enumerate(runs[0]["phases"]):
        reps = [r["phases"][i] for r in runs]
        row = {"clients": first["clients"], "repeats": len(reps), "errors": sum(p["errors"] for p in reps)}
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_batch"):
            vals = [p[key] for p in reps if p.get(key) is not None]
            row[key] = round(statistics.median(vals), 2) if vals else None
        row["rps_all"] = [p["rps"] for p in reps]
        row["server_rss_mib_after"] = max((p.get("server_rss_mib_after") or 0) for p in reps)
        out.append(row)
    return out


def write_md(doc: dict[str, Any], path: Path) -> None:
    m = doc["machine"]
    lib = doc["library"]["rps"]
    lines = [
        "# Triton Inference Server vs `zsbir serve` vs the library (loopback, CPU)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m.get('cpu')}, {m.get('cpus_usable')} usable cores (shared with other jobs: load average at "
        f"start {[round(x, 2) for x in m.get('load_avg_at_start') or []]}), {m.get('memory_gib')} GiB; commit "
        f"{m.get('git_commit')}; versions {m.get('versions')}; tritonserver {doc['triton']['version']} "
        f"({doc['triton']['source']}, Python backend only; models with {doc['triton']['model_numpy']}).  ",
        f"Gallery: {doc['gallery']['photos']} photos, model `{doc['gallery']['model']}` "
        f"({doc['gallery']['bundle']} bundle, {doc['library']['encoder']}); {doc['gallery']['sketches']} sketch PNGs, "
        f"k=10; {doc['seconds']} s per phase, {doc['repeats']} repeats with the three systems interleaved; "
        "medians of the repeats (all req/s values in the JSON).",
        "",
        f"Library (`Retriever.search`, one PNG per call): **{lib} searches/s** (median; p50 "
        f"{doc['library']['p50_ms']} ms).",
        "",
        "| system | clients | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | vs library | vs zsbir serve |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    serve = {p["clients"]: p["rps"] for p in doc["zsbir_serve"]}
    systems = [("zsbir serve (batch ≤32, wait ≤5 ms)", doc["zsbir_serve"])]
    for delay, phases in doc["triton_phases"].items():
        systems.append((f"{doc['triton']['label']}, max_queue_delay {int(delay) / 1000:g} ms)", phases))
    for label, phases in systems:
        for p in phases:
            vs = f"{p['rps'] / serve[p['clients']]:.2f}" if serve.get(p["clients"]) else ""
            lines.append(
                f"| {label} | {p['clients']} | {p['rps']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | "
                f"{p['errors']} | {p['mean_batch']} | {p['rps'] / lib:.2f} | {vs} |"
            )
    lines += [
        "",
        f"- Memory: Triton (server + Python-backend stubs) {doc['triton']['rss_mib_start']} MiB at start, "
        f"{max(p['server_rss_mib_after'] for ph in doc['triton_phases'].values() for p in ph)} MiB at most after "
        "a phase; "
        f"`zsbir serve` {max(p['server_rss_mib_after'] for p in doc['zsbir_serve'])} MiB at most.",
        "- Triton here runs every model in the Python backend (the wheel has no ONNX Runtime backend): each step is "
        "a separate process and tensors cross shared memory between them, which `zsbir serve` (one process) "
        "does not pay. On a GPU server the standard repository runs the encoder in Triton's ONNX Runtime or "
        "TensorRT backend instead.",
    ]
    if doc.get("note"):
        lines += ["", doc["note"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zsbir-serve-bench"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--instances", type=int, default=1, help="Instances of Triton's Python-backend models.")
    ap.add_argument("--delays", default="0,5000", help="Triton max_queue_delay_microseconds values to run.")
    ap.add_argument("--out", type=Path, default=None, help="Write OUT.json and OUT.md.")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if not 0 < args.seconds <= 120 or not 1 <= args.repeats <= 10:
        raise SystemExit("--seconds in (0, 120], --repeats in 1..10")
    levels = [int(c) for c in args.clients.split(",")]
    if any(c < 1 or c > 256 for c in levels):
        raise SystemExit("--clients: 1..256 each")
    from zsbir_infer.bundle import Bundle
    from zsbir_infer.triton.server import find_tritonserver, model_env_dir

    install = find_tritonserver()
    mach = machine()
    fx = serve_fixture.build(args.work)
    gallery, bundle = Path(str(fx["gallery"])), Path(str(fx["bundle"]))
    sketches = [Path(p).read_bytes() for p in fx["sketches"]]  # type: ignore[attr-defined]
    delays = [int(d) for d in args.delays.split(",")]
    libs, serves = [], []
    tritons: dict[int, list[dict[str, Any]]] = {d: [] for d in delays}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}: library ...", flush=True)
        libs.append(bench_serve.library_rate(gallery, sketches, args.seconds))
        print(f"  Retriever.search: {libs[-1]['rps']} searches/s", flush=True)
        serves.append(bench_serve.run_server(gallery, 32, 5.0, sketches, levels, args.seconds))
        for d in delays:
            tritons[d].append(run_triton(gallery, bundle, sketches, levels, args.seconds, args.instances, d))
    numpy_versions = sorted(p.name for p in model_env_dir().glob("numpy-*.dist-info"))
    version = tritons[delays[0]][0]["version"]
    shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    doc = {
        "command": ("python benchmarks/bench_triton.py " + shlex.join(shown)).strip(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "machine": mach,
        "gallery": {
            "photos": sum(1 for _ in Path(str(fx["photos"])).rglob("*.jpg")),
            "sketches": len(sketches),
            "model": Bundle.open(bundle).fingerprint,
            "bundle": bundle.name,
        },
        "library": {
            "rps": round(statistics.median(x["rps"] for x in libs), 1),
            "rps_all": [x["rps"] for x in libs],
            "p50_ms": round(statistics.median(x["p50_ms"] for x in libs), 2),
            "encoder": libs[0]["encoder"],
        },
        "zsbir_serve": _median_phases(serves),
        "triton_phases": {str(d): _median_phases(runs) for d, runs in tritons.items()},
        "triton": {
            "version": version,
            "binary": str(install.binary),
            "source": install.source,
            "model_numpy": numpy_versions[0].removesuffix(".dist-info") if numpy_versions else "?",
            "instances": args.instances,
            "label": f"Triton, Python backend ({args.instances} instance{'s' if args.instances > 1 else ''}, batch ≤32",
            "rss_mib_start": max(t["server_rss_mib_start"] or 0 for runs in tritons.values() for t in runs),
        },
        "raw": {"zsbir_serve": serves, "triton": tritons, "library": libs},
        "note": args.note,
    }
    print(json.dumps({"library": doc["library"], "serve": doc["zsbir_serve"], "triton": doc["triton_phases"]})[:3000])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        write_md(doc, args.out.with_suffix(".md"))
        print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
