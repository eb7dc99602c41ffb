"""Export a model's ``embed(images, tag)`` method to an fp32 ONNX graph with a dynamic batch.

The graph takes ``image`` (float32, NCHW) and, for domain-conditioned models, ``domain`` (int64, one tag per
image: photo 1, sketch 0) and returns ``embedding`` (float32, L2-normalized), so a search is a plain inner
product. Two exporters are supported: torch's ``dynamo`` exporter (the default in torch >= 2.9, built on
``torch.export``) and the older TorchScript exporter (``dynamo=False``); both give a constant-folded graph at
opset 18, which ONNX Runtime and TensorRT 10 parse.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from zsbir_infer.errors import ModelError

IMAGE_INPUT = "image"
DOMAIN_INPUT = "domain"
EMBEDDING_OUTPUT = "embedding"
DEFAULT_OPSET = 18
Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[Exporter, ...] = ("dynamo", "torchscript")


class ExportError(ModelError, RuntimeError):
    """Raised when a model cannot be exported to a valid ONNX graph."""


@dataclass(frozen=True)
class OnnxExportInfo:
    """What :func:`export_onnx` produced."""

    path: Path
    embedding_dim: int
    domain_conditioned: bool
    input_size: tuple[int, int]
    opset: int
    exporter: Exporter


class EmbedGraph(nn.Module):
    """Adapts ``model.embed(images, tag)`` to the bundle's graph signature.

    For domain-conditioned models ``forward(image, domain)``; otherwise ``forward(image)`` and the model is
    called with an all-sketch tag that it ignores.
    """

    def __init__(self, model: nn.Module, domain_conditioned: bool) -> None:
        super().__init__()
        if not callable(getattr(model, "embed", None)):
            raise ExportError(f"{type(model).__name__} has no embed(images, tag) method to export")
        self.model = model
        self.domain_conditioned = domain_conditioned

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        """Return the L2-normalized embeddings of ``image`` (N,3,H,W) for the tags ``domain`` (N,)."""
        if domain is None:
            domain = torch.zeros(image.shape[0], dtype=torch.int64, device=image.device)
        out: torch.Tensor = self.model.embed(image, domain)  # type: ignore[operator]
        return out


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress prints and deprecation chatter (errors still propagate)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def sample_inputs(batch: int, input_size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random images (N,3,H,W) and alternating domain tags (N,) for tracing and checks."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, input_size[0], input_size[1], generator=gen)
    domain = torch.arange(batch, dtype=torch.int64) % 2
    return image, domain


def check_domain_usage(model: nn.Module, domain_conditioned: bool, input_size: tuple[int, int]) -> None:
    """Refuse a config that says "unconditioned" for a model whose embedding does depend on the tag."""
    if domain_conditioned:
        return
    image, _ = sample_inputs(2, input_size, seed=1)
    with torch.no_grad():
        a = model.embed(image, torch.zeros(2, dtype=torch.int64))  # type: ignore[operator]
        b = model.embed(image, torch.ones(2, dtype=torch.int64))  # type: ignore[operator]
    if not torch.allclose(a, b, atol=1e-6):
        raise ExportError(
            "the checkpoint config says the model is not domain-conditioned (arch.domain_conditioned false), "
            "but its embedding changes with the domain tag; fix the config"
        )


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def _finalize_names(model: onnx.ModelProto, tmp_output: str) -> None:
    """Give the output its public name, moving any intermediate value that already has it out of the way."""
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    if EMBEDDING_OUTPUT in taken:
        _rename_value(graph, EMBEDDING_OUTPUT, EMBEDDING_OUTPUT + "_internal")
    _rename_value(graph, tmp_output, EMBEDDING_OUTPUT)


def _set_batch_dim(model: onnx.ModelProto, names: set[str]) -> None:
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in names and vi.type.tensor_type.shape.dim:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node doc strings and metadata (the dynamo exporter records Python stack traces and source
    line numbers there), so the file, and the bundle fingerprint computed from it, depend only on the graph
    and weights, not on where the model's source code happens to sit."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    domain_conditioned: bool,
    input_size: tuple[int, int],
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "dynamo",
) -> OnnxExportInfo:
    """Export ``model.embed`` to ``path`` as an fp32 ONNX graph with a dynamic batch dimension.

    The model must already be in eval mode on the CPU (as ``load_checkpoint`` returns it). The exported graph
    is checked with ``onnx.checker`` (full check, with shape inference) and run once in ONNX Runtime at two
    batch sizes so that a graph whose batch got baked in is caught here, not at deployment.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not 11 <= opset <= 21:
        raise ExportError(f"opset {opset} is outside the range this exporter supports (11..21)")
    path = Path(path)
    model = model.eval().cpu()
    check_domain_usage(model, domain_conditioned, input_size)
    wrapper = EmbedGraph(model, domain_conditioned).eval()
    image, domain = sample_inputs(2, input_size)
    args: tuple[torch.Tensor, ...] = (image, domain) if domain_conditioned else (image,)
    input_names = [IMAGE_INPUT, DOMAIN_INPUT] if domain_conditioned else [IMAGE_INPUT]
    tmp_output = "zsbir_export_embedding_output"
    tmpdir = tempfile.TemporaryDirectory(prefix="zsbir-onnx-")
    legacy_path = Path(tmpdir.name) / "legacy.onnx"
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=65536)
                dynamic_shapes: dict[str, Any] = {"image": {0: batch}}
                if domain_conditioned:
                    dynamic_shapes["domain"] = {0: batch}
                program = torch.onnx.export(
                    wrapper,
                    args,
                    input_names=input_names,
                    output_names=[tmp_output],
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
                if program is None:  # pragma: no cover - defensive
                    raise ExportError("torch.onnx.export returned no program")
                onnx_model = program.model_proto
            else:
                dynamic_axes = {name: {0: "batch"} for name in [*input_names, tmp_output]}
                torch.onnx.export(
                    wrapper,
                    args,
                    str(legacy_path),
                    input_names=input_names,
                    output_names=[tmp_output],
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
                onnx_model = onnx.load(str(legacy_path))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx ({exporter} exporter) could not export the model: {exc}") from exc
    finally:
        tmpdir.cleanup()

    _finalize_names(onnx_model, tmp_output)
    strip_debug_info(onnx_model)
    _set_batch_dim(onnx_model, {*input_names, EMBEDDING_OUTPUT})
    onnx_model.producer_name = "zsbir-export"
    try:
        onnx_model = onnx.shape_inference.infer_shapes(onnx_model, strict_mode=True)
        onnx.checker.check_model(onnx_model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph failed onnx.checker: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx_model, str(path))

    out_dims = onnx_model.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2 or not out_dims[1].HasField("dim_value"):
        raise ExportError(f"the exported embedding output has shape {out_dims}; expected [batch, D]")
    embedding_dim = int(out_dims[1].dim_value)
    _check_dynamic_batch(path, model, domain_conditioned, input_size, embedding_dim)
    return OnnxExportInfo(path, embedding_dim, domain_conditioned, input_size, opset, exporter)


def _check_dynamic_batch(
    path: Path, model: nn.Module, domain_conditioned: bool, input_size: tuple[int, int], dim: int
) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        image, domain = sample_inputs(batch, input_size, seed=batch)
        feed = {IMAGE_INPUT: image.numpy()}
        if domain_conditioned:
            feed[DOMAIN_INPUT] = domain.numpy()
        out = np.asarray(sess.run([EMBEDDING_OUTPUT], feed)[0])
        if out.shape != (batch, dim):
            raise ExportError(
                f"the exported graph returned shape {out.shape} for batch {batch}; expected {(batch, dim)}"
            )
        with torch.no_grad():
            ref = model.embed(image, domain).numpy()  # type: ignore[operator]
        err = float(np.abs(out - ref).max())
        if not np.isfinite(out).all() or err > 1e-3:
            raise ExportError(f"the exported graph disagrees with torch at batch {batch} (max abs diff {err:.3g})")
