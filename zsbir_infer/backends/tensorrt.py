"""The TensorRT backend: runs a plan from the bundle with the TensorRT 10 runtime API and cuda-python.

A TensorRT plan only runs on the GPU model (name and compute capability) and the TensorRT version that
built it. The manifest records these for every engine (CONTRACTS §6); :func:`select_engine` picks a
matching one before anything is deserialized, and the backend refuses with a message saying how to
rebuild when none matches. A plan that TensorRT itself refuses to deserialize is reported the same way.

Detection: the ``tensorrt-stubs`` package makes ``import tensorrt`` succeed as an empty namespace, so
the real library is recognised by ``hasattr(tensorrt, "Builder")``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from zsbir_infer.backends.base import Backend, BackendUnavailable
from zsbir_infer.bundle import BundleError, EngineInfo

if TYPE_CHECKING:
    # Names from the tensorrt-stubs package, for readers. (mypy sees them as Any: the stubs ship without
    # py.typed and do not parse with mypy 2.x, tensorrt_bindings/tensorrt.pyi line 6137.)
    import tensorrt as trt_types

    from zsbir_infer.bundle import Bundle

__all__ = [
    "GpuInfo",
    "TensorRTBackend",
    "engine_mismatch",
    "import_cudart",
    "import_tensorrt",
    "query_gpu",
    "rebuild_hint",
    "same_tensorrt_version",
    "select_engine",
]

log = logging.getLogger("zsbir.backends.tensorrt")


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine would run on."""

    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"


def import_tensorrt() -> Any:
    """Import the real TensorRT Python package or raise :class:`BackendUnavailable`."""
    try:
        import tensorrt as trt
    except ImportError:
        trt_found = False
    else:
        # `tensorrt-stubs` alone makes `import tensorrt` succeed as an empty namespace package.
        trt_found = hasattr(trt, "Builder")
    if not trt_found:
        raise BackendUnavailable(
            "TensorRT is not installed (pip install 'zsbir[tensorrt]' on a machine with an NVIDIA GPU); "
            "use --backend ort-cuda or ort-cpu"
        )
    return trt


