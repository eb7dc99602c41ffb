"""Opening a backend by name, and ``auto``: TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU.

The concrete backends import :mod:`zsbir_infer.backends.base`; this module imports them (lazily), so
the interface never imports its implementations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from zsbir_infer.backends.base import Backend, BackendUnavailable

if TYPE_CHECKING:
    from zsbir_infer.bundle import Bundle

__all__ = ["AUTO_ORDER", "BACKENDS", "open_backend"]

log = logging.getLogger("zsbir.backends")

#: Backend names accepted by ``Encoder.open(..., backend=...)``.
BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "ort-cuda", "ort-cpu")
#: The order in which ``auto`` tries backends.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "ort-cuda", "ort-cpu")


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
