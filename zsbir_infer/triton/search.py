"""The gallery search behind ``zsbir_topk``: a :class:`~zsbir_infer.Retriever` that takes embeddings only.

The Triton model receives the query embeddings from the encoder step, so its retriever needs no encoder of its
own: :func:`open_retriever` opens the gallery read-only, checks that it was built with the model of the given
fingerprint, and wraps it in a ``Retriever`` whose encoder refuses images. Searches are then exactly
``Retriever.search`` on embeddings (CPU exact or ANN per the gallery's policy, or the CUDA kernels).
"""

from __future__ import annotations

import os
from typing import Any, cast

from zsbir_infer.retriever import Retriever, resolve_gallery

__all__ = ["EmbeddingsOnly", "open_retriever"]


class EmbeddingsOnly:
    """Stands in for the encoder of a retriever that is only ever given embeddings."""

    def __init__(self, fingerprint: str, dim: int) -> None:
        self.fingerprint = fingerprint
        self.embedding_dim = dim

    def embed(self, images: Any, domain: str, **_kw: Any) -> Any:
        raise TypeError("this retriever searches embeddings only (the Triton encoder step embeds the images)")

    def describe(self) -> str:
        return f"embeddings only (model {self.fingerprint})"

    def close(self) -> None:
        """Nothing to release."""


def open_retriever(
    gallery: str | os.PathLike[str], fingerprint: str, device: str = "cpu", expand: int = 0
) -> Retriever:
    """A read-only :class:`Retriever` over ``gallery`` (single or sharded) for embeddings of the model
    ``fingerprint``, with the bundle's query expansion ``expand`` (0: off), so that it answers as
    ``Retriever.search`` with that bundle does.

    Raises the gallery's errors (not a gallery, damaged vectors, another model: ``ModelMismatchError``).
    """
    from zsbir_infer.encoder import Encoder
    from zsbir_infer.gallery.shards import open_gallery

    g = open_gallery(resolve_gallery(gallery), readonly=True)
    try:
        g._load()
        g._check_model(fingerprint)
    except Exception:
        g.close()
        raise
    encoder = cast(Encoder, EmbeddingsOnly(fingerprint, g.dim))
    return Retriever(g, encoder, g._root, device, owns_encoder=False, expand=expand)
