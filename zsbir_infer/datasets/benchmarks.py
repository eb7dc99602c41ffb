"""Loaders for the real ZS-SBIR benchmarks (in progress)."""

from __future__ import annotations

from pathlib import Path

from zsbir_infer.datasets.base import Benchmark, BenchmarkError

KINDS: tuple[str, ...] = ()


def detect(root: Path) -> str | None:
    """The real-benchmark kind of ``root``, or ``None``."""
    return None


def explain_unknown(root: Path) -> str:
    """Why ``root`` is not a known layout (names the files that were looked for)."""
    return f"{root} is not a known benchmark layout: missing file {root / 'splits' / 'seen.txt'}"


def open_real(root: Path, kind: str) -> Benchmark:
    """Open a real benchmark of the given kind."""
    raise BenchmarkError(f"unknown benchmark kind {kind!r}")
