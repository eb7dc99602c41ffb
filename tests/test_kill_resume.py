"""Kill `zsbir index` with SIGKILL at random moments, several times, then rerun: the gallery always opens,
every file ends up indexed exactly once, and the vectors equal those of a clean, uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from indexer_support import index_argv, write_photos
from tiny_bundle import make_bundle

from zsbir_infer.gallery import Gallery

N_PHOTOS = 240
KILLS = 5


def _cmd(root: Path, gallery: Path, bundle: Path) -> list[str]:
    return index_argv(root, gallery, bundle, "--workers", "2")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_NUM_THREADS": "1"}
    env.pop("ZSBIR_GALLERY", None)
    return env


def _committed(gallery: Path) -> int:
    """Files committed so far (read straight from the metadata, as a concurrent reader)."""
    db = gallery / "meta.sqlite"
    if not (gallery / "manifest.json").exists() or not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _generation(gallery: Path) -> int:
    """The gallery's commit counter (every add, skip and delete transaction increments it)."""
    db = gallery / "meta.sqlite"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _state(gallery: Path) -> tuple[dict[str, np.ndarray], int, int]:
    with Gallery.open(gallery) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows])
        st = g.stats()
        assert st.rows - st.dead_rows == st.files_indexed == len(rows)  # one live row per file
        return {rel: vecs[j] for j, (rel, _) in enumerate(rows)}, st.files_skipped, st.rows


