"""``zsbir serve``: the HTTP search service and the sketch pad (see :mod:`zsbir_infer.serve`)."""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.core import ParameterSource

from zsbir_infer.cli.embed import BACKEND_CHOICES, search_gallery_options
from zsbir_infer.triton.cli import serve_options


@click.command(
    name="serve",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: zsbir serve   (then open http://127.0.0.1:8000/ and draw)",
)
@search_gallery_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (non-loopback needs --token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option(
    "--token",
    default=None,
    envvar="ZSBIR_SERVE_TOKEN",
    help="Require 'Authorization: Bearer TOKEN' (default: $ZSBIR_SERVE_TOKEN; none on loopback).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Most queries embedded together (1: no micro-batching).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 1000),
    default=5.0,
    show_default=True,
    help="Longest a query waits for others to join its batch.",
)
@click.option(
    "--max-bytes", type=click.IntRange(1024), default=10_000_000, show_default=True, help="Request size limit."
)
@click.option(
    "--max-pixels", type=click.IntRange(1), default=25_000_000, show_default=True, help="Query image pixel limit."
)
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(0.1), default=30.0, show_default=True, help="Per search, s."
)
@click.option("--cors-origin", "cors", multiple=True, help="Allow cross-origin requests from ORIGIN (repeatable).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
@click.option(
    "--engine",
    type=click.Choice(["zsbir", "triton"]),
    default="zsbir",
    show_default=True,
    help="zsbir: this HTTP service and the sketch pad; triton: NVIDIA Triton Inference Server on a model repository "
    "exported for the gallery (HTTP on PORT, gRPC on PORT+1, metrics on PORT+2; model zsbir_search).",
)
@serve_options
def command(
    gallery: Path | None,
    model: Path | None,
    host: str,
    port: int,
    device: str,
    backend: str,
    token: str | None,
    max_batch: int,
    max_wait_ms: float,
    max_bytes: int,
    max_pixels: int,
    timeout_s: float,
    cors: tuple[str, ...],
    log_level: str,
    engine: str,
    triton_encoder: str,
    triton_instances: int,
    triton_repository: Path | None,
) -> None:
    """Serve the gallery over HTTP: POST /v1/search, the photos, /metrics, and a sketch pad at /.

    The gallery is the one `zsbir query` would use. Binds 127.0.0.1 unless --host says otherwise; any other
    address needs --token (every API request then needs 'Authorization: Bearer TOKEN').
    """
    from zsbir_infer.serve import is_loopback

    if engine == "triton":
        from zsbir_infer.triton.cli import serve_triton

        serve_triton(
            gallery,
            model,
            host,
            port,
            repository=triton_repository,
            encoder=triton_encoder,
            instances=triton_instances,
            max_batch=max_batch,
            # Triton's batcher holds even a lone request for its delay, at each step: its own default unless given
            max_wait_ms=None
            if click.get_current_context().get_parameter_source("max_wait_ms") == ParameterSource.DEFAULT
            else max_wait_ms,
            device=device,
        )
        return
    if token is not None and not token.strip():
        token = None
    if not is_loopback(host) and token is None:
        raise click.ClickException(
            f"refusing to serve on {host} (not a loopback address) without --token: anyone who can reach it "
            "could search and read the photos; give --token TOKEN (or $ZSBIR_SERVE_TOKEN)"
        )
    try:
        import uvicorn

        from zsbir_infer.serve.app import ServeConfig, create_app
    except ImportError as exc:
        raise click.ClickException(
            f"zsbir serve needs the 'serve' extra ({exc.name} is missing): pip install 'zsbir[serve]'"
        ) from None

    config = ServeConfig(
        token=token,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        timeout_s=timeout_s,
        cors_origins=tuple(cors),
    )
    try:
        app = create_app(gallery, model, backend=backend, device=device, config=config)
    except ValueError as exc:  # a plain bad argument; zsbir's own errors reach the group's mapping
        raise click.ClickException(str(exc)) from None
    r = app.state.retriever
    click.echo(
        f"zsbir serve: {len(r)} photos from {r.gallery.path}, model {r.fingerprint} ({r.encoder.describe()}), "
        f"search on {r.device}; batching {'off' if max_batch == 1 else f'up to {max_batch} in {max_wait_ms:g} ms'}",
        err=True,
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"sketch pad: http://{shown}:{port}/   API docs: http://{shown}:{port}/docs", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        limit_concurrency=int(os.environ.get("ZSBIR_SERVE_CONCURRENCY", "512")),
        server_header=False,
    )
