"""Test helpers the Ray workers import (the Ray tests put this folder on the workers' PYTHONPATH)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from zsbir_infer.indexer import WalkEntry, _prepare

if TYPE_CHECKING:
    from zsbir_infer.preprocess import PreprocessSpec


class PoisonError(RuntimeError):
    """What the decoding code raises on a poisoned file."""


def raising_prepare(entry: WalkEntry, spec: PreprocessSpec, out: np.ndarray) -> tuple[bool, str]:
    """The indexer's read+decode, except that it raises on files named ``poison*`` (a decoder bug)."""
    if entry.relpath.rsplit("/", 1)[-1].startswith("poison"):
        raise PoisonError(f"the decoder crashed on {entry.relpath}")
    return _prepare(entry, spec, out)