def test_sigkill_at_random_points_then_resume(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")[0]
    root = tmp_path / "photos"
    rels = set(write_photos(root, N_PHOTOS, size=(96, 128), sub="a"))
    (root / "junk.jpg").write_bytes(b"\xff\xd8\xff not really")

    clean = subprocess.run(_cmd(root, tmp_path / "clean", bundle), env=_env(), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    ref, ref_skipped, _ = _state(tmp_path / "clean")
    assert set(ref) == rels and ref_skipped == 1

    rng = random.Random(1234)
    gal = tmp_path / "killed"
    partial_states = 0
    for _ in range(KILLS):
        # Kill once a random share of the remaining files is committed, plus a random few milliseconds so
        # that the kill lands anywhere in the decode/embed/append/commit cycle.
        done = _committed(gal)
        target = done + max(1, int(rng.uniform(0.1, 0.45) * (len(rels) - done)))
        proc = subprocess.Popen(
            _cmd(root, gal, bundle), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and _committed(gal) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.004))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        got, _, _ = _state(gal)  # opens after every kill
        assert set(got) <= rels
        partial_states += 0 < len(got) < len(rels)
    # Most kills landed while files were being committed (otherwise the test proves nothing).
    assert partial_states >= 3

    final = subprocess.run(_cmd(root, gal, bundle), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    got, skipped, rows = _state(gal)
    assert set(got) == rels and skipped == 1
    for rel in rels:
        np.testing.assert_allclose(got[rel], ref[rel], atol=1e-3)
    # A further run has nothing to do.
    again = subprocess.run(_cmd(root, gal, bundle), env=_env(), capture_output=True, text=True)
    assert '"indexed": 0' in again.stdout and f'"unchanged": {N_PHOTOS + 1}' in again.stdout
    assert _state(gal)[2] == rows


def test_sigkill_during_an_incremental_run(tmp_path: Path) -> None:
    """Deletions, changes, additions and skips of an update run, killed at random moments, then resumed."""
    bundle = make_bundle(tmp_path / "bundle")[0]
    root = tmp_path / "photos"
    rels = sorted(write_photos(root, 120, size=(96, 128), sub="a"))
    gal = tmp_path / "killed"
    first = subprocess.run(_cmd(root, gal, bundle), env=_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr

    rng = random.Random(99)
    for rel in rels[:30]:
        (root / rel).unlink()
    donor = write_photos(tmp_path / "donor", 20, size=(96, 128), seed=5)
    for rel, d in zip(rels[30:50], donor, strict=True):
        (root / rel).write_bytes((tmp_path / "donor" / d).read_bytes())
        st = (root / rel).stat()
        os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    write_photos(root, 150, size=(96, 128), seed=6, sub="b")
    for i in range(5):
        (root / "b" / f"note{i}.txt").write_text("x")

    clean = subprocess.run(_cmd(root, tmp_path / "clean", bundle), env=_env(), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    ref, ref_skipped, _ = _state(tmp_path / "clean")

    killed_running = 0
    for _ in range(4):
        # Kill after a random number of commits (deletions, skips, batches) of this run.
        target = _generation(gal) + rng.randint(1, 12)
        proc = subprocess.Popen(
            _cmd(root, gal, bundle), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and _generation(gal) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.004))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_running += 1
        proc.wait()
        got, _, _ = _state(gal)  # opens after every kill
        assert set(got) <= set(ref) | set(rels)
    assert killed_running >= 3

    final = subprocess.run(_cmd(root, gal, bundle), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    got, skipped, _ = _state(gal)
    assert set(got) == set(ref) and skipped == ref_skipped == 5
    assert not set(got) & set(rels[:30])
    for rel in ref:
        np.testing.assert_allclose(got[rel], ref[rel], atol=1e-3)  # changed files carry their new vectors


def _exits_within(proc: subprocess.Popen[str], bound: float, what: str) -> tuple[int, str]:
    """Wait up to ``bound`` seconds for ``proc``; if it hangs, dump its threads' stacks (faulthandler, on
    SIGABRT), kill it and fail the test: a child is never left behind."""
    try:
        _out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER=1: prints every thread's stack, then dies
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        pytest.fail(f"zsbir index did not exit within {bound:.0f} s {what} (hung; killed):\n{err[-6000:]}")
    return proc.returncode, err


def _start_interruptible(cmd: list[str]) -> subprocess.Popen[str]:
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler; give the child the default disposition, as a terminal's Ctrl-C finds it.
    return subprocess.Popen(
        cmd,
        env={**_env(), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@contextlib.contextmanager
def _cpu_load(n: int) -> Iterator[None]:
    """``n`` busy-looping processes for the duration of the block (contention makes the interrupt land in
    the narrow windows: between a lock's acquire and the code that releases it)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def test_ctrl_c_stops_cleanly_and_the_rerun_completes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")[0]
    root = tmp_path / "photos"
    rels = set(write_photos(root, 200, size=(96, 128)))
    gal = tmp_path / "g"
    proc = _start_interruptible(_cmd(root, gal, bundle))
    deadline = time.monotonic() + 60
    while proc.poll() is None and _committed(gal) < 20 and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        proc.communicate()
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    rc, err = _exits_within(proc, 60, "after SIGINT")  # kills it and fails if it hangs
    assert rc == 130, err
    assert "interrupted" in err and "rerun" in err and "Traceback" not in err
    got, _, _ = _state(gal)
    assert 0 < len(got) < len(rels)
    final = subprocess.run(_cmd(root, gal, bundle), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert set(_state(gal)[0]) == rels


INTERRUPTS = 20
INTERRUPT_GROUPS = 4  # the gallery starts over after each group, so that later interrupts land mid-run too


@pytest.mark.slow
def test_ctrl_c_at_random_moments_under_load_never_hangs(tmp_path: Path) -> None:
    """SIGINT at 20 random moments of `zsbir index` (start-up, walk, decoding, embedding, commits, the end)
    while the CPU is busy: every run exits promptly (130 when interrupted), the gallery opens after each,
    and a rerun completes with every file exactly once."""
    bundle = make_bundle(tmp_path / "bundle")[0]
    root = tmp_path / "photos"
    rels = set(write_photos(root, 400, size=(96, 128)))
    (root / "junk.jpg").write_bytes(b"\xff\xd8\xff not really")
    rng = random.Random(20261203)
    outcomes: Counter[str] = Counter()
    with _cpu_load(min(2, os.cpu_count() or 1)):
        t0 = time.monotonic()
        rc, err = _exits_within(_start_interruptible(_cmd(root, tmp_path / "clean", bundle)), 90, "(clean run)")
        run_s = time.monotonic() - t0
        assert rc == 0, err
        for group in range(INTERRUPT_GROUPS):
            gal = tmp_path / f"g{group}"
            per_group = INTERRUPTS // INTERRUPT_GROUPS
            for k in range(per_group):
                proc = _start_interruptible(_cmd(root, gal, bundle))
                if k == per_group - 1:  # any moment of a run: start-up, imports, opening the model, the walk, indexing
                    time.sleep(rng.uniform(0.0, run_s))
                else:  # once a random share of the remaining files is committed, plus a few milliseconds
                    done = _committed(gal)
                    target = done + max(1, int(rng.uniform(0.05, 0.5) * (len(rels) - done)))
                    deadline = time.monotonic() + 60
                    while proc.poll() is None and _committed(gal) < target and time.monotonic() < deadline:
                        time.sleep(0.002)
                    time.sleep(rng.uniform(0.0, 0.02))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                rc, err = _exits_within(proc, 30, "after SIGINT")
                if rc == 130:  # interrupted inside index_folder: the CLI's message, no traceback
                    assert "interrupted" in err and "rerun" in err and "Traceback" not in err, err
                    outcomes["interrupted"] += 1
                elif rc == 1 and "Aborted!" in err:  # interrupted before indexing began (click's handler)
                    outcomes["aborted"] += 1
                elif rc == -signal.SIGINT or "init_import_site" in err:  # outside the CLI: start-up or exit
                    outcomes["start-up"] += 1
                else:
                    assert rc == 0, (rc, err)
                    outcomes["finished"] += 1
                if (gal / "manifest.json").exists():
                    got, _, _ = _state(gal)  # opens after every interrupt
                    assert set(got) <= rels
            rc, err = _exits_within(_start_interruptible(_cmd(root, gal, bundle)), 90, "(rerun)")
            assert rc == 0, err
            got, skipped, _ = _state(gal)
            assert set(got) == rels and skipped == 1, outcomes  # every file exactly once (one live row each)
    # Most interrupts landed while the run was working on the gallery (otherwise the test proves little).
    assert outcomes["interrupted"] >= INTERRUPTS // 2, outcomes
