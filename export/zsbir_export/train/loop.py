"""The training loop behind ``zsbir train`` for Tursun et al. (2022), DSN (2021) and photo pre-training.

Methods
-------
``tursun``  plain (tag-free) :class:`~zsbir_export.models.embedding.EmbeddingNet`; loss =
            ``w_q * domain-balanced quadruplet (L2-normalized embeddings, random in-batch mining; batch-hard optional)
            + w_c * cross-entropy(training classes) + w_k * knowledge preservation`` where the
            knowledge-preservation targets are the class means of the *pretrained* network's soft
            predictions (its ``imagenet`` head) over the training photos, computed once before training.
            Ablation: cross-entropy only.
``dsn``     domain-conditioned CSE-ResNet; loss = ``CE + 1.0 * SAKE-KD(photos, frozen teacher = the
            pretrained network, semantic adjustment 0.3 on the teacher classes named like the
            sample's class) + 0.1 * supervised contrastive(two colour-augmented views, 128-d
            projection head, T = 0.07) + 1.0 * memory loss(photo features vs the class centre of the
            top-10 sketch features)``. Ablation: CE + SAKE-KD (that is SAKE, DSN's baseline).
``none``    the *pre-training* stage, our stand-in for ImageNet pre-training on data sets that have
            no ImageNet-pretrained weights (the synthetic benchmark): cross-entropy on the training
            PHOTOS only, training both the class head and the ``imagenet`` head (which then has one
            output per training class). Its checkpoint is what ``--pretrained`` takes, so the teacher
            knowledge that Tursun/DSN preserve is photo-domain knowledge, as with ImageNet.

Both methods start from the same pretrained weights as their ablation, so the comparison in
``benchmarks/results/methods.md`` isolates the method-specific losses.

Reproducibility: torch is seeded before the model is built; batches and augmentations derive from
``(seed, epoch)`` (see :mod:`zsbir_export.train.data`); at the end of every epoch ``RUN/resume.pt``
stores weights, optimizer, LR scheduler, AMP scaler, the torch RNG states and the teacher targets, so
``--resume`` continues bit-exactly on the same machine (tested on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsbir_export import losses as L
from zsbir_export.models import build_model
from zsbir_export.train.data import (
    EpochBatches,
    EpochSampler,
    ImageCache,
    collate_batch,
    iter_eval_batches,
    make_spec,
)
from zsbir_infer.datasets import Sample, SplitData, open_benchmark

__all__ = ["METHODS", "TrainConfig", "TrainResult", "evaluate_split", "hold_out_classes", "train"]

METHODS = ("tursun", "dsn", "none")
RESUME_NAME = "resume.pt"
CHECKPOINT_NAME = "checkpoint"


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint's ``train`` block)."""

    method: str
    data: str
    out: str
    backbone: str = "resnet18"
    width: int = 16
    embed_dim: int = 64
    size: int = 96
    epochs: int = 10
    batch_size: int = 64
    per_class: int = 2
    lr: float = 1e-3
    lr_final: float = 0.01  # the LR decays exponentially to lr * lr_final over the run (DSN uses 0.001)
    weight_decay: float = 5e-4  # decoupled (AdamW); L2 inside Adam stalls small from-scratch nets
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    ablation: bool = False
    pretrained: str | None = None
    val_every: int = 1
    val_classes: int = 0  # hold out this many seen classes for validation/model selection (0: validate on unseen)
    max_batches: int | None = None  # cap batches per epoch (smoke tests)
    threads: int | None = None
    workers: int = 1  # data-loading processes (0: render batches in the training process)
    progress: bool = True
    itq_bits: int = 64
    pretrain_labels: str = "parts"  # method none: "class" (the training classes) or "parts" (see parse_parts)
    cosine_scale: float = 16.0  # cosine-softmax heads (0: plain linear heads, as the official code)
    tursun: L.TursunWeights = field(default_factory=L.TursunWeights)
    dsn: L.DsnWeights = field(default_factory=L.DsnWeights)
    command: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for a bad setting."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("width", "embed_dim", "size", "epochs", "batch_size", "per_class", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if int(self.val_classes) < 0:
            raise ValueError(f"val_classes must be >= 0, got {self.val_classes}")
        if self.lr <= 0 or not 0 < self.lr_final <= 1:
            raise ValueError(f"lr must be > 0 and lr_final in (0, 1], got {self.lr} and {self.lr_final}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.method == "none" and self.ablation:
            raise ValueError("--ablation applies to tursun and dsn, not to pre-training (method none)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["tursun"] = L.TursunWeights(**d.get("tursun", {}))
        d["dsn"] = L.DsnWeights(**d.get("dsn", {}))
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


# --------------------------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    return dev


def _arch(cfg: TrainConfig, num_classes: int, teacher_classes: int) -> dict[str, Any]:
    return {
        "backbone": cfg.backbone,
        "width": cfg.width,
        "embed_dim": cfg.embed_dim,
        "domain_conditioned": cfg.method == "dsn" or cfg.backbone.startswith("cse_"),
        "num_classes": num_classes,
        "imagenet_head": True,
        "imagenet_classes": teacher_classes,
    }


class ProjectionHead(nn.Module):
    """DSN's contrastive projection head: Linear - ReLU - Linear to ``out_dim`` (128), training only."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """Projected, L2-normalized features."""
        return F.normalize(self.net(x), dim=1)


def _head_linears(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(training-class classifier, teacher/ImageNet head) of an EmbeddingNet or CSEResNetModel."""
    if hasattr(model, "classifier"):  # EmbeddingNet
        cls_head, teacher_head = model.classifier, model.imagenet_fc
    else:  # CSEResNetModel
        cls_head, teacher_head = model.linear, model.original_model.last_linear  # type: ignore[union-attr]
    if not isinstance(cls_head, nn.Linear) or not isinstance(teacher_head, nn.Linear):
        raise ValueError("the model needs a training-class classifier and an imagenet (teacher) head")
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
    the head index of each of its parts. Used by the ``parts`` pre-training of the synthetic set (our
    stand-in for ImageNet's generic part knowledge); raises ``ValueError`` when the names do not all
    have the same number of fields.
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


def _slices(teacher_classes: list[str]) -> list[tuple[int, int]]:
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


def _load_pretrained(path: str) -> tuple[nn.Module, dict[str, Any]]:
    from zsbir_export.checkpoints import load_checkpoint

    loaded = load_checkpoint(path)
    return loaded.model, loaded.config


@torch.no_grad()
def _embed_samples(
    model: nn.Module,
    samples: list[Any],
    tag: int,
    spec: dict[str, Any],
    device: torch.device,
    cache: ImageCache | None,
    batch_size: int = 128,
    head: Callable[[Any], Tensor] | None = None,
) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = []
    for x in iter_eval_batches(samples, spec, cache, batch_size):
        x = x.to(device)
        t = torch.full((x.shape[0],), tag, dtype=torch.long, device=device)
        y = model.embed(x, t) if head is None else head(model(x, t))  # type: ignore[operator]
        out.append(y.float().cpu().numpy())
    model.train(was_training)
    dim = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def evaluate_split(
    model: nn.Module,
    split: SplitData,
    spec: dict[str, Any],
    device: torch.device,
    cache: ImageCache | None = None,
    itq_bits: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Sketch -> photo retrieval metrics of ``model`` on ``split`` (mAP@all, mAP@200, P@100, P@200).

    With ``itq_bits > 0`` also Hamming-ranked metrics of ITQ codes: ``itq`` fitted on the gallery
    (photos) only and applied to the queries, and ``itq_transductive`` fitted on gallery + queries
    (the way the official DSN evaluation fits on the test data it evaluates).
    """
    from zsbir_infer.metrics import evaluate

    q = _embed_samples(model, split.sketches, 0, spec, device, cache)
    g = _embed_samples(model, split.photos, 1, spec, device, cache)
    ql = np.array([s.label for s in split.sketches])
    gl = np.array([s.label for s in split.photos])
    result: dict[str, Any] = dict(evaluate(q, ql, g, gl))
    if itq_bits:
        from zsbir_infer.itq import ITQ

        if itq_bits > q.shape[1]:
            raise ValueError(f"ITQ with {itq_bits} bits needs embeddings of at least that size, got {q.shape[1]}")
        itq = ITQ.fit(g, n_bits=itq_bits, seed=seed)
        result["itq"] = dict(
            evaluate(itq.transform_bits(q), ql, itq.transform_bits(g), gl, metric="hamming", codes="bits")
        )
        both = ITQ.fit(np.concatenate([g, q]), n_bits=itq_bits, seed=seed)
        result["itq_transductive"] = dict(
            evaluate(both.transform_bits(q), ql, both.transform_bits(g), gl, metric="hamming", codes="bits")
        )
        result["itq_bits"] = itq_bits
    return result


def hold_out_classes(split: SplitData, n: int, seed: int) -> tuple[SplitData, SplitData]:
    """Split ``split`` by class into (training, validation) with ``n`` validation classes.

    The choice depends only on the sorted class list, ``n`` and ``seed``, so a pre-training run and the
    run that starts from it hold out the same classes. Labels are re-indexed within each part.
    """
    if not 0 < n < len(split.classes) - 1:
        raise ValueError(f"--val-classes {n}: need 1 .. {len(split.classes) - 2} for {len(split.classes)} seen classes")
    rng = np.random.default_rng([int(seed), 0x7A1])
    val_set = {split.classes[i] for i in rng.choice(len(split.classes), size=n, replace=False)}

    def part(name: str, keep: Callable[[str], bool]) -> SplitData:
        classes = [c for c in split.classes if keep(c)]
        index = {c: i for i, c in enumerate(classes)}

        def relabel(samples: list[Sample]) -> list[Sample]:
            return [replace(s, label=index[s.class_name]) for s in samples if s.class_name in index]

        return SplitData(name=name, classes=classes, photos=relabel(split.photos), sketches=relabel(split.sketches))

    return part("train", lambda c: c not in val_set), part("val", lambda c: c in val_set)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# --------------------------------------------------------------------------------------------- training


class _Run:
    """State of one training run (model, optimizer, teacher, targets) and its per-batch step."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.device = _device(cfg.device)
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.bench = open_benchmark(cfg.data)
        self.seen = self.bench.split("seen")
        self.unseen = self.bench.split("unseen")
        self.val: SplitData | None = None
        if cfg.val_classes:
            self.seen, self.val = hold_out_classes(self.seen, cfg.val_classes, cfg.seed)
            self.log(f"validation: {len(self.val.classes)} held-out seen classes; training on {len(self.seen.classes)}")
        if len(self.seen.classes) < 2:
            raise ValueError(f"{cfg.data}: training needs at least 2 seen classes, found {len(self.seen.classes)}")
        self.spec = make_spec(cfg.size)
        self.cache = ImageCache()
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        self.teacher: nn.Module | None = None
        self.teacher_classes: list[str] = list(self.seen.classes)
        self.part_index: Tensor | None = None  # [C, K] teacher-head index of each class's K parts
        if cfg.method == "none" and cfg.pretrain_labels == "parts":
            self.teacher_classes, index = parse_parts(self.seen.classes)
            self.part_index = torch.tensor(index, dtype=torch.long)
        pre_model: nn.Module | None = None
        self.pretrained_config: dict[str, Any] | None = None
        if cfg.pretrained:
            pre_model, self.pretrained_config = _load_pretrained(cfg.pretrained)
            self.teacher_classes = list(self.pretrained_config.get("teacher_classes") or [])
            if not self.teacher_classes:
                self.teacher_classes = list(self.pretrained_config.get("class_names") or [])
            if self.val is not None:
                leaked = sorted(set(self.pretrained_config.get("class_names") or []) & set(self.val.classes))
                if leaked:
                    raise ValueError(
                        f"--pretrained {cfg.pretrained} was trained on {len(leaked)} of this run's held-out validation "
                        f"classes (e.g. {leaked[0]}); pre-train with the same --val-classes and --seed"
                    )
            pre_arch = self.pretrained_config["arch"]
            for key in ("width", "embed_dim"):
                if pre_arch.get(key) != getattr(cfg, key):
                    raise ValueError(
                        f"--pretrained {cfg.pretrained} has {key}={pre_arch.get(key)} but this run asks for "
                        f"{getattr(cfg, key)}; use the same --width/--embed-dim"
                    )
        self.part_slices = _slices(self.teacher_classes)
        self.model: nn.Module = build_model(_arch(cfg, len(self.seen.classes), len(self.teacher_classes)))
        if pre_model is not None:
            missing, unexpected = self.model.load_state_dict(pre_model.state_dict(), strict=False)
            shape_ok = all(
                self.model.state_dict()[k].shape == v.shape
                for k, v in pre_model.state_dict().items()
                if k in self.model.state_dict()
            )
            if unexpected or not shape_ok or len(missing) > 0:
                raise ValueError(
                    f"--pretrained {cfg.pretrained} does not fit the {cfg.backbone} model of this run "
                    f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); pre-train with the "
                    "same --backbone/--width/--embed-dim and, for dsn, a domain-conditioned backbone"
                )
            self.log(f"initialized from {cfg.pretrained}")
        self.model.to(self.device)

        self.proj: ProjectionHead | None = None
        self.bank: L.CategoryMemoryBank | None = None
        self.kp_targets: Tensor | None = None
        self.class_mask: Tensor | None = None
        self.use_method_losses = cfg.method in ("tursun", "dsn") and not cfg.ablation
        if cfg.method == "dsn":
            self.teacher = copy.deepcopy(self.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            # classes of the teacher head named like a training class get SAKE's semantic adjustment
            names = {c: i for i, c in enumerate(self.teacher_classes)}
            cm = torch.zeros(len(self.seen.classes), len(self.teacher_classes))
            for i, c in enumerate(self.seen.classes):
                if c in names:
                    cm[i, names[c]] = 1.0
                for j, part in enumerate(c.split("-")):  # teacher trained on parts: the class's parts
                    if f"{j}:{part}" in names:
                        cm[i, names[f"{j}:{part}"]] = 1.0
            self.class_mask = cm.to(self.device)
            if self.use_method_losses:
                embed_dim: int = self.model.embed_dim
                self.proj = ProjectionHead(embed_dim, cfg.dsn.contrastive_dim).to(self.device)
                feat_dim = int(
                    self.model(
                        torch.zeros(2, 3, cfg.size, cfg.size, device=self.device),
                        torch.zeros(2, dtype=torch.long, device=self.device),
                    ).features.shape[1]
                )
                self.bank = L.CategoryMemoryBank(len(self.seen.classes), cfg.dsn.topk, feat_dim, self.device)
        if cfg.method == "tursun" and self.use_method_losses:
            self.kp_targets = self._prepare_kp_targets()

        params = list(self.model.parameters()) + (list(self.proj.parameters()) if self.proj is not None else [])
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        decay = cfg.lr_final ** (1.0 / max(1, cfg.epochs))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: decay**e)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        domains = ("photo",) if cfg.method == "none" else ("sketch", "photo")
        n_views = 2 if (cfg.method == "dsn" and self.use_method_losses) else 0
        self.batches = EpochBatches(self.seen, self.spec, cfg.batch_size, cfg.seed, cfg.per_class, domains, n_views)
        self.batches.cache = self.cache
        self.sampler = EpochSampler(self.batches.n_batches, cfg.max_batches)
        self.loader = torch.utils.data.DataLoader(
            self.batches,
            batch_size=1,
            sampler=self.sampler,
            collate_fn=collate_batch,
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            prefetch_factor=4 if cfg.workers > 0 else None,
            worker_init_fn=_worker_init,
        )

    # ---- teacher targets (Tursun): computed ONCE before training from the initial network
    @torch.no_grad()
    def _prepare_kp_targets(self) -> Tensor:
        logits = _embed_samples(
            self.model,
            self.seen.photos,
            1,
            self.spec,
            self.device,
            self.cache,
            head=lambda o: head_logits(self.model, o.embedding, self.cfg.cosine_scale)[1],
        )
        labels = torch.tensor([s.label for s in self.seen.photos])
        targets = L.class_mean_soft_targets(
            torch.from_numpy(logits), labels, len(self.seen.classes), self.cfg.tursun.temperature
        )
        self.log(f"knowledge-preservation targets: {tuple(targets.shape)} from {len(labels)} training photos")
        return targets.to(self.device)

    # ---- one optimisation step
    def step(self, batch: Any) -> dict[str, float]:
        cfg = self.cfg
        dev = self.device
        x = batch.images.to(dev, non_blocking=True)
        y = batch.labels.to(dev)
        tag = batch.tags.to(dev)
        ns = batch.n_sketch
        parts: dict[str, Tensor] = {}
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.amp):
            if cfg.method == "none":
                out = self.model(x, tag)
                logits, t_head = head_logits(self.model, out.embedding, cfg.cosine_scale)
                parts["ce"] = L.semantic_classification_loss(logits, y)
                if self.part_index is None:
                    parts["ce_teacher_head"] = L.semantic_classification_loss(t_head, y)
                else:
                    parts["ce_parts"] = parts_loss(t_head, self.part_index.to(dev)[y], self.part_slices)
            elif cfg.method == "tursun":
                out = self.model(x, tag)
                logits, t_head = head_logits(self.model, out.embedding, cfg.cosine_scale)
                w = cfg.tursun
                parts["ce"] = w.classification * L.semantic_classification_loss(logits, y)
                if self.use_method_losses:
                    emb = F.normalize(out.embedding.float(), dim=1)
                    parts["quad"] = w.quadruplet * L.batch_quadruplet_loss(
                        emb[:ns], y[:ns], emb[ns:], y[ns:], margin=w.margin, mining=w.mining
                    )
                    assert self.kp_targets is not None
                    parts["kp"] = w.knowledge * L.knowledge_preservation_loss(t_head, y, self.kp_targets, w.temperature)
            else:  # dsn
                w2 = cfg.dsn
                n = x.shape[0]
                views = [v.to(dev, non_blocking=True) for v in batch.views] if self.use_method_losses else []
                out = self.model(torch.cat([x, *views]), tag.repeat(1 + len(views)))
                logits, t_head = head_logits(self.model, out.embedding[:n], cfg.cosine_scale)
                parts["ce"] = w2.classification * L.semantic_classification_loss(logits, y)
                assert self.teacher is not None and self.class_mask is not None
                with torch.no_grad():
                    t_logits = head_logits(self.teacher, self.teacher(x, tag).embedding, cfg.cosine_scale)[1]
                parts["kd"] = w2.sake * L.sake_distillation_loss(
                    t_head,
                    t_logits,
                    mask=tag,
                    class_mask=self.class_mask[y],
                    kd_lambda=w2.kd_lambda,
                    kdneg_lambda=w2.kdneg_lambda,
                )
                if self.use_method_losses:
                    assert self.proj is not None and self.bank is not None
                    z = self.proj(out.embedding[n:].float())
                    feats = torch.stack([z[:n], z[n:]], dim=1)
                    parts["con"] = w2.contrastive * L.supervised_contrastive_loss(
                        feats, y, w2.temperature, w2.temperature
                    )
                    f = out.features[:n].float()
                    self.bank.add(f[:ns], y[:ns], f[ns:], y[ns:])
                    centers, filled = self.bank.centers()
                    parts["mem"] = w2.memory * L.memory_loss(f[ns:], y[ns:], centers, filled)
            total = sum(parts.values(), torch.zeros((), device=dev))
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {float(total)} (parts { ({k: float(v) for k, v in parts.items()}) }")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        res = {k: float(v.detach()) for k, v in parts.items()}
        res["loss"] = float(total.detach())
        res["acc"] = float((logits.argmax(1) == y).float().mean())
        return res

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        if self.teacher is not None:
            self.teacher.eval()
        if self.bank is not None:
            self.bank.flush()
        self.sampler.epoch = self.epoch
        sums: dict[str, float] = {}
        from tqdm import tqdm

        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for batch in bar:
            res = self.step(batch)
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{res['loss']:.3f}", acc=f"{res['acc']:.2f}")
        bar.close()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        self.epoch += 1
        return {"lr": lr, **{k: v / len(self.sampler) for k, v in sums.items()}}

    # ---- resume state
    def state(self) -> dict[str, Any]:
        return {
            "format": "zsbir-train-resume",
            "version": 1,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "proj": None if self.proj is None else self.proj.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "kp_targets": self.kp_targets,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
        }

    def load_state(self, st: dict[str, Any]) -> None:
        if st.get("format") != "zsbir-train-resume":
            raise ValueError("not a zsbir resume state")
        old = st["config"]
        for key in (
            "method",
            "backbone",
            "width",
            "embed_dim",
            "size",
            "batch_size",
            "per_class",
            "seed",
            "ablation",
            "epochs",
            "lr",
            "lr_final",
            "weight_decay",
            "val_classes",
        ):
            if old.get(key, getattr(TrainConfig, key, None)) != getattr(self.cfg, key):
                raise ValueError(
                    f"cannot resume: the saved run has {key}={old.get(key)!r}, this command asks for "
                    f"{getattr(self.cfg, key)!r} (resume with the same settings)"
                )
        self.model.load_state_dict(st["model"])
        if self.proj is not None and st["proj"] is not None:
            self.proj.load_state_dict(st["proj"])
        if self.teacher is not None and st["teacher"] is not None:
            self.teacher.load_state_dict(st["teacher"])
        if st["kp_targets"] is not None:
            self.kp_targets = st["kp_targets"].to(self.device)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.epoch = int(st["epoch"])
        self.history = json.loads(st["history"])


def train(
    cfg: TrainConfig,
    resume: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model as ``cfg`` says; write ``RUN/checkpoint.{safetensors,json}``, ``RUN/resume.pt``,
    ``RUN/log.jsonl`` and ``RUN/metrics.json``.

    ``resume``: continue from ``RUN/resume.pt`` (error if absent). ``stop_after``: stop once this many
    epochs are complete (simulates an interruption; the final checkpoint is still written).
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, log)
    resume_path = out / RESUME_NAME
    if resume:
        if not resume_path.exists():
            raise FileNotFoundError(f"--resume: no resume state at {resume_path}")
        run.load_state(torch.load(resume_path, map_location=run.device, weights_only=True))
        log(f"resumed from {resume_path} after epoch {run.epoch}")
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, int(stop_after))
    log_path = out / "log.jsonl"
    # periodic validation: held-out seen classes when there are any, else (as the official code) the unseen ones
    vkey, vsplit = ("val", run.val) if run.val is not None else ("unseen", run.unseen)
    while run.epoch < last_epoch:
        t0 = time.perf_counter()
        stats: dict[str, Any] = run.train_epoch()
        stats = {
            "epoch": run.epoch,
            **stats,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if run.epoch % cfg.val_every == 0 or run.epoch == cfg.epochs:
            stats[vkey] = evaluate_split(run.model, vsplit, run.spec, run.device, run.cache)
        run.history.append(stats)
        _atomic_torch_save(run.state(), resume_path)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(stats) + "\n")
        msg = " ".join(f"{k}={v:.4f}" for k, v in stats.items() if isinstance(v, float))
        val = stats.get(vkey, {}).get("map_all")
        log(f"epoch {run.epoch}/{cfg.epochs} {msg}" + (f" {vkey} mAP@all={val:.4f}" if val is not None else ""))

    metrics: dict[str, Any] = {}
    if run.val is not None:
        done = run.history and "val" in run.history[-1] and run.history[-1]["epoch"] == run.epoch
        metrics["val"] = (
            run.history[-1]["val"] if done else evaluate_split(run.model, run.val, run.spec, run.device, run.cache)
        )
        metrics["val_classes"] = list(run.val.classes)
    if run.history and "unseen" in run.history[-1] and run.epoch == cfg.epochs:
        metrics["unseen"] = run.history[-1]["unseen"]
    else:
        metrics["unseen"] = evaluate_split(run.model, run.unseen, run.spec, run.device, run.cache)
    if cfg.method == "dsn" and cfg.itq_bits:
        itq = evaluate_split(run.model, run.unseen, run.spec, run.device, run.cache, cfg.itq_bits, cfg.seed)
        metrics["unseen"].update({k: itq[k] for k in ("itq", "itq_transductive", "itq_bits")})
    seconds = time.perf_counter() - start
    metrics["epochs_done"] = run.epoch
    metrics["train_seconds"] = round(seconds, 1)
    ckpt = _save_final(run, metrics, seconds)
    with open(out / "metrics.json", "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    return TrainResult(out, ckpt, metrics, run.history, seconds)


def _save_final(run: _Run, metrics: dict[str, Any], seconds: float) -> Path:
    from zsbir_export.checkpoints import save_checkpoint

    cfg = run.cfg
    model = run.model
    arch = model.arch_config()  # type: ignore[operator]
    train_block = cfg.to_dict()
    train_block["environment"] = _environment(run.device)
    train_block["benchmark"] = {
        "kind": run.bench.kind,
        "seen": len(run.seen.classes),
        "unseen": len(run.unseen.classes),
        "val": len(run.val.classes) if run.val is not None else 0,
    }
    meta_path = Path(cfg.data) / "meta.json"
    if meta_path.exists():
        with contextlib.suppress(OSError, ValueError):
            train_block["benchmark"]["meta"] = json.loads(meta_path.read_text())
    config = {
        "format": "zsbir-checkpoint",
        "version": 1,
        "method": cfg.method,
        "ablation": cfg.ablation,
        "arch": arch,
        "class_names": list(run.seen.classes),
        "teacher_classes": list(run.teacher_classes),
        "preprocess": {"photo": run.spec, "sketch": run.spec},
        "train": train_block,
        "metrics": metrics,
    }
    path = Path(cfg.out) / f"{CHECKPOINT_NAME}.safetensors"
    model.eval()
    save_checkpoint(model.cpu(), config, path)
    model.to(run.device)
    return path


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under the exponential schedule."""
    return cfg.lr * cfg.lr_final ** (epoch / max(1, cfg.epochs)) if math.isfinite(cfg.lr) else cfg.lr
