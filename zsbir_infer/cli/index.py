"""``zsbir index``: index a folder of photos into a gallery (incremental, resumable, never crashing on bad files)."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from zsbir_infer.cli.embed import encoder_options, open_encoder

#: Skipped files listed one by one in the text summary (the rest are counted).
SHOW_SKIPPED = 20

F = TypeVar("F", bound=Callable[..., Any])


#: The options of ``--engine ray``: (name, click.option keywords, help after "With --engine ray: ").
RAY_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "--ray-address",
        {"default": None, "metavar": "auto|HOST:PORT"},
        "the Ray cluster to run on (default: start a local Ray for this run).",
    ),
    (
        "--shards",
        {"type": click.IntRange(1), "default": None},
        "a new gallery of N shards (one writer each; read as one gallery). Default 1.",
    ),
    ("--actors", {"type": click.IntRange(1), "default": None}, "model actors (default: from the CPUs/GPUs)."),
    (
        "--cpus-per-actor",
        {"type": click.FloatRange(0.0, min_open=True), "default": 1.0, "show_default": True},
        "CPUs per model actor (its ONNX Runtime threads).",
    ),
    (
        "--gpus-per-actor",
        {"type": click.FloatRange(0.0), "default": 0.0, "show_default": True},
        "GPUs per model actor (0: CPU actors; 0.5: two actors per GPU).",
    ),
    ("--decode-batch", {"type": click.IntRange(1), "default": None}, "files per decoding task (default 64)."),
]


def ray_options(f: F) -> F:
    """Add :data:`RAY_OPTIONS` to a click command."""
    for name, kwargs, text in reversed(RAY_OPTIONS):
        f = click.option(name, help=f"With --engine ray: {text}", **kwargs)(f)
    return f


@click.command(
    name="index",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: zsbir index ./photos   (then: zsbir query sketch.png)",
)
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@click.option(
    "-o",
    "--gallery",
    "gallery",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Gallery folder (default: $ZSBIR_GALLERY, else ./.zsbir, where 'zsbir query' finds it).",
)
@click.option(
    "--root",
    "new_root",
    type=click.Path(path_type=Path),
    default=None,
    help="The gallery's photos moved to this folder: re-point the gallery to it (keeping its embeddings) and "
    "index it. A gallery inside or beside its photo folder needs this only when the photos moved on their own.",
)
@encoder_options
@click.option(
    "--storage",
    type=click.Choice(["float16", "int8"]),
    default="float16",
    show_default=True,
    help="How a new gallery stores vectors.",
)
@click.option(
    "--commit-every",
    type=click.IntRange(1),
    default=None,
    hidden=True,
    help="Commit every N files (default: 1024 files or 2 s, whichever comes first).",
)
@click.option(
    "--follow-links",
    is_flag=True,
    help="Follow symbolic links that point outside FOLDER (by default they are skipped with a reason).",
)
@click.option(
    "--engine",
    type=click.Choice(["plain", "ray"]),
    default="plain",
    show_default=True,
    help="plain: this process (decoding threads + the model). ray: a Ray Data pipeline (decoding tasks, a pool "
    "of model actors), on a local Ray started for the run or on --ray-address.",
)
@ray_options
@click.option(
    "--merge-shards",
    "merge_into",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Compact the sharded gallery (-o) into one gallery at this new folder, and exit (no FOLDER needed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    folder: Path | None,
    new_root: Path | None,
    gallery: Path | None,
    model: Path | None,
    precision: str,
    backend: str,
    batch_size: int,
    workers: int | None,
    storage: str,
    commit_every: int | None,
    follow_links: bool,
    engine: str,
    ray_address: str | None,
    shards: int | None,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    decode_batch: int | None,
    merge_into: Path | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Index the photos below FOLDER into a gallery; a rerun only embeds new or changed files.

    Files that cannot be used (not an image, empty, truncated, too large, unreadable, odd names, symbolic
    link loops, symbolic links leaving FOLDER unless --follow-links) are skipped with a reason, and tried
    again by the next run. Interrupting is safe: rerun to continue. Without --model, an existing gallery
    is updated with the model it was built with (a new one uses the embedded default). --engine ray runs
    the same indexing on Ray Data (and writes sharded galleries with --shards N).
    """
    from tqdm import tqdm

    from zsbir_infer.errors import ZsbirError
    from zsbir_infer.gallery.source import read_source
    from zsbir_infer.indexer import (
        DEFAULT_COMMIT_FILES,
        DEFAULT_COMMIT_SECONDS,
        DEFAULT_GALLERY_DIRNAME,
        index_folder,
    )
    from zsbir_infer.retriever import resolve_model

    env_gallery = os.environ.get("ZSBIR_GALLERY", "").strip()
    if gallery is not None:
        gdir = gallery
    elif env_gallery:
        gdir = Path(env_gallery)
    else:
        gdir = Path.cwd() / DEFAULT_GALLERY_DIRNAME
    if merge_into is not None:
        _merge(gdir, merge_into, as_json)
        return
    if engine != "ray":
        for name, value in (("--ray-address", ray_address), ("--shards", shards), ("--actors", actors)):
            if value is not None:
                raise click.UsageError(f"{name} needs --engine ray")
    elif workers is not None:
        raise click.UsageError("--workers sets the plain engine's decoding threads; with --engine ray, Ray decodes")
    from zsbir_infer.gallery.shards import is_sharded

    if engine == "plain" and is_sharded(gdir):
        raise click.ClickException(
            f"gallery {gdir} is sharded: update it with --engine ray (or merge it: --merge-shards)"
        )
    if new_root is not None:
        if folder is not None and folder.resolve() != new_root.resolve():
            raise click.UsageError(f"FOLDER ({folder}) and --root ({new_root}) differ; give one of them")
        folder = new_root
    if folder is None:
        raise click.UsageError("give the FOLDER of photos to index (or --root NEW to re-point a gallery)")
    if not folder.is_dir():
        raise click.ClickException(f"{folder} is not a folder (give the folder that holds the photos)")
    model_arg = resolve_model(gdir, model) if (gdir / "manifest.json").is_file() else model
    recorded = read_source(gdir).get("model") if model is None else None
    enc = None
    if engine == "plain":
        enc = open_encoder(Path(model_arg) if model_arg else None, precision, backend, batch_size, workers)
    model_name = str(Path(model_arg).resolve()) if model_arg else None
    bar = tqdm(total=0, desc="index", unit="file", file=sys.stderr, disable=quiet, dynamic_ncols=True, mininterval=0.5)

    def on_plan(n: int) -> None:
        bar.reset(total=n)

    try:
        common: dict[str, Any] = {
            "model": model_name,
            "batch_size": batch_size,
            "storage": storage,
            "progress": bar.update,
            "on_plan": on_plan,
            "commit_files": commit_every or DEFAULT_COMMIT_FILES,
            "commit_seconds": 3600.0 if commit_every else DEFAULT_COMMIT_SECONDS,
            "follow_links": follow_links,
            "repoint": new_root is not None,
        }
        if enc is not None:
            report = index_folder(folder, gdir, enc, workers=workers, **common)
        else:
            from zsbir_infer.ray_index import DEFAULT_DECODE_BATCH, index_folder_ray

            report = index_folder_ray(
                folder,
                gdir,
                precision=precision,
                backend=backend,
                decode_batch_size=decode_batch or DEFAULT_DECODE_BATCH,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                shards=shards,
                ray_address=ray_address,
                **common,
            )
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"\ninterrupted: committed batches are kept in {gdir}; rerun the same command to continue", err=True)
        sys.exit(130)
    except OSError as exc:
        bar.close()
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        raise click.ClickException(
            f"the disk is full ({exc.strerror}: {exc.filename}); the committed batches are kept in {gdir}: free "
            "some space and rerun the same command to continue"
        ) from None
    except ZsbirError as exc:  # the central mapping's message, plus the hint below
        bar.close()
        hint = ""
        if recorded and model_arg is None:
            hint = f" (the gallery was built with {recorded}, which is gone; pass --model)"
        raise click.ClickException(f"{exc}{hint}") from None
    finally:
        bar.close()
        if enc is not None:
            enc.close()
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    counts = ", ".join(f"{n} {code}" for code, n in report.skip_counts().items())
    click.echo(
        f"indexed {report.indexed} of {report.new + report.changed} new or changed files, "
        f"{report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped{f' ({counts})' if counts else ''}, {report.deleted} deleted "
        f"in {report.seconds:.1f} s ({report.files_per_s:.1f} files/s)"
    )
    from zsbir_infer.gallery import display_path

    for rel, why in report.skipped[:SHOW_SKIPPED]:
        click.echo(f"  skipped {display_path(rel)}: {display_path(why)}")
    if len(report.skipped) > SHOW_SKIPPED:
        click.echo(f"  ... and {len(report.skipped) - SHOW_SKIPPED} more (zsbir index --json lists them all)")
    click.echo(
        f"gallery {report.gallery}: {report.total_indexed} photos from {report.root} "
        f"(model {report.fingerprint}, {report.backend} {report.precision})"
    )


def _merge(gdir: Path, out: Path, as_json: bool) -> None:
    """``--merge-shards OUT``: compact the sharded gallery ``gdir`` into one gallery at ``out``."""
    from zsbir_infer.gallery import merge_shards
    from zsbir_infer.gallery.shards import is_sharded

    if not is_sharded(gdir):
        raise click.ClickException(f"{gdir} is not a sharded gallery (nothing to merge); name it with -o DIR")
    merge_shards(gdir, out)
    from zsbir_infer.gallery import Gallery

    with Gallery.open(out, readonly=True) as g:
        st = g.stats()
    if as_json:
        click.echo(json.dumps({"merged": str(gdir), "gallery": str(out), "files_indexed": st.files_indexed}, indent=2))
        return
    click.echo(f"merged the shards of {gdir} into {out}: {st.files_indexed} photos, {st.files_skipped} skipped")
