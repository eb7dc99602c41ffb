"""Training data: images of a benchmark split, augmentations and class-balanced batches.

Decoding and normalization go through :mod:`zsbir_infer.preprocess` (the same code the exported model
runs behind), augmentations are applied to the decoded PIL image before it. Every random choice (batch
composition and each image's augmentation) is derived from ``(seed, epoch, batch, slot)`` with numpy
generators, so an epoch is the same whether it runs straight through or after a resume, and data
loading never touches torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from zsbir_infer.datasets import SplitData
from zsbir_infer.preprocess import PreprocessSpec, as_spec, load_image, preprocess_into

__all__ = [
    "PHOTO_TAG",
    "SKETCH_TAG",
    "Batch",
    "BatchPlan",
    "EpochBatches",
    "EpochSampler",
    "ImageCache",
    "affine_augment",
    "collate_batch",
    "color_augment",
    "make_spec",
    "plan_epoch",
    "render_batch",
]

PHOTO_TAG = 1  # CONTRACTS §4
SKETCH_TAG = 0


def make_spec(size: int) -> dict[str, Any]:
    """The preprocessing spec (CONTRACTS §3) our trainer uses for both domains at ``size`` px: the runtime's
    default (squash, PIL bilinear, ImageNet mean/std, RGB, white background) at ``size`` x ``size``."""
    if size < 32:
        raise ValueError(f"image size must be at least 32 px (ResNets downsample 32x), got {size}")
    return PreprocessSpec(size=(size, size)).to_dict()


class ImageCache:
    """Decoded images kept in memory (benchmark images are small; decoding dominates otherwise).

    Two kinds of entry: ``get(path)`` is the full-size decode that training augments (augmentation
    works on the full image, then ``preprocess_into`` resizes); ``get(path, target_size=(h, w))`` is
    the decode the runtime does for a model of that input size (:func:`load_image` with
    ``target_size``, which lets JPEGs decode at reduced size), used by :func:`iter_eval_batches` so
    that evaluation tensors equal the runtime's exactly.
    """

    def __init__(self, max_items: int = 200_000) -> None:
        self._items: dict[str | tuple[str, tuple[int, int]], Image.Image] = {}
        self.max_items = max_items

    def get(self, path: str, target_size: tuple[int, int] | None = None) -> Image.Image:
        """The decoded RGB image at ``path`` (decoded once): full size, or as the runtime decodes it for
        a ``target_size`` ``(height, width)`` input."""
        key: str | tuple[str, tuple[int, int]] = (
            path if target_size is None else (path, (int(target_size[0]), int(target_size[1])))
        )
        img = self._items.get(key)
        if img is None:
            img = load_image(path, target_size=target_size)
            if len(self._items) < self.max_items:
                self._items[key] = img
        return img


def affine_augment(img: Image.Image, rng: np.random.Generator, fill: tuple[int, int, int]) -> Image.Image:
    """SAKE/DSN-style geometric augmentation (their ``Sketchy.py``), applied with probability 0.7.

    Each of: scale 0.9-1.1 per axis (p 0.5), rotation +-30 degrees (p 0.5), translation +-10 % of the
    size (p 0.5); then a horizontal flip with p 0.5. The uncovered area is filled with ``fill``.
    """
    w, h = img.size
    if rng.random() < 0.7:
        sx, sy = (rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)) if rng.random() < 0.5 else (1.0, 1.0)
        rot = rng.uniform(-math.pi / 6, math.pi / 6) if rng.random() < 0.5 else 0.0
        tx, ty = (rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.1, 0.1) * h) if rng.random() < 0.5 else (0.0, 0.0)
        # forward map about the centre: p' = R S (p - c) + c + t ; PIL wants the inverse (output -> input)
        c, s = math.cos(rot), math.sin(rot)
        cx, cy = w / 2.0, h / 2.0
        a, b = c / sx, s / sx
        d, e = -s / sy, c / sy
        ox, oy = cx + tx, cy + ty
        coeffs = (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)
        img = img.transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def color_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """DSN's contrastive view transform: flip (p 0.5), colour jitter 0.4/0.4/0.4/0.1 (p 0.8), grey (p 0.2)."""
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: _hue_shift(im, rng.uniform(-0.1, 0.1)),
        ]
        for i in rng.permutation(len(ops)):
            img = ops[int(i)](img)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return img


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.array(img.convert("HSV"), dtype=np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


@dataclass(frozen=True)
class BatchPlan:
    """One batch: which sketches and photos (indices into the split's lists) and a seed per image."""

    sketches: tuple[int, ...]
    photos: tuple[int, ...]
    seed: int


def plan_epoch(
    split: SplitData,
    batch_size: int,
    seed: int,
    epoch: int,
    per_class: int = 2,
    domains: Sequence[str] = ("sketch", "photo"),
) -> list[BatchPlan]:
    """Class-balanced batches for one epoch, deterministic in ``(seed, epoch)``.

    Each batch holds ``P = batch_size // (per_class * len(domains))`` distinct classes with
    ``per_class`` images of each domain in ``domains`` (drawn without replacement when the class has
    enough). The epoch has ``(#images of those domains) // batch_size`` batches (at least 1).
    """
    if batch_size < 2:
        raise ValueError(f"batch size must be at least 2, got {batch_size}")
    n_dom = len(domains)
    if per_class < 1 or batch_size < per_class * n_dom:
        raise ValueError(f"batch size {batch_size} is too small for {per_class} images x {n_dom} domain(s)")
    n_classes = len(split.classes)
    p = max(2, batch_size // (per_class * n_dom)) if n_classes >= 2 else 1
    p = min(p, n_classes)
    by_class: dict[str, list[list[int]]] = {}
    for dom in ("sketch", "photo"):
        lists: list[list[int]] = [[] for _ in range(n_classes)]
        for i, s in enumerate(split.of(dom)):
            lists[s.label].append(i)
        by_class[dom] = lists
    for dom in domains:
        empty = [split.classes[c] for c, idx in enumerate(by_class[dom]) if not idx]
        if empty:
            raise ValueError(f"class(es) without any {dom}: {empty[:5]}")
    total = sum(len(split.of(d)) for d in domains)
    n_batches = max(1, total // batch_size)
    rng = np.random.default_rng([seed, epoch, 7919])
    plans = []
    for b in range(n_batches):
        classes = rng.choice(n_classes, size=p, replace=False)
        picked: dict[str, list[int]] = {"sketch": [], "photo": []}
        for dom in domains:
            for c in classes:
                pool = by_class[dom][int(c)]
                take = rng.choice(len(pool), size=per_class, replace=len(pool) < per_class)
                picked[dom].extend(pool[int(k)] for k in take)
        plans.append(
            BatchPlan(
                tuple(picked["sketch"]), tuple(picked["photo"]), int(rng.integers(2**31)) ^ (b * 2654435761 % 2**31)
            )
        )
    return plans


@dataclass
class Batch:
    """Rendered tensors of one batch. Sketches come first, then photos (as DSN's train loop)."""

    images: Tensor  # [N, 3, H, W] plain augmentation
    labels: Tensor  # [N] int64
    tags: Tensor  # [N] int64, photo = 1, sketch = 0
    n_sketch: int
    views: list[Tensor]  # extra colour-augmented views (DSN), each [N, 3, H, W]


def render_batch(
    split: SplitData,
    plan: BatchPlan,
    spec: PreprocessSpec | dict[str, Any],
    cache: ImageCache,
    augment: bool = True,
    n_views: int = 0,
) -> Batch:
    """Decode, augment and normalize the images of ``plan`` into tensors.

    Images are decoded at full size (no reduced-size JPEG decoding): the augmentations work on the
    whole image and ``preprocess_into`` resizes afterwards. Evaluation (:func:`iter_eval_batches`)
    decodes like the runtime instead."""
    s = as_spec(spec)
    samples = [split.sketches[i] for i in plan.sketches] + [split.photos[i] for i in plan.photos]
    n = len(samples)
    arrays = [np.empty((n, 3, s.height, s.width), dtype=np.float32) for _ in range(1 + n_views)]
    for k, sample in enumerate(samples):
        rng = np.random.default_rng([plan.seed, k])
        base = cache.get(str(sample.path))
        img = affine_augment(base, rng, (255, 255, 255)) if augment else base
        preprocess_into(img, s, arrays[0][k])
        for v in range(n_views):
            preprocess_into(color_augment(img, rng), s, arrays[1 + v][k])
    labels = torch.tensor([x.label for x in samples], dtype=torch.long)
    tags = torch.tensor([PHOTO_TAG if x.domain == "photo" else SKETCH_TAG for x in samples], dtype=torch.long)
    tensors = [torch.from_numpy(a) for a in arrays]
    return Batch(tensors[0], labels, tags, len(plan.sketches), tensors[1:])


def iter_eval_batches(
    samples: Sequence[Any], spec: PreprocessSpec | dict[str, Any], cache: ImageCache | None, batch_size: int
) -> Iterator[Tensor]:
    """Preprocessed (no augmentation) image batches for evaluation.

    Images are decoded exactly as the runtime decodes them (``load_image(path, target_size=spec.size)``,
    reduced-size JPEG decoding included), so these tensors equal ``zsbir_infer.preprocess`` output for
    the same files bit for bit (``tests/test_parity.py``). Training batches (:func:`render_batch`)
    decode at full size instead: augmentation needs the whole image.
    """
    s = as_spec(spec)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        arr = np.empty((len(chunk), 3, s.height, s.width), dtype=np.float32)
        for k, sample in enumerate(chunk):
            path = str(sample.path)
            img = cache.get(path, s.size) if cache is not None else load_image(path, target_size=s.size)
            preprocess_into(img, s, arr[k])
        yield torch.from_numpy(arr)


class EpochBatches(torch.utils.data.Dataset[Batch]):
    """Item ``k`` is batch ``k % n_batches`` of epoch ``k // n_batches`` (rendered where it is fetched).

    Plans are recomputed from ``(seed, epoch)`` inside whichever process renders them, so a
    ``DataLoader`` with persistent workers keeps its decoded-image cache across epochs and the batches
    are identical with or without workers.
    """

    def __init__(
        self,
        split: SplitData,
        spec: dict[str, Any],
        batch_size: int,
        seed: int,
        per_class: int,
        domains: Sequence[str],
        n_views: int,
    ) -> None:
        self.split, self.spec, self.batch_size, self.seed = split, spec, batch_size, seed
        self.per_class, self.domains, self.n_views = per_class, tuple(domains), n_views
        self.n_batches = len(plan_epoch(split, batch_size, seed, 0, per_class, self.domains))
        self.cache = ImageCache()
        self._plans: tuple[int, list[BatchPlan]] | None = None

    def __len__(self) -> int:
        return self.n_batches * 1_000_000  # any epoch; the sampler picks the indices

    def plans(self, epoch: int) -> list[BatchPlan]:
        """The batch plans of ``epoch`` (cached for the current epoch)."""
        if self._plans is None or self._plans[0] != epoch:
            self._plans = (
                epoch,
                plan_epoch(self.split, self.batch_size, self.seed, epoch, self.per_class, self.domains),
            )
        return self._plans[1]

    def __getitem__(self, k: int) -> Batch:
        epoch, b = divmod(int(k), self.n_batches)
        plan = self.plans(epoch)[b]
        return render_batch(self.split, plan, self.spec, self.cache, augment=True, n_views=self.n_views)


def collate_batch(items: list[Batch]) -> Batch:
    """``DataLoader`` collate for ``batch_size=1`` over :class:`EpochBatches` (unwraps the one batch)."""
    return items[0]


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch's batches in :class:`EpochBatches`; set :attr:`epoch` before iterating."""

    def __init__(self, n_batches: int, max_batches: int | None = None) -> None:
        self.n_batches = n_batches
        self.count = n_batches if max_batches is None else max(1, min(n_batches, max_batches))
        self.epoch = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.n_batches
        return iter(range(start, start + self.count))
