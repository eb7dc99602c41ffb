"""Iterative Quantization (ITQ) binary codes and Hamming distances, in numpy.

ITQ (Gong & Lazebnik, "Iterative Quantization: A Procrustes Approach to Learning Binary Codes",
CVPR 2011) learns ``n_bits``-bit codes for real vectors:

1. zero-centre the training vectors (mean stored in the model);
2. project them onto the top ``n_bits`` principal directions (PCA of the training covariance);
3. starting from a random orthogonal rotation ``R``, alternate
   ``B = sign(V R)`` (codes for the current rotation) and the orthogonal Procrustes solution
   ``R = argmin ||B - V R||_F`` (SVD of ``Vᵀ B``), which never increases the quantization loss
   ``||B - V R||_F²``.

A code bit is 1 where the rotated projection is > 0 (as DSN's ``compressITQ`` in
github.com/haowang1992/DSN ``src/tool.py``). Packed codes use ``np.packbits`` order: bit ``i`` is bit
``7 - i % 8`` (most significant first) of byte ``i // 8``; unused trailing bits are 0.

Differences from DSN's evaluation helper (facts, for anyone comparing numbers): DSN fits PCA and the
rotation on the *query* (sketch) features, keeps all 64 PCA dimensions, seeds numpy's global RNG
with ``n_iter`` and centres queries and gallery each with *their own* mean. Here the model is fitted
once on the data you pass to :meth:`ITQ.fit`, is seeded by ``seed``, and centres new data with the
training mean unless ``recenter=True`` is passed to :meth:`ITQ.transform` /
:meth:`ITQ.transform_bits` (which reproduces DSN's per-set centring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ITQ", "hamming_distance", "pack_bits", "unpack_bits"]

_FORMAT = "zsbir-itq"
_VERSION = 1


def _as_2d_float(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


@dataclass
class ITQ:
    """A fitted ITQ model: ``code(x) = [((x - mean) @ components @ rotation) > 0]``.

    Attributes:
        mean: (D,) training mean subtracted before projection.
        components: (D, n_bits) PCA directions, by decreasing variance.
        rotation: (n_bits, n_bits) orthogonal rotation found by ITQ.
        loss_history: quantization loss ``||B - V R||_F² / N`` on the training data for the initial
            rotation and after each iteration (non-increasing); empty for a loaded model.
    """

    mean: np.ndarray
    components: np.ndarray
    rotation: np.ndarray
    loss_history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.components = np.asarray(self.components, dtype=np.float64)
        self.rotation = np.asarray(self.rotation, dtype=np.float64)
        if self.mean.ndim != 1 or self.components.ndim != 2 or self.rotation.ndim != 2:
            raise ValueError("ITQ needs mean (D,), components (D, n_bits) and rotation (n_bits, n_bits)")
        d, b = self.components.shape
        if self.mean.shape[0] != d or self.rotation.shape != (b, b):
            raise ValueError(
                f"inconsistent ITQ shapes: mean {self.mean.shape}, components {self.components.shape}, "
                f"rotation {self.rotation.shape}"
            )

    @property
    def n_bits(self) -> int:
        """Code length in bits."""
        return int(self.rotation.shape[0])

    @property
    def dim(self) -> int:
        """Dimension of the input vectors."""
        return int(self.mean.shape[0])

    @property
    def n_bytes(self) -> int:
        """Width of a packed code in bytes (``ceil(n_bits / 8)``)."""
        return (self.n_bits + 7) // 8

    @classmethod
    def fit(cls, X: ArrayLike, n_bits: int = 64, n_iter: int = 50, seed: int = 0) -> ITQ:
        """Learn an ITQ model from training vectors.

        Args:
            X: (N, D) real training vectors, N >= 2.
            n_bits: code length, 1 <= n_bits <= D.
            n_iter: number of alternating (codes, rotation) updates, >= 0.
            seed: seed of the random orthogonal initial rotation.

        Returns:
            The fitted model (its ``loss_history`` has ``n_iter + 1`` entries).

        Raises:
            ValueError: on a bad shape, non-finite values or out-of-range parameters.
        """
        x = _as_2d_float(X, "X")
        n, d = x.shape
        if n < 2:
            raise ValueError(f"ITQ.fit needs at least 2 training vectors; got {n}")
        if not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= d:
            raise ValueError(f"n_bits must be an integer in [1, {d}] (the input dimension); got {n_bits!r}")
        if not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
            raise ValueError(f"n_iter must be a non-negative integer; got {n_iter!r}")
        n_bits = int(n_bits)

        mean = x.mean(axis=0)
        xc = x - mean
        cov = xc.T @ xc / (n - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval, kind="stable")[::-1][:n_bits]
        components = eigvec[:, order]
        # Deterministic sign: the largest-magnitude entry of each direction is positive.
        flip = np.sign(components[np.argmax(np.abs(components), axis=0), np.arange(n_bits)])
        components = components * np.where(flip == 0, 1.0, flip)
        v = xc @ components

        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((n_bits, n_bits)))
        rotation = q * np.where(np.diag(r) < 0, -1.0, 1.0)

        history: list[float] = []
        for it in range(n_iter + 1):
            z = v @ rotation
            b = np.where(z >= 0, 1.0, -1.0)
            history.append(float(np.sum((b - z) ** 2) / n))
            if it == n_iter:
                break
            u, _, wt = np.linalg.svd(v.T @ b)
            rotation = u @ wt
        return cls(mean=mean, components=components, rotation=rotation, loss_history=history)

    def project(self, X: ArrayLike, recenter: bool = False) -> np.ndarray:
        """Rotated PCA projection ``(X - mean) @ components @ rotation`` as float64 (N, n_bits).

        With ``recenter=True`` the mean of ``X`` itself is subtracted instead of the training mean.
        """
        x = _as_2d_float(X, "X")
        if x.shape[1] != self.dim:
            raise ValueError(f"X has dimension {x.shape[1]} but this ITQ model expects {self.dim}")
        centre = x.mean(axis=0) if recenter else self.mean
        return (x - centre) @ self.components @ self.rotation

    def transform_bits(self, X: ArrayLike, recenter: bool = False) -> np.ndarray:
        """Codes as an (N, n_bits) uint8 array of 0/1 (1 where the projection is > 0)."""
        return (self.project(X, recenter=recenter) > 0).astype(np.uint8)

    def transform(self, X: ArrayLike, recenter: bool = False) -> np.ndarray:
        """Codes packed 8 bits per byte: (N, ceil(n_bits / 8)) uint8, ``np.packbits`` bit order."""
        return pack_bits(self.transform_bits(X, recenter=recenter))

    def quantization_loss(self, X: ArrayLike) -> float:
        """Mean squared quantization error ``||sign(V R) - V R||_F² / N`` of ``X`` under this model."""
        z = self.project(X)
        b = np.where(z >= 0, 1.0, -1.0)
        return float(np.sum((b - z) ** 2) / z.shape[0])

    def save(self, path: str | PathLike[str]) -> None:
        """Write the model to an ``.npz`` file (numpy appends ``.npz`` if the name lacks it)."""
        np.savez(
            Path(path),
            format=np.array(_FORMAT),
            version=np.array(_VERSION),
            mean=self.mean,
            components=self.components,
            rotation=self.rotation,
            loss_history=np.asarray(self.loss_history, dtype=np.float64),
        )

    @classmethod
    def load(cls, path: str | PathLike[str]) -> ITQ:
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: if the file is missing.
            ValueError: if the file is not a zsbir ITQ model of a supported version.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no ITQ model at {p}")
        with np.load(p, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != _FORMAT:
                raise ValueError(f"{p} is not a zsbir ITQ model (missing or wrong 'format' entry)")
            version = int(data["version"])
            if version != _VERSION:
                raise ValueError(f"{p}: unsupported ITQ model version {version} (this code reads {_VERSION})")
            return cls(
                mean=data["mean"],
                components=data["components"],
                rotation=data["rotation"],
                loss_history=[float(v) for v in data["loss_history"]],
            )


def pack_bits(bits: ArrayLike) -> np.ndarray:
    """Pack an (N, n_bits) array of 0/1 (or bool) into (N, ceil(n_bits / 8)) uint8, MSB first."""
    arr = np.asarray(bits)
    if arr.ndim != 2:
        raise ValueError(f"bits must be a 2-D array (N, n_bits); got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"bits must be bool or integer 0/1; got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError("bits must contain only 0 and 1")
    return np.packbits(arr.astype(np.bool_), axis=1)


def unpack_bits(packed: ArrayLike, n_bits: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (N, n_bytes) uint8 -> (N, n_bits) uint8 of 0/1."""
    arr = np.asarray(packed)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"packed codes must be a 2-D uint8 array; got shape {arr.shape}, dtype {arr.dtype}")
    return np.unpackbits(arr, axis=1, count=n_bits)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, x.dtype.itemsize).sum(axis=-1)


