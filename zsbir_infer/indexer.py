"""The indexing pipeline: a folder of photos in, an up-to-date gallery out (``zsbir index`` is built on it).

    from zsbir_infer.encoder import Encoder
    from zsbir_infer.indexer import index_folder

    enc = Encoder.open(None)                                   # the embedded default model
    report = index_folder("photos", ".zsbir", enc)             # creates or updates the gallery
    print(report.indexed, report.unchanged, report.deleted, report.skip_counts())

What a run does:

1. **Walk** the root (:func:`walk`): regular files and symbolic links to files are listed; symbolic links that
   point outside the root are skipped (``outside-root``) unless ``follow_links``; symbolic links to
   directories are followed once (a link back to an ancestor is a loop, a second path to a directory
   already walked is a duplicate: both are skipped with a reason, never followed). Names starting with
   ``.`` are ignored (``.git``, ``.zsbir``, macOS ``._*`` files), and so is the gallery folder itself.
   Files with a name that holds a control character (newline, tab, ...) or a backslash are skipped with
   a reason; they are reported by every run and never stored in the gallery. Names that are not valid
   UTF-8 are indexed (stored losslessly as bytes, printed escaped: ``latin\\xe9.jpg``).
2. **Plan** with ``Gallery._plan``: compare (path, size, mtime) with the gallery. Only new and changed
   files are read; files gone from the folder are marked deleted; a file skipped before stays skipped
   until it changes.
3. **Decode** new and changed images on a thread pool (each file read once, hashed with SHA-256,
   decoded with reduced-size JPEG decoding and preprocessed into the batch buffer), a few batches
   ahead of the model, so decoding overlaps inference. A file that cannot be used is skipped with a
   reason: not an image, empty, too large (decompression bomb), truncated or corrupt, unreadable.
4. **Embed** each batch (domain ``photo``) and **commit** the embedded files to the gallery atomically
   (:meth:`Gallery.add`), every :data:`DEFAULT_COMMIT_FILES` files or :data:`DEFAULT_COMMIT_SECONDS`
   seconds (an fsync per model batch would cost a third of the time of a small model). A run killed at
   any moment leaves a gallery that opens; the next run sees the
   committed files as unchanged and indexes the rest, so every file ends up in the gallery exactly once.

The gallery records what it indexes in its manifest (:mod:`zsbir_infer.gallery.source`): the root (relative
to the gallery when the gallery lies inside or beside the photo folder, so that moving the whole tree keeps
it working; else absolute) and the model bundle used (``null`` for the embedded default); older galleries
kept them in ``indexer.json``, read as a fallback and moved by the next run. ``zsbir query`` uses them to
print full paths and to pick the same model; one gallery indexes one root (``zsbir index --root NEW``
re-points a gallery whose photos moved elsewhere). ``indexer.json`` (written atomically) keeps the summary
of the last run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat as stat_mod
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from zsbir_infer.errors import ZsbirError
from zsbir_infer.fsio import FileLock, atomic_write_json
from zsbir_infer.gallery.source import DEFAULT_GALLERY_DIRNAME as _DEFAULT_GALLERY_DIRNAME
from zsbir_infer.gallery.source import find_gallery
from zsbir_infer.prefetch import prefetch

if TYPE_CHECKING:
    from zsbir_infer.encoder import Encoder
    from zsbir_infer.gallery import Gallery, ShardedGallery
    from zsbir_infer.preprocess import PreprocessSpec

__all__ = [
    "DEFAULT_GALLERY_DIRNAME",
    "IMAGE_EXTENSIONS",
    "INDEXER_FILE",
    "MAX_FILE_BYTES",
    "IndexReport",
    "IndexingError",
    "Listing",
    "WalkEntry",
    "find_gallery",
    "index_folder",
    "open_or_create_gallery",
    "read_indexer_info",
    "walk",
]

#: Extensions (lower case) of the files the indexer tries to decode; everything else is "not an image".
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
#: Files larger than this are skipped without being read (no photo is that large).
MAX_FILE_BYTES = 256 * 1024 * 1024
#: The indexer's file in the gallery folder: the last run's report (older galleries: also the root and model).
INDEXER_FILE = "indexer.json"
#: Default gallery folder name, in the current directory (``zsbir query`` looks for it walking up).
DEFAULT_GALLERY_DIRNAME = _DEFAULT_GALLERY_DIRNAME  # re-exported from zsbir_infer.gallery.source
RUN_LOCK_FILE = ".index.lock"
#: A commit (one fsync + one SQLite transaction) happens every this many files ...
DEFAULT_COMMIT_FILES = 1024
#: ... or this many seconds, whichever comes first.
DEFAULT_COMMIT_SECONDS = 2.0

# Skip codes (the part of a reason before the first ": ").
SKIP_NOT_IMAGE = "not-an-image"
SKIP_EMPTY = "empty"
SKIP_TOO_LARGE = "too-large"
SKIP_TRUNCATED = "truncated"
SKIP_CORRUPT = "corrupt"
SKIP_UNREADABLE = "unreadable"
SKIP_SYMLINK_LOOP = "symlink-loop"
SKIP_BROKEN_LINK = "broken-symlink"
SKIP_DUPLICATE_DIR = "duplicate-directory"
SKIP_ODD_NAME = "odd-name"
SKIP_NOT_FILE = "not-a-regular-file"
SKIP_OUTSIDE = "outside-root"

_BAD_NAME_CHARS = frozenset([chr(c) for c in range(32)] + ["\x7f", "\x85", "\u2028", "\u2029", "\\"])


class ModelIdentity(Protocol):
    """What creating or opening a gallery needs of the model: an :class:`~zsbir_infer.encoder.Encoder` or a
    :class:`~zsbir_infer.bundle.Bundle` (the Ray indexer's driver opens only the bundle)."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def embedding_dim(self) -> int: ...


class IndexingError(ZsbirError, RuntimeError):
    """Indexing cannot start or continue (bad root, gallery of another root or model, run in progress)."""


# ---------------------------------------------------------------------------------------------- walking


@dataclass(frozen=True)
class WalkEntry:
    """One listed path below the root.

    ``relpath`` uses ``/`` separators; ``path`` is the filesystem path (bytes, so that any name works).
    ``skip`` is the reason the entry will not be embedded (decided without reading it), or ``None`` for
    a candidate image. ``stored`` is False for entries that cannot be recorded in the gallery (odd names).
    """

    relpath: str
    path: bytes
    size: int
    mtime_ns: int
    skip: str | None = None
    stored: bool = True


@dataclass
class Listing:
    """The result of :func:`walk`: entries to plan with, and skips that never reach the gallery."""

    entries: list[WalkEntry] = field(default_factory=list)
    unstored: list[tuple[str, str]] = field(default_factory=list)


def _reason(code: str, detail: str) -> str:
    return f"{code}: {detail}"


def _name_problem(name: bytes) -> tuple[str | None, str]:
    """(problem, name) of a directory entry name. A name that is not valid UTF-8 (old archives, other
    locales) is kept losslessly with surrogate escapes (as ``os.fsdecode`` does); the gallery stores its
    bytes and :func:`zsbir_infer.gallery.display_path` shows it escaped."""
    text = name.decode("utf-8", "surrogateescape")
    if any(c in _BAD_NAME_CHARS for c in text):
        shown = text.encode("unicode_escape").decode("ascii")
        return "the file name holds a control character (newline, tab, ...) or a backslash", shown
    return None, text


def walk(
    root: str | os.PathLike[str], *, exclude: Sequence[str | os.PathLike[str]] = (), follow_links: bool = False
) -> Listing:
    """List the files below ``root`` (see the module docstring for what is followed, ignored and skipped).

    Args:
        root: the folder to index.
        exclude: folders not to enter (the gallery itself, when it lies inside the root).
        follow_links: also follow symbolic links that point outside ``root`` (by default they are skipped
            with the reason ``outside-root``: ``ln -s / photos/x`` must not index the whole system).

    Raises:
        IndexingError: if ``root`` is not a readable directory.
    """
    root_p = Path(root)
    try:
        st_root = os.stat(root_p)
    except OSError as exc:
        raise IndexingError(f"cannot index {root_p}: {exc.strerror or exc}") from None
    if not stat_mod.S_ISDIR(st_root.st_mode):
        raise IndexingError(f"cannot index {root_p}: not a directory (give the folder that holds the photos)")
    excluded: set[tuple[int, int]] = set()
    for ex in exclude:
        with contextlib.suppress(OSError):
            s = os.stat(ex)
            excluded.add((s.st_dev, s.st_ino))
    out = Listing()
    real_root = os.path.realpath(os.fsencode(root_p))
    root_prefix = real_root.rstrip(b"/") + b"/"
    visited: set[tuple[int, int]] = {(st_root.st_dev, st_root.st_ino)}
    # Stack of (directory path, relative prefix, ancestors' (dev, ino)).
    stack: list[tuple[bytes, str, frozenset[tuple[int, int]]]] = [
        (os.fsencode(root_p), "", frozenset({(st_root.st_dev, st_root.st_ino)}))
    ]
    try:
        with os.scandir(stack[0][0]) as it:
            next(iter(it), None)
    except OSError as exc:
        raise IndexingError(f"cannot read {root_p}: {exc.strerror or exc}") from None
    while stack:
        dir_b, prefix, ancestors = stack.pop()
        try:
            with os.scandir(dir_b) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            rel = prefix.rstrip("/")
            if rel:
                out.entries.append(
                    WalkEntry(
                        rel, dir_b, -1, -1, _reason(SKIP_UNREADABLE, f"cannot read directory: {exc.strerror or exc}")
                    )
                )
            continue
        subdirs: list[tuple[bytes, str, frozenset[tuple[int, int]]]] = []
        for e in children:
            name_b: bytes = e.name
            if name_b.startswith(b"."):
                continue
            problem, shown = _name_problem(name_b)
            rel = prefix + shown
            if problem is not None:
                out.unstored.append((rel, _reason(SKIP_ODD_NAME, problem)))
                continue
            path_b: bytes = e.path
            try:
                is_link = e.is_symlink()
                lst = e.stat(follow_symlinks=False)
            except OSError as exc:
                out.entries.append(
                    WalkEntry(rel, path_b, -1, -1, _reason(SKIP_UNREADABLE, f"cannot stat: {exc.strerror or exc}"))
                )
                continue
            try:
                st = os.stat(path_b) if is_link else lst
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    why = _reason(SKIP_SYMLINK_LOOP, "the symbolic link points to itself (loop)")
                elif exc.errno == errno.ENOENT:
                    why = _reason(SKIP_BROKEN_LINK, "the symbolic link points to nothing")
                else:
                    why = _reason(SKIP_UNREADABLE, f"cannot stat: {exc.strerror or exc}")
                out.entries.append(WalkEntry(rel, path_b, lst.st_size, lst.st_mtime_ns, why))
                continue
            if is_link and not follow_links:
                target = os.path.realpath(path_b)
                if target != real_root and not target.startswith(root_prefix):
                    shown_target = target.decode("utf-8", "backslashreplace")
                    why = _reason(
                        SKIP_OUTSIDE,
                        f"the symbolic link points outside the indexed folder (to {shown_target}); "
                        "pass --follow-links to index what it points to",
                    )
                    out.entries.append(WalkEntry(rel, path_b, lst.st_size, lst.st_mtime_ns, why))
                    continue
            if stat_mod.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in excluded:
                    continue
                if key in ancestors:
                    why = _reason(SKIP_SYMLINK_LOOP, "the symbolic link points to a folder that contains it (loop)")
                    out.entries.append(WalkEntry(rel, path_b, lst.st_size, lst.st_mtime_ns, why))
                    continue
                if key in visited:
                    why = _reason(SKIP_DUPLICATE_DIR, "this folder is already indexed through another path")
                    out.entries.append(WalkEntry(rel, path_b, lst.st_size, lst.st_mtime_ns, why))
                    continue
                visited.add(key)
                subdirs.append((path_b, rel + "/", ancestors | {key}))
                continue
            if not stat_mod.S_ISREG(st.st_mode):
                out.entries.append(
                    WalkEntry(rel, path_b, 0, st.st_mtime_ns, _reason(SKIP_NOT_FILE, "not a regular file"))
                )
                continue
            ext = os.path.splitext(shown)[1].lower()
            skip = None
            if ext not in IMAGE_EXTENSIONS:
                skip = _reason(SKIP_NOT_IMAGE, f"extension {ext!r} is not an image type" if ext else "no extension")
            elif st.st_size == 0:
                skip = _reason(SKIP_EMPTY, "the file is empty (0 bytes)")
            elif st.st_size > MAX_FILE_BYTES:
                skip = _reason(SKIP_TOO_LARGE, f"{st.st_size} bytes (limit {MAX_FILE_BYTES})")
            out.entries.append(WalkEntry(rel, path_b, int(st.st_size), int(st.st_mtime_ns), skip))
        # Depth first, in name order.
        stack.extend(reversed(subdirs))
    return out


# --------------------------------------------------------------------------------------------- decoding


def _read_file(path: bytes) -> bytes:
    """Read a whole file, at most ``MAX_FILE_BYTES + 1`` bytes (a seam for tests that simulate unreadable files).

    The first read asks for the size ``fstat`` gives plus one byte: ``read(MAX_FILE_BYTES + 1)`` on a
    small file allocates (and maps) a 256 MiB buffer before shrinking it, which cost 0.04-0.1 ms of CPU
    per photo here (10-25% of decoding a 256 px JPEG for a 64 px model). A file that grew since the
    ``fstat`` is read on to the limit.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(min(size, MAX_FILE_BYTES) + 1)
        if len(data) > size and len(data) <= MAX_FILE_BYTES:  # grew after the fstat: read the rest
            data += fh.read(MAX_FILE_BYTES + 1 - len(data))
        return data


def _classify_decode_error(message: str) -> str:
    low = message.lower()
    if "too large" in low or "decompression" in low:
        return SKIP_TOO_LARGE
    if "truncated" in low:
        return SKIP_TRUNCATED
    if "not a recognised image" in low or "cannot identify" in low:
        return SKIP_NOT_IMAGE
    return SKIP_CORRUPT


def _prepare(entry: WalkEntry, spec: PreprocessSpec, out: np.ndarray) -> tuple[bool, str]:
    """Read, hash, decode and preprocess one file into ``out``: (True, sha256) or (False, skip reason)."""
    from zsbir_infer.preprocess import ImageDecodeError, preprocess_into

    try:
        data = _read_file(entry.path)
    except OSError as exc:
        return False, _reason(SKIP_UNREADABLE, f"cannot read: {exc.strerror or exc}")
    if not data:
        return False, _reason(SKIP_EMPTY, "the file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        return False, _reason(SKIP_TOO_LARGE, f"more than {MAX_FILE_BYTES} bytes")
    digest = hashlib.sha256(data).hexdigest()
    try:
        preprocess_into(data, spec, out)
    except ImageDecodeError as exc:
        msg = str(exc)
        if msg.startswith("<") and ": " in msg:  # "<N bytes>: why" -> "why"
            msg = msg.split(": ", 1)[1]
        return False, _reason(_classify_decode_error(msg), msg)
    except Exception as exc:  # a broken file must never stop the run
        return False, _reason(SKIP_CORRUPT, f"cannot decode image: {type(exc).__name__}: {exc}")
    return True, digest


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class IndexReport:
    """What one indexing run did (``zsbir index --json`` prints :meth:`to_dict`).

    ``read`` counts the image files this run read (new or changed, not skipped by name, type or size);
    ``indexed`` counts files embedded by this run (``read`` minus those that failed to decode);
    ``skipped`` lists ``(relpath, reason)`` of the files skipped by this run (reasons start with a code
    such as ``not-an-image:``); ``total_indexed`` / ``total_skipped`` are the gallery's counts afterwards.
    """

    root: str
    gallery: str
    fingerprint: str
    backend: str
    precision: str
    listed: int = 0
    new: int = 0
    changed: int = 0
    read: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    total_indexed: int = 0
    total_skipped: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def files_per_s(self) -> float:
        """Image files read (and embedded, unless broken) per second over the decode + embed phase."""
        return self.read / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def skip_counts(self) -> dict[str, int]:
        """Number of skipped files of this run per skip code."""
        return dict(sorted(Counter(r.split(":", 1)[0] for _, r in self.skipped).items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        d["skip_counts"] = self.skip_counts()
        d["files_per_s"] = round(self.files_per_s, 3)
        d["seconds"] = round(self.seconds, 3)
        d["embed_seconds"] = round(self.embed_seconds, 3)
        return d


def read_indexer_info(gallery: str | os.PathLike[str]) -> dict[str, Any]:
    """The gallery's ``indexer.json`` (the last run's report) merged with what the gallery indexes (``root``,
    ``model``: :func:`zsbir_infer.gallery.source.read_source`, absolute paths where the gallery is now), or
    ``{}`` when there is neither."""
    from zsbir_infer.gallery.source import read_legacy, read_source

    info = read_legacy(Path(gallery))
    info.update(read_source(gallery))
    return info


@contextlib.contextmanager
def _run_lock(gallery_dir: Path) -> Iterator[None]:
    lock = FileLock(gallery_dir / RUN_LOCK_FILE)
    try:
        held = lock.acquire(blocking=False)
    except OSError as exc:
        raise IndexingError(
            f"cannot write to gallery {gallery_dir} ({exc.strerror or exc}); queries and 'zsbir info' work on a "
            "read-only gallery, but indexing needs write access: copy it somewhere writable (or fix its permissions)"
        ) from None
    if not held:
        raise IndexingError(
            f"another 'zsbir index' is updating {gallery_dir}; wait for it to finish (or stop it) and rerun"
        )
    try:
        yield
    finally:
        lock.release()


#: What ``Gallery.create`` writes before its manifest (the manifest comes last): a folder holding only these
#: is a gallery whose creation was interrupted, and is cleared before creating it again.
_CREATE_LEFTOVERS = frozenset(
    {
        "segments",
        "meta.sqlite",
        "meta.sqlite-wal",
        "meta.sqlite-shm",
        "meta.sqlite-journal",
        "manifest.json.tmp",
        ".lock",
        "itq.npz",
    }
)


@contextlib.contextmanager
def _creation_lock(gallery_dir: Path) -> Iterator[None]:
    """Serialize the creation of ``gallery_dir`` (and the cleanup of an interrupted one) between processes:
    ``flock`` on its parent folder, which exists before the gallery does and needs no write access."""
    with FileLock(gallery_dir.parent, directory=True):
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clear_half_created(gallery_dir: Path) -> None:
    """Remove the leftovers of a ``Gallery.create`` killed before it finished (nothing else): temporary
    sibling folders of dead processes, and the files an older zsbir created in place before its manifest.
    Called with the creation lock held."""
    import shutil

    from zsbir_infer.gallery.store import creating_prefix

    prefix = creating_prefix(gallery_dir.name)
    with contextlib.suppress(OSError):
        for sib in gallery_dir.parent.iterdir():
            if not sib.name.startswith(prefix) or not sib.is_dir() or sib.is_symlink():
                continue
            pid = sib.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(sib, ignore_errors=True)
    if not gallery_dir.is_dir() or (gallery_dir / "manifest.json").exists():
        return
    names = {p.name for p in gallery_dir.iterdir()}
    if not names or not names <= _CREATE_LEFTOVERS:
        return
    seg = gallery_dir / "segments"
    if seg.is_dir() and any(seg.iterdir()):
        return  # segments hold data: not a bare creation, leave it to the user
    for name in names:
        p = gallery_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _ensure_gallery(gallery_dir: Path, encoder: ModelIdentity, storage: str) -> None:
    """Create the gallery at ``gallery_dir`` unless it exists, under the creation lock (race-free)."""
    from zsbir_infer.gallery import Gallery

    if (gallery_dir / "manifest.json").is_file():
        return
    gallery_dir.parent.mkdir(parents=True, exist_ok=True)
    with _creation_lock(gallery_dir):
        if (gallery_dir / "manifest.json").is_file():
            return  # another run created it while we waited
        _clear_half_created(gallery_dir)
        Gallery.create(gallery_dir, fingerprint=encoder.fingerprint, dim=encoder.embedding_dim, storage=storage).close()


def open_or_create_gallery(
    gallery_dir: Path,
    root: Path,
    encoder: ModelIdentity,
    *,
    storage: str = "float16",
    model: str | None = None,
    repoint: bool = False,
) -> Gallery:
    """Open the gallery at ``gallery_dir`` for indexing ``root`` with ``encoder`` (creating it if absent).

    Creation is race-free: it happens under a lock on the parent folder, in a temporary folder renamed
    into place, so two runs started at once create one gallery. ``repoint=True`` accepts a gallery that
    indexes another folder and records ``root`` as its folder from now on (the photos moved there).

    Raises:
        IndexingError: the gallery indexes another root (and ``repoint`` is False).
        zsbir_infer.gallery.ModelMismatchError: the gallery was built with another model.
    """
    from zsbir_infer.gallery import Gallery

    _ensure_gallery(gallery_dir, encoder, storage)
    g = Gallery.open(gallery_dir, fingerprint=encoder.fingerprint, readonly=False)
    claim_source(g, gallery_dir, root, model, repoint, command="zsbir index")
    return g


def claim_source(
    g: Gallery | ShardedGallery, gallery_dir: Path, root: Path, model: str | None, repoint: bool, *, command: str
) -> None:
    """Check that the writable gallery ``g`` indexes ``root`` (or has no root yet, or ``repoint``), then record
    ``root`` and the model (the one of its first run, kept from then on) as what it indexes. On a mismatch ``g``
    is closed and :class:`IndexingError` says how to re-point it with ``command``."""
    source = g._source
    old_root = source.get("root")
    if old_root and Path(old_root) != root and not repoint:
        g.close()
        raise IndexingError(
            f"gallery {gallery_dir} indexes {old_root}, not {root}; a gallery indexes one folder. If the photos "
            f"moved to {root}, re-point the gallery (its embeddings are kept): {command} --root {root} -o "
            f"{gallery_dir}. Else use another gallery (-o DIR), or delete {gallery_dir} to start over"
        )
    g._record_source(root, source.get("model", model))


def index_folder(
    root: str | os.PathLike[str],
    gallery: str | os.PathLike[str],
    encoder: Encoder,
    *,
    model: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    storage: str = "float16",
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[int], Any] | None = None,
    build_ann_from: int | None = None,
    commit_files: int = DEFAULT_COMMIT_FILES,
    commit_seconds: float = DEFAULT_COMMIT_SECONDS,
    follow_links: bool = False,
    repoint: bool = False,
) -> IndexReport:
    """Index (or update the index of) the photos below ``root`` into the gallery folder ``gallery``.

    Args:
        root: folder of photos.
        gallery: gallery folder (created when absent; must then be absent or empty).
        encoder: an opened :class:`~zsbir_infer.encoder.Encoder` (its fingerprint must match the gallery's).
        model: how to name the model in ``indexer.json`` (the bundle folder; ``None`` = embedded default).
        batch_size: images per model call and per gallery commit (default: the encoder's).
        workers: decoding threads (default: the encoder's).
        storage: gallery storage for a new gallery (``"float16"`` or ``"int8"``).
        progress: called with the number of files just finished (embedded or skipped) after each batch.
        on_plan: called once with the number of files to read, before reading starts (to size a progress bar).
        build_ann_from: build and save the ANN index at the end when the gallery holds at least this many
            files or already has one (default :data:`zsbir_infer.gallery.ann.ANN_MIN_ROWS`); 0 disables.
            Searches only read it (exhaustive without it).
        commit_files: commit to the gallery once this many files are embedded or skipped...
        commit_seconds: ... or this many seconds after the last commit, whichever comes first. Each commit
            is atomic (one fsync of the vectors, one SQLite transaction); a kill loses at most the files
            embedded since the last commit.
        follow_links: follow symbolic links that point outside ``root`` (default: skipped, see :func:`walk`).
        repoint: the gallery's photos moved to ``root``: accept a gallery recorded for another folder and
            record ``root`` (files are compared by their path below the root, so nothing is re-embedded
            unless its size or mtime changed).

    Returns:
        An :class:`IndexReport`. On ``KeyboardInterrupt`` the committed batches stay committed and the
        exception propagates (a rerun continues where this run stopped).

    Raises:
        IndexingError: bad root, a gallery of another root, or another run in progress on the gallery.
        zsbir_infer.gallery.ModelMismatchError: the gallery was built with another model.
    """
    t0 = time.perf_counter()
    root_p = Path(root).resolve()
    gdir = Path(gallery).absolute()
    listing = walk(root_p, exclude=[gdir], follow_links=follow_links)
    _ensure_gallery(gdir, encoder, storage)
    report = IndexReport(
        root=str(root_p),
        gallery=str(gdir),
        fingerprint=encoder.fingerprint,
        backend=encoder.backend,
        precision=encoder.precision,
    )
    with _run_lock(gdir):
        g = open_or_create_gallery(gdir, root_p, encoder, storage=storage, model=model, repoint=repoint)
        try:
            _check_and_repair(g, report)
            _run(g, listing, encoder, report, batch_size, workers, progress, on_plan, commit_files, commit_seconds)
            report.seconds = time.perf_counter() - t0
            report.total_indexed, report.total_skipped = finish_gallery(g, build_ann_from)
            write_run_report(gdir, report)
        except KeyboardInterrupt:
            report.interrupted = True
            raise
        finally:
            g.close()
    report.seconds = time.perf_counter() - t0
    return report


def _check_and_repair(g: Gallery, report: IndexReport) -> None:
    """Note an upgrade of the gallery's format; verify its vectors and drop the photos of damaged segments,
    which this run then embeds again (they are planned as new)."""
    from zsbir_infer.gallery import FORMAT_VERSION, SegmentDamagedError

    if g.migrated_from is not None:
        report.notes.append(
            f"upgraded gallery {g.path} from format {g.migrated_from} to {FORMAT_VERSION} (vector checksums added)"
        )
    try:
        g._load()
    except SegmentDamagedError as exc:
        report.notes.append(str(exc).split("; its vectors")[0])
        for name, n in g.repair():
            report.notes.append(f"repaired: the {n} photos stored in segments/{name} are embedded again")


def _skip_many(g: Gallery, items: Sequence[tuple[Any, str]]) -> None:
    """Record several skips in one gallery transaction."""
    if items:
        g._skip_many(items)


class _Committer:
    """Buffers embedded batches and commits them together: one :meth:`Gallery.add` (one fsync + one SQLite
    transaction) per ``commit_files`` files or ``commit_seconds`` seconds, whichever comes first."""

    def __init__(self, g: Gallery, report: IndexReport, commit_files: int, commit_seconds: float) -> None:
        self.g, self.report = g, report
        self.commit_files, self.commit_seconds = max(1, commit_files), commit_seconds
        self.records: list[Any] = []
        self.vectors: list[np.ndarray] = []
        self.skips: list[tuple[Any, str]] = []
        self.pending_progress = 0
        self.last = time.monotonic()

    def add(self, records: list[Any], vectors: np.ndarray | None, skips: list[tuple[Any, str]], files: int) -> int:
        """Buffer a batch; returns the number of files committed by this call (0 if still buffering)."""
        self.records.extend(records)
        if vectors is not None and len(records):
            self.vectors.append(vectors)
        self.skips.extend(skips)
        self.pending_progress += files
        full = len(self.records) + len(self.skips) >= self.commit_files
        if full or time.monotonic() - self.last >= self.commit_seconds:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Commit what is buffered; returns the number of files it covered."""
        if self.records:
            vecs = self.vectors[0] if len(self.vectors) == 1 else np.concatenate(self.vectors)
            self.g.add(self.records, vecs)
            self.report.indexed += len(self.records)
        _skip_many(self.g, self.skips)
        self.report.skipped.extend((f.relpath, why) for f, why in self.skips)
        done = self.pending_progress
        self.records, self.vectors, self.skips, self.pending_progress = [], [], [], 0
        self.last = time.monotonic()
        return done


@dataclass
class PlannedWork:
    """What one gallery (or gallery shard) has left to do after :func:`plan_gallery`: the files to read, decode
    and embed, and the skip reasons of the retried files (a file failing again for the same reason is not
    recorded again)."""

    candidates: list[WalkEntry]
    before: dict[str, str]
    todo: int  # candidates plus the files skipped without reading (already recorded)


def count_listing(listing: Listing, report: IndexReport) -> list[WalkEntry]:
    """Count the listed files into ``report`` (and its skips of files that cannot be stored); returns the
    entries the gallery can record."""
    stored = [e for e in listing.entries if e.stored]
    report.listed = len(stored) + len(listing.unstored)
    report.skipped.extend(listing.unstored)
    return stored


def plan_gallery(g: Gallery, entries: Sequence[WalkEntry], report: IndexReport) -> PlannedWork:
    """Plan a run over ``entries`` (the listed files that belong to gallery ``g``): mark files gone from the
    folder deleted, record the files skipped without reading them, and count it all into ``report``
    (``new``, ``changed``, ``deleted``, ``unchanged``, ``read``, ``skipped`` grow). The plain indexer runs it
    on its gallery, the Ray indexer on each shard (:mod:`zsbir_infer.ray_index`)."""
    from zsbir_infer.gallery import FileStat

    by_rel = {e.relpath: e for e in entries}
    plan = g._plan([FileStat(e.relpath, e.size, e.mtime_ns) for e in entries], retry_skipped=True)
    report.new += len(plan.new)
    report.changed += len(plan.changed)
    report.deleted += g.delete(plan.deleted) if plan.deleted else 0
    # Files skipped before are tried again (a file unreadable once must not stay out forever); one that
    # fails again for the same reason is not recorded again and counts as unchanged.
    before = {f.relpath: why for f, why in plan.retry}
    retry_pre = [by_rel[f.relpath] for f, _ in plan.retry]
    same = {e.relpath for e in retry_pre if e.skip is not None and e.skip == before[e.relpath]}
    report.unchanged += len(plan.unchanged) + len(same)
    todo = [by_rel[f.relpath] for f in (*plan.new, *plan.changed)] + [e for e in retry_pre if e.relpath not in same]
    pre_skipped = [e for e in todo if e.skip is not None]
    candidates = [e for e in todo if e.skip is None]
    _skip_many(g, [(FileStat(e.relpath, e.size, e.mtime_ns), str(e.skip)) for e in pre_skipped])
    report.skipped.extend((e.relpath, str(e.skip)) for e in pre_skipped)
    report.read += len(candidates)
    return PlannedWork(candidates, before, len(todo))


def commit_results(
    committer: _Committer,
    before: dict[str, str],
    part: Sequence[WalkEntry],
    results: Sequence[tuple[bool, str]],
    vectors: np.ndarray | None,
) -> None:
    """Hand one decoded and embedded batch to ``committer``: ``results`` holds ``(ok, sha256-or-reason)`` per
    entry of ``part``, ``vectors`` the embeddings of the ok entries in order (None when there is none)."""
    from zsbir_infer.gallery import FileRecord, FileStat

    recs = [
        FileRecord(e.relpath, e.size, e.mtime_ns, why) for e, (good, why) in zip(part, results, strict=True) if good
    ]
    skips = [
        (FileStat(e.relpath, e.size, e.mtime_ns), why)
        for e, (good, why) in zip(part, results, strict=True)
        if not good and before.get(e.relpath) != why
    ]
    committer.report.unchanged += sum(1 for good, _ in results if not good) - len(skips)
    committer.add(recs, vectors, skips, len(results))


def finish_gallery(g: Gallery, build_ann_from: int | None) -> tuple[int, int]:
    """End of a run on gallery ``g``: build and save its ANN index where the policy says so (the writer does it,
    never a search); returns ``(files indexed, files skipped)``."""
    from zsbir_infer.gallery.ann import builds_ann

    st = g.stats()
    if st.ann_state in ("missing", "stale") and builds_ann(st.files_indexed, st.ann_state == "stale", build_ann_from):
        g.build_index()
    return st.files_indexed, st.files_skipped


def write_run_report(gallery_dir: Path, report: IndexReport) -> None:
    """Keep ``report`` as the last run's in the gallery's ``indexer.json`` (atomically)."""
    from zsbir_infer.gallery.source import read_legacy

    info = read_legacy(gallery_dir)  # the indexer's own file: its last report (and, from older versions, a root)
    info.update({"format": "zsbir-indexer", "version": 1, "last_run": report.to_dict()})
    atomic_write_json(gallery_dir / INDEXER_FILE, info)


def _run(
    g: Gallery,
    listing: Listing,
    encoder: Encoder,
    report: IndexReport,
    batch_size: int | None,
    workers: int | None,
    progress: Callable[[int], Any] | None,
    on_plan: Callable[[int], Any] | None,
    commit_files: int,
    commit_seconds: float,
) -> None:
    work = plan_gallery(g, count_listing(listing, report), report)
    if on_plan is not None:
        on_plan(work.todo)
    if progress is not None and work.todo > len(work.candidates):
        progress(work.todo - len(work.candidates))
    committer = _Committer(g, report, commit_files, commit_seconds)
    t_embed = time.perf_counter()
    batches = _decoded_batches(work.candidates, encoder, batch_size, workers)
    try:
        for part, batch, results in batches:
            ok = [i for i, (good, _) in enumerate(results) if good]
            vecs = None
            if ok:
                vecs = encoder.embed(batch if len(ok) == len(results) else batch[ok], "photo")
            commit_results(committer, work.before, part, results, vecs)
            if progress is not None:
                progress(len(results))
        committer.flush()
    finally:
        batches.close()  # now, not when garbage-collected: an interrupt stops the decoding threads at once
        report.embed_seconds = time.perf_counter() - t_embed


#: Files per decoding task: a task per file cost about 0.03 ms of CPU per photo in thread-pool
#: hand-offs (futures, locks, wake-ups), a tenth of decoding a 256 px JPEG for a small model.
DECODE_CHUNK = 8


def _prepare_chunk(entries: Sequence[WalkEntry], spec: PreprocessSpec, out: np.ndarray) -> list[tuple[bool, str]]:
    """:func:`_prepare` for consecutive ``entries`` into consecutive rows of ``out``."""
    return [_prepare(e, spec, out[k]) for k, e in enumerate(entries)]


def _decoded_batches(
    entries: Sequence[WalkEntry], encoder: Encoder, batch_size: int | None, workers: int | None
) -> Generator[tuple[Sequence[WalkEntry], np.ndarray, list[tuple[bool, str]]], None, None]:
    """Yield (slice of entries, preprocessed batch, per-file (ok, sha256-or-reason)) for consecutive slices
    of ``entries``, decoded on a thread pool a few batches ahead of the consumer (in chunks of at most
    :data:`DECODE_CHUNK` files, at least one chunk per thread per batch)."""
    n = len(entries)
    if n == 0:
        return
    spec = encoder.bundle.preprocess_spec("photo")
    bs = int(batch_size or encoder.batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    nw = int(workers or encoder.workers)
    # Enough batches in flight to keep every decoding thread busy while the model runs one batch.
    ahead = max(2, -(-2 * nw // bs))
    chunk = max(1, min(DECODE_CHUNK, -(-bs // nw)))

    def groups() -> Iterator[tuple[tuple[int, int, np.ndarray], Sequence[Callable[[], list[tuple[bool, str]]]]]]:
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            buf = np.empty((stop - start, 3, spec.height, spec.width), dtype=np.float32)
            tasks = [
                partial(_prepare_chunk, entries[i : min(stop, i + chunk)], spec, buf[i - start : i - start + chunk])
                for i in range(start, stop, chunk)
            ]
            yield (start, stop, buf), tasks

    with contextlib.closing(prefetch(groups(), workers=nw, in_flight=ahead + 1, name="zsbir-index")) as batches:
        for (start, stop, buf), outcomes in batches:
            yield entries[start:stop], buf, [r for o in outcomes for r in o.result()]
