"""The backend interface: what every inference backend implements (the factory is in ``factory.py``)."""

from __future__ import annotations

import abc

import numpy as np

from zsbir_infer import threads as _threads
from zsbir_infer.errors import UnavailableError

__all__ = ["Backend", "BackendUnavailable", "default_threads"]


class BackendUnavailable(UnavailableError, RuntimeError):
    """The requested backend cannot run here (missing package, no GPU, no matching engine, ...)."""


class Backend(abc.ABC):
    """Runs a bundle's model on preprocessed batches.

    ``run(images, tags)`` takes float32 NCHW images (and, for domain-conditioned models, int64 tags of
    length N) and returns the raw model output as float32 ``[N, D]``; the encoder renormalizes it.
    """

    #: Backend name: "tensorrt", "ort-cuda" or "ort-cpu".
    name: str = ""
    #: Largest batch the backend accepts in one call (None: unlimited).
    max_batch: int | None = None
    #: Smallest batch the backend accepts (TensorRT profiles may require more than 1).
    min_batch: int = 1
    #: Optimal batch size, if the backend knows one (TensorRT profile "opt").
    opt_batch: int | None = None

    @abc.abstractmethod
    def run(self, images: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
        """Embed one batch: ``images`` float32 [N,3,H,W] C-contiguous, ``tags`` int64 [N] or None."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (device memory, sessions). Safe to call twice."""

    def describe(self) -> str:
        """One line naming the backend and its device, for logs and ``--verbose`` output."""
        return self.name


def default_threads() -> int:
    """Intra-op threads for CPU inference: ``ZSBIR_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs
    this process may use, capped at 16."""
    return _threads.default_threads(16, from_env=True)
