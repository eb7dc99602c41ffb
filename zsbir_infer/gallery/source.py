"""What a gallery indexes: its photo folder (root) and the model bundle it was built with, kept in its manifest.

The gallery owns this identity (it used to live in the indexer's ``indexer.json``): ``manifest.json`` holds
``"source": {"root", "root_relative", "model", "model_relative"}``. A root (or model) inside or beside the
gallery folder (``project/.zsbir`` with ``project/photos``) is also recorded relative to the gallery, and the
relative form wins when read, so moving the whole tree keeps the gallery working. ``model`` is ``None`` for
the embedded default model and absent when unknown.

Galleries written before the move keep their root and model in ``indexer.json`` only: :func:`read_source`
falls back to it, and the first ``zsbir index`` records them in the manifest.

This module also finds galleries (:func:`find_gallery`, the nearest ``.zsbir``), so that the retriever, the
indexer and the CLI read all of this from the gallery package and none of them imports another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_GALLERY_DIRNAME", "LEGACY_INDEXER_FILE", "find_gallery", "make_source", "read_source"]

#: The gallery folder ``zsbir index`` creates (and ``zsbir query`` looks for) by default.
DEFAULT_GALLERY_DIRNAME = ".zsbir"
#: The indexer's sidecar file; galleries written before the source moved into the manifest keep it there.
LEGACY_INDEXER_FILE = "indexer.json"
_KEYS = ("root", "model")


def relative_to_gallery(path: Path, gallery_dir: Path) -> str | None:
    """``path`` relative to the gallery folder when the gallery lies inside it or beside it (below the same
    parent folder: ``project/.zsbir`` and ``project/photos``), else None (recorded as an absolute path)."""
    g, p = gallery_dir.resolve(), path.resolve()
    try:
        common = os.path.commonpath([g, p])
    except ValueError:
        return None
    if common in (str(p), str(g.parent)):
        return os.path.relpath(p, g)
    return None


def make_source(gallery_dir: Path, root: Path, model: str | None) -> dict[str, Any]:
    """The ``source`` block for a gallery at ``gallery_dir`` that indexes ``root`` with ``model``."""
    return {
        "root": str(root),
        "root_relative": relative_to_gallery(root, gallery_dir),
        "model": model,
        "model_relative": relative_to_gallery(Path(model), gallery_dir) if model else None,
    }


def _resolved(block: dict[str, Any], gallery_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _KEYS:
        if key not in block:
            continue
        value = block.get(key)
        rel = block.get(f"{key}_relative")
        if isinstance(rel, str) and rel:
            value = os.path.normpath(os.path.join(gallery_dir.resolve(), rel))
        out[key] = value if isinstance(value, str) else None
    return out


def read_legacy(gallery_dir: Path) -> dict[str, Any]:
    """The indexer's ``indexer.json`` as stored (``{}`` when absent or unreadable)."""
    try:
        obj = json.loads((gallery_dir / LEGACY_INDEXER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_source(gallery_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"root": ..., "model": ...}`` (absolute paths where the gallery is now; a key is absent when unknown).

    Args:
        gallery_dir: the gallery folder.
        manifest: its parsed ``manifest.json`` when already read (else it is read here).
    """
    gdir = Path(gallery_dir)
    if manifest is None:
        try:
            manifest = json.loads((gdir / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
    block = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(block, dict):
        block = read_legacy(gdir)  # a gallery from before the source moved into the manifest
    return _resolved(block, gdir)


def find_gallery(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``.zsbir`` gallery in ``start`` (default: the current directory) or one of its parents."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for d in (here, *here.parents):
        cand = d / DEFAULT_GALLERY_DIRNAME
        if (cand / "manifest.json").is_file():
            return cand
    return None
