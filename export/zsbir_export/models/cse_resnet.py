"""CSE-ResNet: a ResNet whose squeeze-excitation gates are conditioned on the domain (SAKE / DSN).

The networks here are state-dict compatible with the official code of SAKE (Liu et al., ICCV 2019,
github.com/qliu24/SAKE) and DSN (Wang et al., IJCAI 2021, github.com/haowang1992/DSN, which builds on
SAKE's code). Facts taken from reading that code (our implementation is written independently):

* ``src/senet.py`` (both repos), ``CSEModule``: squeeze = global average pool to ``[N, C]``;
  ``fc1 = Linear(C, C // 16)`` then ReLU; the domain tag (a float column ``[N, 1]``) is
  **concatenated after the ReLU** to the squeezed vector, ``fc2 = Linear(C // 16 + 1, C)`` then
  sigmoid; the block output is ``x * gate`` (no separate tag layer). Both are ``nn.Linear`` (SENet's
  1x1 convolutions, squeezed: ImageNet SE-ResNet-50 weights are converted by squeezing and appending
  a zero column for the tag, ``initialize_pretrained_model_hashing``).
* ``CSEResNetBottleneck``: Caffe-style stride on the first 1x1 convolution (not on the 3x3 as in
  torchvision), ``se_module`` applied to ``bn3``'s output before the residual sum, ``downsample`` =
  ``Sequential(conv1x1(stride), BatchNorm)``.
* ``CSENet_hashing``: ``layer0 = Sequential(conv1 7x7/2 pad 3, bn1, relu1, pool)`` with
  ``pool = MaxPool2d(3, stride=2, ceil_mode=True)`` (no padding); ``layer1..layer4`` with
  ``[3, 4, 6, 3]`` blocks, reduction 16; ``avg_pool = AvgPool2d(7, stride=1)`` (so the official
  network only works at 224x224; we use adaptive average pooling, identical at 224 and usable at
  other sizes); ``second_last_linear = Linear(2048, hashing_dim)`` is the **64-d embedding**
  ("hashing" layer); ``last_linear = Linear(hashing_dim, 1000)`` gives ImageNet logits *from the
  64-d code* (for SAKE's knowledge distillation from the ImageNet teacher).
* ``src/ResnetModel.py`` ``CSEResnetModel_KDHashing``: wraps that network as ``original_model`` and
  adds ``linear = Linear(hashing_dim, num_classes)`` (the training-class classifier). Training runs it
  under ``nn.DataParallel``, so checkpoint keys read ``module.original_model.layer0.conv1.weight``,
  ``module.original_model.second_last_linear.weight``, ``module.linear.weight`` ...
  SAKE's ``CSEResnetModel_KD`` (no hashing layer) has ``original_model.last_linear = Linear(2048,
  1000)`` and ``linear = Linear(2048, num_classes)``; we support it with ``embed_dim=None``.
* ``src/test_cse_resnet_*_zeroshot.py``: the tag is ``torch.ones(N, 1) * tag`` with **photo = 1,
  sketch = 0**; the retrieval feature is ``original_model.hashing(original_model.features(x, tag))``,
  i.e. the 64-d ``second_last_linear`` output taken **before** any normalization, then
  ``F.normalize`` (L2) and ranking by ``-cdist`` (Euclidean distance of unit vectors, the same order
  as cosine similarity). Images: ``cv2.imread(...)[:, :, ::-1]`` (RGB), ``Resize([224, 224])``
  (squash, PIL bilinear), ``ToTensor``, ImageNet mean/std.
* ``save_checkpoint`` in ``train_cse_resnet_*_ext.py`` writes ``{'epoch', 'arch', 'state_dict',
  'best_acc1' (a tensor), 'optimizer'}`` and copies the best one to ``model_best.pth.tar``. The DSN
  and SAKE checkpoints of the default (``module='CSE'``) model have the *same* state-dict keys; DSN
  adds no parameters (its contrastive loss uses the normalized 64-d code directly; the memory bank
  is not saved).

``width`` (base channels) and ``depth`` (``cse_resnet18`` / ``cse_resnet34`` with basic blocks) give
small variants for training on a CPU; they keep the official module names.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsbir_export.models.resnet import RESNET_DEPTHS

__all__ = [
    "CSE_DEPTHS",
    "CSEBasicBlock",
    "CSEBottleneck",
    "CSEModule",
    "CSENet",
    "CSEResNetModel",
    "ModelOutput",
    "cse_resnet",
    "load_se_resnet50_imagenet",
    "tag_column",
]

#: Block type and blocks per stage of each supported CSE depth.
CSE_DEPTHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {f"cse_{name}": v for name, v in RESNET_DEPTHS.items()}


class ModelOutput(NamedTuple):
    """What a model's ``forward(x, tag)`` returns for training.

    Attributes:
        embedding: the retrieval embedding, **not** normalized, [N, D].
        logits: training-class logits [N, num_classes], or None when the model has no classifier.
        imagenet_logits: ImageNet logits [N, 1000] (for SAKE-style distillation), or None.
        features: globally pooled backbone features [N, feature_dim] (DSN's memory bank uses them).
    """

    embedding: Tensor
    logits: Tensor | None
    imagenet_logits: Tensor | None
    features: Tensor


def tag_column(tag: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """Domain tags (photo = 1, sketch = 0) as the float column [N, 1] the CSE blocks concatenate.

    Accepts shape [N] or [N, 1], any numeric dtype.
    """
    if not isinstance(tag, Tensor):
        raise TypeError(f"tag must be a tensor of domain tags (photo=1, sketch=0), got {type(tag).__name__}")
    t = tag.reshape(-1, 1).to(dtype)
    if not torch.jit.is_tracing() and t.shape[0] != batch:
        raise ValueError(f"tag has {t.shape[0]} entries for a batch of {batch} images (shape {tuple(tag.shape)})")
    return t


class CSEModule(nn.Module):
    """Squeeze-excitation whose excitation also sees the domain tag (concatenated after ``fc1``+ReLU)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden + 1, channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor, tag: Tensor) -> Tensor:
        """Gate ``x`` [N, C, H, W] channel-wise; ``tag`` is the float column [N, 1]."""
        s = torch.flatten(self.avg_pool(x), 1)
        s = self.relu(self.fc1(s))
        g = self.sigmoid(self.fc2(torch.cat((s, tag), 1)))
        return x * g.reshape(g.shape[0], -1, 1, 1)


