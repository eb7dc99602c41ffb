"""Sharded galleries (zsbir_infer.gallery.shards) without Ray: the merged search equals a single gallery holding the
same vectors (exact: same paths, same scores, same order; ANN: exact rescoring per shard), merged ids, stats and
'zsbir info', the Retriever, and merge_shards (compaction into one gallery: same results, incremental, atomic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zsbir_infer.cli import main
from zsbir_infer.gallery import FileRecord, FileStat, Gallery, GalleryError, ModelMismatchError, ann
from zsbir_infer.gallery.shards import ShardedGallery, is_sharded, merge_shards, open_gallery, shard_of

FP = "0123456789abcdef"
DIM = 16
N = 300
SHARDS = 3


def _data(seed: int = 0) -> tuple[list[FileRecord], np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(N, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    recs = [FileRecord(f"d{i % 7}/p{i:04d}.jpg", 1000 + i, 10**18 + i, f"{i:064x}") for i in range(N)]
    return recs, v


def _queries(n: int = 25, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _build(tmp: Path, storage: str = "float16") -> tuple[Path, Path]:
    """The same records and vectors in a single gallery and in a 3-shard gallery (+ a few skips and tombstones)."""
    recs, v = _data()
    single, sharded = tmp / "single", tmp / "sharded"
    with Gallery.create(single, FP, DIM, storage=storage) as g:
        for start in range(0, N, 64):
            g.add(recs[start : start + 64], v[start : start + 64])
        g._skip_many([(FileStat("bad.jpg", 3, 4), "corrupt: test")])
        g.delete(["d1/p0001.jpg", "d2/p0002.jpg"])
    with ShardedGallery.create(sharded, FP, DIM, storage=storage, shards=SHARDS) as sg:
        for start in range(0, N, 64):  # each file goes to its own shard
            sg.add(recs[start : start + 64], v[start : start + 64])
        sg._skip_many([(FileStat("bad.jpg", 3, 4), "corrupt: test")])
        assert sg.delete(["d1/p0001.jpg", "d2/p0002.jpg", "never.jpg"]) == 2
    return single, sharded


def _ranked(hits: list[list[object]]) -> list[list[tuple[str, float]]]:
    return [[(h.path, h.score) for h in row] for row in hits]  # type: ignore[attr-defined]


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_exact_search_equals_a_single_gallery(tmp_path: Path, storage: str) -> None:
    single, sharded = _build(tmp_path, storage)
    q = _queries()
    with Gallery.open(single) as g, open_gallery(sharded) as sg:
        assert isinstance(sg, ShardedGallery) and len(sg.shards) == SHARDS
        # every shard holds some files, and each file lies in its own shard only
        assert all(len(s) > 50 for s in sg.shards)
        for i, shard in enumerate(sg.shards):
            assert {shard_of(p, SHARDS) for p, _ in shard.indexed()} == {i}
        for k in (1, 10, 50, N):
            assert _ranked(sg.search(q, k=k, exact=True)) == _ranked(g.search(q, k=k, exact=True))
        assert len(sg) == len(g) == N - 2
        assert sg.skipped() == g.skipped()
        assert [p for p, _ in sg.indexed()] == [p for p, _ in g.indexed()]
        # merged ids address the right rows
        by_path = dict(g.indexed())
        paths, gids = zip(*sg.indexed(), strict=True)
        np.testing.assert_array_equal(sg.vectors(list(gids)), g.vectors([by_path[p] for p in paths]))
        rows, scales = sg._stored_rows(list(gids))
        srows, sscales = g._stored_rows([by_path[p] for p in paths])
        np.testing.assert_array_equal(rows, srows)
        if storage == "int8":
            assert scales is not None and sscales is not None
            np.testing.assert_array_equal(scales, sscales)
        hit = sg.search(q[:1], k=1, exact=True)[0][0]
        np.testing.assert_array_equal(sg.vectors([hit.id])[0], g.vectors([by_path[hit.path]])[0])


def test_sharded_writes_and_repair_as_one_gallery(tmp_path: Path) -> None:
    """add/delete/repair on a sharded gallery: ids in input order, each file in its shard, damage per shard."""
    recs, v = _data()
    with ShardedGallery.create(tmp_path / "s", FP, DIM, shards=SHARDS, segment_rows=16) as sg:
        ids = sg.add(recs[:100], v[:100])
        assert len(set(ids)) == 100
        np.testing.assert_allclose(sg.vectors(ids), v[:100], atol=2e-3)  # float16 rows, in input order
        assert dict(sg.indexed()) == {r.relpath: i for r, i in zip(recs[:100], ids, strict=True)}
        with pytest.raises(GalleryError, match="twice"):
            sg.add([recs[0], recs[0]], v[:2])
        with pytest.raises(GalleryError, match="vectors"):
            sg.add(recs[100:102], v[100:101])
        assert len(sg) == 100  # nothing of a refused batch was written
        assert sg.delete([r.relpath for r in recs[:10]]) == 10 and len(sg) == 90
        assert sg.repair() == []
        shard = shard_of(recs[50].relpath, SHARDS)
        seg = sorted((tmp_path / "s" / "shards" / f"{shard:03d}" / "segments").glob("*.f16"))[0]
        data = bytearray(seg.read_bytes())
        data[0] ^= 0xFF
        seg.write_bytes(bytes(data))
    with ShardedGallery.open(tmp_path / "s") as sg:
        dropped = sg.repair()
        assert [name for name, _ in dropped] == [f"shards/{shard:03d}/{seg.name}"] and dropped[0][1] > 0
        assert len(sg) == 90 - dropped[0][1] and sg.verify() == []


def test_ann_per_shard_rescored_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single, sharded = _build(tmp_path)
    monkeypatch.setattr(ann, "ANN_MIN_ROWS", 4)
    q = _queries(40)
    with ShardedGallery.open(sharded) as sg:
        assert sg.stats().ann_state == "missing"
        assert sg.build_index() == N - 2
        assert sg.stats().ann_state == "current"
        approx = sg.search(q, k=10)
        exact = sg.search(q, k=10, exact=True)
    with Gallery.open(single) as g:
        found = 0
        for qi, row in enumerate(approx):
            truth = {h.path: h.score for h in g.search(q[qi : qi + 1], k=N, exact=True)[0]}
            for h in row:  # ANN candidates carry the exact scores
                assert h.score == truth[h.path]
            found += len({h.path for h in row} & {h.path for h in exact[qi]})
        assert found >= 0.9 * 10 * len(q)  # recall@10 of the per-shard HNSW


def test_stats_info_and_identity(tmp_path: Path) -> None:
    single, sharded = _build(tmp_path)
    with Gallery.open(single) as g, ShardedGallery.open(sharded, readonly=True) as sg:
        st, one = sg.stats(), g.stats()
        assert (st.files_indexed, st.files_skipped, st.files_deleted) == (
            one.files_indexed,
            one.files_skipped,
            one.files_deleted,
        )
        assert st.rows - st.dead_rows == one.rows - one.dead_rows
        assert [s.files_indexed for s in sg._shard_stats()] == [len(s) for s in sg.shards]
        before = sg._identity()
    with ShardedGallery.open(sharded) as sg:
        sg._skip("d0/p0007.jpg", "corrupt: later")
        assert sg._identity() != before  # a commit to any shard changes the identity
    res = CliRunner().invoke(main, ["info", str(sharded)])
    assert res.exit_code == 0, res.output
    assert "shards       3" in res.output
    assert res.output.count("  shards/00") == 3
    doc = json.loads(CliRunner().invoke(main, ["info", str(sharded), "--json"]).output)
    assert len(doc["shards"]) == 3 and doc["files_indexed"] == N - 3
    res = CliRunner().invoke(main, ["info", str(sharded), "--verify"])
    assert res.exit_code == 0 and "no damage found" in res.output


def test_model_check_and_bad_arguments(tmp_path: Path) -> None:
    _, sharded = _build(tmp_path)
    with pytest.raises(ModelMismatchError):
        ShardedGallery.open(sharded, fingerprint="fedcba9876543210")
    with pytest.raises(ModelMismatchError), ShardedGallery.open(sharded) as sg:
        sg.search(_queries(1), fingerprint="fedcba9876543210")
    with pytest.raises(GalleryError, match="sharded gallery"):
        Gallery.open(sharded)
    with pytest.raises(GalleryError, match="at least 2 shards"):
        ShardedGallery.create(tmp_path / "one", FP, DIM, shards=1)
    with pytest.raises(GalleryError, match="float16 or int8"):
        ShardedGallery.create(tmp_path / "itq", FP, DIM, storage="itq", shards=2)
    with pytest.raises(GalleryError, match="not an empty directory"):
        ShardedGallery.create(sharded, FP, DIM, shards=2)
    assert not (tmp_path / "one").exists() and not (tmp_path / "itq").exists()
    # a missing shard is named
    (sharded / "shards" / "002" / "manifest.json").unlink()
    with pytest.raises(GalleryError, match="shard shards/002 is missing"):
        open_gallery(sharded)


def test_retriever_searches_a_sharded_gallery_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zsbir_infer.encoder import Encoder
    from zsbir_infer.retriever import Retriever

    single, sharded = _build(tmp_path)

    class _Enc:  # embeddings only: the Retriever never calls the model for float queries
        fingerprint = FP

        def close(self) -> None:
            pass

    monkeypatch.setattr(Encoder, "open", classmethod(lambda cls, *a, **k: _Enc()))
    q = _queries(5)
    with Retriever.open(single) as r1, Retriever.open(sharded) as r2:
        a, b = r1.search(q, k=20, exact=True), r2.search(q, k=20, exact=True)
        assert [[(h.relpath, h.score, h.rank) for h in row] for row in a] == [
            [(h.relpath, h.score, h.rank) for h in row] for row in b
        ]
        assert len(r2) == N - 2
        # query expansion reads the hits' vectors back by their (merged) ids
        a, b = r1.search(q, k=10, exact=True, expand=5), r2.search(q, k=10, exact=True, expand=5)
        assert [[(h.relpath, h.score) for h in row] for row in a] == [[(h.relpath, h.score) for h in row] for row in b]


def test_merge_shards_into_one_gallery(tmp_path: Path) -> None:
    single, sharded = _build(tmp_path)
    with ShardedGallery.open(sharded) as sg:
        sg._record_source(tmp_path / "photos", None)
    out = merge_shards(sharded, tmp_path / "merged")
    assert not is_sharded(out)
    q = _queries()
    with Gallery.open(out) as m, ShardedGallery.open(sharded) as sg, Gallery.open(single) as g:
        assert _ranked(m.search(q, k=N, exact=True)) == _ranked(sg.search(q, k=N, exact=True))
        assert _ranked(m.search(q, k=10, exact=True)) == _ranked(g.search(q, k=10, exact=True))
        st = m.stats()
        assert st.dead_rows == 0 and st.files_indexed == N - 2 and st.files_skipped == 1
        assert m._root == str(tmp_path / "photos")
        # sizes and mtimes are kept: the same listing plans as unchanged (an incremental run embeds nothing)
        recs, _ = _data()
        listing = [
            FileStat(r.relpath, r.size, r.mtime_ns) for r in recs if r.relpath not in ("d1/p0001.jpg", "d2/p0002.jpg")
        ]
        plan = m._plan([*listing, FileStat("bad.jpg", 3, 4)])
        assert not plan.new and not plan.changed and not plan.deleted
        with ShardedGallery.open(sharded) as sg:  # the sharded gallery plans the same listing the same way
            splan = sg._plan([*listing, FileStat("bad.jpg", 3, 4)])
            assert not splan.new and not splan.changed and not splan.deleted
            assert sorted(splan.unchanged) == sorted(plan.unchanged)
            srecs = sg._records()
            assert [i for _, i in srecs] == sorted(i for _, i in sg.indexed())  # merged ids, in id order
            assert {r.relpath: i for r, i in srecs} == dict(sg.indexed())
        by = {r.relpath: r for r, _ in m._records()}
        assert by == {r.relpath: r for r, _ in srecs}
        assert by["d0/p0007.jpg"].sha256 == f"{7:064x}"
    with pytest.raises(GalleryError, match="not an empty directory"):
        merge_shards(sharded, out)


def test_merge_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, sharded = _build(tmp_path)
    calls = {"n": 0}
    real_add = Gallery.add

    def failing_add(self: Gallery, records: object, vectors: np.ndarray) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed half-way
        return real_add(self, records, vectors)  # type: ignore[arg-type]

    monkeypatch.setattr(Gallery, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(sharded, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "single"]  # no temporary folder left


def test_cli_merge_shards(tmp_path: Path) -> None:
    _, sharded = _build(tmp_path)
    res = CliRunner().invoke(main, ["index", "-o", str(sharded), "--merge-shards", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    assert f"{N - 2} photos, 1 skipped" in res.output
    res = CliRunner().invoke(main, ["index", "-o", str(tmp_path / "one"), "--merge-shards", str(tmp_path / "two")])
    assert res.exit_code != 0 and "not a sharded gallery" in res.output
    res = CliRunner().invoke(main, ["index", str(tmp_path), "-o", str(sharded)])
    assert res.exit_code != 0 and "is sharded: update it with --engine ray" in res.output
