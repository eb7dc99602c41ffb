"""Gallery format 2 (issue 13): each test reproduces one attack of a hostile but realistic user and checks
the fix. Uses the tiny test bundle (16x16 input) so the file runs in seconds."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")

from indexer_support import deny_reading, gallery_state, write_photos
from tiny_bundle import make_bundle

from zsbir_infer import indexer
from zsbir_infer.encoder import Encoder
from zsbir_infer.gallery import Gallery, store
from zsbir_infer.indexer import IndexingError, index_folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")[0]


@pytest.fixture()
def enc(bundle: Path) -> Any:
    e = Encoder.open(bundle, backend="ort-cpu", batch_size=4, workers=2, threads=1)
    yield e
    e.close()


# ------------------------------------------------------------------ 1. two first-time runs at once


def _index_in_race(root: Path, gdir: Path, e: Encoder, barrier: threading.Barrier, out: list[str]) -> None:
    barrier.wait()
    try:
        index_folder(root, gdir, e)
        out.append("ok")
    except IndexingError as exc:
        assert "another 'zsbir index'" in str(exc)
        out.append("busy")
    except Exception as exc:  # pragma: no cover - the failure this test reproduces
        out.append(f"{type(exc).__name__}: {exc}")


def test_two_first_time_runs_at_once_never_break_the_gallery(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 1: `zsbir index` twice at once on a new gallery (cron + manual run). Creation is
    slowed down to widen the window in which the old code deleted the other run's half-created files."""
    write_photos(tmp_path / "photos", 3)
    real_write = store._write_json_atomic

    def slow_write(path: Path, obj: dict[str, Any]) -> None:
        import time

        time.sleep(0.05)
        real_write(path, obj)

    monkeypatch.setattr(store, "_write_json_atomic", slow_write)
    encs = [Encoder.open(bundle, backend="ort-cpu", batch_size=4, workers=1, threads=1) for _ in range(2)]
    try:
        for trial in range(6):
            gdir = tmp_path / f"g{trial}"
            barrier = threading.Barrier(2)
            outcome: list[str] = []

            threads = [
                threading.Thread(target=_index_in_race, args=(tmp_path / "photos", gdir, e, barrier, outcome))
                for e in encs
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcome) in (["busy", "ok"], ["ok", "ok"]), outcome
            # The gallery is whole: a rerun works and every photo is in it exactly once.
            index_folder(tmp_path / "photos", gdir, encs[0])
            assert len(gallery_state(gdir)) == 3
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".g{trial}")]
            assert leftovers == []
    finally:
        for e in encs:
            e.close()


