"""zsbir_infer.encoder and backends: ORT CPU against a numpy reference, backend selection and TensorRT
refusal logic (with fake TensorRT / CUDA modules), renormalization, errors."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")

from tiny_bundle import make_bundle, reference_forward

from zsbir_infer.backends import BackendUnavailable, open_backend
from zsbir_infer.backends import tensorrt as trt_backend
from zsbir_infer.backends.base import default_threads
from zsbir_infer.backends.ort import ort_session_options
from zsbir_infer.backends.tensorrt import (
    GpuInfo,
    TensorRTBackend,
    engine_mismatch,
    same_tensorrt_version,
    select_engine,
)
from zsbir_infer.bundle import Bundle, BundleError, EngineInfo
from zsbir_infer.encoder import Encoder, EncoderError, l2_normalize
from zsbir_infer.preprocess import ImageDecodeError, preprocess_batch


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return make_bundle(tmp_path_factory.mktemp("enc") / "b", extra_precisions=("fp16", "int8"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(10):
        arr = rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)
        p = d / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def rand_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


# ----------------------------------------------------------------------------------------- ORT CPU path


def test_embed_preprocessed_batch_matches_reference(bundle_dir: tuple[Path, Any]) -> None:
    root, w = bundle_dir
    with Encoder.open(root, backend="ort-cpu", batch_size=4, threads=1) as enc:
        assert enc.backend == "ort-cpu" and enc.precision == "fp32"
        assert enc.fingerprint == Bundle.open(root).fingerprint and enc.embedding_dim == 6
        x = rand_batch(11)
        for domain, tag in (("photo", 1), ("sketch", 0)):
            got = enc.embed(x, domain)
            assert got.dtype == np.float32 and got.shape == (11, 6)
            ref = reference_forward(x, w, np.full(11, tag))
            np.testing.assert_allclose(got, ref, atol=2e-5)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        # The domain input matters for this conditioned model.
        assert np.abs(enc.embed(x, "photo") - enc.embed(x, "sketch")).max() > 1e-3


def test_embed_preprocessed_batch_goes_to_the_model_in_chunks(bundle_dir: tuple[Path, Any]) -> None:
    """A float NCHW batch is not split into images: one model call per ``batch_size`` rows, nothing decoded."""
    with Encoder.open(bundle_dir[0], backend="ort-cpu", batch_size=4, threads=1) as enc:
        calls: list[int] = []
        run = enc._backend.run

        def counting(x: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
            calls.append(x.shape[0])
            return run(x, tags)

        enc._backend.run = counting  # type: ignore[method-assign]
        progress: list[int] = []
        x = rand_batch(10)
        got = enc.embed(x, "photo", progress=progress.append)
        assert calls == [4, 4, 2] and progress == [10]
        calls.clear()
        np.testing.assert_array_equal(enc.embed(x, "photo", batch_size=5), got)
        assert calls == [5, 5]


def test_embed_paths_equals_preprocess_then_embed(bundle_dir: tuple[Path, Any], images: list[Path]) -> None:
    root, w = bundle_dir
    with Encoder.open(root, backend="ort-cpu", batch_size=3, workers=3, threads=1) as enc:
        calls: list[int] = []
        got = enc.embed(images, "sketch", progress=calls.append)
        assert calls == [3, 3, 3, 1]
        spec = enc.bundle.preprocess_spec("sketch")
        x = preprocess_batch(images, spec)
        np.testing.assert_allclose(got, reference_forward(x, w, np.zeros(len(images))), atol=2e-5)
        # Order is preserved whatever the batch size; inputs may be mixed types. (A pixel array is the full-size
        # decode, while a JPEG path may decode at a reduced scale: compare it with itself embedded alone.)
        pixels = np.asarray(Image.open(images[2]))
        mixed: list[Any] = [str(images[0]), Image.open(images[1]), pixels, images[3]]
        want = np.concatenate([got[:2], enc.embed(pixels, "sketch"), got[3:4]])
        for bs in (1, 3):
            np.testing.assert_allclose(enc.embed(mixed, "sketch", batch_size=bs), want, atol=1e-6)
        np.testing.assert_allclose(enc.embed(images[5], "sketch"), got[5:6], atol=1e-6)
        assert enc.embed([], "photo").shape == (0, 6)


def test_bad_file_names_the_file(bundle_dir: tuple[Path, Any], images: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with Encoder.open(bundle_dir[0], backend="ort-cpu", batch_size=2, threads=1) as enc:
        with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
            enc.embed([*images[:5], bad, *images[5:]], "photo")
        with pytest.raises(ImageDecodeError, match=r"missing\.png"):
            enc.embed([tmp_path / "missing.png"], "photo")


def test_embed_stream_skips_bad_files(bundle_dir: tuple[Path, Any], images: list[Path], tmp_path: Path) -> None:
    bad1, bad2, bad3 = tmp_path / "bad1.jpg", tmp_path / "bad2.png", tmp_path / "gone.png"
    bad1.write_bytes(b"nope")
    bad2.write_bytes(b"\x89PNG\r\n\x1a\n")
    items = [images[0], bad1, images[1], bad2, bad3, images[2], images[3]]  # batch [3:6] has two failures
    with Encoder.open(bundle_dir[0], backend="ort-cpu", batch_size=3, threads=1) as enc:
        batches = list(enc.embed_stream(items, "photo", skip_errors=True))
        assert [(b.start, b.size) for b in batches] == [(0, 3), (3, 3), (6, 1)]
        indices = np.concatenate([b.indices for b in batches])
        assert indices.tolist() == [0, 2, 5, 6]
        failures = [f for b in batches for f in b.failures]
        assert [i for i, _ in failures] == [1, 3, 4]
        assert "bad1.jpg" in failures[0][1] and "bad2.png" in failures[1][1] and "gone.png" in failures[2][1]
        emb = np.concatenate([b.embeddings for b in batches])
        np.testing.assert_allclose(emb, enc.embed([items[i] for i in indices], "photo"), atol=1e-6)
        # A batch with nothing decodable still yields, with an empty embedding block.
        only_bad = list(enc.embed_stream([bad1, bad2], "photo", skip_errors=True))
        assert only_bad[0].embeddings.shape == (0, 6) and len(only_bad[0].failures) == 2
        with pytest.raises(ImageDecodeError, match=r"bad1\.jpg"):
            list(enc.embed_stream(items, "photo"))


def test_embed_input_validation(bundle_dir: tuple[Path, Any]) -> None:
    with Encoder.open(bundle_dir[0], backend="ort-cpu", threads=1) as enc:
        with pytest.raises(ValueError, match="domain"):
            enc.embed(rand_batch(2), "drawing")
        with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
            enc.embed(np.zeros((2, 1, 16, 16), np.float32), "photo")
        with pytest.raises(ValueError, match=r"\(H, W\)"):
            enc.embed(np.zeros((2, 3, 8, 8), np.float32), "photo")
        with pytest.raises(ValueError, match="float"):
            enc.embed(np.zeros((2, 3, 16, 16), np.uint8), "photo")
        # One verb: a 4-D float array is a preprocessed batch, the same rows as the images one by one.
        x = rand_batch(3)
        np.testing.assert_allclose(
            enc.embed(x, "photo"), np.concatenate([enc.embed(x[i : i + 1], "photo") for i in range(3)]), atol=1e-6
        )
        with pytest.raises(ValueError, match="preprocessed batch"):
            enc.embed(np.zeros((2, 16, 16, 3), np.uint8), "photo")


def test_precisions(bundle_dir: tuple[Path, Any]) -> None:
    root, w = bundle_dir
    x = rand_batch(5, seed=3)
    ref = reference_forward(x, w, np.ones(5))
    with Encoder.open(root, precision="fp16", backend="ort-cpu", threads=1) as enc:
        assert enc.describe().startswith("ort-cpu")
        np.testing.assert_allclose(enc.embed(x, "photo"), ref, atol=5e-3)
    with Encoder.open(root, precision="int8", backend="ort-cpu", threads=1) as enc:
        np.testing.assert_allclose(enc.embed(x, "photo"), ref, atol=2e-5)
    with pytest.raises(ValueError, match="precision"):
        Encoder.open(root, precision="fp64")


def test_missing_precision_is_a_bundle_error(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="no fp16 model"):
        Encoder.open(root, precision="fp16", backend="auto")


def test_unconditioned_and_unnormalized_model_is_renormalized(tmp_path: Path) -> None:
    root, w = make_bundle(tmp_path / "b", domain_input=False, normalize=False)
    x = rand_batch(4, seed=5)
    with Encoder.open(root, backend="ort-cpu", threads=1) as enc:
        got = enc.embed(x, "photo")
        np.testing.assert_allclose(got, reference_forward(x, w, None, normalize=True), atol=2e-5)
        np.testing.assert_array_equal(got, enc.embed(x, "sketch"))


def test_non_finite_output_is_an_error(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", output_scale=float("inf"))
    with Encoder.open(root, backend="ort-cpu", threads=1) as enc, pytest.raises(EncoderError, match="non-finite"):
        enc.embed(rand_batch(2), "photo")


def test_manifest_model_disagreement(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b")  # the model has a domain input ...
    m = json.loads((root / "manifest.json").read_text())
    m["domain_handling"] = "none"  # ... the manifest says it has not
    del m["inputs"]["domain"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="disagree"):
        Encoder.open(root, backend="ort-cpu")
    m["embedding_dim"] = 7
    m["outputs"]["embedding"]["shape"] = ["batch", 7]
    m["domain_handling"] = "input"
    m["inputs"]["domain"] = {"name": "domain", "photo": 1, "sketch": 0}
    (root / "manifest.json").write_text(json.dumps(m))
    with Encoder.open(root, backend="ort-cpu") as enc, pytest.raises(EncoderError, match="expected"):
        enc.embed(rand_batch(1), "photo")


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float64)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_session_options_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    so = ort_session_options(3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    import onnxruntime as ort

    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    monkeypatch.setenv("ZSBIR_NUM_THREADS", "5")
    assert default_threads() == 5
    monkeypatch.delenv("ZSBIR_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_threads() <= 16


# --------------------------------------------------------------------------------- backend selection


def test_auto_falls_back_to_cpu_here(bundle_dir: tuple[Path, Any]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime CUDA")
    with Encoder.open(bundle_dir[0], backend="auto", threads=1) as enc:
        assert enc.backend == "ort-cpu"
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        Encoder.open(bundle_dir[0], backend="ort-cuda")


def test_explicit_tensorrt_without_tensorrt(bundle_dir: tuple[Path, Any]) -> None:
    try:
        import tensorrt

        if hasattr(tensorrt, "Builder"):
            pytest.skip("real TensorRT installed")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        Encoder.open(bundle_dir[0], backend="tensorrt")


def test_unknown_backend(bundle_dir: tuple[Path, Any]) -> None:
    with pytest.raises(ValueError, match="backend"):
        Encoder.open(bundle_dir[0], backend="openvino")


def test_encoder_module_never_imports_torch_or_ort_eagerly() -> None:
    code = (
        "import sys\n"
        "import zsbir_infer.encoder, zsbir_infer.bundle, zsbir_infer.preprocess, zsbir_infer.backends\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "assert 'tensorrt' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- TensorRT logic, with fakes


def eng(**kw: Any) -> EngineInfo:
    base: dict[str, Any] = {
        "precision": "fp16",
        "path": Path("/b/model.fp16.h100.plan"),
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "tensorrt": "10.13.0.35",
        "min_batch": 1,
        "opt_batch": 32,
        "max_batch": 256,
    }
    base.update(kw)
    return EngineInfo(**base)


H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def test_tensorrt_version_rule() -> None:
    assert same_tensorrt_version("10.13.0.35", "10.13.0.35")
    assert same_tensorrt_version("10.13.0.35", "10.13.0.36")  # build number not compared
    assert not same_tensorrt_version("10.13.0", "10.12.0")
    assert not same_tensorrt_version("10.13.0", "10.13.1")
    assert same_tensorrt_version("10.x", "10.3.0")
    assert not same_tensorrt_version("", "10.3.0")


def test_engine_mismatch_and_selection() -> None:
    assert engine_mismatch(eng(), H100, "10.13.0.35") is None
    why = engine_mismatch(eng(compute_capability="8.0", gpu="NVIDIA A100"), H100, "10.13.0.35")
    assert why is not None and "A100" in why and "8.0" in why and "9.0" in why
    why = engine_mismatch(eng(tensorrt="10.7.0"), H100, "10.13.0.35")
    assert why is not None and "10.7.0" in why
    why = engine_mismatch(eng(gpu="NVIDIA H100 PCIe"), H100, "10.13.0")  # same architecture, other model
    assert why is not None and "H100 PCIe" in why
    assert engine_mismatch(eng(gpu="nvidia  h100 80gb hbm3"), H100, "10.13.0") is None  # case/space-insensitive
    a100 = eng(gpu="NVIDIA A100", compute_capability="8.0", path=Path("a.plan"))
    small = eng(path=Path("small.plan"), max_batch=64)
    big = eng(path=Path("big.plan"), max_batch=512)
    chosen, reasons = select_engine([a100, small, big], H100, "10.13.0.35")
    assert chosen is big and len(reasons) == 1
    chosen, reasons = select_engine([a100], H100, "10.13.0.35")
    assert chosen is None and "A100" in reasons[0]


class FakeDevice:
    """Fake cuda-python runtime: device memory is host memory; copies are memmove."""

    def __init__(self, name: str = "NVIDIA H100 80GB HBM3", cc: tuple[int, int] = (9, 0), count: int = 1) -> None:
        ok = types.SimpleNamespace(cudaSuccess=0)
        self.cudaError_t = ok
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self._props = types.SimpleNamespace(name=name.encode() + b"\0\0", major=cc[0], minor=cc[1])
        self._count = count
        self.allocs: dict[int, np.ndarray] = {}
        self.freed: list[int] = []

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, self._count

    def cudaGetDeviceProperties(self, i: int) -> tuple[int, Any]:
        return 0, self._props

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"cudaErrorFake"

    def cudaSetDevice(self, i: int) -> tuple[int]:
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, 7

    def cudaStreamDestroy(self, s: int) -> tuple[int]:
        return (0,)

    def cudaStreamSynchronize(self, s: int) -> tuple[int]:
        return (0,)

    def cudaMalloc(self, n: int) -> tuple[int, int]:
        buf = np.zeros(n, dtype=np.uint8)
        self.allocs[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, p: int) -> tuple[int]:
        self.freed.append(p)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, n)
        return (0,)

    def view(self, ptr: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        base = self.allocs[ptr]
        return base[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


def fake_trt(weights: Any, device: FakeDevice, *, version: str = "10.13.0.35", refuse: bool = False) -> Any:
    """A fake tensorrt module whose engine runs the tiny reference model on the fake device memory."""
    mode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    dtypes = {"image": np.float32, "domain": np.int64, "embedding": np.float32}

    class Context:
        def __init__(self) -> None:
            self.addr: dict[str, int] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.shapes["image"][0], weights.fc_w.shape[1])

        def execute_async_v3(self, stream: int) -> bool:
            x = device.view(self.addr["image"], np.float32, self.shapes["image"])
            t = device.view(self.addr["domain"], np.int64, self.shapes["domain"])
            out = reference_forward(x, weights, t).astype(np.float32)
            device.view(self.addr["embedding"], np.float32, out.shape)[...] = out
            return True

    class Engine:
        num_io_tensors = 3

        def get_tensor_name(self, i: int) -> str:
            return ["image", "domain", "embedding"][i]

        def get_tensor_mode(self, name: str) -> str:
            return mode.OUTPUT if name == "embedding" else mode.INPUT

        def get_tensor_dtype(self, name: str) -> str:
            return name

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(1, 3, 16, 16), (4, 3, 16, 16), (4, 3, 16, 16)]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return None if refuse else Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    return types.SimpleNamespace(
        __version__=version,
        Builder=object,
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=mode,
        nptype=lambda name: dtypes[name],
    )


PLAN = {
    "precision": "fp16",
    "file": "model.fp16.h100.plan",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "tensorrt": "10.13.0.35",
    "min_batch": 1,
    "opt_batch": 4,
    "max_batch": 4,
}


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return make_bundle(tmp_path_factory.mktemp("trt") / "b", extra_precisions=("fp16",), engines=[PLAN])


def test_fake_tensorrt_runs_and_batches(trt_bundle: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    root, w = trt_bundle
    dev = FakeDevice()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt(w, dev))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: dev)
    with Encoder.open(root, precision="fp16", backend="auto", batch_size=32) as enc:
        assert enc.backend == "tensorrt"
        assert enc.batch_size == 4  # capped by the engine profile
        assert "model.fp16.h100.plan" in enc.describe()
        x = rand_batch(10, seed=9)
        got = enc.embed(x, "photo")
        np.testing.assert_allclose(got, reference_forward(x, w, np.ones(10)), atol=1e-5)
    assert len(dev.freed) == 3  # image, domain and output buffers


@pytest.mark.parametrize(
    ("device", "kw", "msg"),
    [
        (FakeDevice(name="NVIDIA A100-SXM4-80GB", cc=(8, 0)), {}, r"compute capability 8\.0"),
        (FakeDevice(), {"version": "10.7.0"}, r"this is TensorRT 10\.7\.0"),
        (FakeDevice(name="NVIDIA H100 PCIe"), {}, "this GPU is 'NVIDIA H100 PCIe'"),
        (FakeDevice(), {"refuse": True}, "refused to load"),
        (FakeDevice(count=0), {}, "no CUDA GPU"),
    ],
)
def test_fake_tensorrt_refusals(
    trt_bundle: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch, device: FakeDevice, kw: dict[str, Any], msg: str
) -> None:
    root, w = trt_bundle
    bundle = Bundle.open(root)
    trt = fake_trt(w, device, **kw)
    with pytest.raises(BackendUnavailable, match=msg) as info:
        TensorRTBackend(bundle, "fp16", trt=trt, cudart=device)
    if "GPU" not in msg:
        assert "zsbir export" in str(info.value)  # says how to rebuild
    # auto falls back to ONNX Runtime instead.
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: device)
    be = open_backend(bundle, "fp16", "auto", threads=1)
    assert be.name in ("ort-cuda", "ort-cpu")
    be.close()


def test_fake_tensorrt_no_engine_for_precision(trt_bundle: tuple[Path, Any]) -> None:
    root, w = trt_bundle
    dev = FakeDevice()
    with pytest.raises(BackendUnavailable, match="no fp32 TensorRT engine"):
        TensorRTBackend(Bundle.open(root), "fp32", trt=fake_trt(w, dev), cudart=dev)


# ------------------------------------------------------------------- with the real exporter (torch)


@pytest.mark.torch
def test_encoder_matches_torch_through_exported_bundle(tmp_path: Path) -> None:
    """zsbir_export writes a bundle (fp32, fp16, int8 QDQ); every precision embeds like the torch model."""
    torch = pytest.importorskip("torch")
    from zsbir_export.bundle import ExportOptions, export_bundle

    from zsbir_infer.datasets import open_benchmark
    from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1)
            self.gate = torch.nn.Linear(1, 8)
            self.head = torch.nn.Linear(8, 12)

        def embed(self, x: Any, tag: Any) -> Any:
            h = torch.relu(self.conv(x)).mean(dim=(2, 3))
            h = h * torch.sigmoid(self.gate(tag.to(h.dtype)[:, None]))
            return torch.nn.functional.normalize(self.head(h), dim=1)

    torch.manual_seed(0)
    model = Net().eval()
    spec = {"size": [32, 32]}
    config = {
        "format": "zsbir-checkpoint",
        "version": 1,
        "method": "none",
        "arch": {"backbone": "tiny", "domain_conditioned": True, "embed_dim": 12},
        "preprocess": {"photo": spec, "sketch": spec},
    }
    data = tmp_path / "synth"
    generate_synthetic(
        data,
        SynthConfig(classes=6, unseen=3, photos_per_class=4, sketches_per_class=3, size=48),
        workers=1,
        progress=False,
    )
    options = ExportOptions(
        precisions=("fp16", "int8"), calib_dir=data, calib_count=16, exporter="torchscript", verify_count=4
    )
    source = {"path": "net", "sha256": "0" * 64, "format": "zsbir", "method": "none"}
    export_bundle(model, config, tmp_path / "bundle", options, source=source)
    part = open_benchmark(data).split("unseen")
    for domain, samples, tag in (("sketch", part.sketches, 0), ("photo", part.photos, 1)):
        paths = [s.path for s in samples]
        for precision, min_cos in (("fp32", 0.99999), ("fp16", 0.999), ("int8", 0.99)):
            with Encoder.open(tmp_path / "bundle", precision=precision, backend="ort-cpu", threads=1) as enc:
                got = enc.embed(paths, domain)
                x = preprocess_batch(paths, enc.bundle.preprocess_spec(domain))
            with torch.no_grad():
                ref = model.embed(torch.from_numpy(x), torch.full((len(paths),), tag)).numpy()
            assert (got * ref).sum(axis=1).min() > min_cos, (domain, precision)
