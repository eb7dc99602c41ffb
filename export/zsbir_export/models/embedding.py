"""A plain (domain-unconditioned) embedding model: ResNet backbone + embedding layer + classifier.

Used for the Tursun et al. (2022) style of training, where photos and sketches share one network and
the domain tag is not an input. Module names: ``backbone.*`` (torchvision ResNet names, so
:func:`zsbir_export.models.resnet.load_pretrained` fills ``model.backbone`` from a torchvision file),
``embedding`` (Linear feature_dim -> embed_dim), ``classifier`` (Linear embed_dim -> num_classes),
``imagenet_fc`` (optional Linear embed_dim -> 1000, for ImageNet-logit distillation).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from zsbir_export.models.cse_resnet import ModelOutput
from zsbir_export.models.resnet import ResNet, build_resnet

__all__ = ["EmbeddingNet"]


class EmbeddingNet(nn.Module):
    """ResNet backbone + linear embedding + training-class classifier; the domain tag is ignored.

    Args:
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50``.
        width: base channels of the backbone (64 = standard).
        embed_dim: embedding size; ``None`` uses the pooled backbone features directly.
        num_classes: training classes (0/None: no classifier).
        imagenet_head: add ``imagenet_fc`` (ImageNet logits from the embedding).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        width: int = 64,
        embed_dim: int | None = 64,
        num_classes: int | None = 100,
        imagenet_head: bool = False,
        imagenet_classes: int = 1000,
    ) -> None:
        super().__init__()
        if embed_dim is not None and int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be positive or None, got {embed_dim}")
        self.backbone_name = backbone
        self.backbone: ResNet = build_resnet(backbone, width=width, num_classes=None)
        feat = self.backbone.feature_dim
        self.embedding: nn.Linear | None = nn.Linear(feat, int(embed_dim)) if embed_dim is not None else None
        self.embed_dim: int = feat if embed_dim is None else int(embed_dim)
        self.num_classes: int = int(num_classes or 0)
        self.classifier: nn.Linear | None = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes else None
        self._imagenet_classes = int(imagenet_classes) if imagenet_head else 0
        self.imagenet_fc: nn.Linear | None = nn.Linear(self.embed_dim, imagenet_classes) if imagenet_head else None

    def _code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.backbone.features(x)
        code = pooled if self.embedding is None else self.embedding(pooled)
        return code, pooled

    def forward(self, x: Tensor, tag: Tensor | None = None) -> ModelOutput:
        """Training outputs for images ``x`` [N, 3, H, W]; ``tag`` is accepted and ignored."""
        code, pooled = self._code(x)
        logits = None if self.classifier is None else self.classifier(code)
        imagenet = None if self.imagenet_fc is None else self.imagenet_fc(code)
        return ModelOutput(code, logits, imagenet, pooled)

    def embed(self, x: Tensor, tag: Tensor | None = None) -> Tensor:
        """L2-normalized embeddings [N, embed_dim]; ``tag`` is accepted and ignored."""
        return F.normalize(self._code(x)[0], p=2.0, dim=1)

    def arch_config(self) -> dict[str, Any]:
        """The ``arch`` block of a checkpoint config (CONTRACTS §5) that rebuilds this model."""
        return {
            "backbone": self.backbone_name,
            "width": self.backbone.width,
            "embed_dim": self.embed_dim if self.embedding is not None else None,
            "domain_conditioned": False,
            "num_classes": self.num_classes,
            "imagenet_head": self._imagenet_classes > 0,
            "imagenet_classes": self._imagenet_classes or 1000,
        }
