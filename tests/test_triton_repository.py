"""The Triton model repository written by `zsbir export --triton` (no server): every config.pbtxt parses with
Triton's model-config protobuf (shipped in tritonclient), the encoder configs match the ONNX models' names, types
and shapes, TensorRT plans map to their GPUs, the ensemble's steps connect, and bad requests fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

import onnx
from click.testing import CliRunner
from google.protobuf import text_format
from indexer_support import write_photos
from tiny_bundle import make_bundle
from tritonclient.grpc import model_config_pb2

from zsbir_infer.cli import main
from zsbir_infer.encoder import Encoder
from zsbir_infer.indexer import index_folder
from zsbir_infer.triton import TritonError
from zsbir_infer.triton.repository import TritonRepositoryOptions, write_repository

ENGINES = [
    {
        "precision": "fp32",
        "file": "model.fp32.a100.plan",
        "gpu": "NVIDIA A100-SXM4-80GB",
        "compute_capability": "8.0",
        "tensorrt": "10.13.0",
        "min_batch": 1,
        "opt_batch": 8,
        "max_batch": 64,
    },
    {
        "precision": "fp32",
        "file": "model.fp32.h100.plan",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "90",
        "tensorrt": "10.13.0",
        "min_batch": 1,
        "opt_batch": 16,
        "max_batch": 16,
    },
]

_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.FLOAT16: model_config_pb2.TYPE_FP16,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
}


def _configs(repo: Path) -> dict[str, Any]:
    out = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # raises on any unknown field
        assert cfg.name == path.parent.name
        out[cfg.name] = cfg
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("triton_repo")
    bundle = make_bundle(base / "bundle", extra_precisions=("fp16", "int8"), engines=ENGINES)[0]
    write_photos(base / "photos", 6)
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        index_folder(base / "photos", base / ".zsbir", enc, model=str(bundle))
    finally:
        enc.close()
    return {"base": base, "bundle": bundle, "gallery": base / ".zsbir"}


def _check_encoder_matches_onnx(cfg: Any, onnx_path: Path) -> None:
    m = onnx.load(str(onnx_path))
    assert cfg.max_batch_size > 0
    inputs = {i.name: i for i in cfg.input}
    outputs = {o.name: o for o in cfg.output}
    assert set(inputs) == {i.name for i in m.graph.input}
    assert set(outputs) == {o.name for o in m.graph.output}
    for vi in [*m.graph.input, *m.graph.output]:
        t = inputs.get(vi.name) or outputs[vi.name]
        assert t.data_type == _ONNX_TYPES[vi.type.tensor_type.elem_type], vi.name
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        assert dims[0] == -1  # the batch axis, which Triton's dims leave out
        if len(dims) == 1:  # [batch]: dims [1] reshaped to []
            assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
        else:
            assert list(t.dims) == dims[1:], vi.name


def test_standard_repository_configs_parse_and_match_onnx(setup: dict[str, Any]) -> None:
    repo = write_repository(setup["bundle"], setup["base"] / "std", setup["gallery"])
    cfgs = _configs(repo)
    assert set(cfgs) == {
        "zsbir_search",
        "zsbir_preprocess",
        "zsbir_topk",
        "zsbir_encoder",
        "zsbir_encoder_fp16",
        "zsbir_encoder_int8",
        "zsbir_encoder_trt_fp32",
    }
    for name, file in (("zsbir_encoder", "model.onnx"), ("zsbir_encoder_fp16", "model.fp16.onnx")):
        cfg = cfgs[name]
        assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
        assert (repo / name / "1" / "model.onnx").read_bytes() == (setup["bundle"] / file).read_bytes()
        _check_encoder_matches_onnx(cfg, repo / name / "1" / "model.onnx")
        assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000  # GPU instances: 1 ms
    assert cfgs["zsbir_encoder_int8"].platform == "onnxruntime_onnx"
    # the fp16 test model has float16 IO, and the config says so
    assert cfgs["zsbir_encoder_fp16"].input[0].data_type == model_config_pb2.TYPE_FP16


def test_tensorrt_plans_map_to_their_gpus(setup: dict[str, Any]) -> None:
    repo = write_repository(
        setup["bundle"], setup["base"] / "trt", setup["gallery"], TritonRepositoryOptions(encoder="tensorrt")
    )
    cfg = _configs(repo)["zsbir_encoder_trt_fp32"]
    assert cfg.platform == "tensorrt_plan"
    assert dict(cfg.cc_model_filenames) == {"8.0": "model.fp32.a100.plan", "9.0": "model.fp32.h100.plan"}
    for plan in cfg.cc_model_filenames.values():
        assert (repo / "zsbir_encoder_trt_fp32" / "1" / plan).read_bytes() == (setup["bundle"] / plan).read_bytes()
    assert cfg.max_batch_size == 16  # the smallest engine profile's max
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    _check_encoder_matches_onnx(cfg, setup["bundle"] / "model.onnx")
    ens = _configs(repo)["zsbir_search"]
    assert ens.ensemble_scheduling.step[1].model_name == "zsbir_encoder_trt_fp32"
    assert ens.max_batch_size <= cfg.max_batch_size


def test_ensemble_steps_connect(setup: dict[str, Any]) -> None:
    for variant in ("onnx", "python"):
        repo = write_repository(
            setup["bundle"],
            setup["base"] / f"ens_{variant}",
            setup["gallery"],
            TritonRepositoryOptions(encoder=variant, max_batch=16),
        )
        cfgs = _configs(repo)
        ens = cfgs["zsbir_search"]
        assert ens.platform == "ensemble" and (repo / "zsbir_search" / "1").is_dir()
        assert {i.name: i.optional for i in ens.input} == {"IMAGE": False, "K": True, "DOMAIN": True}
        assert [o.name for o in ens.output] == ["SCORES", "IDS", "PATHS"]
        types = {o.name: o.data_type for o in ens.output}
        assert types == {
            "SCORES": model_config_pb2.TYPE_FP32,
            "IDS": model_config_pb2.TYPE_INT64,
            "PATHS": model_config_pb2.TYPE_STRING,
        }
        available = {i.name for i in ens.input}
        for step in ens.ensemble_scheduling.step:
            model = cfgs[step.model_name]
            assert model.max_batch_size >= ens.max_batch_size
            ins = {i.name for i in model.input}
            outs = {o.name for o in model.output}
            assert set(step.input_map) <= ins and set(step.output_map) <= outs
            required = {i.name for i in model.input if not i.optional}
            assert required <= set(step.input_map), step.model_name
            assert set(step.input_map.values()) <= available, step.model_name  # produced by an earlier step
            available |= set(step.output_map.values())
        assert {"SCORES", "IDS", "PATHS"} <= available
        topk = cfgs["zsbir_topk"]
        params = {k: v.string_value for k, v in topk.parameters.items()}
        assert params["zsbir_gallery"] == str(setup["gallery"].resolve())
        enc = cfgs["zsbir_encoder"]
        if variant == "python":
            assert enc.backend == "python" and not enc.platform
            assert (repo / "zsbir_encoder" / "1" / "model.py").is_file()
            assert json.loads((repo / "zsbir_encoder" / "1" / "bundle" / "manifest.json").read_text())["engines"] == []
            assert "zsbir_encoder_trt_fp32" not in cfgs  # a server without TensorRT could not load it
            assert [g.kind for g in enc.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
            assert enc.dynamic_batching.max_queue_delay_microseconds == 0  # CPU instances: no delay by default
        else:
            assert enc.platform == "onnxruntime_onnx"
        # the standard and the Python encoder have one contract
        _check_encoder_matches_onnx(enc, setup["bundle"] / "model.onnx")
        assert (repo / "README.md").read_text().count("zsbir_search") >= 2


def test_topk_searches_as_retriever_does_with_the_bundles_expansion(tmp_path: Path) -> None:
    # A bundle that recommends query expansion: zsbir_topk must rank as Retriever.search with that bundle does.
    import numpy as np
    from indexer_support import write_sketch

    from zsbir_infer import Retriever
    from zsbir_infer.triton.search import open_retriever

    bundle = make_bundle(tmp_path / "bundle", manifest_overrides={"retrieval": {"expand": 4}})[0]
    write_photos(tmp_path / "photos", 30, sub="x")
    with Encoder.open(bundle, backend="ort-cpu", threads=1) as enc:
        index_folder(tmp_path / "photos", tmp_path / ".zsbir", enc, model=str(bundle))
    repo = write_repository(bundle, tmp_path / "repo", tmp_path / ".zsbir")
    params = {k: v.string_value for k, v in _configs(repo)["zsbir_topk"].parameters.items()}
    assert params["zsbir_expand"] == "4"
    sketches = [str(write_sketch(tmp_path / f"s{i}.png", seed=i)) for i in range(4)]
    with Retriever.open(tmp_path / ".zsbir", bundle, backend="ort-cpu") as r:
        want = r.search(sketches, k=6)
        q = r.embed(sketches)
        plain = r.search(sketches, k=6, expand=0)
    topk = open_retriever(tmp_path / ".zsbir", params["zsbir_fingerprint"], expand=int(params["zsbir_expand"]))
    try:
        got = topk.search(np.asarray(q), k=6)
    finally:
        topk.close()
    assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
    assert [[h.id for h in row] for row in want] != [[h.id for h in row] for row in plain]


def test_refusals(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TritonError, match="already exists"):
        write_repository(setup["bundle"], setup["base"] / "std")
    plain = make_bundle(tmp_path / "plain")[0]
    with pytest.raises(TritonError, match="no fp16 model"):
        write_repository(plain, tmp_path / "r1", options=TritonRepositoryOptions(precision="fp16"))
    with pytest.raises(TritonError, match="no TensorRT plan"):
        write_repository(plain, tmp_path / "r2", options=TritonRepositoryOptions(encoder="tensorrt"))
    other = make_bundle(tmp_path / "other", domain_input=False)[0]
    with pytest.raises(TritonError, match=r"(?i)model"):
        write_repository(other, tmp_path / "r3", setup["gallery"])  # the gallery was built with another model
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r")]  # no temporary folder left behind


def test_cli_from_a_bundle_needs_no_torch(setup: dict[str, Any], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; sys.modules['zsbir_export'] = None\n"
        "from zsbir_infer.cli import main\n"
        f"main(['export', {str(setup['bundle'])!r}, '--triton', {str(repo)!r}, '--gallery', "
        f"{str(setup['gallery'])!r}, '--triton-encoder', 'python', '-q'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote Triton model repository" in done.stdout
    assert _configs(repo)["zsbir_encoder"].backend == "python"


def test_cli_errors_are_messages(setup: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(setup["bundle"]), "--triton", str(setup["base"] / "std")])
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["export", str(tmp_path / "missing"), "--triton", str(tmp_path / "r")])
    assert r.exit_code != 0 and "-o" in r.output
    r = runner.invoke(
        main, ["export", str(setup["bundle"]), "--triton", str(tmp_path / "r"), "--triton-precision", "fp16",
               "--triton-encoder", "tensorrt"]
    )  # fmt: skip
    assert r.exit_code != 0 and "TensorRT plan for fp16" in r.output


def test_serve_triton_says_what_is_missing(setup: dict[str, Any], tmp_path: Path) -> None:
    env_missing = {"ZSBIR_TRITONSERVER": str(tmp_path / "nowhere" / "tritonserver")}
    r = CliRunner().invoke(main, ["serve", "--engine", "triton", "--gallery", str(setup["gallery"])], env=env_missing)
    assert r.exit_code != 0 and "not an executable tritonserver" in r.output
    r = CliRunner().invoke(
        main,
        ["serve", "--engine", "triton", "--gallery", str(setup["gallery"])],
        env={"ZSBIR_TRITONSERVER": "", "ZSBIR_CACHE_DIR": str(tmp_path / "cache")},
    )
    if "pytriton" not in str(r.output):  # an installed pytriton package would be found instead
        assert r.exit_code != 0 and "python -m zsbir_infer.triton install" in r.output
    r = CliRunner().invoke(main, ["serve", "--engine", "triton", "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "no authentication" in r.output


def test_serve_triton_refuses_onnx_encoder_without_the_backend(setup: dict[str, Any]) -> None:
    from zsbir_infer.triton.server import find_tritonserver

    try:
        install = find_tritonserver()
    except TritonError as exc:
        pytest.skip(f"no tritonserver installed: {exc}")
    if install.has_onnxruntime:
        pytest.skip(f"{install.binary} has the ONNX Runtime backend")
    args = ["serve", "--engine", "triton", "--triton-encoder", "onnx", "--gallery", str(setup["gallery"])]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "no ONNX Runtime backend" in r.output and "--triton-encoder python" in r.output


def test_free_port_block_is_free_and_consecutive() -> None:
    import socket

    from zsbir_infer.triton.server import free_port_block

    base = free_port_block(3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", base + i))  # all three bind: the block was free
        with pytest.raises(TritonError, match="no 3 consecutive free ports"):
            free_port_block(3, "203.0.113.1", tries=2)  # an address of no interface here: nothing binds
    finally:
        for s in socks:
            s.close()
