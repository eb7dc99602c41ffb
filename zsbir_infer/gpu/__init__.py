"""GPU top-k search for zsbir galleries: fused CUDA kernels with a torch-free loader and a CPU fallback.

>>> from zsbir_infer import gpu
>>> gpu.availability()                      # (True, "CUDA device 0 ...") or (False, "why not")
>>> scores, idx = gpu.topk_ip(queries_f16, gallery_f16, k=10)       # [Q, k] float32 / int64
>>> dist, idx = gpu.hamming_topk(query_codes, codes, k=10)          # [Q, k] int32 / int64
>>> g = gpu.GpuGallery(vectors_f16, codes=None); g.search(q, 10)    # upload once, search many times

The same calls run on the CPU (``device="cpu"``, or automatically where no GPU or no built library is
present) with the same results contract: best first, ties by smaller gallery index, ``k > N`` padded
with index -1 and score -inf (distance INT32_MAX). Build the kernels with ``make kernels``.
"""

from __future__ import annotations

from zsbir_infer.gpu._arrays import DeviceArray
from zsbir_infer.gpu._cuda import GpuError, library_path
from zsbir_infer.gpu.search import (
    MAX_DIM,
    MAX_K,
    PAD_DISTANCE,
    PAD_INDEX,
    PAD_SCORE,
    GpuGallery,
    availability,
    hamming_topk,
    is_available,
    topk_ip,
)

__all__ = [
    "MAX_DIM",
    "MAX_K",
    "PAD_DISTANCE",
    "PAD_INDEX",
    "PAD_SCORE",
    "DeviceArray",
    "GpuError",
    "GpuGallery",
    "availability",
    "hamming_topk",
    "is_available",
    "library_path",
    "topk_ip",
]
