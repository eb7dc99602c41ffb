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


@command.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--kind",
    default=None,
    type=click.Choice(["synthetic", "folder", "sketchy", "tuberlin", "quickdraw"]),
    help="Layout (default: auto-detect).",
)
@click.option("--zeroshot", default=None, help="Split folder of a real benchmark (Sketchy: zeroshot1 or zeroshot0).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(root: Path, kind: str | None, zeroshot: str | None, as_json: bool) -> None:
    """Describe the benchmark at ROOT: layout, classes and image counts per split."""
    from zsbir_infer.datasets import BenchmarkError, open_benchmark

    try:
        bench = open_benchmark(root, kind=kind, zeroshot=zeroshot)
    except BenchmarkError as e:
        raise click.ClickException(str(e)) from e
    summary = {
        "root": str(root),
        "kind": bench.kind,
        "seen_classes": len(bench.seen_classes),
        "unseen_classes": len(bench.unseen_classes),
        "images": bench.counts(),
        **{k: v for k, v in bench.info.items() if k != "meta"},
        "missing": bench.missing,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{root}: {bench.kind}, {len(bench.seen_classes)} seen / {len(bench.unseen_classes)} unseen classes")
    for part, c in bench.counts().items():
        click.echo(f"  {part}: {c['photo']} photos, {c['sketch']} sketches")
    for part, why in bench.missing.items():
        click.echo(f"  {part}: not loadable ({why})")
