"""``zsbir embed``: embed image files with a bundle and write the embeddings to an ``.npy`` file."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from zsbir_infer.encoder import Encoder

F = TypeVar("F", bound=Callable[..., Any])

PRECISION_CHOICES = ["fp32", "fp16", "int8"]
BACKEND_CHOICES = ["auto", "tensorrt", "ort-cuda", "ort-cpu"]


#: ``--expand K`` of the commands that search (query expansion, :mod:`zsbir_infer.expansion`).
expand_option = click.option(
    "--expand",
    type=click.IntRange(0, 1000),
    default=None,
    metavar="K",
    help="Query expansion with the K best photos (0: off); default: the bundle's recommendation.",
)


def search_gallery_options(fn: F) -> F:
    """``--gallery`` and ``--model`` of the commands that search a gallery (``query``, ``serve``)."""
    fn = click.option(
        "--model",
        type=click.Path(path_type=Path),
        default=None,
        help="Model bundle (default: the model the gallery was built with; it must be that one).",
    )(fn)
    return click.option(
        "--gallery",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Gallery folder (default: $ZSBIR_GALLERY, else the nearest .zsbir here or in a parent folder).",
    )(fn)


def encoder_options(fn: F) -> F:
    """The options every command that embeds images shares: --model, --precision, --backend, batching."""
    opts = [
        click.option(
            "--model",
            "model",
            type=click.Path(path_type=Path),
            default=None,
            help="Model bundle folder (made by `zsbir export`). Default: the embedded default model.",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISION_CHOICES),
            default="fp32",
            show_default=True,
            help="Model precision.",
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKEND_CHOICES),
            default="auto",
            show_default=True,
            help="Inference backend; auto tries TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per model call."
        ),
        click.option(
            "--workers", type=click.IntRange(1), default=None, help="Image decoding threads (default: CPUs, at most 8)."
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def open_encoder(model: Path | None, precision: str, backend: str, batch_size: int, workers: int | None) -> Encoder:
    """Open the encoder for a command, turning setup failures into clean CLI errors."""
    from zsbir_infer.encoder import Encoder

    try:
        return Encoder.open(model, precision=precision, backend=backend, batch_size=batch_size, workers=workers)
    except ValueError as exc:  # a plain bad argument; zsbir's own errors reach the group's mapping
        raise click.ClickException(str(exc)) from None


@contextmanager
def progress_bar(total: int, desc: str, quiet: bool) -> Iterator[Callable[[int], Any]]:
    """A tqdm bar on stderr counting images (shows images/s); yields its ``update`` function."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, disable=quiet or total == 0, dynamic_ncols=True
    ) as bar:
        yield bar.update


def atomic_save_npy(path: Path, array: Any) -> None:
    """Write ``array`` to ``path`` in .npy format via a temporary file in the same folder + rename."""
    import numpy as np

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise click.ClickException(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise click.ClickException(f"cannot read --files-from {path}: {exc.strerror or exc}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@click.command(
    name="embed",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: zsbir embed --domain sketch s1.png s2.png -o sketches.npy",
)
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--domain", type=click.Choice(["photo", "sketch"]), required=True, help="What the images are.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .npy.")
@click.option(
    "--files-from",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Text file with one image path per line (appended after FILES).",
)
@encoder_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    files: Sequence[Path],
    domain: str,
    output: Path,
    files_from: Path | None,
    model: Path | None,
    precision: str,
    backend: str,
    batch_size: int,
    workers: int | None,
    quiet: bool,
) -> None:
    """Embed image FILES and write OUT.npy: float32 [N, D], L2-normalized rows in FILES order.

    Nothing is written if any file cannot be decoded (the error names it).
    """
    import time

    from zsbir_infer.encoder import EncoderError
    from zsbir_infer.preprocess import ImageDecodeError

    paths = [Path(f) for f in files]
    if files_from is not None:
        paths += [Path(p) for p in _read_list(files_from)]
    if not paths:
        raise click.UsageError("no image files given (pass FILE... or --files-from LIST)")
    enc = open_encoder(model, precision, backend, batch_size, workers)
    t0 = time.perf_counter()
    try:
        with progress_bar(len(paths), f"embed {domain}", quiet) as update:
            emb = enc.embed(paths, domain, progress=update)
    except ImageDecodeError as exc:
        raise click.ClickException(f"cannot embed: {exc} (nothing written)") from None
    except EncoderError as exc:
        raise click.ClickException(f"{exc} (nothing written)") from None
    finally:
        enc.close()
    seconds = time.perf_counter() - t0
    atomic_save_npy(output, emb)
    if not quiet:
        click.echo(
            f"{output}: {emb.shape[0]} x {emb.shape[1]} float32 embeddings ({domain}, model {enc.fingerprint}, "
            f"{enc.backend} {precision}, {emb.shape[0] / max(seconds, 1e-9):.1f} images/s)",
            err=True,
        )
