"""zsbir_topk (Triton Python backend): the gallery's top-k search for a batch of query embeddings.

Inputs ``EMBEDDING`` (FP32 [batch, D]) and optional ``K`` (INT32 [batch, 1]; one value per request, default
from the config); outputs ``SCORES`` (FP32 [batch, k], cosine), ``IDS`` (INT64 gallery row ids) and ``PATHS``
(BYTES, relative to the photo folder), best first. The search is :meth:`zsbir_infer.Retriever.search` on the
embeddings (the exact/ANN policy of the gallery, the CUDA kernels with ``zsbir_device`` cuda), so hits equal the
library's; the requests of one batch that ask for the same ``K`` are searched together. Rows with fewer hits
than the others of their request (only an approximate index returns fewer) are padded with id -1, score -inf
and an empty path.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

for _entry in reversed(os.environ.get("ZSBIR_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from zsbir_infer.encoder import l2_normalize  # noqa: E402
from zsbir_infer.triton.search import open_retriever  # noqa: E402


def _params(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """Search the gallery for each batch of embeddings."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = _params(args)
        gallery = params.get("zsbir_gallery") or os.environ.get("ZSBIR_GALLERY", "")
        if not gallery:
            raise ValueError("no gallery: export the repository with --gallery G, or set $ZSBIR_GALLERY on the server")
        self.retriever = open_retriever(
            gallery,
            params["zsbir_fingerprint"],
            params.get("zsbir_device", "cpu"),
            expand=int(params.get("zsbir_expand") or 0),
        )
        self.default_k = int(params.get("zsbir_default_k") or 10)

    def _k(self, request: Any) -> int:
        t = pb_utils.get_input_tensor_by_name(request, "K")
        if t is None:
            return self.default_k
        ks = {int(v) for v in t.as_numpy().reshape(-1)}
        if len(ks) != 1:
            raise ValueError(f"every row of a request must ask for the same K, got {sorted(ks)}")
        k = ks.pop()
        if k < 1:
            raise ValueError(f"K must be a positive integer, got {k}")
        return k

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        queries: list[np.ndarray] = []
        for i, request in enumerate(requests):
            queries.append(pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy())
            try:
                groups.setdefault(self._k(request), []).append(i)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
        for k, members in groups.items():
            q = l2_normalize(np.concatenate([queries[i] for i in members]))
            try:
                hits = self.retriever.search(q, k=k)
            except Exception as exc:
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"search failed: {exc}")
                    )
                continue
            start = 0
            for i in members:
                rows = hits[start : start + queries[i].shape[0]]
                start += queries[i].shape[0]
                width = max((len(r) for r in rows), default=0)
                scores = np.full((len(rows), width), -np.inf, dtype=np.float32)
                ids = np.full((len(rows), width), -1, dtype=np.int64)
                paths = np.full((len(rows), width), b"", dtype=object)
                for r, row in enumerate(rows):
                    for j, h in enumerate(row):
                        scores[r, j], ids[r, j], paths[r, j] = (
                            h.score,
                            h.id,
                            h.relpath.encode("utf-8", "surrogateescape"),
                        )
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor("SCORES", scores), pb_utils.Tensor("IDS", ids), pb_utils.Tensor("PATHS", paths)]
                )
        return responses

    def finalize(self) -> None:
        self.retriever.close()
