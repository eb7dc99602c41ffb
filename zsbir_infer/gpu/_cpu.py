"""CPU implementations of the fused top-k searches, with the same results contract as the CUDA kernels.

Both functions process the gallery in chunks (memory stays bounded) and keep a running best-k per query.
The tie rule is the kernels': equal scores (or distances) are ordered by the smaller gallery index. It
follows from a *stable* sort over ``[running best-k, chunk]``: the running best-k is already ordered by
the rule and holds only indices smaller than the chunk's, and the chunk is in index order.

Inner products are float32 sums of the float16 (or int8) values converted exactly to float32; int8
galleries multiply the sum by the row's float32 scale afterwards. NaN scores rank like ``-inf``.
"""

from __future__ import annotations

import numpy as np

PAD_INDEX = -1
PAD_SCORE = float("-inf")
PAD_DISTANCE = np.iinfo(np.int32).max

# Elements of the [Q, chunk] score block (or [Q, chunk, words] XOR block) per step.
_BLOCK_ELEMENTS = 1 << 22


def _popcount_sum(x: np.ndarray) -> np.ndarray:
    """Sum of set bits over the last axis of a uint64 array, as int32."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    bits = np.unpackbits(x.view(np.uint8), axis=-1)  # pragma: no cover - numpy 1.x
    return bits.sum(axis=-1, dtype=np.int32)  # pragma: no cover


def _chunk_rows(num_queries: int, per_row: int, k: int) -> int:
    return max(4 * k, 256, _BLOCK_ELEMENTS // max(1, num_queries * per_row))


def _pad(values: np.ndarray, indices: np.ndarray, k: int, fill: float | int) -> tuple[np.ndarray, np.ndarray]:
    q, have = indices.shape
    if have >= k:
        return values[:, :k], indices[:, :k]
    out_v = np.full((q, k), fill, dtype=values.dtype)
    out_i = np.full((q, k), PAD_INDEX, dtype=np.int64)
    out_v[:, :have] = values
    out_i[:, :have] = indices
    return out_v, out_i


def topk_ip_cpu(
    queries: np.ndarray, gallery: np.ndarray, k: int, scales: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` gallery rows by inner product for each query (float16/int8 inputs, already validated).

    Args:
        queries: ``[Q, D]`` float16.
        gallery: ``[N, D]`` float16, or int8 together with ``scales``.
        k: number of results per query (>= 1).
        scales: ``[N]`` float32 per-row scales for an int8 gallery, else None.

    Returns:
        ``(scores float32 [Q, k], indices int64 [Q, k])``, best first; slots past N hold ``-inf`` / ``-1``.
    """
    nq, _ = queries.shape
    n = gallery.shape[0]
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    step = _chunk_rows(nq, 1, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        g32 = np.asarray(gallery[start:stop], dtype=np.float32)
        s = q32 @ g32.T
        if scales is not None:
            s *= np.asarray(scales[start:stop], dtype=np.float32)[None, :]
        s[np.isnan(s)] = -np.inf
        idx = np.broadcast_to(np.arange(start, stop, dtype=np.int64), s.shape)
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, idx], axis=1)
        order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cat_s, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
    scores, indices = _pad(best_s, best_i, k, PAD_SCORE)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(indices, dtype=np.int64)


def hamming_topk_cpu(query_codes: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` codes by Hamming distance (smallest first) for each query code (validated uint8 inputs).

    Args:
        query_codes: ``[Q, B]`` uint8 packed bits, B a multiple of 8.
        codes: ``[N, B]`` uint8.
        k: number of results per query (>= 1).

    Returns:
        ``(distances int32 [Q, k], indices int64 [Q, k])``; slots past N hold ``INT32_MAX`` / ``-1``.
    """
    nq, nbytes = query_codes.shape
    n = codes.shape[0]
    words = nbytes // 8
    q64 = np.ascontiguousarray(query_codes).view(np.uint64).reshape(nq, words)
    c64 = np.ascontiguousarray(codes).view(np.uint64).reshape(n, words)
    best_d = np.empty((nq, 0), dtype=np.int32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    step = _chunk_rows(nq, words, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = np.bitwise_xor(q64[:, None, :], c64[None, start:stop, :])
        dist = _popcount_sum(x)
        idx = np.broadcast_to(np.arange(start, stop, dtype=np.int64), dist.shape)
        cat_d = np.concatenate([best_d, dist], axis=1)
        cat_i = np.concatenate([best_i, idx], axis=1)
        order = np.argsort(cat_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(cat_d, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
    dist_out, indices = _pad(best_d, best_i, k, PAD_DISTANCE)
    return np.ascontiguousarray(dist_out, dtype=np.int32), np.ascontiguousarray(indices, dtype=np.int64)
