"""``zsbir index --engine ray``: the indexing pipeline on Ray Data, into a gallery or a sharded gallery.

    from zsbir_infer.ray_index import index_folder_ray

    report = index_folder_ray("photos", ".zsbir", shards=4)          # a local Ray, started and shut down
    report = index_folder_ray("photos", "/shared/g", ray_address="auto", actors=8, gpus_per_actor=0.5)

The run is the plain indexer's (:mod:`zsbir_infer.indexer`), with the decoding and the model on Ray:

1. **List and plan** on the driver, with the plain indexer's code (:func:`~zsbir_infer.indexer.walk`,
   :func:`~zsbir_infer.indexer.plan_gallery`): new, changed, deleted, and skipped-with-reason files, per
   shard (a file's shard is fixed by its path: :func:`zsbir_infer.gallery.shards.shard_of`). When nothing
   is new or changed, Ray is not started at all.
2. **Read and decode** in Ray tasks (``map_batches`` with a function): each file read once, hashed and
   preprocessed for the model; a file that cannot be used becomes a skip with a reason, and so does a file
   on which the decoding code raises (it never fails the job).
3. **Embed** in a pool of actors, each holding one :class:`~zsbir_infer.encoder.Encoder` (``map_batches``
   with a class; ``actors`` of them, each with ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs; the
   actor checks that its model is the gallery's).
4. **Commit** on the driver, one writer per shard, with the plain indexer's committer: every
   ``commit_files`` files or ``commit_seconds`` seconds one atomic, checksummed :meth:`Gallery.add
   <zsbir_infer.gallery.Gallery.add>` per shard. Rows Ray delivers twice (a retried task) are committed once.

Guarantees are the plain indexer's: the driver killed at any moment (``kill -9``) leaves a gallery that
opens, and a rerun embeds only what was not committed, so every file ends up in the gallery exactly once; a
worker that dies is restarted by Ray and its batch retried. Without ``ray_address`` a local Ray is started
for the run and shut down after it; with one, the run connects to that cluster (whose nodes need zsbir
installed and, for ``model``, the bundle folder at the same path; the gallery is written by the driver).
Ray is imported only here, when this engine runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zsbir_infer.indexer import (
    DEFAULT_COMMIT_FILES,
    DEFAULT_COMMIT_SECONDS,
    SKIP_CORRUPT,
    IndexingError,
    IndexReport,
    PlannedWork,
    WalkEntry,
    _check_and_repair,
    _clear_half_created,
    _Committer,
    _creation_lock,
    _ensure_gallery,
    _prepare,
    _reason,
    _run_lock,
    claim_source,
    commit_results,
    count_listing,
    finish_gallery,
    open_or_create_gallery,
    plan_gallery,
    walk,
    write_run_report,
)

if TYPE_CHECKING:
    from zsbir_infer.gallery import Gallery
    from zsbir_infer.preprocess import PreprocessSpec

__all__ = ["DEFAULT_DECODE_BATCH", "PrepareFn", "RayStats", "index_folder_ray"]

log = logging.getLogger("zsbir.ray_index")

#: Files per decoding task (and per Ray block of the listing).
DEFAULT_DECODE_BATCH = 64
#: Heap a decoding task reserves besides its pixel buffers (bytes).
DECODE_TASK_MEMORY = 64 * 1024 * 1024
#: Object store of a local Ray started for a run (bytes): decoded batches in flight only.
LOCAL_OBJECT_STORE = 512 * 1024 * 1024

#: Reads, hashes and preprocesses one file into ``out``: ``(True, sha256)`` or ``(False, skip reason)``
#: (the plain indexer's ``_prepare``; a test passes one that raises on a poisoned file).
PrepareFn = Callable[[WalkEntry, "PreprocessSpec", np.ndarray], tuple[bool, str]]


@dataclass
class RayStats:
    """Where a Ray run's time went (``index_folder_ray(..., stats=RayStats())`` fills it).

    ``decode_seconds``: read + hash + decode + preprocess time summed over the files (inside the tasks);
    ``actors``: per actor (``host:pid``): ``[files embedded, seconds inside the model]``, so
    ``files / seconds`` is one actor's model throughput; ``start_seconds``: connecting to or starting Ray;
    ``pipeline_seconds``: from building the dataset to its last batch committed.
    """

    decoded: int = 0
    decode_seconds: float = 0.0
    actors: dict[str, list[float]] = field(default_factory=dict)
    start_seconds: float = 0.0
    pipeline_seconds: float = 0.0


# ------------------------------------------------------------------------------------------ Ray stages


def _decode_batch(batch: dict[str, np.ndarray], spec: PreprocessSpec, prepare: PrepareFn | None) -> dict[str, Any]:
    """Ray task: read and decode the files of one block into a pixel batch (one row per file)."""
    fn = prepare or _prepare
    n = len(batch["key"])
    pixels = np.zeros((n, 3, spec.height, spec.width), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    seconds = np.zeros(n, dtype=np.float64)
    text: list[str] = []
    for i in range(n):
        t0 = time.perf_counter()
        relpath = bytes(batch["relpath"][i]).decode("utf-8", "surrogateescape")  # names need not be UTF-8
        entry = WalkEntry(relpath, bytes(batch["path"][i]), 0, 0)
        try:
            good, why = fn(entry, spec, pixels[i])
        except Exception as exc:  # a file the decoding code raises on is skipped, never fails the job
            good, why = False, _reason(SKIP_CORRUPT, f"decoding raised {type(exc).__name__}: {exc}")
        ok[i] = good
        seconds[i] = time.perf_counter() - t0
        text.append(why)
    return {
        "key": batch["key"],
        "ok": ok,
        "text": np.array(text, dtype=object),
        "pixels": pixels,
        "decode_s": seconds,
    }


class _EmbedActor:
    """Ray actor: one :class:`~zsbir_infer.encoder.Encoder`, embedding the decoded files of each batch."""

    def __init__(
        self, model: str | None, precision: str, backend: str, batch_size: int, threads: int, fingerprint: str
    ) -> None:
        import socket

        from zsbir_infer.encoder import Encoder

        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.encoder = Encoder.open(
            model, precision=precision, backend=backend, batch_size=batch_size, workers=1, threads=threads
        )
        if self.encoder.fingerprint != fingerprint:
            raise IndexingError(
                f"the model on this Ray worker ({model or 'embedded default'}) has fingerprint "
                f"{self.encoder.fingerprint}, the gallery's is {fingerprint}: the nodes must see the same bundle"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = np.asarray(batch["ok"], dtype=bool)
        n = ok.size
        vec = np.zeros((n, self.encoder.embedding_dim), dtype=np.float32)
        t0 = time.perf_counter()
        if ok.any():
            px = np.asarray(batch["pixels"])
            vec[ok] = self.encoder.embed(px if ok.all() else px[ok], "photo")
        embed_s = np.full(n, (time.perf_counter() - t0) / max(1, int(ok.sum())) if ok.any() else 0.0)
        return {
            "key": batch["key"],
            "ok": ok,
            "text": batch["text"],
            "vec": vec,
            "backend": np.array([self.encoder.backend] * n, dtype=object),
            "actor": np.array([self.actor] * n, dtype=object),
            "decode_s": batch["decode_s"],
            "embed_s": np.where(ok, embed_s, 0.0),
        }


# ------------------------------------------------------------------------------------------ the run


def _last_line(exc: BaseException) -> str:
    """The last line of an exception's message (Ray wraps a worker's error in its whole traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def _start_ray(address: str | None, num_cpus: int | None, object_store_memory: int | None) -> bool:
    """Connect to Ray (``address``) or start a local one; False when Ray was already initialized here."""
    try:
        import ray
    except ImportError:
        raise IndexingError(
            "--engine ray needs Ray Data: pip install 'zsbir[ray]' (or: pip install 'ray[data]>=2.60')"
        ) from None

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_memory or LOCAL_OBJECT_STORE,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # zsbir shows its own progress, and a failed job is raised as an IndexingError naming the worker's error.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _open_target(
    gdir: Path, root: Path, bundle: Any, storage: str, shards: int | None, model: str | None, repoint: bool
) -> tuple[Any, list[Gallery]]:
    """The gallery (created when absent: sharded when ``shards`` > 1) and its shard galleries (one for a
    plain gallery), opened for writing, its source checked and recorded. Call with the run lock held."""
    from zsbir_infer.gallery.shards import ShardedGallery, is_sharded

    if not is_sharded(gdir):
        if shards is not None and shards > 1:
            raise IndexingError(
                f"gallery {gdir} is a single gallery, not one of {shards} shards; index into a new folder (-o DIR) "
                "to shard, or leave out --shards"
            )
        g = open_or_create_gallery(gdir, root, bundle, storage=storage, model=model, repoint=repoint)
        return g, [g]
    sg = ShardedGallery.open(gdir, fingerprint=bundle.fingerprint, readonly=False)
    if shards is not None and shards != len(sg.shards):
        sg.close()
        raise IndexingError(
            f"gallery {gdir} has {len(sg.shards)} shards, not {shards}; a file's shard follows from its path and the "
            "number of shards, which stays as created: leave out --shards (or index into a new folder, -o DIR)"
        )
    claim_source(sg, gdir, root, model, repoint, command="zsbir index --engine ray")
    return sg, list(sg.shards)


