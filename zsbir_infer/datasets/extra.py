"""Extra sketches (e.g. QuickDraw doodles) added to the seen classes of a benchmark (CONTRACTS §1).

An extra-sketch folder holds ``sketch/<word>/*.png`` and, optionally, ``class_map.csv`` with the header
``sketchy_class,quickdraw_word`` mapping each word to a class of the benchmark. Without the map, the
folder names themselves must be class names of the benchmark.

Only words that map to a **seen** class of the benchmark's split set are added, to the ``"seen"``
part, as sketches of that class. Words that map to an unseen class are refused and counted
(``unseen_refused``); words that map to no class of the benchmark (or split set) are skipped and counted
(``skipped_words``); folders the map does not mention are counted as ``unmapped_words``. So doodles of
a zero-shot class can never leak into training, whichever split set is chosen.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from zsbir_infer.datasets.base import Benchmark, BenchmarkError, list_images

CLASS_MAP = "class_map.csv"
CLASS_MAP_HEADER = ("sketchy_class", "quickdraw_word")


@dataclass(frozen=True)
class ExtraSketches:
    """What an extra-sketch folder contributes to one benchmark split set."""

    root: Path
    items: list[tuple[Path, str, str]]  # (path, seen class, "sketch")
    classes: list[str]  # seen classes that received sketches, sorted
    words: list[str]  # words whose sketches were added
    skipped_words: list[str]  # words mapped to no class of the benchmark
    unseen_refused: list[str]  # words mapped to an unseen class
    unmapped_words: list[str]  # sketch/<word>/ folders the class map does not mention
    class_map: Path | None

    def summary(self) -> dict[str, object]:
        """The JSON-ready summary stored in ``Benchmark.info["extra_sketches"]``."""
        return {
            "root": str(self.root),
            "class_map": str(self.class_map) if self.class_map is not None else None,
            "added": len(self.items),
            "classes": len(self.classes),
            "words": len(self.words),
            "skipped_words": len(self.skipped_words),
            "unseen_refused": len(self.unseen_refused),
            "unmapped_words": len(self.unmapped_words),
        }


def read_class_map(path: Path) -> list[tuple[str, str, int]]:
    """``(word, class, line number)`` rows of a ``sketchy_class,quickdraw_word`` CSV file.

    :class:`BenchmarkError` names the file and line of a bad header, a malformed row or a word that is
    mapped twice.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BenchmarkError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e})") from None
    rows: list[tuple[str, str, int]] = []
    first: dict[str, int] = {}
    header_seen = False
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for fields in reader:
            line = reader.line_num
            cells = [c.strip() for c in fields]
            if not any(cells):
                continue
            if not header_seen:
                if tuple(cells) != CLASS_MAP_HEADER:
                    raise BenchmarkError(
                        f"{path}:{line}: expected the header {','.join(CLASS_MAP_HEADER)!r}, got {fields!r}"
                    )
                header_seen = True
                continue
            if len(cells) != 2 or not all(cells):
                raise BenchmarkError(f"{path}:{line}: expected 'sketchy_class,quickdraw_word', got {fields!r}")
            cls, word = cells
            if word in first:
                raise BenchmarkError(f"{path}:{line}: word {word!r} is already mapped on line {first[word]}")
            first[word] = line
            rows.append((word, cls, line))
    except csv.Error as e:
        raise BenchmarkError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if not header_seen:
        raise BenchmarkError(f"{path}:1: empty file; expected the header {','.join(CLASS_MAP_HEADER)!r}")
    return rows


def load_extra_sketches(root: str | Path, seen_classes: list[str], unseen_classes: list[str]) -> ExtraSketches:
    """The sketches of ``root`` that belong to ``seen_classes``; refuses words of ``unseen_classes``."""
    root = Path(root)
    sketch_dir = root / "sketch"
    if not sketch_dir.is_dir():
        raise BenchmarkError(f"missing folder: {sketch_dir} (extra sketches need {root}/sketch/<word>/ images)")
    folders = sorted(p.name for p in sketch_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    map_path = root / CLASS_MAP
    if map_path.is_file():
        mapping = read_class_map(map_path)
        mapped = {w for w, _, _ in mapping}
        unmapped = [w for w in folders if w not in mapped]
        class_map: Path | None = map_path
    else:
        mapping = [(w, w, 0) for w in folders]
        unmapped = []
        class_map = None
    seen, unseen = set(seen_classes), set(unseen_classes)
    items: list[tuple[Path, str, str]] = []
    classes: set[str] = set()
    words: list[str] = []
    skipped: list[str] = []
    refused: list[str] = []
    for word, cls, line in mapping:
        if cls in unseen:
            refused.append(word)
            continue
        if cls not in seen:
            skipped.append(word)
            continue
        folder = sketch_dir / word
        if not folder.is_dir():
            where = f"{map_path}:{line}: " if class_map is not None else ""
            raise BenchmarkError(f"{where}missing folder: {folder} (word {word!r} of class {cls!r})")
        items += [(p, cls, "sketch") for p in list_images(folder)]
        classes.add(cls)
        words.append(word)
    return ExtraSketches(
        root=root,
        items=items,
        classes=sorted(classes),
        words=words,
        skipped_words=skipped,
        unseen_refused=refused,
        unmapped_words=unmapped,
        class_map=class_map,
    )


def add_extra_sketches(bench: Benchmark, root: str | Path) -> ExtraSketches:
    """Append the extra sketches at ``root`` to ``bench``'s ``"seen"`` part (in place).

    Records the summary in ``bench.info["extra_sketches"]`` and returns the full record.
    """
    root = Path(root)
    if root.resolve() == Path(bench.root).resolve():
        raise BenchmarkError(f"{root}: the extra-sketch folder is the benchmark itself")
    extra = load_extra_sketches(root, bench.seen_classes, bench.unseen_classes)
    bench.items.setdefault("seen", []).extend(extra.items)
    bench.info["extra_sketches"] = extra.summary()
    return extra
