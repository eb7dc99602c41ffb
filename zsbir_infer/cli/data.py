"""``zsbir data``: make the synthetic ZS-SBIR benchmark and inspect benchmark folders."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(name="data", context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Make or inspect benchmark data (synthetic ZS-SBIR set, real splits)."""


@command.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=125, show_default=True, help="Number of classes (seen + unseen).")
@click.option("--unseen", default=25, show_default=True, help="Number of zero-shot (unseen) classes.")
@click.option("--photos-per-class", default=40, show_default=True, help="Photos per class.")
@click.option("--sketches-per-class", default=20, show_default=True, help="Sketches per class.")
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed of the class choice, split and every image.")
@click.option(
    "--difficulty",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="0..1: clutter, rotation, noise and stroke damage.",
)
@click.option("--workers", default=None, type=click.IntRange(1), help="Processes (default: CPU count).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(
    out: Path,
    classes: int,
    unseen: int,
    photos_per_class: int,
    sketches_per_class: int,
    size: int,
    seed: int,
    difficulty: float,
    workers: int | None,
    quiet: bool,
) -> None:
    """Write a synthetic Sketchy-like ZS-SBIR benchmark to OUT (resumes an interrupted run)."""
    from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic

    config = SynthConfig(
        classes=classes,
        unseen=unseen,
        photos_per_class=photos_per_class,
        sketches_per_class=sketches_per_class,
        size=size,
        seed=seed,
        difficulty=difficulty,
    )
    try:
        report = generate_synthetic(out, config, workers=workers, progress=not quiet)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"{out}: {len(report.seen)} seen + {len(report.unseen)} unseen classes, "
        f"{report.written} images written, {report.skipped} already there, "
        f"{report.bytes_on_disk / 1e6:.1f} MB, {report.seconds:.1f} s"
    )


ZEROSHOT_HELP = (
    "Split set of a folder benchmark (e.g. 21 for splits/seen21.txt + unseen21.txt; default: seen.txt + "
    "unseen.txt) or split folder of a real benchmark (zeroshot1/zeroshot0)."
)


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


@command.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--kind",
    default=None,
    type=click.Choice(["synthetic", "folder", "sketchy", "tuberlin", "quickdraw"]),
    help="Layout (default: auto-detect).",
)
@click.option("--zeroshot", default=None, metavar="NAME", help=ZEROSHOT_HELP)
@click.option(
    "--extra-sketches",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of extra sketches (sketch/<word>/ + class_map.csv, e.g. QuickDraw doodles) added to the "
    "seen classes; words of unseen classes are refused.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(root: Path, kind: str | None, zeroshot: str | None, extra_sketches: Path | None, as_json: bool) -> None:
    """Describe the benchmark at ROOT: layout, split sets, classes and image counts per split."""
    from zsbir_infer.datasets import open_benchmark

    bench = open_benchmark(root, kind=kind, zeroshot=zeroshot, extra_sketches=extra_sketches)
    summary = {
        "root": str(root),
        "kind": bench.kind,
        "seen_classes": len(bench.seen_classes),
        "unseen_classes": len(bench.unseen_classes),
        "images": bench.counts(),
        "classes": {"seen": bench.seen_classes, "unseen": bench.unseen_classes},
        **{k: v for k, v in bench.info.items() if k != "meta"},
        "missing": bench.missing,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    layout = f" ({bench.info['layout']} layout)" if "layout" in bench.info else ""
    click.echo(
        f"{root}: {bench.kind}{layout}, {len(bench.seen_classes)} seen / {len(bench.unseen_classes)} unseen classes"
    )
    sets = bench.info.get("split_sets")
    if "split_set" in bench.info:
        available = f" (available: {', '.join(map(str, sets))})" if isinstance(sets, list) else ""
        click.echo(f"  split set: {bench.info['split_set']}{available}")
    extra = bench.info.get("extra_sketches")
    added = extra.get("added", 0) if isinstance(extra, dict) else 0
    for part, c in bench.counts().items():
        more = f" ({added} of them extra)" if part == "seen" and added else ""
        click.echo(f"  {part}: {c['photo']} photos, {c['sketch']} sketches{more}")
    for part, why in bench.missing.items():
        click.echo(f"  {part}: not loadable ({why})")
    click.echo(f"  unseen classes: {_names(bench.unseen_classes)}")
    if "pairs_finegrained" in bench.info:
        click.echo(f"  fine-grained pairs: {bench.info['pairs_finegrained']}")
    if isinstance(extra, dict):
        click.echo(
            f"  extra sketches from {extra['root']}: {extra['added']} sketches of {extra['classes']} seen classes "
            f"({extra['words']} words); refused {extra['unseen_refused']} words of unseen classes, skipped "
            f"{extra['skipped_words']} words of no class here, {extra['unmapped_words']} words not in the class map"
        )
