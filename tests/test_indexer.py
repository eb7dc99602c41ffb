"""zsbir_infer.indexer: walking (every bad input kind), the pipeline against the encoder, incremental runs,
gallery/model/root checks. Uses the tiny test bundle (16x16 input) so the whole file runs in seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")

from indexer_support import deny_reading, gallery_state, write_bad_inputs, write_photos
from tiny_bundle import make_bundle, make_weights

from zsbir_infer import indexer
from zsbir_infer.encoder import Encoder
from zsbir_infer.gallery import Gallery, ModelMismatchError
from zsbir_infer.indexer import IndexingError, index_folder, read_indexer_info, walk


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")[0]


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b2") / "bundle", weights=make_weights(seed=7))[0]


@pytest.fixture()
def enc(bundle: Path) -> Any:
    e = Encoder.open(bundle, backend="ort-cpu", batch_size=4, workers=2, threads=1)
    yield e
    e.close()


# --------------------------------------------------------------------------------------------- walk


def test_walk_classifies_every_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    expected = write_bad_inputs(root)
    listing = walk(root)
    pre = {e.relpath: e.skip for e in listing.entries}
    unstored = dict(listing.unstored)
    for rel, code in expected.items():
        if code == "odd-name":
            assert unstored[rel].startswith("odd-name: "), rel
        elif code in ("truncated", "too-large") or (code == "not-an-image" and rel == "garbage.png"):
            assert pre[rel] is None, rel  # decided only when decoding
        else:
            assert pre[rel] is not None and pre[rel].startswith(code + ": "), (rel, pre[rel])
    # Hidden entries are ignored; good files (and a link to a file) are candidates; the loop is not followed.
    assert not any(r.startswith(".") or "/." in r for r in pre)
    assert pre["ok.jpg"] is None and pre["ok_link.jpg"] is None and pre["sub/inner.jpg"] is None
    assert not any(r.startswith("sub/up/") or r.startswith("sub_again/") for r in pre)


def test_walk_rejects_missing_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(IndexingError, match="cannot index"):
        walk(tmp_path / "nope")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(IndexingError, match="not a directory"):
        walk(tmp_path / "f.jpg")


def test_walk_excludes_gallery_inside_root(tmp_path: Path, enc: Encoder) -> None:
    write_photos(tmp_path, 3)
    report = index_folder(tmp_path, tmp_path / "gal", enc)  # gallery inside the indexed root
    assert report.indexed == 3 and not report.skipped
    assert set(gallery_state(tmp_path / "gal")) == {p.name for p in tmp_path.glob("p*")}


# ------------------------------------------------------------------------------------ the pipeline


def test_index_matches_encoder_and_skips_bad_inputs(tmp_path: Path, enc: Encoder) -> None:
    root = tmp_path / "photos"
    expected = write_bad_inputs(root)
    good = write_photos(root, 9, sub="a")
    report = index_folder(root, tmp_path / "gal", enc, batch_size=4, workers=2)
    skipped = {rel: why for rel, why in report.skipped}
    for rel, code in expected.items():
        assert skipped[rel].startswith(code + ": "), (rel, skipped.get(rel))
    indexed_rels = {*good, "ok.jpg", "ok_link.jpg", "sub/inner.jpg", os.fsdecode(b"latin\xe9.jpg")}
    assert report.indexed == len(indexed_rels)
    state = gallery_state(tmp_path / "gal")
    assert set(state) == indexed_rels
    # Same vectors as embedding the files directly (stored as float16).
    rels = sorted(indexed_rels)
    ref = enc.embed([root / r for r in rels], "photo")
    got = np.stack([state[r] for r in rels])
    np.testing.assert_allclose(got, ref, atol=2e-3)
    # Skips are stored (except odd names, which cannot be) and counted per code.
    with Gallery.open(tmp_path / "gal") as g:
        stored = dict(g.skipped())
    assert set(stored) == {r for r, c in expected.items() if c != "odd-name"}
    assert report.skip_counts()["odd-name"] == 1
    info = read_indexer_info(tmp_path / "gal")
    assert info["root"] == str(root.resolve()) and info["last_run"]["indexed"] == report.indexed


def test_unreadable_files_are_skipped(tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    write_photos(tmp_path / "p", 4)
    deny_reading(monkeypatch, b"p0_001.jpg")
    report = index_folder(tmp_path / "p", tmp_path / "g", enc)
    assert report.skipped == [("p0_001.jpg", "unreadable: cannot read: Permission denied")]
    assert report.indexed == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_permissions(tmp_path: Path, enc: Encoder) -> None:
    write_photos(tmp_path / "p", 2)
    (tmp_path / "p" / "p0_001.jpg").chmod(0)
    report = index_folder(tmp_path / "p", tmp_path / "g", enc)
    assert [c for _, c in report.skipped] == ["unreadable: cannot read: Permission denied"]


def test_decoder_crash_never_stops_the_run(tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    import zsbir_infer.preprocess as pre

    write_photos(tmp_path / "p", 5)
    real = pre.preprocess_into
    calls = {"n": 0}

    def flaky(image: Any, spec: Any, out: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(image, spec, out, **kw)

    monkeypatch.setattr(pre, "preprocess_into", flaky)
    report = index_folder(tmp_path / "p", tmp_path / "g", enc, workers=1)
    assert report.indexed == 4
    assert len(report.skipped) == 1 and report.skipped[0][1].startswith("corrupt: cannot decode image: MemoryError")


def test_read_file_reads_whole_file_up_to_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.jpg"
    data = os.urandom(5000)
    path.write_bytes(data)
    assert indexer._read_file(os.fsencode(path)) == data
    monkeypatch.setattr(indexer, "MAX_FILE_BYTES", 1000)  # too large: one byte more than the limit is read
    assert indexer._read_file(os.fsencode(path)) == data[:1001]
    monkeypatch.setattr(indexer, "MAX_FILE_BYTES", 5000)
    assert indexer._read_file(os.fsencode(path)) == data


def test_read_file_follows_a_file_that_grew_after_fstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.jpg"
    path.write_bytes(b"a" * 100)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with open(path, "ab") as fh:
            fh.write(b"b" * 50)
        return st

    monkeypatch.setattr(indexer.os, "fstat", fstat_then_grow)
    assert indexer._read_file(os.fsencode(path)) == b"a" * 100 + b"b" * 50


@pytest.mark.parametrize(("batch_size", "workers"), [(4, 1), (4, 2), (7, 3), (32, 2), (1, 2)])
def test_decoded_batches_in_chunks_keep_files_in_order(
    tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch, batch_size: int, workers: int
) -> None:
    from zsbir_infer.preprocess import preprocess

    monkeypatch.setattr(indexer, "DECODE_CHUNK", 3)
    write_photos(tmp_path / "p", 23)
    (tmp_path / "p" / "p0_010.jpg").write_bytes(b"broken")
    entries = walk(tmp_path / "p").entries
    spec = enc.bundle.preprocess_spec("photo")
    seen: list[str] = []
    for part, batch, results in indexer._decoded_batches(entries, enc, batch_size, workers):
        assert len(part) == len(batch) == len(results) <= batch_size
        for e, row, (ok, what) in zip(part, batch, results, strict=True):
            seen.append(e.relpath)
            assert ok == (e.relpath != "p0_010.jpg"), (e.relpath, what)
            if ok:
                np.testing.assert_array_equal(row, preprocess(Path(os.fsdecode(e.path)), spec))
    assert seen == [e.relpath for e in entries]


def test_incremental_add_change_delete(tmp_path: Path, enc: Encoder) -> None:
    root = tmp_path / "photos"
    rels = write_photos(root, 10)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r1 = index_folder(root, tmp_path / "g", enc)
    assert (r1.indexed, r1.unchanged, r1.deleted, len(r1.skipped)) == (10, 0, 0, 1)
    before = gallery_state(tmp_path / "g")

    # Nothing changed: nothing is read again.
    r2 = index_folder(root, tmp_path / "g", enc)
    assert (r2.indexed, r2.unchanged, r2.deleted, len(r2.skipped), r2.new, r2.changed) == (0, 11, 0, 0, 0, 0)

    # Add 2, change 1 (new content), delete 2, fix the broken file.
    added = write_photos(root, 2, seed=1)
    changed = rels[1]
    write_photos(tmp_path / "tmp", 1, seed=2)
    src = next((tmp_path / "tmp").iterdir())
    (root / changed).write_bytes(src.read_bytes())
    st = (root / changed).stat()
    os.utime(root / changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (root / rels[2]).unlink()
    (root / rels[3]).unlink()
    (root / "broken.jpg").unlink()
    write_photos(tmp_path / "fix", 1, seed=3)
    (root / "broken.jpg").write_bytes(next((tmp_path / "fix").iterdir()).read_bytes())
    time.sleep(0.01)
    r3 = index_folder(root, tmp_path / "g", enc)
    assert (r3.new, r3.changed, r3.deleted) == (2, 2, 2)  # 'broken.jpg' changed too
    assert r3.indexed == 4 and not r3.skipped and r3.unchanged == 7
    after = gallery_state(tmp_path / "g")
    assert set(after) == (set(rels) - {rels[2], rels[3]}) | set(added) | {"broken.jpg"}
    for rel in set(rels) - {changed, rels[2], rels[3]}:
        np.testing.assert_array_equal(after[rel], before[rel])  # untouched rows are not rewritten
    ref = enc.embed([root / changed], "photo")[0]
    np.testing.assert_allclose(after[changed], ref, atol=2e-3)
    assert np.abs(after[changed] - before[changed]).max() > 1e-2
    with Gallery.open(tmp_path / "g") as g:
        st2 = g.stats()
    assert (st2.files_indexed, st2.files_skipped, st2.files_deleted) == (11, 0, 2)


def test_gallery_of_another_root_or_model(tmp_path: Path, enc: Encoder, other_bundle: Path) -> None:
    write_photos(tmp_path / "a", 2)
    write_photos(tmp_path / "b", 2)
    index_folder(tmp_path / "a", tmp_path / "g", enc)
    with pytest.raises(IndexingError, match=r"indexes .*/a, not .*/b"):
        index_folder(tmp_path / "b", tmp_path / "g", enc)
    other = Encoder.open(other_bundle, backend="ort-cpu")
    try:
        with pytest.raises(ModelMismatchError, match="fingerprint"):
            index_folder(tmp_path / "a", tmp_path / "g", other)
    finally:
        other.close()


def test_concurrent_run_is_refused(tmp_path: Path, enc: Encoder) -> None:
    import fcntl

    write_photos(tmp_path / "a", 2)
    index_folder(tmp_path / "a", tmp_path / "g", enc)
    fd = os.open(tmp_path / "g" / indexer.RUN_LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # flock locks belong to the open file description: a second open() in this process conflicts.
        with pytest.raises(IndexingError, match="another 'zsbir index'"):
            index_folder(tmp_path / "a", tmp_path / "g", enc)
    finally:
        os.close(fd)


def test_progress_and_plan_callbacks(tmp_path: Path, enc: Encoder) -> None:
    write_photos(tmp_path / "a", 7)
    (tmp_path / "a" / "x.txt").write_text("x")
    seen: list[int] = []
    planned: list[int] = []
    index_folder(tmp_path / "a", tmp_path / "g", enc, batch_size=3, progress=seen.append, on_plan=planned.append)
    assert planned == [8] and sum(seen) == 8


def test_report_to_dict_is_json(tmp_path: Path, enc: Encoder) -> None:
    import json

    write_photos(tmp_path / "a", 2)
    (tmp_path / "a" / "x.txt").write_text("x")
    d = index_folder(tmp_path / "a", tmp_path / "g", enc).to_dict()
    json.dumps(d)
    assert d["skip_counts"] == {"not-an-image": 1} and d["skipped"][0]["path"] == "x.txt"
    assert d["indexed"] == 2 and d["read"] == 2 and d["total_indexed"] == 2 and d["files_per_s"] > 0


def test_gallery_creation_killed_before_its_manifest(tmp_path: Path, enc: Encoder) -> None:
    """Gallery.create writes the manifest last; a run killed before that must not block the rerun."""
    write_photos(tmp_path / "a", 3)
    g = tmp_path / "g"
    (g / "segments").mkdir(parents=True)
    (g / "meta.sqlite").write_bytes(b"")
    (g / "manifest.json.tmp").write_text("{")
    report = index_folder(tmp_path / "a", g, enc)
    assert report.indexed == 3 and len(gallery_state(g)) == 3
    # A folder with anything else in it is never cleared.
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.sqlite").write_bytes(b"")
    (other / "precious.txt").write_text("keep me")
    from zsbir_infer.gallery import GalleryError

    with pytest.raises(GalleryError, match="not an empty directory"):
        index_folder(tmp_path / "a", other, enc)
    assert (other / "precious.txt").read_text() == "keep me"
