"""``zsbir info``: describe a gallery (model, counts, sizes on disk, format)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from zsbir_infer.gallery import GalleryStats


def _size(n: int) -> str:
    """Bytes in decimal units: 512 B, 1.5 KB, 2.0 MB, ..."""
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _ann_line(st: GalleryStats) -> str:
    """What the saved ANN index covers and what searches do about it (they never write)."""
    from zsbir_infer.gallery.ann import ANN_MIN_ROWS

    if st.ann_state == "none":
        return "none (ITQ galleries are searched exhaustively)"
    if st.ann_state == "missing":
        return (
            f"not built: searches are exhaustive ('zsbir index' builds it once the gallery holds {ANN_MIN_ROWS} photos)"
        )
    if st.ann_state == "stale":
        how = (
            "searches add the rest in memory"
            if 2 * st.ann_rows >= st.rows
            else "searches are exhaustive until it is updated"
        )
        return (
            f"{st.ann_vectors} vectors, stale (saved for {st.ann_rows} of {st.rows} rows): {how}; "
            f"the next 'zsbir index' saves it"
        )
    return f"{st.ann_vectors} vectors"


@click.command(name="info", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("gallery", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check the whole gallery: the catalog (PRAGMA quick_check), every vector file against its checksum, "
    "every vector's length. Exits with status 1 when something is damaged, saying how to repair it.",
)
def command(gallery: Path | None, as_json: bool, verify: bool) -> None:
    """Describe GALLERY (default: $ZSBIR_GALLERY, else the nearest .zsbir): model fingerprint, file counts, sizes,
    format version. Opening it checks the vectors' checksums; --verify checks everything."""
    from zsbir_infer.gallery import ShardedGallery, open_gallery
    from zsbir_infer.indexer import read_indexer_info
    from zsbir_infer.retriever import resolve_gallery

    problems: list[str] | None = None
    shards: list[GalleryStats] | None = None
    gdir = resolve_gallery(gallery)  # (its errors and the gallery's reach the group's mapping)
    with open_gallery(gdir, readonly=True) as g:
        if verify:
            problems = g.verify(full=True)
        st = g.stats() if not problems else None
        if isinstance(g, ShardedGallery) and not problems:
            shards = g._shard_stats()
    if problems:
        if as_json:
            click.echo(json.dumps({"path": str(gdir), "verified": False, "problems": problems}, indent=2))
        else:
            click.echo(f"gallery {gdir}: {len(problems)} problem(s) found", err=True)
            for line in problems:
                click.echo(f"  {line}", err=True)
        sys.exit(1)
    assert st is not None
    info = read_indexer_info(gdir)  # the last run's report, and what the gallery indexes (its manifest)
    last: dict[str, Any] = info.get("last_run") or {}
    doc: dict[str, Any] = {
        **asdict(st),
        "root": info.get("root"),
        "model": info.get("model"),
        "last_run": {k: v for k, v in last.items() if k != "skipped"} if last else None,
    }
    if shards is not None:
        doc["shards"] = [{"shard": f"shards/{i:03d}", **asdict(s)} for i, s in enumerate(shards)]
    if verify:
        doc["verified"] = True
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"gallery      {st.path}")
    click.echo(f"format       {st.storage} vectors, format version {st.format_version}, created {st.created}")
    click.echo(f"photos from  {info.get('root') or '(unknown: not made by zsbir index)'}")
    click.echo(f"model        {st.fingerprint} ({info.get('model') or 'embedded default'}), dim {st.dim}, {st.metric}")
    click.echo(f"files        {st.files_indexed} indexed, {st.files_skipped} skipped, {st.files_deleted} deleted")
    click.echo(f"rows         {st.rows} vectors ({st.dead_rows} dead), {st.segments} segment(s)")
    if shards is not None:
        click.echo(f"shards       {len(shards)} (a photo's shard: CRC-32 of its path modulo {len(shards)})")
        for i, s in enumerate(shards):
            click.echo(
                f"  shards/{i:03d}  {s.files_indexed} indexed, {s.files_skipped} skipped, {s.rows} vectors "
                f"({s.dead_rows} dead), ANN {s.ann_state}, {_size(s.bytes_total)}"
            )
    click.echo(f"ANN index    {_ann_line(st)}")
    click.echo(f"on disk      {_size(st.bytes_total)} ({_size(st.bytes_vectors)} vectors)")
    if st.format_version < 2:
        click.echo("checksums    none (format 1): 'zsbir index' upgrades the gallery and adds them")
    if verify:
        click.echo("verified     catalog, vector checksums and lengths: no damage found")
    if last:
        click.echo(
            f"last run     {last.get('indexed', 0)} indexed, {last.get('unchanged', 0)} unchanged, "
            f"{len(last.get('skipped', []))} skipped, {last.get('deleted', 0)} deleted "
            f"in {last.get('seconds', 0):.1f} s"
        )
