"""Loaders for the real ZS-SBIR benchmarks with the zero-shot splits used by SAKE, DSN and ZSE-SBIR.

All three benchmarks are distributed as a folder of images plus text lists. A list line is
``relative/path label`` (the path may contain spaces, the label is the last field); paths are
relative to the benchmark folder and labels index a class table ``cname_cid.txt`` (seen/training
classes, ``name id`` lines) or ``cname_cid_zero.txt`` (unseen/zero-shot classes). We read exactly
these files; the image files themselves are only checked for the first entry of each list (a cheap
sign that the root is right), so opening a 100k-image benchmark stays fast.

Sketchy Extended (``kind="sketchy"``), folder ``Sketchy/``:
  * ``zeroshotN/cname_cid.txt``, ``zeroshotN/cname_cid_zero.txt``
  * ``zeroshotN/sketch_tx_000000000000_ready_filelist_{train,zero}.txt`` (sketches under
    ``256x256/sketch/tx_000000000000_ready/<class>/``)
  * ``zeroshotN/all_photo_filelist_{train,zero}.txt`` (photos under
    ``256x256/photo/tx_000000000000_ready/<class>/`` and ``EXTEND_image_sketchy_ready/<class>/``)
  * optional ``zeroshotN/sketch_tx_000000000000_ready_filelist_test.txt`` (held-out seen-class
    sketches, the ``"val"`` part)
  ``zeroshot1`` is the 100/25 split of SAKE (qliu24/SAKE ``dataset/Sketchy/zeroshot1``, also used
  by haowang1992/DSN, which reads the same files with the same code); ``zeroshot0`` is the 104/21
  split shipped by buptLinfy/ZSE-SBIR (``datasets/Sketchy/zeroshot0``). Default: ``zeroshot1``.

TU-Berlin Extended (``kind="tuberlin"``), folder ``TUBerlin/``:
  * ``zeroshot/cname_cid.txt`` (220 classes), ``zeroshot/cname_cid_zero.txt`` (30 classes)
  * ``zeroshot/png_ready_filelist_{train,zero}.txt`` (sketches under ``png_ready/<class>/``)
  * ``zeroshot/ImageResized_ready_filelist_{train,zero}.txt`` (photos under ``ImageResized_ready/<class>/``)
  * optional ``zeroshot/png_ready_filelist_test.txt`` and ``ImageResized_ready_filelist_test.txt``
  Same file names in qliu24/SAKE ``dataset/TUBerlin/zeroshot`` and buptLinfy/ZSE-SBIR
  ``datasets/TUBerlin/zeroshot``.

QuickDraw Extended (``kind="quickdraw"``), folder ``QuickDraw/`` (buptLinfy/ZSE-SBIR
``datasets/QuickDraw/zeroshot``; SAKE and DSN do not ship it):
  * ``zeroshot/cname_cid.txt`` (80 classes), ``zeroshot/cname_cid_zero.txt`` (30 classes)
  * ``zeroshot/sketch_{train,zero}.txt`` (sketches under ``sketches/<class>/``)
  * ``zeroshot/all_photo_{train,zero}.txt`` (photos under ``images/<class>/``)

``root`` may be the benchmark folder itself (``dataset/Sketchy``) or the folder holding it
(SAKE/DSN ``dataset/``, ZSE-SBIR ``--data_path``); if that holds several benchmarks, pass ``kind``.
Splits: ``"seen"`` = the ``*_train`` lists, ``"unseen"`` = the ``*_zero`` lists, ``"val"`` = the
``*_test`` lists where they exist (SAKE/DSN only). A missing ``*_train`` list (the large photo list is
sometimes left out) makes only ``split("seen")`` fail, with the file's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zsbir_infer.datasets.base import Benchmark, BenchmarkError, read_lines

KINDS: tuple[str, ...] = ("sketchy", "tuberlin", "quickdraw")
FOLDER_NAMES = {"sketchy": "Sketchy", "tuberlin": "TUBerlin", "quickdraw": "QuickDraw"}


@dataclass(frozen=True)
class _Layout:
    """File names of one benchmark inside its zero-shot folder; ``{part}`` is train | zero | test."""

    kind: str
    sketch_list: str
    photo_list: str
    zeroshot_dirs: tuple[str, ...]  # candidates, the first existing one is the default


LAYOUTS: dict[str, _Layout] = {
    "sketchy": _Layout(
        "sketchy",
        "sketch_tx_000000000000_ready_filelist_{part}.txt",
        "all_photo_filelist_{part}.txt",
        ("zeroshot1", "zeroshot0", "zeroshot2"),
    ),
    "tuberlin": _Layout(
        "tuberlin", "png_ready_filelist_{part}.txt", "ImageResized_ready_filelist_{part}.txt", ("zeroshot",)
    ),
    "quickdraw": _Layout("quickdraw", "sketch_{part}.txt", "all_photo_{part}.txt", ("zeroshot",)),
}

_PARTS = {"seen": "train", "unseen": "zero", "val": "test"}


def parse_filelist(path: Path) -> list[tuple[str, int]]:
    """``(relative path, label)`` pairs of a ``relative/path label`` list (paths may contain spaces)."""
    out: list[tuple[str, int]] = []
    for n, line in enumerate(read_lines(path), 1):
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise BenchmarkError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        out.append((fields[0], int(fields[1])))
    return out


def parse_cname_cid(path: Path) -> list[str]:
    """Class names of a ``name id`` table, indexed by id (names may contain spaces)."""
    table: dict[int, str] = {}
    for n, line in enumerate(read_lines(path), 1):
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].isdigit():
            raise BenchmarkError(f"{path}:{n}: expected 'class_name id', got {line!r}")
        cid = int(fields[1])
        if cid in table:
            raise BenchmarkError(f"{path}:{n}: class id {cid} appears twice")
        table[cid] = fields[0]
    if sorted(table) != list(range(len(table))):
        raise BenchmarkError(f"{path}: class ids are not 0..{len(table) - 1}")
    names = [table[i] for i in range(len(table))]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"{path}: a class name appears twice")
    return names


def _zeroshot_dirs(bench_dir: Path, layout: _Layout) -> list[Path]:
    found = [bench_dir / d for d in layout.zeroshot_dirs if (bench_dir / d).is_dir()]
    return [d for d in found if (d / layout.sketch_list.format(part="zero")).is_file()]


def _bench_dir(root: Path, kind: str) -> Path | None:
    """The benchmark folder for ``kind``: ``root`` itself or ``root/<Sketchy|TUBerlin|QuickDraw>``."""
    layout = LAYOUTS[kind]
    for cand in (root, root / FOLDER_NAMES[kind]):
        if _zeroshot_dirs(cand, layout):
            return cand
    return None


def detect(root: Path) -> str | None:
    """The real-benchmark kind found at ``root`` (or in one sub-folder of it), or ``None``.

    Raises :class:`BenchmarkError` if ``root`` holds several benchmarks (pass ``kind`` then).
    """
    direct = [k for k in KINDS if _zeroshot_dirs(root, LAYOUTS[k])]
    if len(direct) == 1:
        return direct[0]
    found = direct or [k for k in KINDS if _bench_dir(root, k) is not None]
    if len(found) > 1:
        raise BenchmarkError(f"{root} holds several benchmarks ({', '.join(found)}): choose one with kind=")
    return found[0] if found else None


def explain_unknown(root: Path) -> str:
    """A message naming the files that were looked for when ``root`` matches no layout."""
    wanted = [
        "splits/seen.txt (our layout)",
        *(f"{d}/{LAYOUTS[k].sketch_list.format(part='zero')} ({k})" for k in KINDS for d in LAYOUTS[k].zeroshot_dirs),
    ]
    return (
        f"{root} is not a known benchmark layout: missing file {root / 'splits' / 'seen.txt'}; "
        f"looked for {'; '.join(wanted)} in it and in its sub-folders {', '.join(FOLDER_NAMES.values())}"
    )


def open_real(root: Path, kind: str, zeroshot: str | None = None) -> Benchmark:
    """Open a real benchmark (``kind`` in :data:`KINDS`) at ``root``; ``zeroshot`` picks the split folder."""
    if kind not in LAYOUTS:
        raise BenchmarkError(f"unknown benchmark kind {kind!r}; expected one of {', '.join(KINDS)}")
    layout = LAYOUTS[kind]
    bench_dir = _bench_dir(root, kind)
    if bench_dir is None:
        zs = layout.zeroshot_dirs[0]
        raise BenchmarkError(
            f"{root} is not a {kind} benchmark: missing file {root / zs / layout.sketch_list.format(part='zero')} "
            f"(also looked in {root / FOLDER_NAMES[kind]})"
        )
    available = [d.name for d in _zeroshot_dirs(bench_dir, layout)]
    if zeroshot is None:
        zs_dir = bench_dir / available[0]
    else:
        zs_dir = bench_dir / zeroshot
        if not (zs_dir / layout.sketch_list.format(part="zero")).is_file():
            raise BenchmarkError(
                f"missing file: {zs_dir / layout.sketch_list.format(part='zero')} "
                f"(split folders in {bench_dir}: {', '.join(available)})"
            )

    seen = parse_cname_cid(zs_dir / "cname_cid.txt")
    unseen = parse_cname_cid(zs_dir / "cname_cid_zero.txt")
    items: dict[str, list[tuple[Path, str, str]]] = {}
    missing: dict[str, str] = {}
    for part, suffix in _PARTS.items():
        names = unseen if part == "unseen" else seen
        rows: list[tuple[Path, str, str]] = []
        for domain, pattern in (("sketch", layout.sketch_list), ("photo", layout.photo_list)):
            list_path = zs_dir / pattern.format(part=suffix)
            if not list_path.is_file():
                if part == "unseen":
                    raise BenchmarkError(f"missing file: {list_path}")
                if part == "seen":
                    missing[part] = f"missing file: {list_path}"
                continue
            entries = parse_filelist(list_path)
            if entries and not (bench_dir / entries[0][0]).is_file():
                raise BenchmarkError(
                    f"missing image {bench_dir / entries[0][0]} (first entry of {list_path}): "
                    f"is {bench_dir} the {kind} folder with its images?"
                )
            for rel, label in entries:
                if not 0 <= label < len(names):
                    table = "cname_cid_zero.txt" if part == "unseen" else "cname_cid.txt"
                    raise BenchmarkError(f"{list_path}: label {label} of {rel} is not an id of {zs_dir / table}")
                rows.append((bench_dir / rel, names[label], domain))
        if part == "val" and not rows:
            continue
        items[part] = rows
    layout_name = "sake" if "val" in items else "zse-sbir"
    return Benchmark(
        kind=kind,
        root=bench_dir,
        seen_classes=seen,
        unseen_classes=unseen,
        items=items,
        info={"zeroshot": zs_dir.name, "layout": layout_name, "split_set": zs_dir.name, "split_sets": available},
        missing=missing,
    )
