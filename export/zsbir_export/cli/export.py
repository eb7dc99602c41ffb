"""The build step of ``zsbir export``: a checkpoint becomes a verified bundle (needs torch and onnx).

The command itself (its options and help) is the runtime's :mod:`zsbir_infer.cli.export`; it finds
:func:`export_checkpoint` through the ``zsbir.builders`` entry point named ``export``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from zsbir_export.cli import require_build_extras

require_build_extras()

__all__ = ["export_checkpoint"]


def export_checkpoint(
    checkpoint: Path,
    output: Path,
    *,
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
    verify_count: int,
    eval_count: int,
    exporter: str,
    opset: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Export ``checkpoint`` to the bundle folder ``output`` and print one line about it.

    Failures are :class:`~zsbir_infer.errors.ZsbirError` (or :class:`click.ClickException`) with a message.
    """
    from zsbir_export.bundle import ExportOptions, export_bundle
    from zsbir_export.verify import Tolerances

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
    options.validate()  # fail on bad options (and absent TensorRT) before loading anything
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
    # Export's own errors (options, calibration, conversion, verification, TensorRT) are ZsbirErrors: the
    # zsbir group shows their message and exit code.
    result = export_bundle(loaded.model, config, output, options, source=source, log=log)
    manifest = result.manifest
    files = ", ".join(m["file"] for m in manifest["models"].values())
    engines = ", ".join(e["file"] for e in manifest["engines"])
    click.echo(
        f"wrote {result.path}: {files}{' + ' + engines if engines else ''} "
        f"(dim {manifest['embedding_dim']}, domain {manifest['domain_handling']}, "
        f"fingerprint {manifest['fingerprint']})"
    )


def _load(checkpoint: Path, log: Callable[[str], None]) -> Any:
    """``load_checkpoint`` with its failures turned into one clear message."""
    from zsbir_export.checkpoints import load_checkpoint

    log(f"loading {checkpoint} ...")
    try:
        return load_checkpoint(checkpoint)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise click.ClickException(f"cannot load checkpoint {checkpoint}: {exc}") from exc
