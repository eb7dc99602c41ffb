"""zsbir_preprocess (Triton Python backend): encoded image bytes -> the bundle's preprocessing for the domain.

Inputs ``IMAGE`` (BYTES [batch, 1]) and optional ``DOMAIN`` (BYTES [batch, 1]: ``sketch``, the default, or
``photo``); outputs ``PIXELS`` (FP32 [batch, 3, H, W]) and, for domain-conditioned models, ``DOMAIN_TAG`` (INT64
[batch, 1]). Decoding is :func:`zsbir_infer.preprocess.preprocess_into`, the call ``Encoder.embed`` makes, so
the pixels equal the library's. A request whose image does not decode gets an error response; the others in
the same batch are answered normally.
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

from zsbir_infer.preprocess import ImageDecodeError, PreprocessSpec, preprocess_into  # noqa: E402


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


class TritonPythonModel:
    """Decode and preprocess each request's images."""

    def initialize(self, args: dict[str, Any]) -> None:
        spec = json.loads((Path(__file__).resolve().parent / "preprocess.json").read_text(encoding="utf-8"))
        self.specs = {d: PreprocessSpec.from_dict(s) for d, s in spec["preprocess"].items()}
        self.tags: dict[str, int] | None = spec["domain_tags"]

    def _one(self, request: Any) -> Any:
        images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        dom = pb_utils.get_input_tensor_by_name(request, "DOMAIN")
        if dom is None:
            domains = ["sketch"] * len(images)
        else:
            d = dom.as_numpy().reshape(-1)
            if d.size not in (1, len(images)):
                raise ValueError(f"DOMAIN has {d.size} values for {len(images)} images")
            domains = [_text(v).strip().lower() for v in (np.repeat(d, len(images)) if d.size == 1 else d)]
        bad = sorted({d for d in domains if d not in self.specs})
        if bad:
            raise ValueError(f"DOMAIN must be 'sketch' or 'photo', got {bad[0]!r}")
        first = next(iter(self.specs.values()))
        pixels = np.empty((len(images), 3, first.height, first.width), dtype=np.float32)
        for i, (data, domain) in enumerate(zip(images, domains, strict=True)):
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(f"IMAGE {i} must be the bytes of an image file")
            try:
                preprocess_into(bytes(data), self.specs[domain], pixels[i])
            except ImageDecodeError as exc:
                raise ValueError(f"IMAGE {i}: {exc}") from None
        outputs = [pb_utils.Tensor("PIXELS", pixels)]
        if self.tags is not None:
            tags = np.array([[self.tags[d]] for d in domains], dtype=np.int64)
            outputs.append(pb_utils.Tensor("DOMAIN_TAG", tags))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # one bad request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
