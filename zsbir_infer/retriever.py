"""The library API: search an indexed photo gallery with sketches (or any images, or embeddings).

Index a folder once (``zsbir index photos`` or :func:`zsbir_infer.indexer.index_folder`), then::

    from zsbir_infer import Retriever

    with Retriever.open(".zsbir") as r:                 # the model the gallery was built with (default model)
        results = r.search(["cat.png", "bike.png"], k=5)  # one list of hits per query, best first
        for hit in results[0]:
            print(hit.rank, f"{hit.score:.3f}", hit.path)   # absolute path of the photo; hit.relpath too

    r.search(pil_image, k=10)                          # a PIL image (or a uint8 HxWxC array) is one query
    r.search(np.load("sketches.npy"), k=10)            # precomputed L2-normalized embeddings [Q, D] or [D]
    r.search(["photo.jpg"], domain="photo")            # photo-to-photo search
    r.embed(["a.png", "b.png"])                        # the query embeddings themselves

``Retriever.open(gallery, model=None, backend="auto", device="cpu")``:

* ``gallery``: a gallery folder (``None``: the nearest ``.zsbir`` in the current directory or a parent); a
  sharded gallery (``zsbir index --engine ray --shards N``) is searched as one (its shards' top-k merged).
* ``model``: a bundle folder; ``None`` takes the model recorded by ``zsbir index`` in the gallery, else the
  embedded default model. A model other than the one the gallery was built with raises
  :class:`~zsbir_infer.gallery.ModelMismatchError`.
* ``backend``: the encoder backend (``auto``, ``tensorrt``, ``ort-cuda``, ``ort-cpu``).
* ``device``: where the gallery search runs: ``"cpu"`` (default) or ``"cuda"`` (the gallery vectors are
  uploaded once to the GPU and searched with the fused top-k kernels of :mod:`zsbir_infer.gpu`; where no
  usable GPU is present it falls back to the CPU with a warning, and :attr:`Retriever.device` says
  ``"cpu"``). The GPU copy is uploaded again when the gallery changed (a commit, or a gallery deleted and
  created again: each gallery has its own uuid); :meth:`Retriever.refresh` does it by hand.

Search: ``exact=True`` is an exhaustive search; ``exact=False`` (default) follows the gallery's policy
(:mod:`zsbir_infer.gallery.ann`): its HNSW index where ``zsbir index`` saved one (galleries of at least
:data:`~zsbir_infer.gallery.ann.ANN_MIN_ROWS` photos), the exhaustive search (fast and exact there)
otherwise. A search never writes to the gallery. Scores are cosine similarities. A :class:`Retriever` is
safe to use from many threads at once; queries given together are embedded in one batch.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from zsbir_infer.errors import InputError
from zsbir_infer.gallery.ann import ANN_MIN_ROWS as _ANN_MIN_ROWS
from zsbir_infer.gallery.store import Hit

if TYPE_CHECKING:
    from zsbir_infer.encoder import Encoder
    from zsbir_infer.gallery import Gallery, ShardedGallery

__all__ = ["ANN_MIN_ROWS", "DEVICES", "Hit", "Retriever", "RetrieverError", "resolve_gallery", "resolve_model"]

log = logging.getLogger("zsbir.retriever")

#: Re-exported from :mod:`zsbir_infer.gallery.ann`, where the exact/ANN policy lives (patch it there).
ANN_MIN_ROWS = _ANN_MIN_ROWS
DEVICES = ("cpu", "cuda")


class RetrieverError(InputError, ValueError):
    """Bad arguments, or no gallery to search."""


def resolve_gallery(gallery: str | os.PathLike[str] | None) -> Path:
    """The gallery folder to use: ``gallery`` itself, else ``$ZSBIR_GALLERY``, else the nearest ``.zsbir``.

    Raises:
        RetrieverError: when no gallery is given and none is found.
    """
    from zsbir_infer.gallery.source import find_gallery

    if gallery is not None:
        return Path(gallery)
    env = os.environ.get("ZSBIR_GALLERY", "").strip()
    if env:
        return Path(env)
    found = find_gallery()
    if found is None:
        raise RetrieverError(
            f"no gallery found in {Path.cwd()} or its parents (looked for a .zsbir folder); index photos first with "
            "'zsbir index PHOTOS_DIR', or name the gallery (--gallery DIR / ZSBIR_GALLERY)"
        )
    return found


def resolve_model(gallery: Path, model: str | os.PathLike[str] | None) -> str | None:
    """The bundle to query ``gallery`` with: ``model`` if given, else the one ``zsbir index`` recorded (when it
    still exists), else ``None`` (the embedded default)."""
    if model is not None:
        return os.fspath(model)
    from zsbir_infer.gallery.source import read_source

    recorded = read_source(gallery).get("model")
    if isinstance(recorded, str) and (Path(recorded) / "manifest.json").is_file():
        return recorded
    return None


def _gpu_code_bytes(code_bytes: int) -> int:
    """Width of packed codes for the GPU Hamming kernels: a multiple of 8 bytes, at least 8."""
    return max(8, -(-code_bytes // 8) * 8)


def _pad_codes(codes: np.ndarray) -> np.ndarray:
    """Packed codes widened with zero bytes to the GPU kernels' width (zeros do not change distances)."""
    width = _gpu_code_bytes(codes.shape[1])
    out = np.zeros((codes.shape[0], width), dtype=np.uint8)
    out[:, : codes.shape[1]] = codes
    return out


