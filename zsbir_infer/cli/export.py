"""`zsbir export`: turn a checkpoint into a deployable bundle (ONNX fp32/fp16/int8, TensorRT plans).

The command's options live here; building from a checkpoint is the build toolchain's job (torch, onnx:
``pip install 'zsbir[train]'``), found through the ``zsbir.builders`` entry point ``export`` (see
:mod:`zsbir_infer.cli.plugins`), so the runtime never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from zsbir_infer.triton.cli import existing_bundle, export_options, write_from_options

EXAMPLES = """
\b
Examples:
  zsbir export runs/tursun/checkpoint.safetensors -o bundles/tursun
  zsbir export model_best.pth.tar -o bundles/dsn --precision fp32,fp16,int8 --calib data/synth
  zsbir export --default -o bundles/default --precision int8 --calib data/synth --trt
  zsbir export bundles/tursun --triton triton_repo --gallery photos/.zsbir    # a Triton model repository
"""


def default_checkpoint_path() -> Path:
    """The embedded default model's training checkpoint (CONTRACTS §7)."""
    import zsbir_infer

    return Path(zsbir_infer.__file__).resolve().parent / "assets" / "default" / "checkpoint.safetensors"


def _precisions(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    allowed = ("fp32", "fp16", "int8")
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"{value!r}: give a comma-separated list of {', '.join(allowed)}")
    return items


@click.command(
    name="export",
    help="Export a checkpoint (ours, or an official DSN/SAKE model_best.pth.tar) to the bundle folder "
    "BUNDLE: model.onnx (fp32, dynamic batch, L2-normalized output), optionally model.fp16.onnx, "
    "model.int8.onnx (QDQ) and TensorRT plans, and manifest.json. Every model is verified against the "
    "torch model before the bundle is written; a model that misses its tolerance fails the export.\n" + EXAMPLES,
)
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--precision",
    "precisions",
    default="fp32",
    show_default=True,
    callback=_precisions,
    help="Comma-separated precisions to export: fp32, fp16, int8 (fp32 is always written).",
)
@click.option(
    "--calib",
    "calib",
    type=click.Path(path_type=Path),
    help="Calibration images for INT8: a benchmark folder (calibrates on its seen split, verifies on the "
    "unseen split) or a folder with photo/ and sketch/ subfolders. A holdout (20% of the seen classes, or of "
    "the folder's images) is set aside for the INT8 fallback's decisions.",
)
@click.option("--calib-count", default=512, show_default=True, type=int, help="Calibration images (both domains).")
@click.option(
    "--calib-method",
    default="mse",
    show_default=True,
    type=click.Choice(["mse", "entropy", "percentile", "minmax"]),
    help="INT8 activation ranges: mse (least int8 rounding + clipping error), percentile (99.999th of |x|), "
    "entropy (TensorRT's KL threshold) or minmax.",
)
@click.option(
    "--int8-fallback",
    default=8,
    show_default=True,
    type=click.IntRange(0),
    help="When the INT8 top-10 overlap measured on the holdout (never on the verification images) misses its "
    "limit, keep up to this many of the layers most sensitive to quantization (ranked on the calibration "
    "images) in float (0: off).",
)
@click.option(
    "--int8-float-policy",
    default="first-last",
    show_default=True,
    type=click.Choice(["first-last", "none"]),
    help="INT8: keep the first layer (reads the image) and the last one (the embedding) in float, or not.",
)
@click.option(
    "--int8-min-overlap",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Verification: least top-10 overlap of INT8 rankings with fp32.",
)
@click.option(
    "--int8-max-map-drop",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0),
    help="Verification: largest |delta mAP@all| of INT8 against fp32 on the unseen split.",
)
@click.option("--trt", is_flag=True, help="Also build TensorRT engine plans (needs TensorRT and an NVIDIA GPU).")
@click.option("--opt-batch", default=32, show_default=True, type=int, help="TensorRT profile: optimal batch.")
@click.option("--max-batch", default=256, show_default=True, type=int, help="TensorRT profile: largest batch.")
@click.option(
    "--trt-opt-level",
    default=3,
    show_default=True,
    type=click.IntRange(0, 5),
    help="TensorRT builder optimization level.",
)
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file (reused).")
@click.option("--default", "use_default", is_flag=True, help="Export the embedded default model.")
@click.option("--verify-count", default=32, show_default=True, type=int, help="Verification images per domain.")
@click.option(
    "--eval-count",
    default=1000,
    show_default=True,
    type=int,
    help="Images per domain (seeded sample) for the INT8/FP16 retrieval check on the unseen split.",
)
@click.option(
    "--exporter",
    default="dynamo",
    show_default=True,
    type=click.Choice(["dynamo", "torchscript"]),
    help="torch.onnx exporter.",
)
@click.option("--opset", default=18, show_default=True, type=click.IntRange(13, 21), help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace BUNDLE if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result.")
@export_options
def command(
    checkpoint: Path | None,
    output: Path | None,
    use_default: bool,
    eval_count: int,
    overwrite: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Run the export (see the command help). ``options``: the ``--triton*`` options (``triton_*``, for the
    repository) and the build options, handed as they are to the ``export`` builder (its keyword arguments are
    the options' names: ``zsbir_export.cli.export.export_checkpoint``)."""
    triton = {name: value for name, value in options.items() if name.startswith("triton_")}
    build = {name: value for name, value in options.items() if name not in triton}
    if use_default and checkpoint is not None:
        raise click.UsageError("give either CHECKPOINT or --default, not both")
    if triton["triton_repo"] is not None and output is None:
        bundle = existing_bundle(checkpoint, use_default)
        if bundle is not None:  # a Triton repository from a bundle: no torch needed
            write_from_options(bundle, overwrite=overwrite, quiet=quiet, **triton)
            return
    if output is None:
        raise click.UsageError("missing -o BUNDLE (the bundle folder to write)")
    if checkpoint is None:
        if not use_default:
            raise click.UsageError("missing CHECKPOINT (or pass --default to export the embedded default model)")
        checkpoint = default_checkpoint_path()
        if not checkpoint.is_file():
            raise click.ClickException(f"the embedded default checkpoint is missing: {checkpoint}")
    if eval_count < 1:
        raise click.BadParameter("must be positive", param_hint="--eval-count")

    from zsbir_infer.cli.plugins import BUILDER_GROUP, PluginUnavailable, load_plugin

    try:
        export_checkpoint = load_plugin(BUILDER_GROUP, "export")
    except PluginUnavailable as exc:
        raise click.ClickException(f"exporting a checkpoint {exc}") from exc
    export_checkpoint(checkpoint, output, eval_count=eval_count, overwrite=overwrite, quiet=quiet, **build)
    if triton["triton_repo"] is not None:
        write_from_options(output, overwrite=overwrite, quiet=quiet, **triton)
