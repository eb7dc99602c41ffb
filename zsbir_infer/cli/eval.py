"""``zsbir eval``: evaluate a bundle on a benchmark split (mAP@all, mAP@200, P@100, P@200)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from zsbir_infer.cli.embed import encoder_options, expand_option, open_encoder, progress_bar

METRIC_LABELS = {"map_all": "mAP@all", "map_200": "mAP@200", "p_100": "P@100", "p_200": "P@200"}


@click.command(
    name="eval",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: zsbir eval --data synth/ --split unseen --protocol sake",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Benchmark folder (our folder layout, synthetic, Sketchy, TU-Berlin or QuickDraw; auto-detected).",
)
@click.option("--split", default="unseen", show_default=True, help="Split: unseen, seen, all (val where present).")
@click.option(
    "--protocol",
    type=click.Choice(["sake", "zse"]),
    default="sake",
    show_default=True,
    help="Metric definitions: SAKE/DSN code or ZSE-SBIR code.",
)
@click.option(
    "--average",
    type=click.Choice(["query", "class"]),
    default="query",
    show_default=True,
    help="Mean over queries, or mean of per-class means.",
)
@click.option(
    "--zeroshot",
    default=None,
    metavar="NAME",
    help="Split set of a folder benchmark (e.g. 21) or split folder of a real benchmark (zeroshot1/zeroshot0).",
)
@expand_option
@encoder_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    data: Path,
    split: str,
    protocol: str,
    average: str,
    expand: int | None,
    zeroshot: str | None,
    model: Path | None,
    precision: str,
    backend: str,
    batch_size: int,
    workers: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Embed the split's sketches (queries) and photos (gallery) and print the retrieval metrics."""
    import numpy as np

    from zsbir_infer.datasets import open_benchmark
    from zsbir_infer.expansion import expand_against, recommended_expand
    from zsbir_infer.metrics import evaluate

    try:
        bench = open_benchmark(data, zeroshot=zeroshot)
        part = bench.split(split)
    except ValueError as exc:  # a plain bad argument; zsbir's own errors reach the group's mapping
        raise click.ClickException(str(exc)) from None
    if not part.sketches or not part.photos:
        raise click.ClickException(
            f"{data}: the {split} split has {len(part.sketches)} sketches and {len(part.photos)} photos; need both"
        )
    enc = open_encoder(model, precision, backend, batch_size, workers)
    total = len(part.sketches) + len(part.photos)
    t0 = time.perf_counter()
    try:
        with progress_bar(total, f"eval {split}", quiet or as_json) as update:
            q = enc.embed([s.path for s in part.sketches], "sketch", progress=update)
            g = enc.embed([s.path for s in part.photos], "photo", progress=update)
    finally:
        enc.close()
    embed_seconds = time.perf_counter() - t0
    ql = np.array([s.label for s in part.sketches], dtype=np.int64)
    gl = np.array([s.label for s in part.photos], dtype=np.int64)
    t1 = time.perf_counter()
    if expand is None:
        try:
            expand = recommended_expand(enc.bundle.manifest)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    if expand:
        q = expand_against(q, g, expand)
    metrics = evaluate(q, ql, g, gl, protocol=protocol, average=average)  # type: ignore[arg-type]
    eval_seconds = time.perf_counter() - t1
    result: dict[str, Any] = {
        **{k: float(metrics[k]) for k in METRIC_LABELS},
        "benchmark": bench.kind,
        "data": str(data),
        "split": split,
        "protocol": protocol,
        "average": average,
        "expand": expand,
        "classes": len(part.classes),
        "queries": int(q.shape[0]),
        "gallery": int(g.shape[0]),
        "model": str(enc.bundle.path),
        "fingerprint": enc.fingerprint,
        "backend": enc.backend,
        "precision": precision,
        "embed_seconds": round(embed_seconds, 3),
        "images_per_second": round(total / max(embed_seconds, 1e-9), 1),
        "metric_seconds": round(eval_seconds, 3),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{bench.kind} {split} ({result['classes']} classes): {result['queries']} sketch queries, "
        f"{result['gallery']} photos; {enc.backend} {precision}, model {enc.fingerprint}, protocol {protocol}"
    )
    for key, label in METRIC_LABELS.items():
        click.echo(f"  {label:<8} {result[key]:.4f}")
    click.echo(f"  embedded {total} images in {embed_seconds:.1f} s ({result['images_per_second']} images/s)")
