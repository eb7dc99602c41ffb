"""The encoder: images in, L2-normalized float32 embeddings out, with any backend (torch-free).

    from zsbir_infer.encoder import Encoder
    enc = Encoder.open("bundle_dir", precision="fp32", backend="auto")
    photos = enc.embed(["a.jpg", "b.jpg"], "photo")          # float32 [2, D], unit rows
    sketch = enc.embed(["s.png"], "sketch")
    scores = sketch @ photos.T                                 # cosine similarity

``embed`` decodes and preprocesses images on a thread pool (PIL releases the GIL while decoding), a
few batches ahead of the model, so decoding overlaps inference. Each domain uses the bundle's own
preprocessing spec; domain-conditioned models also get the domain tag (photo 1, sketch 0).
``embed`` also takes one already-preprocessed float ``[N, 3, H, W]`` batch (what a distributed decoder
hands over), which goes to the model in chunks of ``batch_size`` without per-image work.
``embed_stream`` is the streaming form behind ``embed``: it yields results batch by batch and can skip
undecodable files (reporting each with its reason). The indexer does not use it: it decodes straight
into its own batches (:mod:`zsbir_infer.indexer`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from zsbir_infer.backends import BACKENDS, Backend, open_backend
from zsbir_infer.bundle import PRECISIONS, Bundle, check_domain
from zsbir_infer.errors import ModelError
from zsbir_infer.prefetch import prefetch
from zsbir_infer.preprocess import ImageDecodeError, ImageInput, preprocess_into
from zsbir_infer.threads import default_threads

__all__ = ["DEFAULT_BATCH_SIZE", "EmbeddedBatch", "Encoder", "EncoderError", "l2_normalize"]

log = logging.getLogger("zsbir.encoder")

DEFAULT_BATCH_SIZE = 32


@dataclass
class PreprocessedBatch:
    """Inputs ``start .. start+size-1`` preprocessed; ``indices`` are the positions that decoded."""

    start: int
    size: int
    indices: np.ndarray  # int64 [k], positions in the input sequence
    images: np.ndarray  # float32 [k, 3, H, W]
    failures: list[tuple[int, str]]  # (position, reason) of inputs that could not be decoded


@dataclass
class EmbeddedBatch:
    """Inputs ``start .. start+size-1`` embedded; row ``j`` of ``embeddings`` is input ``indices[j]``."""

    start: int
    size: int
    indices: np.ndarray  # int64 [k]
    embeddings: np.ndarray  # float32 [k, D], L2-normalized
    failures: list[tuple[int, str]]  # (position, reason) of inputs skipped (skip_errors=True only)


class EncoderError(ModelError, RuntimeError):
    """The model produced unusable output (wrong shape, NaN/inf)."""


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm in float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))[:, None]
    return np.divide(x, np.maximum(norms, np.float32(eps)), dtype=np.float32)


class Encoder:
    """Embeds images with a bundle's model. Create with :meth:`Encoder.open`."""

    def __init__(self, bundle: Bundle, backend: Backend, precision: str, batch_size: int, workers: int) -> None:
        """Wrap an opened backend; prefer :meth:`open`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self._backend = backend
        self.precision = precision
        limit = backend.max_batch
        self.batch_size = min(batch_size, limit) if limit else batch_size
        self.workers = max(1, workers)

    @classmethod
    def open(
        cls,
        bundle: Bundle | str | Path | None = None,
        precision: str = "fp32",
        backend: str = "auto",
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int | None = None,
        device_id: int = 0,
        threads: int | None = None,
    ) -> Encoder:
        """Open an encoder.

        Args:
            bundle: a :class:`Bundle`, a bundle folder, or ``None`` for the embedded default model.
            precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (must be in the bundle).
            backend: ``"auto"`` (TensorRT, then ONNX Runtime CUDA, then CPU), ``"tensorrt"``,
                ``"ort-cuda"`` or ``"ort-cpu"``; an explicit backend that cannot run raises
                :class:`~zsbir_infer.backends.BackendUnavailable` with the reason.
            batch_size: images per model call (capped by a TensorRT engine's max batch).
            workers: decoding threads for :meth:`embed` (default: usable CPUs, at most 8).
            device_id: CUDA device for GPU backends.
            threads: ONNX Runtime intra-op threads (default: ``ZSBIR_NUM_THREADS``/``OMP_NUM_THREADS``/CPUs).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        be = open_backend(b, precision, backend, device_id=device_id, threads=threads)
        enc = cls(b, be, precision, batch_size, workers if workers is not None else default_threads(8))
        log.info("encoder: %s, bundle %s (%s)", be.describe(), b.path, b.fingerprint)
        return enc

    # ------------------------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        """The backend in use: ``"tensorrt"``, ``"ort-cuda"`` or ``"ort-cpu"``."""
        return self._backend.name

    @property
    def fingerprint(self) -> str:
        """The bundle fingerprint (galleries refuse queries from a different one)."""
        return self.bundle.fingerprint

    @property
    def embedding_dim(self) -> int:
        """Length of each embedding."""
        return self.bundle.embedding_dim

    def describe(self) -> str:
        """One line: backend, device, precision."""
        return self._backend.describe()

    # ------------------------------------------------------------------------------------- embedding

    def _tags(self, domain: str, n: int) -> np.ndarray | None:
        if not self.bundle.domain_conditioned:
            return None
        return np.full(n, self.bundle.domain_tag(domain), dtype=np.int64)

    def _run(self, batch: np.ndarray, domain: str) -> np.ndarray:
        n = batch.shape[0]
        pad = max(0, self._backend.min_batch - n)
        x = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if pad else batch
        raw = self._backend.run(np.ascontiguousarray(x, dtype=np.float32), self._tags(domain, x.shape[0]))
        raw = np.asarray(raw)
        if raw.ndim != 2 or raw.shape[0] != x.shape[0] or raw.shape[1] != self.embedding_dim:
            raise EncoderError(
                f"the model returned shape {list(raw.shape)}, expected [{x.shape[0]}, {self.embedding_dim}] "
                "(bundle manifest and model disagree)"
            )
        out = raw[:n].astype(np.float32, copy=False)
        if not np.isfinite(out).all():
            raise EncoderError(
                f"the {self.backend} {self.precision} model produced non-finite embeddings "
                "(overflow in reduced precision? try precision='fp32')"
            )
        return l2_normalize(out)

    def _embed_preprocessed(self, arr: np.ndarray, domain: str, batch_size: int | None) -> np.ndarray:
        """:meth:`embed` of one preprocessed float ``[N, 3, H, W]`` batch: checked once, then run on the model
        in chunks of ``batch_size`` (no per-image work)."""
        if arr.shape[1] != 3:
            raise ValueError(f"a preprocessed batch must be [N, 3, H, W], got shape {list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(
                f"a 4-D array is a preprocessed batch and must hold float images, got dtype {arr.dtype} "
                "(pass raw uint8 pixels as a list of HxWxC arrays)"
            )
        spec = self.bundle.preprocess_spec(domain)
        if arr.shape[2:] != spec.size:
            raise ValueError(
                f"{domain} images must be {list(spec.size)} (H, W) for this model, got {list(arr.shape[2:])}"
            )
        bs = self._chunk(batch_size)
        out = np.empty((arr.shape[0], self.embedding_dim), dtype=np.float32)
        for start in range(0, arr.shape[0], bs):
            out[start : start + bs] = self._run(arr[start : start + bs], domain)
        return out

    def _chunk(self, batch_size: int | None) -> int:
        """Images per model call: ``batch_size`` (default the encoder's), capped by the backend's limit."""
        bs = batch_size or self.batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        return min(bs, self._backend.max_batch) if self._backend.max_batch else bs

    def _preprocessed_batches(
        self,
        images: Sequence[ImageInput],
        domain: str,
        *,
        batch_size: int | None = None,
        skip_errors: bool = False,
    ) -> Iterator[PreprocessedBatch]:
        """Yield preprocessed batches of ``images``, decoded on the thread pool a few batches ahead.

        With ``skip_errors=False`` the first undecodable input raises its
        :class:`~zsbir_infer.preprocess.ImageDecodeError` when its batch is reached; with ``True`` it is
        left out of the batch and reported in ``failures``.
        """
        spec = self.bundle.preprocess_spec(domain)
        bs = self._chunk(batch_size)
        n = len(images)
        if n == 0:
            return
        ahead = 2  # batches decoded ahead of the one being embedded

        def groups() -> Iterator[tuple[tuple[int, np.ndarray], Sequence[Callable[[], object]]]]:
            for start in range(0, n, bs):
                stop = min(n, start + bs)
                buf = np.empty((stop - start, 3, spec.height, spec.width), dtype=np.float32)
                yield (
                    (start, buf),
                    [partial(preprocess_into, images[i], spec, buf[i - start]) for i in range(start, stop)],
                )

        with closing(prefetch(groups(), workers=self.workers, in_flight=ahead + 1, name="zsbir-decode")) as batches:
            for (start, buf), outcomes in batches:
                failures: list[tuple[int, str]] = []
                for i, o in enumerate(outcomes):
                    if o.error is None:
                        continue
                    if not (skip_errors and isinstance(o.error, ImageDecodeError)):
                        o.result()  # raises it
                    failures.append((start + i, str(o.error)))
                indices = np.arange(start, start + len(outcomes), dtype=np.int64)
                if failures:
                    keep = np.ones(len(outcomes), dtype=bool)
                    keep[[i - start for i, _ in failures]] = False
                    buf, indices = buf[keep], indices[keep]
                yield PreprocessedBatch(start=start, size=len(outcomes), indices=indices, images=buf, failures=failures)

    def embed_stream(
        self,
        images: Sequence[ImageInput],
        domain: str,
        *,
        batch_size: int | None = None,
        skip_errors: bool = False,
    ) -> Iterator[EmbeddedBatch]:
        """Embed ``images`` batch by batch (the streaming form of :meth:`embed`, which collects it).

        Each :class:`EmbeddedBatch` holds the input positions it embedded, their L2-normalized
        embeddings, and (with ``skip_errors=True``) the inputs that could not be decoded, with the
        reason. Decoding of later batches overlaps the inference of the current one.
        """
        check_domain(domain)
        for batch in self._preprocessed_batches(images, domain, batch_size=batch_size, skip_errors=skip_errors):
            if batch.images.shape[0]:
                emb = self._run(batch.images, domain)
            else:
                emb = np.empty((0, self.embedding_dim), dtype=np.float32)
            yield EmbeddedBatch(
                start=batch.start, size=batch.size, indices=batch.indices, embeddings=emb, failures=batch.failures
            )

    def embed(
        self,
        images: Sequence[ImageInput] | Iterable[ImageInput] | ImageInput,
        domain: str,
        *,
        batch_size: int | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> np.ndarray:
        """Embed images of one domain: paths, open files, bytes, PIL images or uint8 HxWxC arrays (decoded
        and preprocessed here), or one already-preprocessed float ``[N, 3, H, W]`` batch.

        Returns float32 ``[N, D]`` L2-normalized rows in input order. A single path, PIL image or pixel
        array is accepted as a batch of one. :meth:`embed_stream` is the streaming form. ``progress(k)``
        is called after each batch with the number of images just embedded. Undecodable inputs raise
        :class:`~zsbir_infer.preprocess.ImageDecodeError` naming the file.
        """
        check_domain(domain)
        if isinstance(images, (str, os.PathLike, bytes, Image.Image)) or hasattr(images, "read"):
            items: Sequence[ImageInput] = [images]  # type: ignore[list-item]
        elif isinstance(images, np.ndarray):
            if images.ndim == 4:  # one preprocessed batch: straight to the model
                out = self._embed_preprocessed(images, domain, batch_size)
                if progress is not None:
                    progress(len(out))
                return out
            items = [images]
        else:
            items = list(images)
        out = np.empty((len(items), self.embedding_dim), dtype=np.float32)
        for batch in self.embed_stream(items, domain, batch_size=batch_size):
            out[batch.indices] = batch.embeddings
            if progress is not None:
                progress(batch.size)
        return out

    # ------------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the backend (sessions, GPU memory)."""
        self._backend.close()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Encoder({self.describe()}, fingerprint={self.fingerprint!r}, dim={self.embedding_dim})"
