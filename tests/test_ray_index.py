"""zsbir index --engine ray (zsbir_infer.ray_index) on a local Ray with 2 CPUs, against the plain indexer: the same
files, vectors and search results (plain and sharded galleries), incremental reruns, bad and poisoned files, the
model and shard-count checks, the CLI, and kill -9 of the driver mid-run followed by a rerun.

One local Ray serves the whole module (started once: about 5 s); the kill test runs the CLI in a subprocess,
which starts and loses its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("ray", reason="the ray extra (pip install 'zsbir[ray]') is not installed")

import ray
from click.testing import CliRunner
from indexer_support import index_argv, write_bad_inputs, write_photos
from tiny_bundle import make_bundle, make_weights

from zsbir_infer.cli import main
from zsbir_infer.encoder import Encoder
from zsbir_infer.gallery import Gallery, ModelMismatchError, ShardedGallery, open_gallery
from zsbir_infer.indexer import IndexingError, index_folder
from zsbir_infer.ray_index import index_folder_ray

TESTS = Path(__file__).resolve().parent
#: Small batches so that a few dozen photos make several decoding tasks, model batches and commits.
#: The options of a `zsbir index --engine ray` subprocess run (with index_argv).
RAY_ARGS = ("--engine", "ray", "--shards", "2", "--decode-batch", "4")
RAY_KW: dict[str, Any] = {"backend": "ort-cpu", "batch_size": 4, "decode_batch_size": 8, "commit_files": 8}


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray (2 CPUs, a small object store) for the module; the workers can import tests/ray_support.py."""
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")[0]


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b2") / "bundle", weights=make_weights(seed=7))[0]


def _plain(root: Path, gdir: Path, bundle: Path) -> Any:
    with Encoder.open(bundle, backend="ort-cpu", batch_size=4, workers=2, threads=1) as enc:
        return index_folder(root, gdir, enc, model=str(bundle))


def _state(gdir: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """{relpath: vector} and {relpath: skip code}; checks that every indexed file has exactly one live row."""
    with open_gallery(gdir) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows])
        st = g.stats()
        assert st.rows - st.dead_rows == st.files_indexed == len(rows)
        assert len({p for p, _ in rows}) == len(rows)
        skipped = {p: why.split(":", 1)[0] for p, why in g.skipped()}
        return {rel: vecs[j] for j, (rel, _) in enumerate(rows)}, skipped


