"""``zsbir index --engine ray`` against the plain indexer: same photos, same model, same run; plus per-actor rates.

Each repeat runs, interleaved on the same photos into fresh galleries:

* ``plain``: what ``zsbir index`` does: ``Encoder.open`` + :func:`zsbir_infer.indexer.index_folder` (decoding
  threads overlapped with the model in one process), end to end.
* ``ray_cold``: what ``zsbir index --engine ray`` does without ``--ray-address``:
  :func:`zsbir_infer.ray_index.index_folder_ray` starting a local Ray for the run and shutting it down after.
* ``ray_first``: the same with Ray already running (a standing cluster, ``--ray-address``), its first run: Ray
  also starts its worker processes.
* ``ray_warm``: the next run on that Ray: it still starts its actor pool (each actor opens the model), decodes
  in tasks, embeds in the actors and commits.
* ``ray_sharded``: ``ray_warm`` into a 2-shard gallery (the run after it).

Reported: wall seconds and files/s of each, the overhead ratios ``ray / plain`` (medians over repeats of the
per-repeat ratios), and from :class:`zsbir_infer.ray_index.RayStats`: Ray start-up seconds, decode CPU-seconds
per photo in the tasks, and each actor's model throughput (files / seconds inside ``Encoder.embed``),
which is what ``benchmarks/results/scale_plan.md`` scales out. The first repeat also checks that the ray and
plain galleries hold the same files and vectors.

    python benchmarks/bench_ray.py [--model BUNDLE] [--photos 768] [--photo-size 256] [--repeats 3]
        [--out benchmarks/results/ray_index]        # writes OUT.json and OUT.md

``--driver-only FILES`` measures the driver's walk and plan (files/s, heap bytes per file) over FILES small
files, into ``benchmarks/results/driver_walk_plan.json``. ``--bytes-only ROWS`` measures what a photo costs on
disk and in memory for each storage kind: galleries of ROWS random 64-d vectors with paths like a big
collection's (``d01234/0123456789.jpg``) and SHA-256 digests, the ANN index built (float16, int8), into
``benchmarks/results/gallery_bytes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import make_photos
from index_query_results import machine


def _gallery_vectors(path: Path) -> dict[str, Any]:
    from zsbir_infer.gallery import open_gallery

    with open_gallery(path) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows])
    return {rel: vecs[j] for j, (rel, _) in enumerate(rows)}


def measure_bytes(rows: int, out: Path) -> None:
    """Bytes per photo of each storage kind: segments, catalog, ANN index (on disk; what a search holds in memory)."""
    import numpy as np

    from zsbir_infer.gallery import FileRecord, Gallery
    from zsbir_infer.itq import ITQ

    # First: machine() imports onnxruntime, and importing onnxruntime after usearch has added vectors in the same
    # process crashes it (segfault; usearch 2.26.6, onnxruntime 1.32.0).
    hw = machine()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(rows, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    recs = [
        FileRecord(f"d{i // 1000:05d}/{i:010d}.jpg", 150_000 + i, 1_700_000_000_000_000_000 + i, f"{i:064x}")
        for i in range(rows)
    ]
    work = Path(tempfile.mkdtemp(prefix="zsbir-bench-bytes-"))
    kinds: dict[str, dict[str, float]] = {}
    try:
        for storage in ("float16", "int8", "itq"):
            d = work / storage
            itq = ITQ.fit(v[:10000], n_bits=64) if storage == "itq" else None
            with Gallery.create(d, "0123456789abcdef", 64, storage=storage, itq=itq) as g:
                for start in range(0, rows, 50_000):
                    g.add(recs[start : start + 50_000], v[start : start + 50_000])
                if storage != "itq":
                    g.build_index()
            seg = sum(f.stat().st_size for f in (d / "segments").iterdir())
            db = sum(f.stat().st_size for f in d.glob("meta.sqlite*"))
            ann_b = (d / "ann.usearch").stat().st_size if (d / "ann.usearch").exists() else 0
            total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            kinds[storage] = {
                "vectors": seg / rows,
                "catalog": db / rows,
                "ann": ann_b / rows,
                "total_disk": total / rows,
                "memory_exact_search": seg / rows,
                "memory_ann_search": (seg + ann_b) / rows,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:])
    doc = {
        "benchmark": "gallery_bytes",
        "command": cmd,
        "machine": hw,
        "rows": rows,
        "dim": 64,
        "bytes_per_photo": kinds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Gallery bytes per photo, by storage kind",
        "",
        f"Generated by `{cmd}`: galleries of {rows:,} random 64-d vectors, paths like `d01234/0123456789.jpg`, SHA-256 "
        "digests, the usearch HNSW index built with the gallery's defaults (float16, int8; ITQ has none: a Hamming "
        "scan).",
        f"Machine: {hw['cpu']}, {hw['cpus_usable']} CPUs; {', '.join(f'{k} {v}' for k, v in hw['versions'].items())}.",
        "",
        "| storage | vectors | catalog (SQLite) | ANN index | total on disk | memory, exact search "
        "| memory, ANN search |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, b in kinds.items():
        lines.append(
            f"| {k} | {b['vectors']:.1f} | {b['catalog']:.1f} | {b['ann']:.1f} | {b['total_disk']:.1f} | "
            f"{b['memory_exact_search']:.1f} | {b['memory_ann_search']:.1f} |"
        )
    lines += [
        "",
        "Bytes per photo. Memory: a search maps the vector segments (exact), plus the HNSW graph it loads (ANN); the "
        "catalog is read only for the paths of the hits.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


def measure_driver(files: int, out: Path) -> None:
    """The driver's share at scale: walking and planning ``files`` files (wall time, Python heap per file)."""
    import tracemalloc

    from zsbir_infer.gallery import FileStat, Gallery
    from zsbir_infer.indexer import walk

    root = Path(tempfile.mkdtemp(prefix="zsbir-bench-walk-"))
    try:
        for i in range(files):
            d = root / f"d{i // 1000:05d}"
            if i % 1000 == 0:
                d.mkdir()
            (d / f"{i:010d}.jpg").write_bytes(b"x")
        walk(root)  # warm the page cache
        t0 = time.perf_counter()
        listing = walk(root)
        t_walk = time.perf_counter() - t0
        with Gallery.create(root.with_name(root.name + "-g"), "0123456789abcdef", 64) as g:
            t0 = time.perf_counter()
            g._plan([FileStat(e.relpath, e.size, e.mtime_ns) for e in listing.entries], retry_skipped=True)
            t_plan = time.perf_counter() - t0
            del listing
            tracemalloc.start()  # memory, measured in a second pass (tracemalloc slows the code it traces)
            listing = walk(root)
            heap_walk = tracemalloc.get_traced_memory()[0]
            g._plan([FileStat(e.relpath, e.size, e.mtime_ns) for e in listing.entries], retry_skipped=True)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.with_name(root.name + "-g"), ignore_errors=True)
    doc = {
        "benchmark": "driver_walk_plan",
        "command": "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "files": files,
        "walk_files_per_s": files / t_walk,
        "plan_files_per_s": files / t_plan,
        "listing_heap_bytes_per_file": heap_walk / files,
        "peak_heap_bytes_per_file": peak / files,
        "note": "local disk, page cache warm, a new gallery (every file new); heap from a second, traced pass",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the embedded default model)")
    ap.add_argument("--photos", type=int, default=768)
    ap.add_argument("--photo-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPU actors (a GPU machine: e.g. 0.5)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "zsbir-bench-index")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_index"))
    ap.add_argument("--bytes-only", type=int, default=0, metavar="ROWS", help="measure bytes per photo and exit")
    ap.add_argument("--driver-only", type=int, default=0, metavar="FILES", help="measure walk + plan and exit")
    args = ap.parse_args()
    if args.driver_only:
        measure_driver(args.driver_only, Path("benchmarks/results/driver_walk_plan"))
        return
    if args.bytes_only:
        measure_bytes(args.bytes_only, Path("benchmarks/results/gallery_bytes"))
        return

    import numpy as np
    import ray

    from zsbir_infer.encoder import Encoder
    from zsbir_infer.indexer import index_folder
    from zsbir_infer.ray_index import RayStats, index_folder_ray

    photos_dir = args.cache / f"photos_{args.photo_size}"
    make_photos(photos_dir, args.photos, args.photo_size)
    # Exactly --photos files (the cache may hold more from an earlier, larger run).
    root = Path(tempfile.mkdtemp(prefix="zsbir-bench-ray-"))
    for p in sorted(photos_dir.rglob("*.jpg"))[: args.photos]:
        dst = root / p.relative_to(photos_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, dst) if p.stat().st_dev == root.stat().st_dev else shutil.copy2(p, dst)
    work = Path(tempfile.mkdtemp(prefix="zsbir-bench-ray-g-"))
    cpus = len(os.sched_getaffinity(0))
    ray_kw: dict[str, Any] = {
        "model": args.model,
        "backend": args.backend,
        "batch_size": args.batch_size,
        "decode_batch_size": args.decode_batch,
        "gpus_per_actor": args.gpus_per_actor,
    }
    rows: list[dict[str, Any]] = []
    check: dict[str, Any] = {}
    info: dict[str, Any] = {}
    try:
        for rep in range(args.repeats):
            row: dict[str, Any] = {"repeat": rep + 1}
            # plain
            g = work / f"plain{rep}"
            t0 = time.perf_counter()
            with Encoder.open(args.model, backend=args.backend, batch_size=args.batch_size) as enc:
                r = index_folder(root, g, enc)
                info["model"] = (
                    f"{enc.fingerprint} ({enc.describe()}), input {list(enc.bundle.preprocess_spec('photo').size)}"
                )
                info["plain_threads"] = f"{enc.workers} decoding threads, ONNX Runtime threads: the process's default"
            row["plain_s"] = time.perf_counter() - t0
            assert r.indexed == args.photos, r.indexed
            # ray, cold: a local Ray started and shut down by the run
            st_cold = RayStats()
            t0 = time.perf_counter()
            r = index_folder_ray(root, work / f"cold{rep}", stats=st_cold, **ray_kw)
            row["ray_cold_s"] = time.perf_counter() - t0
            row["ray_start_s"] = st_cold.start_seconds
            assert r.indexed == args.photos, r.indexed
            # ray, warm: Ray already running
            ray.init(
                address="local",
                num_cpus=cpus,
                object_store_memory=512 * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
            )
            try:
                t0 = time.perf_counter()
                r = index_folder_ray(root, work / f"first{rep}", **ray_kw)
                row["ray_first_s"] = time.perf_counter() - t0
                assert r.indexed == args.photos, r.indexed
                st = RayStats()
                t0 = time.perf_counter()
                r = index_folder_ray(root, work / f"warm{rep}", stats=st, **ray_kw)
                row["ray_warm_s"] = time.perf_counter() - t0
                assert r.indexed == args.photos, r.indexed
                st_sh = RayStats()
                t0 = time.perf_counter()
                r = index_folder_ray(root, work / f"sharded{rep}", shards=2, stats=st_sh, **ray_kw)
                row["ray_sharded_s"] = time.perf_counter() - t0
                assert r.indexed == args.photos, r.indexed
            finally:
                ray.shutdown()
            row["decode_ms_per_photo"] = 1000 * st.decode_seconds / max(1, st.decoded)
            row["actors"] = {
                a: {"files": int(f), "seconds": s, "files_per_s": f / s if s else 0.0}
                for a, (f, s) in st.actors.items()
            }
            row["actor_files_per_s"] = statistics.median(v["files_per_s"] for v in row["actors"].values())
            for key in ("plain", "ray_cold", "ray_first", "ray_warm", "ray_sharded"):
                row[f"{key}_files_per_s"] = args.photos / row[f"{key}_s"]
            row["ratio_cold"] = row["ray_cold_s"] / row["plain_s"]
            row["ratio_first"] = row["ray_first_s"] / row["plain_s"]
            row["ratio_warm"] = row["ray_warm_s"] / row["plain_s"]
            row["ratio_sharded"] = row["ray_sharded_s"] / row["plain_s"]
            if rep == 0:
                a, b = _gallery_vectors(work / "plain0"), _gallery_vectors(work / "warm0")
                c = _gallery_vectors(work / "sharded0")
                check = {
                    "same_files": sorted(a) == sorted(b) == sorted(c),
                    "max_abs_vector_diff": float(
                        max(max(np.abs(a[k] - b[k]).max(), np.abs(a[k] - c[k]).max()) for k in a)
                    ),
                }
            for name in ("plain", "cold", "first", "warm", "sharded"):
                shutil.rmtree(work / f"{name}{rep}", ignore_errors=True)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "actors"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    summary = {
        k: med(k)
        for k in (
            "plain_s",
            "ray_cold_s",
            "ray_first_s",
            "ray_warm_s",
            "ray_sharded_s",
            "ratio_cold",
            "ratio_first",
            "ratio_warm",
            "ratio_sharded",
            "ray_start_s",
            "decode_ms_per_photo",
            "actor_files_per_s",
            "plain_files_per_s",
            "ray_cold_files_per_s",
            "ray_warm_files_per_s",
            "ray_sharded_files_per_s",
        )
    }
    import pyarrow

    hw = machine()
    hw["versions"].update({"ray": ray.__version__, "pyarrow": pyarrow.__version__})
    cmd = "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:])
    doc = {
        "benchmark": "ray_index",
        "command": cmd,
        "machine": hw,
        "config": {
            "photos": args.photos,
            "photo_size": args.photo_size,
            "batch_size": args.batch_size,
            "decode_batch": args.decode_batch,
            "backend": args.backend,
            "repeats": args.repeats,
            "ray_cpus": cpus,
            "ray_actors": "default: max(1, CPUs / cpus_per_actor / 2) = "
            f"{max(1, cpus // 2)} actor(s) of 1 CPU; decoding tasks of 1 CPU on the rest",
            **info,
        },
        "check": check,
        "repeats": rows,
        "median": summary,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# `zsbir index --engine ray` vs the plain indexer",
        "",
        f"Generated by `{cmd}` (raw figures in `{out.name}.json`).",
        "",
        f"- machine: {hw['cpu']}, {hw['cpus_usable']} usable CPUs, {hw['memory_gib']} GiB, {hw['os']}, Python "
        f"{hw['python']}; {', '.join(f'{k} {v}' for k, v in hw['versions'].items())}; load average at start "
        f"{hw['load_avg_at_start']}; commit {hw['git_commit']}",
        f"- model: {info.get('model')}; batch {args.batch_size}; backend {args.backend}",
        f"- data: {args.photos} synthetic JPEG photos of {args.photo_size} px (the same files for every run)",
        f"- Ray: local, {cpus} CPUs; {doc['config']['ray_actors']}; {args.decode_batch} files per decoding task",
        f"- check (repeat 1): same files {check.get('same_files')}, max |vector difference| ray vs plain "
        f"{check.get('max_abs_vector_diff')}",
        "",
        "| repeat | plain (s) | ray, cold (s) | ray, first (s) | ray, warm (s) | ray, 2 shards (s) | cold / plain "
        "| warm / plain | Ray start (s) | decode (ms/photo, in tasks) | model per actor (files/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['repeat']} | {r['plain_s']:.2f} | {r['ray_cold_s']:.2f} | {r['ray_first_s']:.2f} | "
            f"{r['ray_warm_s']:.2f} | {r['ray_sharded_s']:.2f} | {r['ratio_cold']:.2f} | {r['ratio_warm']:.2f} | "
            f"{r['ray_start_s']:.2f} | "
            f"{r['decode_ms_per_photo']:.2f} | {r['actor_files_per_s']:.1f} |"
        )
    s = summary
    lines += [
        "",
        f"**Medians**: plain {s['plain_s']:.2f} s ({s['plain_files_per_s']:.0f} files/s); ray cold "
        f"{s['ray_cold_s']:.2f} s ({s['ray_cold_files_per_s']:.0f} files/s, **x{s['ratio_cold']:.2f}** the plain "
        f"time); ray first run on a running Ray {s['ray_first_s']:.2f} s (x{s['ratio_first']:.2f}); ray warm "
        f"{s['ray_warm_s']:.2f} s ({s['ray_warm_files_per_s']:.0f} files/s, **x{s['ratio_warm']:.2f}**); 2 shards "
        f"{s['ray_sharded_files_per_s']:.0f} files/s (x{s['ratio_sharded']:.2f}). Ray start-up "
        f"{s['ray_start_s']:.2f} s; decoding "
        f"{s['decode_ms_per_photo']:.2f} ms per photo per CPU in the tasks; one actor's model "
        f"{s['actor_files_per_s']:.1f} files/s (1 CPU, 1 ONNX Runtime thread).",
        "",
        "Cold includes starting and stopping a local Ray; warm includes starting the actor pool (each actor opens "
        "the model), which every run pays. On one 2-CPU machine Ray can only add overhead (the plain indexer "
        "already overlaps decoding with the model in one process); its point is the next machines.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
