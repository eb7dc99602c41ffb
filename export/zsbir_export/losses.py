"""Training losses of the two methods zsbir trains.

Tursun et al., "An efficient framework for zero-shot sketch-based image retrieval", Pattern
Recognition 126 (2022) 108528, trains with three objectives:

* a **domain-balanced quadruplet loss** (:func:`domain_balanced_quadruplet_loss`,
  :func:`batch_quadruplet_loss`): a sketch anchor, a photo positive of its class and *two* negatives of
  other classes, one photo and one sketch. The two hinge terms share the anchor-positive distance and
  get equal weight, so neither domain's negatives dominate the margin (a plain cross-domain triplet
  only ever pushes photos away from sketches and lets same-domain negatives collapse);
* a **semantic classification loss** (:func:`semantic_classification_loss`): cross-entropy over the
  training classes;
* a **semantic knowledge preservation loss** (:func:`knowledge_preservation_loss`): KL divergence from
  per-class soft targets to the network's predictions. The targets are prepared ONCE before training
  (:func:`class_mean_soft_targets`): the pretrained network is run over the training photos and its
  softmax predictions are averaged per class. No online teacher and no word vectors are needed, which
  is the paper's efficiency argument.

The paper's numeric defaults (margin, loss weights, temperature) were not found in the reference
corpora this project can search, so the defaults here are our documented picks:
``QUADRUPLET_MARGIN = 0.2`` on the Euclidean distance between L2-normalized embeddings (range 0..2),
unit weights for the three losses and ``KP_TEMPERATURE = 1``.

DSN: Wang et al., "Domain-Smoothing Network for Zero-Shot Sketch-Based Image Retrieval", IJCAI 2021.
Facts below are from the official code (GitHub haowang1992/DSN, ``src/train_cse_resnet_sketchy_ext.py``,
``src/train_cse_resnet_tuberlin_ext.py`` and ``src/tool.py``):

* **cross-modal contrastive loss** (:func:`supervised_contrastive_loss`): the supervised contrastive
  loss of Khosla et al. over two augmented views of every sketch and photo of the batch, with the
  class labels defining positives across both domains; temperature 0.07 (base temperature 0.07),
  weight 0.1 (``--contrastive_lambda``). The official train script applies it to the L2-normalized
  64-d ``hash_code`` of the two views although it declares ``--contrastive_dim 128``; the paper
  describes a 128-d projection head, which our trainer uses (see ``zsbir_export.train``).
* **category-specific memory bank** (:class:`CategoryMemoryBank`, :func:`memory_loss`): per class the
  top-k (``--topk 10``) pooled backbone features of *sketches*; when a class's slots are full a new
  sketch replaces the stored sketch least similar (cosine) to the mean feature of the batch's photos of
  that class, if the new one is more similar. The loss is ``1 - mean cos(photo feature, class centre)``
  with weight 1.0 (``--memory_lambda``); the bank is emptied at the start of every epoch. The official
  code passes *detached* photo features to the loss, so there it produces no gradient; we keep the
  gradient, which is what the paper's equation describes.
* **SAKE-style knowledge distillation** (:func:`sake_distillation_loss`): soft cross-entropy between
  the student's ImageNet-head logits and a frozen teacher's logits, applied to photos only (the mask is
  the domain tag, photo = 1), with the teacher logits scaled by ``kd_lambda = 1.0`` and the logits of
  the teacher classes that correspond to the sample's training class raised by ``kdneg_lambda = 0.3``
  (SAKE's semantic adjustment, ``cid_mask``); the whole term has weight 1.0 (``--sake_lambda``).
* classification cross-entropy with weight 1.0 (``--cls_lambda``); embeddings are 64-d.

All losses are plain functions of tensors (no module state) except the memory bank, so they can be
unit-tested on hand-computed cases and with ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DSN_CONTRASTIVE_WEIGHT",
    "DSN_KDNEG_LAMBDA",
    "DSN_KD_LAMBDA",
    "DSN_MEMORY_WEIGHT",
    "DSN_SAKE_WEIGHT",
    "DSN_TEMPERATURE",
    "DSN_TOPK",
    "KP_TEMPERATURE",
    "QUADRUPLET_MARGIN",
    "CategoryMemoryBank",
    "DsnWeights",
    "TursunWeights",
    "batch_quadruplet_loss",
    "class_mean_soft_targets",
    "domain_balanced_quadruplet_loss",
    "knowledge_preservation_loss",
    "memory_loss",
    "pairwise_distance",
    "sake_distillation_loss",
    "semantic_classification_loss",
    "supervised_contrastive_loss",
]

QUADRUPLET_MARGIN = 0.2
KP_TEMPERATURE = 1.0
DSN_TEMPERATURE = 0.07
DSN_TOPK = 10
DSN_KD_LAMBDA = 1.0
DSN_KDNEG_LAMBDA = 0.3
DSN_CONTRASTIVE_WEIGHT = 0.1
DSN_MEMORY_WEIGHT = 1.0
DSN_SAKE_WEIGHT = 1.0

_EPS = 1e-12


@dataclass(frozen=True)
class TursunWeights:
    """Loss weights of Tursun et al. (our picks, see the module docstring)."""

    quadruplet: float = 1.0
    classification: float = 1.0
    knowledge: float = 1.0
    margin: float = QUADRUPLET_MARGIN
    temperature: float = KP_TEMPERATURE
    mining: str = "random"  # quadruplet mining in the batch: "random" or "hard" (batch-hard); see methods.md


@dataclass(frozen=True)
class DsnWeights:
    """Loss weights and hyper-parameters of DSN (official train script defaults)."""

    classification: float = 1.0
    sake: float = DSN_SAKE_WEIGHT
    kd_lambda: float = DSN_KD_LAMBDA
    kdneg_lambda: float = DSN_KDNEG_LAMBDA
    contrastive: float = DSN_CONTRASTIVE_WEIGHT
    temperature: float = DSN_TEMPERATURE
    memory: float = DSN_MEMORY_WEIGHT
    topk: int = DSN_TOPK
    contrastive_dim: int = 128


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")


def pairwise_distance(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distance between the rows of ``x`` [N, D] and ``y`` [M, D] -> [N, M].

    Differentiable everywhere (the squared distance is clamped away from 0 before the square root).
    """
    _check_2d("x", x)
    _check_2d("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has {x.shape[1]} columns, y has {y.shape[1]}")
    sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return sq.clamp_min(_EPS).sqrt()


