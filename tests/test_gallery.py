"""The on-disk gallery: persistence, atomic batches, incremental bookkeeping, model identity, search modes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zsbir_infer.gallery import (
    FileRecord,
    FileStat,
    Gallery,
    GalleryError,
    Hit,
    ModelMismatchError,
    store,
)
from zsbir_infer.gallery.search import reference_topk
from zsbir_infer.itq import ITQ, hamming_distance

FP = "0123456789abcdef"


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _records(names: list[str], size: int = 10, mtime: int = 1000) -> list[FileRecord]:
    return [FileRecord(n, size, mtime, f"sha-{n}") for n in names]


def _ref_hits(g: Gallery, stored: np.ndarray, paths: list[str], queries: np.ndarray, k: int, dead=None):
    ids = reference_topk(stored, queries, k, dead)
    return [[(paths[i], int(i)) for i in row] for row in ids]


def _as_pairs(hits: list[list[Hit]]) -> list[list[tuple[str, int]]]:
    return [[(h.path, h.id) for h in row] for row in hits]


# ---------------------------------------------------------------------------------------------- basics


def test_create_add_reopen_persists(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = _unit(rng, 300, 16)
    names = [f"cls{i % 3}/img{i:04d}.jpg" for i in range(300)]
    g = Gallery.create(tmp_path / "g", FP, 16, segment_rows=128)
    assert g.add(_records(names[:200]), x[:200]) == list(range(200))
    assert g.add(_records(names[200:]), x[200:]) == list(range(200, 300))
    before = g.search(x[:5], k=7, exact=True)
    g.close()
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["format"] == "zsbir-gallery" and manifest["format_version"] == 2
    assert manifest["fingerprint"] == FP and manifest["dim"] == 16 and manifest["metric"] == "ip"
    assert manifest["storage"] == "float16"
    with Gallery.open(tmp_path / "g", fingerprint=FP) as g2:
        assert len(g2) == 300
        assert g2.search(x[:5], k=7, exact=True) == before
        st = g2.stats()
        assert (st.files_indexed, st.rows, st.dead_rows, st.segments) == (300, 300, 0, 3)
        assert st.bytes_vectors == 300 * 16 * 2
        stored = g2.vectors(np.arange(300))
        np.testing.assert_array_equal(stored, x.astype(np.float16).astype(np.float32))
        # Every vector finds its own file first.
        hits = g2.search(x, k=1, exact=True)
        assert [h[0].path for h in hits] == names


def test_create_errors(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="storage must be one of"):
        Gallery.create(tmp_path / "a", FP, 8, storage="float64")
    with pytest.raises(GalleryError, match="needs a fitted ITQ model"):
        Gallery.create(tmp_path / "b", FP, 8, storage="itq")
    with pytest.raises(GalleryError, match="dim must be"):
        Gallery.create(tmp_path / "c", FP, 0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(GalleryError, match="not an empty directory"):
        Gallery.create(tmp_path / "d", FP, 8)
    Gallery.create(tmp_path / "e", FP, 8).close()
    with pytest.raises(GalleryError, match="already holds a gallery"):
        Gallery.create(tmp_path / "e", FP, 8)
    Gallery.create(tmp_path / "e", FP, 8, exist_ok=True).close()
    with pytest.raises(ModelMismatchError):
        Gallery.create(tmp_path / "e", "other", 8, exist_ok=True)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="is not a gallery"):
        Gallery.open(tmp_path)
    Gallery.create(tmp_path / "g", FP, 8).close()
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "g" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GalleryError, match="format version 99"):
        Gallery.open(tmp_path / "g")


def test_model_mismatch_is_clear(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    g = Gallery.create(tmp_path / "g", FP, 8)
    g.add(_records(["a.jpg"]), _unit(rng, 1, 8))
    with pytest.raises(ModelMismatchError) as e:
        g.search(_unit(rng, 1, 8), k=1, fingerprint="feedbeeffeedbeef")
    msg = str(e.value)
    assert FP in msg and "feedbeeffeedbeef" in msg and "re-index" in msg
    assert e.value.gallery_fingerprint == FP and e.value.model_fingerprint == "feedbeeffeedbeef"
    g.close()
    with pytest.raises(ModelMismatchError, match="feedbeeffeedbeef"):
        Gallery.open(tmp_path / "g", fingerprint="feedbeeffeedbeef")
    with Gallery.open(tmp_path / "g", fingerprint=FP) as g2:
        assert g2.search(_unit(rng, 1, 8), k=1, fingerprint=FP)[0][0].path == "a.jpg"


def test_add_validation_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    g = Gallery.create(tmp_path / "g", FP, 8)
    x = _unit(rng, 2, 8)
    with pytest.raises(GalleryError, match="shape"):
        g.add(_records(["a", "b"]), x[:1])
    with pytest.raises(GalleryError, match="L2-normalized"):
        g.add(_records(["a", "b"]), x * 2)
    bad = x.copy()
    bad[1, 0] = np.nan
    with pytest.raises(GalleryError, match="NaN"):
        g.add(_records(["a", "b"]), bad)
    with pytest.raises(GalleryError, match="twice"):
        g.add(_records(["a", "a"]), x)
    for rel in ["/abs.jpg", "../up.jpg", "a/./b.jpg", "a\\b.jpg", "", "a//b.jpg"]:
        with pytest.raises(GalleryError, match="path"):
            g.add(_records([rel]), x[:1])
    with pytest.raises(GalleryError, match=r"dimension|shape"):
        g.add(_records(["a"]), _unit(rng, 1, 9))
    assert len(g) == 0 and g.stats().rows == 0
    assert not any((tmp_path / "g" / "segments").iterdir())
    with pytest.raises(GalleryError, match="k must be"):
        g.search(x, k=0)
    with pytest.raises(GalleryError, match="queries must have shape"):
        g.search(np.ones((1, 3), np.float32), k=1)
    g.close()


# ------------------------------------------------------------------------------------------ atomicity


class _Crash(Exception):
    pass


def test_crash_between_append_and_commit_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = _unit(rng, 150, 8)
    g = Gallery.create(tmp_path / "g", FP, 8, segment_rows=100)
    g.add(_records([f"a{i}" for i in range(60)]), x[:60])

    def crash(path: Path) -> None:  # the last step before the metadata commit: vectors appended and fsynced
        raise _Crash

    monkeypatch.setattr(store, "_fsync_dir", crash)
    with pytest.raises(_Crash):
        g.add(_records([f"b{i}" for i in range(70)]), x[60:130])  # spans segment 0 and a new segment 1
    monkeypatch.undo()
    seg = tmp_path / "g" / "segments"
    # The vectors were written (garbage past the committed length) ...
    assert (seg / "000000.f16").stat().st_size == 100 * 8 * 2
    assert (seg / "000001.f16").stat().st_size == 30 * 8 * 2
    g.close()
    # ... but the reopened gallery ignores them.
    g = Gallery.open(tmp_path / "g")
    assert len(g) == 60 and g.stats().rows == 60
    assert all(h.path.startswith("a") for row in g.search(x[60:130], k=5, exact=True) for h in row)
    assert {p for p, _ in g.indexed()} == {f"a{i}" for i in range(60)}
    # The next batch overwrites the garbage and is found.
    assert g.add(_records([f"c{i}" for i in range(50)]), x[100:150]) == list(range(60, 110))
    assert (seg / "000000.f16").stat().st_size == 100 * 8 * 2
    assert (seg / "000001.f16").stat().st_size == 10 * 8 * 2
    hits = g.search(x[100:150], k=1, exact=True)
    assert [h[0].path for h in hits] == [f"c{i}" for i in range(50)]
    g.close()


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from zsbir_infer.gallery import FileRecord, Gallery

    path, n_ok, n_total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = np.load(sys.argv[4])
    g = Gallery.open(path)
    plan = g._plan([(f"p{i}.jpg", 1, i) for i in range(n_total)])
    todo = [int(f.relpath[1:-4]) for f in plan.new + plan.changed]
    batches = [todo[i : i + 40] for i in range(0, len(todo), 40)]
    done = 0
    for b in batches:
        if done + len(b) > n_ok:  # killed after the vectors are appended (and fsynced), before the commit
            append = g._segfiles.append
            g._segfiles.append = lambda seg, parts: (append(seg, parts), os._exit(9))
        g.add([FileRecord(f"p{i}.jpg", 1, i) for i in b], x[b])
        done += len(b)
    print("finished", done)
    """
)


