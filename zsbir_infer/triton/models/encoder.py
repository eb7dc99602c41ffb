"""zsbir_encoder for servers without the ONNX Runtime backend: ONNX Runtime inside a Triton Python-backend model.

Same inputs, outputs and batching as the standard ``onnxruntime_onnx`` model: the bundle's image input (FP32
[batch, 3, H, W]), its domain input when the model is domain-conditioned (INT64 [batch], configured as dims [1]
reshaped to []), and its embedding output. The requests of one batch are run in one ONNX Runtime call, through
:class:`zsbir_infer.backends.ort.OrtBackend` on the copy of the bundle in ``1/bundle`` (checked against its
manifest and fingerprint when the model loads).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

for _entry in reversed(os.environ.get("ZSBIR_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from zsbir_infer.backends.ort import OrtBackend  # noqa: E402
from zsbir_infer.bundle import Bundle  # noqa: E402


def _params(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """Run the bundle's model on each batch of requests."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = _params(args)
        bundle = Bundle.open(Path(__file__).resolve().parent / "bundle")
        if params.get("zsbir_fingerprint") and params["zsbir_fingerprint"] != bundle.fingerprint:
            raise ValueError(
                f"the bundle copy has fingerprint {bundle.fingerprint}, the config says {params['zsbir_fingerprint']}"
            )
        threads = int(params.get("zsbir_threads") or 0) or None
        provider = "cuda" if params.get("zsbir_device") == "gpu" else "cpu"
        self.backend = OrtBackend(bundle, params.get("zsbir_precision", "fp32"), provider=provider, threads=threads)
        self.image = bundle.image_input
        self.domain = bundle.domain_input
        self.output = bundle.output_name

    def execute(self, requests: list[Any]) -> list[Any]:
        images = [pb_utils.get_input_tensor_by_name(r, self.image).as_numpy() for r in requests]
        tags = None
        if self.domain is not None:
            tags = np.concatenate(
                [pb_utils.get_input_tensor_by_name(r, self.domain).as_numpy().reshape(-1) for r in requests]
            ).astype(np.int64)
        try:
            out = self.backend.run(np.ascontiguousarray(np.concatenate(images), dtype=np.float32), tags)
        except Exception as exc:
            error = pb_utils.TritonError(f"the encoder failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for x in images:
            n = x.shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, out[start : start + n])]))
            start += n
        return responses

    def finalize(self) -> None:
        self.backend.close()
