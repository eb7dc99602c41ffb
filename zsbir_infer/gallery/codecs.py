"""One codec per gallery storage kind: how vectors are encoded into segment files, decoded, laid out on disk
and scored. The store (:mod:`zsbir_infer.gallery.store`) holds no per-storage branches; it asks its codec.

=========  ==========================================  ===========================  ==================
storage    files per segment (suffix: dtype, row shape)  decoded rows (``vectors``)  scorer
=========  ==========================================  ===========================  ==================
float16    ``f16``: float16 (dim,)                     float32                      inner product
int8       ``i8``: int8 (dim,), ``scale``: float32 ()  float32 (rows x scale)       inner product
itq        ``itq``: uint8 (ceil(n_bits / 8),)          packed uint8 codes           Hamming
=========  ==========================================  ===========================  ==================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zsbir_infer.gallery.search import F16Scorer, HammingScorer, Int8Scorer, Scorer

__all__ = ["Codec", "Float16Codec", "Int8Codec", "ItqCodec", "Part", "make_codec"]

#: (file suffix, dtype, shape of one row) of one per-row array of a segment; the first is the main one.
Part = tuple[str, np.dtype[Any], tuple[int, ...]]


class Codec:
    """The interface (and the float16 behaviour shared by the vector codecs)."""

    storage = ""
    #: ``"ip"`` (inner product of L2-normalized vectors) or ``"hamming"``.
    metric = "ip"
    #: True when the gallery can have an ANN index (vector storages); ITQ searches are exhaustive.
    ann = True
    #: True when the decoded rows are unit vectors (checked by ``Gallery.verify``).
    unit_rows = True
    #: dtype of the rows :meth:`decode` returns.
    decoded_dtype: np.dtype[Any] = np.dtype(np.float32)
    parts: tuple[Part, ...] = ()

    def encode(self, vectors: np.ndarray) -> tuple[list[np.ndarray], float]:
        """The stored arrays of a batch of float32 unit vectors, and the largest stored row norm."""
        raise NotImplementedError

    def stored_max_norm(self, parts: list[np.ndarray]) -> float:
        """The largest row norm of stored arrays (as :meth:`encode` returned them)."""
        rows = self.decode(parts[0], parts[1] if len(parts) > 1 else None)
        return float(np.linalg.norm(rows, axis=1).max(initial=0.0))

    def decode(self, rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """Stored rows (and per-row scales) as :attr:`decoded_dtype` rows."""
        return np.asarray(rows, dtype=np.float32)

    def scorer(self, queries: np.ndarray) -> Scorer:
        """The exhaustive scorer of float32 unit queries against stored blocks."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Values per decoded row (``dim``, or the code bytes of ITQ)."""
        return int(self.parts[0][2][0])


class Float16Codec(Codec):
    storage = "float16"

    def __init__(self, dim: int) -> None:
        self.parts = (("f16", np.dtype(np.float16), (int(dim),)),)

    def encode(self, vectors: np.ndarray) -> tuple[list[np.ndarray], float]:
        v16 = vectors.astype(np.float16)
        return [v16], float(np.linalg.norm(v16.astype(np.float32), axis=1).max(initial=0.0))

    def scorer(self, queries: np.ndarray) -> Scorer:
        return F16Scorer(queries)


class Int8Codec(Codec):
    storage = "int8"

    def __init__(self, dim: int) -> None:
        self.parts = (("i8", np.dtype(np.int8), (int(dim),)), ("scale", np.dtype(np.float32), ()))

    def encode(self, vectors: np.ndarray) -> tuple[list[np.ndarray], float]:
        amax = np.abs(vectors).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
        deq = q.astype(np.float32) * scale[:, None]
        return [q, scale], float(np.linalg.norm(deq, axis=1).max(initial=0.0))

    def decode(self, rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        out = np.asarray(rows, dtype=np.float32)
        return out * np.asarray(scale)[:, None] if scale is not None else out

    def scorer(self, queries: np.ndarray) -> Scorer:
        return Int8Scorer(queries)


class ItqCodec(Codec):
    storage = "itq"
    metric = "hamming"
    ann = False
    unit_rows = False
    decoded_dtype = np.dtype(np.uint8)

    def __init__(self, itq: Any) -> None:
        self.itq = itq
        self.n_bits = int(itq.n_bits)
        self.parts = (("itq", np.dtype(np.uint8), ((self.n_bits + 7) // 8,)),)

    def encode(self, vectors: np.ndarray) -> tuple[list[np.ndarray], float]:
        return [np.ascontiguousarray(self.itq.transform(vectors), dtype=np.uint8)], float(self.n_bits)

    def stored_max_norm(self, parts: list[np.ndarray]) -> float:
        return float(self.n_bits)

    def decode(self, rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        return np.asarray(rows, dtype=np.uint8)

    def scorer(self, queries: np.ndarray) -> Scorer:
        return HammingScorer(self.itq.transform(queries), self.n_bits)


def make_codec(storage: str, dim: int, itq: Any = None) -> Codec:
    """The codec of a storage kind (``itq`` needs the fitted ITQ model)."""
    if storage == "float16":
        return Float16Codec(dim)
    if storage == "int8":
        return Int8Codec(dim)
    if storage == "itq":
        return ItqCodec(itq)
    raise ValueError(f"unknown storage {storage!r}")
