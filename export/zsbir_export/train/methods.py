"""Training methods as strategies: each is a set-up and a loss, registered by name in :data:`METHODS`.

``tursun``  Tursun et al. (2022): one network for both domains; ``w_c * cross-entropy(training classes)
            + w_q * domain-balanced quadruplet (L2-normalized embeddings, random or batch-hard mining)
            + w_k * semantic knowledge preservation``. The knowledge-preservation targets are the
            teacher's (the ImageNet classifier's, or the pre-training checkpoint's) soft predictions
            averaged over each training class's photos, prepared ONCE before training
            (class-oriented, no online teacher). Ablation: cross-entropy only.
``dsn``     DSN (Wang et al., 2021): a domain-conditioned network (CSE-ResNet, or EfficientNet-Lite with
            domain gates); ``CE + SAKE distillation from the frozen teacher (photos; semantic adjustment
            on the teacher classes related to the sample's class) + supervised contrastive loss over two
            colour-augmented views (128-d projection head, T = 0.07) + memory loss (photo features vs
            the class centre of the top-10 sketch features in the bank)``. Ablation: CE + SAKE-KD, that
            is SAKE, DSN's baseline.
``none``    the pre-training stage for data without ImageNet weights (the synthetic set): cross-entropy
            on the training photos for the class head and the teacher head (one output per training
            class, or per part of compositional class names: ``--pretrain-labels parts``).

A strategy sees the run only through :class:`RunContext` (model, teacher, seen split, device, config and
the teacher's outputs over samples) and returns named loss terms; the loop sums them, steps and logs. Adding a method
is one subclass with ``@register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsbir_export import losses as L
from zsbir_export.train.teacher import Teacher
from zsbir_infer.datasets import SplitData

__all__ = [
    "METHODS",
    "Method",
    "RunContext",
    "StepInput",
    "head_logits",
    "parse_parts",
    "part_slices",
    "parts_loss",
    "register",
]

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` available as ``zsbir train --method NAME``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


class RunContext(Protocol):
    """What a strategy may use of a run."""

    cfg: Any
    model: nn.Module
    teacher: Teacher | None
    seen: SplitData
    device: torch.device
    log: Callable[[str], None]

    def teacher_outputs(self, samples: list[Any], tag: int) -> Tensor:
        """The teacher's logits over ``samples`` (eval preprocessing)."""
        ...


@dataclass
class StepInput:
    """One batch on the device: images, labels, tags, number of sketches (first), extra views."""

    x: Tensor
    y: Tensor
    tag: Tensor
    n_sketch: int
    views: list[Tensor]


