"""ZS-SBIR benchmarks: the synthetic generator and loaders for our layout and the real benchmarks.

``open_benchmark(root)`` auto-detects the layout of ``root`` and returns a :class:`Benchmark`
(CONTRACTS §1). Torch-free; only numpy and Pillow are needed (and only by the generator).
"""

from __future__ import annotations

from pathlib import Path

from zsbir_infer.datasets.base import Benchmark, BenchmarkError, Sample, SplitData
from zsbir_infer.datasets.extra import ExtraSketches, add_extra_sketches, load_extra_sketches, read_class_map
from zsbir_infer.datasets.folder import split_sets

__all__ = [
    "Benchmark",
    "BenchmarkError",
    "ExtraSketches",
    "Sample",
    "SplitData",
    "add_extra_sketches",
    "detect_kind",
    "load_extra_sketches",
    "open_benchmark",
    "read_class_map",
    "split_sets",
]


def detect_kind(root: str | Path) -> str:
    """The layout of ``root``: ``"synthetic"``/``"folder"`` (ours) or a real benchmark kind."""
    from zsbir_infer.datasets import folder

    path = Path(root)
    if not path.is_dir():
        raise BenchmarkError(f"benchmark folder does not exist: {path}")
    if folder.is_folder_benchmark(path):
        return folder.folder_kind(path)
    from zsbir_infer.datasets import benchmarks

    kind = benchmarks.detect(path)
    if kind is None:
        raise BenchmarkError(benchmarks.explain_unknown(path))
    return kind


def open_benchmark(
    root: str | Path,
    kind: str | None = None,
    *,
    zeroshot: str | None = None,
    extra_sketches: str | Path | None = None,
) -> Benchmark:
    """Open the benchmark at ``root`` (layout auto-detected unless ``kind`` is given).

    Kinds: ``"synthetic"``/``"folder"`` (our layout), ``"sketchy"``, ``"tuberlin"``, ``"quickdraw"``.
    ``zeroshot`` picks the split set: for our layout the suffix of ``splits/seen{NAME}.txt`` and
    ``splits/unseen{NAME}.txt`` (``"21"``; ``None`` or ``"default"``: ``seen.txt``/``unseen.txt``), for
    a real benchmark its split folder (Sketchy: ``zeroshot1`` (default, 100/25) or ``zeroshot0``
    (104/21)). ``extra_sketches`` is a folder of extra sketches (``sketch/<word>/`` and optionally
    ``class_map.csv``, e.g. QuickDraw doodles) added to the seen classes only; see
    :func:`add_extra_sketches`. ``info["split_set"]``/``info["split_sets"]`` name the split set in use
    and those available. Raises :class:`BenchmarkError` naming the missing file when ``root`` is no
    known layout or the split set does not exist.
    """
    from zsbir_infer.datasets import folder

    path = Path(root)
    if kind is None:
        kind = detect_kind(path)
    if kind in ("synthetic", "folder"):
        bench = folder.open_folder(path, zeroshot)
    else:
        from zsbir_infer.datasets import benchmarks

        if not path.is_dir():
            raise BenchmarkError(f"benchmark folder does not exist: {path}")
        bench = benchmarks.open_real(path, kind, zeroshot=zeroshot)
    if extra_sketches is not None:
        add_extra_sketches(bench, extra_sketches)
    return bench