def _ranking(gdir: Path, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    """The full exact ranking (ties in score ordered by path: ids differ between galleries)."""
    with open_gallery(gdir) as g:
        hits = g.search(queries, k=max(1, len(g)), exact=True)
    return [sorted(((h.path, h.score) for h in row), key=lambda t: (-t[1], t[0])) for row in hits]


def _queries(n: int = 6) -> np.ndarray:
    q = np.random.default_rng(3).normal(size=(n, 6)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _assert_same(a: Path, b: Path) -> None:
    va, sa = _state(a)
    vb, sb = _state(b)
    assert sorted(va) == sorted(vb)
    assert sa == sb
    for rel in va:
        np.testing.assert_allclose(va[rel], vb[rel], atol=1e-5, rtol=0)
    assert _ranking(a, _queries()) == _ranking(b, _queries())


# ------------------------------------------------------------------------------------ same as plain


@pytest.mark.parametrize("shards", [None, 3])
def test_equals_the_plain_indexer(tmp_path: Path, bundle: Path, shards: int | None) -> None:
    root = tmp_path / "photos"
    write_photos(root, 30, sub="a")
    write_photos(root, 12, seed=1, sub="b/c")
    expected_skips = {k: v for k, v in write_bad_inputs(root / "bad").items() if "\\n" not in k}
    plain = _plain(root, tmp_path / "plain", bundle)
    rep = index_folder_ray(root, tmp_path / "ray", model=bundle, shards=shards, **RAY_KW)
    assert (rep.indexed, rep.read, rep.new, len(rep.skipped)) == (
        plain.indexed,
        plain.read,
        plain.new,
        len(plain.skipped),
    )
    assert sorted(rep.skipped) == sorted(plain.skipped)
    assert rep.total_indexed == plain.total_indexed == 42 + 4  # + bad/ok.jpg, ok_link.jpg, latin.jpg, sub/inner.jpg
    assert rep.backend == "ray:ort-cpu"
    _assert_same(tmp_path / "plain", tmp_path / "ray")
    _, skipped = _state(tmp_path / "ray")
    for rel, code in expected_skips.items():
        if code not in ("odd-name",):
            assert skipped[f"bad/{rel}"] == code, rel
    with open_gallery(tmp_path / "ray") as g:
        assert isinstance(g, ShardedGallery) == (shards is not None)
        assert g._root == str(root.resolve())
        assert g._source["model"] == str(bundle.resolve())


def test_incremental_reruns(tmp_path: Path, bundle: Path) -> None:
    root = tmp_path / "photos"
    rels = write_photos(root, 24)
    index_folder_ray(root, tmp_path / "ray", model=bundle, shards=2, **RAY_KW)
    _plain(root, tmp_path / "plain", bundle)
    # Nothing changed: nothing is read (Ray is not even needed).
    again = index_folder_ray(root, tmp_path / "ray", model=bundle, **RAY_KW)
    assert (again.read, again.indexed, again.unchanged, again.deleted) == (0, 0, 24, 0)
    # Add, change, delete, break.
    write_photos(root, 5, seed=9, sub="new")
    (root / rels[0]).unlink()
    changed = root / rels[1]
    changed.write_bytes((root / rels[2]).read_bytes())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rep = index_folder_ray(root, tmp_path / "ray", model=bundle, **RAY_KW)
    plain = _plain(root, tmp_path / "plain", bundle)
    assert (rep.new, rep.changed, rep.deleted, rep.unchanged, rep.indexed) == (6, 1, 1, 22, 6)
    assert (rep.new, rep.changed, rep.deleted, rep.unchanged, rep.indexed) == (
        plain.new,
        plain.changed,
        plain.deleted,
        plain.unchanged,
        plain.indexed,
    )
    assert [p for p, _ in rep.skipped] == ["broken.jpg"]
    _assert_same(tmp_path / "plain", tmp_path / "ray")
    # The broken file is tried again and fails for the same reason: not recorded again, counted unchanged.
    third = index_folder_ray(root, tmp_path / "ray", model=bundle, **RAY_KW)
    assert (third.read, third.indexed, third.skipped, third.unchanged) == (1, 0, [], 29)


def test_a_worker_raising_on_a_poisoned_file(tmp_path: Path, bundle: Path) -> None:
    from ray_support import raising_prepare

    root = tmp_path / "photos"
    write_photos(root, 20)
    data = next(root.glob("*.jpg")).read_bytes()
    for name in ("poison_1.jpg", "sub/poison_2.png"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)  # a good image: only the decoder's bug makes it fail
    rep = index_folder_ray(root, tmp_path / "g", model=bundle, shards=2, prepare=raising_prepare, **RAY_KW)
    assert rep.indexed == 20
    reasons = dict(rep.skipped)
    assert sorted(reasons) == ["poison_1.jpg", "sub/poison_2.png"]
    assert reasons["poison_1.jpg"] == ("corrupt: decoding raised PoisonError: the decoder crashed on poison_1.jpg")
    vecs, skipped = _state(tmp_path / "g")
    assert len(vecs) == 20 and skipped == {"poison_1.jpg": "corrupt", "sub/poison_2.png": "corrupt"}
    # Without the bug, the next run indexes them.
    rep = index_folder_ray(root, tmp_path / "g", model=bundle, **RAY_KW)
    assert rep.indexed == 2 and rep.total_indexed == 22 and rep.total_skipped == 0


def test_model_and_shard_checks(tmp_path: Path, bundle: Path, other_bundle: Path) -> None:
    root = tmp_path / "photos"
    write_photos(root, 6)
    index_folder_ray(root, tmp_path / "sh", model=bundle, shards=2, **RAY_KW)
    _plain(root, tmp_path / "plain", bundle)
    for gdir in ("sh", "plain"):
        with pytest.raises(ModelMismatchError):
            index_folder_ray(root, tmp_path / gdir, model=other_bundle, **RAY_KW)
    with pytest.raises(IndexingError, match="has 2 shards, not 3"):
        index_folder_ray(root, tmp_path / "sh", model=bundle, shards=3, **RAY_KW)
    with pytest.raises(IndexingError, match="single gallery, not one of 2 shards"):
        index_folder_ray(root, tmp_path / "plain", model=bundle, shards=2, **RAY_KW)
    other_root = tmp_path / "elsewhere"
    write_photos(other_root, 2)
    with pytest.raises(IndexingError, match="indexes"):
        index_folder_ray(other_root, tmp_path / "sh", model=bundle, **RAY_KW)
    assert len(_state(tmp_path / "sh")[0]) == 6  # untouched by the refused runs


def test_cli_index_info_query_on_ray(tmp_path: Path, bundle: Path) -> None:
    from indexer_support import write_sketch

    root = tmp_path / "photos"
    write_photos(root, 16)
    runner = CliRunner()
    args = ["index", str(root), "-o", str(tmp_path / "g"), "--model", str(bundle), "--engine", "ray", "--shards", "2"]
    res = runner.invoke(main, [*args, "--batch-size", "4", "--decode-batch", "4", "-q"])
    assert res.exit_code == 0, res.output
    assert "indexed 16 of 16 new or changed files, 0 unchanged, 0 skipped, 0 deleted" in res.output
    assert "files/s" in res.output and "ray:ort-cpu" in res.output
    res = runner.invoke(main, ["info", str(tmp_path / "g")])
    assert res.exit_code == 0 and "shards       2" in res.output and "16 indexed" in res.output
    sketch = write_sketch(tmp_path / "s.png")
    q = runner.invoke(main, ["query", str(sketch), "--gallery", str(tmp_path / "g"), "-k", "16", "--json"])
    assert q.exit_code == 0, q.output
    got = [(h["relpath"], h["score"]) for h in json.loads(q.output)["queries"][0]["results"]]
    _plain(root, tmp_path / "plain", bundle)
    q2 = runner.invoke(main, ["query", str(sketch), "--gallery", str(tmp_path / "plain"), "-k", "16", "--json"])
    want = [(h["relpath"], h["score"]) for h in json.loads(q2.output)["queries"][0]["results"]]
    assert sorted(got, key=lambda t: (-t[1], t[0])) == sorted(want, key=lambda t: (-t[1], t[0]))
    # The options that need the Ray engine say so.
    res = runner.invoke(main, ["index", str(root), "-o", str(tmp_path / "x"), "--shards", "2"])
    assert res.exit_code != 0 and "--shards needs --engine ray" in res.output
    res = runner.invoke(main, [*args[:-2], "--workers", "2"])
    assert res.exit_code != 0 and "--workers" in res.output


# ------------------------------------------------------------------------------------ kill -9


def _committed(gdir: Path) -> int:
    """Files committed so far over all shards (read straight from the catalogs, as a concurrent reader)."""
    total = 0
    for db in gdir.glob("shards/*/meta.sqlite"):
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                total += int(con.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed'").fetchone()[0])
            finally:
                con.close()
    return total


@pytest.mark.slow
def test_kill_9_of_the_driver_then_rerun(tmp_path: Path, bundle: Path) -> None:
    root = tmp_path / "photos"
    write_photos(root, 400)
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    gdir = tmp_path / "g"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_NUM_THREADS": "1"}
    env.pop("ZSBIR_GALLERY", None)
    # Its own session: the Ray processes the driver started are in its process group, and the two Ray agents
    # that outlive a SIGKILLed driver are cleaned up with it.
    proc = subprocess.Popen(
        index_argv(root, gdir, bundle, *RAY_ARGS),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while _committed(gdir) < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]!r}"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stderr is not None:
            proc.stderr.close()
    killed_at = _committed(gdir)
    assert 40 <= killed_at < 400
    vecs, _ = _state(gdir)  # the gallery opens, every committed file once
    assert len(vecs) == killed_at
    final = subprocess.run(
        index_argv(root, gdir, bundle, *RAY_ARGS), env=env, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-3000:]
    rep = json.loads(final.stdout)
    assert rep["indexed"] == 400 - killed_at  # only what was not committed is embedded again
    assert rep["total_indexed"] == 400 and rep["total_skipped"] == 1
    _plain(root, tmp_path / "plain", bundle)
    _assert_same(tmp_path / "plain", gdir)
    with ShardedGallery.open(gdir) as sg:
        assert all(not g.verify() for g in sg.shards)
    with Gallery.open(tmp_path / "plain") as g:
        assert len(g) == 400


def _actor_pids() -> list[int]:
    """Processes of this test's local Ray that host an embedding actor (by their process title)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if cmd.startswith("ray::MapWorker(MapBatches(_EmbedActor))"):
            out.append(int(proc.info["pid"]))
    return out


def test_kill_9_of_an_actor_mid_run(tmp_path: Path, bundle: Path) -> None:
    """An embedding actor killed with SIGKILL mid-run: Ray restarts it and retries its batches; the run ends with
    every file indexed exactly once, equal to the plain indexer."""
    root = tmp_path / "photos"
    write_photos(root, 160)
    killed: list[int] = []
    done = {"n": 0}

    def progress(n: int) -> None:
        done["n"] += n
        if not killed and done["n"] >= 24:
            for pid in _actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    rep = index_folder_ray(root, tmp_path / "ray", model=bundle, shards=2, progress=progress, **RAY_KW)
    assert killed, "no actor process was found to kill"
    assert rep.indexed == 160 and rep.total_indexed == 160 and not rep.skipped
    _plain(root, tmp_path / "plain", bundle)
    _assert_same(tmp_path / "plain", tmp_path / "ray")