def _head_linears(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(training-class classifier, teacher head) of an EmbeddingNet or CSEResNetModel."""
    if hasattr(model, "classifier"):  # EmbeddingNet
        cls_head, teacher_head = model.classifier, model.imagenet_fc
    else:  # CSEResNetModel
        cls_head, teacher_head = model.linear, model.original_model.last_linear  # type: ignore[union-attr]
    if not isinstance(cls_head, nn.Linear) or not isinstance(teacher_head, nn.Linear):
        raise ValueError("the model needs a training-class classifier and a teacher head")
    return cls_head, teacher_head


def head_logits(model: nn.Module, embedding: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Logits of both heads from the raw embedding.

    ``scale > 0``: cosine logits ``scale * <normalize(e), normalize(w_k)>`` (NormFace; the bias is not
    used), which keeps the class structure angular, matching the cosine ranking used at retrieval
    time. ``scale == 0``: the heads' plain linear outputs (the official DSN/SAKE choice).
    """
    cls_head, teacher_head = _head_linears(model)
    e = embedding.float()
    if scale <= 0:
        return cls_head(e), teacher_head(e)
    en = F.normalize(e, dim=1)
    return (
        scale * en @ F.normalize(cls_head.weight.float(), dim=1).t(),
        scale * en @ F.normalize(teacher_head.weight.float(), dim=1).t(),
    )


def parse_parts(class_names: list[str]) -> tuple[list[str], list[list[int]]]:
    """Part vocabulary of compositional class names (``"ring-3spokes-tri-legs"``: one part per ``-`` field).

    Returns the teacher-head names ``"<field>:<value>"`` (grouped by field, sorted) and, per class,
    the head index of each of its parts. Raises ``ValueError`` when the names do not all have the same
    number of fields.
    """
    fields = [c.split("-") for c in class_names]
    k = {len(f) for f in fields}
    if len(k) != 1 or next(iter(k)) < 2:
        raise ValueError(
            "--pretrain-labels parts needs compositional class names with the same number of '-' fields "
            f"(like the synthetic set's); got e.g. {class_names[:3]}"
        )
    n = next(iter(k))
    names: list[str] = []
    for j in range(n):
        names += [f"{j}:{v}" for v in sorted({f[j] for f in fields})]
    pos = {name: i for i, name in enumerate(names)}
    return names, [[pos[f"{j}:{f[j]}"] for j in range(n)] for f in fields]


def part_slices(teacher_classes: list[str]) -> list[tuple[int, int]]:
    """Contiguous head ranges of each part field (names ``"<field>:<value>"``); [] for plain class names."""
    if not teacher_classes or any(":" not in c for c in teacher_classes):
        return []
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(teacher_classes) + 1):
        if i == len(teacher_classes) or teacher_classes[i].split(":")[0] != teacher_classes[start].split(":")[0]:
            out.append((start, i))
            start = i
    return out


def parts_loss(logits: Tensor, part_targets: Tensor, slices: list[tuple[int, int]]) -> Tensor:
    """Mean over part fields of the cross-entropy within each field's slice of ``logits``."""
    total = logits.new_zeros(())
    for j, (a, b) in enumerate(slices):
        total = total + F.cross_entropy(logits[:, a:b], part_targets[:, j] - a)
    return total / max(1, len(slices))


class Method:
    """A training strategy (see module doc). Subclasses set the class attributes and :meth:`losses`."""

    name: ClassVar[str] = ""
    #: domains each batch holds (sketches first)
    domains: ClassVar[tuple[str, ...]] = ("sketch", "photo")
    #: whether the model must be domain-conditioned
    domain_conditioned: ClassVar[bool] = False
    #: whether the method needs a teacher (the pretrained network's classifier)
    needs_teacher: ClassVar[bool] = True
    #: whether the teacher is used at every step (else only in :meth:`setup`, and freed after it)
    online_teacher: ClassVar[bool] = False
    #: whether the method's retrieval codes are ITQ hashes (evaluated in Hamming space too)
    hashing: ClassVar[bool] = False
    #: loss terms the ablation keeps ("": the method has no ablation)
    ablation_terms: ClassVar[str] = ""

    def __init__(self, ctx: RunContext, ablation: bool) -> None:
        self.ctx = ctx
        self.ablation = bool(ablation)

    @classmethod
    def teacher_head_classes(cls, seen_classes: list[str], cfg: Any) -> list[str] | None:
        """Teacher-head classes when no pretrained teacher defines them (None: the training classes)."""
        return None

    def n_views(self) -> int:
        """Extra augmented views per image a batch needs."""
        return 0

    def setup(self) -> None:
        """Build what the method adds and prepare what it needs before the first step."""

    def modules(self) -> list[nn.Module]:
        """Trainable modules besides the model."""
        return []

    def losses(self, step: StepInput) -> tuple[dict[str, Tensor], Tensor]:
        """Named loss terms (weighted) and the training-class logits of ``step``."""
        raise NotImplementedError

    def start_epoch(self) -> None:
        """Called before each epoch."""

    def state(self) -> dict[str, Any]:
        """What ``--resume`` must restore besides the model and optimizer."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""


def _logits(ctx: RunContext, embedding: Tensor) -> tuple[Tensor, Tensor]:
    return head_logits(ctx.model, embedding, ctx.cfg.cosine_scale)


@register("none")
class PhotoPretraining(Method):
    """Cross-entropy pre-training on photos (our ImageNet stand-in for the synthetic set)."""

    domains = ("photo",)
    needs_teacher = False

    @classmethod
    def teacher_head_classes(cls, seen_classes: list[str], cfg: Any) -> list[str] | None:
        """The part vocabulary with ``--pretrain-labels parts``, else the training classes."""
        return parse_parts(seen_classes)[0] if cfg.pretrain_labels == "parts" else None

    def setup(self) -> None:
        """Index each class's parts in the teacher head (``parts`` labels)."""
        self.part_index: Tensor | None = None
        self.slices: list[tuple[int, int]] = []
        if self.ctx.cfg.pretrain_labels == "parts":
            self.part_index = torch.tensor(parse_parts(self.ctx.seen.classes)[1], dtype=torch.long)
            self.slices = part_slices(parse_parts(self.ctx.seen.classes)[0])

    def losses(self, step: StepInput) -> tuple[dict[str, Tensor], Tensor]:
        """CE on the class head; CE on the teacher head (classes or parts)."""
        out = self.ctx.model(step.x, step.tag)
        logits, t_head = _logits(self.ctx, out.embedding)
        parts = {"ce": L.semantic_classification_loss(logits, step.y)}
        if self.part_index is None:
            parts["ce_teacher_head"] = L.semantic_classification_loss(t_head, step.y)
        else:
            parts["ce_parts"] = parts_loss(t_head, self.part_index.to(step.y.device)[step.y], self.slices)
        return parts, logits


