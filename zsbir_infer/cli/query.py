"""``zsbir query``: search a gallery with one or more sketches and print the best-matching photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from zsbir_infer.cli.embed import BACKEND_CHOICES, PRECISION_CHOICES, expand_option, search_gallery_options


def _shown(path: str) -> str:
    """A path relative to the current directory when it lies below it, else as given (escaped when it is not
    valid UTF-8)."""
    from zsbir_infer.gallery import display_path

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return display_path(path)
    return display_path(path if rel.startswith("..") else rel)


@click.command(
    name="query",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: zsbir query sketch.png -k 5 --html results.html",
)
@click.argument("sketches", nargs=-1, required=True, type=click.Path(path_type=Path))
@search_gallery_options
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Results per sketch.")
@click.option("--exact", is_flag=True, help="Exhaustive search even for galleries large enough for the ANN index.")
@expand_option
@click.option(
    "--domain",
    type=click.Choice(["sketch", "photo"]),
    default="sketch",
    show_default=True,
    help="What the query images are (photo: find similar photos).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a self-contained HTML page with thumbnails.",
)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="fp32", show_default=True)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the gallery search runs.",
)
def command(
    sketches: tuple[Path, ...],
    gallery: Path | None,
    model: Path | None,
    k: int,
    exact: bool,
    expand: int | None,
    domain: str,
    as_json: bool,
    html_out: Path | None,
    precision: str,
    backend: str,
    device: str,
) -> None:
    """Print the photos that best match each SKETCH (ranked, with cosine scores).

    All sketches are embedded in one batch. The gallery is the one `zsbir index` made in this folder
    (or a parent) unless --gallery names another.
    """
    from zsbir_infer.errors import ZsbirError
    from zsbir_infer.retriever import Retriever

    for s in sketches:
        if s.is_dir():
            raise click.ClickException(
                f"{s} is a folder, not a sketch image; give image files (every sketch in it: zsbir query {s}/*.png)"
            )
        if not s.is_file():
            raise click.ClickException(f"sketch not found: {s}")
    try:
        r = Retriever.open(gallery, model, backend=backend, device=device, precision=precision)
    except ValueError as exc:  # a plain bad argument; zsbir's own errors reach the group's mapping
        raise click.ClickException(str(exc)) from None
    try:
        results = r.search([str(s) for s in sketches], k=k, domain=domain, exact=exact, expand=expand)
    except ZsbirError as exc:
        raise click.ClickException(f"cannot search: {exc}") from None
    finally:
        r.close()
    if html_out is not None:
        from zsbir_infer.report import QueryResult, write_html

        page = write_html(
            html_out,
            [QueryResult(str(s), s, hits) for s, hits in zip(sketches, results, strict=True)],
            title="zsbir query results",
            subtitle=f"gallery {r.gallery.path} ({len(results)} queries, k={k}, model {r.fingerprint})",
        )
    if as_json:
        doc = {
            "gallery": str(r.gallery.path),
            "model": r.fingerprint,
            "k": k,
            "queries": [
                {
                    "query": str(s),
                    "results": [
                        {"rank": h.rank, "path": h.path, "relpath": h.relpath, "score": round(h.score, 6), "id": h.id}
                        for h in hits
                    ],
                }
                for s, hits in zip(sketches, results, strict=True)
            ],
        }
        if html_out is not None:
            doc["html"] = str(page)
        click.echo(json.dumps(doc, indent=2))
        return
    for s, hits in zip(sketches, results, strict=True):
        if len(sketches) > 1:
            click.echo(f"{s}:")
        if not hits:
            click.echo("  (the gallery is empty)")
        for h in hits:
            click.echo(f"{h.rank:4d}  {h.score:.4f}  {_shown(h.path)}")
    if html_out is not None:
        click.echo(f"results page: {page}", err=True)
