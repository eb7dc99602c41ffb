"""Serving on NVIDIA Triton Inference Server: model repositories written from a bundle, and the server itself.

* :func:`~zsbir_infer.triton.repository.write_repository` turns a bundle (and a gallery) into a Triton model
  repository: ``zsbir_preprocess`` (Python backend: encoded image bytes -> the bundle's preprocessing per
  domain), ``zsbir_encoder`` (ONNX Runtime, TensorRT plans where the bundle has them, or ONNX Runtime inside a
  Python-backend model), ``zsbir_topk`` (Python backend: the gallery search of :class:`~zsbir_infer.Retriever`)
  and ``zsbir_search``, the ensemble clients call (``IMAGE``, optional ``K`` and ``DOMAIN`` ->
  ``SCORES``, ``IDS``, ``PATHS``). ``zsbir export BUNDLE --triton REPO --gallery G`` is its command line.
* :mod:`zsbir_infer.triton.server` finds ``tritonserver`` (``$ZSBIR_TRITONSERVER``, the copy unpacked from
  the ``nvidia-pytriton`` wheel by ``python -m zsbir_infer.triton install``, or an installed ``pytriton``)
  and runs it on loopback; ``zsbir serve --engine triton`` is its command line.

Nothing here imports torch, onnx or tritonclient.
"""

from __future__ import annotations

from zsbir_infer.errors import UnavailableError

__all__ = ["TritonError"]


class TritonError(UnavailableError, ValueError):
    """A Triton repository cannot be written, or the server cannot be found or started (the message says why)."""
