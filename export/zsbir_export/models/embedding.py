"""An embedding model: a backbone (ResNet or EfficientNet-Lite) + embedding layer + classifier heads.

Used for the Tursun et al. (2022) style of training, where photos and sketches share one network, and
(with ``domain_conditioned=True`` on an EfficientNet-Lite backbone) for DSN on that backbone, where the
domain tag drives the backbone's CSE-style gates. Module names: ``backbone.*`` (torchvision ResNet names,
or the EfficientNet-Lite names of :mod:`zsbir_export.models.efficientnet`, so ImageNet files load into
``model.backbone`` directly), ``embedding`` (Linear feature_dim -> embed_dim), ``classifier`` (Linear
embed_dim -> num_classes), ``imagenet_fc`` (optional Linear embed_dim -> teacher classes, the head that
knowledge preservation / distillation trains).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsbir_export.models.cse_resnet import ModelOutput
from zsbir_export.models.efficientnet import LITE_VARIANTS, EfficientNetLite
from zsbir_export.models.resnet import RESNET_DEPTHS, ResNet, build_resnet

__all__ = ["BACKBONES", "EmbeddingNet"]

#: Backbones an :class:`EmbeddingNet` can have.
BACKBONES: tuple[str, ...] = (*RESNET_DEPTHS, *LITE_VARIANTS)


class EmbeddingNet(nn.Module):
    """Backbone + linear embedding + training-class classifier.

    Args:
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50`` or ``efficientnet_lite0`` .. ``lite4``.
        width: base channels of a ResNet backbone (64 = standard); ignored for EfficientNet-Lite.
        embed_dim: embedding size; ``None`` uses the pooled backbone features directly.
        num_classes: training classes (0/None: no classifier).
        imagenet_head: add ``imagenet_fc`` (teacher-class logits from the embedding).
        domain_conditioned: EfficientNet-Lite only: domain gates in the backbone, the tag is an input.
            Otherwise the tag is accepted and ignored.
        flip_average: ``embed`` returns the normalized mean of the embeddings of each image and its mirror
            image (test-time flip augmentation, inside the exported graph; twice the compute per image).
            Training outputs (``forward``) are unaffected, so it can be switched on for a trained model.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        width: int = 64,
        embed_dim: int | None = 64,
        num_classes: int | None = 100,
        imagenet_head: bool = False,
        imagenet_classes: int = 1000,
        domain_conditioned: bool = False,
        flip_average: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim is not None and int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be positive or None, got {embed_dim}")
        self.backbone_name = backbone
        self.domain_conditioned = bool(domain_conditioned)
        self.flip_average = bool(flip_average)
        if backbone in LITE_VARIANTS:
            self.backbone: ResNet | EfficientNetLite = EfficientNetLite(
                backbone, num_classes=0, domain_conditioned=self.domain_conditioned
            )
        elif self.domain_conditioned:
            raise ValueError(f"{backbone}: use the cse_{backbone} backbone for a domain-conditioned ResNet")
        else:
            self.backbone = build_resnet(backbone, width=width, num_classes=None)
        feat = self.backbone.feature_dim
        self.embedding: nn.Linear | None = nn.Linear(feat, int(embed_dim)) if embed_dim is not None else None
        self.embed_dim: int = feat if embed_dim is None else int(embed_dim)
        self.num_classes: int = int(num_classes or 0)
        self.classifier: nn.Linear | None = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes else None
        self._imagenet_classes = int(imagenet_classes) if imagenet_head else 0
        self.imagenet_fc: nn.Linear | None = nn.Linear(self.embed_dim, imagenet_classes) if imagenet_head else None

    def _code(self, x: Tensor, tag: Tensor | None) -> tuple[Tensor, Tensor]:
        if isinstance(self.backbone, EfficientNetLite):
            pooled = self.backbone.features(x, tag if self.domain_conditioned else None)
        else:
            pooled = self.backbone.features(x)
        code = pooled if self.embedding is None else self.embedding(pooled)
        return code, pooled

    def forward(self, x: Tensor, tag: Tensor | None = None) -> ModelOutput:
        """Training outputs for images ``x`` [N, 3, H, W] (``tag``: photo 1, sketch 0)."""
        code, pooled = self._code(x, tag)
        logits = None if self.classifier is None else self.classifier(code)
        imagenet = None if self.imagenet_fc is None else self.imagenet_fc(code)
        return ModelOutput(code, logits, imagenet, pooled)

    def embed(self, x: Tensor, tag: Tensor | None = None) -> Tensor:
        """L2-normalized embeddings [N, embed_dim] (with ``flip_average``: of the image and its mirror)."""
        if not self.flip_average:
            return F.normalize(self._code(x, tag)[0], p=2.0, dim=1)
        both = torch.cat([x, x.flip(-1)])  # one backbone call for both views
        tags = None if tag is None else torch.cat([tag, tag])
        e = F.normalize(self._code(both, tags)[0], p=2.0, dim=1)
        e = e.reshape(2, -1, self.embed_dim)  # [view, N, D]; a constant D keeps the ONNX output shape known
        return F.normalize(e[0] + e[1], p=2.0, dim=1)

    def arch_config(self) -> dict[str, Any]:
        """The ``arch`` block of a checkpoint config (CONTRACTS §5) that rebuilds this model."""
        arch: dict[str, Any] = {
            "backbone": self.backbone_name,
            "width": self.backbone.width if isinstance(self.backbone, ResNet) else None,
            "embed_dim": self.embed_dim if self.embedding is not None else None,
            "domain_conditioned": self.domain_conditioned,
            "num_classes": self.num_classes,
            "imagenet_head": self._imagenet_classes > 0,
            "imagenet_classes": self._imagenet_classes or 1000,
        }
        if self.flip_average:  # only when set, so that existing checkpoints keep their exact arch block
            arch["flip_average"] = True
        return arch