@register("tursun")
class Tursun(Method):
    """Tursun et al. (2022) with class-oriented knowledge preservation."""

    ablation_terms = "ce"

    def setup(self) -> None:
        """Prepare the per-class knowledge-preservation targets once, from the teacher."""
        self.kp_targets: Tensor | None = None
        if self.ablation:
            return
        ctx = self.ctx
        logits = ctx.teacher_outputs(ctx.seen.photos, 1)
        labels = torch.tensor([s.label for s in ctx.seen.photos])
        targets = L.class_mean_soft_targets(logits, labels, len(ctx.seen.classes), ctx.cfg.tursun.temperature)
        ctx.log(f"knowledge-preservation targets: {tuple(targets.shape)} from {len(labels)} training photos")
        self.kp_targets = targets.to(ctx.device)

    def losses(self, step: StepInput) -> tuple[dict[str, Tensor], Tensor]:
        """CE + quadruplet + knowledge preservation (CE only for the ablation)."""
        ctx, w, ns = self.ctx, self.ctx.cfg.tursun, step.n_sketch
        out = ctx.model(step.x, step.tag)
        logits, t_head = _logits(ctx, out.embedding)
        parts = {"ce": w.classification * L.semantic_classification_loss(logits, step.y)}
        if not self.ablation:
            assert self.kp_targets is not None
            emb = F.normalize(out.embedding.float(), dim=1)
            y = step.y
            parts["quad"] = w.quadruplet * L.batch_quadruplet_loss(
                emb[:ns], y[:ns], emb[ns:], y[ns:], margin=w.margin, mining=w.mining
            )
            parts["kp"] = w.knowledge * L.knowledge_preservation_loss(t_head, y, self.kp_targets, w.temperature)
        return parts, logits

    def state(self) -> dict[str, Any]:
        """The prepared targets (so a resumed run does not recompute them from trained weights)."""
        return {"kp_targets": self.kp_targets}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the targets."""
        if state.get("kp_targets") is not None:
            self.kp_targets = state["kp_targets"].to(self.ctx.device)


class ProjectionHead(nn.Module):
    """DSN's contrastive projection head: Linear - ReLU - Linear to ``out_dim`` (128), training only."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """Projected, L2-normalized features."""
        return F.normalize(self.net(x), dim=1)


