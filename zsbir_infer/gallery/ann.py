"""Approximate nearest-neighbour index (usearch HNSW) kept beside a gallery's segments.

The index lives in the gallery directory as ``ann.usearch`` plus ``ann.json``, which records what it
covers: the gallery's format, storage, dimension, how many rows (ids ``0 .. rows - 1``) were offered to it
and how many of those were dead at that time. :meth:`AnnIndex.sync` brings a loaded index up to date
incrementally (adds the rows appended since, removes the keys of rows that died since) and the gallery
saves the result with temp file + rename, so a stale or half-written index is never trusted: a file whose
description does not match is rebuilt from the segments.

The index is written only by writers: :meth:`Gallery.build_index` (run by ``zsbir index`` at the end of a run
once the gallery holds :data:`ANN_MIN_ROWS` photos, or whenever it already has an index) and
:meth:`Gallery.compact`. A search only loads it, bringing it up to date in memory; it never saves it.

usearch keys are the gallery's row ids. Scores reported to users are not usearch's distances: the
gallery rescores the candidates exactly against the stored vectors (see ``Gallery.search``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zsbir_infer.fsio import atomic_path, atomic_write_json

__all__ = ["ANN_FILE", "ANN_META", "ANN_MIN_ROWS", "AnnIndex", "builds_ann"]

#: The exact/ANN policy, in one place. ``zsbir index`` (and :meth:`Gallery.compact`) build and save the HNSW
#: index of a float16/int8 gallery that holds at least this many live photos, or that already has one;
#: searches use the saved index when there is one and are exhaustive otherwise (below this size the
#: exhaustive search is fast, and exact).
ANN_MIN_ROWS = 250_000


def builds_ann(live: int, has_index: bool, min_rows: int | None = None) -> bool:
    """Whether a writer should build (or update) and save the ANN index of a gallery of ``live`` photos.

    Args:
        live: live photos in the gallery.
        has_index: whether the gallery already has a saved ANN index (then it is kept up to date).
        min_rows: the threshold (default :data:`ANN_MIN_ROWS`, read at call time); 0 never builds.
    """
    threshold = ANN_MIN_ROWS if min_rows is None else int(min_rows)
    if threshold <= 0:
        return False
    return has_index or live >= threshold


ANN_FILE = "ann.usearch"
ANN_META = "ann.json"
_ANN_FORMAT = "zsbir-gallery-ann"
_ANN_VERSION = 1


class AnnIndex:
    """A usearch inner-product index over a gallery's float rows.

    Args:
        directory: the gallery directory.
        dim: vector dimension.
        identity: what must match for a saved index to be reused (format, storage, ...).
        connectivity, expansion_add, expansion_search: HNSW parameters (usearch defaults when None).
    """

    def __init__(
        self,
        directory: Path,
        dim: int,
        identity: dict[str, Any],
        connectivity: int | None = None,
        expansion_add: int | None = None,
        expansion_search: int | None = None,
    ) -> None:
        self.directory = directory
        self.dim = dim
        self.identity = {"format": _ANN_FORMAT, "version": _ANN_VERSION, "dim": dim, **identity}
        self.connectivity = connectivity
        self.expansion_add = expansion_add
        self.expansion_search = expansion_search
        self.rows = 0
        self.dead_covered = 0
        self._index: Any = None

    def _new_index(self) -> Any:
        from usearch.index import Index

        return Index(
            ndim=self.dim,
            metric="ip",
            dtype="f16",
            connectivity=self.connectivity,
            expansion_add=self.expansion_add,
            expansion_search=self.expansion_search,
        )

    def describe(self) -> dict[str, int] | None:
        """What the saved index covers (``rows``, ``dead_covered``, ``size``) without loading it; None if unusable."""
        meta_path = self.directory / ANN_META
        if not (meta_path.exists() and (self.directory / ANN_FILE).exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("identity") != self.identity:
                return None
            return {"rows": int(meta["rows"]), "dead_covered": int(meta["dead_covered"]), "size": int(meta["size"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self) -> bool:
        """Load the saved index if its description matches; False (and an empty index) otherwise."""
        meta_path = self.directory / ANN_META
        data_path = self.directory / ANN_FILE
        self._index = None
        self.rows = 0
        self.dead_covered = 0
        if not (meta_path.exists() and data_path.exists()):
            return False
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(meta, dict) or meta.get("identity") != self.identity:
            return False
        index = self._new_index()
        try:
            index.load(str(data_path))
        except Exception:  # a damaged or foreign file: rebuild from the segments
            return False
        if len(index) != int(meta.get("size", -1)):
            return False
        self._index = index
        self.rows = int(meta["rows"])
        self.dead_covered = int(meta["dead_covered"])
        if self.expansion_search is not None:
            index.expansion_search = self.expansion_search
        return True

    def sync(
        self,
        total_rows: int,
        dead: np.ndarray,
        read_rows: Callable[[int, int], np.ndarray],
        batch: int = 65536,
    ) -> bool:
        """Bring the index up to date with the gallery; returns True when it changed.

        Args:
            total_rows: committed rows in the gallery.
            dead: (total_rows,) bool tombstones.
            read_rows: returns float rows ``[start, stop)`` as (n, dim) float16/float32.
            batch: rows added per usearch call.
        """
        changed = False
        if self._index is None or self.rows > total_rows:
            self._index = self._new_index()
            self.rows = 0
            self.dead_covered = 0
            changed = True
        dead_now = int(np.count_nonzero(dead[: self.rows]))
        if dead_now != self.dead_covered:
            keys = np.flatnonzero(dead[: self.rows]).astype(np.uint64)
            if keys.size:
                self._index.remove(keys)
            self.dead_covered = dead_now
            changed = True
        for start in range(self.rows, total_rows, batch):
            stop = min(total_rows, start + batch)
            live = np.flatnonzero(~dead[start:stop])
            if live.size:
                vecs = np.ascontiguousarray(read_rows(start, stop)[live])
                self._index.add((live + start).astype(np.uint64), vecs)
            self.dead_covered += int(stop - start - live.size)
            self.rows = stop
            changed = True
        return changed

    def save(self) -> None:
        """Write ``ann.usearch`` and ``ann.json`` (each through a temp file and a rename)."""
        if self._index is None:
            raise RuntimeError("no index to save")
        data_path = self.directory / ANN_FILE
        with atomic_path(data_path) as tmp:
            self._index.save(str(tmp))
            # Invalidate the old description first: a crash between the two renames leaves an index whose
            # description does not match, which is rebuilt, never trusted.
            (self.directory / ANN_META).unlink(missing_ok=True)
        atomic_write_json(
            self.directory / ANN_META,
            {
                "identity": self.identity,
                "rows": self.rows,
                "dead_covered": self.dead_covered,
                "size": len(self._index),
            },
        )

    @property
    def loaded(self) -> bool:
        """Whether there is an index in memory (loaded from the gallery, or built by :meth:`sync`)."""
        return self._index is not None

    @property
    def size(self) -> int:
        """Vectors in the index."""
        return 0 if self._index is None else len(self._index)

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> list[np.ndarray]:
        """Candidate keys per query (at most ``k`` each, possibly fewer)."""
        if self._index is None or len(self._index) == 0:
            return [np.empty(0, dtype=np.int64) for _ in range(queries.shape[0])]
        m = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k, threads=threads)
        keys = np.atleast_2d(np.asarray(m.keys))
        if hasattr(m, "counts"):
            counts = np.atleast_1d(np.asarray(m.counts))
        else:  # a single query comes back as one Matches object
            counts = np.array([keys.shape[1]])
        out: list[np.ndarray] = []
        for i in range(keys.shape[0]):
            out.append(keys[i, : int(counts[i])].astype(np.int64))
        return out

    @staticmethod
    def files() -> Sequence[str]:
        """Names of the files this index keeps in the gallery directory."""
        return (ANN_FILE, ANN_META)
