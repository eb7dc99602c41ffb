"""The on-disk gallery: SQLite metadata, append-only memory-mapped vector segments, manifest, ANN index.

See the package docstring (:mod:`zsbir_infer.gallery`) for the layout and the guarantees; this module
holds the implementation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, cast

import numpy as np

from zsbir_infer.fsio import FileLock, atomic_write_json
from zsbir_infer.gallery import ann as _ann_policy
from zsbir_infer.gallery.ann import ANN_META, AnnIndex
from zsbir_infer.gallery.codecs import Codec, make_codec
from zsbir_infer.gallery.search import ID_SENTINEL, Block, Scorer, search_blocks
from zsbir_infer.gallery.segments import (
    SEGMENT_DIR,
    GalleryError,
    Segment,
    SegmentDamagedError,
    SegmentFiles,
    crc_file,
)
from zsbir_infer.gallery.segments import (
    fsync_dir as _fsync_dir,
)
from zsbir_infer.gallery.source import make_source, read_source

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGES",
    "FileRecord",
    "FileStat",
    "Gallery",
    "GalleryError",
    "GalleryStats",
    "Hit",
    "ModelMismatchError",
    "Plan",
    "SegmentDamagedError",
    "display_path",
]

FORMAT = "zsbir-gallery"
#: The manifest format of a sharded gallery (several galleries read as one: gallery/shards.py).
SHARDED_FORMAT = "zsbir-sharded-gallery"
#: Version written by this zsbir. 2 added per-segment checksums and the gallery's identity (``uuid``).
FORMAT_VERSION = 2
#: Versions this zsbir opens: format 1 opens read-only as it is (no checksums to verify) and is upgraded in
#: place (atomically) the first time it is opened for writing (``zsbir index``).
READABLE_VERSIONS = (1, 2)
STORAGES = ("float16", "int8", "itq")
MANIFEST = "manifest.json"
DATABASE = "meta.sqlite"
ITQ_FILE = "itq.npz"
LOCK_FILE = ".lock"


def creating_prefix(name: str) -> str:
    """Prefix of the temporary sibling folder in which ``Gallery.create`` builds the gallery ``name``."""
    return f".{name}.creating-"


DEFAULT_SEGMENT_ROWS = 1 << 20
NORM_TOLERANCE = 0.02


def check_new_folder(p: Path) -> None:
    """Refuse to create a gallery (single or sharded) at ``p`` unless it is absent or an empty directory."""
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise GalleryError(f"{p} exists and is not an empty directory; a gallery needs a directory of its own")


def new_manifest(fmt: str, version: int, fingerprint: str, dim: int, storage: str, **fields: Any) -> dict[str, Any]:
    """The manifest of a new gallery (single or sharded): format, model, storage, ``fields``, creation time,
    zsbir version and a fresh uuid."""
    from zsbir_infer import __version__

    return {
        "format": fmt,
        "format_version": version,
        "fingerprint": fingerprint,
        "dim": int(dim),
        "metric": "hamming" if storage == "itq" else "ip",
        "storage": storage,
        **fields,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "zsbir_version": __version__,
        "uuid": uuid.uuid4().hex,
    }


def require_keys(manifest: dict[str, Any], keys: Iterable[str], mpath: Path) -> None:
    """Raise :class:`GalleryError` naming the first of ``keys`` that the manifest at ``mpath`` lacks."""
    for key in keys:
        if key not in manifest:
            raise GalleryError(f"{mpath} lacks the '{key}' entry")


class FolderAppeared(Exception):
    """:func:`build_folder` could not rename its folder into place: something appeared at the target."""


def build_folder(p: Path, build: Callable[[Path], None]) -> None:
    """Make the new gallery folder ``p`` with ``build(folder)``: in a temporary sibling folder, renamed into place,
    so the gallery appears whole or not at all and two creations at once cannot mix their files (the second
    rename fails: not empty; :class:`FolderAppeared`). Where ``p`` is a mount point (a volume mounted as the
    gallery folder) it is built in place, ``build`` writing its manifest last (``zsbir index`` serializes
    creations with a lock on the parent folder)."""
    parent = p.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{creating_prefix(p.name)}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, p)  # replaces p only when it is an empty directory
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EBUSY) and p.is_dir() and not any(p.iterdir()):
                shutil.rmtree(tmp, ignore_errors=True)
                build(p)
                return
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise FolderAppeared(str(p)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (``BEGIN IMMEDIATE``: the database lock is taken at once), committed when the block
    ends, rolled back when it raises (a Ctrl-C included)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def _rollback(con: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any: an interrupt (Ctrl-C) can land after COMMIT has already ended
    it, and a ROLLBACK then would raise and hide the interrupt."""
    if con.in_transaction:
        con.execute("ROLLBACK")


