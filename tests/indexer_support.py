"""Test helpers for the indexer, retriever and CLI tests: photo folders with every kind of bad input."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsbir_infer.gallery import Gallery


def write_photos(folder: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (24, 32), sub: str = "") -> list[str]:
    """``n`` random JPEG/PNG photos under ``folder/sub``; returns their paths relative to ``folder``.

    The pixels are random colours in 4 x 4 blocks, not per-pixel noise: reduced-size JPEG decoding (a DCT-domain
    low-pass, as any downscale) averages per-pixel noise to nearly the same grey in every photo, so the tiny
    test models would embed them all alike and rankings would hang on ties."""
    rng = np.random.default_rng(seed)
    d = folder / sub if sub else folder
    d.mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        blocks = rng.integers(0, 256, (-(-size[0] // 4), -(-size[1] // 4), 3), dtype=np.uint8)
        arr = np.ascontiguousarray(blocks.repeat(4, axis=0).repeat(4, axis=1)[: size[0], : size[1]])
        name = f"p{seed}_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(arr).save(d / name)
        rels.append(f"{sub}/{name}" if sub else name)
    return rels


def write_sketch(path: Path, seed: int = 99) -> Path:
    """A random 'sketch' PNG."""
    rng = np.random.default_rng(seed)
    arr = np.full((40, 40), 255, dtype=np.uint8)
    arr[rng.integers(0, 40, 60), rng.integers(0, 40, 60)] = 0
    Image.fromarray(arr).save(path)
    return path


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Every kind of bad input the indexer must skip; returns {display relpath: expected skip code}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good_source.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    good.unlink()
    expected: dict[str, str] = {}
    (folder / "notes.txt").write_text("not a photo")
    expected["notes.txt"] = "not-an-image"
    (folder / "README").write_text("no extension")
    expected["README"] = "not-an-image"
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty"
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "garbage.png").write_bytes(os.urandom(300))
    expected["garbage.png"] = "not-an-image"
    # A decompression bomb: 12000 x 12000 pixels (more than PIL's MAX_IMAGE_PIXELS) in a few kB.
    Image.new("1", (12000, 12000)).save(folder / "bomb.png", optimize=True)
    expected["bomb.png"] = "too-large"
    # An odd name: a newline. (A name that is not UTF-8 is indexed: latin\xe9.jpg below.)
    (folder / "line\nbreak.jpg").write_bytes(data)
    expected["line\\nbreak.jpg"] = "odd-name"
    with open(os.path.join(os.fsencode(folder), b"latin\xe9.jpg"), "wb") as fh:  # a good photo (Latin-1 name)
        fh.write(data)
    # Symbolic links: a loop to an ancestor, a link to itself, a dangling link, a second path to a folder.
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.jpg").write_bytes(data)
    os.symlink("..", folder / "sub" / "up")
    expected["sub/up"] = "symlink-loop"
    os.symlink("self.jpg", folder / "self.jpg")
    expected["self.jpg"] = "symlink-loop"
    os.symlink("missing.jpg", folder / "dangling.jpg")
    expected["dangling.jpg"] = "broken-symlink"
    os.symlink("sub", folder / "sub_again")
    expected["sub_again"] = "duplicate-directory"
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = "not-a-regular-file"
    # Ignored entirely: hidden files and folders.
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.jpg").write_bytes(data)
    (folder / "._resource.jpg").write_bytes(b"\x00\x05\x16\x07")
    # Good files, including one reached through a symbolic link to a file.
    (folder / "ok.jpg").write_bytes(data)
    os.symlink("ok.jpg", folder / "ok_link.jpg")
    return expected


def gallery_state(gdir: Path) -> dict[str, np.ndarray]:
    """Every indexed file's vector by path, checking that each has exactly one live row."""
    with Gallery.open(gdir) as g:
        rows = g.indexed()
        vecs = g.vectors([i for _, i in rows])
        st = g.stats()
        assert st.rows - st.dead_rows == st.files_indexed == len(rows)
        return {rel: vecs[j] for j, (rel, _) in enumerate(rows)}


def index_argv(root: Path, gallery: Path, bundle: Path, *extra: str) -> list[str]:
    """``zsbir index ROOT -o GALLERY --model BUNDLE`` in a fresh interpreter, small batches committed every 4
    files, quiet, JSON summary, plus ``extra`` options."""
    return [
        sys.executable,
        "-c",
        "from zsbir_infer.cli import main; main()",
        "index",
        str(root),
        "-o",
        str(gallery),
        "--model",
        str(bundle),
        "--batch-size",
        "4",
        "--commit-every",
        "4",
        *extra,
        "-q",
        "--json",
    ]


def deny_reading(monkeypatch: Any, suffix: bytes) -> None:
    """Make the indexer's file reads of paths ending with ``suffix`` fail with EACCES (as an unreadable file)."""
    from zsbir_infer import indexer

    real = indexer._read_file

    def deny(path: bytes) -> bytes:
        if path.endswith(suffix):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(indexer, "_read_file", deny)
