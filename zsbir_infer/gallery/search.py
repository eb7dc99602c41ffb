"""Exhaustive top-k search kernels over row blocks (CPU, numpy + numkong).

Everything here works on plain arrays; :mod:`zsbir_infer.gallery.store` feeds it the memory-mapped
segments of a gallery. Results follow one tie rule everywhere: higher score first, then smaller id.

How a search runs. Rows are scored block by block with a fast, slightly approximate kernel; every
row whose fast score could still reach the current top-k (fast score > k-th best - error bound) is
rescored exactly in float64 against the float32 query, and only exact scores enter the top-k lists.
So the reported scores are exact dot products of the query with the *stored* vectors (fp16 or
dequantized int8), rounded once to float32, and the ranking is the exact ranking under the tie rule,
whatever the kernel's rounding.

Fast kernels per storage kind:

* ``float16``: numkong's packed fp16 GEMM (``dots_pack`` of the fp16-rounded queries, ``dots_packed``
  of a block of gallery rows), which reads the fp16 rows directly (half the bytes of fp32) with fp32
  accumulation. Error bound per query: ``||q - fp16(q)|| * R + 1e-4 * R * ||q||`` (R bounds the row
  norms). Without numkong, blocks are converted to fp32 and scored with BLAS.
* ``int8``: per-vector scaled int8 rows against the query quantized to int8 (numkong int8 GEMM, exact int32
  sums), times both scales; error bound ``||q - deq(q)|| * R``.
* Hamming over packed binary codes (ITQ): ``score = n_bits - 2 * hamming`` (the dot product of the
  ±1 codes) so that "higher is better" holds here too; these scores are exact integers.

Top-k selection never sorts or partitions whole score arrays when it can avoid it: each worker keeps
a running top-k per query, keeps only the entries of a block that beat the current k-th best (one
comparison pass; the nonzero scan reads the mask as 64-bit words), and merges those few with a
lexicographic sort. Blocks grow geometrically so that the thresholds tighten after a few thousand
rows. Row ranges are split between threads (numkong and BLAS release the GIL) and the per-thread
lists are merged at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from zsbir_infer.threads import usable_cpus

__all__ = [
    "ID_SENTINEL",
    "Block",
    "F16Scorer",
    "HammingScorer",
    "Int8Scorer",
    "Scorer",
    "TopK",
    "default_threads",
    "hamming_scores",
    "reference_topk",
    "search_blocks",
]

ID_SENTINEL = np.iinfo(np.int64).max
# Below this many rows per thread, extra threads cost more than they save.
MIN_ROWS_PER_THREAD = 32768


@dataclass(frozen=True)
class Block:
    """A run of gallery rows with consecutive ids.

    Attributes:
        base: id of the first row.
        data: the stored rows: (n, D) float16 / float32 / int8, or (n, B) uint8 packed codes.
        scale: (n,) float32 per-row scales (int8 storage), else None.
        dead: (n,) bool, True for rows that must never be returned (tombstones), or None.
        norm_bound: an upper bound of the rows' L2 norms (after dequantization); used for error bounds.
    """

    base: int
    data: np.ndarray
    scale: np.ndarray | None = None
    dead: np.ndarray | None = None
    norm_bound: float = 1.0

    @property
    def rows(self) -> int:
        """Number of rows in the block."""
        return int(self.data.shape[0])


class Scorer(Protocol):
    """Scores gallery rows against a fixed set of Q queries."""

    n_queries: int

    def score(self, block: Block, start: int, stop: int) -> np.ndarray:
        """Fast scores (stop - start, Q) float32 of rows ``start:stop`` of ``block``."""
        ...

    def margin(self, block: Block) -> np.ndarray | None:
        """Per-query bound (Q,) on |fast - exact| for this block, or None when fast scores are exact."""
        ...

    def rescore(self, block: Block, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact float32 scores of (row of ``block``, query index) pairs."""
        ...


def default_threads() -> int:
    """Worker threads for one search: the CPUs available to this process (at least 1)."""
    return usable_cpus()


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or threads > _POOL_SIZE:
            _POOL_SIZE = max(threads, default_threads())
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="zsbir-search")
        return _POOL


