"""The Python GPU path run end to end without a GPU: the kernels on the CPU emulator (``make -C kernels emu``) and
the CUDA runtime faked over host memory (tests/fake_cuda_runtime.py).

Everything public that runs on ``device="cuda"`` is covered: ``gpu.topk_ip`` / ``gpu.hamming_topk`` (host and
CUDA Array Interface / DLPack device inputs, producer and explicit streams, ``out=`` arrays, every kernel path,
int8 galleries), ``gpu.GpuGallery`` and ``Retriever`` with ``device="cuda"``. On integer-valued float16 data every
float32 sum is exact, so the GPU path must equal the CPU path exactly, tie order included. The fake runtime
defers asynchronous work until something synchronises, so missing waits and missing synchronisations show up
as garbage results; it also fails a test on any out-of-range / freed-memory access and on leaked allocations.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_cuda_runtime import EmulatedGpu, FakeCudaRuntime, cudaDeviceAttr, cudaError_t, cudaMemcpyKind, emulated_gpu
from test_gpu_topk import (
    _DLManaged,
    check_topk,
    int_valued,
    ip_tolerance,
    ref_hamming,
    ref_topk_ip,
)

from zsbir_infer import gpu
from zsbir_infer.gpu import _cuda

H2D = cudaMemcpyKind.cudaMemcpyHostToDevice
D2H = cudaMemcpyKind.cudaMemcpyDeviceToHost
PATHS = ["auto", "simt", "tensor", "tensor32"]


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedGpu]:
    """The emulated GPU; the test fails on emulator faults, runtime misuse or leaked device memory."""
    with emulated_gpu(monkeypatch) as env:
        yield env


def ok(result: Any) -> Any:
    """The value of a successful fake-runtime call."""
    assert result[0] == cudaError_t.cudaSuccess, result
    return result[1] if len(result) == 2 else None


# --------------------------------------------------------------------------------------------------------------
# Device arrays in fake device memory


class DevArray:
    """Fake device memory exposed through ``__cuda_array_interface__`` v3 (what CuPy / torch / Numba give).

    ``from_host(..., produced_on=s)``: the data is written asynchronously on stream ``s`` and the interface names
    it, so a consumer must order its work after ``s`` (the fake runs the copy only when something forces it).
    """

    def __init__(
        self,
        rt: FakeCudaRuntime,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        stream: int | None = None,
        offset: int = 0,
        readonly: bool = False,
    ) -> None:
        self.rt = rt
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.base = int(ok(rt.cudaMalloc(self.nbytes + offset))) if self.nbytes + offset else 0
        self.ptr = self.base + offset if self.nbytes else 0
        self.stream = stream
        self.readonly = readonly
        self._src: np.ndarray | None = None

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, self.readonly),
            "version": 3,
            "strides": None,
            "stream": self.stream,
        }

    @classmethod
    def from_host(
        cls, rt: FakeCudaRuntime, a: np.ndarray, *, produced_on: int | None = None, offset: int = 0
    ) -> DevArray:
        d = cls(rt, a.shape, a.dtype, stream=produced_on, offset=offset)
        d._src = np.ascontiguousarray(a).copy()  # alive until the deferred copy has run
        if d.nbytes:
            if produced_on is None:
                ok(rt.cudaMemcpy(d.ptr, d._src.ctypes.data, d.nbytes, H2D))
            else:
                ok(rt.cudaMemcpyAsync(d.ptr, d._src.ctypes.data, d.nbytes, H2D, produced_on))
        return d

    def poison(self) -> None:
        ok(self.rt.cudaMemset(self.ptr, 0x7F, self.nbytes))
        ok(self.rt.cudaDeviceSynchronize())

    def host(self) -> np.ndarray:
        """The contents after all device work (cudaDeviceSynchronize, then a synchronous copy)."""
        ok(self.rt.cudaDeviceSynchronize())
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            ok(self.rt.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, D2H))
        return out

    def free(self) -> None:
        if self.base:
            ok(self.rt.cudaFree(self.base))
            self.base = 0


_DL_CODES = {"i": 0, "u": 1, "f": 2}


class DLPackDev:
    """A DLPack producer over a :class:`DevArray` (kDLCUDA), honouring the consumer's stream like torch does:
    when the data was produced on another stream (``producer``), the consumer's stream is made to wait for it
    with an event. DLPack does not publish the producer's stream, so the array's CAI stream is not used."""

    def __init__(self, arr: DevArray, *, producer: int | None = None, device_id: int = 0, byte_offset: int = 0) -> None:
        self.arr = arr
        self.producer = producer
        self.device_id = device_id
        self.seen_streams: list[Any] = []
        self._shape = (ctypes.c_int64 * max(1, len(arr.shape)))(*arr.shape)
        dt = arr.dtype
        self._t = _DLManaged(
            arr.ptr - byte_offset if arr.ptr else 0,
            2,
            device_id,
            len(arr.shape),
            _DL_CODES[dt.kind],
            dt.itemsize * 8,
            1,
            self._shape,
            None,
            byte_offset,
            None,
            None,
        )

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.device_id)

    def __dlpack__(self, stream: Any = None) -> Any:
        self.seen_streams.append(stream)
        rt = self.arr.rt
        if self.producer is not None and stream != self.producer:
            consumer = 1 if stream is None else int(stream)
            ev = ok(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))
            ok(rt.cudaEventRecord(ev, self.producer))
            ok(rt.cudaStreamWaitEvent(consumer, ev, 0))
            ok(rt.cudaEventDestroy(ev))
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._t), b"dltensor", None)


def new_stream(rt: FakeCudaRuntime, non_blocking: bool = True) -> int:
    return int(ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking if non_blocking else 0)))


# --------------------------------------------------------------------------------------------------------------
# The fake itself: same API as cuda-python, and it catches what it should


def test_fake_runtime_matches_cuda_python() -> None:
    """Names, parameter names, enum values, constants and messages of the fake agree with cuda-python's."""
    real = pytest.importorskip("cuda.bindings.runtime")
    fake = FakeCudaRuntime()
    names = [n for n in dir(FakeCudaRuntime) if n.startswith("cuda") and callable(getattr(fake, n))]
    functions = [n for n in names if not isinstance(getattr(FakeCudaRuntime, n), type)]
    assert "cudaMallocAsync" in functions and "cudaStreamWaitEvent" in functions
    for name in functions:
        want = list(inspect.signature(getattr(real, name)).parameters)
        got = list(inspect.signature(getattr(fake, name)).parameters)
        assert got == want, f"{name}: fake takes {got}, cuda-python takes {want}"
    for enum_cls in (cudaError_t, cudaMemcpyKind, cudaDeviceAttr):
        real_enum = getattr(real, enum_cls.__name__)
        for member in enum_cls:
            assert int(getattr(real_enum, member.name)) == int(member), member
    for const in ("cudaStreamNonBlocking", "cudaStreamLegacy", "cudaStreamPerThread", "cudaEventDisableTiming"):
        assert getattr(fake, const) == getattr(real, const), const
    for member in cudaError_t:
        assert fake.cudaGetErrorString(member) == real.cudaGetErrorString(getattr(real.cudaError_t, member.name))
        assert fake.cudaGetErrorName(member) == real.cudaGetErrorName(getattr(real.cudaError_t, member.name))


