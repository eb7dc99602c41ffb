"""Galleries: photo embeddings on disk, updated incrementally, searched on the CPU.

A gallery is a directory::

    GALLERY/manifest.json        format, format_version (2), model fingerprint (CONTRACTS §6), dim, metric,
                                 storage, segment_rows, created, uuid (random, per gallery), source (the
                                 photo folder and model bundle it indexes, relative to the gallery when
                                 inside or beside it: gallery/source.py); written with temp file + rename
    GALLERY/meta.sqlite          one row per file: relpath (relative to the indexed root, '/' separators),
                                 size, mtime_ns, sha256, status (indexed | skipped | deleted), reason,
                                 vec (its row id) -- plus the committed length and the CRC-32 of the
                                 committed bytes of every segment file
    GALLERY/segments/NNNNNN.f16  append-only rows: float16 (default), or .i8 + .scale (int8 with a
                                 per-vector float32 scale), or .itq (packed ITQ codes, np.packbits order)
    GALLERY/itq.npz              the ITQ model (storage "itq" only; zsbir_infer.itq.ITQ.save format)
    GALLERY/ann.usearch, ann.json  usearch HNSW index and what it covers (saved by build_index)

Guarantees:

* **Creation** builds the gallery in a temporary sibling folder and renames it into place: it appears
  whole or not at all, and two creations at once cannot mix their files.
* **Verified vectors.** Each segment file's checksum is checked when it is first mapped (once per
  process; a segment that grew is checked from where the last check stopped); a mismatch raises
  :class:`SegmentDamagedError`, :meth:`Gallery.repair` drops the photos of damaged segments (the
  indexer embeds them again) and :meth:`Gallery.verify` checks everything (``zsbir info --verify``).
  SQLite errors (a damaged catalog, a full disk, a busy database) become :class:`GalleryError` messages.
* **Read-only opening.** ``Gallery.open(path, readonly=True)`` (the default where the folder is not
  writable) never writes: SQLite ``mode=ro`` (``immutable`` when SQLite cannot create its shared-memory
  file on a read-only folder).
* **A read never writes**, writable or not: the ANN index is built and saved by :meth:`Gallery.build_index`
  (``zsbir index`` runs it, see :data:`~zsbir_infer.gallery.ann.ANN_MIN_ROWS`) and by :meth:`Gallery.compact`;
  a search only loads it (rows added since are added in memory) and is exhaustive without it.
* **Identity.** A gallery deleted and created again at the same path has another uuid: an open
  ``Gallery`` notices it (one ``stat`` of the manifest per call), reloads one of the same model and
  storage and refuses any other. Paths read from the catalog are checked to lie inside the photo folder.
* **Format 1** (no checksums, no uuid) opens read-only as it is and is upgraded in place, atomically, the
  first time it is opened for writing.
* **Atomic batches.** :meth:`Gallery.add` appends the batch's rows to the segment files and fsyncs them,
  then commits the metadata rows that point at them (and the segments' new lengths) in one SQLite
  transaction. Readers only map the committed lengths. A crash or kill at any moment leaves a gallery
  that opens; bytes written past a committed length are garbage, ignored by readers and overwritten by
  the next ``add``. A rerun of the indexing job then sees the committed files as unchanged and the rest
  as new, so every file ends up indexed exactly once (paths are unique in the metadata).
* **Tombstones.** A changed file gets a new row; the old row, and the rows of deleted or newly skipped
  files, are dead and never returned by a search. :meth:`Gallery.compact` rewrites the segments without
  them (atomically: new files first, then one metadata transaction) and renumbers the live rows densely,
  in their old order; row ids (``Hit.id``) are stable between compactions only.
* **Model identity.** ``Gallery.open(path, fingerprint=...)`` and ``search(..., fingerprint=...)`` raise
  :class:`ModelMismatchError` (naming both fingerprints) when the model differs from the gallery's.
* **Concurrency.** Searches are thread-safe: threads share the memory maps and each thread has its own
  SQLite connection. Writers (``add``/``skip``/``delete``) are serialized by a lock (threads) and
  ``flock`` on ``GALLERY/.lock`` (processes). Readers see a new batch on their next search.

Code: :mod:`~zsbir_infer.gallery.codecs` has one codec per storage kind (encode, decode, file layout,
scorer); :mod:`~zsbir_infer.gallery.search` the exhaustive search over memory-mapped blocks;
:mod:`~zsbir_infer.gallery.segments` the segment files (append, map, CRC-32 checksums, repair checks);
:mod:`~zsbir_infer.gallery.ann` the HNSW index and the exact/ANN policy; :mod:`~zsbir_infer.gallery.shards`
sharded galleries (several shards read as one, :func:`open_gallery`); :mod:`~zsbir_infer.gallery.source`
what the gallery indexes and :func:`~zsbir_infer.gallery.source.find_gallery`; :mod:`~zsbir_infer.gallery.store`
the SQLite catalog and the :class:`Gallery` itself.

Search: exact (exhaustive inner product; see :mod:`zsbir_infer.gallery.search` for the numkong fp16
kernel and the exact rescoring that makes scores exact), approximate (usearch HNSW, candidates rescored
exactly) and, for ITQ storage, exhaustive Hamming. Ties: higher score first, then smaller id.

Typical use (``zsbir index`` fills a gallery from a photo folder incrementally; a library user can also add
embeddings of their own)::

    from zsbir_infer.gallery import Gallery, FileRecord

    with Gallery.create("photos.gallery", fingerprint=encoder.fingerprint, dim=64) as g:   # storage="float16"
        ids = g.add([FileRecord("a.jpg", size, mtime_ns, sha256), ...], vectors)        # L2-normalized (n, 64)
        g.delete(["old.jpg"])
        hits = g.search(sketch_embeddings, k=10, fingerprint=encoder.fingerprint)
        hits[0][0].path, hits[0][0].score, hits[0][0].id
        g.build_index()      # save the ANN index (searches never build or save it)
        g.stats(); g.verify(); g.compact()

The public methods are :data:`~zsbir_infer.gallery.store.PUBLIC_API`, the same on :class:`Gallery` and
:class:`ShardedGallery`; the indexers, the retriever, ``zsbir serve`` and Triton also use the internal
interface listed in :class:`Gallery`'s docstring (leading underscores: planning, skips, source, identity).
"""

from __future__ import annotations

from zsbir_infer.gallery.shards import ShardedGallery, merge_shards, open_gallery
from zsbir_infer.gallery.store import (
    FORMAT,
    FORMAT_VERSION,
    STORAGES,
    FileRecord,
    FileStat,
    Gallery,
    GalleryError,
    GalleryStats,
    Hit,
    ModelMismatchError,
    Plan,
    SegmentDamagedError,
    display_path,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGES",
    "FileRecord",
    "FileStat",
    "Gallery",
    "GalleryError",
    "GalleryStats",
    "Hit",
    "ModelMismatchError",
    "Plan",
    "SegmentDamagedError",
    "ShardedGallery",
    "display_path",
    "merge_shards",
    "open_gallery",
]
