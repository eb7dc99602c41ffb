"""Loader for benchmarks in our own layout (CONTRACTS §1), e.g. the set ``zsbir data synth`` writes.

Reads a split set (one class per line) from ``ROOT/splits/``, then every image in
``ROOT/photo/<class>/`` and ``ROOT/sketch/<class>/``. The default split set is ``splits/seen.txt`` +
``splits/unseen.txt``; a folder may hold more, named by the suffix of their files:
``splits/seen21.txt`` + ``splits/unseen21.txt`` is the split set ``"21"``. ``ROOT/meta.json`` is
optional; when it names the synthetic generator the benchmark kind is ``"synthetic"``, otherwise
``"folder"``. ``ROOT/pairs_finegrained.csv`` (which photo each sketch was drawn from) is only noted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from zsbir_infer.datasets.base import DOMAINS, Benchmark, BenchmarkError, list_images, read_lines

DEFAULT_SPLIT_SET = "default"
PAIRS_FILE = "pairs_finegrained.csv"
_SPLIT_FILE = re.compile(r"seen(.*)\.txt")


def split_set_files(root: Path, name: str | None = None) -> tuple[Path, Path]:
    """The ``(seen, unseen)`` list files of split set ``name`` (``None``/``"default"``: the plain files)."""
    suffix = "" if name in (None, "", DEFAULT_SPLIT_SET) else str(name)
    if "/" in suffix or "\\" in suffix or suffix.startswith("."):
        raise BenchmarkError(f"bad split set name {name!r}: expected a suffix like '21' (splits/seen21.txt)")
    return root / "splits" / f"seen{suffix}.txt", root / "splits" / f"unseen{suffix}.txt"


def split_sets(root: Path) -> list[str]:
    """Names of the split sets in ``root/splits`` (``"default"`` first, then the others sorted).

    A split set exists when both its ``seen*.txt`` and ``unseen*.txt`` files do.
    """
    splits = root / "splits"
    if not splits.is_dir():
        return []
    names: list[str] = []
    for path in splits.iterdir():
        m = _SPLIT_FILE.fullmatch(path.name)
        if m and path.is_file() and (splits / f"unseen{m.group(1)}.txt").is_file():
            names.append(m.group(1) or DEFAULT_SPLIT_SET)
    return sorted(names, key=lambda n: (n != DEFAULT_SPLIT_SET, n))


def is_folder_benchmark(root: Path) -> bool:
    """Whether ``root`` looks like our layout (the files of at least one split set present)."""
    return bool(split_sets(root))


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


def open_folder(root: Path, split_set: str | None = None) -> Benchmark:
    """Open a benchmark in our layout with split set ``split_set`` (``None``: ``seen.txt``/``unseen.txt``).

    :class:`BenchmarkError` names the first missing file or folder; a missing split set's message also
    lists the split sets that exist.
    """
    name = DEFAULT_SPLIT_SET if split_set in (None, "") else str(split_set)
    available = split_sets(root)
    for path in split_set_files(root, name):
        if not path.is_file():
            have = ", ".join(available) if available else "none"
            raise BenchmarkError(f"missing file: {path} (split set {name!r}; split sets in {root}: {have})")
    for rel in ("photo", "sketch"):
        if not (root / rel).is_dir():
            raise BenchmarkError(f"missing folder: {root / rel}")
    seen_file, unseen_file = split_set_files(root, name)
    seen = read_lines(seen_file)
    unseen = read_lines(unseen_file)
    meta = _read_meta(root)
    kind = "synthetic" if meta.get("generator") == "zsbir.synth" else "folder"
    items: dict[str, list[tuple[Path, str, str]]] = {"seen": [], "unseen": []}
    for part, classes, listed in (("seen", seen, seen_file), ("unseen", unseen, unseen_file)):
        for cls in classes:
            for domain in DOMAINS:
                folder = root / domain / cls
                if not folder.is_dir():
                    raise BenchmarkError(f"missing folder: {folder} (class {cls!r} is listed in splits/{listed.name})")
                items[part] += [(p, cls, domain) for p in list_images(folder)]
    info: dict[str, object] = {"meta": meta, "split_set": name, "split_sets": available}
    if (root / PAIRS_FILE).is_file():
        info["pairs_finegrained"] = PAIRS_FILE
    return Benchmark(kind=kind, root=root, seen_classes=seen, unseen_classes=unseen, items=items, info=info)
