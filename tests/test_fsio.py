"""zsbir_infer.fsio: atomic writes (old or new file, never a torn one, no leftovers) and the flock helper."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zsbir_infer.fsio import FileLock, atomic_path, atomic_write, atomic_write_json


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write(target, "old")
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    atomic_write(target, b"old bytes")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_named_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    with atomic_path(target, tmp=tmp_path / "manifest.json.tmp") as tmp:
        assert tmp == tmp_path / "manifest.json.tmp"
        tmp.write_text("{}")
    assert target.read_text() == "{}" and not tmp.exists()


HOLD = textwrap.dedent(
    """
    import sys, time
    from zsbir_infer.fsio import FileLock
    lock = FileLock(sys.argv[1], directory=sys.argv[2] == "dir")
    assert lock.acquire()
    print("held", flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_file_lock_between_processes(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ".lock" if kind == "file" else tmp_path
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        lock = FileLock(path, directory=kind == "dir")
        assert lock.acquire(blocking=False) is False  # held by the other process
        assert other.stdin is not None
        other.stdin.write("\n")
        other.stdin.flush()
        other.wait(30)
        assert lock.acquire(blocking=False) is True
        lock.release()
        lock.release()  # safe twice
        with FileLock(path, directory=kind == "dir"):
            pass
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_file_lock_on_a_read_only_place_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        FileLock(tmp_path / "missing" / ".lock").acquire()
