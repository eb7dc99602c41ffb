"""The kernel library (ctypes) and the CUDA runtime (cuda-python), both loaded lazily, never torch.

``availability()`` decides once per process whether the GPU path can run and says why not when it
cannot: the library file is missing or does not load, cuda-python is absent, no driver or device, or a
device older than compute capability 8.0. ``ZSBIR_DISABLE_GPU=1`` forces the CPU path;
``ZSBIR_KERNELS_LIB=/path/libzsbir_kernels.so`` loads another build of the library.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from zsbir_infer.errors import UnavailableError

LIB_ENV = "ZSBIR_KERNELS_LIB"
DISABLE_ENV = "ZSBIR_DISABLE_GPU"
ABI_VERSION = 1
LIB_NAME = "libzsbir_kernels.so"

# Status codes of zsbir_kernels.h.
STATUS_OK = 0
CUDA_ERROR_BASE = 1000
PATHS = {"auto": 0, "simt": 1, "tensor": 2, "tensor32": 3}
GALLERY_F16 = 0
GALLERY_I8 = 1


class GpuError(UnavailableError, RuntimeError):
    """A CUDA runtime or kernel-library failure (not an input error: those raise ValueError/TypeError)."""


def library_path() -> Path:
    """Where the kernel library is looked for (``$ZSBIR_KERNELS_LIB`` or the package's ``_lib`` folder)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "_lib" / LIB_NAME


def _declare(lib: ctypes.CDLL) -> None:
    c_i64 = ctypes.c_int64
    vp = ctypes.c_void_p
    lib.zsbir_abi_version.argtypes = []
    lib.zsbir_abi_version.restype = ctypes.c_int
    lib.zsbir_status_string.argtypes = [ctypes.c_int]
    lib.zsbir_status_string.restype = ctypes.c_char_p
    lib.zsbir_topk_ip.argtypes = [vp, vp, vp, ctypes.c_int, c_i64, c_i64, c_i64, c_i64, vp, vp, ctypes.c_int, vp]
    lib.zsbir_topk_ip.restype = ctypes.c_int
    lib.zsbir_hamming_topk.argtypes = [vp, vp, c_i64, c_i64, c_i64, c_i64, vp, vp, vp]
    lib.zsbir_hamming_topk.restype = ctypes.c_int


@functools.cache
def _load(path: str) -> tuple[ctypes.CDLL | None, str]:
    p = Path(path)
    if not p.is_file():
        return None, f"kernel library not built: {p} is missing (run `make kernels`)"
    try:
        lib = ctypes.CDLL(str(p))
    except OSError as exc:
        return None, f"cannot load {p}: {exc}"
    try:
        _declare(lib)
    except AttributeError as exc:
        return None, f"{p} lacks an expected symbol: {exc}"
    version = int(lib.zsbir_abi_version())
    if version != ABI_VERSION:
        return None, f"{p} has ABI version {version}, this package needs {ABI_VERSION} (rebuild: `make kernels`)"
    return lib, ""


def load_library() -> ctypes.CDLL:
    """The loaded kernel library; raises GpuError saying why when it cannot be loaded."""
    lib, reason = _load(str(library_path()))
    if lib is None:
        raise GpuError(reason)
    return lib


def status_string(code: int) -> str:
    """The library's message for a status code."""
    msg = load_library().zsbir_status_string(int(code))
    return msg.decode() if isinstance(msg, bytes) else str(msg)


def check_status(code: int, what: str) -> None:
    """Raise GpuError for a non-zero status code of the kernel library."""
    if code != STATUS_OK:
        raise GpuError(f"{what} failed: {status_string(code)} (zsbir status {code})")


def runtime() -> Any:
    """The ``cuda.bindings.runtime`` module (imported on first use)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GpuError("cuda-python is not installed (pip install 'cuda-python>=12')") from exc
    return rt


def _error_text(rt: Any, err: Any) -> str:
    try:
        res = rt.cudaGetErrorString(err)
        text = res[1] if isinstance(res, tuple) else res
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # pragma: no cover - defensive
        return str(err)


def cuda_call(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` result, raising GpuError on failure."""
    rt = runtime()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        raise GpuError(f"{what}: {_error_text(rt, err)}")
    if len(rest) == 0:
        return None
    return rest[0] if len(rest) == 1 else rest


@functools.cache
def _probe(path: str, disabled: bool) -> tuple[bool, str]:
    if disabled:
        return False, f"GPU path disabled by {DISABLE_ENV}"
    lib, reason = _load(path)
    if lib is None:
        return False, reason
    try:
        rt = runtime()
    except GpuError as exc:
        return False, str(exc)
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return False, f"no usable CUDA device: {_error_text(rt, err)}"
    if count < 1:
        return False, "no CUDA device"
    try:
        dev = cuda_call(rt.cudaGetDevice(), "cudaGetDevice")
        major = cuda_call(
            rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, dev), "attribute"
        )
        minor = cuda_call(
            rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, dev), "attribute"
        )
    except GpuError as exc:
        return False, str(exc)
    if int(major) < 8:
        return False, f"CUDA device {dev} has compute capability {major}.{minor}; the kernels need 8.0 or newer"
    return True, f"CUDA device {dev} (compute capability {major}.{minor}) with {path}"


