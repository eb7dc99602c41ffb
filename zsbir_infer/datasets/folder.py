"""Loader for benchmarks in our own layout (CONTRACTS §1), e.g. the set ``zsbir data synth`` writes.

Reads ``ROOT/splits/seen.txt`` and ``ROOT/splits/unseen.txt`` (one class per line), then every image
in ``ROOT/photo/<class>/`` and ``ROOT/sketch/<class>/``. ``ROOT/meta.json`` is optional; when it names
the synthetic generator the benchmark kind is ``"synthetic"``, otherwise ``"folder"``.
"""

from __future__ import annotations

import json
from pathlib import Path

from zsbir_infer.datasets.base import DOMAINS, Benchmark, BenchmarkError, list_images, read_lines

REQUIRED = ("splits/seen.txt", "splits/unseen.txt", "photo", "sketch")


def is_folder_benchmark(root: Path) -> bool:
    """Whether ``root`` looks like our layout (split files present)."""
    return (root / "splits" / "seen.txt").is_file() and (root / "splits" / "unseen.txt").is_file()


def _read_meta(root: Path) -> dict[str, object]:
    path = root / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise BenchmarkError(f"{path} does not hold a JSON object")
    return meta


def folder_kind(root: Path) -> str:
    """``"synthetic"`` when ``meta.json`` names our generator, else ``"folder"``."""
    return "synthetic" if _read_meta(root).get("generator") == "zsbir.synth" else "folder"


def open_folder(root: Path) -> Benchmark:
    """Open a benchmark in our layout; :class:`BenchmarkError` names the first missing file or folder."""
    for rel in REQUIRED:
        if not (root / rel).exists():
            raise BenchmarkError(f"missing {'folder' if '.' not in rel else 'file'}: {root / rel}")
    seen = read_lines(root / "splits" / "seen.txt")
    unseen = read_lines(root / "splits" / "unseen.txt")
    meta = _read_meta(root)
    kind = "synthetic" if meta.get("generator") == "zsbir.synth" else "folder"
    items: dict[str, list[tuple[Path, str, str]]] = {"seen": [], "unseen": []}
    for part, classes in (("seen", seen), ("unseen", unseen)):
        for cls in classes:
            for domain in DOMAINS:
                folder = root / domain / cls
                if not folder.is_dir():
                    raise BenchmarkError(f"missing folder: {folder} (class {cls!r} is listed in splits/{part}.txt)")
                items[part] += [(p, cls, domain) for p in list_images(folder)]
    return Benchmark(kind=kind, root=root, seen_classes=seen, unseen_classes=unseen, items=items, info={"meta": meta})