def hamming_distance(a_packed: ArrayLike, b_packed: ArrayLike) -> np.ndarray:
    """All-pairs Hamming distances between packed binary codes.

    Args:
        a_packed: (N, n_bytes) uint8 packed codes.
        b_packed: (M, n_bytes) uint8 packed codes of the same width.

    Returns:
        (N, M) int32 array: number of differing bits for each pair.

    Raises:
        ValueError: if the inputs are not 2-D uint8 arrays of the same width.
    """
    a = np.asarray(a_packed)
    b = np.asarray(b_packed)
    for name, arr in (("a_packed", a), ("b_packed", b)):
        if arr.ndim != 2 or arr.dtype != np.uint8:
            raise ValueError(
                f"{name} must be a 2-D uint8 array of packed codes; got shape {arr.shape}, dtype {arr.dtype}"
            )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"code widths differ: a_packed has {a.shape[1]} bytes, b_packed has {b.shape[1]}")
    n_bytes = a.shape[1]
    pad = (-n_bytes) % 8
    if pad:
        a = np.pad(a, ((0, 0), (0, pad)))
        b = np.pad(b, ((0, 0), (0, pad)))
    a64 = np.ascontiguousarray(a).view(np.uint64)
    b64 = np.ascontiguousarray(b).view(np.uint64)
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int32)
    for w in range(a64.shape[1]):
        out += _popcount(a64[:, w, None] ^ b64[None, :, w])
    return out
