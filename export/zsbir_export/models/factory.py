"""``build_model(arch)``: a model from the ``arch`` block of a checkpoint config (CONTRACTS §5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from zsbir_export.models.cse_resnet import CSE_DEPTHS, CSEResNetModel
from zsbir_export.models.efficientnet import LITE_VARIANTS
from zsbir_export.models.embedding import EmbeddingNet

__all__ = ["ARCH_KEYS", "EmbeddingModel", "build_model"]

#: Every model class of the project: each has ``forward(x, tag)``, ``embed(x, tag)`` and ``arch_config()``.
EmbeddingModel: TypeAlias = CSEResNetModel | EmbeddingNet

#: Keys ``build_model`` understands (others are rejected so that typos do not pass silently).
ARCH_KEYS = frozenset(
    {
        "backbone",
        "width",
        "embed_dim",
        "domain_conditioned",
        "num_classes",
        "imagenet_head",
        "imagenet_classes",
        "reduction",
        "flip_average",
    }
)
_PLAIN = ("resnet18", "resnet34", "resnet50")


def build_model(arch_config: Mapping[str, Any]) -> EmbeddingModel:
    """Build a model from an ``arch`` block.

    ``backbone``: ``resnet18|34|50`` (plain :class:`EmbeddingNet`, the tag is ignored),
    ``cse_resnet18|34|50`` (:class:`CSEResNetModel`, the tag is an input) or
    ``efficientnet_lite0..4`` (:class:`EmbeddingNet` on EfficientNet-Lite; with ``domain_conditioned:
    true`` its blocks get domain gates and the tag is an input). ``domain_conditioned: true`` with a
    plain ResNet name selects the CSE variant of that depth; ``false`` with a CSE name is an error.
    Defaults: width 64 (ResNets only), embed_dim 64, num_classes 0, imagenet_head false (plain) /
    true (CSE), flip_average false (``EmbeddingNet`` only: ``embed`` averages each image with its mirror).
    ``model.arch_config()`` returns the canonical, complete block.

    Raises:
        ValueError: unknown backbone, unknown keys or contradictory settings.
    """
    if not isinstance(arch_config, Mapping):
        raise ValueError(f"arch config must be a mapping, got {type(arch_config).__name__}")
    unknown = sorted(set(arch_config) - ARCH_KEYS)
    if unknown:
        raise ValueError(f"unknown arch key(s) {unknown}; known: {sorted(ARCH_KEYS)}")
    backbone = arch_config.get("backbone")
    if not isinstance(backbone, str):
        raise ValueError("arch config needs 'backbone' (e.g. 'resnet18' or 'cse_resnet50')")
    conditioned = arch_config.get("domain_conditioned")
    if backbone in _PLAIN and conditioned:
        backbone = "cse_" + backbone
    if backbone in CSE_DEPTHS and conditioned is False:
        raise ValueError(f"backbone {backbone!r} is domain-conditioned but domain_conditioned is false")
    if arch_config.get("flip_average") and backbone in CSE_DEPTHS:
        raise ValueError(f"flip_average is supported by EmbeddingNet backbones, not {backbone!r}")
    width = int(arch_config.get("width") or 64)
    embed_raw = arch_config.get("embed_dim", 64)
    embed_dim = None if embed_raw is None else int(embed_raw)
    num_classes = int(arch_config.get("num_classes") or 0)
    imagenet_classes = int(arch_config.get("imagenet_classes", 1000))
    if backbone in CSE_DEPTHS:
        return CSEResNetModel(
            backbone,
            width=width,
            embed_dim=embed_dim,
            num_classes=num_classes,
            imagenet_head=bool(arch_config.get("imagenet_head", True)),
            imagenet_classes=imagenet_classes,
            reduction=int(arch_config.get("reduction", 16)),
        )
    if backbone in LITE_VARIANTS:
        return EmbeddingNet(
            backbone,
            embed_dim=embed_dim,
            num_classes=num_classes,
            imagenet_head=bool(arch_config.get("imagenet_head", False)),
            imagenet_classes=imagenet_classes,
            domain_conditioned=bool(conditioned),
            flip_average=bool(arch_config.get("flip_average", False)),
        )
    if backbone in _PLAIN:
        return EmbeddingNet(
            backbone,
            width=width,
            embed_dim=embed_dim,
            num_classes=num_classes,
            imagenet_head=bool(arch_config.get("imagenet_head", False)),
            imagenet_classes=imagenet_classes,
            flip_average=bool(arch_config.get("flip_average", False)),
        )
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted((*_PLAIN, *CSE_DEPTHS, *LITE_VARIANTS))}")
