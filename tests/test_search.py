"""Search kernels of zsbir_infer.gallery.search against float64 / pure-numpy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zsbir_infer.gallery import search as S
from zsbir_infer.gallery.search import (
    ID_SENTINEL,
    Block,
    F16Scorer,
    HammingScorer,
    Int8Scorer,
    TopK,
    hamming_scores,
    reference_topk,
    search_blocks,
)
from zsbir_infer.itq import hamming_distance


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ref_scores_ids(rows: np.ndarray, queries: np.ndarray, k: int, dead: np.ndarray | None = None):
    """Reference: float64 scores rounded to float32, ordered by (-score, id)."""
    ids = reference_topk(rows, queries, k, dead)
    s = (queries.astype(np.float64) @ rows.astype(np.float64).T).astype(np.float32)
    return np.take_along_axis(s, ids, axis=1), ids


def _blocks(data: np.ndarray, sizes: list[int], dead: np.ndarray | None = None, scale=None) -> list[Block]:
    out, base = [], 0
    for n in sizes:
        out.append(
            Block(
                base=base,
                data=data[base : base + n],
                scale=None if scale is None else scale[base : base + n],
                dead=None if dead is None else dead[base : base + n],
                norm_bound=1.01,
            )
        )
        base += n
    assert base == data.shape[0]
    return out


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(S, "MIN_ROWS_PER_THREAD", 1000)
    return int(request.param)


def test_nonzero2d_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 3), (100, 64), (13, 5), (4096, 1)]:
        m = rng.random(shape) < 0.05
        r, c = S._nonzero2d(m)
        got = sorted(zip(r.tolist(), c.tolist(), strict=True))
        want = sorted(zip(*[a.tolist() for a in np.nonzero(m)], strict=True))
        assert got == want


def test_chunks_cover_rows_in_order() -> None:
    for rows in [0, 1, 2047, 2048, 2049, 100_000]:
        for q in [1, 64, 1000]:
            ch = S._chunks(rows, q)
            assert sum(e - s for s, e in ch) == rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ch))


def test_topk_hand_computed_ties() -> None:
    # Scores of 6 rows for 2 queries; ties must go to the smaller id.
    scores = np.array([[0.5, 0.1], [0.9, 0.1], [0.5, 0.3], [0.9, 0.3], [0.2, 0.3], [0.5, 0.0]], dtype=np.float32)
    top = TopK(2, 3)
    top.push_block(_ExactScorer(scores), Block(0, scores), 0, 3)
    top.push_block(_ExactScorer(scores), Block(0, scores), 3, 6)
    assert top.ids.tolist() == [[1, 3, 0], [2, 3, 4]]
    np.testing.assert_array_equal(top.scores, np.array([[0.9, 0.9, 0.5], [0.3, 0.3, 0.3]], dtype=np.float32))


class _ExactScorer:
    """Scores given in advance (rows x queries); exact, so no rescoring."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.n_queries = table.shape[1]

    def score(self, block: Block, start: int, stop: int) -> np.ndarray:
        return self.table[block.base + start : block.base + stop]

    def margin(self, block: Block) -> None:
        return None

    def rescore(self, block: Block, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("exact scorers are never asked to rescore")


def test_topk_adversarial_increasing_scores(threads: int) -> None:
    # Scores increase with the id: every block beats the previous k-th best (worst case for thresholds).
    n, q, k = 20_000, 3, 5
    table = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, q)) / n
    table[:, 1] = table[::-1, 1]  # query 1: decreasing
    table[:, 2] = 0.25  # query 2: all tied -> the k smallest ids
    blocks = [Block(0, table[:12_345]), Block(12_345, table[12_345:])]
    scores, ids = search_blocks(blocks, _ExactScorer(table), k, threads=threads)
    assert ids[0].tolist() == list(range(n - 1, n - 1 - k, -1))
    assert ids[1].tolist() == list(range(k))
    assert ids[2].tolist() == list(range(k))
    assert np.all(scores[2] == np.float32(0.25))


@pytest.mark.parametrize("q", [1, 5, 64])
def test_f16_exact_matches_float64_reference(q: int, threads: int) -> None:
    rng = np.random.default_rng(q)
    data = _unit(rng, 9_000, 64).astype(np.float16)
    # Duplicate rows create exact ties that must be ordered by id.
    data[4_000:4_010] = data[17]
    data[8_990:] = data[17]
    queries = _unit(rng, q, 64)
    queries[0] = data[17].astype(np.float32) / np.linalg.norm(data[17].astype(np.float32))
    dead = np.zeros(data.shape[0], dtype=bool)
    dead[rng.choice(data.shape[0], 500, replace=False)] = True
    dead[4_003] = True
    blocks = _blocks(data, [3_000, 1, 5_999], dead)
    k = 15
    scores, ids = search_blocks(blocks, F16Scorer(queries), k, threads=threads)
    ref_s, ref_ids = _ref_scores_ids(data, queries, k, dead)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=2e-7)
    live_dups = [i for i in [17, *range(4_000, 4_010), *range(8_990, 9_000)] if not dead[i]]
    assert ids[0].tolist() == live_dups[:k]


def test_int8_exact_matches_dequantized_reference(threads: int) -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 6_000, 32)
    scale = (np.abs(x).max(axis=1) / 127).astype(np.float32)
    codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    deq = codes.astype(np.float64) * scale[:, None]
    queries = _unit(rng, 7, 32)
    blocks = _blocks(codes, [2_500, 3_500], scale=scale)
    scores, ids = search_blocks(blocks, Int8Scorer(queries), 10, threads=threads)
    ref_s, ref_ids = _ref_scores_ids(deq, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=2e-7)


