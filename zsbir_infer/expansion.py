"""Query expansion: a second search with each query moved towards its best photos.

A sketch and the photos of its class lie further apart than the photos of one class lie from each
other (the domain gap). One expansion step bridges part of it: search once, add the ``k`` best photos'
vectors to the query, each weighted by its (non-negative) similarity, normalize, search again. This is
average query expansion with similarity weights (alpha-QE with alpha = 1, Radenovic et al., TPAMI
2019); it needs no training, works with every search path (exact, ANN, CUDA kernels) and costs one
extra search plus ``k`` vector reads per query.

A bundle may recommend ``k`` (manifest key ``retrieval.expand``, chosen on held-out training classes);
:func:`recommended_expand` reads it, and ``Retriever.search(expand=...)``, ``zsbir query --expand`` and
``zsbir eval --expand`` use it unless told otherwise (``0`` turns it off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MAX_EXPAND", "check_expand", "expand_against", "expand_queries", "recommended_expand"]

#: The largest ``k`` accepted (beyond a few dozen neighbours the expanded query drifts to the gallery mean).
MAX_EXPAND = 1000


def check_expand(expand: object) -> int:
    """``expand`` as a validated ``int`` in ``[0, MAX_EXPAND]`` (``ValueError`` otherwise)."""
    if isinstance(expand, bool) or not isinstance(expand, (int, np.integer)) or not 0 <= int(expand) <= MAX_EXPAND:
        raise ValueError(f"expand must be an integer from 0 (off) to {MAX_EXPAND}; got {expand!r}")
    return int(expand)


def recommended_expand(manifest: Mapping[str, Any]) -> int:
    """The bundle's recommended expansion ``k`` (its ``retrieval.expand``), 0 where it names none."""
    retrieval = manifest.get("retrieval")
    if not isinstance(retrieval, Mapping) or "expand" not in retrieval:
        return 0
    try:
        return check_expand(retrieval["expand"])
    except ValueError as exc:
        raise ValueError(f"the bundle's manifest has an invalid retrieval.expand: {exc}") from None


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def expand_queries(queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Expanded, L2-normalized queries.

    Args:
        queries: ``[Q, D]`` L2-normalized query vectors.
        neighbours: ``[Q, k, D]`` vectors of each query's first-round hits (rows of fewer hits padded with
            zeros, whose score then does not matter).
        scores: ``[Q, k]`` their similarities to the query; negative ones count as 0.
    """
    q = np.asarray(queries, dtype=np.float32)
    nb = np.asarray(neighbours, dtype=np.float32)
    w = np.clip(np.asarray(scores, dtype=np.float32), 0.0, None)
    if nb.ndim != 3 or nb.shape[0] != q.shape[0] or nb.shape[2] != q.shape[1] or w.shape != nb.shape[:2]:
        raise ValueError(f"expand_queries: queries {q.shape}, neighbours {nb.shape} and scores {w.shape} do not match")
    return _normalize(q + np.einsum("qk,qkd->qd", w, nb))


def expand_against(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Expanded queries against an in-memory gallery ``[N, D]`` (exact first round; for evaluation)."""
    k = min(check_expand(k), int(gallery.shape[0]))
    q = _normalize(np.asarray(queries, dtype=np.float32))
    if k == 0:
        return q
    g = np.asarray(gallery, dtype=np.float32)
    sims = q @ g.T
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return expand_queries(q, g[idx], np.take_along_axis(sims, idx, axis=1))
