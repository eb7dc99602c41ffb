"""Gallery format 2 (issue 13): each test reproduces one attack of a hostile but realistic user and checks
the fix. Uses the tiny test bundle (16x16 input) so the file runs in seconds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")

from indexer_support import write_photos
from tiny_bundle import make_bundle

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


def _files(gdir: Path) -> dict[str, np.ndarray]:
    with Gallery.open(gdir) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows])
        st = g.stats()
        assert st.rows - st.dead_rows == st.files_indexed == len(rows)
        return {rel: vecs[j] for j, (rel, _) in enumerate(rows)}


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
            assert len(_files(gdir)) == 3
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".g{trial}")]
            assert leftovers == []
    finally:
        for e in encs:
            e.close()