@pytest.mark.parametrize("n_bits", [64, 24])
def test_hamming_matches_itq_reference(n_bits: int, threads: int) -> None:
    rng = np.random.default_rng(n_bits)
    n_bytes = (n_bits + 7) // 8
    bits = rng.integers(0, 2, size=(5_000, n_bits), dtype=np.uint8)
    codes = np.packbits(bits, axis=1)
    qbits = rng.integers(0, 2, size=(4, n_bits), dtype=np.uint8)
    qcodes = np.packbits(qbits, axis=1)
    assert codes.shape[1] == n_bytes
    s = hamming_scores(codes[:50], qcodes, n_bits)
    ref = hamming_distance(codes[:50], qcodes)
    np.testing.assert_array_equal(s, (n_bits - 2 * ref).T.astype(np.float32).T)
    k = 20
    scores, ids = search_blocks(_blocks(codes, [1_000, 4_000]), HammingScorer(qcodes, n_bits), k, threads=threads)
    dist = hamming_distance(qcodes, codes)
    for qi in range(4):
        order = np.lexsort((np.arange(codes.shape[0]), dist[qi]))[:k]
        assert ids[qi].tolist() == order.tolist()
        np.testing.assert_array_equal(scores[qi], n_bits - 2 * dist[qi, order])


def test_fewer_rows_than_k_pads() -> None:
    rng = np.random.default_rng(1)
    data = _unit(rng, 4, 8).astype(np.float16)
    dead = np.array([False, True, False, False])
    scores, ids = search_blocks([Block(0, data, dead=dead)], F16Scorer(_unit(rng, 2, 8)), 6)
    assert (ids[:, :3] != ID_SENTINEL).all() and (ids[:, 3:] == ID_SENTINEL).all()
    assert np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [0, 2, 3]


def test_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        search_blocks([], F16Scorer(np.ones((1, 4), np.float32)), 0)


def test_query_not_normalized_still_exact() -> None:
    # The error bound scales with the query norm; scores stay exact for any query scale.
    rng = np.random.default_rng(3)
    data = _unit(rng, 3_000, 16).astype(np.float16)
    queries = _unit(rng, 3, 16) * np.array([[0.01], [1.0], [50.0]], dtype=np.float32)
    scores, ids = search_blocks([Block(0, data, norm_bound=1.01)], F16Scorer(queries), 8)
    ref_s, ref_ids = _ref_scores_ids(data, queries, 8)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_near_ties_within_fast_kernel_error_are_ranked_exactly(storage: str, threads: int) -> None:
    # 4000 rows whose scores against the query all lie within ~1e-4 of each other, less than the fast
    # kernels' error (query rounded to fp16 / quantized to int8): only the exact rescoring ranks them right.
    rng = np.random.default_rng(11)
    d = 64
    q = _unit(rng, 1, d)[0]
    r = rng.standard_normal((4_000, d))
    r -= (r @ q)[:, None] * q[None, :]
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    c = 0.8
    rows = (c * q[None, :] + np.sqrt(1 - c * c) * r).astype(np.float16)
    noise = _unit(rng, 20_000, d).astype(np.float16)
    noise *= np.float16(0.5)
    data = np.concatenate([noise[:7_000], rows, noise[7_000:]])
    k = 25
    queries = q[None, :].astype(np.float32)
    if storage == "float16":
        blocks = _blocks(data, [10_000, 14_000])
        scorer: S.Scorer = F16Scorer(queries)
        stored = data.astype(np.float64)
    else:
        x = data.astype(np.float32)
        scale = (np.abs(x).max(axis=1) / 127).astype(np.float32)
        codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
        blocks = _blocks(codes, [10_000, 14_000], scale=scale)
        scorer = Int8Scorer(queries)
        stored = codes.astype(np.float64) * scale[:, None].astype(np.float64)
    scores, ids = search_blocks(blocks, scorer, k, threads=threads)
    ref_s, ref_ids = _ref_scores_ids(stored, queries, k)
    # The fast kernel alone would get this wrong (the test is meaningful only if it does).
    fast = np.concatenate([scorer.score(b, 0, b.rows)[:, 0] for b in blocks])
    assert np.lexsort((np.arange(data.shape[0]), -fast))[:k].tolist() != ref_ids[0].tolist()
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=2e-7)


def test_without_numkong_the_blas_fallback_gives_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(21)
    x = _unit(rng, 5_000, 32)
    x16 = x.astype(np.float16)
    scale = (np.abs(x).max(axis=1) / 127).astype(np.float32)
    x8 = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    q = _unit(rng, 6, 32)
    with_nk = (
        search_blocks(_blocks(x16, [5_000]), F16Scorer(q), 10),
        search_blocks(_blocks(x8, [5_000], scale=scale), Int8Scorer(q), 10),
    )
    monkeypatch.setattr(S, "_numkong_available", lambda: False)
    f16, i8 = F16Scorer(q), Int8Scorer(q)
    assert f16._packed is None and i8._packed is None
    without = (
        search_blocks(_blocks(x16, [5_000]), f16, 10),
        search_blocks(_blocks(x8, [5_000], scale=scale), i8, 10),
    )
    for (s1, i1), (s2, i2) in zip(with_nk, without, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
