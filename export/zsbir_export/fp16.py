"""Convert an fp32 ONNX graph to float16 while keeping its interface in float32.

The graph's float inputs and outputs stay float32: a ``Cast`` to float16 follows each float input and a
``Cast`` back to float32 precedes each float output, so callers feed and read exactly what the fp32 model
takes. Inside, every node computes in float16 except the post-processing tail: the nodes downstream of the
last heavy op (Conv/Gemm/MatMul), which is the L2 normalization, stay float32 so that the embedding's norm
is computed at full precision. Written against the plain ``onnx`` API (no onnxconverter-common).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zsbir_infer.errors import ModelError

HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# (op_type, input index) pairs that the ONNX spec requires to stay float32 whatever the data type.
_FLOAT32_ONLY_INPUTS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1)})
_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Error(ModelError, RuntimeError):
    """Raised when a graph cannot be converted to float16."""


def _tail_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of nodes with no heavy op downstream of them (and that are not heavy themselves)."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_heavy: dict[int, bool] = {}

    def visit(i: int) -> bool:
        if i in feeds_heavy:
            return feeds_heavy[i]
        feeds_heavy[i] = False  # graphs are acyclic; this only guards against malformed input
        node = graph.node[i]
        result = node.op_type in HEAVY_OPS or any(visit(j) for o in node.output for j in consumers.get(o, []))
        feeds_heavy[i] = result
        return result

    # Visit in reverse topological order so that recursion stays shallow.
    for i in reversed(range(len(graph.node))):
        visit(i)
    return {i for i, heavy in feeds_heavy.items() if not heavy}


def _float_tensor_names(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    names = {
        vi.name
        for vi in [*graph.input, *graph.output, *graph.value_info]
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    names |= {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    names.add(node.output[0])
    return names


def _to_fp16_array(arr: np.ndarray, name: str) -> np.ndarray:
    too_big = np.abs(arr[np.isfinite(arr)]) > _FP16_MAX
    if too_big.any():
        raise Fp16Error(f"tensor {name!r} holds values beyond the float16 range (max |x| {np.abs(arr).max():.3g})")
    return arr.astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a float16 copy of ``model`` whose float inputs/outputs are still float32 (see module doc)."""
    if model.graph.node and any(n.op_type in ("Loop", "If", "Scan") for n in model.graph.node):
        raise Fp16Error("graphs with control flow (Loop/If/Scan) are not supported by the fp16 converter")
    src = model.graph
    floats = _float_tensor_names(model)
    keep32 = _tail_nodes(src)
    inits = {init.name: init for init in src.initializer}
    graph_inputs = {vi.name for vi in src.input}
    graph_outputs = [vi.name for vi in src.output]

    # Current precision of each float value in the new graph: "32" or "16".
    precision: dict[str, str] = {name: "32" for name in graph_inputs if name in floats}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: dict[str, onnx.TensorProto] = {}
    casts: dict[tuple[str, str], str] = {}
    used_names = {o for n in src.node for o in n.output} | set(inits) | graph_inputs

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def value_as(name: str, want: str) -> str:
        """Name of a value holding ``name`` at precision ``want`` (adding a Cast or an initializer copy)."""
        if name in inits:
            key = (name, want)
            if key not in casts:
                arr = numpy_helper.to_array(inits[name])
                new_name = name if want == "32" else fresh(name + "_fp16")
                data = arr if want == "32" else _to_fp16_array(arr, name)
                new_inits[new_name] = numpy_helper.from_array(data, new_name)
                casts[key] = new_name
            return casts[key]
        have = precision.get(name, want)
        if have == want:
            return name
        key = (name, want)
        if key not in casts:
            out = fresh(f"{name}_to_fp{want}")
            to = TensorProto.FLOAT16 if want == "16" else TensorProto.FLOAT
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=fresh(f"Cast_{out}")))
            casts[key] = out
        return casts[key]

    for index, node in enumerate(src.node):
        want = "32" if index in keep32 else "16"
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(node.input):
            if not name or name not in floats:
                if name in inits:
                    new_inits.setdefault(name, inits[name])
                continue
            target = "32" if (node.op_type, k) in _FLOAT32_ONLY_INPUTS else want
            new.input[k] = value_as(name, target)
        if want == "16":
            for attr in new.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    arr = _to_fp16_array(numpy_helper.to_array(attr.t), f"{node.name}.{attr.name}")
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        for name in node.output:
            if name in floats:
                precision[name] = want
        new_nodes.append(new)

    # Float graph outputs must be float32 again.
    renames: dict[str, str] = {}
    for name in graph_outputs:
        if name in floats and precision.get(name) == "16":
            internal = fresh(name + "_fp16")
            renames[name] = internal
    if renames:
        for node in new_nodes:
            node.output[:] = [renames.get(o, o) for o in node.output]
            node.input[:] = [renames.get(i, i) for i in node.input]
        for name, internal in renames.items():
            new_nodes.append(
                helper.make_node("Cast", [internal], [name], to=TensorProto.FLOAT, name=fresh(f"Cast_{name}_out"))
            )

    graph = helper.make_graph(
        new_nodes,
        src.name,
        list(src.input),
        list(src.output),
        initializer=list(new_inits.values()),
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    for prop in model.metadata_props:
        out.metadata_props.add().CopyFrom(prop)
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:
        raise Fp16Error(f"the float16 graph failed onnx.checker: {exc}") from exc
    return out


def convert_file_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert the ONNX file ``src`` to float16 (interface stays float32) and save it to ``dst``."""
    model = onnx.load(str(src))
    onnx.save_model(convert_to_fp16(model), str(dst))
    return Path(dst)