def test_two_first_time_index_processes_at_once(tmp_path: Path, bundle: Path) -> None:
    """Issue 13 item 1, as reported: `zsbir index ./photos -o gN -q & zsbir index ./photos -o gN -q & wait`."""
    import subprocess
    import sys

    write_photos(tmp_path / "photos", 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_NUM_THREADS": "1"}
    env.pop("ZSBIR_GALLERY", None)
    for trial in range(3):
        gdir = tmp_path / f"g{trial}"
        cmd = [
            sys.executable, "-c", "from zsbir_infer.cli import main; main()", "index", str(tmp_path / "photos"),
            "-o", str(gdir), "--model", str(bundle), "-q", "--workers", "1",
        ]  # fmt: skip
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outs = [(p.wait(timeout=120), p.stderr.read().decode() if p.stderr else "") for p in procs]
        for p in procs:
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        assert any(code == 0 for code, _ in outs), outs
        for code, err in outs:
            assert code == 0 or "another 'zsbir index'" in err, err
        assert len(gallery_state(gdir)) == 4


# ------------------------------------------------------------------ 2. a gallery nobody may write to


def _tree_state(d: Path) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime, content) of every file below ``d``: proves that nothing was written."""
    return {
        str(f.relative_to(d)): (f.stat().st_size, f.stat().st_mtime_ns, f.read_bytes())
        for f in sorted(d.rglob("*"))
        if f.is_file()
    }


def _as_nobody(fn: Any) -> tuple[int, str]:
    """Run ``fn()`` in a forked child that dropped root for the ``nobody`` user (so that file permissions
    apply, as for any user: tests run as root); returns (exit status, what fn returned or the error)."""
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = str(fn())
        except BaseException:
            out, code = traceback.format_exc(), 1
        os.write(w, out.encode("utf-8", "replace"))
        os.close(w)
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


@pytest.fixture()
def world_readable(tmp_path: Path) -> Any:
    """A folder the ``nobody`` user can reach (pytest's tmp_path lies below a root-only folder)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="zsbir-ro-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for f in [d, *d.rglob("*")]:
        if not f.is_symlink():
            f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.rmtree(d)


def _chmod_a_minus_w(d: Path) -> None:
    for f in [d, *d.rglob("*")]:
        f.chmod(f.stat().st_mode & ~0o222)


def test_read_only_gallery_answers_queries_info_and_retriever(world_readable: Path, enc: Encoder) -> None:
    """Issue 13 item 2: `chmod -R a-w` on a gallery (read-only volume, shipped gallery, another user's)."""
    if os.getuid() != 0:
        pytest.skip("drops privileges to 'nobody', which needs root")
    from click.testing import CliRunner

    import zsbir_infer.cli.info  # noqa: F401 - imported before the fork
    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever

    photos = world_readable / "photos"
    write_photos(photos, 6)
    gdir = world_readable / "g"
    index_folder(photos, gdir, enc)
    q = enc.embed([photos / "p0_001.jpg"], "photo")
    with Retriever.open(gdir, model=enc) as r:
        expected = [(h.relpath, round(h.score, 5)) for h in r.search(q, k=3)[0]]
    _chmod_a_minus_w(world_readable)
    before = _tree_state(gdir)

    def reader() -> str:
        assert not os.access(gdir / "meta.sqlite", os.W_OK)
        with Gallery.open(gdir) as g:  # read-only by itself: the folder is not writable
            assert g.readonly
            assert len(g) == 6 and g.stats().files_indexed == 6
            hits = g.search(q, k=3, exact=True)[0]
        with Retriever.open(gdir, model=enc) as r:
            got = [(h.relpath, round(h.score, 5)) for h in r.search(q, k=3)[0]]
        assert got == expected and [h.path for h in hits] == [p for p, _ in expected]
        res = CliRunner().invoke(main, ["info", str(gdir), "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert '"files_indexed": 6' in res.output
        return "ok"

    code, out = _as_nobody(reader)
    assert code == 0 and out == "ok", out
    assert _tree_state(gdir) == before
    # Indexing needs write access: a clear message, not a traceback.
    code, out = _as_nobody(lambda: index_folder(photos, gdir, enc))
    assert code == 1 and "cannot write to gallery" in out and "read-only" in out, out


def test_reader_never_writes_to_a_writable_gallery(
    tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 2: readers open SQLite read-only (mode=ro) and never set WAL or write."""
    import sqlite3

    from click.testing import CliRunner

    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever

    write_photos(tmp_path / "photos", 4)
    gdir = tmp_path / "g"
    index_folder(tmp_path / "photos", gdir, enc)
    statements: list[str] = []
    uris: list[str] = []
    real_connect = sqlite3.connect

    def traced(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        uris.append(str(database))
        con = real_connect(database, *args, **kwargs)
        con.set_trace_callback(statements.append)
        return con

    monkeypatch.setattr(sqlite3, "connect", traced)
    q = enc.embed([tmp_path / "photos" / "p0_000.png"], "photo")
    with Retriever.open(gdir, model=enc) as r:
        assert r.search(q, k=2)[0][0].relpath == "p0_000.png"
    assert CliRunner().invoke(main, ["info", str(gdir)], catch_exceptions=False).exit_code == 0
    assert uris and all("mode=ro" in u or "immutable=1" in u for u in uris), uris
    writes = [s for s in statements if s.split()[0].upper() in ("INSERT", "UPDATE", "DELETE", "CREATE", "PRAGMA")]
    assert [s for s in writes if not s.upper().startswith("PRAGMA BUSY_TIMEOUT")] == []
    with Gallery.open(gdir, readonly=True) as g, pytest.raises(store.GalleryError, match="read-only"):
        g.delete(["p0_000.png"])


def test_a_search_never_writes_the_ann_index_is_saved_by_index(
    tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Design of issue 13: a read never writes, even through a gallery opened writable by the library; the ANN
    index is built and saved by `zsbir index` (and compaction), and a search only loads it."""
    pytest.importorskip("usearch")
    from click.testing import CliRunner

    from zsbir_infer.cli import main
    from zsbir_infer.gallery import FileRecord, ann
    from zsbir_infer.retriever import Retriever

    monkeypatch.setattr(ann, "ANN_MIN_ROWS", 4)  # the policy lives in one place: 'index' builds it from 4 photos
    rels = write_photos(tmp_path / "photos", 6)
    gdir = tmp_path / "g"
    index_folder(tmp_path / "photos", gdir, enc)
    assert (gdir / "ann.usearch").is_file() and (gdir / "ann.json").is_file()
    q = enc.embed([tmp_path / "photos" / r for r in rels[:3]], "photo")
    ann_searches: list[int] = []
    real_search = ann.AnnIndex.search

    def counted(self: Any, queries: np.ndarray, k: int, threads: int = 0) -> list[np.ndarray]:
        ann_searches.append(k)
        return real_search(self, queries, k, threads)

    monkeypatch.setattr(ann.AnnIndex, "search", counted)

    def info() -> str:
        res = CliRunner().invoke(main, ["info", str(gdir)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    def files() -> dict[str, tuple[int, int, bytes]]:
        """Every file of the gallery, except SQLite's own shared-memory file and (empty) write-ahead log, which
        a read-only SQLite connection creates for its locks and cannot remove: they hold no gallery data."""
        state = _tree_state(gdir)
        wal = state.pop("meta.sqlite-wal", None)
        assert wal is None or wal[0] == 0, "a search wrote to SQLite's write-ahead log"
        state.pop("meta.sqlite-shm", None)
        return state

    def search_everywhere() -> list[list[str]]:
        """ANN and exact searches through a writable Gallery, a read-only one and a Retriever."""
        with Gallery.open(gdir, readonly=False) as g:
            approx = [[h.path for h in row] for row in g.search(q, k=3)]
            assert approx == [[h.path for h in row] for row in g.search(q, k=3, exact=True)]
            g.search(q[0], k=20)
        with Gallery.open(gdir, readonly=True) as g:
            assert [[h.path for h in row] for row in g.search(q, k=3)] == approx
        with Retriever.open(gdir, model=enc) as r:
            assert [[h.relpath for h in row] for row in r.search(q, k=3)] == approx
        return approx

    before = files()
    assert "ANN index    6 vectors\n" in info()
    assert [row[0] for row in search_everywhere()] == rels[:3]
    assert files() == before  # every file byte- and mtime-identical, no file added or removed
    assert len(ann_searches) == 4  # the saved index answered (Gallery x 3, Retriever)

    # A stale index (a row added by the library since) is brought up to date in memory only.
    with Gallery.open(gdir, readonly=False) as g:
        g.add([FileRecord("extra.png", 1, 1)], q[:1])
    before = files()
    ann_searches.clear()
    assert [row[0] for row in search_everywhere()][1:] == rels[1:3]
    assert files() == before and len(ann_searches) == 4
    out = info()
    assert "ANN index    6 vectors, stale (saved for 6 of 7 rows): searches add the rest in memory" in out, out
    assert files() == before
    index_folder(tmp_path / "photos", gdir, enc)  # the writer saves it (and drops extra.png, not in the folder)
    assert "ANN index    6 vectors\n" in info()

    # Without a saved index the search is exhaustive, says so in 'zsbir info', and still writes nothing.
    (gdir / "ann.json").unlink()
    (gdir / "ann.usearch").unlink()
    before = files()
    ann_searches.clear()
    search_everywhere()
    assert files() == before and ann_searches == []
    assert "ANN index    not built: searches are exhaustive ('zsbir index' builds it once the gallery holds 4" in info()
    index_folder(tmp_path / "photos", gdir, enc)
    assert (gdir / "ann.usearch").is_file() and "ANN index    6 vectors\n" in info()


# ------------------------------------------------------------------ 3. damaged vectors and catalog


def _flip(path: Path, offset: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_damaged_segment_is_an_error_and_index_re_embeds_only_its_rows(tmp_path: Path, enc: Encoder) -> None:
    """Issue 13 item 3: flipping bytes of segments/000000.f16 gave "cosine" scores of 170.5 while index and
    info called the gallery healthy."""
    from click.testing import CliRunner

    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever

    photos = tmp_path / "photos"
    write_photos(photos, 9)
    gdir = tmp_path / "g"
    # Nine rows per segment: the photos of the first segment only are re-embedded after the repair.
    Gallery.create(gdir, enc.fingerprint, enc.embedding_dim, segment_rows=9).close()
    index_folder(photos, gdir, enc)
    write_photos(photos, 3, seed=1, sub="more")
    index_folder(photos, gdir, enc)
    before = gallery_state(gdir)
    assert len(before) == 12 and (gdir / "segments" / "000001.f16").exists()
    seg0 = gdir / "segments" / "000000.f16"
    _flip(seg0, enc.embedding_dim * 2 * 3 + 1)  # row 3
    q = enc.embed([photos / "p0_003.png"], "photo")
    with Gallery.open(gdir) as g, pytest.raises(store.SegmentDamagedError, match=r"000000\.f16.*zsbir index"):
        g.search(q, k=3, exact=True)
    with pytest.raises(store.SegmentDamagedError, match="checksum"):
        Retriever.open(gdir, model=enc)
    res = CliRunner().invoke(main, ["info", str(gdir)])
    assert res.exit_code == 1 and "000000.f16" in res.output and "zsbir index" in res.output
    res = CliRunner().invoke(main, ["info", str(gdir), "--verify"])
    assert res.exit_code == 1 and "does not match its checksum" in res.output and "Traceback" not in res.output
    report = index_folder(photos, gdir, enc)
    assert any("the 9 photos stored in segments/000000.f16 are embedded again" in n for n in report.notes), report
    assert report.indexed == 9 and report.unchanged == 3
    after = gallery_state(gdir)
    assert after.keys() == before.keys()
    for rel, v in before.items():
        np.testing.assert_allclose(after[rel], v, atol=2e-3)
    with Retriever.open(gdir, model=enc) as r:
        hits = r.search(q, k=3, exact=True)[0]
    assert hits[0].relpath == "p0_003.png" and all(h.score <= 1.001 for h in hits)
    res = CliRunner().invoke(main, ["info", str(gdir), "--verify"])
    assert res.exit_code == 0 and "no damage found" in res.output, res.output


def test_damaged_catalog_is_a_clear_error(tmp_path: Path, enc: Encoder) -> None:
    """Issue 13 item 3: a damaged meta.sqlite gives a message naming PRAGMA quick_check, not a traceback."""
    from click.testing import CliRunner

    from zsbir_infer.cli import main

    write_photos(tmp_path / "photos", 4)
    gdir = tmp_path / "g"
    index_folder(tmp_path / "photos", gdir, enc)
    db = gdir / "meta.sqlite"
    data = bytearray(db.read_bytes())
    data[100 : len(data)] = os.urandom(len(data) - 100)  # everything after the header
    db.write_bytes(bytes(data))
    with pytest.raises(store.GalleryError, match=r"meta\.sqlite.*quick_check.*new gallery"):
        Gallery.open(gdir)
    res = CliRunner().invoke(main, ["info", str(gdir)])
    assert res.exit_code == 1 and "quick_check" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["info", str(gdir), "--verify"])
    assert res.exit_code == 1 and "quick_check" in res.output


def _downgrade_to_format_1(gdir: Path) -> None:
    """What an older zsbir wrote: no checksums column, no uuid, format_version 1."""
    import json
    import sqlite3

    con = sqlite3.connect(gdir / "meta.sqlite")
    con.execute("ALTER TABLE segments DROP COLUMN checksums")
    con.commit()
    con.close()
    m = json.loads((gdir / "manifest.json").read_text())
    m["format_version"] = 1
    del m["uuid"]
    (gdir / "manifest.json").write_text(json.dumps(m))


def test_format_1_gallery_opens_read_only_and_is_upgraded_by_index(tmp_path: Path, enc: Encoder) -> None:
    import json

    photos = tmp_path / "photos"
    write_photos(photos, 5)
    gdir = tmp_path / "g"
    index_folder(photos, gdir, enc)
    before = gallery_state(gdir)
    _downgrade_to_format_1(gdir)
    with Gallery.open(gdir, readonly=True) as g:
        assert g.format_version == 1 and g.uuid == "" and len(g) == 5
        assert g.verify() == []  # no checksums, but the vectors' lengths are checked
        assert g.search(before["p0_000.png"], k=1, exact=True)[0][0].path == "p0_000.png"
    assert json.loads((gdir / "manifest.json").read_text())["format_version"] == 1  # a reader changes nothing
    report = index_folder(photos, gdir, enc)
    assert report.indexed == 0 and any("from format 1 to 2" in n for n in report.notes)
    m = json.loads((gdir / "manifest.json").read_text())
    assert m["format_version"] == 2 and len(m["uuid"]) == 32
    assert gallery_state(gdir).keys() == before.keys()
    # The checksums written by the upgrade hold: damage is now detected.
    _flip(gdir / "segments" / "000000.f16", 3)
    with Gallery.open(gdir) as g:
        assert any("checksum" in p for p in g.verify())


# ------------------------------------------------------------------ 5. skipped once, skipped forever


def test_a_file_unreadable_once_is_retried(tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 5: after `chmod 644` on a file that was unreadable, a rerun said "0 skipped" and the
    photo never appeared (root reads everything, so the permission error is simulated)."""
    photos = tmp_path / "photos"
    write_photos(photos, 4)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("x")
    with monkeypatch.context() as mp:
        deny_reading(mp, b"p0_001.jpg")
        first = index_folder(photos, tmp_path / "g", enc)
    assert dict(first.skipped)["p0_001.jpg"].startswith("unreadable") and first.indexed == 3
    # chmod 644: the file reads again
    second = index_folder(photos, tmp_path / "g", enc)
    assert second.indexed == 1 and "p0_001.jpg" in gallery_state(tmp_path / "g")
    # Files that fail again for the same reason are not reported (nor written) again.
    assert second.skipped == [] and second.unchanged == 3 + 2
    with Gallery.open(tmp_path / "g") as g:
        assert sorted(r for r, _ in g.skipped()) == ["broken.jpg", "notes.txt"]


# ------------------------------------------------------------------ 6. symbolic links leaving the root


def test_links_out_of_the_photo_folder_are_not_followed_by_default(tmp_path: Path, enc: Encoder) -> None:
    """Issue 13 item 6: `ln -s / photos/x` indexed 43,536 files of the whole system."""
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    write_photos(tmp_path / "elsewhere", 3)
    os.symlink("/", photos / "x")
    os.symlink(tmp_path / "elsewhere", photos / "linked_dir")
    os.symlink(tmp_path / "elsewhere" / "p0_001.jpg", photos / "linked_file.jpg")
    os.symlink("p0_000.png", photos / "inside_link.png")  # stays inside: followed as before
    report = index_folder(photos, tmp_path / "g", enc)
    skipped = dict(report.skipped)
    for name in ("x", "linked_dir", "linked_file.jpg"):
        assert skipped[name].startswith("outside-root: ") and "--follow-links" in skipped[name], skipped
    assert sorted(gallery_state(tmp_path / "g")) == ["inside_link.png", "p0_000.png", "p0_001.jpg"]
    os.unlink(photos / "x")
    report = index_folder(photos, tmp_path / "g2", enc, follow_links=True)
    assert sorted(gallery_state(tmp_path / "g2")) == sorted(
        ["inside_link.png", "p0_000.png", "p0_001.jpg", "linked_file.jpg"]
        + [f"linked_dir/{n}" for n in ("p0_000.png", "p0_001.jpg", "p0_002.jpg")]
    )


# ------------------------------------------------------------------ 7. a tampered catalog


def test_tampered_catalog_path_is_never_shown_or_opened(tmp_path: Path, bundle: Path, enc: Encoder) -> None:
    """Issue 13 item 7: a relpath edited to ../../outside/private.png was printed by query and embedded as
    a thumbnail by --html."""
    import sqlite3

    from click.testing import CliRunner

    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever

    photos = tmp_path / "project" / "photos"
    write_photos(photos, 3)
    write_photos(tmp_path / "outside", 1)
    (tmp_path / "outside" / "p0_000.png").rename(tmp_path / "outside" / "private.png")
    gdir = tmp_path / "g"
    index_folder(photos, gdir, enc)
    con = sqlite3.connect(gdir / "meta.sqlite")
    con.execute("UPDATE files SET relpath = '../../outside/private.png' WHERE relpath = 'p0_000.png'")
    con.commit()
    con.close()
    q = enc.embed([photos / "p0_000.png"], "photo")
    with Retriever.open(gdir, model=enc) as r, pytest.raises(store.GalleryError, match="does not lie inside"):
        r.search(q, k=3)
    with Gallery.open(gdir) as g:
        with pytest.raises(store.GalleryError, match=r"'\.\./\.\./outside/private\.png'.*inside"):
            g.indexed()
        assert any("does not lie inside" in p for p in g.verify())
    sketch = photos / "p0_000.png"
    html = tmp_path / "out.html"
    res = CliRunner().invoke(
        main, ["query", str(sketch), "--gallery", str(gdir), "--model", str(bundle), "--html", str(html), "-k", "3"]
    )
    assert res.exit_code == 1 and "does not lie inside" in res.output and "private" not in res.output.split("'")[0]
    assert not html.exists()
    # The page writer never opens such a path either, whatever gives it the hits.
    from zsbir_infer.report import render_html
    from zsbir_infer.retriever import Hit

    page = render_html(
        [store_result(sketch, Hit(str(tmp_path / "outside" / "private.png"), "../../outside/private.png", 1.0, 0, 1))]
    )
    assert "data:image/jpeg" not in page.split("</figure>", 1)[1]


def store_result(sketch: Path, hit: Any) -> Any:
    from zsbir_infer.report import QueryResult

    return QueryResult(str(sketch), sketch, [hit])


# ------------------------------------------------------------------ 4. moving the folder


@pytest.mark.parametrize("layout", ["beside", "inside"])
def test_moving_the_whole_tree_keeps_the_gallery_working(tmp_path: Path, enc: Encoder, layout: str) -> None:
    """Issue 13 item 4: after `mv project project2`, query printed paths that did not exist and index refused
    the new location."""
    from zsbir_infer.retriever import Retriever

    project = tmp_path / "project"
    photos = project / "photos"
    write_photos(photos, 4)
    gdir = project / ".zsbir" if layout == "beside" else photos / ".zsbir"
    index_folder(photos, gdir, enc)
    q = enc.embed([photos / "p0_001.jpg"], "photo")
    project.rename(tmp_path / "project2")
    photos2 = tmp_path / "project2" / "photos"
    gdir2 = tmp_path / "project2" / gdir.relative_to(project)
    with Retriever.open(gdir2, model=enc) as r:
        hit = r.search(q, k=1)[0][0]
    assert hit.path == str(photos2 / "p0_001.jpg") and os.path.exists(hit.path)
    report = index_folder(photos2, gdir2, enc)
    assert (report.indexed, report.unchanged) == (0, 4)
    assert indexer.read_indexer_info(gdir2)["root"] == str(photos2.resolve())


def test_index_root_re_points_a_gallery_whose_photos_moved(tmp_path: Path, enc: Encoder) -> None:
    from click.testing import CliRunner

    from zsbir_infer.cli import main

    write_photos(tmp_path / "photos", 3)
    gdir = tmp_path / "galleries" / "g"
    index_folder(tmp_path / "photos", gdir, enc)
    (tmp_path / "disk2").mkdir()
    (tmp_path / "photos").rename(tmp_path / "disk2" / "photos")
    new = tmp_path / "disk2" / "photos"
    with pytest.raises(IndexingError, match=r"zsbir index --root .*disk2/photos"):
        index_folder(new, gdir, enc)
    report = index_folder(new, gdir, enc, repoint=True)
    assert (report.indexed, report.unchanged, report.deleted) == (0, 3, 0)
    assert indexer.read_indexer_info(gdir)["root"] == str(new.resolve())
    # The command line: --root NEW (moving the photos back).
    (tmp_path / "disk2" / "photos").rename(tmp_path / "photos")
    model = str(enc.bundle.path)
    res = CliRunner().invoke(
        main, ["index", "--root", str(tmp_path / "photos"), "-o", str(gdir), "--model", model, "-q"]
    )
    assert res.exit_code == 0 and "3 unchanged" in res.output, res.output
    # $ZSBIR_GALLERY names the gallery for index as for query and info (issue 13 item 12).
    os.environ["ZSBIR_GALLERY"] = str(gdir)
    try:
        res = CliRunner().invoke(main, ["index", str(tmp_path / "photos"), "--model", model, "-q"])
    finally:
        del os.environ["ZSBIR_GALLERY"]
    assert res.exit_code == 0 and "3 unchanged" in res.output and str(gdir) in res.output, res.output


# ------------------------------------------------------------------ 11. clear errors instead of tracebacks


def test_full_disk_is_a_clear_error_and_the_rerun_continues(
    tmp_path: Path, enc: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 11: `database or disk is full` and ENOSPC gave tracebacks."""
    import errno
    import sqlite3

    photos = tmp_path / "photos"
    write_photos(photos, 6)
    gdir = tmp_path / "g"
    real_pwrite = os.pwrite

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(store.GalleryError, match=r"disk holding gallery .* is full.*free some space and rerun"):
        index_folder(photos, gdir, enc)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    # SQLite's own "database or disk is full": the catalog may not grow by a single page.
    real_connect = Gallery._connect

    def capped(self: Gallery) -> sqlite3.Connection:
        con = real_connect(self)
        if not self.readonly:
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count = {pages}")
        return con

    monkeypatch.setattr(Gallery, "_connect", capped)
    write_photos(photos, 300, seed=3, sub="many")
    with pytest.raises(store.GalleryError, match=r"is full \(database or disk is full\).*rerun"):
        index_folder(photos, gdir, enc)
    monkeypatch.setattr(Gallery, "_connect", real_connect)
    index_folder(photos, gdir, enc)
    assert len(gallery_state(gdir)) == 306


def test_query_input_errors_are_clear(tmp_path: Path, bundle: Path, enc: Encoder) -> None:
    """Issue 13 item 11: a directory as a sketch ("not found"), k larger than the gallery (allocated for k),
    an empty (0 x 0) array as a query (embedded as a blank image)."""
    import time

    from click.testing import CliRunner
    from PIL import Image

    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever, RetrieverError

    write_photos(tmp_path / "photos", 3)
    gdir = tmp_path / "g"
    index_folder(tmp_path / "photos", gdir, enc)
    res = CliRunner().invoke(main, ["query", str(tmp_path / "photos"), "--gallery", str(gdir), "--model", str(bundle)])
    assert res.exit_code == 1 and "is a folder, not a sketch image" in res.output
    q = enc.embed([tmp_path / "photos" / "p0_000.png"], "photo")
    t0 = time.perf_counter()
    with Gallery.open(gdir) as g:
        assert [len(r) for r in g.search(np.repeat(q, 2, axis=0), k=10**12, exact=True)] == [3, 3]
        assert len(g.search(q, k=10**12)[0]) == 3  # the ANN path too
    with Retriever.open(gdir, model=enc) as r:
        assert len(r.search(q, k=10**12)[0]) == 3
        for empty in (np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.float32), np.zeros((5, 0, 3), np.uint8)):
            with pytest.raises(RetrieverError, match="empty array"):
                r.search(empty)
        with pytest.raises(RetrieverError, match="empty image"):
            r.search(Image.new("RGB", (0, 0)))
        with pytest.raises(RetrieverError, match="no queries"):
            r.search(np.zeros((0, enc.embedding_dim), np.float32))
    assert time.perf_counter() - t0 < 30


def test_absurd_preprocessing_size_in_a_bundle_is_a_clear_error(tmp_path: Path) -> None:
    """Issue 13 item 11: a bundle whose preprocessing size is absurd gave a raw MemoryError."""
    import json

    from zsbir_infer.bundle import Bundle, BundleError

    b = make_bundle(tmp_path / "b")[0]
    m = json.loads((b / "manifest.json").read_text())
    m["inputs"]["image"]["shape"] = ["batch", 3, "height", "width"]
    m["preprocess"]["photo"]["size"] = [100000, 100000]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"preprocess\.photo.*absurd.*re-export"):
        Bundle.open(b)


# ------------------------------------------------------------------ 9. a stale Retriever


def test_stale_retriever_notices_a_gallery_deleted_and_rebuilt(tmp_path: Path, enc: Encoder, bundle: Path) -> None:
    """Issue 13 item 9: a Retriever served deleted photos after its gallery was deleted and rebuilt."""
    import shutil

    from tiny_bundle import make_weights

    from zsbir_infer.retriever import Retriever

    write_photos(tmp_path / "a", 4, seed=0)
    write_photos(tmp_path / "b", 3, seed=5)
    gdir = tmp_path / "g"
    index_folder(tmp_path / "a", gdir, enc)
    q = enc.embed([tmp_path / "a" / "p0_001.jpg"], "photo")
    r = Retriever.open(gdir, model=enc)
    try:
        uuid_a = r.gallery.uuid
        assert {h.relpath for h in r.search(q, k=10)[0]} == {"p0_000.png", "p0_001.jpg", "p0_002.jpg", "p0_003.png"}
        shutil.rmtree(gdir)
        with pytest.raises(store.GalleryError, match="was deleted"):
            r.search(q, k=10)
        index_folder(tmp_path / "b", gdir, enc)  # same generation count as before, another gallery
        hits = r.search(q, k=10)[0]
        assert r.gallery.uuid != uuid_a
        assert {h.relpath for h in hits} == {"p5_000.png", "p5_001.jpg", "p5_002.jpg"}
        assert all(h.path.startswith(str(tmp_path / "b")) and os.path.exists(h.path) for h in hits)
        # Rebuilt with another model: refused, not mixed.
        other = Encoder.open(make_bundle(tmp_path / "b2", weights=make_weights(seed=7))[0], backend="ort-cpu")
        try:
            shutil.rmtree(gdir)
            index_folder(tmp_path / "b", gdir, other)
        finally:
            other.close()
        with pytest.raises(store.GalleryError, match="replaced by another gallery"):
            r.search(q, k=10)
    finally:
        r.close()


# ------------------------------------------------------------------ 10. a spoofed bundle


def test_spoofed_bundle_fingerprint_is_recomputed_not_trusted(tmp_path: Path, enc: Encoder) -> None:
    """Issue 13 item 10: a bundle with changed weights, the default model's fingerprint and no sha256 was
    accepted for a default-model gallery."""
    import json
    import shutil

    from tiny_bundle import make_weights

    from zsbir_infer.bundle import Bundle, BundleError

    good = make_bundle(tmp_path / "good")[0]
    spoof = make_bundle(tmp_path / "spoof", weights=make_weights(seed=7))[0]
    m = json.loads((spoof / "manifest.json").read_text())
    m["fingerprint"] = Bundle.open(good).fingerprint
    for entry in m["models"].values():
        entry.pop("sha256", None)
        entry.pop("bytes", None)
    (spoof / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"fingerprint .* give .*changed after export.*Re-export"):
        Bundle.open(spoof)
    with pytest.raises(BundleError, match="changed after export"):
        Encoder.open(spoof, backend="ort-cpu")
    # Changed preprocessing with the old fingerprint: refused too.
    shutil.copytree(good, tmp_path / "pre")
    m = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    m["preprocess"]["sketch"]["interpolation"] = "nearest"
    (tmp_path / "pre" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="changed after export"):
        Bundle.open(tmp_path / "pre")
    assert Bundle.open(good).fingerprint == json.loads((good / "manifest.json").read_text())["fingerprint"]


# ------------------------------------------------------------------ 12. names that are not UTF-8


def test_non_utf8_file_names_are_indexed_losslessly_and_shown_escaped(
    tmp_path: Path, bundle: Path, enc: Encoder
) -> None:
    """Issue 13 item 12: such files are real photos (old archives, other locales); they were skipped."""
    import json

    from click.testing import CliRunner

    from zsbir_infer.cli import main
    from zsbir_infer.retriever import Retriever

    photos = tmp_path / "photos"
    write_photos(photos, 2)
    raw = os.path.join(os.fsencode(photos), b"caf\xe9", b"r\xe9sum\xe9.jpg")  # Latin-1 folder and file names
    os.makedirs(os.path.dirname(raw))
    with open(raw, "wb") as fh:
        fh.write((photos / "p0_001.jpg").read_bytes())
    gdir = tmp_path / "g"
    report = index_folder(photos, gdir, enc)
    rel = os.fsdecode(b"caf\xe9/r\xe9sum\xe9.jpg")
    assert report.indexed == 3 and report.skipped == []
    assert rel in gallery_state(gdir)
    assert index_folder(photos, gdir, enc).unchanged == 3  # found again under the same (lossless) name
    q = enc.embed([photos / "p0_001.jpg"], "photo")
    with Retriever.open(gdir, model=enc) as r:
        hits = r.search(q, k=3)[0]
    by_rel = {h.relpath: h for h in hits}
    assert os.fsencode(by_rel[rel].path) == raw and os.path.exists(by_rel[rel].path)
    base = ["query", str(photos / "p0_001.jpg"), "--gallery", str(gdir), "--model", str(bundle), "-k", "3"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0 and "caf\\xe9/r\\xe9sum\\xe9.jpg" in res.output, res.output
    res = CliRunner().invoke(main, [*base, "--json", "--html", str(tmp_path / "page.html")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert rel in {h["relpath"] for h in doc["queries"][0]["results"]}  # JSON escapes it losslessly (\\udce9)
    assert "caf\\xe9/r\\xe9sum\\xe9.jpg" in (tmp_path / "page.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------ 8. memory amplification


def test_decoding_memory_is_bounded_across_workers(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 8: 16 small PNGs of huge LA images took 4.6 GB with 8 workers. Decodes now reserve
    their size in a process-wide budget, so huge images are decoded one after the other."""
    from PIL import Image

    from zsbir_infer import preprocess

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("LA", (1500, 1500), (i * 20, 255)).save(photos / f"big{i}.png", optimize=True)
    one = preprocess.decode_bytes_estimate(Image.new("LA", (1500, 1500)))
    assert one == 1500 * 1500 * (2 + 4 + 3)
    budget = preprocess.DecodeBudget(int(one * 1.5))  # room for one huge image at a time
    monkeypatch.setattr(preprocess, "DECODE_BUDGET", budget)
    e = Encoder.open(bundle, backend="ort-cpu", batch_size=8, workers=8, threads=1)
    try:
        report = index_folder(photos, tmp_path / "g", e, workers=8)
    finally:
        e.close()
    assert report.indexed == 6
    assert budget.peak == one and budget.used == 0  # never two at once
    # An image larger than the whole budget is still decoded (alone).
    small = preprocess.DecodeBudget(10)
    monkeypatch.setattr(preprocess, "DECODE_BUDGET", small)
    assert preprocess.load_image(photos / "big0.png").size == (1500, 1500)
    assert small.peak == one and small.used == 0


def test_create_into_an_empty_mount_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume mounted as the gallery folder cannot be replaced by a rename (EXDEV/EBUSY): build in place."""
    import errno

    real_rename = os.rename

    def no_rename(src: Any, dst: Any) -> None:
        if Path(dst) == tmp_path / "mnt":
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rename(src, dst)

    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(os, "rename", no_rename)
    g = Gallery.create(tmp_path / "mnt", "0123456789abcdef", 4)
    g.close()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    with Gallery.open(tmp_path / "mnt") as g:
        assert g.uuid and len(g) == 0


# ------------------------------------------------------------------ design: the gallery owns its identity


def test_the_gallery_records_what_it_indexes_and_reads_older_galleries(tmp_path: Path, enc: Encoder) -> None:
    """Design of issue 13: root and model live in the gallery's manifest (not only in the indexer's
    indexer.json); a gallery written before keeps working (read from indexer.json) and the next `zsbir index`
    moves them; the retriever reads them from the gallery and never imports the indexer."""
    import json
    import subprocess
    import sys

    from zsbir_infer.gallery.source import read_source
    from zsbir_infer.retriever import Retriever

    project = tmp_path / "project"
    write_photos(project / "photos", 3)
    gdir = project / ".zsbir"
    index_folder(project / "photos", gdir, enc, model=None)
    manifest = json.loads((gdir / "manifest.json").read_text())
    assert manifest["source"] == {"root": str((project / "photos").resolve()), "root_relative": "../photos",
                                  "model": None, "model_relative": None}  # fmt: skip
    assert "root" not in json.loads((gdir / "indexer.json").read_text())  # the indexer keeps its report only
    with Gallery.open(gdir, readonly=True) as g:
        assert g._root == str((project / "photos").resolve()) and g._source["model"] is None

    # A gallery from before the move: no source in its manifest, root and model in indexer.json.
    legacy = {k: v for k, v in manifest.items() if k != "source"}
    (gdir / "manifest.json").write_text(json.dumps(legacy))
    old_info = json.loads((gdir / "indexer.json").read_text())
    old_info.update({"root": "/nowhere/photos", "root_relative": "../photos", "model": None, "model_relative": None})
    (gdir / "indexer.json").write_text(json.dumps(old_info))
    moved = tmp_path / "moved"
    project.rename(moved)
    gdir = moved / ".zsbir"
    assert read_source(gdir) == {"root": str((moved / "photos").resolve()), "model": None}
    with Retriever.open(gdir, model=enc) as r:
        q = enc.embed([moved / "photos" / "p0_000.png"], "photo")
        assert r.root == str((moved / "photos").resolve())
        assert r.search(q, k=1)[0][0].path == str((moved / "photos" / "p0_000.png").resolve())
    assert indexer.read_indexer_info(gdir)["root"] == str((moved / "photos").resolve())
    report = index_folder(moved / "photos", gdir, enc)  # accepted as the same root; records it in the manifest
    assert report.indexed == 0
    assert json.loads((gdir / "manifest.json").read_text())["source"]["root_relative"] == "../photos"

    # No indexer <-> retriever import cycle: the retriever reads the gallery's identity from the gallery.
    code = "import sys, zsbir_infer.retriever; assert 'zsbir_infer.indexer' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, zsbir_infer.indexer; assert 'zsbir_infer.retriever' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