def import_cudart() -> Any:
    """Import the CUDA runtime bindings of cuda-python (12.x or 13.x layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            cudart = importlib.import_module("cuda.cudart")  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed (pip install 'zsbir[tensorrt]')") from None
    return cudart


def _cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result, raising on error."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise BackendUnavailable(f"CUDA error in {what}: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def query_gpu(cudart: Any, device_id: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device_id``; :class:`BackendUnavailable` if none."""
    try:
        count = _cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"no usable CUDA GPU ({exc})") from None
    if not count or device_id >= count:
        raise BackendUnavailable(f"no CUDA GPU with index {device_id} (found {count or 0})")
    prop = _cuda_call(cudart, cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    raw = prop.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(name=name.strip(), compute_capability=f"{prop.major}.{prop.minor}")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in str(v).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def same_tensorrt_version(built: str, runtime: str) -> bool:
    """True when a plan built by TensorRT ``built`` can be loaded by ``runtime``: same major.minor.patch
    (missing components of ``built``, as in ``"10.x"``, are not compared)."""
    b, r = _version_tuple(built), _version_tuple(runtime)
    if not b or not r:
        return False
    n = min(3, len(b))
    return b[:n] == r[:n]


def _normalize_cc(cc: str) -> str:
    t = _version_tuple(cc)
    return f"{t[0]}.{t[1] if len(t) > 1 else 0}" if t else str(cc)


def _same_gpu_name(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def engine_mismatch(engine: EngineInfo, gpu: GpuInfo, trt_version: str) -> str | None:
    """Why ``engine`` cannot run on ``gpu`` with TensorRT ``trt_version``, or None if it can.

    The compute capability, the GPU model name (tactics are tuned per model; the rule of
    ``zsbir_export.tensorrt_build``) and the TensorRT major.minor.patch must all match.
    """
    if _normalize_cc(engine.compute_capability) != _normalize_cc(gpu.compute_capability):
        return (
            f"{engine.path.name} was built for {engine.gpu} (compute capability {engine.compute_capability}), "
            f"this GPU is {gpu.name} (compute capability {gpu.compute_capability})"
        )
    if not _same_gpu_name(engine.gpu, gpu.name):
        return f"{engine.path.name} was built for {engine.gpu!r}, this GPU is {gpu.name!r}"
    if not same_tensorrt_version(engine.tensorrt, trt_version):
        return f"{engine.path.name} was built with TensorRT {engine.tensorrt}, this is TensorRT {trt_version}"
    return None


def select_engine(engines: Sequence[EngineInfo], gpu: GpuInfo, trt_version: str) -> tuple[EngineInfo | None, list[str]]:
    """Pick the engine to run: a compatible one (see :func:`engine_mismatch`) with the largest max batch.
    Returns ``(engine or None, why each other engine was refused)``."""
    ok: list[EngineInfo] = []
    reasons: list[str] = []
    for e in engines:
        why = engine_mismatch(e, gpu, trt_version)
        if why is None:
            ok.append(e)
        else:
            reasons.append(why)
    if not ok:
        return None, reasons
    ok.sort(key=lambda e: -e.max_batch)
    return ok[0], reasons


def rebuild_hint(bundle: Bundle, precision: str) -> str:
    """How to get an engine for this machine."""
    return (
        f"build one on this machine with `zsbir export CHECKPOINT -o {bundle.path} --precision {precision} "
        "--trt` (a TensorRT plan only runs on the GPU model and TensorRT version that built it), "
        "or use --backend ort-cuda / ort-cpu"
    )


class TensorRTBackend(Backend):
    """Runs a TensorRT plan listed in the bundle manifest for ``precision``.

    ``trt`` and ``cudart`` may be injected (tests use fakes); by default the real modules are imported.
    """

    name = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp16",
        *,
        device_id: int = 0,
        trt: Any = None,
        cudart: Any = None,
    ) -> None:
        """Select, verify and deserialize the engine; allocate device buffers for its max batch."""
        self._buffers: list[Any] = []
        self._stream: Any = None
        trt = trt if trt is not None else import_tensorrt()
        cudart = cudart if cudart is not None else import_cudart()
        self._trt, self._cudart = trt, cudart
        candidates = bundle.engines_for(precision)
        if not candidates:
            raise BackendUnavailable(
                f"the bundle has no {precision} TensorRT engine; {rebuild_hint(bundle, precision)}"
            )
        gpu = query_gpu(cudart, device_id)
        trt_version = str(getattr(trt, "__version__", "unknown"))
        engine_info, reasons = select_engine(candidates, gpu, trt_version)
        if engine_info is None:
            raise BackendUnavailable(
                f"no {precision} TensorRT engine in the bundle fits this machine ({'; '.join(reasons)}); "
                + rebuild_hint(bundle, precision)
            )
        self.engine_info = engine_info
        self.gpu = gpu
        self.precision = precision
        self.device_id = device_id
        plan = bundle.engine_path(engine_info).read_bytes()

        _cuda_call(cudart, cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._logger: trt_types.Logger = trt.Logger(trt.Logger.WARNING)
        self._runtime: trt_types.Runtime = trt.Runtime(self._logger)
        engine: trt_types.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT {trt_version} refused to load {engine_info.path.name}; " + rebuild_hint(bundle, precision)
            )
        self._engine: trt_types.ICudaEngine = engine
        context: trt_types.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        self._context: trt_types.IExecutionContext = context
        self._bind(bundle)

    def _bind(self, bundle: Bundle) -> None:
        trt, cudart = self._trt, self._cudart
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected = [bundle.image_input] + ([bundle.domain_input] if bundle.domain_input else [])
        if sorted(inputs) != sorted(expected) or bundle.output_name not in outputs:
            raise BundleError(
                f"{self.engine_info.path}: engine tensors (inputs {inputs}, outputs {outputs}) disagree with the "
                f"manifest (inputs {expected}, output {bundle.output_name!r})"
            )
        self._image_name = bundle.image_input
        self._domain_name = bundle.domain_input
        self._output_name = bundle.output_name
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in [*expected, self._output_name]}
        # The optimization profile bounds the batch size; the manifest's figures are only a cross-check.
        mins, opts, maxs = engine.get_tensor_profile_shape(self._image_name, 0)
        self.min_batch, self.opt_batch, self._max = int(mins[0]), int(opts[0]), int(maxs[0])
        self.max_batch = self._max
        chw = tuple(int(maxs[i]) for i in range(1, len(maxs)))
        self._chw = chw
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        dim = bundle.embedding_dim
        sizes = {
            self._image_name: self._max * int(np.prod(chw)) * self._dtypes[self._image_name].itemsize,
            self._output_name: self._max * dim * self._dtypes[self._output_name].itemsize,
        }
        if self._domain_name:
            sizes[self._domain_name] = self._max * self._dtypes[self._domain_name].itemsize
        self._ptrs: dict[str, int] = {}
        for tensor, nbytes in sizes.items():
            ptr = _cuda_call(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
            self._buffers.append(ptr)
            self._ptrs[tensor] = int(ptr)
            if not self._context.set_tensor_address(tensor, int(ptr)):
                raise BackendUnavailable(f"TensorRT refused the device buffer for {tensor!r}")

    def run(self, images: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
        """Copy the batch in, execute on the backend's CUDA stream, copy the embeddings out."""
        cudart, ctx = self._cudart, self._context
        n = int(images.shape[0])
        if not self.min_batch <= n <= self._max:
            raise ValueError(f"batch of {n} is outside the engine's range [{self.min_batch}, {self._max}]")
        if tuple(images.shape[1:]) != self._chw:
            raise ValueError(f"images must be [N, {', '.join(map(str, self._chw))}], got {list(images.shape)}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        stream = self._stream
        x = np.ascontiguousarray(images, dtype=self._dtypes[self._image_name])
        if not ctx.set_input_shape(self._image_name, x.shape):
            raise ValueError(f"TensorRT rejected input shape {x.shape}")
        _cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(self._ptrs[self._image_name], x.ctypes.data, x.nbytes, h2d, stream),
            "copy in",
        )
        t = None
        if self._domain_name is not None:
            if tags is None:
                raise ValueError("this model needs domain tags")
            t = np.ascontiguousarray(tags, dtype=self._dtypes[self._domain_name])
            if not ctx.set_input_shape(self._domain_name, t.shape):
                raise ValueError(f"TensorRT rejected domain shape {t.shape}")
            _cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(self._ptrs[self._domain_name], t.ctypes.data, t.nbytes, h2d, stream),
                "copy in",
            )
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execution failed")
        dims = ctx.get_tensor_shape(self._output_name)
        shape = tuple(int(dims[i]) for i in range(len(dims)))
        out = np.empty(shape, dtype=self._dtypes[self._output_name])
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(out.ctypes.data, self._ptrs[self._output_name], out.nbytes, d2h, stream),
            "copy out",
        )
        _cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        del x, t  # host buffers must outlive the asynchronous copies, i.e. until the synchronize above
        return out.astype(np.float32, copy=False)

    def describe(self) -> str:
        """Backend, plan file, GPU and precision."""
        return f"tensorrt ({self.engine_info.path.name} on {self.gpu.name}, {self.precision})"

    def close(self) -> None:
        """Free device buffers and the stream."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr in self._buffers:
            cudart.cudaFree(ptr)
        self._buffers = []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self.__dict__.pop("_context", None)
        self.__dict__.pop("_engine", None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