def test_fake_runtime_catches_memory_misuse() -> None:
    rt = FakeCudaRuntime()
    host = np.arange(128, dtype=np.uint8)
    p = ok(rt.cudaMalloc(64))
    assert p % 256 == 0 and rt.live_bytes() == 64
    ok(rt.cudaMemcpy(p, host.ctypes.data, 64, H2D))
    assert rt.take_violations() == []
    assert rt.cudaMemcpy(p, host.ctypes.data, 65, H2D)[0] == cudaError_t.cudaErrorInvalidValue
    assert "1 bytes past the end" in rt.take_violations()[0]
    assert rt.cudaMemcpy(p + 8, host.ctypes.data, 64, H2D)[0] != cudaError_t.cudaSuccess
    assert "past the end" in rt.take_violations()[0]
    assert rt.cudaMemcpy(host.ctypes.data, host.ctypes.data + 64, 8, H2D)[0] != cudaError_t.cudaSuccess
    assert "not device memory" in rt.take_violations()[0]
    assert rt.cudaMemcpy(p, p, 8, H2D)[0] != cudaError_t.cudaSuccess
    assert "passed as host memory" in rt.take_violations()[0]
    assert rt.cudaFree(p + 8)[0] == cudaError_t.cudaErrorInvalidValue
    assert "not the start" in rt.take_violations()[0]
    # a write past the end (as a kernel would do) is found when the memory is freed
    ctypes.memset(p + 64, 0, 1)
    ok(rt.cudaFree(p))
    assert "past the end" in rt.take_violations()[0]
    assert rt.cudaFree(p)[0] == cudaError_t.cudaErrorInvalidValue
    assert "double free" in rt.take_violations()[0]
    out = np.zeros(8, np.uint8)
    assert rt.cudaMemcpy(out.ctypes.data, p, 8, D2H)[0] != cudaError_t.cudaSuccess
    assert "use after free" in rt.take_violations()[0]
    # stream-ordered free: using the memory after cudaFreeAsync was enqueued is a use after free
    s = new_stream(rt)
    q = ok(rt.cudaMallocAsync(32, s))
    ok(rt.cudaFreeAsync(q, s))
    assert rt.cudaMemcpyAsync(out.ctypes.data, q, 8, D2H, s)[0] != cudaError_t.cudaSuccess
    assert "cudaFreeAsync" in rt.take_violations()[0]
    assert len(rt.live_allocations()) == 1  # free pending until the stream runs
    ok(rt.cudaStreamSynchronize(s))
    assert rt.live_allocations() == []
    ok(rt.cudaStreamDestroy(s))
    assert rt.cudaStreamSynchronize(s)[0] == cudaError_t.cudaErrorInvalidResourceHandle
    assert "destroyed stream" in rt.take_violations()[0]
    assert rt.cudaMemcpyAsync(out.ctypes.data, 0, 0, D2H, 12345)[0] != cudaError_t.cudaSuccess
    assert "unknown stream" in rt.take_violations()[0]
    with pytest.raises(TypeError):
        rt.cudaStreamSynchronize("stream")
    leak = ok(rt.cudaMalloc(10))
    assert [a.ptr for a in rt.live_allocations()] == [leak]
    assert "test_fake_runtime_catches_memory_misuse" in rt.live_allocations()[0].origin
    assert rt.take_violations() == []