def _is_embedding_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and x.ndim in (1, 2)


class Retriever:
    """A gallery plus the model that embeds queries for it. Create with :meth:`Retriever.open`."""

    def __init__(
        self,
        gallery: Gallery | ShardedGallery,
        encoder: Encoder,
        root: str | None,
        device: str,
        owns_encoder: bool,
        expand: int | None = None,
    ) -> None:
        """Wrap an opened gallery (single or sharded) and encoder; prefer :meth:`open`. ``expand``: the
        query-expansion default (``None``: the encoder's bundle's recommendation)."""
        self.gallery = gallery
        self.encoder = encoder
        self.root = root
        self.requested_device = device
        self.device = "cpu"
        self.device_note = ""
        self._owns_encoder = owns_encoder
        self._expand = expand
        self._gpu: Any = None
        self._gpu_ids: np.ndarray | None = None
        self._gpu_lock = threading.Lock()
        self._paths: dict[int, str] = {}
        self._gpu_identity: tuple[str, int] | None = None
        if device == "cuda":
            self._setup_gpu()

    @classmethod
    def open(
        cls,
        gallery: str | os.PathLike[str] | None = None,
        model: str | os.PathLike[str] | Encoder | None = None,
        backend: str = "auto",
        device: str = "cpu",
        *,
        precision: str = "fp32",
        batch_size: int = 32,
        workers: int | None = None,
    ) -> Retriever:
        """Open a gallery for searching (see the module docstring for the arguments).

        ``model`` may also be an already opened :class:`~zsbir_infer.encoder.Encoder` (it is then not closed
        by :meth:`close`).

        Raises:
            RetrieverError: no gallery found, or a bad ``device``.
            zsbir_infer.gallery.GalleryError: the folder is not a readable gallery.
            zsbir_infer.gallery.ModelMismatchError: the model is not the one the gallery was built with.
            zsbir_infer.bundle.BundleError, zsbir_infer.backends.BackendUnavailable: the model cannot be opened.
        """
        from zsbir_infer.encoder import Encoder
        from zsbir_infer.gallery import open_gallery

        if device not in DEVICES:
            raise RetrieverError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        gdir = resolve_gallery(gallery)
        g = open_gallery(gdir, readonly=True)  # a search never writes (read-only volumes work); sharded or not
        try:
            g._load()  # verifies the vectors' checksums: damage is reported here, not as wrong scores
            if isinstance(model, Encoder):
                enc, owns = model, False
            else:
                enc = Encoder.open(
                    resolve_model(gdir, model),
                    precision=precision,
                    backend=backend,
                    batch_size=batch_size,
                    workers=workers,
                )
                owns = True
            try:
                g._check_model(enc.fingerprint)
            except Exception:
                if owns:
                    enc.close()
                raise
        except Exception:
            g.close()
            raise
        return cls(g, enc, g._root, device, owns)

    # ------------------------------------------------------------------------------------------ GPU

    def _setup_gpu(self) -> None:
        try:
            from zsbir_infer import gpu

            ok, why = gpu.availability()
        except Exception as exc:  # missing cuda-python, broken driver, ...
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok and self.gallery.storage == "itq":
            from zsbir_infer.gpu.search import MAX_CODE_BYTES

            if _gpu_code_bytes((self.gallery.n_bits + 7) // 8) > MAX_CODE_BYTES:
                ok = False
                why = f"the GPU kernels take codes of up to {8 * MAX_CODE_BYTES} bits, not {self.gallery.n_bits}"
        if not ok:
            self.device_note = f"device='cuda' unavailable ({why}); searching on the CPU"
            warnings.warn(self.device_note, RuntimeWarning, stacklevel=3)
            log.warning(self.device_note)
            return
        self.refresh()
        self.device = "cuda"
        self.device_note = why

    def refresh(self) -> None:
        """Re-read the gallery's live vectors onto the GPU (``device="cuda"`` only; no-op on the CPU)."""
        if self.requested_device != "cuda":
            return
        from zsbir_infer import gpu

        # In row-id order: the kernels break ties by the smaller position, the CPU search by the smaller row id.
        identity = self.gallery._identity()
        live = sorted(self.gallery.indexed(), key=lambda item: item[1])
        ids = np.array([i for _, i in live], dtype=np.int64)
        # As stored: float16 rows, int8 rows with their per-row scales (the kernels' int8 path), or packed codes.
        rows, scales = self.gallery._stored_rows(ids) if ids.size else (None, None)
        with self._gpu_lock:
            if self._gpu is not None:
                self._gpu.close()
                self._gpu = None
            if rows is not None and self.gallery.storage == "itq":  # packed codes: a Hamming search
                self._gpu = gpu.GpuGallery(codes=_pad_codes(rows), device="cuda")
            elif rows is not None:
                self._gpu = gpu.GpuGallery(rows, scales=scales, device="cuda")
            self._gpu_ids = ids
            self._paths = {i: rel for rel, i in live}
            self._gpu_identity = identity

    # -------------------------------------------------------------------------------------- queries

    @property
    def fingerprint(self) -> str:
        """The model fingerprint (equal to the gallery's)."""
        return self.encoder.fingerprint

    def __len__(self) -> int:
        """Number of searchable photos."""
        return len(self.gallery)

    def embed(self, queries: Any, domain: str = "sketch") -> np.ndarray:
        """Query embeddings ``[Q, D]`` (float32, unit rows) for paths / PIL images / pixel arrays /
        precomputed embeddings (see :meth:`search`)."""
        items = self._as_list(queries)
        dim = self.gallery.dim
        out = np.empty((len(items), dim), dtype=np.float32)
        to_embed: list[int] = []
        for i, q in enumerate(items):
            if isinstance(q, np.ndarray) and q.size == 0:
                raise RetrieverError(
                    f"query {i} is an empty array (shape {q.shape}); give an image with pixels (HxW or HxWxC) or an "
                    f"embedding of {dim} values"
                )
            size = getattr(q, "size", None) if hasattr(q, "getpixel") else None
            if isinstance(size, tuple) and 0 in size:
                raise RetrieverError(f"query {i} is an empty image ({size[0]} x {size[1]} pixels)")
            if _is_embedding_array(q):
                v = np.asarray(q, dtype=np.float32).reshape(-1)
                if v.shape[0] != dim:
                    raise RetrieverError(
                        f"query embedding {i} has {v.shape[0]} values; this gallery has dimension {dim}"
                    )
                if not np.isfinite(v).all():
                    raise RetrieverError(f"query embedding {i} contains NaN or infinity")
                n = float(np.linalg.norm(v))
                if n == 0.0:
                    raise RetrieverError(f"query embedding {i} is all zeros")
                out[i] = v / n
            else:
                to_embed.append(i)
        if to_embed:
            out[to_embed] = self.encoder.embed([items[i] for i in to_embed], domain)
        return out

    @staticmethod
    def _as_list(queries: Any) -> list[Any]:
        if isinstance(queries, np.ndarray):
            if np.issubdtype(queries.dtype, np.floating) and queries.ndim == 2 and queries.size:
                return list(queries)
            if np.issubdtype(queries.dtype, np.floating) and queries.ndim == 2 and queries.shape[1]:
                raise RetrieverError(f"no queries given (an array of shape {queries.shape}: 0 embeddings)")
            return [queries]
        if isinstance(queries, (str, bytes, os.PathLike)) or hasattr(queries, "getpixel") or hasattr(queries, "read"):
            return [queries]
        if isinstance(queries, Sequence) or hasattr(queries, "__iter__"):
            items = list(queries)
            if not items:
                raise RetrieverError("no queries given")
            return items
        raise RetrieverError(
            f"queries must be paths, PIL images, pixel arrays or embeddings; got {type(queries).__name__}"
        )

    @property
    def expand(self) -> int:
        """The query-expansion ``k`` that :meth:`search` uses by default: the bundle's recommendation
        (manifest ``retrieval.expand``, see :mod:`zsbir_infer.expansion`) unless the constructor was given
        one; 0 (off) where neither names one or where the gallery stores ITQ codes (no vectors to expand with)."""
        from zsbir_infer.expansion import recommended_expand

        bundle = getattr(self.encoder, "bundle", None)  # (an encoder-like object may carry no bundle)
        if self.gallery.storage == "itq":
            return 0
        if self._expand is not None:
            return self._expand
        return 0 if bundle is None else recommended_expand(bundle.manifest)

    def search(
        self, queries: Any, k: int = 10, domain: str = "sketch", exact: bool = False, expand: int | None = None
    ) -> list[list[Hit]]:
        """The ``k`` best photos for each query.

        Args:
            queries: one query or a list of them; each a path, a PIL image, a uint8 pixel array, or a float
                embedding ``[D]``; a float ``[Q, D]`` array is ``Q`` embeddings. Images are embedded together
                in one batch.
            k: results per query.
            domain: what the query images are (``"sketch"`` or ``"photo"``); ignored for embeddings.
            exact: force the exhaustive search (see the module docstring).
            expand: query expansion (:mod:`zsbir_infer.expansion`): search once, move each query towards
                its ``expand`` best photos, search again. ``None``: :attr:`expand` (the bundle's
                recommendation); ``0``: off. Scores are then similarities to the expanded query.

        Returns:
            One list of :class:`Hit` per query, best first (ties: smaller row id first).
        """
        from zsbir_infer.expansion import check_expand, expand_queries

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise RetrieverError(f"k must be a positive integer; got {k!r}")
        try:
            n_expand = self.expand if expand is None else check_expand(expand)
        except ValueError as exc:
            raise RetrieverError(str(exc)) from None
        if n_expand and self.gallery.storage == "itq":
            raise RetrieverError("query expansion needs stored vectors; this gallery stores ITQ codes only")
        q = self.embed(queries, domain)
        if self.device == "cuda" and self.gallery._identity() != self._gpu_identity:
            self.refresh()  # the GPU copy follows new commits and a gallery deleted and created again
        if n_expand:
            first = self._search_raw(q, n_expand, exact)
            width = max((len(row) for row in first), default=0)
            if width:
                nb = np.zeros((q.shape[0], width, q.shape[1]), dtype=np.float32)
                sc = np.zeros((q.shape[0], width), dtype=np.float32)
                for qi, row in enumerate(first):
                    if row:
                        nb[qi, : len(row)] = self.gallery.vectors([vid for _, _, vid in row])
                        sc[qi, : len(row)] = [s for _, s, _ in row]
                q = expand_queries(q, nb, sc)
        raw = self._search_raw(q, int(k), exact)
        # The gallery's manifest says where its photos are; it follows a re-pointed or replaced gallery.
        self.root = self.gallery._root
        return [[self._hit(rel, s, i, r + 1) for r, (rel, s, i) in enumerate(row)] for row in raw]

    def _search_raw(self, q: np.ndarray, k: int, exact: bool) -> list[list[tuple[str, float, int]]]:
        raw = self._search_gpu(q, k) if self.device == "cuda" else None
        if raw is None:  # the CPU, or more results than the GPU kernels give (k > gpu.MAX_K)
            # The exact/ANN policy is the gallery's: ANN where 'zsbir index' saved an index, else exhaustive.
            found = self.gallery.search(q, k, exact=bool(exact), fingerprint=self.fingerprint)
            raw = [[(h.relpath, h.score, h.id) for h in row] for row in found]
        return raw

    def _search_gpu(self, q: np.ndarray, k: int) -> list[list[tuple[str, float, int]]] | None:
        from zsbir_infer import gpu

        with self._gpu_lock:
            if self._gpu is None or self._gpu_ids is None:
                return [[] for _ in range(q.shape[0])]
            k = min(k, int(self._gpu_ids.size))  # never allocate for more results than photos
            if k > gpu.MAX_K:
                return None
            if self.gallery.storage == "itq":  # scores as on the CPU: n_bits - 2 * Hamming distance
                dist, idx = self._gpu.search_codes(_pad_codes(self.gallery.itq.transform(q)), k)
                scores, idx = self.gallery.n_bits - 2.0 * np.asarray(dist, dtype=np.float64), np.asarray(idx)
            else:
                scores, idx = self._gpu.search(q.astype(np.float16), k)
                scores, idx = np.asarray(scores), np.asarray(idx)
            ids, paths = self._gpu_ids, self._paths
        out: list[list[tuple[str, float, int]]] = []
        for qi in range(q.shape[0]):
            row = []
            for s, j in zip(scores[qi], idx[qi], strict=True):
                if j < 0:
                    break
                vid = int(ids[int(j)])
                row.append((paths[vid], float(s), vid))
            out.append(row)
        return out

    def _hit(self, relpath: str, score: float, vid: int, rank: int) -> Hit:
        parts = relpath.split("/")
        if not relpath or relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
            # (the gallery checks every path it reads; this guards paths from any other source)
            from zsbir_infer.gallery import GalleryError

            raise GalleryError(
                f"gallery {self.gallery.path} returned the path {relpath!r}, which does not lie inside the photo "
                "folder; check the gallery with 'zsbir info --verify'"
            )
        path = os.path.join(self.root, *parts) if self.root else relpath
        return Hit(path=path, relpath=relpath, score=float(score), id=vid, rank=rank)

    # ------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the gallery, the GPU copy and (unless it was passed in) the encoder."""
        with self._gpu_lock:
            if self._gpu is not None:
                self._gpu.close()
                self._gpu = None
        self.gallery.close()
        if self._owns_encoder:
            self.encoder.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.gallery.path)
        return f"Retriever({where!r}, {len(self)} photos, device={self.device!r}, model={self.fingerprint!r})"