def _nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a C-contiguous 2-D bool mask, fast when few entries are set."""
    q = mask.shape[1]
    flat = np.ascontiguousarray(mask).reshape(-1).view(np.uint8)
    m = flat.size // 8 * 8
    words = np.flatnonzero(flat[:m].view(np.uint64))
    wi, bi = np.nonzero(flat[:m].reshape(-1, 8)[words])
    idx = words[wi] * 8 + bi
    if m < flat.size:
        idx = np.concatenate([idx, np.flatnonzero(flat[m:]) + m])
    return idx // q, idx % q


class TopK:
    """Running top-k per query under the rule "higher score first, then smaller id".

    ``scores`` (Q, k) float32 sorted best first, padded with -inf; ``ids`` (Q, k) int64 padded with
    ``ID_SENTINEL``.
    """

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.q = n_queries
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n_queries, k), ID_SENTINEL, dtype=np.int64)

    def push_block(self, scorer: Scorer, block: Block, start: int, stop: int) -> None:
        """Score rows ``start:stop`` of ``block`` and merge the ones that can enter the lists."""
        scores = scorer.score(block, start, stop)
        n = scores.shape[0]
        if n == 0:
            return
        dead = None if block.dead is None else block.dead[start:stop]
        if dead is not None and dead.any():
            scores = np.array(scores, dtype=np.float32, copy=True)
            scores[dead] = -np.inf
        else:
            dead = None
        eps = scorer.margin(block)
        thr = self.scores[:, -1]
        # Exact scores: strict ">" (a later row tied with the k-th best has a larger id and loses).
        # Fast scores: anything within the error bound of the k-th best might beat it once rescored.
        mask = scores > (thr if eps is None else thr - eps)
        budget = 8 * self.k * self.q + 1024
        if n > self.k and int(np.count_nonzero(mask)) > budget:
            # Too many candidates (first block, or adversarial order): cut at the block's own k-th best,
            # keeping every row tied with it (within the error bound) so that the merge decides ties.
            kth = -np.partition(-scores, self.k - 1, axis=0)[self.k - 1]
            mask &= scores >= (kth if eps is None else kth - 2 * eps)
        if dead is not None:
            mask[dead] = False
        rows, cols = _nonzero2d(mask)
        if rows.size == 0:
            return
        vals = scores[rows, cols] if eps is None else scorer.rescore(block, rows + start, cols)
        self.merge(cols, vals, rows.astype(np.int64) + (block.base + start))

    def merge(self, qidx: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge candidate triples (query index, score, id) into the running lists."""
        k, q = self.k, self.q
        new_q = qidx.astype(np.int64, copy=False)
        all_q = np.concatenate([np.repeat(np.arange(q), k), new_q])
        all_s = np.concatenate([self.scores.ravel(), scores.astype(np.float32, copy=False)])
        all_i = np.concatenate([self.ids.ravel(), ids.astype(np.int64, copy=False)])
        order = np.lexsort((all_i, -all_s, all_q))
        counts = k + np.bincount(new_q, minlength=q)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        take = order[starts[:, None] + np.arange(k)[None, :]]
        self.scores = all_s[take]
        self.ids = all_i[take]

    def merge_from(self, other: TopK) -> None:
        """Merge another running list (same Q and k) into this one."""
        self.merge(np.repeat(np.arange(other.q), other.k), other.scores.ravel(), other.ids.ravel())


def _numkong_available() -> bool:
    try:
        import numkong  # noqa: F401
    except ImportError:  # pragma: no cover - numkong comes with usearch
        return False
    return True