def test_fake_runtime_defers_work_in_stream_order() -> None:
    """Asynchronous work runs only when forced, in stream order: what a missing wait or sync looks like."""
    rt = FakeCudaRuntime()
    src = np.arange(16, dtype=np.uint8)
    out = np.zeros(16, np.uint8)
    a, b = ok(rt.cudaMalloc(16)), ok(rt.cudaMalloc(16))
    s1, s2 = new_stream(rt), new_stream(rt)
    ok(rt.cudaMemcpyAsync(a, src.ctypes.data, 16, H2D, s1))
    ok(rt.cudaMemcpyAsync(out.ctypes.data, a, 16, D2H, s1))
    assert not out.any() and rt.cudaStreamQuery(s1)[0] == cudaError_t.cudaErrorNotReady  # not synchronised yet
    ok(rt.cudaStreamSynchronize(s1))
    np.testing.assert_array_equal(out, src)
    # s2 copies a -> b without waiting for s1's new write: it sees the old contents
    src2 = src + 100
    ok(rt.cudaMemcpyAsync(a, src2.ctypes.data, 16, H2D, s1))
    ok(rt.cudaMemcpyAsync(b, a, 16, cudaMemcpyKind.cudaMemcpyDeviceToDevice, s2))
    ok(rt.cudaStreamSynchronize(s2))
    ok(rt.cudaMemcpy(out.ctypes.data, b, 16, D2H))
    np.testing.assert_array_equal(out, src)
    # with an event the copy is ordered after the write
    ok(rt.cudaMemcpyAsync(a, (src + 50).ctypes.data, 16, H2D, s1))
    ev = ok(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))
    ok(rt.cudaEventRecord(ev, s1))
    ok(rt.cudaStreamWaitEvent(s2, ev, 0))
    ok(rt.cudaEventDestroy(ev))
    ok(rt.cudaMemcpyAsync(b, a, 16, cudaMemcpyKind.cudaMemcpyDeviceToDevice, s2))
    ok(rt.cudaStreamSynchronize(s2))
    ok(rt.cudaMemcpy(out.ctypes.data, b, 16, D2H))
    np.testing.assert_array_equal(out, src + 50)
    # a blocking stream and the legacy default stream synchronise implicitly; a non-blocking one does not
    blocking = new_stream(rt, non_blocking=False)
    keep = src + 7
    ok(rt.cudaMemcpyAsync(a, keep.ctypes.data, 16, H2D, blocking))
    ok(rt.cudaMemcpy(out.ctypes.data, a, 16, D2H))
    np.testing.assert_array_equal(out, keep)
    keep2 = src + 9
    ok(rt.cudaMemcpyAsync(a, keep2.ctypes.data, 16, H2D, s1))
    ok(rt.cudaMemcpy(out.ctypes.data, a, 16, D2H))
    np.testing.assert_array_equal(out, keep)  # s1's copy has not run
    ok(rt.cudaDeviceSynchronize())
    for p in (a, b):
        ok(rt.cudaFree(p))
    for s in (s1, s2, blocking):
        ok(rt.cudaStreamDestroy(s))
    assert rt.take_violations() == [] and rt.live_allocations() == [] and rt.pending_work() == 0


# --------------------------------------------------------------------------------------------------------------
# Availability


@pytest.mark.parametrize(
    ("runtime", "available", "expect"),
    [
        (FakeCudaRuntime(), True, "CUDA device 0 (compute capability 9.0) with"),
        (FakeCudaRuntime(compute_capability=(7, 5)), False, "capability 7.5; the kernels need 8.0 or newer"),
        (FakeCudaRuntime(device_count=0), False, "no usable CUDA device: no CUDA-capable device"),
        (
            FakeCudaRuntime(driver_error=cudaError_t.cudaErrorInsufficientDriver),
            False,
            "no usable CUDA device: CUDA driver version is insufficient",
        ),
    ],
    ids=["sm90", "sm75", "no-device", "no-driver"],
)
def test_availability(monkeypatch: pytest.MonkeyPatch, runtime: FakeCudaRuntime, available: bool, expect: str) -> None:
    with emulated_gpu(monkeypatch, runtime=runtime) as env:
        ok_, reason = gpu.availability()
        assert ok_ == available and expect in reason, reason
        assert gpu.is_available() == ok_
        q, g = np.ones((1, 8), np.float16), np.ones((3, 8), np.float16)
        if available:
            assert str(env.lib_path) in reason
            assert gpu.topk_ip(q, g, 2)[1].tolist() == [[0, 1]]
            assert env.runtime.launches == [("zsbir_topk_ip", 0)]  # device="auto" took the GPU
        else:
            with pytest.raises(RuntimeError, match="device='cuda' requested"):
                gpu.topk_ip(q, g, 2, device="cuda")
            assert gpu.topk_ip(q, g, 2)[1].tolist() == [[0, 1]]  # auto: the CPU
            assert env.runtime.launches == []


# --------------------------------------------------------------------------------------------------------------
# Inner product and Hamming top-k against the CPU path

IP_SHAPES = [  # (Q, N, D, k)
    (1, 1, 1, 1),
    (3, 129, 64, 10),
    (5, 300, 37, 100),
    (2, 50, 17, 60),  # k > N
    (4, 0, 16, 3),  # empty gallery
    (0, 30, 8, 4),  # no queries
    (7, 200, 8, 1),
    (2, 150, 24, 256),  # the tensor paths' largest k
    (3, 40, 2048, 5),  # the largest dimension
    (33, 70, 16, 9),  # more queries than one tensor tile
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("nq", "n", "d", "k"), IP_SHAPES)
def test_topk_ip_equals_cpu(emu: EmulatedGpu, path: Any, nq: int, n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(nq * 1000 + n + d + k)
    q = int_valued(rng, (nq, d), -3, 3)
    g = int_valued(rng, (n, d), -1, 1)  # few distinct scores: many exact ties
    s, i = gpu.topk_ip(q, g, k, device="cuda", path=path)
    s_cpu, i_cpu = gpu.topk_ip(q, g, k, device="cpu")
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (nq, k)
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
    _, val, idx = ref_topk_ip(q, g, k)
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(s, val.astype(np.float32))
    assert emu.runtime.launches == [("zsbir_topk_ip", 0)]


@pytest.mark.parametrize("path", ["auto", "simt"])
def test_topk_ip_large_k(emu: EmulatedGpu, path: Any) -> None:
    rng = np.random.default_rng(4)
    q = int_valued(rng, (3, 12))
    g = int_valued(rng, (700, 12), -1, 1)
    for k in (257, 1024):
        s, i = gpu.topk_ip(q, g, k, device="cuda", path=path)
        s_cpu, i_cpu = gpu.topk_ip(q, g, k, device="cpu")
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)
    with pytest.raises(ValueError, match="k <= 256"):
        gpu.topk_ip(q, g, 257, device="cuda", path="tensor")