_F = TypeVar("_F", bound=Callable[..., Any])
log = logging.getLogger("zsbir.gallery")

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _guarded(fn: _F) -> _F:
    """Turn SQLite errors and a full disk into a :class:`GalleryError` that says what to do."""

    @functools.wraps(fn)
    def wrapper(self: Gallery, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self._catalog_error(e) from None
        except OSError as e:
            if e.errno in _DISK_FULL_ERRNOS:
                raise self._disk_full(e) from None
            raise

    return cast(_F, wrapper)


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    """What identifies a file's current version cheaply: (device, inode, size, mtime); None when absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ModelMismatchError(GalleryError):
    """The gallery was built with a different model than the one used to query or extend it."""

    def __init__(self, path: Path, gallery_fingerprint: str, model_fingerprint: str) -> None:
        self.path = path
        self.gallery_fingerprint = gallery_fingerprint
        self.model_fingerprint = model_fingerprint
        super().__init__(
            f"gallery {path} was built with model fingerprint {gallery_fingerprint}, but the model in use has "
            f"fingerprint {model_fingerprint}; embeddings of different models are not comparable. Pass the model "
            f"the gallery was built with, or re-index the photos into a new gallery with this model."
        )


@dataclass(frozen=True)
class FileStat:
    """What the indexer knows about a file before reading it: path relative to the indexed root, size, mtime."""

    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FileRecord:
    """A file whose embedding is being added; ``sha256`` is the hex digest of its content (optional)."""

    relpath: str
    size: int
    mtime_ns: int
    sha256: str | None = None


@dataclass(frozen=True)
class Plan:
    """What an indexing run has to do (see ``Gallery._plan``).

    Attributes:
        new: files the gallery does not know (or knew only as deleted).
        changed: files whose size or mtime differ from what the gallery recorded.
        unchanged: relative paths the gallery already has (indexed or skipped) with the same size and mtime.
        deleted: relative paths the gallery has (indexed or skipped) that are not in the listing.
        retry: with ``plan(..., retry_skipped=True)``: ``(file, previous reason)`` of the skipped files whose
            size and mtime did not change (they are then not in ``unchanged``): a file unreadable once
            (permissions, a disk error, a file being written) is tried again by the next run.
    """

    new: list[FileStat] = field(default_factory=list)
    changed: list[FileStat] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    retry: list[tuple[FileStat, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    """One search result, the one result type of zsbir (re-exported by :mod:`zsbir_infer.retriever` and
    :mod:`zsbir_infer`).

    ``relpath`` is the file's path below the indexed photo folder (``/``-separated). ``path`` is the path to
    show or open: :meth:`zsbir_infer.Retriever.search` makes it absolute when the gallery knows its photo
    folder; :meth:`Gallery.search` and :meth:`ShardedGallery.search` leave it equal to ``relpath``.
    ``score`` is the inner product of the query with the stored vector (cosine similarity, vectors being
    L2-normalized); for Hamming search over ITQ codes it is ``n_bits - 2 * hamming_distance``. ``id`` is the
    gallery row id, ``rank`` the 1-based position in the query's result list.
    """

    path: str
    relpath: str
    score: float
    id: int
    rank: int


@dataclass(frozen=True)
class GalleryStats:
    """Counts and sizes of a gallery (see :meth:`Gallery.stats`)."""

    path: str
    fingerprint: str
    dim: int
    metric: str
    storage: str
    format_version: int
    files_indexed: int
    files_skipped: int
    files_deleted: int
    rows: int
    dead_rows: int
    segments: int
    bytes_vectors: int
    bytes_total: int
    ann_vectors: int
    ann_stale: bool
    generation: int
    created: str
    uuid: str = ""
    #: ``"none"`` (ITQ), ``"missing"``, ``"current"`` or ``"stale"``: see :meth:`Gallery.ann_state`.
    ann_state: str = ""
    #: Rows the saved ANN index covers (0 when there is none).
    ann_rows: int = 0


def _to_db(relpath: str) -> str | bytes:
    """A path as stored in the catalog: text, or the raw bytes of a name that is not valid UTF-8 (held in
    ``str`` with surrogate escapes, as ``os.fsdecode`` gives it), so that every file name is kept losslessly."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return relpath.encode("utf-8", "surrogateescape")
    return relpath


def _from_db(value: str | bytes) -> str:
    """Inverse of :func:`_to_db`."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def display_path(path: str) -> str:
    """A path for printing: the bytes of a name that is not valid UTF-8 (surrogate escapes) shown as ``\\xNN``
    (``latin\\xe9.jpg``), so that any file name can be printed or written to a UTF-8 page."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return path


def _check_relpath(relpath: str) -> str:
    if not isinstance(relpath, str) or not relpath:
        raise GalleryError(f"a file path must be a non-empty string; got {relpath!r}")
    if "\\" in relpath or "\x00" in relpath:
        raise GalleryError(f"file paths use '/' separators and no NUL characters; got {relpath!r}")
    p = PurePosixPath(relpath)
    if p.is_absolute() or any(part in ("..", ".") for part in relpath.split("/")) or str(p) != relpath:
        raise GalleryError(
            f"file paths must be normalized and relative to the indexed root (like 'dir/a.jpg'); got {relpath!r}"
        )
    return relpath


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    # A fixed temporary name: an interrupted creation leaves "manifest.json.tmp" (see _CREATE_LEFTOVERS).
    atomic_write_json(path, obj, tmp=path.with_name(path.name + ".tmp"))


class _WriterLock:
    """Exclusive writer lock: a threading lock inside the process and ``flock`` across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def hold(self, blocking: bool = True) -> Iterator[bool]:
        if not self._thread_lock.acquire(blocking=blocking):
            yield False
            return
        try:
            lock = FileLock(self.path)
            if not lock.acquire(blocking):
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
        finally:
            self._thread_lock.release()


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    layout: int  # bumped by compact(): row ids of different layouts are unrelated
    rows: int
    segments: tuple[Segment, ...]
    blocks: tuple[Block, ...]
    seg_keys: tuple[tuple[int, int], ...]  # (segment number, rows) of each block
    dead: np.ndarray
    live: int = 0  # rows that are not tombstones


SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    relpath TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    status TEXT NOT NULL CHECK (status IN ('indexed', 'skipped', 'deleted')),
    reason TEXT,
    vec INTEGER UNIQUE,
    updated_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    seg INTEGER PRIMARY KEY,
    base INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    max_norm REAL NOT NULL,
    checksums TEXT
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


#: The public methods of :class:`Gallery` and :class:`~zsbir_infer.gallery.shards.ShardedGallery` (with ``len()``
#: and ``with``): what library users call.
PUBLIC_API = (
    "add",
    "build_index",
    "close",
    "compact",
    "create",
    "delete",
    "indexed",
    "open",
    "repair",
    "search",
    "skipped",
    "stats",
    "vectors",
    "verify",
)
#: The runtime's internal interface to a gallery, single or sharded (see :class:`Gallery`).
INTERNAL_API = (
    "_check_model",
    "_identity",
    "_live_count",
    "_load",
    "_plan",
    "_record_source",
    "_records",
    "_root",
    "_skip",
    "_skip_many",
    "_source",
    "_stored_rows",
)


class Gallery:
    """An on-disk, incrementally updatable collection of photo embeddings. Use :meth:`create` or :meth:`open`.

    Public surface (:data:`PUBLIC_API`, what library users call; ``tests/test_public_api.py`` pins it):

    - lifecycle: :meth:`create`, :meth:`open`, :meth:`close` (or ``with``);
    - writing (one writer at a time, each call one transaction): :meth:`add`, :meth:`delete`, :meth:`compact`,
      :meth:`build_index`;
    - reading: :meth:`search`, :meth:`vectors`, :meth:`indexed`, :meth:`skipped`, ``len()``, :meth:`stats`;
    - checking: :meth:`verify`, :meth:`repair`.

    The runtime's own bookkeeping goes through methods with a leading underscore (:data:`INTERNAL_API`),
    which :class:`~zsbir_infer.gallery.shards.ShardedGallery` implements too; they are for the indexers, the
    retriever, ``zsbir serve`` and Triton, not for library users, and may change without notice:
    ``_plan`` / ``_skip`` / ``_skip_many`` / ``_records`` (incremental indexing), ``_source`` / ``_root`` /
    ``_record_source`` (what the gallery indexes), ``_check_model``, ``_load`` (map and checksum every
    segment now), and, for copies of the rows kept elsewhere (the retriever's GPU copy, ``zsbir serve``),
    ``_stored_rows`` (rows as stored), ``_identity`` (changes with every commit and when the folder is
    replaced) and ``_live_count`` (``len()`` without a table scan).

    Attributes:
        path: the gallery directory.
        manifest: the parsed ``manifest.json``.
        fingerprint: fingerprint of the model the gallery was built with.
        dim: embedding dimension.
        storage: ``"float16"``, ``"int8"`` or ``"itq"``.
        metric: ``"ip"`` (inner product of L2-normalized vectors) or ``"hamming"`` (ITQ storage).
        itq: the ITQ model (ITQ storage) or None; ``n_bits`` its code length (0 otherwise).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, _token: object = None, readonly: bool = False) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("use Gallery.create(...) or Gallery.open(...)")
        self.path = path
        #: True when opened read-only: nothing in the folder is ever written (searches, stats, vectors work).
        self.readonly = bool(readonly)
        self._immutable = False  # read-only and SQLite cannot even create its shared-memory file
        self.format_version = int(manifest["format_version"])
        #: Random identity given at creation: a gallery deleted and created again at the same path differs.
        self.uuid: str = str(manifest.get("uuid") or "")
        #: Format this gallery was upgraded from when this open upgraded it (else None).
        self.migrated_from: int | None = None
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.dim: int = int(manifest["dim"])
        self.storage: str = manifest["storage"]
        self.metric: str = manifest["metric"]
        self.segment_rows: int = int(manifest["segment_rows"])
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._ann_lock = threading.Lock()
        self._writer_lock = _WriterLock(path / LOCK_FILE)
        self._snapshot: _Snapshot | None = None
        self._ann: AnnIndex | None = None
        self._ann_key: tuple[int, int, int, int] | None = None  # stat of ann.json when self._ann was loaded
        self._closed = False
        self.itq: Any = None
        self.n_bits = 0
        if self.storage == "itq":
            from zsbir_infer.itq import ITQ

            try:
                self.itq = ITQ.load(path / ITQ_FILE)
            except (OSError, ValueError) as e:
                raise GalleryError(f"gallery {path} is damaged: cannot load its ITQ model ({e})") from e
            self.n_bits = int(self.itq.n_bits)
        self.codec: Codec = make_codec(self.storage, self.dim, self.itq)
        self._row_bytes = self.codec.parts
        self._segfiles = SegmentFiles(path, self._row_bytes)
        self._manifest_key = _stat_key(path / MANIFEST)
        self._identity_lock = threading.Lock()
        self._source_cache: tuple[dict[str, Any], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ identity

    def _check_identity(self) -> None:
        """Notice that the gallery folder now holds another gallery (deleted and created again: a new uuid)
        or none. One ``stat`` of the manifest per call; a replaced gallery of the same model, dimension and
        storage is reloaded (connections, maps, ANN index), any other is refused."""
        key = _stat_key(self.path / MANIFEST)
        if key == self._manifest_key:
            return
        with self._identity_lock:
            if key == self._manifest_key:
                return
            if key is None:
                raise GalleryError(
                    f"gallery {self.path} was deleted while open; index the photos again ('zsbir index') and reopen it"
                )
            try:
                manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise GalleryError(f"gallery {self.path} changed while open and cannot be read again ({e})") from e
            if str(manifest.get("uuid") or "") == self.uuid and self.uuid:
                self.manifest, self._manifest_key = manifest, key  # rewritten in place (upgrade, same gallery)
                return
            same = all(manifest.get(k) == self.manifest.get(k) for k in ("fingerprint", "dim", "storage", "metric"))
            if not same or manifest.get("format_version") not in READABLE_VERSIONS or manifest["storage"] == "itq":
                raise GalleryError(
                    f"gallery {self.path} was replaced by another gallery (model {manifest.get('fingerprint')}, "
                    f"storage {manifest.get('storage')}) while open; open it again"
                )
            log.info(
                "gallery %s was replaced by a new gallery (uuid %s): reloading it", self.path, manifest.get("uuid")
            )
            self._local = threading.local()  # every thread opens a connection to the new catalog
            with self._state_lock:
                self._snapshot = None
            with self._ann_lock:
                self._ann = None
            self._segfiles.forget()
            self.manifest, self._manifest_key = manifest, key
            self.uuid = str(manifest.get("uuid") or "")
            self.format_version = int(manifest["format_version"])
            self.segment_rows = int(manifest["segment_rows"])

    @property
    def _source(self) -> dict[str, Any]:
        """What the gallery indexes: ``{"root": ..., "model": ...}``, absolute paths where the gallery is now
        (``model`` None = the embedded default; a key is absent when unknown). Kept in the manifest (older
        galleries: in ``indexer.json``); see :mod:`zsbir_infer.gallery.source`. Follows a rewritten manifest."""
        self._check_identity()
        manifest, cached = self.manifest, self._source_cache
        if cached is None or cached[0] is not manifest:
            cached = (manifest, read_source(self.path, manifest))
            self._source_cache = cached
        return dict(cached[1])

    @property
    def _root(self) -> str | None:
        """The photo folder this gallery indexes (absolute), or None when unknown."""
        root = self._source.get("root")
        return root if isinstance(root, str) else None

    @_guarded
    def _record_source(self, root: str | os.PathLike[str], model: str | None) -> None:
        """Record the photo folder and the model bundle (None: the embedded default) in the manifest, relative to
        the gallery when inside or beside it (see :mod:`zsbir_infer.gallery.source`). A writer operation; the
        manifest is replaced atomically and open readers follow it."""
        block = make_source(self.path, Path(root), model)
        with self._writer().hold():
            self._check_identity()
            if self.manifest.get("source") == block:
                return
            manifest = {**self.manifest, "source": block}
            _write_json_atomic(self.path / MANIFEST, manifest)
            self._manifest_key = _stat_key(self.path / MANIFEST)
            self.manifest = manifest

    def _identity(self) -> tuple[str, int]:
        """``(uuid, generation)``: changes with every commit and when the gallery is replaced by another one
        (a copy of the gallery kept elsewhere, like the Retriever's GPU copy, is stale when this changes)."""
        self._check_identity()
        return self.uuid, self._generation(self._con())

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        fingerprint: str,
        dim: int,
        storage: str = "float16",
        *,
        itq: Any = None,
        segment_rows: int = DEFAULT_SEGMENT_ROWS,
        exist_ok: bool = False,
    ) -> Gallery:
        """Create an empty gallery directory.

        Args:
            path: the directory (created; must be absent or empty).
            fingerprint: the model's fingerprint (bundle manifest ``fingerprint``, CONTRACTS §6).
            dim: embedding dimension.
            storage: ``"float16"`` (default), ``"int8"`` (per-vector scale) or ``"itq"`` (binary codes only;
                searches are Hamming searches).
            itq: a fitted :class:`zsbir_infer.itq.ITQ` model, required for ``storage="itq"``.
            segment_rows: rows per segment file.
            exist_ok: if the directory already holds a gallery with the same fingerprint, dimension and
                storage, open it instead of failing.

        Raises:
            GalleryError: on bad arguments or a non-empty directory.
        """
        p = Path(path)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise GalleryError(f"fingerprint must be a non-empty string; got {fingerprint!r}")
        if not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise GalleryError(f"dim must be a positive integer; got {dim!r}")
        if storage not in STORAGES:
            raise GalleryError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}")
        if not isinstance(segment_rows, (int, np.integer)) or int(segment_rows) < 1:
            raise GalleryError(f"segment_rows must be a positive integer; got {segment_rows!r}")
        if storage == "itq":
            if itq is None or not hasattr(itq, "transform") or not hasattr(itq, "save"):
                raise GalleryError("storage='itq' needs a fitted ITQ model: Gallery.create(..., itq=ITQ.fit(vectors))")
            if int(itq.dim) != int(dim):
                raise GalleryError(f"the ITQ model expects dimension {itq.dim}, but the gallery has dimension {dim}")
        elif itq is not None:
            raise GalleryError(f"an ITQ model is only used with storage='itq' (got storage={storage!r})")
        if (p / MANIFEST).exists():
            if exist_ok:
                g = cls.open(p, fingerprint=fingerprint)
                if g.dim != int(dim) or g.storage != storage:
                    g.close()
                    raise GalleryError(
                        f"{p} already holds a gallery with dim={g.dim}, storage={g.storage}; asked for dim={dim}, "
                        f"storage={storage}"
                    )
                return g
            raise GalleryError(f"{p} already holds a gallery; open it with Gallery.open or choose another directory")
        check_new_folder(p)
        manifest = new_manifest(
            FORMAT,
            FORMAT_VERSION,
            fingerprint,
            dim,
            storage,
            normalized=True,
            segment_rows=int(segment_rows),
            itq={"file": ITQ_FILE, "n_bits": int(itq.n_bits)} if storage == "itq" else None,
        )

        def build(d: Path) -> None:
            (d / SEGMENT_DIR).mkdir()
            if storage == "itq":
                itq.save(d / ITQ_FILE)
            con = sqlite3.connect(d / DATABASE)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
                con.execute("INSERT OR IGNORE INTO state(key, value) VALUES ('generation', 0)")
                con.commit()
            finally:
                con.close()
            _write_json_atomic(d / MANIFEST, manifest)  # last: a folder without it is not a gallery yet
            _fsync_dir(d)

        try:
            build_folder(p, build)
        except FolderAppeared:
            if exist_ok and (p / MANIFEST).exists():  # another process created it first
                return cls.create(p, fingerprint, dim, storage, itq=itq, segment_rows=segment_rows, exist_ok=True)
            raise GalleryError(
                f"{p} appeared while this gallery was being created (another process?); open it with "
                "Gallery.open or choose another directory"
            ) from None
        return cls(p, manifest, _token=_CONSTRUCT)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], fingerprint: str | None = None, *, readonly: bool | None = None
    ) -> Gallery:
        """Open an existing gallery.

        Args:
            path: the gallery directory.
            fingerprint: if given, the fingerprint of the model that will query or extend the gallery;
                a different one raises :class:`ModelMismatchError`.
            readonly: True opens the gallery for reading only (SQLite ``mode=ro``; searches, stats and
                :meth:`vectors` work on a read-only volume, a shipped gallery or another user's folder, and
                nothing is ever written); False requires write access; None (default) opens read-only
                when the folder or its database is not writable.

        Raises:
            GalleryError: if the directory is not a readable gallery of a supported version.
            ModelMismatchError: on a fingerprint mismatch.
        """
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.exists():
            raise GalleryError(f"{p} is not a gallery (no {MANIFEST}); create one with Gallery.create / 'zsbir index'")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GalleryError(f"cannot read {mpath}: {e}") from e
        if isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT:
            raise GalleryError(
                f"{p} is a sharded gallery (one gallery per shard); open it with zsbir_infer.gallery.open_gallery"
            )
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GalleryError(f"{mpath} is not a zsbir gallery manifest")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise GalleryError(
                f"{p} has gallery format version {manifest.get('format_version')}; this zsbir reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade zsbir, or re-index the photos with this version."
            )
        require_keys(manifest, ("fingerprint", "dim", "storage", "metric", "segment_rows"), mpath)
        if manifest["storage"] not in STORAGES:
            raise GalleryError(f"{mpath}: unknown storage {manifest['storage']!r}")
        if not (p / DATABASE).exists():
            raise GalleryError(f"{p} is damaged: {DATABASE} is missing")
        writable = os.access(p, os.W_OK) and os.access(p / DATABASE, os.W_OK)
        if readonly is None:
            readonly = not writable
        elif not readonly and not writable:
            raise GalleryError(
                f"cannot write to gallery {p} (the folder or its {DATABASE} is read-only); queries and 'zsbir info' "
                "work read-only, but indexing needs write access: copy the gallery somewhere writable"
            )
        g = cls(p, manifest, _token=_CONSTRUCT, readonly=readonly)
        try:
            g._probe()
            if g.format_version < FORMAT_VERSION and not g.readonly:
                g._upgrade()
            if fingerprint is not None:
                g._check_model(fingerprint)
        except BaseException:
            g.close()
            raise
        return g

    @_guarded
    def _probe(self) -> None:
        """Read the catalog's tables once, so that a damaged meta.sqlite is reported on open."""
        con = self._con()
        self._generation(con)
        con.execute("SELECT seg FROM segments LIMIT 1").fetchall()
        con.execute("SELECT relpath FROM files LIMIT 1").fetchall()

    def _catalog_error(self, e: sqlite3.DatabaseError) -> GalleryError:
        msg = str(e)
        low = msg.lower()
        if "full" in low:
            return self._disk_full(e)
        if "locked" in low or "busy" in low:
            return GalleryError(f"gallery {self.path} is busy ({msg}): another process holds its database; retry")
        if "readonly" in low or "read-only" in low:
            return GalleryError(
                f"cannot write to gallery {self.path} ({msg}); it is read-only: queries work, indexing needs "
                "write access"
            )
        return GalleryError(
            f"gallery {self.path} is damaged: its catalog {DATABASE} cannot be used ({msg}; PRAGMA quick_check: "
            f"{self._quick_check()}). The list of photos cannot be rebuilt from the vectors: restore the gallery "
            f"from a backup, or index the photos again into a new gallery ('zsbir index PHOTOS -o NEW_GALLERY')"
        )

    def _disk_full(self, e: BaseException) -> GalleryError:
        return GalleryError(
            f"the disk holding gallery {self.path} is full ({getattr(e, 'strerror', None) or e}); nothing of the "
            "batch being written was committed and the gallery is intact: free some space and rerun (indexing "
            "continues where it stopped)"
        )

    def _quick_check(self) -> str:
        """``PRAGMA quick_check`` of the catalog on a fresh read-only connection, as one line."""
        uri = "file:" + urllib.parse.quote(os.fspath((self.path / DATABASE).absolute())) + "?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=5.0)
            try:
                lines = [str(r[0]) for r in con.execute("PRAGMA quick_check(20)")]
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            return f"cannot run it: {e}"
        return "; ".join(lines)

    def _upgrade(self) -> None:
        """Upgrade a format-1 gallery in place: checksums of the committed vectors, an identity. The catalog
        changes in one transaction, then the manifest is replaced atomically (a crash in between leaves a
        format-1 gallery that the next writer upgrades again)."""
        with self._writer().hold():
            con = self._con()
            cols = {str(r[1]) for r in con.execute("PRAGMA table_info(segments)")}
            segments = self._read_segments(con, checksums=False)
            sums = {}
            for sg in segments:
                sums[sg.seg] = {
                    suffix: crc_file(self._segfiles.path(sg.seg, suffix), 0, self._segfiles.nbytes(sg.rows, i))
                    for i, (suffix, _, _) in enumerate(self._row_bytes)
                }
            with _transaction(con):
                if "checksums" not in cols:
                    con.execute("ALTER TABLE segments ADD COLUMN checksums TEXT")
                con.executemany(
                    "UPDATE segments SET checksums = ? WHERE seg = ?",
                    [(json.dumps(v, sort_keys=True), seg) for seg, v in sums.items()],
                )
            manifest = {**self.manifest, "format_version": FORMAT_VERSION, "uuid": self.uuid or uuid.uuid4().hex}
            _write_json_atomic(self.path / MANIFEST, manifest)
            self._manifest_key = _stat_key(self.path / MANIFEST)
            self.migrated_from, self.format_version = self.format_version, FORMAT_VERSION
            self.manifest, self.uuid = manifest, str(manifest["uuid"])
            with self._state_lock:
                self._snapshot = None

    def _check_model(self, fingerprint: str) -> None:
        """Raise :class:`ModelMismatchError` unless ``fingerprint`` is the one the gallery was built with."""
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(self.path, self.fingerprint, fingerprint)

    def close(self) -> None:
        """Close the database connections and drop the memory maps (searches in flight finish first)."""
        with self._conns_lock:
            for con in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
            self._conns.clear()
        self._local = threading.local()
        with self._state_lock:
            self._snapshot = None
        with self._ann_lock:
            self._ann = None
        self._closed = True

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, storage={self.storage!r}, dim={self.dim}, fp={self.fingerprint!r})"

    # ------------------------------------------------------------------ plumbing

    def _writer(self) -> _WriterLock:
        if self.readonly:
            raise GalleryError(
                f"gallery {self.path} is opened read-only; open it with Gallery.open(path, readonly=False) to change it"
            )
        return self._writer_lock

    def _connect(self) -> sqlite3.Connection:
        db = self.path / DATABASE
        if not self.readonly:
            return sqlite3.connect(db, timeout=60.0, isolation_level=None, check_same_thread=False)
        uri = (
            "file:" + urllib.parse.quote(os.fspath(db.absolute())) + ("?immutable=1" if self._immutable else "?mode=ro")
        )
        con = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None, check_same_thread=False)
        if self._immutable:
            return con
        try:
            con.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()
        except sqlite3.OperationalError as e:
            con.close()
            if "readonly" not in str(e) and "unable to open" not in str(e):
                raise
            # A WAL database on a read-only folder without its -shm file: SQLite cannot share memory with
            # writers, and there can be none (nobody can write here), so read the file as it is.
            self._immutable = True
            return self._connect()
        return con

    def _con(self) -> sqlite3.Connection:
        if self._closed:
            raise GalleryError(f"gallery {self.path} is closed")
        self._check_identity()
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            # The journal mode (WAL) is a property of the file, set once by create(): a reader never sets it.
            con.execute("PRAGMA busy_timeout=60000")
            if not self.readonly:
                con.execute("PRAGMA synchronous=FULL")
            self._local.con = con
            with self._conns_lock:
                self._conns.append(con)
        return con

    def _read_segments(self, con: sqlite3.Connection, *, checksums: bool = True) -> list[Segment]:
        if not checksums or self.format_version < 2:
            rows = con.execute("SELECT seg, base, rows, max_norm FROM segments ORDER BY seg").fetchall()
            return [Segment(int(a), int(b), int(c), float(d)) for a, b, c, d in rows]
        out = []
        for a, b, c, d, e in con.execute("SELECT seg, base, rows, max_norm, checksums FROM segments ORDER BY seg"):
            try:
                sums = {str(k): int(v) for k, v in json.loads(e).items()} if e is not None else None
            except (ValueError, TypeError, AttributeError):
                sums = {}  # unreadable: no file matches, reported as damage
            out.append(Segment(int(a), int(b), int(c), float(d), sums))
        return out

    def _generation(self, con: sqlite3.Connection) -> int:
        return self._state(con, "generation")

    @staticmethod
    def _state(con: sqlite3.Connection, key: str) -> int:
        row = con.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _snapshot_now(self) -> _Snapshot:
        """The committed state (segments mapped, tombstones), refreshed when another commit happened."""
        con = self._con()
        gen = self._generation(con)
        snap = self._snapshot
        if snap is not None and snap.generation == gen:
            return snap
        with self._state_lock:
            snap = self._snapshot
            if snap is not None and snap.generation == gen:
                return snap
            for attempt in range(3):
                try:
                    snap = self._load_snapshot(con, snap)
                    break
                except FileNotFoundError:
                    # A concurrent compact() replaced the segments between our read and our mapping.
                    if attempt == 2:
                        raise GalleryError(f"gallery {self.path} is damaged: a segment file is missing") from None
            assert snap is not None
            self._snapshot = snap
            return snap

    def _load_snapshot(self, con: sqlite3.Connection, prev_snap: _Snapshot | None, verify: bool = True) -> _Snapshot:
        con.execute("BEGIN")
        try:
            gen = self._generation(con)
            layout = self._state(con, "layout")
            segments = self._read_segments(con)
            cur = con.execute("SELECT vec FROM files WHERE vec IS NOT NULL")
            live = np.array([r[0] for r in cur], dtype=np.int64)
        finally:
            con.execute("COMMIT")
        total = sum(s.rows for s in segments)
        dead = np.ones(total, dtype=bool)
        if live.size:
            dead[live] = False
        old: dict[tuple[int, int], Block] = {}
        if prev_snap is not None and prev_snap.layout == layout:  # segment numbers are reused across layouts
            old = dict(zip(prev_snap.seg_keys, prev_snap.blocks, strict=True))
        blocks, keys = [], []
        for s in segments:
            if s.rows == 0:
                continue
            prev = old.get((s.seg, s.rows))
            if prev is not None:
                arrays = (prev.data, prev.scale)
            elif verify:
                arrays = self._segfiles.map(s, layout)
            else:  # verify() and repair(): a damaged segment is left out (they check it themselves)
                try:
                    arrays = self._segfiles.map(s, layout, verify=False)
                except (SegmentDamagedError, FileNotFoundError):
                    continue
            blocks.append(
                Block(
                    base=s.base,
                    data=arrays[0],
                    scale=arrays[1],
                    dead=dead[s.base : s.base + s.rows],
                    norm_bound=s.max_norm * (1 + 1e-3) + 1e-6,
                )
            )
            keys.append((s.seg, s.rows))
        return _Snapshot(gen, layout, total, tuple(segments), tuple(blocks), tuple(keys), dead, int(live.size))

    # ------------------------------------------------------------------ incremental bookkeeping

    @_guarded
    def _plan(self, files: Iterable[FileStat | tuple[str, int, int]], *, retry_skipped: bool = False) -> Plan:
        """Compare a listing of the indexed root with what the gallery recorded.

        Args:
            files: every file currently under the root, as :class:`FileStat` or ``(relpath, size, mtime_ns)``.
            retry_skipped: list skipped files whose size and mtime stay the same in ``Plan.retry`` (to be
                tried again: ``zsbir index`` does) instead of counting them as unchanged.

        Returns:
            A :class:`Plan`. Without ``retry_skipped``, skipped files count as unchanged while their size and
            mtime stay the same; files recorded as deleted count as new.
        """
        listing: dict[str, FileStat] = {}
        for f in files:
            st = f if isinstance(f, FileStat) else FileStat(*f)
            _check_relpath(st.relpath)
            if st.relpath in listing:
                raise GalleryError(f"the listing names {st.relpath!r} twice")
            listing[st.relpath] = FileStat(st.relpath, int(st.size), int(st.mtime_ns))
        known: dict[str, tuple[int, int, str, str]] = {}
        for relpath, size, mtime, status, reason in self._con().execute(
            "SELECT relpath, size, mtime_ns, status, reason FROM files WHERE status != 'deleted'"
        ):
            known[_from_db(relpath)] = (int(size), int(mtime), status, str(reason or ""))
        new, changed, unchanged, retry = [], [], [], []
        for rel, st in listing.items():
            k = known.get(rel)
            if k is None:
                new.append(st)
            elif (k[0], k[1]) == (st.size, st.mtime_ns):
                if retry_skipped and k[2] == "skipped":
                    retry.append((st, k[3]))
                else:
                    unchanged.append(rel)
            else:
                changed.append(st)
        deleted = sorted(rel for rel in known if rel not in listing)
        return Plan(new=new, changed=changed, unchanged=unchanged, deleted=deleted, retry=retry)

    def _check_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape != (n, self.dim):
            raise GalleryError(f"expected vectors of shape ({n}, {self.dim}) (one per record); got {v.shape}")
        if not np.issubdtype(v.dtype, np.floating):
            raise GalleryError(f"vectors must be floating point; got dtype {v.dtype}")
        v = v.astype(np.float32, copy=False)
        if not np.isfinite(v).all():
            bad = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
            raise GalleryError(f"vector {bad} contains NaN or infinity")
        if n:
            norms = np.linalg.norm(v, axis=1)
            off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
            if off.size:
                i = int(off[0])
                raise GalleryError(
                    f"vectors must be L2-normalized (the gallery's metric is the inner product); vector {i} has norm "
                    f"{norms[i]:.4f}. Normalize with v / np.linalg.norm(v, axis=1, keepdims=True)."
                )
        return v

    @_guarded
    def add(self, records: Sequence[FileRecord], vectors: np.ndarray) -> list[int]:
        """Add (or replace) files and their embeddings as one atomic batch.

        The vectors are appended to the segment files and fsynced first; the metadata rows that point at
        them are committed afterwards in one SQLite transaction. Until that commit nothing of the batch is
        visible, and after a crash the appended bytes are ignored and overwritten by the next ``add``.
        A record whose path the gallery already has replaces it (the old row becomes a tombstone).

        Args:
            records: one :class:`FileRecord` per vector; paths relative to the indexed root, no duplicates.
            vectors: (len(records), dim) L2-normalized float embeddings.

        Returns:
            The row ids given to the records, in order.

        Raises:
            GalleryError: on bad records or vectors (nothing is written then).
        """
        recs = list(records)
        seen: set[str] = set()
        for r in recs:
            if not isinstance(r, FileRecord):
                raise GalleryError(f"records must be FileRecord objects; got {type(r).__name__}")
            _check_relpath(r.relpath)
            if r.relpath in seen:
                raise GalleryError(f"the batch names {r.relpath!r} twice")
            seen.add(r.relpath)
        v = self._check_vectors(vectors, len(recs))
        if not recs:
            return []
        arrays, max_norm = self.codec.encode(v)
        with self._writer().hold():
            con = self._con()
            segments = self._read_segments(con)
            total = sum(s.rows for s in segments)
            last = segments[-1] if segments else None
            # Split the batch over the last segment's free room and new segments.
            pieces: list[tuple[Segment, int, int, bool]] = []  # (segment, batch start, batch stop, is new)
            pos = 0
            n = len(recs)
            if last is not None and last.rows < self.segment_rows:
                take = min(n, self.segment_rows - last.rows)
                pieces.append((last, 0, take, False))
                pos = take
            next_seg = (last.seg + 1) if last is not None else 0
            base = total + pos
            while pos < n:
                take = min(n - pos, self.segment_rows)
                pieces.append((Segment(next_seg, base, 0, 0.0), pos, pos + take, True))
                next_seg += 1
                base += take
                pos += take
            sums = [self._segfiles.append(seg, [arr[a:b] for arr in arrays]) for seg, a, b, _ in pieces]
            if any(is_new for *_, is_new in pieces):
                _fsync_dir(self.path / SEGMENT_DIR)
            ids = list(range(total, total + n))
            now = time.time_ns()
            rows = [
                (_to_db(r.relpath), int(r.size), int(r.mtime_ns), r.sha256, i, now)
                for r, i in zip(recs, ids, strict=True)
            ]
            with _transaction(con):
                for (seg, a, b, is_new), crcs in zip(pieces, sums, strict=True):
                    if is_new:
                        con.execute(
                            "INSERT INTO segments(seg, base, rows, max_norm, checksums) VALUES (?, ?, ?, ?, ?)",
                            (seg.seg, seg.base, b - a, max_norm, json.dumps(crcs, sort_keys=True)),
                        )
                    else:
                        con.execute(
                            "UPDATE segments SET rows = rows + ?, max_norm = MAX(max_norm, ?), checksums = ? "
                            "WHERE seg = ?",
                            (b - a, max_norm, json.dumps(crcs, sort_keys=True), seg.seg),
                        )
                con.executemany(
                    "INSERT INTO files(relpath, size, mtime_ns, sha256, status, reason, vec, updated_ns) "
                    "VALUES (?, ?, ?, ?, 'indexed', NULL, ?, ?) "
                    "ON CONFLICT(relpath) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "sha256 = excluded.sha256, status = 'indexed', reason = NULL, vec = excluded.vec, "
                    "updated_ns = excluded.updated_ns",
                    rows,
                )
                con.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
        return ids

    def _skip(self, file: FileStat | FileRecord | str, reason: str) -> None:
        """Record that a file was not indexed and why (unreadable, not an image, ...).

        A skipped file has no vector (an earlier vector of the same path becomes a tombstone); ``_plan``
        reports it as unchanged until its size or mtime change. Pass a :class:`FileStat` for that: a bare
        path records no size/mtime, so the file is planned as changed (retried) on every run.
        """
        self._skip_many([(file, reason)])

    @_guarded
    def _skip_many(self, items: Iterable[tuple[FileStat | FileRecord | str, str]]) -> None:
        """``_skip`` for several ``(file, reason)`` pairs, recorded in one transaction (all or none)."""
        rows = []
        now = time.time_ns()
        for file, reason in items:
            if not isinstance(reason, str) or not reason:
                raise GalleryError("a skip needs a non-empty reason")
            if isinstance(file, str):
                rel, size, mtime, digest = file, -1, -1, None
            else:
                rel, size, mtime = file.relpath, int(file.size), int(file.mtime_ns)
                digest = file.sha256 if isinstance(file, FileRecord) else None
            _check_relpath(rel)
            rows.append((_to_db(rel), size, mtime, digest, reason, now))
        if not rows:
            return
        with self._writer().hold():
            con = self._con()
            with _transaction(con):
                con.executemany(
                    "INSERT INTO files(relpath, size, mtime_ns, sha256, status, reason, vec, updated_ns) "
                    "VALUES (?, ?, ?, ?, 'skipped', ?, NULL, ?) "
                    "ON CONFLICT(relpath) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "sha256 = excluded.sha256, status = 'skipped', reason = excluded.reason, vec = NULL, "
                    "updated_ns = excluded.updated_ns",
                    rows,
                )
                con.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")

    @_guarded
    def delete(self, relpaths: Iterable[str]) -> int:
        """Mark files as deleted (their vectors become tombstones, never returned by searches).

        Returns:
            How many of the paths were indexed or skipped before (unknown paths are ignored).
        """
        rels = [_check_relpath(r) for r in relpaths]
        if not rels:
            return 0
        with self._writer().hold():
            con = self._con()
            with _transaction(con):
                n = 0
                now = time.time_ns()
                for i in range(0, len(rels), 500):
                    chunk = [_to_db(r) for r in rels[i : i + 500]]
                    marks = ",".join("?" * len(chunk))
                    cur = con.execute(
                        f"UPDATE files SET status = 'deleted', vec = NULL, reason = NULL, updated_ns = ? "
                        f"WHERE status != 'deleted' AND relpath IN ({marks})",
                        (now, *chunk),
                    )
                    n += cur.rowcount
                if n:
                    con.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
        return n

    @_guarded
    def compact(self) -> int:
        """Rewrite the segments without tombstones; returns the number of rows dropped.

        Live rows keep their relative order but get new, dense ids (``Hit.id`` values from before a
        compaction are not valid after it). The new segments are written and fsynced under new file
        numbers first; one SQLite transaction then switches the metadata to them, so a crash at any
        point leaves either the old or the new layout. The ANN index (of float16/int8 galleries) is then
        rebuilt and saved when the gallery had one or holds :data:`~zsbir_infer.gallery.ann.ANN_MIN_ROWS`
        photos; until then searches are exhaustive. Concurrent searches (threads or processes) finish on the
        old files or restart on the new ones.
        """
        with self._writer().hold():
            had_ann = self.codec.ann and (self.path / ANN_META).exists()
            dropped = self._compact_locked(self._con(), None)
            if dropped and self.codec.ann and _ann_policy.builds_ann(self._snapshot_now().live, had_ann):
                self._save_ann_locked()
            return dropped

    def _compact_locked(self, con: sqlite3.Connection, snap: _Snapshot | None) -> int:
        """compact() with the writer lock held (repair() calls it too, with its own unverified snapshot)."""
        segments = self._read_segments(con)
        cur = con.execute("SELECT vec FROM files WHERE vec IS NOT NULL ORDER BY vec")
        live = np.array([r[0] for r in cur], dtype=np.int64)
        total = sum(sg.rows for sg in segments)
        self._segfiles.remove_stray({sg.seg for sg in segments})
        if live.size == total:
            return 0
        if snap is None:
            snap = self._snapshot_now()
        next_seg = (segments[-1].seg + 1) if segments else 0
        new_segments: list[Segment] = []
        for start in range(0, live.size, self.segment_rows):
            ids = live[start : start + self.segment_rows]
            seg = Segment(next_seg, start, 0, 0.0)
            parts = self._raw_rows(snap, ids)
            crcs = self._segfiles.append(seg, parts)
            new_segments.append(Segment(next_seg, start, ids.size, self.codec.stored_max_norm(parts), crcs))
            next_seg += 1
        _fsync_dir(self.path / SEGMENT_DIR)
        with _transaction(con):
            con.execute("DELETE FROM segments")
            con.executemany(
                "INSERT INTO segments(seg, base, rows, max_norm, checksums) VALUES (?, ?, ?, ?, ?)",
                [(sg.seg, sg.base, sg.rows, sg.max_norm, json.dumps(sg.checksums)) for sg in new_segments],
            )
            # Ascending old ids get ascending new ids <= old: no UNIQUE(vec) conflict along the way.
            con.executemany(
                "UPDATE files SET vec = ? WHERE vec = ?",
                [(int(i), int(old)) for i, old in enumerate(live) if i != old],
            )
            con.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
            con.execute(
                "INSERT INTO state(key, value) VALUES ('layout', 1) ON CONFLICT(key) DO UPDATE SET value = value + 1"
            )
        (self.path / ANN_META).unlink(missing_ok=True)  # it describes the old layout
        self._segfiles.remove_stray({sg.seg for sg in new_segments})
        return int(total - live.size)

    # ------------------------------------------------------------------ verification and repair

    def _catalog_path(self, value: str | bytes) -> str:
        """A path read from the catalog, checked to lie inside the photo folder before anyone shows or opens
        it: an edited catalog must not make ``zsbir query`` print, or ``--html`` embed, files elsewhere."""
        rel = _from_db(value)
        try:
            return _check_relpath(rel)
        except GalleryError:
            raise GalleryError(
                f"gallery {self.path} is damaged: its catalog holds the path {rel!r}, which does not lie inside the "
                "photo folder (the catalog was edited or damaged); check it with 'zsbir info --verify' and index the "
                "photos again into a new gallery"
            ) from None

    @_guarded
    def _load(self) -> None:
        """Map the committed vectors and verify their checksums now (else the first search does it).

        Raises:
            SegmentDamagedError: a segment file does not match its checksum (see :meth:`repair`).
        """
        self._snapshot_now()

    @_guarded
    def verify(self, full: bool = True) -> list[str]:
        """Check the whole gallery; returns the problems found (an empty list: healthy).

        Opening and searching already check each segment's checksum (cheaply: once per process, then only
        appended bytes). This also runs ``PRAGMA quick_check`` on the catalog, checks that every indexed file
        points at a stored row and has a path inside the photo folder, and (``full``) that every live vector
        is finite and of unit length (which also checks format-1 galleries, which have no checksums).
        """
        problems: list[str] = []
        qc = self._quick_check()
        if qc != "ok":
            return [f"{DATABASE}: PRAGMA quick_check: {qc}. {self._catalog_error(sqlite3.DatabaseError(qc))}"]
        con = self._con()
        snap = self._load_snapshot(con, None, verify=False)
        damaged: set[int] = set()
        for sg in snap.segments:
            err = self._segfiles.problem(sg)
            if err is not None:
                problems.append(str(err))
                damaged.add(sg.seg)
        bad_paths, bad_rows = [], []
        for rel, vec in con.execute("SELECT relpath, vec FROM files WHERE status = 'indexed'"):
            try:
                _check_relpath(_from_db(rel))
            except GalleryError:
                bad_paths.append(_from_db(rel))
            if vec is None or not 0 <= int(vec) < snap.rows:
                bad_rows.append(_from_db(rel))
        for rel in bad_paths[:5]:
            problems.append(f"{DATABASE}: the path {rel!r} does not lie inside the photo folder (edited catalog?)")
        for rel in bad_rows[:5]:
            problems.append(f"{DATABASE}: {rel!r} is indexed but points at no stored vector")
        if full and self.codec.unit_rows:
            blocks = {key[0]: b for key, b in zip(snap.seg_keys, snap.blocks, strict=True)}
            for sg in snap.segments:
                if sg.seg not in damaged and sg.seg in blocks:
                    problems.extend(self._row_problems(sg, blocks[sg.seg]))
        return problems

    def _row_problems(self, sg: Segment, b: Block) -> list[str]:
        out = []
        for start in range(0, b.data.shape[0], 1 << 16):
            stop = min(b.data.shape[0], start + (1 << 16))
            rows = np.asarray(b.data[start:stop], dtype=np.float32)
            if b.scale is not None:
                rows = rows * np.asarray(b.scale[start:stop])[:, None]
            norms = np.linalg.norm(rows, axis=1)
            live = np.ones(stop - start, dtype=bool) if b.dead is None else ~np.asarray(b.dead[start:stop])
            bad = np.flatnonzero(live & ~(np.abs(norms - 1.0) <= 0.05))  # NaN fails too
            if bad.size:
                i = int(bad[0])
                f = self._segfiles.path(sg.seg, self._row_bytes[0][0])
                out.append(
                    f"{SEGMENT_DIR}/{f.name}: {bad.size} live vector(s) are not of unit length (row "
                    f"{sg.base + start + i} has norm {norms[i]:.4g}): the file is damaged; rerun 'zsbir index' "
                    "after deleting the gallery, or restore it from a backup"
                )
                break
        return out

    @_guarded
    def repair(self) -> list[tuple[str, int]]:
        """Drop the photos stored in damaged segment files so that the next indexing run embeds them again.

        Every segment is checked in full; the files whose rows lie in a damaged one are marked deleted (the
        indexer sees them as new) and the segments are compacted without them, in the usual crash-safe way.

        Returns:
            ``(segment file name, photos dropped)`` for each damaged segment (empty when all are healthy).
        """
        with self._writer().hold():
            con = self._con()
            snap = self._load_snapshot(con, None, verify=False)
            damaged = [(sg, err) for sg in snap.segments if (err := self._segfiles.problem(sg)) is not None]
            if not damaged:
                return []
            out = []
            with _transaction(con):
                now = time.time_ns()
                for sg, err in damaged:
                    cur = con.execute(
                        "UPDATE files SET status = 'deleted', vec = NULL, reason = NULL, updated_ns = ? "
                        "WHERE vec >= ? AND vec < ?",
                        (now, sg.base, sg.base + sg.rows),
                    )
                    out.append((err.file.name, int(cur.rowcount)))
                con.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
            self._compact_locked(con, self._load_snapshot(con, None, verify=False))
            with self._state_lock:
                self._snapshot = None
            self._segfiles.forget()
            return out

    def _raw_rows(self, snap: _Snapshot, ids: np.ndarray) -> list[np.ndarray]:
        """The stored arrays (as on disk) of the given rows."""
        bases = np.array([b.base for b in snap.blocks], dtype=np.int64)
        which = np.searchsorted(bases, ids, side="right") - 1
        main = np.empty((ids.size, *snap.blocks[0].data.shape[1:]), dtype=snap.blocks[0].data.dtype)
        scale = np.empty(ids.size, dtype=np.float32) if len(self._row_bytes) > 1 else None
        for j in np.unique(which):
            sel = np.flatnonzero(which == j)
            b = snap.blocks[int(j)]
            local = ids[sel] - b.base
            main[sel] = b.data[local]
            if scale is not None and b.scale is not None:
                scale[sel] = b.scale[local]
        return [main] if scale is None else [main, scale]

    @_guarded
    def skipped(self) -> list[tuple[str, str]]:
        """(relpath, reason) of every skipped file, sorted by path."""
        cur = self._con().execute("SELECT relpath, reason FROM files WHERE status = 'skipped' ORDER BY relpath")
        return [(self._catalog_path(a), str(b)) for a, b in cur]

    @_guarded
    def _records(self) -> list[tuple[FileRecord, int]]:
        """Every indexed file as a :class:`FileRecord` (size, mtime, sha256) with its row id, in row order (what
        copying the gallery's live rows into another gallery needs: :func:`zsbir_infer.gallery.shards.merge_shards`)."""
        cur = self._con().execute(
            "SELECT relpath, size, mtime_ns, sha256, vec FROM files WHERE status = 'indexed' ORDER BY vec"
        )
        return [(FileRecord(self._catalog_path(a), int(b), int(c), d), int(v)) for a, b, c, d, v in cur]

    @_guarded
    def _skipped_records(self) -> list[tuple[FileStat, str]]:
        """Every skipped file as a :class:`FileStat` with its reason, sorted by path (for :func:`merge_shards`)."""
        cur = self._con().execute(
            "SELECT relpath, size, mtime_ns, reason FROM files WHERE status = 'skipped' ORDER BY relpath"
        )
        return [(FileStat(self._catalog_path(a), int(b), int(c)), str(r)) for a, b, c, r in cur]

    @_guarded
    def indexed(self) -> list[tuple[str, int]]:
        """(relpath, row id) of every indexed file, sorted by path."""
        cur = self._con().execute("SELECT relpath, vec FROM files WHERE status = 'indexed' ORDER BY relpath")
        return [(self._catalog_path(a), int(b)) for a, b in cur]

    @_guarded
    def _live_count(self) -> int:
        """Number of searchable rows (equal to ``len(self)``), from the cached snapshot: no table scan."""
        return self._snapshot_now().live

    @_guarded
    def __len__(self) -> int:
        """Number of indexed (searchable) files."""
        return int(self._con().execute("SELECT COUNT(*) FROM files WHERE status = 'indexed'").fetchone()[0])

    # ------------------------------------------------------------------ reading vectors

    @_guarded
    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored rows as float32 (dequantized for int8; packed uint8 codes for ITQ storage)."""
        snap = self._snapshot_now()
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= snap.rows):
            raise GalleryError(f"row ids must be in [0, {snap.rows}); got {idx.min()}..{idx.max()}")
        return self._gather(snap, idx)

    @_guarded
    def _stored_rows(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows exactly as stored: ``(rows, scales)`` with float16 rows, int8 rows plus their float32 per-row
        scales, or packed uint8 ITQ codes; ``scales`` is None except for int8 storage."""
        snap = self._snapshot_now()
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= snap.rows):
            raise GalleryError(f"row ids must be in [0, {snap.rows}); got {idx.min()}..{idx.max()}")
        parts = self._raw_rows(snap, idx)
        return parts[0], (parts[1] if len(parts) > 1 else None)

    def _gather(self, snap: _Snapshot, idx: np.ndarray) -> np.ndarray:
        out = np.empty((idx.size, self.codec.width), dtype=self.codec.decoded_dtype)
        bases = np.array([b.base for b in snap.blocks], dtype=np.int64)
        which = np.searchsorted(bases, idx, side="right") - 1
        for j in np.unique(which):
            sel = np.flatnonzero(which == j)
            b = snap.blocks[int(j)]
            local = idx[sel] - b.base
            out[sel] = self.codec.decode(b.data[local], None if b.scale is None else b.scale[local])
        return out

    def _read_float_rows(self, snap: _Snapshot) -> Callable[[int, int], np.ndarray]:
        def read(start: int, stop: int) -> np.ndarray:
            return self._gather(snap, np.arange(start, stop, dtype=np.int64))

        return read

    # ------------------------------------------------------------------ search

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise GalleryError(f"queries must have shape (Q, {self.dim}) or ({self.dim},); got {np.shape(queries)}")
        if not np.issubdtype(q.dtype, np.floating):
            raise GalleryError(f"queries must be floating point; got dtype {q.dtype}")
        q = q.astype(np.float32, copy=False)
        if not np.isfinite(q).all():
            raise GalleryError("queries contain NaN or infinity")
        return q

    @_guarded
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        exact: bool = False,
        *,
        fingerprint: str | None = None,
        threads: int | None = None,
    ) -> list[list[Hit]]:
        """Find the ``k`` best files for each query.

        Args:
            queries: (Q, dim) or (dim,) L2-normalized query embeddings (sketches).
            k: results per query.
            exact: True for an exhaustive search; False (default) uses the usearch HNSW index saved in the
                gallery when there is one (:meth:`build_index`, run by ``zsbir index`` and by :meth:`compact`).
                A search never writes: rows added since the index was saved are added to it in memory
                only, and without a saved index (or one that covers less than half of the rows) the search
                is exhaustive. Candidates of the ANN search are rescored exactly, so scores are identical to
                the exact search's for the same rows. ITQ galleries always run an exhaustive Hamming search
                (it reads 8 bytes per photo).
            fingerprint: the query model's fingerprint; a mismatch raises :class:`ModelMismatchError`.
            threads: CPU threads for this search (default: all available).

        Returns:
            One list of :class:`Hit` per query, best first (higher score, then smaller id); shorter than
            ``k`` when the gallery holds fewer files.
        """
        if fingerprint is not None:
            self._check_model(fingerprint)
        if not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise GalleryError(f"k must be a positive integer; got {k!r}")
        k = int(k)
        q = self._check_queries(queries)
        asked = k
        for _ in range(5):
            snap = self._snapshot_now()
            if snap.live == 0:
                return [[] for _ in range(q.shape[0])]
            k = min(asked, snap.live)  # results (and their buffers) for at most every live photo
            found = None if exact or not self.codec.ann else self._search_ann(snap, q, k, threads)
            if found is None:  # asked for, ITQ, or no usable saved ANN index
                scores, ids = search_blocks(snap.blocks, self.codec.scorer(q), k, threads=threads)
            else:
                scores, ids = found
            hits = self._hits(scores, ids, snap.layout)
            if hits is not None:
                return hits
            # A compact() renumbered the rows while we searched: search the new layout.
        raise GalleryError(f"gallery {self.path} keeps being compacted while searched; try again")

    def _search_ann(
        self, snap: _Snapshot, q: np.ndarray, k: int, threads: int | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """ANN candidates rescored exactly; None when there is no usable saved index (search exhaustively)."""
        with self._ann_lock:
            ann = self._usable_ann(snap)
            if ann is None:
                return None
            cands = ann.search(q, k, threads=0 if threads is None else int(threads))
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), ID_SENTINEL, dtype=np.int64)
        # Rescore with the exact search's own code so that both modes report identical scores.
        scorer: Scorer = self.codec.scorer(q)
        bases = np.array([b.base for b in snap.blocks], dtype=np.int64)
        for i, c in enumerate(cands):
            c = c[(c >= 0) & (c < snap.rows)]
            c = c[~snap.dead[c]]
            if c.size == 0:
                continue
            s = np.empty(c.size, dtype=np.float32)
            which = np.searchsorted(bases, c, side="right") - 1
            for j in np.unique(which):
                sel = np.flatnonzero(which == j)
                b = snap.blocks[int(j)]
                s[sel] = scorer.rescore(b, c[sel] - b.base, np.full(sel.size, i))
            order = np.lexsort((c, -s))[:k]
            scores[i, : order.size] = s[order]
            ids[i, : order.size] = c[order]
        return scores, ids

    def _ann_identity(self, layout: int) -> dict[str, Any]:
        return {"storage": self.storage, "fingerprint": self.fingerprint, "layout": layout}

    def _loaded_ann(self, snap: _Snapshot) -> AnnIndex:
        """The saved index of ``snap``'s layout as last loaded (reloaded when another process saved a new one);
        its ``size`` is 0 when none is saved. Call with ``_ann_lock`` held. Reads only."""
        key = _stat_key(self.path / ANN_META)
        ann = self._ann
        if ann is None or ann.identity["layout"] != snap.layout or key != self._ann_key:
            ann = AnnIndex(self.path, self.dim, self._ann_identity(snap.layout))
            ann.load()
            self._ann, self._ann_key = ann, key
        return ann

    def _usable_ann(self, snap: _Snapshot) -> AnnIndex | None:
        """The saved index brought up to date with ``snap`` in memory (never saved: a read never writes), or
        None when no index is saved or it covers less than half of the rows (then an exhaustive search is
        cheaper than building one in memory). Call with ``_ann_lock`` held."""
        ann = self._loaded_ann(snap)
        if not ann.loaded or 2 * ann.rows < snap.rows:
            return None
        if ann.rows > snap.rows:
            # Another thread already brought the index up to a newer snapshot; the caller filters the
            # candidates against its own snapshot.
            return ann
        if ann.rows != snap.rows or ann.dead_covered != int(np.count_nonzero(snap.dead[: ann.rows])):
            ann.sync(snap.rows, snap.dead, self._read_float_rows(snap))
        return ann

    def _save_ann_locked(self) -> int:
        """Build or update the ANN index of the current snapshot and save it (the writer lock is held)."""
        snap = self._snapshot_now()
        with self._ann_lock:
            ann = self._loaded_ann(snap)
            ann.sync(snap.rows, snap.dead, self._read_float_rows(snap))
            ann.save()
            self._ann_key = _stat_key(self.path / ANN_META)
            return ann.size

    @_guarded
    def build_index(self) -> int:
        """Build or update the ANN index now and save it in the gallery; returns the number of vectors in it.

        ``zsbir index`` calls it at the end of a run (see :data:`~zsbir_infer.gallery.ann.ANN_MIN_ROWS`) and
        :meth:`compact` rebuilds an index that existed; searches only read it.
        """
        if not self.codec.ann:
            raise GalleryError("ITQ galleries have no ANN index: their searches are exhaustive Hamming searches")
        with self._writer().hold():
            return self._save_ann_locked()

    def _hits(self, scores: np.ndarray, ids: np.ndarray, layout: int) -> list[list[Hit]] | None:
        """Hits with paths, or None when the row layout changed since the search's snapshot."""
        valid = (ids != ID_SENTINEL) & np.isfinite(scores)
        wanted = np.unique(ids[valid])
        paths: dict[int, str] = {}
        con = self._con()
        con.execute("BEGIN")
        try:
            if self._state(con, "layout") != layout:
                return None
            for i in range(0, wanted.size, 500):
                chunk = [int(x) for x in wanted[i : i + 500]]
                marks = ",".join("?" * len(chunk))
                for vec, rel in con.execute(f"SELECT vec, relpath FROM files WHERE vec IN ({marks})", chunk):
                    paths[int(vec)] = self._catalog_path(rel)
        finally:
            con.execute("COMMIT")
        out: list[list[Hit]] = []
        for qi in range(ids.shape[0]):
            row: list[Hit] = []
            for j in range(ids.shape[1]):
                if not valid[qi, j]:
                    break
                vid = int(ids[qi, j])
                rel_path = paths.get(vid)
                if rel_path is None:  # deleted by a commit after this search's snapshot
                    continue
                row.append(Hit(path=rel_path, relpath=rel_path, score=float(scores[qi, j]), id=vid, rank=len(row) + 1))
            out.append(row)
        return out

    # ------------------------------------------------------------------ description

    @_guarded
    def stats(self) -> GalleryStats:
        """Counts and sizes (files by status, rows, tombstones, bytes on disk, ANN coverage)."""
        snap = self._snapshot_now()
        con = self._con()
        counts = dict.fromkeys(("indexed", "skipped", "deleted"), 0)
        for status, n in con.execute("SELECT status, COUNT(*) FROM files GROUP BY status"):
            counts[str(status)] = int(n)
        seg_bytes = self._segfiles.total_bytes()
        total_bytes = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        desc = None
        if self.codec.ann:
            desc = AnnIndex(self.path, self.dim, self._ann_identity(snap.layout)).describe()
        ann_stale = self.codec.ann and (
            desc is None
            or desc["rows"] != snap.rows
            or desc["dead_covered"] != int(np.count_nonzero(snap.dead[: desc["rows"]]))
        )
        ann_state = "none" if not self.codec.ann else "missing" if desc is None else "stale" if ann_stale else "current"
        return GalleryStats(
            path=str(self.path),
            fingerprint=self.fingerprint,
            dim=self.dim,
            metric=self.metric,
            storage=self.storage,
            format_version=self.format_version,
            files_indexed=counts["indexed"],
            files_skipped=counts["skipped"],
            files_deleted=counts["deleted"],
            rows=snap.rows,
            dead_rows=int(np.count_nonzero(snap.dead)),
            segments=len(snap.segments),
            bytes_vectors=seg_bytes,
            bytes_total=total_bytes,
            ann_vectors=0 if desc is None else desc["size"],
            ann_stale=bool(ann_stale),
            generation=snap.generation,
            created=str(self.manifest.get("created", "")),
            uuid=self.uuid,
            ann_state=ann_state,
            ann_rows=0 if desc is None else desc["rows"],
        )


_CONSTRUCT = object()