def index_folder_ray(
    root: str | os.PathLike[str],
    gallery: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
    backend: str = "auto",
    batch_size: int = 32,
    decode_batch_size: int = DEFAULT_DECODE_BATCH,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    shards: int | None = None,
    storage: str = "float16",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[int], Any] | None = None,
    build_ann_from: int | None = None,
    commit_files: int = DEFAULT_COMMIT_FILES,
    commit_seconds: float = DEFAULT_COMMIT_SECONDS,
    follow_links: bool = False,
    repoint: bool = False,
    prepare: PrepareFn | None = None,
    stats: RayStats | None = None,
) -> IndexReport:
    """Index (or update the index of) the photos below ``root`` into ``gallery`` on Ray Data.

    Args:
        root: folder of photos.
        gallery: gallery folder; created when absent: a sharded gallery when ``shards`` > 1, else a plain one
            (the same format as ``zsbir index`` writes).
        model: bundle folder (``None``: the embedded default); the Ray workers open it at this path.
        precision, backend: as for :meth:`Encoder.open <zsbir_infer.encoder.Encoder.open>`, in each actor.
        batch_size: images per model call (per actor batch).
        decode_batch_size: files per decoding task.
        actors: embedding actors (default: a local Ray's CPUs divided by ``cpus_per_actor``, halved so that
            decoding has CPUs too, at least 1; on a cluster: 1 per GPU-share or per 2 CPUs).
        cpus_per_actor: CPUs each actor reserves (also its ONNX Runtime threads).
        gpus_per_actor: GPUs each actor reserves (0: CPU actors; 0.5: two actors per GPU).
        shards: number of shards of a new gallery (default 1: a plain gallery); for an existing gallery it
            must match (or be None).
        storage: ``"float16"`` or ``"int8"`` for a new gallery.
        ray_address: an existing Ray cluster (``"auto"`` or ``"HOST:PORT"``); None starts a local Ray for the
            run (``num_cpus``, ``object_store_memory``) and shuts it down after. If Ray is already initialized
            in this process, that Ray is used and left running.
        progress, on_plan, build_ann_from, commit_files, commit_seconds, follow_links, repoint: as for
            :func:`zsbir_infer.indexer.index_folder`.
        prepare: the per-file read+decode function run in the Ray tasks (default: the plain indexer's).
        stats: a :class:`RayStats` to fill with where the time went (per-actor model throughput).

    Returns:
        An :class:`~zsbir_infer.indexer.IndexReport` (``backend`` is the actors' backend, ``ray:`` prefixed).

    Raises:
        IndexingError: bad root, a gallery of another root or shard count, another run in progress, or a
            failed Ray job (what was committed is kept: rerun).
        zsbir_infer.gallery.ModelMismatchError: the gallery was built with another model.
    """
    from zsbir_infer.bundle import Bundle
    from zsbir_infer.gallery.shards import shard_of

    if batch_size < 1 or decode_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1; got {batch_size} and {decode_batch_size}")
    if shards is not None and shards < 1:
        raise ValueError(f"shards must be >= 1; got {shards}")
    t0 = time.perf_counter()
    root_p = Path(root).resolve()
    gdir = Path(gallery).absolute()
    model_path = str(Path(model).resolve()) if model is not None else None
    bundle = Bundle.open(model_path)
    spec = bundle.preprocess_spec("photo")
    listing = walk(root_p, exclude=[gdir], follow_links=follow_links)
    if shards is not None and shards > 1:
        _ensure_sharded(gdir, bundle, storage, shards)
    else:
        _ensure_gallery(gdir, bundle, storage)
    report = IndexReport(
        root=str(root_p),
        gallery=str(gdir),
        fingerprint=bundle.fingerprint,
        backend=f"ray:{backend}",
        precision=precision,
    )
    with _run_lock(gdir):
        target, parts = _open_target(gdir, root_p, bundle, storage, shards, model_path, repoint)
        try:
            for g in parts:
                _check_and_repair(g, report)
            entries = count_listing(listing, report)
            by_shard: list[list[WalkEntry]] = [[] for _ in parts]
            for e in entries:
                by_shard[shard_of(e.relpath, len(parts)) if len(parts) > 1 else 0].append(e)
            works = [plan_gallery(g, es, report) for g, es in zip(parts, by_shard, strict=True)]
            todo = sum(w.todo for w in works)
            n_read = sum(len(w.candidates) for w in works)
            if on_plan is not None:
                on_plan(todo)
            if progress is not None and todo > n_read:
                progress(todo - n_read)
            committers = [_Committer(g, report, commit_files, commit_seconds) for g in parts]
            t_embed = time.perf_counter()
            try:
                if n_read:
                    _run_ray(
                        works,
                        committers,
                        report,
                        spec=spec,
                        model=model_path,
                        fingerprint=bundle.fingerprint,
                        precision=precision,
                        backend=backend,
                        batch_size=batch_size,
                        decode_batch_size=decode_batch_size,
                        actors=actors,
                        cpus_per_actor=cpus_per_actor,
                        gpus_per_actor=gpus_per_actor,
                        ray_address=ray_address,
                        num_cpus=num_cpus,
                        object_store_memory=object_store_memory,
                        progress=progress,
                        prepare=prepare,
                        stats=stats if stats is not None else RayStats(),
                    )
                for c in committers:
                    c.flush()
            finally:
                report.embed_seconds = time.perf_counter() - t_embed
            report.total_indexed = report.total_skipped = 0
            for g in parts:
                n_indexed, n_skipped = finish_gallery(g, build_ann_from)
                report.total_indexed += n_indexed
                report.total_skipped += n_skipped
            report.seconds = time.perf_counter() - t0
            write_run_report(gdir, report)
        except KeyboardInterrupt:
            report.interrupted = True
            raise
        finally:
            target.close()
    report.seconds = time.perf_counter() - t0
    return report