@pytest.mark.parametrize("path", PATHS)
def test_topk_ip_int8_gallery(emu: EmulatedGpu, path: Any) -> None:
    rng = np.random.default_rng(11)
    for nq, n, d, k in [(6, 333, 40, 25), (1, 90, 13, 120), (2, 0, 8, 4)]:
        if path.startswith("tensor") and k > 256:
            continue
        q = int_valued(rng, (nq, d))
        g8 = rng.integers(-128, 128, size=(n, d), dtype=np.int8)
        scales = (2.0 ** rng.integers(-8, 2, size=n)).astype(np.float32)  # exact products
        s, i = gpu.topk_ip(q, g8, k, scales=scales, device="cuda", path=path)
        s_cpu, i_cpu = gpu.topk_ip(q, g8, k, scales=scales, device="cpu")
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)
        s64, i64 = gpu.topk_ip(q, g8, k, scales=scales.astype(np.float64), device="cuda", path=path)
        np.testing.assert_array_equal(i64, i_cpu)
        np.testing.assert_array_equal(s64, s_cpu)


@pytest.mark.parametrize("path", PATHS)
def test_topk_ip_random_floats_close_to_float64(emu: EmulatedGpu, path: Any) -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((9, 72)).astype(np.float16)
    g = rng.standard_normal((260, 72)).astype(np.float16)
    s, i = gpu.topk_ip(q, g, 17, device="cuda", path=path)
    full, _, _ = ref_topk_ip(q, g, 17)
    check_topk(s, i, full, 17, ip_tolerance(q, g))
    # float32/float64 host inputs are rounded to float16 first, as on the CPU
    s2, i2 = gpu.topk_ip(q.astype(np.float64), g.astype(np.float32), 17, device="cuda", path=path)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_array_equal(s2, s)


def test_topk_ip_nan_and_infinity_rank_like_the_cpu(emu: EmulatedGpu) -> None:
    q = np.ones((2, 4), np.float16)
    q[1] = -1
    g = np.array(
        [[np.nan, 0, 0, 0], [-1, -1, -1, -1], [1, 1, 1, 1], [np.nan] * 4, [np.inf, 0, 0, 0], [0, 0, 0, 0]], np.float16
    )
    for path in PATHS:
        s, i = gpu.topk_ip(q, g, 6, device="cuda", path=path)  # type: ignore[arg-type]
        s_cpu, i_cpu = gpu.topk_ip(q, g, 6, device="cpu")
        np.testing.assert_array_equal(i, i_cpu, err_msg=path)
        np.testing.assert_array_equal(s, s_cpu, err_msg=path)


HAMMING_SHAPES = [(1, 1, 8, 1), (3, 100, 8, 10), (2, 77, 16, 80), (4, 500, 128, 1024), (2, 0, 8, 3), (5, 257, 32, 5)]


@pytest.mark.parametrize(("nq", "n", "nbytes", "k"), HAMMING_SHAPES)
def test_hamming_equals_cpu(emu: EmulatedGpu, nq: int, n: int, nbytes: int, k: int) -> None:
    rng = np.random.default_rng(nq + n + nbytes + k)
    c = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8) & 0x11  # few bits: many equal distances
    qc = rng.integers(0, 256, size=(nq, nbytes), dtype=np.uint8) & 0x11
    d, i = gpu.hamming_topk(qc, c, k, device="cuda")
    d_cpu, i_cpu = gpu.hamming_topk(qc, c, k, device="cpu")
    assert d.dtype == np.int32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(d, d_cpu)
    dist, idx = ref_hamming(qc, c, k)
    np.testing.assert_array_equal(d, dist)
    np.testing.assert_array_equal(i, idx)
    assert emu.runtime.launches == [("zsbir_hamming_topk", 0)]


# --------------------------------------------------------------------------------------------------------------
# Device inputs and outputs, streams


