"""Query expansion (zsbir_infer.expansion): the arithmetic, the bundle's recommendation, Retriever.search
against a numpy two-round brute force, and `zsbir eval --expand` / `zsbir query --expand`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnx")

from indexer_support import write_photos, write_sketch
from test_cli_embed_eval import COLORS, make_benchmark
from tiny_bundle import make_bundle

from zsbir_infer import Retriever
from zsbir_infer.cli import main
from zsbir_infer.datasets import open_benchmark
from zsbir_infer.encoder import Encoder
from zsbir_infer.expansion import check_expand, expand_against, expand_queries, recommended_expand
from zsbir_infer.gallery import Gallery
from zsbir_infer.indexer import index_folder
from zsbir_infer.metrics import evaluate
from zsbir_infer.retriever import RetrieverError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_expand_queries_is_the_similarity_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    q = _unit(rng.standard_normal((3, 5)))
    nb = _unit(rng.standard_normal((3, 4, 5)))
    sc = np.array([[0.9, 0.5, -0.2, 0.1], [0.3, 0.0, 0.0, 0.0], [-1.0, -0.5, -0.1, -0.3]])
    got = expand_queries(q, nb, sc)
    for i in range(3):
        want = q[i] + sum(max(s, 0.0) * v for s, v in zip(sc[i], nb[i], strict=True))
        np.testing.assert_allclose(got[i], _unit(want), atol=1e-6)
    np.testing.assert_allclose(got[2], q[2], atol=1e-6)  # only negative similarities: unchanged
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        expand_queries(q, nb[:, :, :4], sc)


def test_expand_against_uses_the_k_nearest_photos() -> None:
    rng = np.random.default_rng(1)
    q = _unit(rng.standard_normal((4, 6)))
    g = _unit(rng.standard_normal((9, 6)))
    np.testing.assert_allclose(expand_against(q, g, 0), q, atol=1e-6)
    for k in (1, 3, 9, 50):  # k beyond the gallery size: all photos
        sims = q @ g.T
        want = []
        for i in range(4):
            top = np.argsort(-sims[i])[: min(k, 9)]
            want.append(_unit(q[i] + (np.clip(sims[i, top], 0, None)[:, None] * g[top]).sum(0)))
        np.testing.assert_allclose(expand_against(q, g, k), np.array(want), atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1001, 2.5, True, "10", None])
def test_check_expand_rejects(bad: Any) -> None:
    with pytest.raises(ValueError, match="expand must be an integer"):
        check_expand(bad)


def test_recommended_expand() -> None:
    assert recommended_expand({}) == 0
    assert recommended_expand({"retrieval": {}}) == 0
    assert recommended_expand({"retrieval": {"expand": 7, "chosen_on": "15 classes"}}) == 7
    with pytest.raises(ValueError, match=r"retrieval\.expand"):
        recommended_expand({"retrieval": {"expand": -3}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("qe")
    bundle = make_bundle(base / "bundle", manifest_overrides={"retrieval": {"expand": 4}})[0]
    write_photos(base / "photos", 30, sub="x")
    sketches = [str(write_sketch(base / f"s{i}.png", seed=i)) for i in range(4)]
    with Encoder.open(bundle, backend="ort-cpu", threads=1) as enc:
        index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle))
    return {"base": base, "bundle": bundle, "sketches": sketches}


def _two_rounds(gallery: Path, q: np.ndarray, n: int, k: int) -> list[list[str]]:
    with Gallery.open(gallery) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows]).astype(np.float64)
    ids = np.array([i for _, i in rows])
    out = []
    for qi in q.astype(np.float64):
        s = vecs @ qi
        first = np.lexsort((ids, -s))[:n]
        e = qi + (np.clip(s[first], 0, None)[:, None] * vecs[first]).sum(0)
        s2 = vecs @ (e / np.linalg.norm(e))
        out.append([rows[j][0] for j in np.lexsort((ids, -s2))[:k]])
    return out


def test_retriever_expands_by_the_bundles_recommendation(setup: dict[str, Any]) -> None:
    with Retriever.open(setup["base"] / ".zsbir", backend="ort-cpu") as r:
        assert r.expand == 4
        q = r.embed(setup["sketches"])
        default = r.search(setup["sketches"], k=6)
        explicit = r.search(setup["sketches"], k=6, expand=4)
        off = r.search(setup["sketches"], k=6, expand=0)
        two = r.search(setup["sketches"], k=6, expand=2)
        with pytest.raises(RetrieverError, match="expand must be an integer"):
            r.search(setup["sketches"], k=6, expand=-1)
    assert [[h.relpath for h in row] for row in default] == _two_rounds(setup["base"] / ".zsbir", q, 4, 6)
    assert [[h.relpath for h in row] for row in explicit] == _two_rounds(setup["base"] / ".zsbir", q, 4, 6)
    assert [[h.relpath for h in row] for row in two] == _two_rounds(setup["base"] / ".zsbir", q, 2, 6)
    plain = _two_rounds(setup["base"] / ".zsbir", q, 0, 6)
    assert [[h.relpath for h in row] for row in off] == plain
    assert [[h.relpath for h in row] for row in default] != plain  # expansion changed some ranking


def test_query_cli_expand_option(setup: dict[str, Any]) -> None:
    runner = CliRunner()
    outs = {}
    for opt in ([], ["--expand", "0"], ["--expand", "4"]):
        res = runner.invoke(
            main, ["query", *setup["sketches"][:1], "--gallery", str(setup["base"] / ".zsbir"), "--json", *opt]
        )
        assert res.exit_code == 0, res.output
        outs[" ".join(opt)] = res.output
    assert outs[""] == outs["--expand 4"] != outs["--expand 0"]
    res = runner.invoke(
        main, ["query", setup["sketches"][0], "--gallery", str(setup["base"] / ".zsbir"), "--expand", "-2"]
    )
    assert res.exit_code != 0 and "--expand" in res.output


def test_eval_expand_matches_library(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", manifest_overrides={"retrieval": {"expand": 3}})[0]
    data = make_benchmark(tmp_path / "data", photos=4, sketches=3)
    rng = np.random.default_rng(2)
    from PIL import Image

    for cls in COLORS:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / "photo" / cls / "noise.png")
    part = open_benchmark(data).split("all")
    with Encoder.open(root, backend="ort-cpu") as enc:
        q = enc.embed([s.path for s in part.sketches], "sketch")
        g = enc.embed([s.path for s in part.photos], "photo")
    ql, gl = [s.label for s in part.sketches], [s.label for s in part.photos]
    runner = CliRunner()
    for opt, k in (([], 3), (["--expand", "0"], 0), (["--expand", "5"], 5)):
        res = runner.invoke(main, ["eval", "--model", str(root), "--data", str(data), "--split", "all", "--json", *opt])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        ref = evaluate(expand_against(q, g, k), ql, g, gl)
        assert got["expand"] == k
        assert got["map_all"] == pytest.approx(ref["map_all"], abs=1e-6)