def _exact_dots(rows: np.ndarray, queries: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 row-wise dot products of ``rows[i]`` and ``queries[cols[i]]``, rounded to float32."""
    return np.einsum("ij,ij->i", rows.astype(np.float64), queries[cols]).astype(np.float32)


class F16Scorer:
    """Float16 (or float32) rows against float32 queries: numkong fp16 GEMM + exact rescoring."""

    def __init__(self, queries: np.ndarray) -> None:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        self.n_queries = int(q.shape[0])
        self.q64 = q.astype(np.float64)
        qnorm = np.linalg.norm(self.q64, axis=1)
        self._packed: Any = None
        if _numkong_available():
            import numkong as nk

            hi = q.astype(np.float16)
            self._packed = nk.dots_pack(np.ascontiguousarray(hi), dtype="f16")
            self._err = np.linalg.norm(self.q64 - hi.astype(np.float64), axis=1) + 1e-4 * qnorm
        else:
            self._err = 1e-4 * qnorm
        self._qt = np.ascontiguousarray(q.T)

    def score(self, block: Block, start: int, stop: int) -> np.ndarray:
        """Fast scores of rows ``start:stop``."""
        rows = block.data[start:stop]
        if self._packed is not None and rows.dtype == np.float16:
            import numkong as nk

            return np.asarray(nk.dots_packed(rows, self._packed))
        return rows.astype(np.float32, copy=False) @ self._qt

    def margin(self, block: Block) -> np.ndarray | None:
        """Error bound of :meth:`score` for this block."""
        return (self._err * block.norm_bound + 1e-6).astype(np.float32)

    def rescore(self, block: Block, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact scores of (row, query) pairs."""
        return _exact_dots(block.data[rows], self.q64, cols)


class Int8Scorer:
    """int8 rows with per-row scales against float32 queries: int8 GEMM + exact rescoring.

    The fast pass quantizes each query to int8 with its own scale and runs numkong's int8 GEMM (int32
    accumulation, exact), so its only error is the query's quantization: ``|fast - exact| <=
    ||q - deq(q)|| * R``. Without numkong it converts blocks to float32 and uses BLAS.
    """

    def __init__(self, queries: np.ndarray) -> None:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        self.n_queries = int(q.shape[0])
        self.q64 = q.astype(np.float64)
        self._qt = np.ascontiguousarray(q.T)
        self._packed: Any = None
        qnorm = np.linalg.norm(self.q64, axis=1)
        if _numkong_available():
            import numkong as nk

            amax = np.abs(q).max(axis=1)
            self._qscale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            qi8 = np.clip(np.rint(q / self._qscale[:, None]), -127, 127).astype(np.int8)
            self._packed = nk.dots_pack(np.ascontiguousarray(qi8), dtype="int8")
            deq = qi8.astype(np.float64) * self._qscale[:, None].astype(np.float64)
            self._err = np.linalg.norm(self.q64 - deq, axis=1) + 1e-5 * qnorm
        else:
            self._err = 1e-4 * qnorm

    def score(self, block: Block, start: int, stop: int) -> np.ndarray:
        """Fast scores of rows ``start:stop``."""
        if block.scale is None:
            raise ValueError("int8 blocks need per-row scales")
        rows = block.data[start:stop]
        if self._packed is not None:
            import numkong as nk

            s = np.asarray(nk.dots_packed(rows, self._packed)).astype(np.float32)
            s *= self._qscale[None, :]
        else:
            s = rows.astype(np.float32) @ self._qt
        s *= block.scale[start:stop, None]
        return s

    def margin(self, block: Block) -> np.ndarray | None:
        """Error bound of :meth:`score` for this block."""
        return (self._err * block.norm_bound + 1e-6).astype(np.float32)

    def rescore(self, block: Block, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact scores of (row, query) pairs (dequantized rows)."""
        assert block.scale is not None
        deq = block.data[rows].astype(np.float64) * block.scale[rows, None].astype(np.float64)
        return _exact_dots(deq, self.q64, cols)


def hamming_scores(codes: np.ndarray, query_codes: np.ndarray, n_bits: int) -> np.ndarray:
    """``n_bits - 2 * hamming`` as float32 (n, Q) between packed codes (n, B) and query codes (Q, B)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    qc = np.ascontiguousarray(query_codes, dtype=np.uint8)
    cw: np.ndarray = codes
    qw: np.ndarray = qc
    if codes.shape[1] % 8 == 0:  # whole 64-bit words (the usual 64-bit ITQ codes: one word)
        cw, qw = codes.view(np.uint64), qc.view(np.uint64)
    if hasattr(np, "bitwise_count"):
        counts = [np.bitwise_count(np.bitwise_xor(cw[:, w : w + 1], qw[None, :, w])) for w in range(cw.shape[1])]
    else:  # pragma: no cover - numpy < 2
        counts = [_POP8[np.bitwise_xor(cw[:, w : w + 1], qw[None, :, w]).view(np.uint8)] for w in range(cw.shape[1])]
        counts = [c.reshape(codes.shape[0], qc.shape[0], -1).sum(axis=-1, dtype=np.int32) for c in counts]
    d = counts[0] if len(counts) == 1 else np.sum(counts, axis=0, dtype=np.int32)
    out: np.ndarray = np.asarray(d, dtype=np.float32)
    out *= -2
    out += n_bits
    return out


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class HammingScorer:
    """Packed binary codes against packed query codes; scores are exact (``n_bits - 2 * hamming``)."""

    def __init__(self, query_codes: np.ndarray, n_bits: int) -> None:
        self.qc = np.ascontiguousarray(query_codes, dtype=np.uint8)
        self.n_queries = int(self.qc.shape[0])
        self.n_bits = int(n_bits)

    def score(self, block: Block, start: int, stop: int) -> np.ndarray:
        """Scores of rows ``start:stop``."""
        return hamming_scores(block.data[start:stop], self.qc, self.n_bits)

    def margin(self, block: Block) -> np.ndarray | None:
        """Hamming scores are exact."""
        return None

    def rescore(self, block: Block, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact scores of (row, query) pairs."""
        return hamming_scores(block.data[rows], self.qc, self.n_bits)[np.arange(rows.size), cols]


def _chunks(rows: int, n_queries: int) -> list[tuple[int, int]]:
    """Split ``rows`` into geometrically growing chunks (small first ones seed the thresholds)."""
    cap = max(4096, min(65536, (1 << 20) // max(1, n_queries)))
    out: list[tuple[int, int]] = []
    start, size = 0, min(2048, cap)
    while start < rows:
        stop = min(rows, start + size)
        out.append((start, stop))
        start = stop
        size = min(cap, size * 4)
    return out


def _run_worker(tasks: Sequence[tuple[Block, int, int]], scorer: Scorer, k: int) -> TopK:
    top = TopK(scorer.n_queries, k)
    for block, lo, hi in tasks:
        for s, e in _chunks(hi - lo, scorer.n_queries):
            top.push_block(scorer, block, lo + s, lo + e)
    return top


def search_blocks(
    blocks: Sequence[Block], scorer: Scorer, k: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive top-k over ``blocks``.

    Args:
        blocks: the row blocks (ids must not overlap).
        scorer: scores rows against the Q queries (:class:`F16Scorer`, :class:`Int8Scorer`, ...).
        k: results per query (>= 1).
        threads: worker threads (default: all available CPUs); small inputs run on the caller's thread.

    Returns:
        (scores (Q, k) float32, ids (Q, k) int64), best first; missing entries (fewer than k live
        rows) have score -inf and id ``ID_SENTINEL``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if scorer.n_queries == 0:
        return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
    total = sum(b.rows for b in blocks)
    nthreads = default_threads() if threads is None else max(1, int(threads))
    nthreads = min(nthreads, max(1, total // MIN_ROWS_PER_THREAD))
    # Split the row space into nthreads contiguous parts of about equal size.
    parts: list[list[tuple[Block, int, int]]] = [[] for _ in range(nthreads)]
    per = -(-total // nthreads) if total else 0
    pos = 0
    for b in blocks:
        s = 0
        while s < b.rows:
            w = min(nthreads - 1, pos // per) if per else 0
            room = (w + 1) * per - pos
            e = min(b.rows, s + max(1, room))
            parts[w].append((b, s, e))
            pos += e - s
            s = e
    if nthreads == 1:
        top = _run_worker(parts[0], scorer, k)
    else:
        pool = _pool(nthreads)
        futures = [pool.submit(_run_worker, p, scorer, k) for p in parts if p]
        results = [f.result() for f in futures]
        top = results[0]
        for other in results[1:]:
            top.merge_from(other)
    return top.scores, top.ids


def reference_topk(vectors: np.ndarray, queries: np.ndarray, k: int, dead: np.ndarray | None = None) -> np.ndarray:
    """Float64 brute force (for tests and checks): ids (Q, min(k, live)) under the tie rule."""
    s = (np.asarray(queries, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T).astype(np.float32)
    ids = np.arange(s.shape[1])
    out = []
    for row in s:
        keep = ids if dead is None else ids[~dead]
        order = np.lexsort((keep, -row[keep]))
        out.append(keep[order[:k]])
    return np.array(out, dtype=np.int64)
