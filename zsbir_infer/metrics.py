"""Retrieval metrics for zero-shot sketch-based image retrieval: mAP@all, mAP@200, P@100, P@200.

Every query is ranked against the whole gallery; a gallery item is *relevant* to a query when their
labels are equal. Two protocols reproduce the evaluation code used by published ZS-SBIR work:

``protocol="sake"`` -- SAKE (github.com/qliu24/SAKE, ``src/test_cse_resnet_tuberlin_zeroshot.py``:
``eval_AP_inner``, ``VOCap``, ``eval_precision``) and DSN (github.com/haowang1992/DSN, same file
names, same functions), for a query with ``n`` relevant items in a gallery of ``G``:

* **AP (mAP@all)**: VOC-style interpolated average precision over the full ranking. With the
  relevant items at (1-based) ranks ``r_1 < … < r_n``, precision at the k-th hit is
  ``p_k = k / r_k``; the interpolated precision is ``p̂_k = max_{j >= k} p_j``; AP is
  ``(1 / n) Σ_k p̂_k`` (``VOCap`` sums recall steps of ``1/n`` times the interpolated precision).
* **AP@200 (mAP@200)**: the same computed on the top ``t = min(200, G)`` items only, divided by
  ``min(t, n)`` instead of ``n`` (``eval_AP_inner(..., top=200)``): ``(1 / min(t, n)) Σ_{k: r_k <= t}
  p̂ᵗ_k`` where ``p̂ᵗ`` takes its maximum over hits inside the top ``t`` only. (Their test scripts
  print mAP@all and P@100; the @200 figures come from the same functions' ``top`` arguments.)
* **P@K**: hits in the top ``min(K, G)`` divided by ``min(K, G)`` (``eval_precision(..., top=K)``).
* A query with no relevant item: AP and AP@200 are NaN (their code raises on 0/0 and returns NaN),
  P@K is 0. NaN values are left out of the averages (``np.nanmean``), zeros are not.
* ``average="class"`` is DSN's reported figure: the mean over query classes of the per-class mean
  (``np.array([np.nanmean(maps) for maps in mAP_ls]).mean()``); ``average="query"`` is the plain
  mean over queries. A class whose every value is NaN is skipped (their code would fail there).

``protocol="zse"`` -- ZSE-SBIR (github.com/buptLinfy/ZSE-SBIR, ``utils/ap.py``: ``calculate``,
``voc_eval``, ``voc_ap``, ``precision_eval``; driven by ``utils/valid.py``):

* **AP** and **AP@200**: identical definitions to SAKE's (``voc_eval`` with ``top=None`` / ``200``).
* **P@K**: hits in the top ``min(K, n)`` divided by ``min(K, n)`` -- the denominator is the number of
  relevant items when that is smaller than ``K`` (``precision_eval``); NaN when ``n = 0``.
* Averages are ``np.nanmean`` over queries (``average="query"``); ``average="class"`` is offered too.

Ranking and ties. Embeddings are ranked by cosine similarity (both sides are L2-normalized here;
SAKE/DSN rank by negative Euclidean distance of normalized features and ZSE-SBIR by the Euclidean
distance of normalized features, which give the same order). Binary codes (``metric="hamming"``) are
ranked by ascending Hamming distance (DSN ranks its 64-bit ITQ codes by Euclidean distance between
0/1 codes, ``sqrt(hamming)``, the same order). Ties are broken deterministically: equal scores are
ordered by ascending gallery index (a stable sort). The reference code uses ``np.argsort`` with its
default, unstable quicksort/introsort, so their order among tied items is an implementation detail
of numpy; results agree exactly whenever no relevant item ties with an irrelevant one (ties among
relevant items, or among irrelevant ones, never change any metric). Ties are common with Hamming
distances; with float32 scores they are rarer but real (a 50,000-item gallery typically holds a
few exactly equal float32 scores per query).

Numerics: cosine scores are computed in float32 (matrix products in batches of ``batch_size``
queries); metric arithmetic is float64. Only the ranks of the relevant items are needed, so no query's
full ranking is sorted: keys are bucketed into monotone bins, items in lower bins are counted, and
only the items sharing a bin with a relevant item are sorted (stably). Integer keys (Hamming
distances) use a stable radix argsort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from zsbir_infer.itq import hamming_distance, pack_bits
from zsbir_infer.threads import default_threads

__all__ = [
    "METRIC_KEYS",
    "average_precision",
    "evaluate",
    "evaluate_scores",
    "per_query_metrics",
    "positive_ranks",
]

Protocol = Literal["sake", "zse"]
Average = Literal["query", "class"]
Metric = Literal["cosine", "hamming"]
Codes = Literal["auto", "packed", "bits"]

#: Keys of the dictionaries returned by :func:`evaluate` and :func:`evaluate_scores`.
METRIC_KEYS: tuple[str, ...] = ("map_all", "map_200", "p_100", "p_200")

_MAP_TOP = 200
_PREC_KS = (100, 200)


# --------------------------------------------------------------------------- per-query arithmetic


class _RowRanker:
    """Ranks of relevant items in one query's ranking, for float keys, with reusable row buffers.

    Keys are bucketed into ``nb`` bins by ``floor((k - min) * (nb - 1.001) / (max - min))``, which never
    decreases as ``k`` grows (each step is a monotone rounded operation; the 1e-3 margin keeps rounding
    below ``nb``), so an item in a lower bin always ranks before one in a higher bin. The rank of a
    relevant item is the count of items in lower bins plus its place among the items of its own bin,
    found by a stable sort of only the items that share a bin with some relevant item. Work per query
    is a few passes over G values that stay in cache (one buffer set per thread) and a sort of a few
    times ``n`` values. The result equals a stable sort by key, then gallery index.
    """

    def __init__(self, n_gallery: int) -> None:
        self.g = n_gallery
        self.nb = max(1024, n_gallery)
        self.tmp = np.empty(n_gallery, dtype=np.float64)
        self.bins = np.empty(n_gallery, dtype=np.int64)
        self.below = np.empty(self.nb, dtype=np.int64)
        self.hot = np.zeros(self.nb, dtype=bool)
        self.is_pos = np.zeros(n_gallery, dtype=bool)

    def ranks(self, keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Sorted 1-based ranks of gallery indices ``pos`` (non-empty) under float ``keys`` (G,)."""
        lo, hi = keys.min(), keys.max()
        span = float(hi) - float(lo)
        scale = (self.nb - 1.001) / span if span > 0 else 0.0
        if keys.dtype not in (np.float32, np.float64):
            keys = keys.astype(np.float64)
        if not np.isfinite(scale) or scale > 1e300:  # span near the float64 underflow limit
            return _ranks_by_argsort(keys, pos)
        # float32 arithmetic is faster; float64 where (k - min) or the scale could overflow float32.
        use32 = keys.dtype == np.float32 and span < 1e37 and scale < 1e37
        tmp = self.tmp.view(np.float32)[: self.g] if use32 else self.tmp
        np.subtract(keys, lo, out=tmp, dtype=tmp.dtype)  # >= 0, computed in the buffer's precision
        np.multiply(tmp, tmp.dtype.type(scale), out=tmp)
        bins = self.bins
        np.copyto(bins, tmp, casting="unsafe")  # truncation = floor for values >= 0
        counts = np.bincount(bins, minlength=self.nb)
        below = self.below
        np.cumsum(counts, out=below)
        np.subtract(below, counts, out=below)  # items in strictly lower bins

        pb = bins[pos]
        self.hot[pb] = True
        cand = np.flatnonzero(self.hot[bins])  # ascending gallery index
        self.hot[pb] = False
        cand = cand[np.argsort(keys[cand], kind="stable")]  # ranking order
        cb = bins[cand]
        within = np.arange(cand.shape[0]) - np.searchsorted(cb, cb, side="left")
        self.is_pos[pos] = True
        sel = self.is_pos[cand]
        self.is_pos[pos] = False
        return below[cb[sel]] + within[sel] + 1


