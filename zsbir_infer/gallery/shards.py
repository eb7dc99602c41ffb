"""Sharded galleries: several galleries (shards), each written by one writer, read and searched as one.

A sharded gallery is a directory::

    GALLERY/manifest.json     format "zsbir-sharded-gallery", version 1, fingerprint, dim, storage, metric,
                              shards (their number), partition, created, uuid, source (as a gallery's)
    GALLERY/shards/000/       one format-2 gallery per shard: its own segments with CRC-32 checksums, SQLite
    GALLERY/shards/001/       catalog, atomic commits and ANN index (see :mod:`zsbir_infer.gallery`)
    GALLERY/indexer.json      the last indexing run's report

A photo belongs to one shard, fixed by its path below the indexed root (:func:`shard_of`: CRC-32 of the
UTF-8 path modulo the number of shards), so an incremental run plans each shard on its own and a file is
never in two shards. ``zsbir index --engine ray --shards N`` writes them (:mod:`zsbir_infer.ray_index`);
:func:`open_gallery` opens a sharded or a single gallery alike, and ``zsbir query``, ``zsbir info`` and the
:class:`~zsbir_infer.retriever.Retriever` use it.

Search: each shard is searched (exhaustively, or through its own HNSW index with exact rescoring) for the
``k`` best, and the per-shard lists are merged: the exact top-k is the one a single gallery holding the
same vectors returns (the same paths and scores; ties: smaller id first, ids being the merged ones below).

Row ids: ``id = row * shards + shard`` (the row id within the shard, interleaved), stable while the shards
are not compacted; :meth:`ShardedGallery.vectors` takes them and :meth:`ShardedGallery.add` returns them.

:func:`merge_shards` compacts a sharded gallery into one gallery (atomically: built beside the target,
renamed into place), keeping every file's size, mtime and hash, so ``zsbir index`` continues it incrementally.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from zsbir_infer.gallery.source import make_source, read_source
from zsbir_infer.gallery.store import (
    DEFAULT_SEGMENT_ROWS,
    FORMAT_VERSION,
    MANIFEST,
    SHARDED_FORMAT,
    FileRecord,
    FileStat,
    FolderAppeared,
    Gallery,
    GalleryError,
    GalleryStats,
    Hit,
    ModelMismatchError,
    Plan,
    _write_json_atomic,
    build_folder,
    check_new_folder,
    new_manifest,
    require_keys,
)

__all__ = [
    "SHARDED_FORMAT",
    "SHARDED_VERSION",
    "SHARD_DIR",
    "ShardedGallery",
    "is_sharded",
    "merge_shards",
    "open_gallery",
    "shard_of",
]

#: Version of the sharded manifest written by this zsbir.
SHARDED_VERSION = 1
#: Folder of the shards inside a sharded gallery.
SHARD_DIR = "shards"
#: How files are assigned to shards (recorded in the manifest).
PARTITION = "crc32(utf-8 relpath) mod shards"
#: Storage kinds a sharded gallery supports (ITQ needs one fitted model over all vectors).
SHARDED_STORAGES = ("float16", "int8")
#: Rows copied per batch by :func:`merge_shards`.
MERGE_CHUNK = 65536


def shard_of(relpath: str, shards: int) -> int:
    """The shard (0 .. shards-1) that holds the file at ``relpath`` (its path below the indexed root)."""
    return zlib.crc32(relpath.encode("utf-8", "surrogateescape")) % shards


def _shard_name(i: int) -> str:
    return f"{SHARD_DIR}/{i:03d}"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a sharded gallery (its manifest says so)."""
    m = _read_manifest(Path(path))
    return m is not None and m.get("format") == SHARDED_FORMAT


