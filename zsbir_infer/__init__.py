"""zsbir runtime: zero-shot sketch-based image retrieval without torch.

The public entry points are imported lazily so that ``import zsbir_infer`` stays cheap and never
pulls in onnxruntime, usearch or CUDA bindings until they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it (filled in as the runtime grows).
_LAZY: dict[str, str] = {
    "evaluate": "zsbir_infer.metrics",
    "Encoder": "zsbir_infer.encoder",
    "Bundle": "zsbir_infer.bundle",
    "Gallery": "zsbir_infer.gallery",
    "Hit": "zsbir_infer.gallery",
    "Retriever": "zsbir_infer.retriever",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    pass


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zsbir_infer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
