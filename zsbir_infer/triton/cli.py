"""The ``--triton`` options of ``zsbir export`` and the ``--engine triton`` part of ``zsbir serve``.

Kept apart from the commands so that they stay a few lines there: :func:`export_options` and
:func:`serve_options` add the options, :func:`existing_bundle` says whether the export source already is a
bundle (then no torch is needed), :func:`write_from_options` writes the repository, and :func:`serve_triton`
runs ``tritonserver`` for a gallery.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["existing_bundle", "export_options", "serve_options", "serve_triton", "write_from_options"]

F = TypeVar("F", bound=Callable[..., Any])


def export_options(f: F) -> F:
    """Add ``--triton REPO``, ``--gallery`` and the ``--triton-*`` options to a click command."""
    options = [
        click.option(
            "--triton",
            "triton_repo",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Also write a Triton Inference Server model repository REPO (ensemble zsbir_search: image bytes in, "
            "top-k photos out). From an existing bundle (or --default) this needs no torch and no -o.",
        ),
        click.option(
            "--gallery",
            "triton_gallery",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="With --triton: the gallery zsbir_topk searches (default: $ZSBIR_GALLERY on the server).",
        ),
        click.option(
            "--triton-encoder",
            type=click.Choice(["onnx", "tensorrt", "python"]),
            default="onnx",
            show_default=True,
            help="The ensemble's encoder: Triton's ONNX Runtime backend, the bundle's TensorRT plans, or ONNX Runtime "
            "inside a Python-backend model (servers without the ONNX Runtime backend).",
        ),
        click.option(
            "--triton-precision",
            type=click.Choice(["fp32", "fp16", "int8"]),
            default="fp32",
            show_default=True,
            help="Precision of the encoder the ensemble calls (every precision of the bundle is written).",
        ),
        click.option(
            "--triton-device",
            type=click.Choice(["auto", "gpu", "cpu"]),
            default="auto",
            show_default=True,
            help="Encoder instances: KIND_GPU or KIND_CPU (auto: GPU, CPU for --triton-encoder python).",
        ),
        click.option(
            "--triton-max-batch", type=click.IntRange(1, 4096), default=32, show_default=True, help="max_batch_size."
        ),
        click.option(
            "--triton-queue-delay-us",
            type=click.IntRange(0),
            default=None,
            help="dynamic_batching max_queue_delay_microseconds of every model (default: 0 with CPU encoder "
            "instances, 1000 with GPU ones). A lone request waits this long at each step; requests that queue while "
            "a model is busy are batched even with 0.",
        ),
        click.option(
            "--triton-instances",
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="Instances of the Python-backend preprocessing (and encoder) models, each a process.",
        ),
        click.option(
            "--triton-search-device",
            type=click.Choice(["cpu", "cuda"]),
            default="cpu",
            show_default=True,
            help="Where zsbir_topk searches (cuda: the fused top-k kernels, CPU fallback where they cannot run).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def serve_options(f: F) -> F:
    """Add the ``--triton-*`` options of ``zsbir serve --engine triton`` to a click command."""
    options = [
        click.option(
            "--triton-encoder",
            type=click.Choice(["auto", "onnx", "python"]),
            default="auto",
            show_default=True,
            help="--engine triton: the encoder model (auto: onnx where the server has the ONNX Runtime backend, else "
            "python).",
        ),
        click.option(
            "--triton-instances",
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="--engine triton: instances (processes) of the Python-backend models.",
        ),
        click.option(
            "--triton-repository",
            type=click.Path(file_okay=False, exists=True, path_type=Path),
            default=None,
            help="--engine triton: serve this repository (from `zsbir export --triton`) instead of exporting one.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def existing_bundle(checkpoint: Path | None, use_default: bool) -> Path | None:
    """The bundle folder the export reads when it is one already (a folder or a manifest.json), else ``None``."""
    if checkpoint is None:
        if use_default:
            from zsbir_infer.bundle import default_bundle_path

            return default_bundle_path()
        return None
    if checkpoint.is_dir() and (checkpoint / "manifest.json").is_file():
        return checkpoint
    if checkpoint.is_file() and checkpoint.name == "manifest.json":
        return checkpoint.parent
    return None


def write_from_options(bundle: Path, *, overwrite: bool, quiet: bool, **opts: Any) -> Path:
    """Write the repository ``opts["triton_repo"]`` for ``bundle`` from the options of :func:`export_options`."""
    from zsbir_infer.triton import TritonError
    from zsbir_infer.triton.repository import TritonRepositoryOptions, write_repository

    options = TritonRepositoryOptions(
        encoder=opts["triton_encoder"],
        precision=opts["triton_precision"],
        device=opts["triton_device"],
        max_batch=opts["triton_max_batch"],
        max_queue_delay_us=opts["triton_queue_delay_us"],
        instances=opts["triton_instances"],
        search_device=opts["triton_search_device"],
        overwrite=overwrite,
    )
    try:
        repo = write_repository(
            bundle,
            opts["triton_repo"],
            opts.get("triton_gallery"),
            options,
            log=None if quiet else (lambda m: click.echo(m, err=True)),
        )
    except TritonError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote Triton model repository {repo} (entry point: zsbir_search; see {repo / 'README.md'})")
    return repo


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def serve_triton(
    gallery: Path | None,
    model: Path | None,
    host: str,
    port: int,
    *,
    repository: Path | None,
    encoder: str,
    instances: int,
    max_batch: int,
    max_wait_ms: float | None,
    device: str,
) -> None:
    """``zsbir serve --engine triton``: export a repository for the gallery and run tritonserver on it."""
    from zsbir_infer.bundle import BundleError, default_bundle_path
    from zsbir_infer.retriever import RetrieverError, resolve_gallery, resolve_model
    from zsbir_infer.serve import is_loopback
    from zsbir_infer.triton import TritonError
    from zsbir_infer.triton.repository import TritonRepositoryOptions, write_repository
    from zsbir_infer.triton.server import TritonServer, find_tritonserver

    if not is_loopback(host):
        raise click.ClickException(
            f"refusing to serve Triton on {host}: tritonserver has no authentication here; keep it on loopback and "
            "put an authenticating proxy in front of it"
        )
    try:
        install = find_tritonserver()
    except TritonError as exc:
        raise click.ClickException(str(exc)) from None
    if encoder == "auto":
        encoder = "onnx" if install.has_onnxruntime else "python"
    if encoder != "python" and not install.has_onnxruntime:
        raise click.ClickException(
            f"this tritonserver ({install.binary}) has no ONNX Runtime backend: use --triton-encoder python"
        )
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        gdir = resolve_gallery(gallery)
        if repository is None:
            bundle = resolve_model(gdir, model)  # the model the gallery was built with, as `zsbir serve` takes
            tmp = tempfile.TemporaryDirectory(prefix="zsbir-triton-repo-")
            opts = TritonRepositoryOptions(
                encoder=encoder,
                device="gpu" if device == "cuda" else "cpu",
                instances=instances,
                max_batch=max_batch,
                max_queue_delay_us=None if max_wait_ms is None else int(max_wait_ms * 1000),
                search_device=device,
            )
            repository = write_repository(bundle or default_bundle_path(), Path(tmp.name) / "repo", gdir, opts)
        server = TritonServer(repository, host=host, port=port, install=install)
        click.echo(f"zsbir serve (triton): {install.binary} ({install.source}) on {repository}", err=True)
        server.start()
    except (TritonError, RetrieverError, BundleError, ValueError, OSError) as exc:
        if tmp is not None:
            tmp.cleanup()
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  "
        f"(model zsbir_search; log {server.log_file}); Ctrl-C stops it",
        err=True,
    )
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean shutdown as Ctrl-C
    try:
        status = server.wait()
        raise click.ClickException(f"tritonserver exited with status {status}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        click.echo("stopping tritonserver ...", err=True)
    finally:
        stopped = server.stop()
        signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            tmp.cleanup()
    click.echo(f"tritonserver stopped (status {stopped})", err=True)