def test_device_inputs_outputs_and_streams(emu: EmulatedGpu) -> None:
    rt = emu.runtime
    rng = np.random.default_rng(2)
    q = int_valued(rng, (5, 32))
    g = int_valued(rng, (300, 32), -1, 1)
    s_cpu, i_cpu = gpu.topk_ip(q, g, 20, device="cpu")
    dq, dg = DevArray.from_host(rt, q), DevArray.from_host(rt, g)
    # host results from device inputs
    s, i = gpu.topk_ip(dq, dg, 20, device="cuda")
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
    # device outputs, written asynchronously on the legacy stream
    out = (DevArray(rt, (5, 20), np.float32), DevArray(rt, (5, 20), np.int64))
    for o in out:
        o.poison()
    res = gpu.topk_ip(dq, dg, 20, out=out)
    assert res[0] is out[0] and res[1] is out[1]
    np.testing.assert_array_equal(out[1].host(), i_cpu)
    np.testing.assert_array_equal(out[0].host(), s_cpu)
    # explicit streams: an int handle, a cuda-python stream object and a torch-like object
    stream_obj = ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
    handle = int(stream_obj)

    class TorchLikeStream:
        cuda_stream = handle

    for st in (handle, stream_obj, TorchLikeStream()):
        rt.launches.clear()
        for o in out:
            o.poison()
        gpu.topk_ip(q, g, 20, stream=st, out=out)  # host inputs, device outputs
        assert rt.launches == [("zsbir_topk_ip", handle)]
        ok(rt.cudaStreamSynchronize(handle))
        np.testing.assert_array_equal(out[1].host(), i_cpu)
        s, i = gpu.topk_ip(dq, g, 20, stream=st)  # mixed inputs, host outputs
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)
    # out: host arrays, and one host + one device array
    hs, hi = np.full((5, 20), np.nan, np.float32), np.full((5, 20), -7, np.int64)
    res = gpu.topk_ip(dq, dg, 20, out=(hs, hi), stream=handle)
    assert res[0] is hs and res[1] is hi
    np.testing.assert_array_equal(hi, i_cpu)
    np.testing.assert_array_equal(hs, s_cpu)
    out[1].poison()
    gpu.topk_ip(q, dg, 20, out=(hs, out[1]))
    np.testing.assert_array_equal(out[1].host(), i_cpu)
    # the Hamming search the same ways
    codes = rng.integers(0, 256, size=(300, 16), dtype=np.uint8)
    qcodes = codes[[3, 7]] ^ 1
    d_cpu, j_cpu = gpu.hamming_topk(qcodes, codes, 6, device="cpu")
    dc, dqc = DevArray.from_host(rt, codes), DevArray.from_host(rt, qcodes)
    hout = (DevArray(rt, (2, 6), np.int32), DevArray(rt, (2, 6), np.int64))
    for o in hout:
        o.poison()
    gpu.hamming_topk(dqc, dc, 6, out=hout, stream=stream_obj)
    ok(rt.cudaStreamSynchronize(handle))
    np.testing.assert_array_equal(hout[0].host(), d_cpu)
    np.testing.assert_array_equal(hout[1].host(), j_cpu)
    d, j = gpu.hamming_topk(qcodes, dc, 6)
    np.testing.assert_array_equal(d, d_cpu)
    np.testing.assert_array_equal(j, j_cpu)
    # nothing this package allocated is left behind
    ok(rt.cudaDeviceSynchronize())
    mine = {a.base for a in (dq, dg, *out, dc, dqc, *hout)}
    assert {a.ptr for a in rt.live_allocations()} == mine
    for a in (dq, dg, *out, dc, dqc, *hout):
        a.free()
    ok(rt.cudaStreamDestroy(stream_obj))


def test_producer_streams_are_waited_for(emu: EmulatedGpu) -> None:
    """Inputs written asynchronously on the stream their CUDA Array Interface names: the search must order
    its work after that stream (the fake only runs the producer's copies when something waits for them)."""
    rt = emu.runtime
    rng = np.random.default_rng(3)
    q = int_valued(rng, (4, 24))
    g = int_valued(rng, (250, 24), -1, 1)
    s_cpu, i_cpu = gpu.topk_ip(q, g, 9, device="cpu")
    producer, worker = new_stream(rt), new_stream(rt)
    for explicit in (None, worker):
        dq = DevArray.from_host(rt, q, produced_on=producer)
        dg = DevArray.from_host(rt, g, produced_on=producer)
        assert rt.pending_work() > 0
        rt.launches.clear()
        s, i = gpu.topk_ip(dq, dg, 9, stream=explicit)
        assert rt.launches == [("zsbir_topk_ip", producer if explicit is None else explicit)]
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)
        # device outputs on the worker stream, then read there
        out = (DevArray(rt, (4, 9), np.float32, stream=worker), DevArray(rt, (4, 9), np.int64, stream=worker))
        dq2 = DevArray.from_host(rt, q, produced_on=producer)
        gpu.topk_ip(dq2, dg, 9, out=out, stream=explicit)
        np.testing.assert_array_equal(out[1].host(), i_cpu)
        np.testing.assert_array_equal(out[0].host(), s_cpu)
        for a in (dq, dg, dq2, *out):
            a.free()
    # the CPU path with device inputs waits for the producer too
    dq = DevArray.from_host(rt, q, produced_on=producer)
    dg = DevArray.from_host(rt, g, produced_on=producer)
    s, i = gpu.topk_ip(dq, dg, 9, device="cpu", stream=worker)
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
    dc = DevArray.from_host(rt, rng.integers(0, 256, (50, 8), dtype=np.uint8), produced_on=producer)
    d, j = gpu.hamming_topk(dc._src[:3], dc, 4, stream=worker)  # type: ignore[index]
    assert np.all(d[:, 0] == 0) and j[:, 0].tolist() == [0, 1, 2]
    for a in (dq, dg, dc):
        a.free()
    for st in (producer, worker):
        ok(rt.cudaStreamDestroy(st))