def availability() -> tuple[bool, str]:
    """``(True, description)`` when the GPU kernels can run here, else ``(False, reason)``."""
    disabled = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
    return _probe(str(library_path()), disabled)


def reset_cache() -> None:
    """Forget the cached library and device probe (tests, or after changing the environment variables)."""
    _load.cache_clear()
    _probe.cache_clear()


# ----------------------------------------------------------------------------------------------------------
# Device memory, copies and stream ordering (cuda-python runtime API).


class DeviceBuffer:
    """Device memory owned by this package. Stream-ordered when created with a stream."""

    def __init__(self, nbytes: int, stream: int | None = None) -> None:
        rt = runtime()
        self.nbytes = int(nbytes)
        self.stream = stream
        self.ptr = 0
        if self.nbytes == 0:
            return
        if stream is None:
            self.ptr = int(cuda_call(rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        else:
            self.ptr = int(cuda_call(rt.cudaMallocAsync(self.nbytes, stream), f"cudaMallocAsync({self.nbytes})"))

    def free(self) -> None:
        """Release the memory (stream-ordered for stream allocations). Idempotent."""
        if self.ptr == 0:
            return
        ptr, self.ptr = self.ptr, 0
        rt = runtime()
        if self.stream is None:
            cuda_call(rt.cudaFree(ptr), "cudaFree")
        else:
            cuda_call(rt.cudaFreeAsync(ptr, self.stream), "cudaFreeAsync")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.free()


def upload(arr: np.ndarray, stream: int | None) -> DeviceBuffer:
    """Copy a host array to new device memory (on ``stream`` when given)."""
    rt = runtime()
    host = np.ascontiguousarray(arr)
    buf = DeviceBuffer(host.nbytes, stream)
    if host.nbytes:
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            cuda_call(rt.cudaMemcpy(buf.ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy H2D")
        else:
            cuda_call(rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, kind, stream), "cudaMemcpyAsync H2D")
            # pageable source: make sure the copy has consumed `host` before it can be freed
            cuda_call(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
    return buf


def copy_to_host(dst: np.ndarray, src_ptr: int, stream: int) -> None:
    """Copy ``dst.nbytes`` from device memory into the contiguous host array ``dst`` and wait for it."""
    rt = runtime()
    if dst.nbytes:
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(rt.cudaMemcpyAsync(dst.ctypes.data, src_ptr, dst.nbytes, kind, stream), "cudaMemcpyAsync D2H")
    cuda_call(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def copy_to_device(dst_ptr: int, src: np.ndarray, stream: int) -> None:
    """Copy a contiguous host array into existing device memory and wait for it."""
    rt = runtime()
    if src.nbytes:
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(rt.cudaMemcpyAsync(dst_ptr, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync H2D")
    cuda_call(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def stream_wait(waiter: int, producer: int) -> None:
    """Make ``waiter`` wait for the work already enqueued on ``producer`` (no host synchronisation)."""
    if waiter == producer:
        return
    rt = runtime()
    event = cuda_call(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
    try:
        cuda_call(rt.cudaEventRecord(event, producer), "cudaEventRecord")
        cuda_call(rt.cudaStreamWaitEvent(waiter, event, 0), "cudaStreamWaitEvent")
    finally:
        cuda_call(rt.cudaEventDestroy(event), "cudaEventDestroy")


def synchronize(stream: int) -> None:
    """Wait for all work on ``stream``."""
    rt = runtime()
    cuda_call(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def current_device() -> int:
    """The current CUDA device ordinal."""
    rt = runtime()
    return int(cuda_call(rt.cudaGetDevice(), "cudaGetDevice"))
