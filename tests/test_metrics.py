"""Tests for zsbir_infer.metrics: hand-computed cases, a slow reference implementation, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zsbir_infer.metrics import (
    METRIC_KEYS,
    average_precision,
    evaluate,
    evaluate_scores,
    per_query_metrics,
    positive_ranks,
)

# --------------------------------------------------------------------------- slow reference


def _ref_voc_ap(relevant_sorted: np.ndarray, top: int | None) -> float:
    """Straightforward SAKE-style AP: cumulative hits, recall/precision curves, VOC interpolation."""
    rel = relevant_sorted.astype(bool)
    n_rel = int(rel.sum())
    if top is not None:
        top = min(top, rel.shape[0])
        rel = rel[:top]
        n_rel = min(top, n_rel)
    if n_rel == 0:
        return math.nan
    hits = 0
    recall, precision = [], []
    for i, r in enumerate(rel, start=1):
        hits += int(r)
        recall.append(hits / n_rel)
        precision.append(hits / i)
    mrec = [0.0, *recall, 1.0]
    mpre = [0.0, *precision, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def _ref_per_query(scores: np.ndarray, ql: np.ndarray, gl: np.ndarray, protocol: str) -> np.ndarray:
    """(Q, 4) per-query values; ranking = stable sort by descending score then ascending index."""
    out = np.zeros((scores.shape[0], 4))
    g = scores.shape[1]
    for qi in range(scores.shape[0]):
        idx = np.lexsort((np.arange(g), -scores[qi]))  # primary: -score, secondary: gallery index
        rel = np.array([gl[j] == ql[qi] for j in idx])
        n = int(rel.sum())
        vals = [_ref_voc_ap(rel, None), _ref_voc_ap(rel, 200)]
        for k in (100, 200):
            if protocol == "sake":
                cut = min(k, g)
                vals.append(rel[:cut].sum() / cut)
            else:
                cut = min(k, n)
                vals.append(rel[:cut].mean() if cut > 0 else math.nan)
        out[qi] = vals
    return out


def _ref_average(values: np.ndarray, ql: np.ndarray, average: str) -> float:
    if average == "query":
        return float(np.nanmean(values))
    per_class = []
    for c in np.unique(ql):
        v = values[ql == c]
        if not np.all(np.isnan(v)):
            per_class.append(np.nanmean(v))
    return float(np.mean(per_class))


# --------------------------------------------------------------------------- hand-computed cases


def test_ap_hand_computed_single_query() -> None:
    # Query label 0. Descending scores give the order idx0 (rel), idx1, idx2 (rel), idx4, idx3 (rel):
    # relevant ranks 1, 3, 5; precision at hits 1/1, 2/3, 3/5 (already non-increasing, so interpolation
    # changes nothing); AP = (1 + 2/3 + 3/5) / 3 = 34/45.
    # G = 5 < 200, so AP@200 = AP. P@100 (sake) = 3 hits / min(100, 5) = 3/5.
    # P@100 (zse) = hits in top min(100, n=3) = top 3 -> {idx0, idx2} = 2, over 3 -> 2/3.
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5]])
    gl = [0, 1, 0, 0, 1]
    sake = evaluate_scores(scores, [0], gl, protocol="sake")
    assert sake["map_all"] == pytest.approx(34 / 45)
    assert sake["map_200"] == pytest.approx(34 / 45)
    assert sake["p_100"] == pytest.approx(3 / 5)
    assert sake["p_200"] == pytest.approx(3 / 5)
    zse = evaluate_scores(scores, [0], gl, protocol="zse")
    assert zse["map_all"] == pytest.approx(34 / 45)
    assert zse["p_100"] == pytest.approx(2 / 3)
    assert zse["p_200"] == pytest.approx(2 / 3)


def test_interpolation_hand_computed() -> None:
    # Relevant ranks 2 and 3: raw precisions 1/2 and 2/3; interpolated (max to the right) 2/3 and 2/3;
    # AP = (2/3 + 2/3) / 2 = 2/3 (the uninterpolated mean would be 7/12).
    assert average_precision(np.array([2, 3]), 2) == pytest.approx(2 / 3)
    scores = np.array([[0.9, 0.8, 0.7]])
    assert evaluate_scores(scores, ["a"], ["b", "a", "a"])["map_all"] == pytest.approx(2 / 3)


def test_truncated_ap_hand_computed() -> None:
    # Ranks 1, 3, 5 with top 3: hits inside are ranks 1, 3 -> precisions 1, 2/3; divisor min(3, 3) = 3;
    # AP@3 = (1 + 2/3) / 3 = 5/9.
    assert average_precision(np.array([1, 3, 5]), 3, top=3) == pytest.approx(5 / 9)
    # Ranks 2, 3, 5, 6 with n = 4, top 3: hits inside at ranks 2, 3 -> 1/2, 2/3 -> interpolated 2/3, 2/3;
    # divisor min(3, 4) = 3; AP@3 = (4/3) / 3 = 4/9.
    assert average_precision(np.array([2, 3, 5, 6]), 4, top=3) == pytest.approx(4 / 9)
    # No hit inside the cut: 0 (not NaN, since the query has relevant items).
    assert average_precision(np.array([5]), 1, top=3) == 0.0
    assert math.isnan(average_precision(np.array([], dtype=np.int64), 0))


def test_large_gallery_hand_computed() -> None:
    # G = 300, score = -index so rank = index + 1. Query class "x" is relevant at indices 0..99 and 200..299
    # (n = 200).
    #   AP@all: hits 1..100 have precision 1; hit k = 101..200 sits at rank k + 100 with precision
    #           k / (k + 100), increasing in k, so its interpolated value is the last one, 200/300 = 2/3.
    #           AP = (100 * 1 + 100 * 2/3) / 200 = 5/6.
    #   AP@200: top 200 holds hits 1..100 (precision 1); divisor min(200, 200) = 200 -> 100 / 200 = 1/2.
    #   P@100 = 100/100 = 1; P@200 = 100/200 = 1/2 (both protocols: min(K, G) = min(K, n) = K here).
    # Query class "y" is relevant only at indices 150 and 250 (n = 2):
    #   AP@all: ranks 151, 251 -> 1/151, 2/251; interpolated 2/251, 2/251 -> AP = 2/251.
    #   AP@200: only rank 151 inside the top 200: precision 1/151, divisor min(200, 2) = 2 -> 1/302.
    #   P@100 (sake) = 0/100 = 0; P@200 (sake) = 1/200.
    #   P@K (zse): cut = min(K, 2) = 2; the top 2 hold no "y" -> 0 for both K.
    g = 300
    gl_x = np.array(["z"] * g)
    gl_x[0:100] = "x"
    gl_x[200:300] = "x"
    scores = -np.arange(g, dtype=np.float64)[None, :]
    res_x = evaluate_scores(scores, ["x"], gl_x)
    assert res_x["map_all"] == pytest.approx(5 / 6)
    assert res_x["map_200"] == pytest.approx(1 / 2)
    assert res_x["p_100"] == pytest.approx(1.0)
    assert res_x["p_200"] == pytest.approx(1 / 2)
    gl_y = np.array(["z"] * g)
    gl_y[[150, 250]] = "y"
    sake = evaluate_scores(scores, ["y"], gl_y, protocol="sake")
    assert sake["map_all"] == pytest.approx(2 / 251)
    assert sake["map_200"] == pytest.approx(1 / 302)
    assert sake["p_100"] == 0.0
    assert sake["p_200"] == pytest.approx(1 / 200)
    zse = evaluate_scores(scores, ["y"], gl_y, protocol="zse")
    assert zse["map_200"] == pytest.approx(1 / 302)
    assert zse["p_100"] == 0.0
    assert zse["p_200"] == 0.0


def test_query_without_relevant_items() -> None:
    # Query 0 is the 34/45 case (P@100 sake 3/5, zse 2/3); query 1 has label 7, absent from the gallery:
    #   sake: AP NaN (left out), P@K = 0 (kept) -> p_100 = (3/5 + 0) / 2 = 3/10, map_all = 34/45.
    #   zse:  AP NaN, P@K NaN (both left out) -> p_100 = 2/3.
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    ql, gl = [0, 7], [0, 1, 0, 0, 1]
    sake = evaluate_scores(scores, ql, gl, protocol="sake")
    assert sake["map_all"] == pytest.approx(34 / 45)
    assert sake["p_100"] == pytest.approx(3 / 10)
    zse = evaluate_scores(scores, ql, gl, protocol="zse")
    assert zse["p_100"] == pytest.approx(2 / 3)
    # Only undefined queries: NaN, no exception.
    only = evaluate_scores(scores[1:], [7], gl)
    assert math.isnan(only["map_all"]) and only["p_100"] == 0.0


def test_k_larger_than_gallery() -> None:
    # G = 3, two relevant at ranks 1 and 3: sake P@100 = 2 / min(100, 3) = 2/3; zse P@100 = hits in the
    # top min(100, 2) = 2 -> 1 hit -> 1/2.
    scores = np.array([[3.0, 2.0, 1.0]])
    assert evaluate_scores(scores, [1], [1, 0, 1])["p_100"] == pytest.approx(2 / 3)
    assert evaluate_scores(scores, [1], [1, 0, 1], protocol="zse")["p_100"] == pytest.approx(1 / 2)


def test_ties_broken_by_gallery_index() -> None:
    # All scores equal: order is gallery index 0, 1, 2; relevant at indices 1, 2 -> ranks 2, 3 -> AP = 2/3.
    # Reversing the labels puts the relevant item at index 0 -> rank 1 -> AP = 1.
    scores = np.array([[0.5, 0.5, 0.5]])
    assert evaluate_scores(scores, [0], [1, 0, 0])["map_all"] == pytest.approx(2 / 3)
    assert evaluate_scores(scores, [0], [0, 1, 1])["map_all"] == pytest.approx(1.0)
    # Same with identical embeddings through the cosine path.
    emb = np.ones((3, 4))
    assert evaluate(np.ones((1, 4)), [0], emb, [1, 0, 0])["map_all"] == pytest.approx(2 / 3)
    # positive_ranks with ties: keys [1, 0, 1, 0] -> order 1, 3, 0, 2; index 2 is at rank 4.
    assert positive_ranks(np.array([1.0, 0.0, 1.0, 0.0]), np.array([2, 3])).tolist() == [2, 4]


def test_class_average_hand_computed() -> None:
    # Query 0 (label 0) -> AP 34/45 (see above). Query 1 (label 0) on reversed scores [0.5, 0.1, 0.7, 0.8, 0.9]:
    # order idx4, idx3 (rel), idx2 (rel), idx0 (rel), idx1 -> ranks 2, 3, 4 -> precisions 1/2, 2/3, 3/4 ->
    # interpolated 3/4, 3/4, 3/4 -> AP = 3/4. Query 2 (label 1): relevant idx1, idx4 in order
    # idx0, idx1 (rel), idx2, idx4 (rel), idx3 -> ranks 2, 4 -> 1/2, 1/2 -> AP = 1/2.
    # Query average: (34/45 + 3/4 + 1/2) / 3; class average: ((34/45 + 3/4) / 2 + 1/2) / 2.
    s0 = [0.9, 0.8, 0.7, 0.1, 0.5]
    scores = np.array([s0, s0[::-1], s0])
    ql, gl = [0, 0, 1], [0, 1, 0, 0, 1]
    a, b, c = 34 / 45, 3 / 4, 1 / 2
    assert evaluate_scores(scores, ql, gl, average="query")["map_all"] == pytest.approx((a + b + c) / 3)
    assert evaluate_scores(scores, ql, gl, average="class")["map_all"] == pytest.approx(((a + b) / 2 + c) / 2)


def test_hamming_hand_computed() -> None:
    # Query code 00000000. Gallery: 00000001 (d=1, label 0), 00000011 (d=2, label 1), 00000000 (d=0, label 1),
    # 11111111 (d=8, label 0). Order by distance: idx2, idx0 (rel), idx1, idx3 (rel) -> ranks 2, 4 ->
    # precisions 1/2, 2/4 -> AP = 1/2. Given packed (uint8) or as bits.
    q = np.array([[0]], dtype=np.uint8)
    g = np.array([[1], [3], [0], [255]], dtype=np.uint8)
    gl = [0, 1, 1, 0]
    assert evaluate(q, [0], g, gl, metric="hamming")["map_all"] == pytest.approx(0.5)
    qb = np.unpackbits(q, axis=1).astype(bool)
    gb = np.unpackbits(g, axis=1).astype(bool)
    assert evaluate(qb, [0], gb, gl, metric="hamming")["map_all"] == pytest.approx(0.5)
    assert evaluate(qb.astype(np.uint8), [0], gb.astype(np.uint8), gl, metric="hamming", codes="bits")[
        "map_all"
    ] == pytest.approx(0.5)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("protocol", ["sake", "zse"])
@pytest.mark.parametrize("average", ["query", "class"])
def test_matches_reference_with_ties(protocol: str, average: str) -> None:
    rng = np.random.default_rng(7)
    nq, ng = 30, 260  # G > 200 so the @200 cut matters
    scores = rng.integers(0, 12, size=(nq, ng)).astype(np.float64)  # heavy ties
    ql = rng.integers(0, 6, size=nq)  # label 5 is absent from the gallery: undefined queries
    gl = rng.integers(0, 5, size=ng)
    ref = _ref_per_query(scores, ql, gl, protocol)
    got = evaluate_scores(scores, ql, gl, protocol=protocol, average=average, batch_size=7)  # type: ignore[arg-type]
    for j, key in enumerate(METRIC_KEYS):
        assert got[key] == pytest.approx(_ref_average(ref[:, j], ql, average), rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("protocol", ["sake", "zse"])
def test_cosine_matches_reference(protocol: str) -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((25, 8)) * rng.uniform(0.5, 3, size=(25, 1))  # scale must not matter
    g = rng.standard_normal((240, 8))
    ql = rng.integers(0, 4, size=25)
    gl = rng.integers(0, 4, size=240)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    ref = _ref_per_query(qn @ gn.T, ql, gl, protocol)
    got = per_query_metrics(q, ql, g, gl, protocol=protocol, batch_size=7, n_threads=2)  # type: ignore[arg-type]
    for j, key in enumerate(METRIC_KEYS):
        np.testing.assert_allclose(got[key], ref[:, j], rtol=1e-9, atol=1e-12, err_msg=key)
    res = evaluate(q, ql, g, gl, protocol=protocol)  # type: ignore[arg-type]
    assert res["map_all"] == pytest.approx(float(np.nanmean(ref[:, 0])))


def test_hamming_matches_reference() -> None:
    rng = np.random.default_rng(11)
    qb = rng.integers(0, 2, size=(20, 24)).astype(np.uint8)
    gb = rng.integers(0, 2, size=(230, 24)).astype(np.uint8)
    ql = rng.integers(0, 3, size=20)
    gl = rng.integers(0, 3, size=230)
    dist = np.array([[int(np.sum(a != b)) for b in gb] for a in qb], dtype=np.float64)
    ref = _ref_per_query(-dist, ql, gl, "sake")
    got = per_query_metrics(qb, ql, gb, gl, metric="hamming", codes="bits", batch_size=6)
    for j, key in enumerate(METRIC_KEYS):
        np.testing.assert_allclose(got[key], ref[:, j], rtol=1e-12, err_msg=key)
    packed = per_query_metrics(np.packbits(qb, axis=1), ql, np.packbits(gb, axis=1), gl, metric="hamming")
    np.testing.assert_allclose(packed["map_all"], ref[:, 0], rtol=1e-12)


def test_distance_scores_and_integer_scores() -> None:
    # Distances ranked ascending give the same result as negated similarities.
    rng = np.random.default_rng(5)
    s = rng.standard_normal((6, 50))
    ql, gl = rng.integers(0, 3, 6), rng.integers(0, 3, 50)
    a = evaluate_scores(s, ql, gl)
    b = evaluate_scores(-s, ql, gl, higher_is_better=False)
    assert a == pytest.approx(b)
    # Unsigned integer scores must not wrap around when negated.
    su = rng.integers(0, 5, size=(6, 50)).astype(np.uint8)
    assert evaluate_scores(su, ql, gl) == pytest.approx(evaluate_scores(su.astype(np.float64), ql, gl))
    # float16 scores are widened (their range cannot hold the binning scale), same result as float32.
    s16 = s.astype(np.float16)
    assert evaluate_scores(s16, ql, gl) == pytest.approx(evaluate_scores(s16.astype(np.float32), ql, gl))
    assert evaluate_scores(s16, ql, gl, higher_is_better=False) == pytest.approx(
        evaluate_scores(-s16.astype(np.float32), ql, gl)
    )


def test_string_labels_and_results_in_range() -> None:
    rng = np.random.default_rng(2)
    q, g = rng.standard_normal((10, 5)), rng.standard_normal((40, 5))
    names = np.array(["cat", "dog", "owl"])
    res = evaluate(q, names[rng.integers(0, 3, 10)], g, names[rng.integers(0, 3, 40)])
    assert set(res) == set(METRIC_KEYS)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in res.values())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_emb": np.ones((2, 3)), "gallery_emb": np.ones((4, 5))}, "dimension"),
        ({"query_labels": [0, 1, 2]}, "query_labels has 3 entries"),
        ({"gallery_labels": [0]}, "gallery_labels has 1 entries"),
        ({"query_emb": np.ones(3)}, "2-D"),
        ({"query_emb": np.array([[1.0, 0, 0], [0, 0, 0]])}, "all zeros"),
        ({"gallery_emb": np.full((4, 3), np.nan)}, "NaN"),
        ({"protocol": "voc"}, "protocol"),
        ({"average": "micro"}, "average"),
        ({"metric": "l2"}, "metric"),
        ({"batch_size": 0}, "batch_size"),
        ({"query_labels": np.zeros((2, 1))}, "1-D"),
        ({"query_emb": np.ones((0, 3)), "query_labels": []}, "no queries"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "query_emb": np.ones((2, 3)),
        "query_labels": [0, 1],
        "gallery_emb": np.ones((4, 3)),
        "gallery_labels": [0, 1, 0, 1],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate(**args)  # type: ignore[arg-type]


def test_validation_codes_and_scores() -> None:
    with pytest.raises(ValueError, match="bytes wide"):
        evaluate(np.zeros((1, 2), np.uint8), [0], np.zeros((3, 3), np.uint8), [0, 0, 1], metric="hamming")
    with pytest.raises(ValueError, match="only 0 and 1"):
        evaluate(np.full((1, 8), 2), [0], np.zeros((3, 8), int), [0, 0, 1], metric="hamming")
    with pytest.raises(ValueError, match="uint8"):
        evaluate(np.zeros((1, 8), int), [0], np.zeros((3, 8), int), [0, 0, 1], metric="hamming", codes="packed")
    with pytest.raises(ValueError, match="packed uint8 or 0/1"):
        evaluate(np.zeros((1, 8)), [0], np.zeros((3, 8)), [0, 0, 1], metric="hamming")
    with pytest.raises(ValueError, match="scores must be a 2-D"):
        evaluate_scores(np.zeros(3), [0], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores(np.array([[np.nan, 1.0]]), [0], [0, 1])
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate_scores(np.zeros((1, 0)), [0], [])


@pytest.mark.parametrize("n_values", [3, 400, 10**9])  # heavy ties (argsort path), a few ties (scans), none
def test_positive_ranks_against_lexsort(n_values: int) -> None:
    rng = np.random.default_rng(n_values % 1000)
    for _ in range(20):
        keys = rng.integers(0, n_values, size=500).astype(np.float32)
        pos = rng.choice(500, size=int(rng.integers(0, 60)), replace=False)
        order = np.lexsort((np.arange(500), keys))  # primary: key, secondary: gallery index
        rank_of = np.empty(500, dtype=np.int64)
        rank_of[order] = np.arange(1, 501)
        expected = np.sort(rank_of[pos])
        np.testing.assert_array_equal(positive_ranks(keys, pos), expected)


def test_positive_ranks_integer_and_skewed_keys() -> None:
    rng = np.random.default_rng(9)
    for keys in (
        rng.integers(0, 65, size=700).astype(np.uint8),  # Hamming-like
        np.concatenate([rng.normal(0.0, 1e-6, 690), [-50.0, 40.0] * 5]).astype(np.float32),  # dense + outliers
        np.full(700, 0.25, dtype=np.float32),  # all equal
    ):
        pos = rng.choice(700, size=80, replace=False)
        order = np.lexsort((np.arange(700), keys))
        rank_of = np.empty(700, dtype=np.int64)
        rank_of[order] = np.arange(1, 701)
        np.testing.assert_array_equal(positive_ranks(keys, pos), np.sort(rank_of[pos]))


_float_keys = st.lists(
    st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-40, -3e38, 3e38, 0.5]),
        st.floats(min_value=-1e6, max_value=1e6, width=32),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(values=_float_keys, data=st.data())
def test_positive_ranks_property(values: list[float], data: st.DataObject) -> None:
    # Arbitrary float32 keys (signed zeros, subnormals, near-overflow values, many ties) against lexsort.
    keys = np.array(values, dtype=np.float32)
    g = keys.shape[0]
    pos = np.array(sorted(data.draw(st.sets(st.integers(0, g - 1), min_size=1, max_size=g))), dtype=np.int64)
    order = np.lexsort((np.arange(g), keys))
    rank_of = np.empty(g, dtype=np.int64)
    rank_of[order] = np.arange(1, g + 1)
    np.testing.assert_array_equal(positive_ranks(keys, pos), np.sort(rank_of[pos]))
    np.testing.assert_array_equal(positive_ranks(keys.astype(np.float64), pos), np.sort(rank_of[pos]))