def _rowwise_distance(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).sum(-1).clamp_min(_EPS).sqrt()


def domain_balanced_quadruplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative_photo: Tensor,
    negative_sketch: Tensor,
    margin: float = QUADRUPLET_MARGIN,
    reduction: str = "mean",
) -> Tensor:
    """Domain-balanced quadruplet loss of Tursun et al. for explicit quadruplets (rows of [N, D]).

    ``0.5 * (relu(d(a,p) - d(a,n_photo) + m) + relu(d(a,p) - d(a,n_sketch) + m))`` with ``d`` the
    Euclidean distance. ``a`` is a sketch, ``p`` a photo of its class, ``n_photo`` / ``n_sketch`` a photo
    and a sketch of other classes. ``reduction``: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    for name, t in (
        ("anchor", anchor),
        ("positive", positive),
        ("negative_photo", negative_photo),
        ("negative_sketch", negative_sketch),
    ):
        _check_2d(name, t)
        if t.shape != anchor.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, anchor has {tuple(anchor.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    d_ap = _rowwise_distance(anchor, positive)
    d_anp = _rowwise_distance(anchor, negative_photo)
    d_ans = _rowwise_distance(anchor, negative_sketch)
    per = 0.5 * (F.relu(d_ap - d_anp + margin) + F.relu(d_ap - d_ans + margin))
    return _reduce(per, reduction)


def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per.mean() if per.numel() else per.sum()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def batch_quadruplet_loss(
    sketch_emb: Tensor,
    sketch_labels: Tensor,
    photo_emb: Tensor,
    photo_labels: Tensor,
    margin: float = QUADRUPLET_MARGIN,
    mining: str = "hard",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Domain-balanced quadruplet loss with quadruplets mined inside a batch.

    Every sketch is an anchor that has at least one photo of its class and at least one photo and one
    other sketch of a different class in the batch (other anchors are skipped; if none is valid the
    loss is 0 with a gradient path). ``mining="hard"``: farthest positive photo, nearest negative photo,
    nearest negative sketch (batch-hard). ``mining="random"``: one of each drawn uniformly with
    ``generator``.
    """
    _check_2d("sketch_emb", sketch_emb)
    _check_2d("photo_emb", photo_emb)
    if sketch_labels.shape != (sketch_emb.shape[0],) or photo_labels.shape != (photo_emb.shape[0],):
        raise ValueError("labels must be 1-D with one entry per embedding row")
    if mining not in ("hard", "random"):
        raise ValueError(f"mining must be 'hard' or 'random', got {mining!r}")
    d_sp = pairwise_distance(sketch_emb, photo_emb)  # [S, P]
    d_ss = pairwise_distance(sketch_emb, sketch_emb)  # [S, S]
    pos_p = sketch_labels[:, None] == photo_labels[None, :]
    neg_p = ~pos_p
    neg_s = sketch_labels[:, None] != sketch_labels[None, :]
    valid = pos_p.any(1) & neg_p.any(1) & neg_s.any(1)
    if not bool(valid.any()):
        return (sketch_emb.sum() + photo_emb.sum()) * 0.0
    big = torch.finfo(d_sp.dtype).max / 4
    if mining == "hard":
        d_ap = torch.where(pos_p, d_sp, torch.full_like(d_sp, -big)).max(1).values
        d_anp = torch.where(neg_p, d_sp, torch.full_like(d_sp, big)).min(1).values
        d_ans = torch.where(neg_s, d_ss, torch.full_like(d_ss, big)).min(1).values
    else:
        idx_p = _random_choice(pos_p, generator)
        idx_np = _random_choice(neg_p, generator)
        idx_ns = _random_choice(neg_s, generator)
        rows = torch.arange(d_sp.shape[0], device=d_sp.device)
        d_ap, d_anp, d_ans = d_sp[rows, idx_p], d_sp[rows, idx_np], d_ss[rows, idx_ns]
    per = 0.5 * (F.relu(d_ap - d_anp + margin) + F.relu(d_ap - d_ans + margin))
    return per[valid].mean()


