"""Crash-safe file writes and inter-process locks: the one implementation every writer uses.

:func:`atomic_path` / :func:`atomic_write` / :func:`atomic_write_json` write to a temporary file beside
the target, fsync it, rename it over the target and fsync the folder, so a reader sees the old file or
the new one, never a torn one, even after a power cut. :class:`FileLock` is an ``flock`` on a file (or a
folder) shared between processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["FileLock", "atomic_path", "atomic_write", "atomic_write_json", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so that renames and new entries in it are durable (best effort: ignored where the
    file system or OS cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, tmp: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends, the file is fsynced, renamed
    over ``path`` and the folder fsynced. On an exception the temporary file is removed and ``path`` is
    untouched. ``tmp`` names the temporary file (default: a unique hidden name in the same folder)."""
    target = Path(path)
    temp = Path(tmp) if tmp is not None else target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    encoding: str = "utf-8",
    tmp: str | os.PathLike[str] | None = None,
) -> Path:
    """Replace ``path`` with ``data`` (text is encoded with ``encoding``) atomically; returns the path."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path, tmp=tmp) as temp:
        temp.write_bytes(raw)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = True,
    tmp: str | os.PathLike[str] | None = None,
) -> Path:
    """Replace ``path`` with ``obj`` as JSON (a final newline included) atomically; returns the path."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", tmp=tmp)


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing; a folder with ``directory=True``), shared
    between processes. Not reentrant and not a thread lock: pair it with a :class:`threading.Lock` where
    threads of one process compete. A no-op where ``fcntl`` is missing (not POSIX)."""

    def __init__(self, path: str | os.PathLike[str], *, directory: bool = False) -> None:
        self.path = Path(path)
        self.directory = directory
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once when another process holds it.

        Raises :class:`OSError` when the lock file cannot be opened (e.g. a read-only folder).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return True
        if self.directory:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (safe to call when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