def test_killed_indexer_rerun_indexes_every_file_exactly_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 200
    x = _unit(rng, n, 8)
    np.save(tmp_path / "x.npy", x)
    Gallery.create(tmp_path / "g", FP, 8, segment_rows=64).close()
    script = tmp_path / "indexer.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(tmp_path / "g")]
    first = subprocess.run([*args, "100", str(n), str(tmp_path / "x.npy")], capture_output=True, text=True, env=env)
    assert first.returncode == 9, first.stderr
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 80  # two batches of 40 committed, the third was killed
    second = subprocess.run([*args, str(n), str(n), str(tmp_path / "x.npy")], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert "finished 120" in second.stdout
    with Gallery.open(tmp_path / "g") as g:
        indexed = g.indexed()
        assert len(indexed) == n and len({p for p, _ in indexed}) == n
        assert sorted(i for _, i in indexed) == list(range(n))  # no row wasted: garbage was overwritten
        hits = g.search(x, k=1, exact=True)
        assert [h[0].path for h in hits] == [f"p{i}.jpg" for i in range(n)]
        assert g._plan([(f"p{i}.jpg", 1, i) for i in range(n)]).unchanged == [f"p{i}.jpg" for i in range(n)]


def test_manifest_written_atomically(tmp_path: Path) -> None:
    Gallery.create(tmp_path / "g", FP, 8).close()
    assert not list(tmp_path.glob("g/*.tmp"))
    # A directory without a manifest (a create interrupted before its last step) is not a gallery.
    (tmp_path / "g" / "manifest.json").unlink()
    with pytest.raises(GalleryError, match="not a gallery"):
        Gallery.open(tmp_path / "g")


# ----------------------------------------------------------------------------- incremental bookkeeping


def test_plan_skip_delete_change(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 10, 8)
    g = Gallery.create(tmp_path / "g", FP, 8)
    g.add([FileRecord("a.jpg", 1, 10), FileRecord("b.jpg", 2, 20), FileRecord("c.jpg", 3, 30)], x[:3])
    g._skip(FileStat("broken.jpg", 5, 50), "cannot decode: truncated JPEG")
    listing = [("a.jpg", 1, 10), ("b.jpg", 2, 21), ("broken.jpg", 5, 50), ("d.jpg", 4, 40)]
    plan = g._plan(listing)
    assert [f.relpath for f in plan.new] == ["d.jpg"]
    assert plan.new[0] == FileStat("d.jpg", 4, 40)
    assert [f.relpath for f in plan.changed] == ["b.jpg"]
    assert sorted(plan.unchanged) == ["a.jpg", "broken.jpg"]
    assert plan.deleted == ["c.jpg"]
    assert g.skipped() == [("broken.jpg", "cannot decode: truncated JPEG")]
    with pytest.raises(GalleryError, match="twice"):
        g._plan([("a.jpg", 1, 1), ("a.jpg", 1, 1)])

    # Apply the plan.
    assert g.delete(plan.deleted) == 1
    assert g.delete(["c.jpg", "never-seen.jpg"]) == 0
    g.add([FileRecord("b.jpg", 2, 21), FileRecord("d.jpg", 4, 40)], x[3:5])
    st = g.stats()
    assert (st.files_indexed, st.files_skipped, st.files_deleted) == (3, 1, 1)
    assert (st.rows, st.dead_rows) == (5, 2)  # old b and c are tombstones
    assert g._plan(listing).new == [] and g._plan(listing).changed == [] and g._plan(listing).deleted == []
    hits = g.search(x[:5], k=5, exact=True)
    assert all(h.path != "c.jpg" for row in hits for h in row)
    assert hits[1][0].path != "b.jpg" or hits[1][0].id == 3  # b.jpg now points at its new vector
    assert dict(g.indexed()) == {"a.jpg": 0, "b.jpg": 3, "d.jpg": 4}
    assert len(hits[0]) == 3  # only 3 live files

    # A skipped file that changes is retried; a deleted file that reappears is new; skipping an indexed
    # file tombstones its vector.
    plan2 = g._plan([("broken.jpg", 6, 51), ("c.jpg", 3, 30), ("a.jpg", 1, 10), ("b.jpg", 2, 21), ("d.jpg", 4, 40)])
    assert [f.relpath for f in plan2.changed] == ["broken.jpg"] and [f.relpath for f in plan2.new] == ["c.jpg"]
    g._skip("a.jpg", "unreadable now")
    assert all(h.path != "a.jpg" for h in g.search(x[0], k=5, exact=True)[0])
    g.close()


def test_skip_many_is_one_all_or_nothing_transaction(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    x = _unit(rng, 2, 8)
    g = Gallery.create(tmp_path / "g", FP, 8)
    g.add([FileRecord("a.jpg", 1, 10), FileRecord("b.jpg", 2, 20)], x)
    # One bad entry (empty reason) rejects the whole batch: nothing of it is recorded.
    with pytest.raises(GalleryError, match="reason"):
        g._skip_many([(FileStat("x.txt", 3, 30), "not an image"), ("a.jpg", "")])
    assert g.skipped() == [] and len(g) == 2
    g._skip_many(
        [(FileStat("x.txt", 3, 30), "not an image"), ("a.jpg", "unreadable"), (FileStat("z.png", 0, 1), "empty")]
    )
    assert g.skipped() == [("a.jpg", "unreadable"), ("x.txt", "not an image"), ("z.png", "empty")]
    assert len(g) == 1 and all(h.path != "a.jpg" for h in g.search(x, k=2, exact=True)[0])
    assert sorted(g._plan([("x.txt", 3, 30), ("z.png", 0, 1), ("b.jpg", 2, 20)]).unchanged) == [
        "b.jpg",
        "x.txt",
        "z.png",
    ]
    g._skip_many([])  # nothing to do
    g.close()


def test_deleted_rows_never_returned_by_any_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = _unit(rng, 500, 16)
    names = [f"f{i}.jpg" for i in range(500)]
    g = Gallery.create(tmp_path / "g", FP, 16)
    g.add(_records(names), x)
    g.build_index()  # an ANN index saved before the deletions
    gone = [names[i] for i in range(0, 500, 3)]
    g.delete(gone)
    dead = np.zeros(500, bool)
    dead[::3] = True
    stored = g.vectors(np.arange(500))
    for exact in (True, False):
        hits = g.search(x[:20], k=10, exact=exact)
        assert all(h.path not in set(gone) for row in hits for h in row)
    assert _as_pairs(g.search(x[:20], k=10, exact=True)) == _ref_hits(g, stored, names, x[:20], 10, dead)
    st = g.stats()  # the searches updated the index in memory only
    assert st.ann_stale and st.ann_state == "stale" and st.ann_vectors == 500
    assert g.build_index() == 500 - len(gone)
    st = g.stats()
    assert not st.ann_stale and st.ann_state == "current" and st.ann_vectors == 500 - len(gone)
    g.close()


# ------------------------------------------------------------------------------------------- searching


def test_exact_search_matches_float64_reference_with_ties(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = _unit(rng, 3_000, 32)
    x[1_000:1_005] = x[42]  # exact duplicates: ties ordered by id
    names = [f"d{i // 1000}/{i}.png" for i in range(3_000)]
    g = Gallery.create(tmp_path / "g", FP, 32, segment_rows=700)
    for s in range(0, 3_000, 450):
        g.add(_records(names[s : s + 450]), x[s : s + 450])
    stored = g.vectors(np.arange(3_000))
    q = np.concatenate([x[42:43], _unit(rng, 30, 32)])
    hits = g.search(q, k=12, exact=True)
    assert _as_pairs(hits) == _ref_hits(g, stored, names, q, 12)
    assert [h.id for h in hits[0][:6]] == [42, 1000, 1001, 1002, 1003, 1004]
    ref = (q.astype(np.float64) @ stored.astype(np.float64).T).astype(np.float32)
    for qi, row in enumerate(hits):
        assert all(r.score >= s.score for r, s in itertools.pairwise(row))
        for h in row:
            assert h.score == ref[qi, h.id]
    # Single query as a 1-D vector.
    assert _as_pairs(g.search(q[3], k=4, exact=True)) == [_as_pairs(hits)[3][:4]]
    g.close()


def test_ann_recall_persistence_and_staleness(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    n, d = 4_000, 32
    x = _unit(rng, n, d)
    names = [f"{i}.jpg" for i in range(n)]
    g = Gallery.create(tmp_path / "g", FP, d)
    g.add(_records(names[:3_000]), x[:3_000])
    assert g.stats().ann_state == "missing"
    g.search(x[:2], k=3)  # without a saved index: exhaustive, and nothing is written
    assert not (tmp_path / "g" / "ann.usearch").exists() and g.stats().ann_state == "missing"
    assert g.build_index() == 3_000
    q = x[rng.choice(3_000, 50, replace=False)] + 0.3 * _unit(rng, 50, d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = g.search(q, k=10, exact=True)
    approx = g.search(q, k=10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9
    # Scores of ANN hits are the exact scores of those rows.
    exact_scores = {(i, h.id): h.score for i, row in enumerate(g.search(q, k=3_000, exact=True)) for h in row}
    assert all(h.score == exact_scores[(i, h.id)] for i, row in enumerate(approx) for h in row)
    assert (tmp_path / "g" / "ann.usearch").exists() and not g.stats().ann_stale
    # New rows make it stale; the next ANN search updates it in memory (never on disk) and finds them.
    g.add(_records(names[3_000:]), x[3_000:])
    assert g.stats().ann_stale
    saved = (tmp_path / "g" / "ann.usearch").stat().st_mtime_ns
    new_hits = g.search(x[3_000:3_100], k=1)
    assert np.mean([row[0].id == 3_000 + i for i, row in enumerate(new_hits)]) >= 0.95
    assert g.stats().ann_stale and g.stats().ann_rows == 3_000
    assert (tmp_path / "g" / "ann.usearch").stat().st_mtime_ns == saved
    assert g.build_index() == n  # the writer saves it
    new_hits = g.search(x[3_000:3_100], k=1)
    assert not g.stats().ann_stale and g.stats().ann_vectors == n
    g.close()
    # Reopened: the saved index is reused (not rebuilt) and gives the same answers.
    with Gallery.open(tmp_path / "g") as g2:
        mtime = (tmp_path / "g" / "ann.usearch").stat().st_mtime_ns
        again = g2.search(x[3_000:3_100], k=1)
        assert _as_pairs(again) == _as_pairs(new_hits)
        assert (tmp_path / "g" / "ann.usearch").stat().st_mtime_ns == mtime
    # A damaged index file is not trusted: searches are exhaustive (and write nothing) until a writer rebuilds
    # it. The rebuild adds all rows at once, so its graph is not the one built in two steps above and an
    # approximate answer may differ (a CI run saw 1 of 100): it is held to the same bar as the first index.
    (tmp_path / "g" / "ann.usearch").write_bytes(b"garbage")
    with Gallery.open(tmp_path / "g") as g3:
        fallback = g3.search(x[3_000:3_100], k=1)
        assert _as_pairs(fallback) == _as_pairs(g3.search(x[3_000:3_100], k=1, exact=True))
        assert (tmp_path / "g" / "ann.usearch").read_bytes() == b"garbage"
        assert g3.build_index() == n
        rebuilt = g3.search(x[3_000:3_100], k=1)
        assert np.mean([row[0].id == 3_000 + i for i, row in enumerate(rebuilt)]) >= 0.95
        assert g3.stats().ann_vectors == n and not g3.stats().ann_stale
        assert (tmp_path / "g" / "ann.usearch").read_bytes() != b"garbage"


def test_search_with_a_mostly_stale_ann_index_is_exhaustive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved index that covers under half of the rows is not extended in memory by every reader: the search
    is exhaustive (exact) until a writer saves the index again; either way nothing is written."""
    pytest.importorskip("usearch")
    from zsbir_infer.gallery import ann

    rng = np.random.default_rng(21)
    x = _unit(rng, 400, 16)
    names = [f"{i}.jpg" for i in range(400)]
    g = Gallery.create(tmp_path / "g", FP, 16)
    g.add(_records(names[:100]), x[:100])
    assert g.build_index() == 100
    g.add(_records(names[100:]), x[100:])
    calls: list[int] = []
    real = ann.AnnIndex.search
    monkeypatch.setattr(
        ann.AnnIndex, "search", lambda self, q, k, threads=0: calls.append(k) or real(self, q, k, threads)
    )
    saved = (tmp_path / "g" / "ann.json").read_bytes()
    assert _as_pairs(g.search(x[:5], k=3)) == _as_pairs(g.search(x[:5], k=3, exact=True))
    assert calls == [] and (tmp_path / "g" / "ann.json").read_bytes() == saved
    st = g.stats()
    assert (st.ann_state, st.ann_rows, st.rows) == ("stale", 100, 400)
    assert g.build_index() == 400
    g.search(x[:5], k=3)
    assert calls == [3] and g.stats().ann_state == "current"
    g.close()


def test_int8_storage(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    x = _unit(rng, 1_500, 24)
    names = [f"{i}.jpg" for i in range(1_500)]
    g = Gallery.create(tmp_path / "g", FP, 24, storage="int8", segment_rows=1_000)
    g.add(_records(names), x)
    stored = g.vectors(np.arange(1_500))
    # Per-vector scale: max |component| maps to 127, so the error per component is at most scale / 2.
    scale = np.abs(x).max(axis=1) / 127
    assert np.all(np.abs(stored - x) <= scale[:, None] / 2 + 1e-7)
    assert g.stats().bytes_vectors == 1_500 * (24 + 4)
    q = _unit(rng, 200, 24)  # enough queries that the recall estimate below is not a coin toss
    assert _as_pairs(g.search(q, k=8, exact=True)) == _ref_hits(g, stored, names, q, 8)
    g.build_index()
    approx = g.search(q, k=8)
    assert np.mean([a[0].id == e[0] for a, e in zip(approx, reference_topk(stored, q, 1), strict=True)]) >= 0.9
    exact_scores = {(i, h.id): h.score for i, row in enumerate(g.search(q, k=1_500, exact=True)) for h in row}
    assert all(h.score == exact_scores[(i, h.id)] for i, row in enumerate(approx) for h in row)
    g.close()
    with Gallery.open(tmp_path / "g") as g2:
        np.testing.assert_array_equal(g2.vectors(np.arange(1_500)), stored)
        ids = np.array([1_499, 3, 1_000, 999])  # rows from both segments, in any order
        rows, scales = g2._stored_rows(ids)  # as on disk: what a GPU gallery uploads
        assert rows.dtype == np.int8 and scales is not None and scales.dtype == np.float32
        np.testing.assert_array_equal(rows.astype(np.float32) * scales[:, None], stored[ids])
        with pytest.raises(GalleryError):
            g2._stored_rows([1_500])


def test_itq_storage_hamming_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    x = _unit(rng, 2_000, 64)
    itq = ITQ.fit(x, n_bits=64, n_iter=10, seed=0)
    names = [f"{i}.jpg" for i in range(2_000)]
    g = Gallery.create(tmp_path / "g", FP, 64, storage="itq", itq=itq, segment_rows=900)
    g.add(_records(names[:1_000]), x[:1_000])
    g.add(_records(names[1_000:]), x[1_000:])
    g.delete(["5.jpg"])
    assert g.stats().bytes_vectors == 2_000 * 8 and g.manifest["itq"]["n_bits"] == 64
    codes = itq.transform(x)
    np.testing.assert_array_equal(g.vectors(np.arange(2_000)), codes)
    q = _unit(rng, 6, 64)
    qcodes = itq.transform(q)
    dist = hamming_distance(qcodes, codes)
    dist[:, 5] = 10_000  # deleted
    for exact in (True, False):  # ITQ galleries always search exhaustively
        hits = g.search(q, k=15, exact=exact)
        for qi, row in enumerate(hits):
            order = np.lexsort((np.arange(2_000), dist[qi]))[:15]
            assert [h.id for h in row] == order.tolist()
            assert [h.score for h in row] == [float(64 - 2 * dist[qi, i]) for i in order]
    with pytest.raises(GalleryError, match="no ANN index"):
        g.build_index()
    g.close()
    with Gallery.open(tmp_path / "g") as g2:  # the ITQ model is stored in the gallery
        assert _as_pairs(g2.search(q, k=15)) == _as_pairs(hits)


def test_concurrent_searches_and_a_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    x = _unit(rng, 3_000, 16)
    names = [f"{i}.jpg" for i in range(3_000)]
    g = Gallery.create(tmp_path / "g", FP, 16, segment_rows=1_000)
    g.add(_records(names[:2_000]), x[:2_000])
    q = _unit(rng, 40, 16)
    expected_exact = _as_pairs(g.search(q, k=5, exact=True))
    g.build_index()  # the readers' ANN searches add the writer's batches to it in memory
    expected_ann = _as_pairs(g.search(q, k=5))
    errors: list[BaseException] = []
    seen_sizes: list[int] = []

    def reader(i: int) -> None:
        try:
            for _ in range(15):
                res = _as_pairs(g.search(q[i : i + 4], k=5, exact=True))
                # Either before or after the writer's batch: the batch is atomic, so results are one of the two.
                assert res == expected_exact[i : i + 4] or all(len(r) == 5 for r in res)
                assert _as_pairs(g.search(q[i : i + 4], k=5))  # ANN path under concurrency
                seen_sizes.append(len(g))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer() -> None:
        try:
            for s in range(2_000, 3_000, 250):
                g.add(_records(names[s : s + 250]), x[s : s + 250])
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(0, 32, 4)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(seen_sizes) <= {2_000, 2_250, 2_500, 2_750, 3_000}
    stored = g.vectors(np.arange(3_000))
    assert _as_pairs(g.search(q, k=5, exact=True)) == _ref_hits(g, stored, names, q, 5)
    assert expected_ann  # ANN was usable before the writer ran
    g.close()


def test_two_handles_see_each_others_commits(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    x = _unit(rng, 20, 8)
    writer = Gallery.create(tmp_path / "g", FP, 8)
    reader = Gallery.open(tmp_path / "g")
    assert reader.search(x[:1], k=3, exact=True) == [[]]
    writer.add(_records([f"{i}" for i in range(20)]), x)
    assert reader.search(x[:1], k=1, exact=True)[0][0].path == "0"
    writer.delete(["0"])
    assert reader.search(x[:1], k=1, exact=True)[0][0].path != "0"
    writer.close()
    reader.close()
    with pytest.raises(GalleryError, match="closed"):
        reader.search(x[:1], k=1)


# ------------------------------------------------------------------------------------------ compaction


def _itq_for(x: np.ndarray) -> ITQ:
    return ITQ.fit(x, n_bits=64, n_iter=5, seed=0)


@pytest.mark.parametrize("storage", ["float16", "int8", "itq"])
def test_compact_drops_tombstones_and_keeps_answers(tmp_path: Path, storage: str) -> None:
    rng = np.random.default_rng(14)
    d = 64
    x = _unit(rng, 1_200, d)
    itq = _itq_for(x) if storage == "itq" else None
    names = [f"{i}.jpg" for i in range(1_000)]
    g = Gallery.create(tmp_path / "g", FP, d, storage=storage, itq=itq, segment_rows=300)
    g.add(_records(names), x[:1_000])
    g.delete(names[::4])
    g.add([FileRecord(names[1], 10, 2000)], x[1_000:1_001])  # changed file: its old row is a tombstone
    q = _unit(rng, 9, d)
    before = [[(h.path, h.score) for h in row] for row in g.search(q, k=20, exact=True)]
    reader = Gallery.open(tmp_path / "g")
    assert reader.search(q, k=20, exact=True) is not None  # caches the old layout
    if storage != "itq":
        g.build_index()
    live = 1_000 - 250
    assert g.compact() == 1_001 - live
    assert g.compact() == 0
    st = g.stats()
    assert (st.rows, st.dead_rows, st.files_indexed) == (live, 0, live)
    assert sorted(i for _, i in g.indexed()) == list(range(live))
    after = g.search(q, k=20, exact=True)
    assert [[(h.path, h.score) for h in row] for row in after] == before
    assert [[(h.path, h.score) for h in row] for row in reader.search(q, k=20, exact=True)] == before
    files = sorted(f.name for f in (tmp_path / "g" / "segments").iterdir())
    assert len({f.split(".")[0] for f in files}) == st.segments == 3
    if storage != "itq":
        assert not st.ann_stale and st.ann_vectors == live  # compaction rebuilt the index it had
        approx = g.search(q, k=5)
        assert np.mean([a[0].path == b[0][0] for a, b in zip(approx, before, strict=True)]) >= 0.8
    g.add(_records(["new.jpg"]), x[1_100:1_101])
    assert g.search(x[1_100], k=1, exact=True)[0][0].path == "new.jpg"
    reader.close()
    g.close()
    with Gallery.open(tmp_path / "g") as g2:
        assert len(g2) == live + 1


def test_crash_during_compaction_keeps_old_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(15)
    x = _unit(rng, 400, 16)
    names = [f"{i}.jpg" for i in range(400)]
    g = Gallery.create(tmp_path / "g", FP, 16, segment_rows=150)
    g.add(_records(names), x)
    g.delete(names[:100])
    q = _unit(rng, 5, 16)
    before = _as_pairs(g.search(q, k=10, exact=True))

    def crash(path: Path) -> None:
        raise _Crash

    monkeypatch.setattr(store, "_fsync_dir", crash)
    with pytest.raises(_Crash):
        g.compact()
    monkeypatch.undo()
    g.close()
    with Gallery.open(tmp_path / "g") as g2:
        assert _as_pairs(g2.search(q, k=10, exact=True)) == before  # old layout, same ids
        assert g2.stats().dead_rows == 100
        assert g2.compact() == 100
        assert [[p for p, _ in row] for row in _as_pairs(g2.search(q, k=10, exact=True))] == [
            [p for p, _ in row] for row in before
        ]


def test_compact_everything_deleted(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    x = _unit(rng, 50, 8)
    g = Gallery.create(tmp_path / "g", FP, 8)
    g.add(_records([f"{i}" for i in range(50)]), x)
    assert g.search(x[:1], k=1, exact=True)[0][0].path == "0"
    g.delete([f"{i}" for i in range(50)])
    assert g.compact() == 50
    assert g.search(x[:1], k=3, exact=True) == [[]]
    g.add(_records(["again"]), x[7:8])
    assert _as_pairs(g.search(x[7], k=3, exact=True)) == [[("again", 0)]]
    g.close()


def test_warm_query_on_100k_gallery_opens_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm query is served from the mapped segments: it opens, maps and reads no file (its speed is
    measured by benchmarks/, not asserted by a unit test on a shared machine)."""
    import builtins
    import mmap

    rng = np.random.default_rng(17)
    n = 100_000
    x = _unit(rng, n, 64)
    g = Gallery.create(tmp_path / "g", FP, 64)
    g.add([FileRecord(f"{i}.jpg", 1, 1) for i in range(n)], x)
    q = _unit(rng, 9, 64)
    expected = [int(np.argmax(x @ q[i])) for i in range(1, 9)]
    g.search(q[0], k=10, exact=True)
    opened: list[str] = []

    def counting(real: Any, what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            opened.append(f"{what}{args[:1]}")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", counting(builtins.open, "open"))
    monkeypatch.setattr(os, "open", counting(os.open, "os.open"))
    monkeypatch.setattr(mmap, "mmap", counting(mmap.mmap, "mmap"))
    got = [g.search(q[i], k=10, exact=True)[0][0].path for i in range(1, 9)]
    monkeypatch.undo()
    assert got == [f"{j}.jpg" for j in expected]
    assert opened == [], opened
    g.close()


def test_zero_queries(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)
    g = Gallery.create(tmp_path / "g", FP, 8)
    g.add(_records(["a"]), _unit(rng, 1, 8))
    for exact in (True, False):
        assert g.search(np.zeros((0, 8), np.float32), k=3, exact=exact) == []
    g.close()


_ADDER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from zsbir_infer.gallery import FileRecord, Gallery

    path, tag = sys.argv[1], sys.argv[2]
    x = np.load(sys.argv[3])
    g = Gallery.open(path)
    for b in range(6):
        ids = range(b * 25, (b + 1) * 25)
        g.add([FileRecord(f"{tag}/{i}.jpg", 1, i) for i in ids], x[list(ids)])
    g.close()
    """
)


def test_two_processes_adding_concurrently(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    x = _unit(rng, 150, 8)
    np.save(tmp_path / "x.npy", x)
    Gallery.create(tmp_path / "g", FP, 8, segment_rows=64).close()
    script = tmp_path / "adder.py"
    script.write_text(_ADDER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "g"), tag, str(tmp_path / "x.npy")],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Gallery.open(tmp_path / "g") as g:
        indexed = dict(g.indexed())
        assert len(indexed) == 300 and sorted(indexed.values()) == list(range(300))
        stored = g.vectors(np.arange(300))
        for rel, row in indexed.items():
            i = int(rel.split("/")[1][:-4])
            np.testing.assert_array_equal(stored[row], x[i].astype(np.float16).astype(np.float32))


def test_one_hit_type_with_relpath_and_rank(tmp_path: Path) -> None:
    """Gallery, ShardedGallery and Retriever return the same ``Hit`` class: from a gallery, ``path`` equals
    ``relpath`` and ``rank`` counts 1, 2, ... in each result list (also after a delete leaves gaps)."""
    import zsbir_infer
    from zsbir_infer import retriever
    from zsbir_infer.gallery import ShardedGallery

    assert zsbir_infer.Hit is retriever.Hit is Hit
    rng = np.random.default_rng(3)
    x = _unit(rng, 40, 8)
    names = [f"d/img{i:03d}.jpg" for i in range(40)]
    with Gallery.create(tmp_path / "g", FP, 8) as g:
        g.add(_records(names), x)
        g.delete(names[::3])
        for row in g.search(x[:4], k=9, exact=True):
            assert [h.rank for h in row] == list(range(1, len(row) + 1)) and len(row) == 9
            assert all(type(h) is Hit and h.path == h.relpath and h.relpath in names for h in row)
    with ShardedGallery.create(tmp_path / "s", FP, 8, shards=2) as sg:
        from zsbir_infer.gallery.shards import shard_of

        for s, shard in enumerate(sg.shards):
            idx = [i for i, n in enumerate(names) if shard_of(n, 2) == s]
            shard.add(_records([names[i] for i in idx]), x[idx])
        rows = sg.search(x[:4], k=9, exact=True)
    for qi, row in enumerate(rows):
        assert [h.rank for h in row] == list(range(1, 10))
        assert all(type(h) is Hit and h.path == h.relpath for h in row)
        assert row[0].relpath == names[qi]  # each vector finds its own file first
