"""Test helper: write tiny model bundles (CONTRACTS §6) with the onnx helper API, plus a numpy reference.

The manifest is written by :class:`zsbir_infer.bundle.BundleManifest`, as export writes it.

The model is conv3x3(3->C, pad 1) -> ReLU -> global average pool -> (+ domain_tag * dvec) -> linear(C->D)
-> L2 normalize, small enough to run in microseconds. ``reference_forward`` computes the same thing in
numpy so tests can check the encoder end to end. Usable from any test module::

    from tiny_bundle import make_bundle, reference_forward
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zsbir_infer.bundle import BundleManifest
from zsbir_infer.preprocess import PreprocessSpec

SPEC: dict[str, Any] = PreprocessSpec(size=(16, 16)).to_dict()  # squash, bilinear, ImageNet mean/std, RGB


@dataclass
class TinyWeights:
    """Parameters of the tiny model."""

    conv_w: np.ndarray  # [C, 3, 3, 3]
    conv_b: np.ndarray  # [C]
    dvec: np.ndarray  # [C]
    fc_w: np.ndarray  # [C, D]
    fc_b: np.ndarray  # [D]


def make_weights(channels: int = 8, dim: int = 6, seed: int = 0) -> TinyWeights:
    """Random but fixed weights."""
    rng = np.random.default_rng(seed)
    return TinyWeights(
        conv_w=rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32),
        conv_b=rng.normal(0, 0.1, channels).astype(np.float32),
        dvec=rng.normal(0, 1.0, channels).astype(np.float32),
        fc_w=rng.normal(0, 1.0, (channels, dim)).astype(np.float32),
        fc_b=rng.normal(0, 0.1, dim).astype(np.float32),
    )


def reference_forward(x: np.ndarray, w: TinyWeights, tags: np.ndarray | None, normalize: bool = True) -> np.ndarray:
    """Numpy float64 forward pass of the tiny model on [N,3,H,W] inputs."""
    x = x.astype(np.float64)
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, w.conv_w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, :, dy : dy + h, dx : dx + wd]  # [N,3,H,W]
            conv += np.einsum("nchw,oc->nohw", patch, w.conv_w[:, :, dy, dx].astype(np.float64))
    conv += w.conv_b[None, :, None, None]
    feat = np.maximum(conv, 0).mean(axis=(2, 3))
    if tags is not None:
        feat = feat + tags.astype(np.float64)[:, None] * w.dvec[None, :]
    out = feat @ w.fc_w.astype(np.float64) + w.fc_b
    if normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out


def write_onnx(
    path: Path,
    w: TinyWeights,
    *,
    domain_input: bool = True,
    normalize: bool = True,
    names: tuple[str, str, str] = ("image", "domain", "embedding"),
    fp16_io: bool = False,
    output_scale: float = 1.0,
) -> None:
    """Write the tiny model as ONNX (opset 17, dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    image, domain, embedding = names
    inits = [
        numpy_helper.from_array(w.conv_w, "conv_w"),
        numpy_helper.from_array(w.conv_b, "conv_b"),
        numpy_helper.from_array(w.fc_w, "fc_w"),
        numpy_helper.from_array(w.fc_b, "fc_b"),
        numpy_helper.from_array(w.dvec[None, :], "dvec"),
        numpy_helper.from_array(np.array([1e-12], dtype=np.float32), "eps"),
        numpy_helper.from_array(np.array([output_scale], dtype=np.float32), "scale"),
    ]
    nodes = []
    x_name = image
    if fp16_io:
        nodes.append(helper.make_node("Cast", [image], ["x32"], to=TensorProto.FLOAT))
        x_name = "x32"
    nodes += [
        helper.make_node("Conv", [x_name, "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
    ]
    feat = "f"
    inputs = [
        helper.make_tensor_value_info(
            image, TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT, ["batch", 3, 16, 16]
        )
    ]
    if domain_input:
        inputs.append(helper.make_tensor_value_info(domain, TensorProto.INT64, ["batch"]))
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"))
        nodes += [
            helper.make_node("Cast", [domain], ["df"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["df", "one_axis"], ["du"]),
            helper.make_node("Mul", ["du", "dvec"], ["dm"]),
            helper.make_node("Add", ["f", "dm"], ["fd"]),
        ]
        feat = "fd"
    nodes += [
        helper.make_node("MatMul", [feat, "fc_w"], ["m"]),
        helper.make_node("Add", ["m", "fc_b"], ["lin"]),
    ]
    last = "lin"
    if normalize:
        nodes += [
            helper.make_node("ReduceL2", ["lin"], ["nrm"], axes=[1], keepdims=1),
            helper.make_node("Max", ["nrm", "eps"], ["nrm2"]),
            helper.make_node("Div", ["lin", "nrm2"], ["unit"]),
        ]
        last = "unit"
    nodes.append(helper.make_node("Mul", [last, "scale"], ["scaled"]))
    if fp16_io:
        nodes.append(helper.make_node("Cast", ["scaled"], [embedding], to=TensorProto.FLOAT16))
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], [embedding]))
    out_type = TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(embedding, out_type, ["batch", int(w.fc_w.shape[1])])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_bundle(
    root: Path,
    *,
    domain_input: bool = True,
    weights: TinyWeights | None = None,
    normalize: bool = True,
    extra_precisions: tuple[str, ...] = (),
    engines: list[dict[str, Any]] | None = None,
    manifest_overrides: dict[str, Any] | None = None,
    sketch_spec: dict[str, Any] | None = None,
    output_scale: float = 1.0,
) -> tuple[Path, TinyWeights]:
    """Write a complete tiny bundle folder at ``root``; returns (root, weights).

    ``extra_precisions``: "fp16" writes a float16-IO copy, "int8" a plain fp32 copy under the int8 name
    (enough to exercise precision selection). ``engines`` entries are written as dummy plan files.
    """
    w = weights or make_weights()
    root.mkdir(parents=True, exist_ok=True)
    write_onnx(root / "model.onnx", w, domain_input=domain_input, normalize=normalize, output_scale=output_scale)
    files = {"fp32": "model.onnx"}
    if "fp16" in extra_precisions:
        write_onnx(root / "model.fp16.onnx", w, domain_input=domain_input, normalize=normalize, fp16_io=True)
        files["fp16"] = "model.fp16.onnx"
    if "int8" in extra_precisions:
        write_onnx(root / "model.int8.onnx", w, domain_input=domain_input, normalize=normalize)
        files["int8"] = "model.int8.onnx"
    dim = int(w.fc_w.shape[1])
    for e in engines or []:
        (root / e["file"]).write_bytes(b"not a real plan")
    manifest = BundleManifest.create(
        root,
        models=files,
        embedding_dim=dim,
        domain_conditioned=domain_input,
        input_size=(16, 16),
        preprocess={"photo": SPEC, "sketch": sketch_spec or SPEC},
        engines=engines or [],
        normalized=normalize,
        extra={
            "source": {"path": "tiny", "sha256": "0" * 64, "format": "zsbir", "method": "none"},
            "created": "2026-01-01T00:00:00Z",
        },
    ).to_dict()
    manifest.update(manifest_overrides or {})
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root, w