class CSEBottleneck(nn.Module):
    """Official CSE-ResNet bottleneck: stride on the first 1x1 conv, CSE gate before the residual sum."""

    expansion: int = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, reduction: int = 16
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.se_module = CSEModule(planes * 4, reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor, tag: Tensor) -> Tensor:
        """Apply the block; ``tag`` is the float column [N, 1]."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.se_module(out, tag) + residual)


class CSEBasicBlock(nn.Module):
    """Two 3x3 convolutions with a CSE gate before the residual sum (for the small variants)."""

    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, reduction: int = 16
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.se_module = CSEModule(planes, reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor, tag: Tensor) -> Tensor:
        """Apply the block; ``tag`` is the float column [N, 1]."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.se_module(out, tag) + residual)


class CSENet(nn.Module):
    """The official ``CSENet_hashing`` trunk (``original_model`` in a checkpoint).

    Args:
        block: ``CSEBottleneck`` (official) or ``CSEBasicBlock`` (small variants).
        layers: blocks per stage.
        width: base channels (64 = official).
        embed_dim: size of ``second_last_linear`` (the "hashing" embedding); ``None`` builds no
            hashing layer (SAKE's ``CSEResnetModel_KD``: the embedding is the pooled feature).
        imagenet_head: build ``last_linear`` (ImageNet logits from the embedding).
        imagenet_classes: outputs of ``last_linear``.
        reduction: SE reduction ratio (16 = official).
    """

    def __init__(
        self,
        block: type[CSEBottleneck] | type[CSEBasicBlock],
        layers: tuple[int, ...] | list[int],
        width: int = 64,
        embed_dim: int | None = 64,
        imagenet_head: bool = True,
        imagenet_classes: int = 1000,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if int(width) < 1:
            raise ValueError(f"width must be a positive number of channels, got {width}")
        if embed_dim is not None and int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be positive or None, got {embed_dim}")
        self.width = int(width)
        self.reduction = int(reduction)
        self.inplanes = self.width
        self.layer0 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, self.width, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("bn1", nn.BatchNorm2d(self.width)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
                ]
            )
        )
        self.layer1 = self._make_layer(block, self.width, layers[0], 1)
        self.layer2 = self._make_layer(block, self.width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, self.width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, self.width * 8, layers[3], 2)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = self.width * 8 * block.expansion
        self.embed_dim: int = self.feature_dim if embed_dim is None else int(embed_dim)
        self.second_last_linear: nn.Linear | None = (
            nn.Linear(self.feature_dim, int(embed_dim)) if embed_dim is not None else None
        )
        self.last_linear: nn.Linear | None = nn.Linear(self.embed_dim, imagenet_classes) if imagenet_head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[CSEBottleneck] | type[CSEBasicBlock], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods: list[nn.Module] = [block(self.inplanes, planes, stride, downsample, self.reduction)]
        self.inplanes = planes * block.expansion
        mods.extend(block(self.inplanes, planes, 1, None, self.reduction) for _ in range(1, int(blocks)))
        return nn.Sequential(*mods)

    def features(self, x: Tensor, tag: Tensor) -> Tensor:
        """Last feature map [N, feature_dim, h, w]; ``tag`` is the float column [N, 1]."""
        x = self.layer0(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x, tag)
        return x

    def pool(self, fmap: Tensor) -> Tensor:
        """Global average pooling to [N, feature_dim]."""
        return torch.flatten(self.avg_pool(fmap), 1)

    def hashing(self, pooled: Tensor) -> Tensor:
        """The embedding (un-normalized) from pooled features."""
        return pooled if self.second_last_linear is None else self.second_last_linear(pooled)

    def logits(self, code: Tensor) -> Tensor | None:
        """ImageNet logits from the embedding, or None without the head."""
        return None if self.last_linear is None else self.last_linear(code)


