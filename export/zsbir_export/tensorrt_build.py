"""Build TensorRT engine plans from the bundle's ONNX graphs (TensorRT 10+ Python API).

* fp32: the fp32 graph, no precision flags.
* fp16: the fp32 graph with ``BuilderFlag.FP16`` (TensorRT picks fp16 kernels where it pays).
* int8: the QDQ graph built as a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``):
  every int8 tensor is explicit in the graph, so no calibrator and no precision flags are involved.

Every engine gets one optimization profile (batch min/opt/max), the builder optimization level, and a timing
cache that is loaded before and saved after the build so that rebuilds are fast. A plan only runs on the GPU
model and TensorRT version that built it; :func:`check_plan_compatible` refuses a mismatched plan with a
message saying how to rebuild. This module imports ``tensorrt`` only inside functions, and so never needs
torch.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsbir_infer.errors import ModelError, UnavailableError

INSTALL_HINT = "TensorRT is not installed: pip install 'zsbir[tensorrt]' on a machine with an NVIDIA GPU"
PLAN_PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(UnavailableError, RuntimeError):
    """Raised when TensorRT (or a GPU) is needed but absent."""


class EngineBuildError(ModelError, RuntimeError):
    """Raised when parsing or building an engine fails; the message lists the parser's errors."""


class PlanMismatchError(UnavailableError, RuntimeError):
    """Raised when a plan was built for another GPU or TensorRT version than the current ones."""


def tensorrt_module() -> Any:
    """The real ``tensorrt`` module, or :class:`TensorRTUnavailable` with the install hint.

    ``import tensorrt`` also succeeds with only the type stubs installed (an empty namespace package), so
    the check is for ``tensorrt.Builder``.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(INSTALL_HINT) from exc
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(INSTALL_HINT)
    return trt


def tensorrt_available() -> bool:
    """Whether the real TensorRT Python package is importable."""
    try:
        tensorrt_module()
    except TensorRTUnavailable:
        return False
    return True


@dataclass(frozen=True)
class GpuInfo:
    """The current GPU as recorded in (and checked against) the manifest's ``engines`` entries."""

    name: str
    compute_capability: str

    @property
    def slug(self) -> str:
        """A file-name-safe short name, e.g. ``h100-80gb-hbm3`` for "NVIDIA H100 80GB HBM3"."""
        name = re.sub(r"^nvidia\s+", "", self.name.strip(), flags=re.IGNORECASE).lower()
        slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        return slug or "gpu"


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` (via cuda-python's runtime bindings)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef,attr-defined,unused-ignore]
        except ImportError as exc:
            raise TensorRTUnavailable("cuda-python is not installed: pip install 'zsbir[tensorrt]'") from exc
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise TensorRTUnavailable(f"no usable NVIDIA GPU (cudaGetDeviceProperties: error {int(err)})")
    raw = props.name
    name = raw.decode(errors="replace").rstrip("\x00") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}")


@dataclass(frozen=True)
class EngineSpec:
    """What to build: precision, the ONNX source, batch profile and builder settings."""

    precision: str
    onnx_path: Path
    plan_path: Path
    image_shape: tuple[int, int, int]  # (3, H, W)
    has_domain_input: bool
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 256
    optimization_level: int = 3
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for an impossible profile or unknown precision."""
        if self.precision not in PLAN_PRECISIONS:
            raise ValueError(f"unknown engine precision {self.precision!r}; choose one of {PLAN_PRECISIONS}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}"
            )
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"builder optimization level must be 0..5, got {self.optimization_level}")


def plan_file_name(precision: str, gpu: GpuInfo) -> str:
    """``model.<precision>.<gpu slug>.plan`` (CONTRACTS §6)."""
    return f"model.{precision}.{gpu.slug}.plan"


def build_engine(spec: EngineSpec, gpu: GpuInfo | None = None) -> dict[str, Any]:
    """Build one engine plan and return its manifest ``engines`` entry (without file hash and size)."""
    spec.validate()
    tensorrt_module()  # raises the install hint when only the stubs are present
    import tensorrt as trt

    gpu = gpu or current_gpu()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if spec.precision == "int8":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {spec.onnx_path.name}:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    config.builder_optimization_level = spec.optimization_level
    if spec.precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise EngineBuildError(f"{gpu.name} has no fast fp16: build fp32 or int8 instead")
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    c, h, w = spec.image_shape
    batches = (spec.min_batch, spec.opt_batch, spec.max_batch)
    profile.set_shape("image", *(trt.Dims([b, c, h, w]) for b in batches))
    if spec.has_domain_input:
        profile.set_shape("domain", *(trt.Dims([b]) for b in batches))
    config.add_optimization_profile(profile)

    cache_bytes = b""
    if spec.timing_cache is not None and spec.timing_cache.is_file():
        cache_bytes = spec.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT failed to build the {spec.precision} engine from {spec.onnx_path.name} (see its log above)"
        )
    spec.plan_path.parent.mkdir(parents=True, exist_ok=True)
    spec.plan_path.write_bytes(bytes(memoryview(serialized)))
    if spec.timing_cache is not None:
        spec.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        spec.timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {
        "precision": spec.precision,
        "file": spec.plan_path.name,
        "source": spec.onnx_path.name,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": str(trt.__version__),
        "min_batch": spec.min_batch,
        "opt_batch": spec.opt_batch,
        "max_batch": spec.max_batch,
        "strongly_typed": spec.precision == "int8",
        "builder_optimization_level": spec.optimization_level,
    }


def check_plan_compatible(
    engine: dict[str, Any],
    *,
    gpu: GpuInfo | None = None,
    tensorrt_version: str | None = None,
) -> None:
    """Refuse a plan built for another GPU model or TensorRT version (plans are not portable).

    ``engine`` is one entry of the manifest's ``engines`` list. ``gpu`` and ``tensorrt_version`` default to
    the current machine's. Compute capability and the TensorRT major.minor.patch must match exactly (TensorRT
    refuses to deserialize a plan from another version); the GPU name must match too, since tactics are
    tuned per model.
    """
    if tensorrt_version is None:
        tensorrt_version = str(tensorrt_module().__version__)
    if gpu is None:
        gpu = current_gpu()
    problems: list[str] = []
    want_cc = str(engine.get("compute_capability", ""))
    if _trt_release(want_cc)[:2] != _trt_release(gpu.compute_capability)[:2]:
        problems.append(f"compute capability {want_cc} (this GPU: {gpu.compute_capability})")
    want_name = str(engine.get("gpu", ""))
    if " ".join(want_name.split()).lower() != " ".join(gpu.name.split()).lower():
        problems.append(f"GPU {want_name!r} (this GPU: {gpu.name!r})")
    want_trt = str(engine.get("tensorrt", ""))
    if _trt_release(want_trt) != _trt_release(tensorrt_version):
        problems.append(f"TensorRT {want_trt} (installed: {tensorrt_version})")
    if problems:
        precision = engine.get("precision", "fp16")
        raise PlanMismatchError(
            f"engine {engine.get('file', '?')} was built for " + "; ".join(problems) + ". Rebuild it on this "
            f"machine: zsbir export CHECKPOINT -o BUNDLE --precision {precision} --trt "
            "(or run the bundle's ONNX model with ONNX Runtime instead)"
        )


def _trt_release(version: str) -> tuple[str, ...]:
    """major.minor.patch of a TensorRT version string (the build number is ignored)."""
    return tuple(version.split(".")[:3])
