"""Images for INT8 calibration and export verification, preprocessed exactly as the runtime will.

A calibration folder is either a benchmark (anything ``zsbir_infer.datasets.open_benchmark`` opens: the
calibration images come from its *seen* split and verification from its *unseen* split, so the accuracy
check does not reuse calibration data) or a plain folder with ``photo/`` and ``sketch/`` subfolders (images
anywhere below them; the subfolder gives the domain). Both domains are always required, because a
domain-conditioned model's activations differ between them.

:func:`split_holdout` sets part of the calibration source aside as a *holdout*: the images on which the
exporter measures its automatic choices (the INT8 sensitivity fallback). It is disjoint from the images that
calibrate and from the images the verification reports on, so no reported number steers a choice. On a
benchmark the holdout is made of whole seen *classes* (the classes the model was not trained on, when the
checkpoint says which, else a seeded 20% of the seen classes), which mimics zero-shot retrieval better than
held-out images of calibration classes; in a plain folder it is a seeded 20% of the images of each domain.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zsbir_infer.errors import InputError

DOMAIN_TAGS: dict[str, int] = {"photo": 1, "sketch": 0}  # CONTRACTS §4
DOMAINS: tuple[str, str] = ("photo", "sketch")
HOLDOUT_FRACTION = 0.2
_HOLDOUT_STREAM = 0x401D  # seeds the holdout choice apart from the calibration sample
_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class CalibrationError(InputError, ValueError):
    """Raised when calibration or verification images are missing or unusable."""


@dataclass
class ImageSet:
    """Preprocessed images of both domains with their tags and (when known) class labels."""

    images: np.ndarray  # float32 [N, 3, H, W]
    domains: np.ndarray  # int64 [N], photo 1 / sketch 0
    labels: np.ndarray  # int64 [N], -1 when unknown
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def count(self, domain: str) -> int:
        """How many images of ``domain`` ("photo" or "sketch") the set holds."""
        return int((self.domains == DOMAIN_TAGS[domain]).sum())

    def select(self, domain: str) -> ImageSet:
        """The subset of one domain."""
        return self.take(np.flatnonzero(self.domains == DOMAIN_TAGS[domain]))

    def take(self, idx: np.ndarray) -> ImageSet:
        """The rows ``idx`` (integer indices, in that order; paths kept when known)."""
        paths = [self.paths[int(i)] for i in idx] if self.paths else []
        return ImageSet(self.images[idx], self.domains[idx], self.labels[idx], paths)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(images, domains)`` chunks of at most ``batch_size``."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.domains[start : start + batch_size]


@dataclass(frozen=True)
class _Item:
    path: Path
    domain: str
    label: int


@dataclass
class DataSource:
    """Where calibration and verification images come from (see the module doc)."""

    root: Path
    kind: str  # "benchmark" or "folder"
    calibration: dict[str, list[_Item]]
    evaluation: dict[str, list[_Item]] | None  # benchmark unseen split, None for plain folders
    classes: dict[str, list[str]]  # split name -> class names

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        out: dict[str, Any] = {"path": str(self.root), "kind": self.kind}
        if self.kind == "benchmark":
            out["calibration_split"] = "seen"
            out["evaluation_split"] = "unseen"
        return out


def _plain_folder_items(root: Path) -> dict[str, list[_Item]]:
    items: dict[str, list[_Item]] = {}
    for domain in DOMAINS:
        sub = root / domain
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        items[domain] = [_Item(p, domain, -1) for p in files]
    return items


def open_source(root: str | Path) -> DataSource:
    """Open a calibration folder: a benchmark (seen split calibrates, unseen verifies) or photo/ + sketch/."""
    path = Path(root)
    if not path.is_dir():
        raise CalibrationError(f"calibration folder does not exist: {path}")
    from zsbir_infer.datasets import BenchmarkError, open_benchmark

    bench_error: str | None = None
    try:
        bench = open_benchmark(path)
    except BenchmarkError as exc:
        bench_error = str(exc)
    else:
        calib: dict[str, list[_Item]] = {}
        evaluation: dict[str, list[_Item]] = {}
        seen = bench.split("seen")
        unseen = bench.split("unseen")
        for domain in DOMAINS:
            calib[domain] = [_Item(s.path, domain, s.label) for s in seen.of(domain)]
            evaluation[domain] = [_Item(s.path, domain, s.label) for s in unseen.of(domain)]
        _require_both(calib, path, "seen split of the benchmark")
        return DataSource(path, "benchmark", calib, evaluation, {"seen": seen.classes, "unseen": unseen.classes})

    if (path / "photo").is_dir() and (path / "sketch").is_dir():
        items = _plain_folder_items(path)
        _require_both(items, path, "photo/ and sketch/ subfolders")
        return DataSource(path, "folder", items, None, {})
    raise CalibrationError(
        f"calibration folder {path} is neither a benchmark ({bench_error}) nor a folder with photo/ and sketch/ "
        "subfolders of images"
    )


def _require_both(items: Mapping[str, Sequence[_Item]], root: Path, what: str) -> None:
    missing = [d for d in DOMAINS if not items.get(d)]
    if missing:
        raise CalibrationError(
            f"calibration data in {root} ({what}) has no {' and no '.join(missing)} images; "
            "INT8 calibration needs images of both domains"
        )


@dataclass
class HoldoutSplit:
    """The calibration source split into a calibration pool and a disjoint holdout (see the module doc)."""

    calibration: dict[str, list[_Item]]
    holdout: dict[str, list[_Item]]
    rule: str
    holdout_classes: list[str] = field(default_factory=list)

    def usable(self) -> bool:
        """Whether the holdout has images of both domains (else nothing can be measured on it)."""
        return all(self.holdout.get(d) for d in DOMAINS)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "calibration_pool": {d: len(self.calibration.get(d, [])) for d in DOMAINS},
            "holdout_pool": {d: len(self.holdout.get(d, [])) for d in DOMAINS},
        }
        if self.holdout_classes:
            out["holdout_classes"] = list(self.holdout_classes)
        return out


def split_holdout(
    data: DataSource,
    *,
    fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    trained_classes: Sequence[str] | None = None,
) -> HoldoutSplit:
    """Split ``data.calibration`` into a calibration pool and a holdout; both disjoint from ``data.evaluation``.

    Benchmark: whole seen classes. If ``trained_classes`` (the checkpoint's training classes) leaves out at
    least two seen classes, those classes are the holdout (zero-shot for the model); otherwise a seeded choice
    of ``round(fraction * seen)`` classes (at least 1, at most all but one), topped up from the untrained
    ones first. With a single seen class, or a plain folder: a seeded ``fraction`` of each domain's images
    (none when a domain has fewer than 3).
    """
    if not 0.0 < fraction < 1.0:
        raise CalibrationError(f"the holdout fraction must be in (0, 1), got {fraction}")
    seen = data.classes.get("seen", [])
    if data.kind == "benchmark" and len(seen) >= 2:
        trained = set(trained_classes or [])
        untrained = [c for c in seen if c not in trained] if trained & set(seen) else []
        n = min(len(seen) - 1, max(1, round(fraction * len(seen))))
        if 2 <= len(untrained) < len(seen):
            held = set(untrained)
            rule = "seen classes the checkpoint was not trained on"
        else:
            rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
            rest = [c for c in seen if c not in untrained]
            extra = max(0, n - len(untrained))
            held = set(untrained) | {rest[int(i)] for i in rng.choice(len(rest), size=extra, replace=False)}
            rule = f"seeded choice of {fraction:.0%} of the seen classes (seed {seed})"
        names = [c for c in seen if c in held]
        calib = {d: [it for it in items if seen[it.label] not in held] for d, items in data.calibration.items()}
        hold = {d: [it for it in items if seen[it.label] in held] for d, items in data.calibration.items()}
        return HoldoutSplit(calib, hold, rule, names)
    calib = {}
    hold = {}
    for domain, items in data.calibration.items():
        n = int(fraction * len(items)) if len(items) >= 3 else 0
        rng = np.random.default_rng([seed, _HOLDOUT_STREAM, DOMAIN_TAGS[domain]])
        chosen = set(rng.choice(len(items), size=n, replace=False).tolist()) if n else set()
        hold[domain] = [it for i, it in enumerate(items) if i in chosen]
        calib[domain] = [it for i, it in enumerate(items) if i not in chosen]
    return HoldoutSplit(calib, hold, f"seeded choice of {fraction:.0%} of the images of each domain (seed {seed})")


def pick(items: Sequence[_Item], count: int | None, seed: int, domain: str) -> list[_Item]:
    """A seeded choice of ``count`` items (all when ``count`` is None or larger), in their original order."""
    if count is None or count >= len(items):
        return list(items)
    rng = np.random.default_rng([seed, DOMAIN_TAGS[domain]])
    idx = np.sort(rng.choice(len(items), size=count, replace=False))
    return [items[int(i)] for i in idx]


def load_images(
    items_by_domain: Mapping[str, Sequence[_Item]],
    preprocess: Mapping[str, Mapping[str, Any]],
    per_domain: int | None,
    seed: int = 0,
) -> ImageSet:
    """Pick up to ``per_domain`` images of each domain (seeded) and preprocess them with that domain's spec."""
    from zsbir_infer.preprocess import ImageDecodeError, preprocess_batch

    arrays: list[np.ndarray] = []
    domains: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    paths: list[str] = []
    for domain in DOMAINS:
        items = list(items_by_domain.get(domain, []))
        chosen = pick(items, per_domain, seed, domain)
        if not chosen:
            continue
        try:
            arr = preprocess_batch([it.path for it in chosen], preprocess[domain])
        except ImageDecodeError as exc:
            raise CalibrationError(f"cannot read a {domain} image: {exc}") from exc
        arrays.append(arr)
        domains.append(np.full(len(chosen), DOMAIN_TAGS[domain], dtype=np.int64))
        labels.append(np.asarray([it.label for it in chosen], dtype=np.int64))
        paths += [str(it.path) for it in chosen]
    if not arrays:
        raise CalibrationError("no images were selected")
    return ImageSet(np.concatenate(arrays), np.concatenate(domains), np.concatenate(labels), paths)


def random_images(per_domain: int, size: tuple[int, int], seed: int = 0) -> ImageSet:
    """Seeded standard-normal inputs of both domains, for checks when no image folder is given."""
    rng = np.random.default_rng(seed)
    n = 2 * per_domain
    images = rng.standard_normal((n, 3, size[0], size[1])).astype(np.float32)
    domains = np.asarray([DOMAIN_TAGS["photo"]] * per_domain + [DOMAIN_TAGS["sketch"]] * per_domain, dtype=np.int64)
    return ImageSet(images, domains, np.full(n, -1, dtype=np.int64), [])
