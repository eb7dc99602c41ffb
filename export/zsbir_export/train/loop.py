"""The training loop behind ``zsbir train``: data, optimizer, epochs, validation, checkpoints, resume.

What is trained is a strategy from :data:`zsbir_export.train.methods.METHODS` (``tursun``, ``dsn``,
``none``); where it starts and whose knowledge it preserves comes from ``--pretrained`` through
:func:`zsbir_export.train.teacher.open_start` (ImageNet weights, a pre-training checkpoint, or
nothing). The loop itself knows no method and no data set by name.

Reproducibility: torch is seeded before the model is built; batches and augmentations derive from
``(seed, epoch)`` (see :mod:`zsbir_export.train.data`); at the end of every epoch ``RUN/resume.pt``
stores weights, optimizer, LR scheduler, AMP scaler, the torch RNG states and the method's state (e.g.
Tursun's teacher targets), so ``--resume`` continues bit-exactly on the same machine (tested on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zsbir_export import losses as L
from zsbir_export.models import build_model
from zsbir_export.models.efficientnet import EfficientNetLite, place
from zsbir_export.train.data import (
    EpochBatches,
    EpochSampler,
    ImageCache,
    collate_batch,
    iter_eval_batches,
    make_spec,
)
from zsbir_export.train.methods import METHODS, Method, StepInput, head_logits
from zsbir_export.train.teacher import CheckpointTeacher, ImageNetTeacher, Teacher, open_start
from zsbir_infer.datasets import Sample, SplitData, open_benchmark
from zsbir_infer.fsio import atomic_path

__all__ = ["METHODS", "TrainConfig", "TrainResult", "evaluate_split", "hold_out_classes", "train"]

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
    pretrained: str | None = None  # "imagenet", an ImageNet weights file, or a zsbir/official checkpoint
    zeroshot: str | None = None  # split set / zero-shot folder of the benchmark (e.g. "21")
    extra_sketches: str | None = None  # doodle folder whose seen-class drawings join the training sketches
    freeze: int = 0  # EfficientNet-Lite: freeze the stem and the first N blocks
    backbone_lr: float = 1.0  # the backbone's learning rate as a multiple of lr
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
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in ("width", "embed_dim", "size", "epochs", "batch_size", "per_class", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if int(self.val_classes) < 0:
            raise ValueError(f"val_classes must be >= 0, got {self.val_classes}")
        if int(self.freeze) < 0 or not self.backbone_lr > 0:
            raise ValueError(f"freeze must be >= 0 and backbone_lr > 0, got {self.freeze} and {self.backbone_lr}")
        if self.lr <= 0 or not 0 < self.lr_final <= 1:
            raise ValueError(f"lr must be > 0 and lr_final in (0, 1], got {self.lr} and {self.lr_final}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.ablation and not METHODS[self.method].ablation_terms:
            with_ablation = sorted(n for n, m in METHODS.items() if m.ablation_terms)
            raise ValueError(f"--ablation applies to {', '.join(with_ablation)}, not to method {self.method}")

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


def _arch(cfg: TrainConfig, num_classes: int, teacher_classes: int, conditioned: bool) -> dict[str, Any]:
    return {
        "backbone": cfg.backbone,
        "width": cfg.width,
        "embed_dim": cfg.embed_dim,
        "domain_conditioned": conditioned or cfg.backbone.startswith("cse_"),
        "num_classes": num_classes,
        "imagenet_head": True,
        "imagenet_classes": teacher_classes,
    }


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Channels-last for EfficientNet-Lite models (about twice as fast on CPUs), contiguous otherwise."""
    return (
        torch.channels_last
        if isinstance(getattr(model, "backbone", None), EfficientNetLite)
        else torch.contiguous_format
    )


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
        x = x.to(device, memory_format=_memory_format(model))
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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    """State of one training run (model, optimizer, method, teacher) and its per-batch step."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.device = _device(cfg.device)
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.bench = open_benchmark(cfg.data, zeroshot=cfg.zeroshot, extra_sketches=cfg.extra_sketches)
        extra = self.bench.info.get("extra_sketches")
        if isinstance(extra, dict):
            log(
                f"extra sketches: {extra.get('added')} of {extra.get('classes')} seen classes from {extra.get('root')} "
                f"({extra.get('unseen_refused')} words of unseen classes refused)"
            )
        self.seen = self.bench.split("seen")
        self.unseen = self.bench.split("unseen")
        self.val: SplitData | None = None
        if cfg.val_classes:
            self.seen, self.val = hold_out_classes(self.seen, cfg.val_classes, cfg.seed)
            # validation queries are the benchmark's own sketches (extra doodles of those classes are left out)
            own = [s for s in self.val.sketches if s.path.is_relative_to(self.bench.root)]
            self.val = replace(self.val, sketches=own)
            self.log(f"validation: {len(self.val.classes)} held-out seen classes; training on {len(self.seen.classes)}")
        if len(self.seen.classes) < 2:
            raise ValueError(f"{cfg.data}: training needs at least 2 seen classes, found {len(self.seen.classes)}")
        self.spec = make_spec(cfg.size)
        self.cache = ImageCache()
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        method_cls = METHODS[cfg.method]
        start = open_start(cfg.pretrained, cfg.backbone, cfg.width)
        self.teacher_classes: list[str] = start.teacher_classes or list(
            method_cls.teacher_head_classes(self.seen.classes, cfg) or self.seen.classes
        )
        if start.config is not None:
            self._check_checkpoint_start(start.config)
        conditioned = method_cls.domain_conditioned
        self.model: nn.Module = build_model(_arch(cfg, len(self.seen.classes), len(self.teacher_classes), conditioned))
        if start.student_state is not None:
            self._load_start(start.student_state, backbone_only=start.backbone_only)
            self.log(f"initialized from {cfg.pretrained}")
        # EfficientNet-Lite trains about twice as fast channels-last on CPUs (depthwise convolutions); the small
        # ResNets stay contiguous (channels-last inputs crashed torch 2.13's CPU kernels on them)
        self.memory_format = _memory_format(self.model)
        place(self.model, self.device, self.memory_format)
        self._freeze_backbone(cfg.freeze)

        self.teacher: Teacher | None = None
        if method_cls.needs_teacher:
            if isinstance(start.teacher_network, nn.Module) and start.kind == "imagenet":
                self.teacher = ImageNetTeacher(start.teacher_network).to(self.device)
            else:  # a pre-training checkpoint, or (smoke runs) the initial network itself
                self.teacher = CheckpointTeacher(self.model, self.teacher_classes, self._teacher_head).to(self.device)
        self.method: Method = method_cls(self, cfg.ablation)
        self.method.setup()
        if not method_cls.online_teacher:
            self.teacher = None  # what the method needs of the teacher is prepared; free its memory

        backbone = [p for n, p in self.model.named_parameters() if n.startswith(("backbone.", "original_model.layer"))]
        ids = {id(p) for p in backbone}
        heads = [p for p in self.model.parameters() if id(p) not in ids]
        heads += [p for m in self.method.modules() for p in m.parameters()]
        groups = [
            {"params": [p for p in backbone if p.requires_grad], "lr": cfg.lr * cfg.backbone_lr},
            {"params": heads, "lr": cfg.lr},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        decay = cfg.lr_final ** (1.0 / max(1, cfg.epochs))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: decay**e)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.batches = EpochBatches(
            self.seen, self.spec, cfg.batch_size, cfg.seed, cfg.per_class, method_cls.domains, self.method.n_views()
        )
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

    @property
    def bank(self) -> Any:
        """The method's memory bank (DSN), or None."""
        return getattr(self.method, "bank", None)

    def _teacher_head(self, network: nn.Module, out: Any) -> Tensor:
        return head_logits(network, out.embedding, self.cfg.cosine_scale)[1]

    def _check_checkpoint_start(self, config: dict[str, Any]) -> None:
        cfg = self.cfg
        if self.val is not None:
            leaked = sorted(set(config.get("class_names") or []) & set(self.val.classes))
            if leaked:
                raise ValueError(
                    f"--pretrained {cfg.pretrained} was trained on {len(leaked)} of this run's held-out validation "
                    f"classes (e.g. {leaked[0]}); pre-train with the same --val-classes and --seed"
                )
        pre_arch = config["arch"]
        for key in ("width", "embed_dim"):
            if pre_arch.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"--pretrained {cfg.pretrained} has {key}={pre_arch.get(key)} but this run asks for "
                    f"{getattr(cfg, key)}; use the same --width/--embed-dim"
                )

    def _load_start(self, state: dict[str, Tensor], backbone_only: bool) -> None:
        own = self.model.state_dict()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        shape_ok = all(own[k].shape == v.shape for k, v in state.items() if k in own)
        if backbone_only:  # ImageNet weights: the heads and the domain gates start fresh
            missing = [k for k in missing if k.startswith("backbone.") and "._domain_gate." not in k]
        if unexpected or not shape_ok or len(missing) > 0:
            raise ValueError(
                f"--pretrained {self.cfg.pretrained} does not fit the {self.cfg.backbone} model of this run "
                f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); pre-train with the "
                "same --backbone/--width/--embed-dim and, for dsn, a domain-conditioned backbone"
            )

    def _frozen_modules(self, n_blocks: int) -> list[nn.Module]:
        backbone = getattr(self.model, "backbone", None)
        if n_blocks <= 0:
            return []
        if not isinstance(backbone, EfficientNetLite):
            raise ValueError("--freeze applies to EfficientNet-Lite backbones")
        if n_blocks > len(backbone._blocks):
            raise ValueError(f"--freeze {n_blocks}: the backbone has {len(backbone._blocks)} blocks")
        return [backbone._conv_stem, backbone._bn0, *backbone._blocks[:n_blocks]]

    def _freeze_backbone(self, n_blocks: int) -> None:
        """Freeze the stem and the first ``n_blocks`` blocks (weights and batch-norm statistics)."""
        for m in self._frozen_modules(n_blocks):
            for p in m.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def teacher_outputs(self, samples: list[Any], tag: int) -> Tensor:
        """The teacher's logits over ``samples`` (eval preprocessing, batches of 128)."""
        assert self.teacher is not None
        out = []
        for x in iter_eval_batches(samples, self.spec, self.cache, 128):
            x = x.to(self.device, memory_format=self.memory_format)
            out.append(self.teacher.logits(x, torch.full((x.shape[0],), tag, dtype=torch.long, device=self.device)))
        return torch.cat(out).cpu() if out else torch.zeros(0, len(self.teacher.classes))

    # ---- one optimisation step
    def step(self, batch: Any) -> dict[str, float]:
        dev = self.device
        cl = self.memory_format
        inp = StepInput(
            x=batch.images.to(dev, non_blocking=True, memory_format=cl),
            y=batch.labels.to(dev),
            tag=batch.tags.to(dev),
            n_sketch=batch.n_sketch,
            views=[v.to(dev, non_blocking=True, memory_format=cl) for v in batch.views],
        )
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.amp):
            parts, logits = self.method.losses(inp)
            total = sum(parts.values(), torch.zeros((), device=dev))
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {float(total)} (parts { ({k: float(v) for k, v in parts.items()}) }")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        res = {k: float(v.detach()) for k, v in parts.items()}
        res["loss"] = float(total.detach())
        res["acc"] = float((logits.argmax(1) == inp.y).float().mean())
        return res

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        for m in self._frozen_modules(cfg.freeze):
            m.eval()  # frozen blocks keep their ImageNet batch-norm statistics
        self.method.start_epoch()
        self.sampler.epoch = self.epoch
        sums: dict[str, float] = {}
        from tqdm import tqdm

        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
            unit="batch",
        )
        for batch in bar:
            res = self.step(batch)
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{res['loss']:.3f}", acc=f"{res['acc']:.2f}")
        bar.close()
        lr = float(self.optimizer.param_groups[-1]["lr"])
        self.scheduler.step()
        self.epoch += 1
        return {"lr": lr, **{k: v / len(self.sampler) for k, v in sums.items()}}

    # ---- resume state
    def state(self) -> dict[str, Any]:
        return {
            "format": "zsbir-train-resume",
            "version": 2,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "method": self.method.state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
        }

    def load_state(self, st: dict[str, Any]) -> None:
        if st.get("format") != "zsbir-train-resume" or st.get("version") != 2:
            raise ValueError("not a zsbir resume state of this version (start the run again without --resume)")
        old = st["config"]
        for key in RESUME_KEYS:
            if old.get(key, getattr(TrainConfig, key, None)) != getattr(self.cfg, key):
                raise ValueError(
                    f"cannot resume: the saved run has {key}={old.get(key)!r}, this command asks for "
                    f"{getattr(self.cfg, key)!r} (resume with the same settings)"
                )
        self.model.load_state_dict(st["model"])
        self.method.load_state(st["method"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.epoch = int(st["epoch"])
        self.history = json.loads(st["history"])


#: Settings a resumed run must share with the saved one.
RESUME_KEYS = (
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
    "backbone_lr",
    "weight_decay",
    "val_classes",
    "pretrained",
    "zeroshot",
    "extra_sketches",
    "freeze",
)


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
    if METHODS[cfg.method].hashing and cfg.itq_bits:
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
    save_checkpoint(place(model, "cpu", torch.contiguous_format), config, path)
    place(model, run.device, run.memory_format)
    return path