def _ensure_sharded(gdir: Path, bundle: Any, storage: str, shards: int) -> None:
    """Create a sharded gallery of ``shards`` shards at ``gdir`` unless a gallery exists there (race-free,
    under the plain indexer's creation lock)."""
    from zsbir_infer.gallery.shards import ShardedGallery

    if (gdir / "manifest.json").is_file():
        return
    gdir.parent.mkdir(parents=True, exist_ok=True)
    with _creation_lock(gdir):
        if (gdir / "manifest.json").is_file():
            return
        _clear_half_created(gdir)
        ShardedGallery.create(
            gdir, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim, storage=storage, shards=shards
        ).close()


def _run_ray(
    works: Sequence[PlannedWork],
    committers: Sequence[_Committer],
    report: IndexReport,
    *,
    spec: PreprocessSpec,
    model: str | None,
    fingerprint: str,
    precision: str,
    backend: str,
    batch_size: int,
    decode_batch_size: int,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    ray_address: str | None,
    num_cpus: int | None,
    object_store_memory: int | None,
    progress: Callable[[int], Any] | None,
    prepare: PrepareFn | None,
    stats: RayStats,
) -> None:
    """Decode and embed every candidate of ``works`` on Ray, committing through ``committers`` (same order)."""
    keyed: list[tuple[int, WalkEntry]] = [(s, e) for s, w in enumerate(works) for e in w.candidates]
    t_start = time.perf_counter()
    if ray_address is None and not _ray_initialized():
        # A local run: the actors run here, so a backend that cannot run fails now, with its own message.
        from zsbir_infer.encoder import Encoder

        Encoder.open(model, precision=precision, backend=backend, batch_size=batch_size, workers=1, threads=1).close()
    started = _start_ray(ray_address, num_cpus, object_store_memory)
    stats.start_seconds += time.perf_counter() - t_start
    t_pipe = time.perf_counter()
    try:
        import ray
        import ray.data

        _quiet_ray_data()
        if actors is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            if gpus_per_actor > 0:
                actors = max(1, int(gpus / gpus_per_actor))
            else:
                actors = max(1, int(cpus / max(cpus_per_actor, 1e-9) / 2))
        items = [
            {"key": k, "relpath": e.relpath.encode("utf-8", "surrogateescape"), "path": e.path}
            for k, (_, e) in enumerate(keyed)
        ]
        blocks = max(1, -(-len(items) // decode_batch_size))
        ds: Any = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode_batch,
            batch_size=decode_batch_size,
            batch_format="numpy",
            fn_kwargs={"spec": spec, "prepare": prepare},
            num_cpus=1,
            # What a task's pixel buffers take (in and out). Also keeps Ray from fusing the decoding into the
            # actors (stages with other resources are not fused), so that it runs in tasks beside the model.
            memory=2 * decode_batch_size * 3 * spec.height * spec.width * 4 + DECODE_TASK_MEMORY,
        )
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=int(actors)),
            fn_constructor_kwargs={
                "model": model,
                "precision": precision,
                "backend": backend,
                "batch_size": batch_size,
                "threads": max(1, int(cpus_per_actor)),
                "fingerprint": fingerprint,
            },
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        seen = np.zeros(len(keyed), dtype=bool)
        backends: set[str] = set()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                keys = np.asarray(batch["key"], dtype=np.int64)
                fresh = ~seen[keys]  # a retried task may deliver rows again: commit each file once
                seen[keys] = True
                oks = np.asarray(batch["ok"], dtype=bool)
                texts, vecs = batch["text"], np.asarray(batch["vec"], dtype=np.float32)
                backends.update(str(b) for b in batch["backend"])
                stats.decoded += int(fresh.sum())
                stats.decode_seconds += float(np.asarray(batch["decode_s"])[fresh].sum())
                for actor, e_s, ok_row in zip(batch["actor"][fresh], batch["embed_s"][fresh], oks[fresh], strict=True):
                    acc = stats.actors.setdefault(str(actor), [0.0, 0.0])
                    acc[0] += float(ok_row)
                    acc[1] += float(e_s)
                shard_ids = np.array([keyed[int(k)][0] for k in keys], dtype=np.int64)
                for s in np.unique(shard_ids[fresh]):
                    rows = np.flatnonzero(fresh & (shard_ids == s))
                    part = [keyed[int(keys[r])][1] for r in rows]
                    results = [(bool(oks[r]), str(texts[r])) for r in rows]
                    good = rows[oks[rows]]
                    commit_results(
                        committers[int(s)], works[int(s)].before, part, results, vecs[good] if good.size else None
                    )
                if progress is not None and fresh.any():
                    progress(int(fresh.sum()))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed Ray job: what was committed stays committed
            raise IndexingError(
                f"the Ray job failed ({_last_line(exc)}); the batches committed so far are kept: rerun the same "
                "command to continue"
            ) from exc
        if not seen.all():
            raise IndexingError(
                f"Ray returned {int(seen.sum())} of {seen.size} files; the batches committed are kept: rerun"
            )
        if backends:
            report.backend = "ray:" + "+".join(sorted(backends))
        stats.pipeline_seconds += time.perf_counter() - t_pipe
    finally:
        if started:
            import ray

            ray.shutdown()