def test_dlpack_device_inputs(emu: EmulatedGpu) -> None:
    rt = emu.runtime
    rng = np.random.default_rng(6)
    q = int_valued(rng, (3, 40))
    g = int_valued(rng, (180, 40), -1, 1)
    s_cpu, i_cpu = gpu.topk_ip(q, g, 11, device="cpu")
    producer, worker = new_stream(rt), new_stream(rt)
    arrays = []
    for explicit in (None, worker):
        dq = DevArray.from_host(rt, q, produced_on=producer)
        dg = DevArray.from_host(rt, g, produced_on=producer)
        xq, xg = DLPackDev(dq, producer=producer, byte_offset=64), DLPackDev(dg, producer=producer)
        s, i = gpu.topk_ip(xq, xg, 11, stream=explicit)
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)
        assert xq.seen_streams == [1 if explicit is None else explicit]  # 1: the legacy default stream
        arrays += [dq, dg]
    # a DLPack input together with a CUDA Array Interface input that names a stream
    dq = DevArray.from_host(rt, q, produced_on=producer)
    xq = DLPackDev(dq, producer=producer)
    dg = DevArray.from_host(rt, g, produced_on=worker)
    s, i = gpu.topk_ip(xq, dg, 11)
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
    arrays += [dq, dg]
    # an array on another device is refused
    other = DLPackDev(arrays[0], device_id=1)
    with pytest.raises(ValueError, match="device 1"):
        gpu.topk_ip(other, g, 3, device="cuda")
    for a in arrays:
        a.free()
    for st in (producer, worker):
        ok(rt.cudaStreamDestroy(st))