def _ranks_by_argsort(keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
    # Integer keys (Hamming distances): a stable argsort, a radix sort for 8/16-bit keys.
    order = np.argsort(keys, kind="stable")
    rank_of = np.empty(keys.shape[0], dtype=np.int64)
    rank_of[order] = np.arange(1, keys.shape[0] + 1)
    return np.sort(rank_of[pos])


def positive_ranks(keys: np.ndarray, positives: ArrayLike) -> np.ndarray:
    """1-based ranks, ascending, of the ``positives`` gallery indices in one query's ranking.

    The ranking orders gallery items by ascending ``keys`` (a distance, or a negated similarity),
    equal keys by ascending gallery index.

    Args:
        keys: (G,) ranking keys of one query against the gallery; lower ranks first.
        positives: (n,) distinct gallery indices of the relevant items.
    """
    k = np.asarray(keys)
    pos = np.asarray(positives, dtype=np.int64)
    if k.ndim != 1:
        raise ValueError(f"keys must be 1-D; got shape {k.shape}")
    if pos.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(k.dtype, np.floating):
        return _ranks_by_argsort(k, pos)
    return _RowRanker(k.shape[0]).ranks(k, pos)


def average_precision(ranks: ArrayLike, n_relevant: int, top: int | None = None) -> float:
    """VOC-interpolated average precision from the sorted 1-based ranks of a query's relevant items.

    ``AP = (1 / d) Σ_{k: r_k <= t} max_{j >= k, r_j <= t} (j / r_j)`` with ``t`` = ``top`` (or no cut)
    and ``d = n_relevant`` without a cut or ``min(top, n_relevant)`` with one (SAKE ``eval_AP_inner``;
    the caller passes ``top = min(top, G)``). NaN when ``n_relevant == 0``.
    """
    if n_relevant == 0:
        return float("nan")
    r = np.asarray(ranks, dtype=np.int64)
    denom = n_relevant
    if top is not None:
        r = r[r <= top]
        denom = min(top, n_relevant)
    if r.size == 0:
        return 0.0
    prec = np.arange(1, r.size + 1, dtype=np.float64) / r
    interp = np.maximum.accumulate(prec[::-1])[::-1]
    return float(interp.sum() / denom)


def _query_values(ranks: np.ndarray, n_gallery: int, protocol: Protocol) -> tuple[float, float, float, float]:
    n = int(ranks.size)
    top = min(_MAP_TOP, n_gallery)
    ap_all = average_precision(ranks, n)
    ap_top = average_precision(ranks, n, top=top)
    precs: list[float] = []
    for k in _PREC_KS:
        if protocol == "sake":
            cut = min(k, n_gallery)
        else:  # zse
            if n == 0:
                precs.append(float("nan"))
                continue
            cut = min(k, n)
        precs.append(float(np.count_nonzero(ranks <= cut)) / cut)
    return ap_all, ap_top, precs[0], precs[1]


# --------------------------------------------------------------------------- validation helpers


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _labels(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels; got shape {arr.shape}")
    return arr


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        uniq, inv = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    except TypeError as exc:  # mixed, unorderable label types
        raise ValueError(f"labels must be mutually comparable (e.g. all ints or all strings): {exc}") from exc
    inv = inv.reshape(-1)
    return inv[: query_labels.shape[0]], inv[query_labels.shape[0] :], int(uniq.shape[0])


def _aggregate(values: np.ndarray, query_codes: np.ndarray, average: Average) -> float:
    if average == "query":
        ok = ~np.isnan(values)
        return float(values[ok].mean()) if ok.any() else float("nan")
    class_means = []
    for c in np.unique(query_codes):
        v = values[query_codes == c]
        v = v[~np.isnan(v)]
        if v.size:
            class_means.append(v.mean())
    return float(np.mean(class_means)) if class_means else float("nan")


def _n_threads(n_threads: int | None) -> int:
    if n_threads is None:
        return default_threads(4)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}")
    return n_threads


# --------------------------------------------------------------------------- core driver


def _run(
    key_batches: Iterator[tuple[int, np.ndarray]],
    q_codes: np.ndarray,
    g_codes: np.ndarray,
    n_classes: int,
    n_gallery: int,
    protocol: Protocol,
    n_threads: int,
) -> dict[str, np.ndarray]:
    order = np.argsort(g_codes, kind="stable")
    bounds = np.searchsorted(g_codes[order], np.arange(n_classes + 1))
    positives = [order[bounds[c] : bounds[c + 1]] for c in range(n_classes)]

    nq = q_codes.shape[0]
    out = np.empty((nq, 4), dtype=np.float64)

    def work(start: int, keys: np.ndarray, lo: int, hi: int) -> None:
        floating = np.issubdtype(keys.dtype, np.floating)
        ranker = _RowRanker(n_gallery) if floating else None
        for i in range(lo, hi):
            q = start + i
            pos = positives[q_codes[q]]
            if pos.size == 0:
                ranks = pos
            elif ranker is not None:
                ranks = ranker.ranks(keys[i], pos)
            else:
                ranks = _ranks_by_argsort(keys[i], pos)
            out[q] = _query_values(ranks, n_gallery, protocol)

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for start, keys in key_batches:
            b = keys.shape[0]
            step = -(-b // n_threads)
            futures = [pool.submit(work, start, keys, lo, min(lo + step, b)) for lo in range(0, b, step)]
            for f in futures:
                f.result()
    return {name: out[:, j] for j, name in enumerate(METRIC_KEYS)}


def _summarize(per_query: dict[str, np.ndarray], q_codes: np.ndarray, average: Average) -> dict[str, float]:
    return {k: _aggregate(per_query[k], q_codes, average) for k in METRIC_KEYS}


# --------------------------------------------------------------------------- embeddings / codes


def _float_embeddings(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{name} row {bad} is all zeros: cosine similarity is undefined for it")
    return np.ascontiguousarray(arr / norms)


def _packed_codes(x: object, name: str, codes: Codes) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of binary codes; got shape {arr.shape}")
    mode = codes
    if mode == "auto":
        if arr.dtype == np.uint8:
            mode = "packed"
        elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
            mode = "bits"
        else:
            raise ValueError(f"{name}: binary codes must be packed uint8 or 0/1 integers/bools; got dtype {arr.dtype}")
    if mode == "packed":
        if arr.dtype != np.uint8:
            raise ValueError(f"{name}: packed codes must have dtype uint8; got {arr.dtype}")
        return np.ascontiguousarray(arr)
    try:
        return pack_bits(arr)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _batches(nq: int, batch_size: int, make: Callable[[int, int], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, nq, batch_size):
        yield start, make(start, min(start + batch_size, nq))


def _prepare_labels(
    query_labels: object, gallery_labels: object, nq: int, ng: int
) -> tuple[np.ndarray, np.ndarray, int]:
    ql = _labels(query_labels, "query_labels")
    gl = _labels(gallery_labels, "gallery_labels")
    if ql.shape[0] != nq:
        raise ValueError(f"query_labels has {ql.shape[0]} entries but there are {nq} queries")
    if gl.shape[0] != ng:
        raise ValueError(f"gallery_labels has {gl.shape[0]} entries but the gallery has {ng} items")
    if nq == 0:
        raise ValueError("there are no queries to evaluate")
    if ng == 0:
        raise ValueError("the gallery is empty")
    return _encode_labels(ql, gl)


def per_query_metrics(
    query_emb: ArrayLike,
    query_labels: ArrayLike,
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike,
    protocol: Protocol = "sake",
    batch_size: int = 256,
    metric: Metric = "cosine",
    codes: Codes = "auto",
    n_threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query values (arrays of length Q, NaN where undefined) for each key of :data:`METRIC_KEYS`.

    Arguments as for :func:`evaluate`.
    """
    _check_choice("protocol", protocol, ("sake", "zse"))
    _check_choice("metric", metric, ("cosine", "hamming"))
    _check_choice("codes", codes, ("auto", "packed", "bits"))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    threads = _n_threads(n_threads)

    make: Callable[[int, int], np.ndarray]
    if metric == "cosine":
        q = _float_embeddings(query_emb, "query_emb")
        g = _float_embeddings(gallery_emb, "gallery_emb")
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb has {g.shape[1]}")
        g_t = np.ascontiguousarray(g.T)

        def make(lo: int, hi: int) -> np.ndarray:
            keys = q[lo:hi] @ g_t
            np.negative(keys, out=keys)
            return keys

    else:
        q = _packed_codes(query_emb, "query_emb", codes)
        g = _packed_codes(gallery_emb, "gallery_emb", codes)
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"query codes are {q.shape[1]} bytes wide but gallery codes are {g.shape[1]} bytes wide")
        key_dtype = np.uint8 if q.shape[1] * 8 <= 255 else np.uint16 if q.shape[1] * 8 <= 65535 else np.int32

        def make(lo: int, hi: int) -> np.ndarray:
            return hamming_distance(q[lo:hi], g).astype(key_dtype)

    nq, ng = q.shape[0], g.shape[0]
    q_codes, g_codes, n_classes = _prepare_labels(query_labels, gallery_labels, nq, ng)
    return _run(_batches(nq, batch_size, make), q_codes, g_codes, n_classes, ng, protocol, threads)


def evaluate(
    query_emb: ArrayLike,
    query_labels: ArrayLike,
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike,
    protocol: Protocol = "sake",
    average: Average = "query",
    batch_size: int = 256,
    metric: Metric = "cosine",
    codes: Codes = "auto",
    n_threads: int | None = None,
) -> dict[str, float]:
    """Evaluate retrieval of a gallery by queries: ``{"map_all", "map_200", "p_100", "p_200"}``.

    Definitions, the reference code each protocol matches, tie-breaking and the handling of queries
    without relevant items are in this module's docstring.

    Args:
        query_emb: (Q, D) query embeddings (any scale; L2-normalized here) or, with
            ``metric="hamming"``, binary codes.
        query_labels: (Q,) class labels (ints or strings).
        gallery_emb: (G, D) gallery embeddings or binary codes.
        gallery_labels: (G,) class labels.
        protocol: ``"sake"`` (SAKE/DSN) or ``"zse"`` (ZSE-SBIR).
        average: ``"query"`` (mean over queries) or ``"class"`` (mean of per-class means).
        batch_size: queries scored per matrix product (memory is about ``batch_size * G * 4`` bytes).
        metric: ``"cosine"`` for real embeddings, ``"hamming"`` for binary codes.
        codes: how binary codes are given: ``"packed"`` (uint8, 8 bits per byte as
            ``np.packbits``), ``"bits"`` (one 0/1 value per bit) or ``"auto"`` (uint8 means packed;
            bool or other integer dtypes mean bits). Ignored for ``metric="cosine"``.
        n_threads: worker threads for the per-query ranking (default: min(4, CPU count)).

    Returns:
        The four metrics as floats in [0, 1] (NaN only if no query has a defined value).

    Raises:
        ValueError: on shape mismatches, empty inputs, non-finite or all-zero embeddings, bad codes
            or unknown option values.
    """
    _check_choice("average", average, ("query", "class"))
    per_query = per_query_metrics(
        query_emb, query_labels, gallery_emb, gallery_labels, protocol, batch_size, metric, codes, n_threads
    )
    q_codes, _, _ = _encode_labels(_labels(query_labels, "query_labels"), _labels(gallery_labels, "gallery_labels"))
    return _summarize(per_query, q_codes, average)


def evaluate_scores(
    scores: ArrayLike,
    query_labels: ArrayLike,
    gallery_labels: ArrayLike,
    protocol: Protocol = "sake",
    average: Average = "query",
    higher_is_better: bool = True,
    batch_size: int = 256,
    n_threads: int | None = None,
) -> dict[str, float]:
    """Like :func:`evaluate`, from a precomputed (Q, G) score matrix.

    Args:
        scores: (Q, G) similarities (``higher_is_better=True``) or distances (``False``).
        query_labels: (Q,) class labels.
        gallery_labels: (G,) class labels.
        protocol: ``"sake"`` or ``"zse"``.
        average: ``"query"`` or ``"class"``.
        higher_is_better: whether larger scores rank first.
        batch_size: score rows ranked per step (bounds the working memory).
        n_threads: worker threads (default: min(4, CPU count)).
    """
    _check_choice("protocol", protocol, ("sake", "zse"))
    _check_choice("average", average, ("query", "class"))
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (Q, G); got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must hold real numbers; got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    nq, ng = s.shape
    q_codes, g_codes, n_classes = _prepare_labels(query_labels, gallery_labels, nq, ng)
    if higher_is_better:
        if np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_:
            s = s.astype(np.float64)  # negating unsigned integers would wrap around
        elif s.dtype.itemsize < 4:
            s = s.astype(np.float32)
    elif s.dtype.itemsize < 4 and np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float32)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    def make(lo: int, hi: int) -> np.ndarray:
        return -s[lo:hi] if higher_is_better else s[lo:hi]

    batches = _batches(nq, batch_size, make)
    per_query = _run(batches, q_codes, g_codes, n_classes, ng, protocol, _n_threads(n_threads))
    return _summarize(per_query, q_codes, average)