@register("dsn")
class Dsn(Method):
    """DSN: SAKE distillation + cross-modal contrastive learning + sketch memory bank."""

    domain_conditioned = True
    online_teacher = True
    hashing = True
    ablation_terms = "ce, kd"

    def n_views(self) -> int:
        """Two colour-augmented views for the contrastive loss (none for the SAKE ablation)."""
        return 0 if self.ablation else 2

    def setup(self) -> None:
        """Semantic-adjustment mask of the teacher classes; projection head and memory bank."""
        ctx, cfg = self.ctx, self.ctx.cfg
        assert ctx.teacher is not None
        class_logits = None
        if not any(c in ctx.teacher.classes for c in ctx.seen.classes):  # a teacher without our class names
            logits = ctx.teacher_outputs(ctx.seen.photos, 1)
            labels = torch.tensor([s.label for s in ctx.seen.photos])
            sums = torch.zeros(len(ctx.seen.classes), logits.shape[1]).index_add_(0, labels, logits.float())
            class_logits = sums / torch.bincount(labels, minlength=len(ctx.seen.classes)).clamp_min(1)[:, None]
        self.class_mask = ctx.teacher.class_mask(ctx.seen.classes, class_logits).to(ctx.device)
        self.proj: ProjectionHead | None = None
        self.bank: L.CategoryMemoryBank | None = None
        if not self.ablation:
            self.proj = ProjectionHead(ctx.model.embed_dim, cfg.dsn.contrastive_dim).to(ctx.device)  # type: ignore[arg-type]
            probe = ctx.model(
                torch.zeros(2, 3, cfg.size, cfg.size, device=ctx.device),
                torch.zeros(2, dtype=torch.long, device=ctx.device),
            )
            self.bank = L.CategoryMemoryBank(
                len(ctx.seen.classes), cfg.dsn.topk, int(probe.features.shape[1]), ctx.device
            )

    def modules(self) -> list[nn.Module]:
        """The projection head."""
        return [] if self.proj is None else [self.proj]

    def start_epoch(self) -> None:
        """Empty the memory bank (as the official code, per epoch)."""
        if self.bank is not None:
            self.bank.flush()

    def losses(self, step: StepInput) -> tuple[dict[str, Tensor], Tensor]:
        """CE + SAKE-KD (+ contrastive + memory unless ablated)."""
        ctx, w = self.ctx, self.ctx.cfg.dsn
        assert ctx.teacher is not None
        n, ns, y, tag = step.x.shape[0], step.n_sketch, step.y, step.tag
        out = ctx.model(torch.cat([step.x, *step.views]), tag.repeat(1 + len(step.views)))
        logits, t_head = _logits(ctx, out.embedding[:n])
        parts = {"ce": w.classification * L.semantic_classification_loss(logits, y)}
        t_logits = ctx.teacher.logits(step.x, tag)
        parts["kd"] = w.sake * L.sake_distillation_loss(
            t_head,
            t_logits,
            mask=tag,
            class_mask=self.class_mask[y],
            kd_lambda=w.kd_lambda,
            kdneg_lambda=w.kdneg_lambda,
        )
        if self.proj is not None and self.bank is not None:
            z = self.proj(out.embedding[n:].float())
            feats = torch.stack([z[:n], z[n:]], dim=1)
            parts["con"] = w.contrastive * L.supervised_contrastive_loss(feats, y, w.temperature, w.temperature)
            f = out.features[:n].float()
            self.bank.add(f[:ns], y[:ns], f[ns:], y[ns:])
            centers, filled = self.bank.centers()
            parts["mem"] = w.memory * L.memory_loss(f[ns:], y[ns:], centers, filled)
        return parts, logits

    def state(self) -> dict[str, Any]:
        """The projection head."""
        return {"proj": None if self.proj is None else self.proj.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the projection head."""
        if self.proj is not None and state.get("proj") is not None:
            self.proj.load_state_dict(state["proj"])