def test_misaligned_device_gallery_uses_the_scalar_path(emu: EmulatedGpu) -> None:
    rt = emu.runtime
    rng = np.random.default_rng(8)
    g = int_valued(rng, (301, 40), -1, 1)
    q = int_valued(rng, (20, 40))
    s_cpu, i_cpu = gpu.topk_ip(q, g, 17, device="cpu")
    dg = DevArray.from_host(rt, g, offset=2)  # 2-byte offset: not 16-byte aligned
    dq = DevArray.from_host(rt, q, offset=6)
    for path in PATHS:
        s, i = gpu.topk_ip(dq, dg, 17, device="cuda", path=path)  # type: ignore[arg-type]
        np.testing.assert_array_equal(i, i_cpu, err_msg=path)
        np.testing.assert_array_equal(s, s_cpu, err_msg=path)
    dg.free()
    dq.free()


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_on_the_gpu_path(emu: EmulatedGpu) -> None:
    rt = emu.runtime
    q = np.ones((2, 8), np.float16)
    g = np.ones((5, 8), np.float16)
    dg32 = DevArray(rt, (5, 8), np.float32)
    ds64 = DevArray(rt, (5,), np.float64)
    dq = DevArray.from_host(rt, q)
    dg8 = DevArray.from_host(rt, g.astype(np.int8))
    dcodes = DevArray(rt, (5, 8), np.uint8, offset=4)
    codes = np.zeros((5, 8), np.uint8)
    out22 = DevArray(rt, (2, 2), np.float32)
    out_i4 = DevArray(rt, (2, 3), np.int32)
    out_ro = DevArray(rt, (2, 3), np.float32, readonly=True)
    hs, hi = np.empty((2, 3), np.float32), np.empty((2, 3), np.int64)
    cases: list[tuple[type[Exception], str, Any]] = [
        (TypeError, "gallery on the GPU must be float16", lambda: gpu.topk_ip(q, dg32, 2, device="cuda")),
        (TypeError, "queries on the GPU must be float16", lambda: gpu.topk_ip(dg32, g, 2, device="cuda")),
        (ValueError, "needs scales", lambda: gpu.topk_ip(q, dg8, 2, device="cuda")),
        (TypeError, "scales on the GPU must be float32", lambda: gpu.topk_ip(q, dg8, 2, scales=ds64, device="cuda")),
        (ValueError, r"scales must have shape \(5,\)", lambda: gpu.topk_ip(q, dg8, 2, scales=np.ones(4))),
        (ValueError, "k <= 256", lambda: gpu.topk_ip(dq, g, 300, device="cuda", path="tensor32")),
        (ValueError, "k must be in", lambda: gpu.topk_ip(dq, g, 0, device="cuda")),
        (ValueError, "dimension 8 but the gallery has 9", lambda: gpu.topk_ip(dq, np.ones((3, 9)), 1)),
        (ValueError, "8-byte aligned", lambda: gpu.hamming_topk(codes[:1], dcodes, 2, device="cuda")),
        (ValueError, "multiple of 8 bytes", lambda: gpu.hamming_topk(codes[:1, :4], codes[:, :4], 2, device="cuda")),
        (ValueError, r"out\[0\] must have shape", lambda: gpu.topk_ip(dq, g, 3, out=(out22, hi))),
        (TypeError, r"out\[1\] must be int64", lambda: gpu.topk_ip(q, g, 3, device="cuda", out=(hs, out_i4))),
        (ValueError, "C-contiguous", lambda: gpu.topk_ip(_Strided(dq), g, 1, device="cuda")),
        (ValueError, "read-only", lambda: gpu.topk_ip(q, g, 3, out=(out_ro, hi))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert rt.launches == []
    ok(rt.cudaDeviceSynchronize())
    for a in (dg32, ds64, dq, dg8, dcodes, out22, out_i4, out_ro):
        a.free()


class _Strided:
    def __init__(self, a: DevArray) -> None:
        cai = dict(a.__cuda_array_interface__)
        cai["strides"] = (a.dtype.itemsize, a.shape[1] * a.dtype.itemsize)  # a transposed view
        cai["shape"] = (a.shape[1], a.shape[0])
        self.__cuda_array_interface__ = cai


def test_library_and_runtime_failures_raise_gpu_error(emu: EmulatedGpu, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = emu.runtime
    q = np.ones((2, 8), np.float16)
    g = np.ones((5, 8), np.float16)
    with monkeypatch.context() as mp, pytest.raises(gpu.GpuError, match=r"zsbir_topk_ip failed: .*status 10\)"):
        mp.setitem(_cuda.PATHS, "simt", 77)  # the library refuses an unknown path selector
        gpu.topk_ip(q, g, 2, device="cuda", path="simt")
    ok(rt.cudaDeviceSynchronize())
    assert rt.live_allocations() == []  # the temporaries were freed on the error path
    real = rt.cudaMallocAsync
    calls = [0]

    def failing(size: int, stream: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            return (cudaError_t.cudaErrorMemoryAllocation, None)
        return real(size, stream)

    with monkeypatch.context() as mp, pytest.raises(gpu.GpuError, match=r"cudaMallocAsync\(\d+\): out of memory"):
        mp.setattr(rt, "cudaMallocAsync", failing)
        gpu.topk_ip(q, g, 2, device="cuda")
    ok(rt.cudaDeviceSynchronize())
    assert rt.live_allocations() == []


# --------------------------------------------------------------------------------------------------------------
# GpuGallery


def test_gpu_gallery_resident_search(emu: EmulatedGpu) -> None:
    rt = emu.runtime
    rng = np.random.default_rng(12)
    v = int_valued(rng, (257, 48), -1, 1)
    codes = rng.integers(0, 256, size=(257, 16), dtype=np.uint8)
    q = int_valued(rng, (6, 48))
    s_cpu, i_cpu = gpu.topk_ip(q, v, 12, device="cpu")
    d_cpu, j_cpu = gpu.hamming_topk(codes[:4] ^ 3, codes, 5, device="cpu")
    with gpu.GpuGallery(v, codes=codes, device="cuda") as gal:
        assert gal.device == "cuda" and len(gal) == 257 and gal.nbytes_device == 257 * (48 * 2 + 16)
        assert rt.live_bytes() == gal.nbytes_device
        mallocs = rt.calls.get("cudaMalloc", 0) + 2  # + the two out arrays below
        for path in PATHS:
            s, i = gal.search(q, 12, path=path)  # type: ignore[arg-type]
            np.testing.assert_array_equal(i, i_cpu)
            np.testing.assert_array_equal(s, s_cpu)
        d, j = gal.search_codes(codes[:4] ^ 3, 5)
        np.testing.assert_array_equal(d, d_cpu)
        np.testing.assert_array_equal(j, j_cpu)
        st = new_stream(rt)
        out = (DevArray(rt, (6, 12), np.float32), DevArray(rt, (6, 12), np.int64))
        gal.search(q, 12, stream=st, out=out)
        ok(rt.cudaStreamSynchronize(st))
        np.testing.assert_array_equal(out[1].host(), i_cpu)
        assert rt.calls.get("cudaMalloc", 0) == mallocs  # searching does not re-upload the gallery
        for o in out:
            o.free()
        ok(rt.cudaStreamDestroy(st))
    ok(rt.cudaDeviceSynchronize())
    assert rt.live_allocations() == []  # close() freed the gallery
    with pytest.raises(ValueError, match="no vectors"):
        gal.search(q, 3)
    # int8 vectors with scales
    g8 = rng.integers(-128, 128, size=(90, 20), dtype=np.int8)
    sc = (2.0 ** rng.integers(-6, 1, size=90)).astype(np.float32)
    q8 = int_valued(rng, (3, 20))
    with gpu.GpuGallery(g8, scales=sc, device="cuda") as gal8:
        assert gal8.nbytes_device == 90 * 20 + 90 * 4
        s, i = gal8.search(q8, 7)
        s2, i2 = gpu.topk_ip(q8, g8, 7, scales=sc, device="cpu")
        np.testing.assert_array_equal(i, i2)
        np.testing.assert_array_equal(s, s2)
    # borrowed device arrays: nothing allocated, nothing freed on close
    dv = DevArray.from_host(rt, v)
    with gpu.GpuGallery(dv) as gal:
        assert gal.device == "cuda" and gal.nbytes_device == 0
        np.testing.assert_array_equal(gal.search(q, 12)[1], i_cpu)
    ok(rt.cudaDeviceSynchronize())  # the search's temporaries are freed in stream order
    assert [a.ptr for a in rt.live_allocations()] == [dv.base]
    dv.free()
    # a gallery dropped without close() frees its memory when collected
    gal = gpu.GpuGallery(v, device="cuda")
    del gal
    gc.collect()
    ok(rt.cudaDeviceSynchronize())
    assert rt.live_allocations() == []


# --------------------------------------------------------------------------------------------------------------
# Retriever(device="cuda")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    from tiny_bundle import make_bundle, make_weights

    return make_bundle(tmp_path_factory.mktemp("emu_bundle") / "bundle", weights=make_weights(dim=24))[0]


def _make_gallery(path: Path, fingerprint: str, storage: str, vectors: np.ndarray, relpaths: list[str]) -> None:
    from zsbir_infer.gallery import FileRecord, Gallery

    itq = None
    if storage == "itq":
        from zsbir_infer.itq import ITQ

        itq = ITQ.fit(vectors, n_bits=20)  # 3-byte codes: the GPU pads them to 8 bytes
    g = Gallery.create(path, fingerprint, vectors.shape[1], storage, itq=itq)
    try:
        g.add([FileRecord(r, 100 + i, 1000 + i) for i, r in enumerate(relpaths)], vectors)
    finally:
        g.close()


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("storage", ["float16", "int8", "itq"])
def test_retriever_on_cuda_matches_the_cpu(emu: EmulatedGpu, bundle: Path, tmp_path: Path, storage: str) -> None:
    from zsbir_infer import Retriever
    from zsbir_infer.encoder import Encoder

    rng = np.random.default_rng(21)
    n, d = 150, 24
    vectors = _unit(rng, n, d)
    vectors[100:110] = vectors[5]  # exact duplicates: ties, broken by the smaller row id
    relpaths = [f"p{n - i:04d}.jpg" for i in range(n)]  # path order is the reverse of row-id order
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        _make_gallery(tmp_path / "g", enc.fingerprint, storage, vectors, relpaths)
        queries = np.concatenate([vectors[[5, 17, 99]], _unit(rng, 4, d)])
        with Retriever.open(tmp_path / "g", enc, device="cpu") as cpu:
            want = cpu.search(queries, k=16, exact=True)  # one more: is the 15th a near-tie with the 16th?
            want_all = cpu.search(queries[:1], k=500, exact=True)
        with Retriever.open(tmp_path / "g", enc, device="cuda") as r:
            assert r.device == "cuda" and "CUDA device 0" in r.device_note
            got = r.search(queries, k=15)
            got_all = r.search(queries[:1], k=500)
            assert emu.runtime.launches, "the search did not run on the GPU path"
            assert len(got_all[0]) == n
            for hits, ref in [*zip(got, want, strict=True), (got_all[0], want_all[0])]:
                rs = np.array([h.score for h in ref])
                ref = ref[: len(hits)]
                assert len(hits) == len(ref)
                if storage == "itq":  # exact integer scores: identical lists
                    assert [(h.id, h.relpath, h.rank, h.score) for h in hits] == [
                        (e.id, e.relpath, e.rank, e.score) for e in ref
                    ]
                    continue
                np.testing.assert_allclose([h.score for h in hits], rs[: len(hits)], atol=2e-3)
                # the same rows in the same order, except where float16 queries may reorder near-ties
                near = np.abs(np.diff(rs)) < 4e-3
                for pos, (h, e) in enumerate(zip(hits, ref, strict=True)):
                    if not near[max(0, pos - 1) : pos + 1].any():
                        assert (h.id, h.relpath, h.rank) == (e.id, e.relpath, e.rank)
            dup = got[0][:11]  # query = row 5: rows 5 and 100..109 tie for the top
            assert [h.id for h in dup] == [5, *range(100, 110)]
            # refresh() after the gallery changed
            from zsbir_infer.gallery import FileRecord, Gallery

            with Gallery.open(tmp_path / "g") as g:
                g.delete([relpaths[5]])
                g.add([FileRecord("new.jpg", 1, 1)], _unit(rng, 1, d))
            r.refresh()
            assert len(r.search(queries[:1], k=500)[0]) == n
            assert all(h.id != 5 for h in r.search(queries[:1], k=20)[0])
    finally:
        enc.close()


def test_retriever_k_above_the_kernel_limit(emu: EmulatedGpu, bundle: Path, tmp_path: Path) -> None:
    from zsbir_infer import Retriever
    from zsbir_infer.encoder import Encoder

    rng = np.random.default_rng(22)
    n = 1100
    vectors = _unit(rng, n, 24)
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        _make_gallery(tmp_path / "g", enc.fingerprint, "float16", vectors, [f"{i:05d}.jpg" for i in range(n)])
        with Retriever.open(tmp_path / "g", enc, device="cuda") as r:
            assert r.device == "cuda"
            assert len(r.search(vectors[:1], k=1024)[0]) == 1024
            assert len(r.search(vectors[:1], k=1100)[0]) == 1100  # more than one kernel call can return
    finally:
        enc.close()


def test_retriever_on_cuda_from_threads(emu: EmulatedGpu, bundle: Path, tmp_path: Path) -> None:
    import threading

    from zsbir_infer import Retriever
    from zsbir_infer.encoder import Encoder

    rng = np.random.default_rng(23)
    vectors = _unit(rng, 200, 24)
    queries = _unit(rng, 8, 24)
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        _make_gallery(tmp_path / "g", enc.fingerprint, "float16", vectors, [f"{i:04d}.jpg" for i in range(200)])
        with Retriever.open(tmp_path / "g", enc, device="cuda") as r:
            want = [[h.id for h in row] for row in r.search(queries, k=7)]
            got: dict[int, list[int]] = {}
            errors: list[BaseException] = []

            def work(t: int) -> None:
                try:
                    for rep in range(3):
                        i = (t + 3 * rep) % len(queries)
                        got[t * 10 + rep] = [i, *(h.id for h in r.search(queries[i], k=7)[0])]
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert not errors and len(got) == 12
        for i, *ids in got.values():
            assert ids == want[i]
    finally:
        enc.close()


def test_retriever_itq_codes_too_long_for_the_gpu(
    emu: EmulatedGpu, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zsbir_infer import Retriever, retriever
    from zsbir_infer.encoder import Encoder

    rng = np.random.default_rng(24)
    vectors = _unit(rng, 40, 24)
    enc = Encoder.open(bundle, backend="ort-cpu", threads=1)
    try:
        _make_gallery(tmp_path / "g", enc.fingerprint, "itq", vectors, [f"{i:04d}.jpg" for i in range(40)])
        with monkeypatch.context() as mp:
            mp.setattr(retriever, "_gpu_code_bytes", lambda code_bytes: 136)  # as for 1025+ bits
            with pytest.warns(RuntimeWarning, match="codes of up to 1024 bits"):
                r = Retriever.open(tmp_path / "g", enc, device="cuda")
        with r:
            assert r.device == "cpu" and len(r.search(vectors[0], k=3)[0]) == 3
        assert emu.runtime.launches == []
    finally:
        enc.close()
