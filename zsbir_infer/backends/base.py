"""The backend interface and the selection logic (``auto`` = TensorRT, then ORT CUDA, then ORT CPU)."""

from __future__ import annotations

import abc
import logging
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from zsbir_infer.bundle import Bundle

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendUnavailable", "default_threads", "open_backend"]

log = logging.getLogger("zsbir.backends")

#: Backend names accepted by ``Encoder.open(..., backend=...)``.
BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "ort-cuda", "ort-cpu")
#: The order in which ``auto`` tries backends.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "ort-cuda", "ort-cpu")


class BackendUnavailable(RuntimeError):
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
    this process may use (``os.sched_getaffinity``), capped at 16."""
    for var in ("ZSBIR_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                continue
            if n > 0:
                return n
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _open_one(name: str, bundle: Bundle, precision: str, *, device_id: int, threads: int | None) -> Backend:
    if name == "ort-cpu":
        from zsbir_infer.backends.ort import OrtBackend

        return OrtBackend(bundle, precision, provider="cpu", threads=threads)
    if name == "ort-cuda":
        from zsbir_infer.backends.ort import OrtBackend

        return OrtBackend(bundle, precision, provider="cuda", device_id=device_id, threads=threads)
    if name == "tensorrt":
        from zsbir_infer.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, precision, device_id=device_id)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def open_backend(
    bundle: Bundle,
    precision: str = "fp32",
    backend: str = "auto",
    *,
    device_id: int = 0,
    threads: int | None = None,
) -> Backend:
    """Open ``backend`` for ``bundle`` at ``precision``.

    ``"auto"`` tries :data:`AUTO_ORDER` and returns the first that opens; an explicit name either opens
    or raises :class:`BackendUnavailable` saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return _open_one(backend, bundle, precision, device_id=device_id, threads=threads)
    reasons: list[str] = []
    for name in AUTO_ORDER:
        try:
            chosen = _open_one(name, bundle, precision, device_id=device_id, threads=threads)
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            log.debug("backend %s unavailable: %s", name, exc)
            continue
        if reasons:
            log.info("using backend %s (%s)", name, "; ".join(reasons))
        return chosen
    raise BackendUnavailable("no backend can run this bundle:\n  " + "\n  ".join(reasons))