class ShardedGallery:
    """Several shard galleries of one model, read, written, searched and described as one gallery.

    It has the public surface of :class:`~zsbir_infer.gallery.Gallery` (:data:`~zsbir_infer.gallery.store.PUBLIC_API`:
    ``add``, ``delete``, ``search``, ``vectors``, ``indexed``, ``skipped``, ``stats``, ``verify``, ``repair``, ...)
    and its internal interface (``INTERNAL_API``), with merged row ids (see the module docstring): a write goes to
    the shard each file belongs to, one transaction per shard. :attr:`shards` holds the shard galleries, for
    writers that keep one writer per shard (``zsbir index --engine ray``). Create with :meth:`create`, open with
    :meth:`open` or :func:`open_gallery`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Gallery], readonly: bool) -> None:
        """Wrap opened shards; prefer :meth:`open`."""
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.readonly = readonly
        self.fingerprint = str(manifest["fingerprint"])
        self.dim = int(manifest["dim"])
        self.storage = str(manifest["storage"])
        self.metric = str(manifest["metric"])
        self.uuid = str(manifest.get("uuid") or "")
        self.format_version = min((g.format_version for g in shards), default=FORMAT_VERSION)
        self.n_bits = 0
        self.itq: Any = None  # ITQ storage is not sharded

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        fingerprint: str,
        dim: int,
        storage: str = "float16",
        *,
        shards: int,
        segment_rows: int = DEFAULT_SEGMENT_ROWS,
    ) -> ShardedGallery:
        """Create an empty sharded gallery of ``shards`` shards at ``path`` (absent or an empty folder).

        It is built in a temporary sibling folder (every shard, then the manifest) and renamed into place:
        it appears whole or not at all.

        Raises:
            GalleryError: bad arguments, ``path`` not empty, or ITQ storage (not shardable: one ITQ model is
                fitted on all vectors).
        """
        p = Path(path)
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or int(shards) < 2:
            raise GalleryError(f"a sharded gallery needs at least 2 shards; got {shards!r} (1 shard: Gallery.create)")
        if storage not in SHARDED_STORAGES:
            raise GalleryError(f"sharded galleries store {' or '.join(SHARDED_STORAGES)} vectors; got {storage!r}")
        check_new_folder(p)
        manifest = new_manifest(
            SHARDED_FORMAT, SHARDED_VERSION, fingerprint, dim, storage, shards=int(shards), partition=PARTITION
        )

        def build(d: Path) -> None:
            (d / SHARD_DIR).mkdir()
            for i in range(int(shards)):
                Gallery.create(
                    d / _shard_name(i), fingerprint=fingerprint, dim=dim, storage=storage, segment_rows=segment_rows
                ).close()
            _write_json_atomic(d / MANIFEST, manifest)  # last: without it the folder is no gallery

        try:
            build_folder(p, build)
        except FolderAppeared:
            raise GalleryError(f"cannot create {p}: it appeared meanwhile (did another process create it?)") from None
        return cls.open(p, fingerprint=fingerprint, readonly=False)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], fingerprint: str | None = None, *, readonly: bool | None = None
    ) -> ShardedGallery:
        """Open a sharded gallery and all its shards (``fingerprint`` and ``readonly`` as in
        :meth:`Gallery.open <zsbir_infer.gallery.Gallery.open>`).

        Raises:
            GalleryError: not a sharded gallery, or a shard missing or unreadable.
            ModelMismatchError: on a fingerprint mismatch.
        """
        p = Path(path)
        m = _read_manifest(p)
        if m is None or m.get("format") != SHARDED_FORMAT:
            raise GalleryError(f"{p} is not a sharded gallery (no sharded {MANIFEST})")
        if m.get("format_version") != SHARDED_VERSION:
            raise GalleryError(
                f"{p} has sharded-gallery version {m.get('format_version')}; this zsbir reads version "
                f"{SHARDED_VERSION}. Upgrade zsbir."
            )
        require_keys(m, ("fingerprint", "dim", "storage", "metric", "shards"), p / MANIFEST)
        n = int(m["shards"])
        if readonly is None:
            readonly = not os.access(p, os.W_OK)
        shards: list[Gallery] = []
        try:
            for i in range(n):
                d = p / _shard_name(i)
                if not (d / MANIFEST).is_file():
                    raise GalleryError(f"sharded gallery {p} is damaged: shard {_shard_name(i)} is missing")
                g = Gallery.open(d, readonly=readonly)
                shards.append(g)
                if g.fingerprint != m["fingerprint"] or g.dim != int(m["dim"]) or g.storage != m["storage"]:
                    raise GalleryError(
                        f"sharded gallery {p} is damaged: shard {_shard_name(i)} holds another model or storage "
                        f"({g.fingerprint}, dim {g.dim}, {g.storage})"
                    )
            sg = cls(p, m, shards, bool(readonly))
            if fingerprint is not None:
                sg._check_model(fingerprint)
        except BaseException:
            for g in shards:
                g.close()
            raise
        return sg

    # ------------------------------------------------------------------ identity and source

    def _shard_of(self, relpath: str) -> int:
        """The shard that holds (or will hold) ``relpath``."""
        return shard_of(relpath, len(self.shards))

    @property
    def _source(self) -> dict[str, Any]:
        """What the gallery indexes (``{"root", "model"}``, as ``Gallery._source``)."""
        m = _read_manifest(self.path) or self.manifest
        return read_source(self.path, m)

    @property
    def _root(self) -> str | None:
        """The photo folder this gallery indexes (absolute), or None when unknown."""
        root = self._source.get("root")
        return root if isinstance(root, str) else None

    def _record_source(self, root: str | os.PathLike[str], model: str | None) -> None:
        """Record the photo folder and the model bundle in the sharded manifest (atomically)."""
        if self.readonly:
            raise GalleryError(f"gallery {self.path} is open read-only")
        block = make_source(self.path, Path(root), model)
        m = _read_manifest(self.path) or self.manifest
        if m.get("source") == block:
            return
        self.manifest = {**m, "source": block}
        _write_json_atomic(self.path / MANIFEST, self.manifest)

    def _check_model(self, fingerprint: str) -> None:
        """Raise :class:`ModelMismatchError` unless ``fingerprint`` is the gallery's."""
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(self.path, self.fingerprint, fingerprint)

    def _identity(self) -> tuple[str, int]:
        """``(uuid, generation)``: the uuid of the sharded gallery and of its shards, and the sum of the
        shards' commit counters (it grows with every commit to any shard)."""
        ids = [g._identity() for g in self.shards]
        return ":".join([self.uuid, *(u for u, _ in ids)]), sum(gen for _, gen in ids)

    # ------------------------------------------------------------------ ids

    def _split(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gid = np.asarray(ids, dtype=np.int64).reshape(-1)
        if gid.size and gid.min() < 0:
            raise GalleryError(f"row ids must be >= 0; got {int(gid.min())}")
        n = len(self.shards)
        return gid % n, gid // n

    def _gid(self, shard: int, row: int) -> int:
        return int(row) * len(self.shards) + shard

    # ------------------------------------------------------------------ reading

    def _load(self) -> None:
        """Map every shard's vectors and verify their checksums now."""
        for g in self.shards:
            g._load()

    def verify(self, full: bool = True) -> list[str]:
        """Every shard's problems (see :meth:`Gallery.verify`), each prefixed with the shard's folder."""
        return [f"{_shard_name(i)}: {line}" for i, g in enumerate(self.shards) for line in g.verify(full=full)]

    def indexed(self) -> list[tuple[str, int]]:
        """(relpath, merged row id) of every indexed file, sorted by path."""
        out = [(rel, self._gid(i, row)) for i, g in enumerate(self.shards) for rel, row in g.indexed()]
        return sorted(out)

    def skipped(self) -> list[tuple[str, str]]:
        """(relpath, reason) of every skipped file, sorted by path."""
        return sorted(item for g in self.shards for item in g.skipped())

    def _live_count(self) -> int:
        """Number of searchable rows over all shards."""
        return sum(g._live_count() for g in self.shards)

    def __len__(self) -> int:
        """Number of indexed (searchable) files."""
        return sum(len(g) for g in self.shards)

    def _per_shard(self, ids: Sequence[int] | np.ndarray) -> Iterator[tuple[Gallery, np.ndarray, np.ndarray]]:
        shard, row = self._split(ids)
        for i in np.unique(shard):
            sel = np.flatnonzero(shard == i)
            yield self.shards[int(i)], sel, row[sel]

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored rows (merged ids) as float32, dequantized for int8."""
        n = int(np.asarray(ids).size)
        out = np.empty((n, self.dim), dtype=np.float32)
        for g, sel, rows in self._per_shard(ids):
            out[sel] = g.vectors(rows)
        return out

    def _stored_rows(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows exactly as stored (see ``Gallery._stored_rows``), for merged ids."""
        n = int(np.asarray(ids).size)
        main: np.ndarray | None = None
        scale: np.ndarray | None = None
        for g, sel, rows in self._per_shard(ids):
            m, s = g._stored_rows(rows)
            if main is None:
                main = np.empty((n, *m.shape[1:]), dtype=m.dtype)
                scale = None if s is None else np.empty((n, *s.shape[1:]), dtype=s.dtype)
            main[sel] = m
            if scale is not None and s is not None:
                scale[sel] = s
        if main is None:
            return self.shards[0]._stored_rows([])
        return main, scale

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        exact: bool = False,
        *,
        fingerprint: str | None = None,
        threads: int | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` best files for each query over all shards (see :meth:`Gallery.search` for the arguments).

        Each shard returns its own ``k`` best (exact, or its ANN candidates rescored exactly); the merged list
        is sorted by score, then by merged id. Hits carry merged ids.
        """
        if fingerprint is not None:
            self._check_model(fingerprint)
        per_shard = [g.search(queries, k, exact, threads=threads) for g in self.shards]
        out: list[list[Hit]] = []
        for qi in range(len(per_shard[0])):
            merged = [replace(h, id=self._gid(i, h.id)) for i, res in enumerate(per_shard) for h in res[qi]]
            merged.sort(key=lambda h: (-h.score, h.id))
            out.append([replace(h, rank=r + 1) for r, h in enumerate(merged[: int(k)])])
        return out

    # ------------------------------------------------------------------ writing

    def _by_shard(self, relpaths: Sequence[str], *, every: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(shard, positions)`` of the paths each shard holds, in shard order (``every``: empty shards too)."""
        shard = np.fromiter((self._shard_of(r) for r in relpaths), dtype=np.int64, count=len(relpaths))
        for i in range(len(self.shards)) if every else np.unique(shard).tolist():
            pos = np.flatnonzero(shard == i)
            if every or pos.size:
                yield int(i), pos

    def _plan(self, files: Iterable[FileStat | tuple[str, int, int]], *, retry_skipped: bool = False) -> Plan:
        """``Gallery._plan`` over every shard, each planning the files that belong to it."""
        stats = [f if isinstance(f, FileStat) else FileStat(*f) for f in files]
        out = Plan()
        for i, pos in self._by_shard([f.relpath for f in stats], every=True):
            part = self.shards[i]._plan([stats[j] for j in pos], retry_skipped=retry_skipped)
            out.new.extend(part.new)
            out.changed.extend(part.changed)
            out.unchanged.extend(part.unchanged)
            out.deleted.extend(part.deleted)
            out.retry.extend(part.retry)
        return out

    def _skip(self, file: FileStat | FileRecord | str, reason: str) -> None:
        """``Gallery._skip`` in the file's shard."""
        self._skip_many([(file, reason)])

    def _skip_many(self, items: Iterable[tuple[FileStat | FileRecord | str, str]]) -> None:
        """``Gallery._skip_many``, one transaction per shard."""
        pairs = list(items)
        rels = [f if isinstance(f, str) else f.relpath for f, _ in pairs]
        for i, pos in self._by_shard(rels):
            self.shards[i]._skip_many([pairs[j] for j in pos])

    def _records(self) -> list[tuple[FileRecord, int]]:
        """Every indexed file as a :class:`FileRecord` with its merged row id, in merged-id order."""
        out = [(rec, self._gid(i, row)) for i, g in enumerate(self.shards) for rec, row in g._records()]
        return sorted(out, key=lambda item: item[1])

    def add(self, records: Sequence[FileRecord], vectors: np.ndarray) -> list[int]:
        """Add (or replace) files and their embeddings (see :meth:`Gallery.add`), each in the shard its path
        belongs to; returns the merged row ids, in order. Each shard's part is one atomic batch (a crash can
        leave some shards' parts committed and not others; a rerun of ``zsbir index`` completes them).

        Raises:
            GalleryError: on bad records or vectors (checked before any shard is written).
        """
        recs = list(records)
        for r in recs:
            if not isinstance(r, FileRecord):
                raise GalleryError(f"records must be FileRecord objects; got {type(r).__name__}")
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[0] != len(recs):
            raise GalleryError(f"expected {len(recs)} vectors of dimension {self.dim}; got shape {list(v.shape)}")
        if len({r.relpath for r in recs}) != len(recs):
            raise GalleryError("the batch names a file twice")
        ids = np.empty(len(recs), dtype=np.int64)
        for i, pos in self._by_shard([r.relpath for r in recs]):
            rows = self.shards[i].add([recs[j] for j in pos], v[pos])
            ids[pos] = [self._gid(i, row) for row in rows]
        return ids.tolist()

    def delete(self, relpaths: Iterable[str]) -> int:
        """Mark files as deleted in their shards (see :meth:`Gallery.delete`); returns how many were known."""
        rels = list(relpaths)
        return sum(self.shards[i].delete([rels[j] for j in pos]) for i, pos in self._by_shard(rels))

    def repair(self) -> list[tuple[str, int]]:
        """Drop the photos stored in damaged segment files of every shard (see :meth:`Gallery.repair`);
        ``(shard folder/segment file name, photos dropped)`` for each damaged segment."""
        return [(f"{_shard_name(i)}/{name}", n) for i, g in enumerate(self.shards) for name, n in g.repair()]

    def build_index(self) -> int:
        """Build and save every shard's ANN index; returns the vectors in them."""
        return sum(g.build_index() for g in self.shards)

    def compact(self) -> int:
        """Drop the tombstones of every shard (:meth:`Gallery.compact`); returns the rows dropped. Merged ids
        change. To make one gallery of the shards, use :func:`merge_shards`."""
        return sum(g.compact() for g in self.shards)

    # ------------------------------------------------------------------ description

    def _shard_stats(self) -> list[GalleryStats]:
        """Each shard's :class:`GalleryStats`, in shard order."""
        return [g.stats() for g in self.shards]

    def stats(self) -> GalleryStats:
        """The shards' counts and sizes added up (``ann_state``: ``current`` when every shard's index is current,
        ``missing`` when no shard has one, else ``stale``); ``_shard_stats`` has them one by one."""
        parts = self._shard_stats()
        states = {s.ann_state for s in parts}
        ann_state = states.pop() if len(states) == 1 else "stale"
        total_bytes = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return GalleryStats(
            path=str(self.path),
            fingerprint=self.fingerprint,
            dim=self.dim,
            metric=self.metric,
            storage=self.storage,
            format_version=self.format_version,
            files_indexed=sum(s.files_indexed for s in parts),
            files_skipped=sum(s.files_skipped for s in parts),
            files_deleted=sum(s.files_deleted for s in parts),
            rows=sum(s.rows for s in parts),
            dead_rows=sum(s.dead_rows for s in parts),
            segments=sum(s.segments for s in parts),
            bytes_vectors=sum(s.bytes_vectors for s in parts),
            bytes_total=total_bytes,
            ann_vectors=sum(s.ann_vectors for s in parts),
            ann_stale=any(s.ann_stale for s in parts),
            generation=sum(s.generation for s in parts),
            created=str(self.manifest.get("created", "")),
            uuid=self.uuid,
            ann_state=ann_state,
            ann_rows=sum(s.ann_rows for s in parts),
        )

    def close(self) -> None:
        """Close every shard."""
        for g in self.shards:
            g.close()

    def __enter__(self) -> ShardedGallery:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedGallery({str(self.path)!r}, {len(self.shards)} shards, storage={self.storage!r})"


def open_gallery(
    path: str | os.PathLike[str], fingerprint: str | None = None, *, readonly: bool | None = None
) -> Gallery | ShardedGallery:
    """Open the gallery at ``path``, sharded or not (arguments as :meth:`Gallery.open`)."""
    if is_sharded(path):
        return ShardedGallery.open(path, fingerprint, readonly=readonly)
    return Gallery.open(path, fingerprint, readonly=readonly)


def merge_shards(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, build_ann_from: int | None = None
) -> Path:
    """Compact the sharded gallery ``src`` into one gallery at ``dst`` (absent or an empty folder).

    Every indexed file is copied with its size, mtime, hash and vector (shard by shard, in row order; float16
    rows are copied exactly), every skipped file with its reason, and the photo folder and model are recorded,
    so searches return the same paths and scores and ``zsbir index -o DST`` continues incrementally. The
    gallery is built in a temporary sibling folder and renamed into place when complete (a kill leaves
    ``dst`` as it was). The ANN index is built as ``zsbir index`` would (``build_ann_from``).

    Returns:
        ``dst``.

    Raises:
        GalleryError: ``src`` is not a sharded gallery or ``dst`` is not empty.
    """
    from zsbir_infer.gallery.ann import builds_ann

    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GalleryError(f"{out} exists and is not an empty directory; name a new folder for the merged gallery")
    tmp = out.absolute().parent / f".{out.name}.merging-{os.getpid()}-{secrets.token_hex(4)}"
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with ShardedGallery.open(src, readonly=True) as sg:
        try:
            with Gallery.create(tmp, fingerprint=sg.fingerprint, dim=sg.dim, storage=sg.storage) as g:
                for shard in sg.shards:
                    recs = shard._records()
                    for start in range(0, len(recs), MERGE_CHUNK):
                        chunk = recs[start : start + MERGE_CHUNK]
                        vecs = shard.vectors([row for _, row in chunk])
                        g.add([FileRecord(r.relpath, r.size, r.mtime_ns, r.sha256) for r, _ in chunk], vecs)
                    skips: list[tuple[FileStat | FileRecord | str, str]] = list(shard._skipped_records())
                    if skips:
                        g._skip_many(skips)
                source = sg._source
                if source.get("root"):
                    g._record_source(str(source["root"]), source.get("model"))
                if builds_ann(len(g), False, build_ann_from):
                    g.build_index()
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
