"""ResNet-18/34/50 written in the project, state-dict compatible with torchvision's ImageNet weights.

The module and parameter names follow torchvision's layout exactly (``conv1``, ``bn1``, ``layer1`` ..
``layer4``, ``fc``; blocks with ``conv1``/``bn1`` .. and a ``downsample`` ``Sequential`` of a 1x1
convolution (``downsample.0``) and a batch norm (``downsample.1``)), so a torchvision ``.pth`` file
loads with :func:`load_pretrained` without any renaming. Bottleneck blocks put the stride on the 3x3
convolution ("ResNet v1.5"), as torchvision does.

``width`` sets the number of base channels (64 = the published networks). The stage widths are
``width, 2*width, 4*width, 8*width`` (times 4 for bottleneck blocks), so ``resnet18(width=16)`` is a
network of about 0.7 M parameters that trains on a CPU, for the project's embedded default model.

Parameter counts with the 1000-class head (published architecture): resnet18 11,689,512;
resnet34 21,797,672; resnet50 25,557,032.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from zsbir_infer.errors import InputError

__all__ = [
    "RESNET_DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "PretrainedLoadError",
    "ResNet",
    "build_resnet",
    "load_pretrained",
    "resnet18",
    "resnet34",
    "resnet50",
]

#: Block type and blocks per stage of each supported depth.
RESNET_DEPTHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut; used by ResNet-18/34."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` ([N, inplanes, H, W])."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4) with a shortcut; used by ResNet-50."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` ([N, inplanes, H, W])."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet with torchvision's module names.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage (4 stages).
        num_classes: size of the ``fc`` head; ``None`` builds no head (``fc`` is then an identity and
            :meth:`forward` returns the pooled features).
        width: base channels (64 = standard).
        zero_init_residual: zero the last batch-norm weight of each block (a common training trick).

    Attributes:
        feature_dim: channels of the pooled feature vector (``8 * width * block.expansion``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int | None = 1000,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if int(width) < 1:
            raise ValueError(f"width must be a positive number of channels, got {width}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        self.block = block
        self.width = int(width)
        self.inplanes = self.width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, self.width, layers[0])
        self.layer2 = self._make_layer(block, self.width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, self.width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, self.width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim: int = self.width * 8 * block.expansion
        self.fc: nn.Module = nn.Linear(self.feature_dim, int(num_classes)) if num_classes is not None else nn.Identity()
        init_resnet_weights(self, zero_init_residual=zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        mods: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods.extend(block(self.inplanes, planes) for _ in range(1, int(blocks)))
        return nn.Sequential(*mods)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's feature map, [N, feature_dim, H/32, W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def features(self, x: Tensor) -> Tensor:
        """Globally average-pooled features, [N, feature_dim]. Works for any input size >= 32 px."""
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet-style logits [N, num_classes] (or the pooled features when there is no head)."""
        return self.fc(self.features(x))


def init_resnet_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """Initialise like torchvision: He-normal (fan-out) convolutions, unit/zero batch norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


def build_resnet(
    name: str, width: int = 64, num_classes: int | None = 1000, zero_init_residual: bool = False
) -> ResNet:
    """Build ``resnet18`` / ``resnet34`` / ``resnet50`` by name."""
    if name not in RESNET_DEPTHS:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNET_DEPTHS)}")
    kind, layers = RESNET_DEPTHS[name]
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes=num_classes, width=width, zero_init_residual=zero_init_residual)


def resnet18(width: int = 64, num_classes: int | None = 1000) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return build_resnet("resnet18", width=width, num_classes=num_classes)


def resnet34(width: int = 64, num_classes: int | None = 1000) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return build_resnet("resnet34", width=width, num_classes=num_classes)


def resnet50(width: int = 64, num_classes: int | None = 1000) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return build_resnet("resnet50", width=width, num_classes=num_classes)


class PretrainedLoadError(InputError, RuntimeError):
    """A weights file that does not fit the model (or cannot be read)."""


def _summarise(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedLoadError(
            f"cannot read {path} as a torch weights file with weights_only=True "
            f"(truncated, not a torch file, or a pickle holding more than tensors, which is refused "
            f"as unsafe): {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedLoadError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path, skip_fc: bool = False, strict: bool = True) -> list[str]:
    """Load a local torchvision-format ``.pth`` file (e.g. ``resnet50-0676ba61.pth``) into ``model``.

    The file is read with ``torch.load(weights_only=True)``: pickles holding arbitrary objects are
    refused. A ``{'state_dict': ...}`` wrapper and a DataParallel ``module.`` prefix are accepted.

    Args:
        model: usually a :class:`ResNet`; any module whose names follow torchvision's layout.
        path: the weights file.
        skip_fc: drop ``fc.*`` tensors from the file (use when the model has its own head or none).
        strict: when True, every model tensor must come from the file and every file tensor must be
            used; otherwise missing/unexpected keys are tolerated (shapes must still match).

    Returns:
        The model keys that were not found in the file (empty when strict).

    Raises:
        FileNotFoundError: no such file.
        PretrainedLoadError: unreadable file, or keys/shapes that do not fit, with the offending names.
    """
    p = Path(path)
    state = _read_state_dict(p)
    if skip_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems: list[str] = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_summarise(mismatched, 5)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
    if problems:
        raise PretrainedLoadError(
            f"{p} does not fit {type(model).__name__}"
            + (f" (width={model.width})" if isinstance(model, ResNet) else "")
            + ": "
            + "; ".join(problems)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing
