"""`zsbir export`: turn a checkpoint into a deployable bundle (ONNX fp32/fp16/int8, TensorRT plans).

Needs the train extra (torch, onnx); torch is imported only when the command runs, never by the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

EXAMPLES = """
\b
Examples:
  zsbir export runs/tursun/checkpoint.safetensors -o bundles/tursun
  zsbir export model_best.pth.tar -o bundles/dsn --precision fp32,fp16,int8 --calib data/synth
  zsbir export --default -o bundles/default --precision int8 --calib data/synth --trt
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
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
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
def command(
    checkpoint: Path | None,
    output: Path,
    precisions: list[str],
    calib: Path | None,
    calib_count: int,
    calib_method: str,
    int8_fallback: int,
    int8_float_policy: str,
    int8_min_overlap: float,
    int8_max_map_drop: float,
    trt: bool,
    opt_batch: int,
    max_batch: int,
    trt_opt_level: int,
    timing_cache: Path | None,
    use_default: bool,
    verify_count: int,
    eval_count: int,
    exporter: str,
    opset: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Run the export (see the command help)."""
    if use_default and checkpoint is not None:
        raise click.UsageError("give either CHECKPOINT or --default, not both")
    if checkpoint is None:
        if not use_default:
            raise click.UsageError("missing CHECKPOINT (or pass --default to export the embedded default model)")
        checkpoint = default_checkpoint_path()
        if not checkpoint.is_file():
            raise click.ClickException(f"the embedded default checkpoint is missing: {checkpoint}")
    if eval_count < 1:
        raise click.BadParameter("must be positive", param_hint="--eval-count")

    try:
        from zsbir_export.bundle import BundleError, ExportOptions, VerificationFailed, export_bundle
        from zsbir_export.verify import Tolerances
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise click.ClickException(
            f"export needs the train extra (torch, onnx): pip install 'zsbir[train]' ({exc})"
        ) from exc

    options = ExportOptions(
        precisions=precisions,
        calib_dir=calib,
        calib_count=calib_count,
        calib_method=calib_method,  # type: ignore[arg-type]
        int8_fallback=int8_fallback,
        int8_float_policy=int8_float_policy,  # type: ignore[arg-type]
        tolerances=Tolerances(int8_min_top10_overlap=int8_min_overlap, int8_max_map_delta=int8_max_map_drop),
        verify_count=verify_count,
        eval_count=eval_count,
        trt=trt,
        opt_batch=opt_batch,
        max_batch=max_batch,
        trt_optimization_level=trt_opt_level,
        timing_cache=timing_cache,
        exporter=exporter,  # type: ignore[arg-type]
        opset=opset,
        overwrite=overwrite,
    )
    try:
        options.validate()  # fail on bad options (and absent TensorRT) before loading anything
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    if output.exists() and not overwrite:
        raise click.ClickException(f"{output} already exists (pass --overwrite to replace it)")

    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    loaded = _load(checkpoint, log)
    config: dict[str, Any] = dict(loaded.config)
    source = {
        "path": str(checkpoint),
        "sha256": loaded.sha256,
        "format": loaded.source_format,
        "method": config.get("method"),
    }
    from zsbir_export.calibration import CalibrationError
    from zsbir_export.fp16 import Fp16Error
    from zsbir_export.onnx_export import ExportError
    from zsbir_export.quantize import QuantizationError
    from zsbir_export.tensorrt_build import EngineBuildError, TensorRTUnavailable

    try:
        result = export_bundle(loaded.model, config, output, options, source=source, log=log)
    except VerificationFailed as exc:
        raise click.ClickException(str(exc)) from exc
    except (
        BundleError,
        CalibrationError,
        ExportError,
        Fp16Error,
        QuantizationError,
        EngineBuildError,
        TensorRTUnavailable,
    ) as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = result.manifest
    files = ", ".join(m["file"] for m in manifest["models"].values())
    engines = ", ".join(e["file"] for e in manifest["engines"])
    click.echo(
        f"wrote {result.path}: {files}{' + ' + engines if engines else ''} "
        f"(dim {manifest['embedding_dim']}, domain {manifest['domain_handling']}, "
        f"fingerprint {manifest['fingerprint']})"
    )


def _load(checkpoint: Path, log: Any) -> Any:
    """``load_checkpoint`` with its failures turned into one clear message."""
    try:
        from zsbir_export.checkpoints import load_checkpoint
    except ImportError as exc:
        raise click.ClickException(f"cannot import the checkpoint loader: {exc}") from exc
    log(f"loading {checkpoint} ...")
    try:
        return load_checkpoint(checkpoint)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise click.ClickException(f"cannot load checkpoint {checkpoint}: {exc}") from exc
