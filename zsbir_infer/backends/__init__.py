"""Inference backends behind :class:`zsbir_infer.encoder.Encoder`.

Three backends run a bundle's model, tried in this order by ``backend="auto"``:

``tensorrt``  a TensorRT engine (plan) listed in the manifest, run with the TensorRT 10 runtime API and
              cuda-python; only a plan built for this GPU architecture and TensorRT version is used.
``ort-cuda``  ONNX Runtime with the CUDA execution provider (the ``onnxruntime-gpu`` package).
``ort-cpu``   ONNX Runtime on the CPU (always available).

Every backend implements :class:`Backend`. Nothing heavy is imported until a backend is opened.
"""

from __future__ import annotations

from zsbir_infer.backends.base import Backend, BackendUnavailable
from zsbir_infer.backends.factory import AUTO_ORDER, BACKENDS, open_backend

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendUnavailable", "open_backend"]
