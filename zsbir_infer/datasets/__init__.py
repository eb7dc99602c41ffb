"""ZS-SBIR benchmarks: the synthetic generator and loaders for our layout and the real benchmarks.

``open_benchmark(root)`` auto-detects the layout of ``root`` and returns a :class:`Benchmark`
(CONTRACTS §1). Torch-free; only numpy and Pillow are needed (and only by the generator).
"""

from __future__ import annotations

from pathlib import Path

from zsbir_infer.datasets.base import Benchmark, BenchmarkError, Sample, SplitData

__all__ = ["Benchmark", "BenchmarkError", "Sample", "SplitData", "detect_kind", "open_benchmark"]


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


def open_benchmark(root: str | Path, kind: str | None = None, *, zeroshot: str | None = None) -> Benchmark:
    """Open the benchmark at ``root`` (layout auto-detected unless ``kind`` is given).

    Kinds: ``"synthetic"``/``"folder"`` (our layout), ``"sketchy"``, ``"tuberlin"``, ``"quickdraw"``.
    ``zeroshot`` picks a real benchmark's split folder (Sketchy: ``zeroshot1`` (default, 100/25) or
    ``zeroshot0`` (104/21)). Raises :class:`BenchmarkError` naming the missing file when ``root`` is no
    known layout.
    """
    from zsbir_infer.datasets import folder

    path = Path(root)
    if kind is None:
        kind = detect_kind(path)
    if kind in ("synthetic", "folder"):
        return folder.open_folder(path)
    from zsbir_infer.datasets import benchmarks

    if not path.is_dir():
        raise BenchmarkError(f"benchmark folder does not exist: {path}")
    return benchmarks.open_real(path, kind, zeroshot=zeroshot)
