"""Segment files: the append-only, memory-mapped vector files of a gallery and their CRC-32 checksums.

A segment ``NNNNNN`` has one file per per-row array of its codec (``NNNNNN.f16``; ``.i8`` + ``.scale``;
``.itq``). The catalog commits each segment's row count and the checksum of every file's committed bytes;
bytes past the committed end are garbage of an interrupted batch, ignored by readers and overwritten by
the next append. This module writes, maps and checks those files; the catalog lives in
:mod:`zsbir_infer.gallery.store`.
"""

from __future__ import annotations

import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zsbir_infer.errors import InputError
from zsbir_infer.fsio import fsync_dir
from zsbir_infer.gallery.codecs import Part

__all__ = ["SEGMENT_DIR", "GalleryError", "Segment", "SegmentDamagedError", "SegmentFiles", "crc_file", "fsync_dir"]

SEGMENT_DIR = "segments"


class GalleryError(InputError):
    """A gallery cannot be created, opened or used as asked."""


class SegmentDamagedError(GalleryError):
    """A segment file does not match the checksum committed with it: its vectors cannot be trusted."""

    def __init__(self, gallery: Path, file: Path, base: int, rows: int, why: str) -> None:
        self.gallery, self.file, self.base, self.rows = gallery, file, base, rows
        super().__init__(
            f"gallery {gallery} is damaged: {SEGMENT_DIR}/{file.name} {why} (rows {base}..{base + rows - 1}); its "
            "vectors would give wrong results. Repair: rerun 'zsbir index' on the photo folder with this gallery "
            "(-o " + str(gallery) + "): it re-embeds only the photos stored in the damaged segment "
            "(Gallery.repair() in the library)"
        )


@dataclass
class Segment:
    """One segment as the catalog commits it."""

    seg: int
    base: int
    rows: int
    max_norm: float
    checksums: dict[str, int] | None = None  # CRC-32 of the committed bytes of each file (format 2)


def crc_file(path: Path, start: int, stop: int, crc: int = 0) -> int:
    """CRC-32 of bytes ``start:stop`` of a file, continuing ``crc`` (the CRC of the bytes before ``start``).
    Read through a memory map (no copy), in slices of 64 MiB."""
    if stop <= start:
        return crc
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < stop:
            raise EOFError(path)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            for a in range(start, stop, 1 << 26):
                with view[a : min(stop, a + (1 << 26))] as part:
                    crc = zlib.crc32(part, crc)
    return crc


class SegmentFiles:
    """The segment files of the gallery folder ``gallery``, laid out by a codec's ``parts``."""

    def __init__(self, gallery: Path, parts: tuple[Part, ...]) -> None:
        self.gallery = gallery
        self.directory = gallery / SEGMENT_DIR
        self.parts = parts
        self._verified: dict[tuple[int, int, str], tuple[int, int]] = {}  # (layout, seg, suffix) -> (bytes, crc)

    def path(self, seg: int, suffix: str) -> Path:
        return self.directory / f"{seg:06d}.{suffix}"

    def nbytes(self, rows: int, part: int) -> int:
        """Bytes of ``rows`` rows in the file of the ``part``-th per-row array."""
        _, dtype, shape = self.parts[part]
        return rows * dtype.itemsize * int(np.prod(shape, dtype=np.int64))

    def forget(self) -> None:
        """Drop what was verified (the folder now holds another gallery)."""
        self._verified.clear()

    def map(self, s: Segment, layout: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Memory-map the committed rows of a segment, checking each file's checksum first (``verify``).

        Raises:
            FileNotFoundError: a file is missing (a concurrent compaction replaced it: retry).
            SegmentDamagedError: a file is shorter than committed or does not match its checksum.
        """
        arrays: list[np.ndarray] = []
        for i, (suffix, dtype, shape) in enumerate(self.parts):
            f = self.path(s.seg, suffix)
            need = self.nbytes(s.rows, i)
            size = f.stat().st_size
            if size < need:
                raise SegmentDamagedError(
                    self.gallery, f, s.base, s.rows, f"holds {size} bytes but the catalog commits {need}"
                )
            if verify:
                self._verify(s, f, suffix, need, layout)
            arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(s.rows, *shape)))
        return arrays[0], (arrays[1] if len(arrays) > 1 else None)

    def _verify(self, s: Segment, f: Path, suffix: str, need: int, layout: int) -> None:
        """Check the committed bytes of a file against their checksum; only the bytes appended since the last
        check of this file are read (a reader that follows an indexing run reads each row once)."""
        if s.checksums is None:  # format 1: nothing to check against
            return
        key = (layout, s.seg, suffix)
        done, crc = self._verified.get(key, (0, 0))
        if done > need:
            done, crc = 0, 0
        try:
            crc = crc_file(f, done, need, crc)
        except EOFError:
            raise SegmentDamagedError(self.gallery, f, s.base, s.rows, "is shorter than the catalog says") from None
        if crc != s.checksums.get(suffix):
            raise SegmentDamagedError(self.gallery, f, s.base, s.rows, "does not match its checksum")
        self._verified[key] = (need, crc)

    def problem(self, sg: Segment) -> SegmentDamagedError | None:
        """A full check of one segment's files (size, checksum), without the cache of :meth:`map`."""
        for i, (suffix, _, _) in enumerate(self.parts):
            f = self.path(sg.seg, suffix)
            need = self.nbytes(sg.rows, i)
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                return SegmentDamagedError(self.gallery, f, sg.base, sg.rows, "is missing")
            if size < need:
                return SegmentDamagedError(self.gallery, f, sg.base, sg.rows, f"holds {size} bytes, the catalog {need}")
            if sg.checksums is not None and crc_file(f, 0, need) != sg.checksums.get(suffix):
                return SegmentDamagedError(self.gallery, f, sg.base, sg.rows, "does not match its checksum")
        return None

    def append(self, seg: Segment, parts: list[np.ndarray]) -> dict[str, int]:
        """Write rows after the committed end of a segment (dropping any uncommitted tail) and fsync; returns
        the checksums of each file's bytes up to the new end (to be committed with the rows)."""
        sums: dict[str, int] = {}
        for i, ((suffix, dtype, _), arr) in enumerate(zip(self.parts, parts, strict=True)):
            f = self.path(seg.seg, suffix)
            committed = self.nbytes(seg.rows, i)
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size < committed:
                    raise GalleryError(
                        f"gallery {self.gallery} is damaged: {f.name} holds {size} bytes but the metadata commits "
                        f"{committed}"
                    )
                if size > committed:
                    os.ftruncate(fd, committed)  # garbage of an interrupted batch
                data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
                sums[suffix] = zlib.crc32(data, (seg.checksums or {}).get(suffix, 0) if seg.rows else 0)
                view = memoryview(data)
                off = committed
                while view:
                    written = os.pwrite(fd, view, off)
                    view = view[written:]
                    off += written
                os.fsync(fd)
            finally:
                os.close(fd)
        return sums

    def remove_stray(self, keep: set[int]) -> None:
        """Delete segment files not referenced by the catalog (left by a compaction or a crash)."""
        for f in self.directory.iterdir():
            stem = f.name.split(".")[0]
            if stem.isdigit() and int(stem) not in keep:
                f.unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())