class CSEResNetModel(nn.Module):
    """CSE-ResNet embedding model, the layout of the official ``CSEResnetModel_KDHashing``.

    ``original_model`` is the :class:`CSENet` trunk; ``linear`` classifies the embedding into the
    training classes (absent when ``num_classes`` is 0/None).
    """

    def __init__(
        self,
        depth: str = "cse_resnet50",
        width: int = 64,
        embed_dim: int | None = 64,
        num_classes: int | None = 100,
        imagenet_head: bool = True,
        imagenet_classes: int = 1000,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        if depth not in CSE_DEPTHS:
            raise ValueError(f"unknown CSE-ResNet depth {depth!r}; expected one of {sorted(CSE_DEPTHS)}")
        kind, layers = CSE_DEPTHS[depth]
        block: type[CSEBottleneck] | type[CSEBasicBlock] = CSEBottleneck if kind == "bottleneck" else CSEBasicBlock
        self.depth = depth
        self.original_model = CSENet(
            block,
            layers,
            width=width,
            embed_dim=embed_dim,
            imagenet_head=imagenet_head,
            imagenet_classes=imagenet_classes,
            reduction=reduction,
        )
        self.embed_dim: int = self.original_model.embed_dim
        self.num_classes: int = int(num_classes or 0)
        self.linear: nn.Linear | None = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes else None
        self._hashing = embed_dim is not None
        self._imagenet_classes = int(imagenet_classes) if imagenet_head else 0

    def forward(self, x: Tensor, tag: Tensor) -> ModelOutput:
        """Training outputs for images ``x`` [N, 3, H, W] and domain tags ``tag`` [N] (photo=1, sketch=0)."""
        t = tag_column(tag, x.shape[0], x.dtype)
        pooled = self.original_model.pool(self.original_model.features(x, t))
        code = self.original_model.hashing(pooled)
        logits = None if self.linear is None else self.linear(code)
        return ModelOutput(code, logits, self.original_model.logits(code), pooled)

    def embed(self, x: Tensor, tag: Tensor) -> Tensor:
        """L2-normalized retrieval embeddings [N, embed_dim] (as the official test code computes them)."""
        t = tag_column(tag, x.shape[0], x.dtype)
        code = self.original_model.hashing(self.original_model.pool(self.original_model.features(x, t)))
        return F.normalize(code, p=2.0, dim=1)

    def arch_config(self) -> dict[str, Any]:
        """The ``arch`` block of a checkpoint config (CONTRACTS §5) that rebuilds this model."""
        return {
            "backbone": self.depth,
            "width": self.original_model.width,
            "embed_dim": self.embed_dim if self._hashing else None,
            "domain_conditioned": True,
            "num_classes": self.num_classes,
            "imagenet_head": self._imagenet_classes > 0,
            "imagenet_classes": self._imagenet_classes or 1000,
            "reduction": self.original_model.reduction,
        }


def cse_resnet(
    depth: str = "cse_resnet50",
    width: int = 64,
    embed_dim: int | None = 64,
    num_classes: int | None = 100,
    imagenet_head: bool = True,
) -> CSEResNetModel:
    """Build a CSE-ResNet embedding model (``cse_resnet50`` at width 64 = the official DSN/SAKE model)."""
    return CSEResNetModel(depth, width=width, embed_dim=embed_dim, num_classes=num_classes, imagenet_head=imagenet_head)


def load_se_resnet50_imagenet(model: CSEResNetModel, path: str | os.PathLike[str]) -> None:
    """Initialise a CSE-ResNet from an ImageNet SE-ResNet file, the way the official code does.

    The file is Cadene's ``pretrainedmodels`` ``se_resnet50-ce0d4300.pth`` (or any file with its key
    layout: ``layer0.conv1``, ``layer1.0.se_module.fc1`` as 1x1 convolutions, ``last_linear``), read
    with ``torch.load(weights_only=True)``. As in ``initialize_pretrained_model_hashing`` of the
    official ``senet.py``: SE 1x1 convolution weights are squeezed to linear weights, ``fc2`` gets a
    zero column for the tag (so the network starts out tag-independent), and with a hashing layer
    the ImageNet head ``W`` (1000 x 2048) is split by SVD, ``W ~ U_d (S_d V_d)``: ``second_last_linear``
    gets ``S_d V_d`` and ``last_linear`` gets ``U_d``. Unlike the official code (which leaves both
    biases at their random initialisation) ``last_linear.bias`` takes the ImageNet bias and
    ``second_last_linear.bias`` is zero, so the two layers start as the rank-``d`` approximation of
    the ImageNet classifier. Without a hashing layer ``last_linear`` is copied as is (the SAKE/DSN
    teacher). The training-class classifier (``linear``) keeps its initialisation.

    Raises:
        FileNotFoundError, PretrainedLoadError: missing/unreadable file or keys/shapes that do not fit.
    """
    from zsbir_export.models.resnet import PretrainedLoadError, _read_state_dict

    p = Path(path)
    state = _read_state_dict(p)
    converted: dict[str, Tensor] = {}
    for k, v in state.items():
        if ".se_module.fc1.weight" in k or ".se_module.fc2.weight" in k:
            v = v.reshape(v.shape[0], v.shape[1])
            if ".fc2." in k:
                v = torch.cat([v, torch.zeros(v.shape[0], 1, dtype=v.dtype)], dim=1)
        converted["original_model." + k] = v
    head_w = converted.pop("original_model.last_linear.weight", None)
    head_b = converted.pop("original_model.last_linear.bias", None)
    trunk = model.original_model
    if head_w is not None and head_b is not None and trunk.last_linear is not None:
        if trunk.second_last_linear is None:
            converted["original_model.last_linear.weight"] = head_w
            converted["original_model.last_linear.bias"] = head_b
        else:
            d = trunk.embed_dim
            u, s, vh = torch.linalg.svd(head_w.double(), full_matrices=False)
            if d > s.shape[0]:
                raise PretrainedLoadError(f"embed_dim {d} exceeds the rank bound {s.shape[0]} of {p}'s ImageNet head")
            converted["original_model.second_last_linear.weight"] = (s[:d, None] * vh[:d]).to(head_w.dtype)
            converted["original_model.second_last_linear.bias"] = torch.zeros(d, dtype=head_w.dtype)
            converted["original_model.last_linear.weight"] = u[:, :d].to(head_w.dtype)
            converted["original_model.last_linear.bias"] = head_b
    own = model.state_dict()
    trunk_keys = [k for k in own if k.startswith("original_model.layer")]
    missing = [k for k in trunk_keys if k not in converted]
    unexpected = [k for k in converted if k not in own]
    mismatched = [
        f"{k}: file {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
        for k in converted
        if k in own and converted[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(x)} {what}: {', '.join(x[:5])}{' ...' if len(x) > 5 else ''}"
            for what, x in (("missing", missing), ("unexpected", unexpected), ("shape mismatch(es)", mismatched))
            if x
        ]
        raise PretrainedLoadError(
            f"{p} does not fit this CSE-ResNet as SE-ResNet ImageNet weights: " + "; ".join(problems)
        )
    model.load_state_dict(converted, strict=False)
