"""The benchmark API shared by the synthetic set and the real ZS-SBIR benchmarks (CONTRACTS §1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from zsbir_infer.errors import InputError

Domain = Literal["photo", "sketch"]
SplitName = Literal["seen", "unseen", "all"]
DOMAINS: tuple[str, str] = ("photo", "sketch")
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class BenchmarkError(InputError, ValueError):
    """A folder is not a benchmark we know, or a file it needs is missing or malformed."""


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark. ``label`` indexes into the ``classes`` of the split it came from."""

    path: Path
    label: int
    class_name: str
    domain: str  # "photo" | "sketch"


@dataclass
class SplitData:
    """The images of one split: ``classes`` (sorted) and the photo and sketch samples labelled by them."""

    name: str
    classes: list[str]
    photos: list[Sample]
    sketches: list[Sample]

    def of(self, domain: str) -> list[Sample]:
        """The samples of one domain (``"photo"`` or ``"sketch"``)."""
        if domain == "photo":
            return self.photos
        if domain == "sketch":
            return self.sketches
        raise ValueError(f"domain must be 'photo' or 'sketch', not {domain!r}")


@dataclass
class Benchmark:
    """A ZS-SBIR benchmark: seen (training) and unseen (zero-shot test) classes and their images.

    ``items`` maps ``"seen"`` and ``"unseen"`` to ``(path, class_name, domain)`` triples. For real
    benchmarks ``"seen"`` holds the training lists and ``"unseen"`` the zero-shot test lists.
    """

    kind: str
    root: Path
    seen_classes: list[str]
    unseen_classes: list[str]
    items: dict[str, list[tuple[Path, str, str]]] = field(repr=False)
    info: dict[str, object] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it cannot be loaded

    def __post_init__(self) -> None:
        self.seen_classes = sorted(self.seen_classes)
        self.unseen_classes = sorted(self.unseen_classes)
        overlap = set(self.seen_classes) & set(self.unseen_classes)
        if overlap:
            raise BenchmarkError(
                f"{self.root}: seen and unseen classes overlap ({len(overlap)}: {', '.join(sorted(overlap)[:5])})"
            )

    def split(self, name: str) -> SplitData:
        """The samples of ``"seen"``, ``"unseen"`` or ``"all"``; labels index the split's sorted classes.

        Real benchmarks that ship held-out seen-class lists also have ``"val"`` (seen classes).
        """
        if name == "seen":
            classes, parts = self.seen_classes, ["seen"]
        elif name == "val" and "val" in self.items:
            classes, parts = self.seen_classes, ["val"]
        elif name == "unseen":
            classes, parts = self.unseen_classes, ["unseen"]
        elif name == "all":
            classes, parts = sorted(self.seen_classes + self.unseen_classes), ["seen", "unseen"]
        else:
            extra = ", 'val'" if "val" in self.items else ""
            raise ValueError(f"split must be 'seen', 'unseen'{extra} or 'all', not {name!r}")
        for part in parts:
            if part in self.missing:
                raise BenchmarkError(f"{self.root}: cannot load the {part} split: {self.missing[part]}")
        index = {c: i for i, c in enumerate(classes)}
        photos: list[Sample] = []
        sketches: list[Sample] = []
        for part in parts:
            for path, cls, domain in self.items.get(part, []):
                if cls not in index:
                    raise BenchmarkError(f"{path}: class {cls!r} is not a {part} class of {self.root}")
                (photos if domain == "photo" else sketches).append(Sample(path, index[cls], cls, domain))
        return SplitData(name=name, classes=list(classes), photos=photos, sketches=sketches)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of photos and sketches per part (``seen``/``unseen``)."""
        out: dict[str, dict[str, int]] = {}
        for part, rows in self.items.items():
            out[part] = {d: sum(1 for r in rows if r[2] == d) for d in DOMAINS}
        return out


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file; :class:`BenchmarkError` naming the file if it is missing."""
    if not path.is_file():
        raise BenchmarkError(f"missing file: {path}")
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden and temporary files skipped)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
