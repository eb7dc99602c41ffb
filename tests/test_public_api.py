"""The public surface of the gallery and the encoder is pinned: a new public method is a decision (add it here,
to ``PUBLIC_API`` and to docs/ARCHITECTURE.md), not an accident. Bookkeeping that only zsbir's own indexers,
retriever, server and Triton models need goes through the underscore interface (``INTERNAL_API``), which the
single and the sharded gallery both implement."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from zsbir_infer.encoder import Encoder
from zsbir_infer.gallery import Gallery, ShardedGallery
from zsbir_infer.gallery.store import INTERNAL_API, PUBLIC_API

ROOT = Path(__file__).resolve().parents[1]

#: What a library user calls on a gallery (with ``len()`` and ``with``). Written out here on purpose.
GALLERY_VERBS = {
    "create",
    "open",
    "close",
    "add",
    "delete",
    "compact",
    "build_index",
    "search",
    "vectors",
    "indexed",
    "skipped",
    "stats",
    "verify",
    "repair",
}
ENCODER_SURFACE = {"open", "embed", "embed_stream", "close", "describe", "backend", "fingerprint", "embedding_dim"}


def public_names(cls: type) -> set[str]:
    """Methods, properties and other class attributes without a leading underscore."""
    return {name for name in dir(cls) if not name.startswith("_")}


def test_gallery_public_surface_is_the_documented_list() -> None:
    assert public_names(Gallery) == GALLERY_VERBS
    assert set(PUBLIC_API) == GALLERY_VERBS and len(PUBLIC_API) == len(GALLERY_VERBS)
    for dunder in ("__len__", "__enter__", "__exit__"):
        assert dunder in vars(Gallery)


@pytest.mark.parametrize("cls", [Gallery, ShardedGallery])
def test_single_and_sharded_galleries_have_the_same_surface(cls: type) -> None:
    """The same user verbs (and the same internal interface) on both, with the same argument names."""
    assert public_names(cls) == GALLERY_VERBS
    for name in (*PUBLIC_API, *INTERNAL_API, "__len__", "__enter__", "__exit__"):
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
    for name in ("add", "delete", "search", "vectors", "verify", "indexed", "skipped", "stats", "_plan", "_skip_many"):
        mine = list(inspect.signature(getattr(cls, name)).parameters)
        single = list(inspect.signature(getattr(Gallery, name)).parameters)
        assert mine == single, f"{cls.__name__}.{name}{mine} differs from Gallery.{name}{single}"


def test_internal_interface_is_private() -> None:
    assert all(name.startswith("_") and not name.startswith("__") for name in INTERNAL_API)
    assert not set(INTERNAL_API) & public_names(Gallery)


def test_documentation_lists_the_public_verbs() -> None:
    doc = inspect.getdoc(Gallery) or ""
    surface = doc.split("Public surface", 1)[1].split("The runtime's own bookkeeping", 1)[0]
    assert set(re.findall(r":meth:`(\w+)`", surface)) == GALLERY_VERBS
    arch = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    para = next(p for p in arch.split("\n\n") if p.startswith("`Gallery`'s public surface"))
    listed = set(re.findall(r"`(\w+)`", para.split("internal", 1)[0]))
    assert listed >= GALLERY_VERBS, f"docs/ARCHITECTURE.md misses {sorted(GALLERY_VERBS - listed)}"


def test_encoder_has_one_embedding_verb() -> None:
    assert public_names(Encoder) == ENCODER_SURFACE