def _random_choice(mask: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index of a uniformly drawn True entry per row (0 for rows without any)."""
    noise = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    return torch.where(mask, noise, torch.full_like(noise, -1.0)).argmax(1)


def semantic_classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over the training classes (``logits`` [N, C], ``labels`` [N] int64)."""
    _check_2d("logits", logits)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [N]={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def class_mean_soft_targets(
    logits: Tensor, labels: Tensor, num_classes: int, temperature: float = KP_TEMPERATURE
) -> Tensor:
    """Per-class soft targets for :func:`knowledge_preservation_loss`.

    ``logits`` [N, K] are the pretrained network's outputs over the training photos (computed once,
    before training) and ``labels`` [N] their training classes. Returns [num_classes, K]: row ``c`` is
    the mean of ``softmax(logits / temperature)`` over the photos of class ``c``. Every class needs at
    least one photo.
    """
    _check_2d("logits", logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = F.softmax(logits.double() / temperature, dim=1)
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"labels reach {counts.numel() - 1}, but num_classes is {num_classes}")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"no photo for class index(es) {missing[:10]}: cannot build their soft targets")
    sums = torch.zeros(num_classes, logits.shape[1], dtype=probs.dtype, device=logits.device)
    sums.index_add_(0, labels, probs)
    return (sums / counts[:, None].to(sums.dtype)).to(logits.dtype)


def knowledge_preservation_loss(
    student_logits: Tensor, labels: Tensor, class_targets: Tensor, temperature: float = KP_TEMPERATURE
) -> Tensor:
    """Semantic knowledge preservation: ``T^2 * mean_i KL(targets[y_i] || softmax(z_i / T))``.

    ``student_logits`` [N, K], ``labels`` [N] (training classes), ``class_targets`` [C, K] from
    :func:`class_mean_soft_targets` (rows are probability vectors).
    """
    _check_2d("student_logits", student_logits)
    _check_2d("class_targets", class_targets)
    if class_targets.shape[1] != student_logits.shape[1]:
        raise ValueError(
            f"class_targets have {class_targets.shape[1]} columns, student logits {student_logits.shape[1]}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = class_targets[labels]
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    # KL(t || p) = sum t (log t - log p); terms with t == 0 contribute 0.
    log_t = torch.where(target > 0, target.clamp_min(_EPS).log(), torch.zeros_like(target))
    kl = (target * (log_t - log_p)).sum(1)
    return kl.mean() * temperature**2


def supervised_contrastive_loss(
    features: Tensor, labels: Tensor, temperature: float = DSN_TEMPERATURE, base_temperature: float = DSN_TEMPERATURE
) -> Tensor:
    """Supervised contrastive loss over ``features`` [N, V, D] (V views, rows L2-normalized) and ``labels`` [N].

    Every one of the N*V vectors is an anchor; its positives are all other vectors whose sample has
    the same label (including its own other views); the denominator runs over every vector except the
    anchor itself. Loss = ``-(T / T_base) * mean over anchors of mean log-probability of positives``.
    Anchors without positives are skipped.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [N, views, D], got shape {tuple(features.shape)}")
    n, v, _ = features.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got shape {tuple(labels.shape)}")
    flat = features.transpose(0, 1).reshape(n * v, -1)  # view-major, as torch.cat(unbind(dim=1))
    lab = labels.repeat(v)
    sim = flat @ flat.t() / temperature
    self_mask = torch.eye(n * v, dtype=torch.bool, device=flat.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / n_pos[has]
    return -(temperature / base_temperature) * mean_pos.mean()


class CategoryMemoryBank:
    """DSN's category-specific memory of sketch features (top-k per class), emptied every epoch.

    ``add(sketch_feats, sketch_labels, photo_feats, photo_labels)`` stores detached sketch features;
    :meth:`centers` gives each class's mean stored feature. Deterministic given its inputs.
    """

    def __init__(self, num_classes: int, topk: int, dim: int, device: torch.device | str = "cpu") -> None:
        if num_classes <= 0 or topk <= 0 or dim <= 0:
            raise ValueError(f"num_classes, topk and dim must be positive, got {num_classes}, {topk}, {dim}")
        self.num_classes, self.topk, self.dim = num_classes, topk, dim
        self.device = torch.device(device)
        self.flush()

    def flush(self) -> None:
        """Empty the bank (the official code does this at the start of every epoch)."""
        self.embeds = torch.zeros(self.num_classes, self.topk, self.dim, device=self.device)
        self.counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def add(self, sketch_feats: Tensor, sketch_labels: Tensor, photo_feats: Tensor, photo_labels: Tensor) -> None:
        """Insert sketch features; a full class replaces its entry least similar to the photo query."""
        sketch_feats = sketch_feats.detach().to(self.device, torch.float32)
        photo_feats = photo_feats.detach().to(self.device, torch.float32)
        sketch_labels = sketch_labels.to(self.device)
        photo_labels = photo_labels.to(self.device)
        for feat, lab in zip(sketch_feats, sketch_labels.tolist(), strict=True):
            count = int(self.counts[lab])
            if count < self.topk:
                self.embeds[lab, count] = feat
                self.counts[lab] += 1
                continue
            same = photo_labels == lab
            if not bool(same.any()):
                continue
            query = photo_feats[same].mean(0, keepdim=True)
            scores = F.cosine_similarity(self.embeds[lab], query)
            worst = int(scores.argmin())
            if float(F.cosine_similarity(feat[None], query)[0]) > float(scores[worst]):
                self.embeds[lab, worst] = feat

    def centers(self) -> tuple[Tensor, Tensor]:
        """(centres [C, dim], filled [C] bool): mean stored feature per class and whether it has any."""
        filled = self.counts > 0
        slots = torch.arange(self.topk, device=self.device)[None, :] < self.counts[:, None]
        sums = (self.embeds * slots[..., None]).sum(1)
        return sums / self.counts.clamp_min(1)[:, None].to(sums.dtype), filled

    def used_fraction(self) -> float:
        """Fraction of the bank's slots that hold a feature."""
        return float(self.counts.sum()) / (self.num_classes * self.topk)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to save/restore the bank exactly."""
        return {"embeds": self.embeds.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.embeds = state["embeds"].to(self.device).clone()
        self.counts = state["counts"].to(self.device).clone()


def memory_loss(photo_feats: Tensor, photo_labels: Tensor, centers: Tensor, filled: Tensor) -> Tensor:
    """DSN memory loss ``1 - mean_i cos(photo_i, centre[y_i])`` over photos whose class has a centre.

    ``centers`` [C, D] and ``filled`` [C] come from :meth:`CategoryMemoryBank.centers` (constants).
    Returns 0 (with a gradient path) when no photo's class has a centre yet.
    """
    _check_2d("photo_feats", photo_feats)
    has = filled[photo_labels]
    if not bool(has.any()):
        return photo_feats.sum() * 0.0
    cos = F.cosine_similarity(photo_feats[has], centers[photo_labels[has]].to(photo_feats.dtype), dim=1)
    return 1.0 - cos.mean()


def sake_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    class_mask: Tensor | None = None,
    kd_lambda: float = DSN_KD_LAMBDA,
    kdneg_lambda: float = DSN_KDNEG_LAMBDA,
) -> Tensor:
    """SAKE-style distillation as in DSN's ``SoftCrossEntropy``.

    ``-sum_i w_i sum_k softmax(kd_lambda * t_i + kdneg_lambda * c_i)_k log softmax(s_i)_k / sum_i w_i``,
    where ``t`` are the teacher logits [N, K], ``s`` the student's [N, K], ``c`` the semantic
    adjustment mask [N, K] (1 for teacher classes related to the sample's class; SAKE's ``cid_mask``)
    and ``w`` the per-sample mask [N] (DSN passes the domain tag, so only photos count). Without a mask
    every sample has weight 1. Returns 0 when the mask is all zero.
    """
    _check_2d("student_logits", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    target = teacher_logits * kd_lambda
    if class_mask is not None:
        if class_mask.shape != target.shape:
            raise ValueError(f"class_mask must have shape {tuple(target.shape)}, got {tuple(class_mask.shape)}")
        target = target + kdneg_lambda * class_mask.to(target.dtype)
    per = -(F.softmax(target, dim=1) * F.log_softmax(student_logits, dim=1)).sum(1)
    if mask is None:
        return per.mean()
    w = mask.reshape(-1).to(per.dtype)
    if w.shape != per.shape:
        raise ValueError(f"mask must have {per.shape[0]} entries, got {w.numel()}")
    total = w.sum()
    if float(total) == 0.0:
        return (per * 0.0).sum()
    return (per * w).sum() / total
