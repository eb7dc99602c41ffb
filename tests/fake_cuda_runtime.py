"""A fake of cuda-python's ``cuda.bindings.runtime`` over host memory, for running the GPU path without a GPU.

Together with the CPU emulator of the kernels (``make -C kernels emu``: the same C ABI as the real library, but
every "device pointer" is a host pointer and the kernels run on the host) this lets the Python GPU path of
:mod:`zsbir_infer.gpu` run end to end on any machine::

    from fake_cuda_runtime import emulated_gpu

    def test_x(monkeypatch):
        with emulated_gpu(monkeypatch) as env:        # builds the emulator if needed, installs the fake
            gpu.topk_ip(q, g, 10, device="cuda")       # runs zsbir_infer's GPU code on the emulator
            env.runtime.live_allocations()             # what is still allocated

What the fake checks (each problem is recorded in ``FakeCudaRuntime.violations``; the API call that caused it
also returns a CUDA error code, as the real runtime would, where the real one would notice at all):

* device memory: every allocation is host memory with guard bands and a "garbage" fill; copies, memsets and
  kernel arguments must lie inside one live allocation (out of range, use after free, use after a
  ``cudaFreeAsync`` in stream order, double free, a host pointer passed as device memory or the reverse);
  guard bands are checked when memory is freed; :meth:`FakeCudaRuntime.live_allocations` lists leaks.
* stream order: copies, memsets, frees and event records are *deferred* until something forces them
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, a synchronous
  ``cudaMemcpy``, ``cudaFree``) and then run in stream order, honouring events and the legacy default stream's
  implicit synchronisation with blocking streams. So a result read before its stream was synchronised is still
  garbage, and a kernel that does not wait for the stream that produced its input reads garbage too.
  Kernel launches (through :class:`CheckedKernels`) first complete the work they are ordered after, then run
  at once, so their status codes come back synchronously as with the real library.
* the API surface follows cuda-python: ``(cudaError_t, value...)`` tuples (``(err,)`` for calls without a
  result), int or handle-object streams/events, enum or int arguments, ``bytes`` from ``cudaGetErrorString``.
  ``tests/test_gpu_path_emulated.py`` compares names, enum values and signatures with the real module
  where cuda-python is installed.

Only the subset of the runtime that zsbir uses (and a little more) is provided.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import enum
import functools
import gc
import operator
import os
import shutil
import subprocess
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zsbir_infer.gpu import _cuda

REPO = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO / "kernels"
EMU_LIB = KERNELS_DIR / "build" / "emu" / "libzsbir_kernels_emu.so"
EMU_LIB_ENV = "ZSBIR_EMU_LIB"  # use this prebuilt emulator library instead of building one

# --------------------------------------------------------------------------------------------------------------
# Enums and constants (values as in the CUDA headers / cuda-python)


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidConfiguration = 9
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidDeviceFunction = 98
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorNotSupported = 801
    cudaErrorUnknown = 999


_ERROR_STRINGS = {
    cudaError_t.cudaSuccess: "no error",
    cudaError_t.cudaErrorInvalidValue: "invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: "out of memory",
    cudaError_t.cudaErrorInvalidConfiguration: "invalid configuration argument",
    cudaError_t.cudaErrorInvalidMemcpyDirection: "invalid copy direction for memcpy",
    cudaError_t.cudaErrorInsufficientDriver: "CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorInvalidDeviceFunction: "invalid device function",
    cudaError_t.cudaErrorNoDevice: "no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidDevice: "invalid device ordinal",
    cudaError_t.cudaErrorInvalidResourceHandle: "invalid resource handle",
    cudaError_t.cudaErrorNotReady: "device not ready",
    cudaError_t.cudaErrorIllegalAddress: "an illegal memory access was encountered",
    cudaError_t.cudaErrorLaunchFailure: "unspecified launch failure",
    cudaError_t.cudaErrorNotSupported: "operation not supported",
    cudaError_t.cudaErrorUnknown: "unknown error",
}


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrMultiProcessorCount = 16
    cudaDevAttrComputeCapabilityMajor = 75
    cudaDevAttrComputeCapabilityMinor = 76
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97


class _Handle:
    """An opaque handle like cuda-python's ``cudaStream_t`` / ``cudaEvent_t``: ``int(h)`` is its value."""

    _label = "handle"

    def __init__(self, init_value: int = 0) -> None:
        self._value = operator.index(init_value)

    def getPtr(self) -> int:
        return self._value

    def __int__(self) -> int:
        return self._value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and int(other) == self._value

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._value))

    def __repr__(self) -> str:
        return f"<{self._label} {self._value:#x}>"


class cudaStream_t(_Handle):
    _label = "CUstream"


class cudaEvent_t(_Handle):
    _label = "CUevent"


# --------------------------------------------------------------------------------------------------------------
# Internal state

ALIGN = 256  # cudaMalloc alignment
GUARD = 256  # guard band before and after every allocation
FILL_NEW = 0xA5  # uninitialised device memory
FILL_GUARD = 0x5A
FILL_FREED = 0xDD
QUARANTINE_BYTES = 256 << 20  # freed allocations kept (poisoned) for use-after-free diagnostics


@dataclass
class Allocation:
    """One device allocation (host memory with guard bands)."""

    ptr: int
    nbytes: int
    api: str  # "cudaMalloc" or "cudaMallocAsync"
    stream: int | None
    serial: int
    origin: str
    backing: np.ndarray | None = field(repr=False, default=None)
    state: str = "live"  # live -> free-pending (cudaFreeAsync enqueued) -> freed

    @property
    def end(self) -> int:
        return self.ptr + self.nbytes

    def describe(self) -> str:
        return f"allocation #{self.serial} ({self.api}, {self.nbytes} bytes at {self.ptr:#x}, from {self.origin})"


class _Op:
    __slots__ = ("deps", "done", "fn", "stream", "what")

    def __init__(self, stream: _Stream, what: str, fn: Callable[[], None] | None, deps: list[_Op]) -> None:
        self.stream = stream
        self.what = what
        self.fn = fn
        self.deps = deps
        self.done = False


@dataclass(eq=False)
class _Stream:
    handle: int
    flags: int  # 0 = blocking (synchronises with the legacy stream), 1 = non-blocking
    legacy: bool = False
    tail: _Op | None = None
    destroyed: bool = False


@dataclass(eq=False)
class _Event:
    handle: int
    flags: int
    op: _Op | None = None


def _origin() -> str:
    """The innermost frames of the caller outside this file (for leak reports)."""
    frames = [f for f in traceback.extract_stack(limit=14)[:-2] if not f.filename.endswith("fake_cuda_runtime.py")]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-3:]))


def _api(values: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An API entry point returning ``(err, <values> results)``: serialised (the fake is used from several
    threads by the thread-safety tests), counted, and failing with ``driver_error`` when one is set."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        ungated = fn.__name__ in ("cudaGetErrorString", "cudaGetErrorName")

        @functools.wraps(fn)
        def wrapper(self: FakeCudaRuntime, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
                if self.driver_error is not None and not ungated:
                    return (self.driver_error,) + (None,) * values
                return fn(self, *args, **kwargs)

        return wrapper

    return decorate


class FakeError(Exception):
    """Raised inside deferred work for a memory violation (recorded, never propagated to the caller)."""


# --------------------------------------------------------------------------------------------------------------
# The runtime


class FakeCudaRuntime:
    """Stands in for the ``cuda.bindings.runtime`` module (see the module docstring)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaDeviceAttr = cudaDeviceAttr
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1
    cudaStreamLegacy = 1
    cudaStreamPerThread = 2
    cudaEventDefault = 0
    cudaEventBlockingSync = 1
    cudaEventDisableTiming = 2

    def __init__(
        self,
        *,
        device_count: int = 1,
        compute_capability: tuple[int, int] = (9, 0),
        sms: int = 132,
        smem_optin: int = 232448,
        driver_error: cudaError_t | None = None,
        eager: bool = False,
    ) -> None:
        """``driver_error``: every call fails with it (no driver); ``eager``: run all work at once (no deferral)."""
        self.device_count = device_count
        self.compute_capability = compute_capability
        self.sms = sms
        self.smem_optin = smem_optin
        self.driver_error = driver_error
        self.eager = eager
        self.violations: list[str] = []
        self.calls: dict[str, int] = {}
        self.launches: list[tuple[str, int]] = []  # (kernel function, stream handle) per launch
        self._lock = threading.RLock()
        self._device = 0
        self._live: dict[int, Allocation] = {}  # live and free-pending allocations by base pointer
        self._starts: list[int] = []  # sorted keys of _live
        self._freed: list[Allocation] = []  # quarantine, oldest first
        self._quarantine_bytes = 0
        self._serial = 0
        self._legacy = _Stream(0, 0, legacy=True)
        self._per_thread = _Stream(2, 0)
        self._streams: dict[int, _Stream] = {}
        self._events: dict[int, _Event] = {}
        self._next_handle = 0x7E570000

    # ---------------------------------------------------------------------------------------------- reporting

    def violation(self, message: str) -> None:
        """Record a problem (tests fail on any unless they take them with :meth:`take_violations`)."""
        self.violations.append(message)

    def take_violations(self) -> list[str]:
        """The recorded problems, clearing the list."""
        with self._lock:
            out, self.violations = self.violations, []
            return out

    def live_allocations(self) -> list[Allocation]:
        """Allocations not freed yet (free-pending ones included), oldest first."""
        with self._lock:
            return sorted(self._live.values(), key=lambda a: a.serial)

    def live_bytes(self) -> int:
        return sum(a.nbytes for a in self.live_allocations())

    def pending_work(self) -> int:
        """Number of streams with deferred work not run yet."""
        with self._lock:
            return sum(1 for s in self._all_streams() if s.tail is not None and not s.tail.done)

    def synchronize_all(self) -> None:
        """Run every deferred operation (as cudaDeviceSynchronize, without its error reporting)."""
        with self._lock:
            self._drain()

    def check_guards(self) -> None:
        """Check the guard bands of every live allocation now."""
        with self._lock:
            for a in self._live.values():
                self._check_guard(a)

    # ---------------------------------------------------------------------------------------------- helpers

    def _err(self, code: cudaError_t, message: str | None = None) -> cudaError_t:
        if message is not None:
            self.violation(message)
        return code

    def _new_handle(self) -> int:
        self._next_handle += 0x100
        return self._next_handle

    def _all_streams(self) -> list[_Stream]:
        return [self._legacy, self._per_thread, *self._streams.values()]

    def _stream(self, stream: Any, what: str) -> _Stream | None:
        """The stream for a cuda-python stream argument (None/0/1 legacy, 2 per-thread, a handle)."""
        if stream is None:
            return self._legacy
        if isinstance(stream, bool):
            raise TypeError(f"{what}: a stream, not a bool")
        h = int(stream) if isinstance(stream, _Handle) else operator.index(stream)  # TypeError like cuda-python
        if h in (0, 1):
            return self._legacy
        if h == 2:
            return self._per_thread
        s = self._streams.get(h)
        if s is None or s.destroyed:
            state = "a destroyed" if s is not None else "an unknown"
            self.violation(f"{what}: {state} stream {h:#x}")
            return None
        return s

    @staticmethod
    def _addr(p: Any, what: str) -> int:
        if p is None:
            return 0
        if isinstance(p, bool):
            raise TypeError(f"{what}: a pointer, not a bool")
        if isinstance(p, (int, np.integer)):
            return int(p)
        if hasattr(p, "getPtr"):
            return int(p.getPtr())
        if isinstance(p, np.ndarray):
            return int(p.ctypes.data)
        try:
            view = memoryview(p)
        except TypeError as exc:
            raise TypeError(f"{what}: cannot use {type(p).__name__} as a pointer") from exc
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0

    def _find(self, addr: int) -> Allocation | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        a = self._live[self._starts[i]]
        return a if a.ptr <= addr < a.ptr + max(a.nbytes, 1) else None

    def _find_freed(self, addr: int) -> Allocation | None:
        for a in reversed(self._freed):
            if a.ptr <= addr < a.ptr + max(a.nbytes, 1):
                return a
        return None

    def _check_device(self, addr: int, nbytes: int, what: str, *, executing: bool = False) -> str | None:
        """None when [addr, addr + nbytes) lies in one usable allocation, else the problem."""
        if nbytes == 0:
            return None
        a = self._find(addr)
        if a is None:
            freed = self._find_freed(addr)
            if freed is not None:
                return f"{what}: {addr:#x} lies in freed {freed.describe()} (use after free)"
            return f"{what}: {addr:#x} ({nbytes} bytes) is not device memory"
        if addr + nbytes > a.end:
            return f"{what}: [{addr:#x}, +{nbytes}) runs {addr + nbytes - a.end} bytes past the end of {a.describe()}"
        if a.state == "free-pending" and not executing:
            return f"{what}: {addr:#x} lies in {a.describe()}, already released by cudaFreeAsync (use after free)"
        return None

    def _check_host(self, addr: int, nbytes: int, what: str) -> str | None:
        if nbytes and addr == 0:
            return f"{what}: NULL host pointer"
        a = self._find(addr) if nbytes else None
        return None if a is None else f"{what}: {addr:#x} is device memory ({a.describe()}), passed as host memory"

    def _enqueue(self, stream: _Stream, what: str, fn: Callable[[], None] | None, extra: tuple[_Op, ...] = ()) -> _Op:
        deps: list[_Op] = [] if stream.tail is None or stream.tail.done else [stream.tail]
        if stream.legacy:  # the legacy stream waits for all blocking streams ...
            deps += [s.tail for s in self._all_streams() if not s.legacy and s.flags == 0 and s.tail is not None]
        elif stream.flags == 0 and self._legacy.tail is not None:  # ... and they wait for it
            deps.append(self._legacy.tail)
        deps += extra
        op = _Op(stream, what, fn, [d for d in deps if not d.done])
        stream.tail = op
        if self.eager:
            self._complete(op)
        return op

    def _complete(self, op: _Op | None) -> None:
        """Run ``op`` after everything it is ordered after."""
        stack = [] if op is None else [op]
        while stack:
            top = stack[-1]
            if top.done:
                stack.pop()
                continue
            pending = [d for d in top.deps if not d.done]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            top.done = True
            fn, top.fn, top.deps = top.fn, None, []
            if fn is not None:
                try:
                    fn()
                except FakeError as exc:
                    self.violation(str(exc))

    def _drain(self) -> None:
        for s in self._all_streams():
            self._complete(s.tail)
        for e in self._events.values():
            self._complete(e.op)

    def _check_guard(self, a: Allocation) -> None:
        if a.backing is None:
            return
        base = a.ptr - a.backing.ctypes.data
        before = a.backing[base - GUARD : base]
        after = a.backing[base + a.nbytes : base + a.nbytes + GUARD]
        if np.any(before != FILL_GUARD):
            self.violation(f"memory before the start of {a.describe()} was written")
            before[...] = FILL_GUARD
        if np.any(after != FILL_GUARD):
            self.violation(f"memory past the end of {a.describe()} was written")
            after[...] = FILL_GUARD

    def _allocate(self, nbytes: int, api: str, stream: int | None) -> int:
        backing = np.empty(nbytes + 2 * GUARD + ALIGN, dtype=np.uint8)
        raw = backing.ctypes.data
        ptr = (raw + GUARD + ALIGN - 1) // ALIGN * ALIGN
        base = ptr - raw
        backing[:] = FILL_GUARD
        backing[base : base + nbytes] = FILL_NEW
        self._serial += 1
        a = Allocation(ptr, nbytes, api, stream, self._serial, _origin(), backing)
        self._live[ptr] = a
        bisect.insort(self._starts, ptr)
        return ptr

    def _release(self, a: Allocation) -> None:
        self._check_guard(a)
        del self._live[a.ptr]
        self._starts.remove(a.ptr)
        a.state = "freed"
        if a.backing is not None:
            base = a.ptr - a.backing.ctypes.data
            a.backing[base : base + a.nbytes] = FILL_FREED
        self._freed.append(a)
        self._quarantine_bytes += a.nbytes
        while self._quarantine_bytes > QUARANTINE_BYTES and len(self._freed) > 1:
            old = self._freed.pop(0)
            self._quarantine_bytes -= old.nbytes
            old.backing = None

    # ---------------------------------------------------------------------------------------------- device

    @_api(1)
    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int | None]:
        if self.device_count == 0:
            return cudaError_t.cudaErrorNoDevice, 0
        return cudaError_t.cudaSuccess, self.device_count

    @_api(1)
    def cudaGetDevice(self) -> tuple[cudaError_t, int | None]:
        if self.device_count == 0:
            return cudaError_t.cudaErrorNoDevice, None
        return cudaError_t.cudaSuccess, self._device

    @_api(0)
    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        if not 0 <= operator.index(device) < self.device_count:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._device = int(device)
        return (cudaError_t.cudaSuccess,)

    @_api(1)
    def cudaDeviceGetAttribute(self, attr: cudaDeviceAttr, device: int) -> tuple[cudaError_t, int | None]:
        if not 0 <= operator.index(device) < self.device_count:
            return cudaError_t.cudaErrorInvalidDevice, None
        try:
            a = cudaDeviceAttr(int(attr))
        except ValueError:
            return cudaError_t.cudaErrorInvalidValue, None
        value = {
            cudaDeviceAttr.cudaDevAttrMultiProcessorCount: self.sms,
            cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor: self.compute_capability[0],
            cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor: self.compute_capability[1],
            cudaDeviceAttr.cudaDevAttrMaxSharedMemoryPerBlockOptin: self.smem_optin,
        }[a]
        return cudaError_t.cudaSuccess, value

    @_api(0)
    def cudaDeviceSynchronize(self) -> tuple[cudaError_t]:
        self._drain()
        return (cudaError_t.cudaSuccess,)

    @_api(1)
    def cudaGetErrorString(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:
        try:
            text = _ERROR_STRINGS.get(cudaError_t(int(error)), "unrecognized error code")
        except ValueError:
            text = "unrecognized error code"
        return cudaError_t.cudaSuccess, text.encode()

    @_api(1)
    def cudaGetErrorName(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:
        try:
            return cudaError_t.cudaSuccess, cudaError_t(int(error)).name.encode()
        except ValueError:
            return cudaError_t.cudaErrorInvalidValue, b"cudaErrorUnknown"

    @_api(0)
    def cudaGetLastError(self) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)  # kernel failures come back as status codes of the library calls

    @_api(0)
    def cudaPeekAtLastError(self) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    # ---------------------------------------------------------------------------------------------- memory

    @_api(1)
    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int | None]:
        n = operator.index(size)
        if n < 0:
            raise OverflowError("can't convert negative value to size_t")
        if n == 0:
            return cudaError_t.cudaSuccess, 0
        return cudaError_t.cudaSuccess, self._allocate(n, "cudaMalloc", None)

    @_api(1)
    def cudaMallocAsync(self, size: int, hStream: Any) -> tuple[cudaError_t, int | None]:
        n = operator.index(size)
        if n < 0:
            raise OverflowError("can't convert negative value to size_t")
        s = self._stream(hStream, "cudaMallocAsync")
        if s is None:
            return cudaError_t.cudaErrorInvalidResourceHandle, None
        if n == 0:
            return cudaError_t.cudaSuccess, 0
        return cudaError_t.cudaSuccess, self._allocate(n, "cudaMallocAsync", s.handle)

    def _free_target(self, ptr: int, what: str) -> tuple[Allocation | None, cudaError_t]:
        a = self._live.get(ptr)
        if a is None or a.state != "live":
            if a is not None or self._find_freed(ptr) is not None:
                return None, self._err(cudaError_t.cudaErrorInvalidValue, f"{what}({ptr:#x}): double free")
            inner = self._find(ptr)
            if inner is not None:
                return None, self._err(
                    cudaError_t.cudaErrorInvalidValue, f"{what}({ptr:#x}): not the start of {inner.describe()}"
                )
            return None, self._err(cudaError_t.cudaErrorInvalidValue, f"{what}({ptr:#x}): not an allocation")
        return a, cudaError_t.cudaSuccess

    @_api(0)
    def cudaFree(self, devPtr: Any) -> tuple[cudaError_t]:
        ptr = self._addr(devPtr, "cudaFree")
        if ptr == 0:
            return (cudaError_t.cudaSuccess,)
        a, err = self._free_target(ptr, "cudaFree")
        if a is None:
            return (err,)
        self._drain()  # cudaFree synchronises the device
        self._release(a)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaFreeAsync(self, devPtr: Any, hStream: Any) -> tuple[cudaError_t]:
        ptr = self._addr(devPtr, "cudaFreeAsync")
        s = self._stream(hStream, "cudaFreeAsync")
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if ptr == 0:
            return (cudaError_t.cudaSuccess,)
        a, err = self._free_target(ptr, "cudaFreeAsync")
        if a is None:
            return (err,)
        a.state = "free-pending"
        self._enqueue(s, f"cudaFreeAsync({ptr:#x})", lambda: self._release(a))
        return (cudaError_t.cudaSuccess,)

    def _copy(self, dst: Any, src: Any, count: int, kind: Any, stream: _Stream, what: str) -> tuple[cudaError_t]:
        d, s_ = self._addr(dst, f"{what} dst"), self._addr(src, f"{what} src")
        n = operator.index(count)
        if n < 0:
            raise OverflowError("can't convert negative value to size_t")
        try:
            k = cudaMemcpyKind(int(kind))
        except ValueError:
            return (cudaError_t.cudaErrorInvalidMemcpyDirection,)
        if k == cudaMemcpyKind.cudaMemcpyDefault:  # unified addressing: the pointers say where they are
            d_dev, s_dev = self._find(d) is not None, self._find(s_) is not None
        else:
            d_dev = k in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
            s_dev = k in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        label = f"{what}({k.name}, {n} bytes)"
        problems = [
            (self._check_device if d_dev else self._check_host)(d, n, f"{label} destination"),
            (self._check_device if s_dev else self._check_host)(s_, n, f"{label} source"),
        ]
        bad = [p for p in problems if p]
        if bad:
            for p in bad:
                self.violation(p)
            return (cudaError_t.cudaErrorInvalidValue,)
        if n == 0:
            return (cudaError_t.cudaSuccess,)

        def run() -> None:
            for is_dev, p, side in ((d_dev, d, "destination"), (s_dev, s_, "source")):
                if is_dev:
                    problem = self._check_device(p, n, f"{label} {side} (when it ran)", executing=True)
                    if problem:
                        raise FakeError(problem)
            ctypes.memmove(d, s_, n)

        self._enqueue(stream, label, run)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaMemcpy(self, dst: Any, src: Any, count: int, kind: cudaMemcpyKind) -> tuple[cudaError_t]:
        res = self._copy(dst, src, count, kind, self._legacy, "cudaMemcpy")
        if res[0] == cudaError_t.cudaSuccess:
            self._complete(self._legacy.tail)  # synchronous with respect to the host
        return res

    @_api(0)
    def cudaMemcpyAsync(self, dst: Any, src: Any, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaMemcpyAsync")
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return self._copy(dst, src, count, kind, s, "cudaMemcpyAsync")

    def _memset(self, devPtr: Any, value: int, count: int, stream: _Stream, what: str) -> tuple[cudaError_t]:
        p, n, v = self._addr(devPtr, what), operator.index(count), operator.index(value) & 0xFF
        problem = self._check_device(p, n, f"{what}({n} bytes)")
        if problem:
            return (self._err(cudaError_t.cudaErrorInvalidValue, problem),)
        if n == 0:
            return (cudaError_t.cudaSuccess,)

        def run() -> None:
            problem = self._check_device(p, n, f"{what}({n} bytes) (when it ran)", executing=True)
            if problem:
                raise FakeError(problem)
            ctypes.memset(p, v, n)

        self._enqueue(stream, what, run)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaMemset(self, devPtr: Any, value: int, count: int) -> tuple[cudaError_t]:
        return self._memset(devPtr, value, count, self._legacy, "cudaMemset")

    @_api(0)
    def cudaMemsetAsync(self, devPtr: Any, value: int, count: int, stream: Any) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaMemsetAsync")
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return self._memset(devPtr, value, count, s, "cudaMemsetAsync")

    # ---------------------------------------------------------------------------------------------- streams

    @_api(1)
    def cudaStreamCreate(self) -> tuple[cudaError_t, cudaStream_t | None]:
        return self._stream_create(0)

    @_api(1)
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaStream_t | None]:
        return self._stream_create(flags)

    def _stream_create(self, flags: int) -> tuple[cudaError_t, cudaStream_t | None]:
        f = operator.index(flags)
        if f not in (0, 1):
            return cudaError_t.cudaErrorInvalidValue, None
        h = self._new_handle()
        self._streams[h] = _Stream(h, f)
        return cudaError_t.cudaSuccess, cudaStream_t(h)

    @_api(0)
    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaStreamDestroy")
        if s is None or s.legacy or s is self._per_thread:
            if s is not None:
                self.violation("cudaStreamDestroy of a default stream")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        s.destroyed = True  # pending work still runs (it is forced by a later synchronisation)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaStreamSynchronize")
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._complete(s.tail)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaStreamQuery(self, stream: Any) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaStreamQuery")
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        done = s.tail is None or s.tail.done
        return (cudaError_t.cudaSuccess if done else cudaError_t.cudaErrorNotReady,)

    @_api(0)
    def cudaStreamWaitEvent(self, stream: Any, event: Any, flags: int) -> tuple[cudaError_t]:
        s = self._stream(stream, "cudaStreamWaitEvent")
        e = self._event(event, "cudaStreamWaitEvent")
        if s is None or e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if operator.index(flags) != 0:
            return (cudaError_t.cudaErrorInvalidValue,)
        if e.op is not None and not e.op.done:
            self._enqueue(s, "cudaStreamWaitEvent", None, (e.op,))
        return (cudaError_t.cudaSuccess,)

    # ---------------------------------------------------------------------------------------------- events

    def _event(self, event: Any, what: str) -> _Event | None:
        h = int(event) if isinstance(event, _Handle) else operator.index(event)
        e = self._events.get(h)
        if e is None:
            self.violation(f"{what}: unknown or destroyed event {h:#x}")
        return e

    @_api(1)
    def cudaEventCreate(self) -> tuple[cudaError_t, cudaEvent_t | None]:
        return self._event_create(0)

    @_api(1)
    def cudaEventCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaEvent_t | None]:
        return self._event_create(flags)

    def _event_create(self, flags: int) -> tuple[cudaError_t, cudaEvent_t | None]:
        f = operator.index(flags)
        if f & ~0x7:
            return cudaError_t.cudaErrorInvalidValue, None
        h = self._new_handle()
        self._events[h] = _Event(h, f)
        return cudaError_t.cudaSuccess, cudaEvent_t(h)

    @_api(0)
    def cudaEventRecord(self, event: Any, stream: Any) -> tuple[cudaError_t]:
        e = self._event(event, "cudaEventRecord")
        s = self._stream(stream, "cudaEventRecord")
        if e is None or s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        e.op = self._enqueue(s, "cudaEventRecord", None)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaEventSynchronize(self, event: Any) -> tuple[cudaError_t]:
        e = self._event(event, "cudaEventSynchronize")
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._complete(e.op)
        return (cudaError_t.cudaSuccess,)

    @_api(0)
    def cudaEventQuery(self, event: Any) -> tuple[cudaError_t]:
        e = self._event(event, "cudaEventQuery")
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        done = e.op is None or e.op.done
        return (cudaError_t.cudaSuccess if done else cudaError_t.cudaErrorNotReady,)

    @_api(0)
    def cudaEventDestroy(self, event: Any) -> tuple[cudaError_t]:
        e = self._event(event, "cudaEventDestroy")
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self._events[e.handle]  # work waiting on it keeps its dependency, as on the device
        return (cudaError_t.cudaSuccess,)

    # ---------------------------------------------------------------------------------------------- kernels

    def launch(self, name: str, stream: Any, buffers: list[tuple[str, int, int]], call: Callable[[], int]) -> int:
        """Run a kernel-library call in stream order: ``buffers`` are (name, device pointer, bytes it may touch).

        Returns the library's status, or ZSBIR_ERR_CUDA_BASE + a CUDA error when the arguments are bad (then
        the call is not made: a real GPU would fault or corrupt memory).
        """
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            s = self._stream(stream, name)
            if s is None:
                return _cuda.CUDA_ERROR_BASE + int(cudaError_t.cudaErrorInvalidResourceHandle)
            problems = [self._check_device(p, n, f"{name} {what}") for what, p, n in buffers]
            if any(problems):
                for p in problems:
                    if p:
                        self.violation(p)
                return _cuda.CUDA_ERROR_BASE + int(cudaError_t.cudaErrorIllegalAddress)
            status = [0]

            def run() -> None:
                for what, p, n in buffers:
                    problem = self._check_device(p, n, f"{name} {what} (when it ran)", executing=True)
                    if problem:
                        status[0] = _cuda.CUDA_ERROR_BASE + int(cudaError_t.cudaErrorIllegalAddress)
                        raise FakeError(problem)
                status[0] = int(call())

            self.launches.append((name, s.handle))
            op = self._enqueue(s, name, run)
            self._complete(op)
            return status[0]


class CheckedKernels:
    """Wraps the loaded kernel library: pointer arguments are checked against the fake's allocations and
    the calls run in stream order (see :meth:`FakeCudaRuntime.launch`). Everything else is forwarded."""

    def __init__(self, lib: Any, rt: FakeCudaRuntime) -> None:
        self._lib = lib
        self._rt = rt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def zsbir_topk_ip(
        self,
        queries: int | None,
        gallery: int | None,
        scales: int | None,
        dtype: int,
        nq: int,
        n: int,
        d: int,
        k: int,
        out_scores: int | None,
        out_indices: int | None,
        path: int,
        stream: int | None,
    ) -> int:
        item = 1 if dtype == _cuda.GALLERY_I8 else 2
        nq_, n_, d_, k_ = (max(0, int(x)) for x in (nq, n, d, k))
        buffers = [
            ("queries", int(queries or 0), nq_ * d_ * 2),
            ("gallery", int(gallery or 0), n_ * d_ * item),
            ("scales", int(scales or 0), n_ * 4 if dtype == _cuda.GALLERY_I8 else 0),
            ("out_scores", int(out_scores or 0), nq_ * k_ * 4),
            ("out_indices", int(out_indices or 0), nq_ * k_ * 8),
        ]
        args = (queries, gallery, scales, dtype, nq, n, d, k, out_scores, out_indices, path, stream)
        return self._rt.launch("zsbir_topk_ip", stream, buffers, lambda: self._lib.zsbir_topk_ip(*args))

    def zsbir_hamming_topk(
        self,
        query_codes: int | None,
        codes: int | None,
        nq: int,
        n: int,
        code_bytes: int,
        k: int,
        out_distances: int | None,
        out_indices: int | None,
        stream: int | None,
    ) -> int:
        nq_, n_, b_, k_ = (max(0, int(x)) for x in (nq, n, code_bytes, k))
        buffers = [
            ("query_codes", int(query_codes or 0), nq_ * b_),
            ("codes", int(codes or 0), n_ * b_),
            ("out_distances", int(out_distances or 0), nq_ * k_ * 4),
            ("out_indices", int(out_indices or 0), nq_ * k_ * 8),
        ]
        args = (query_codes, codes, nq, n, code_bytes, k, out_distances, out_indices, stream)
        return self._rt.launch("zsbir_hamming_topk", stream, buffers, lambda: self._lib.zsbir_hamming_topk(*args))


# --------------------------------------------------------------------------------------------------------------
# The emulator library and the fixture helper

_build_error: list[str] = []
_built: list[Path] = []


def emulator_library() -> Path:
    """The emulator library, built with ``make -C kernels emu`` when missing or out of date.

    Skips the calling test where no C++ compiler or make is available (a prebuilt library can be named with
    ``$ZSBIR_EMU_LIB``); fails it when the build fails.
    """
    env = os.environ.get(EMU_LIB_ENV)
    if env:
        return Path(env)
    if _built:
        return _built[0]
    if _build_error:
        pytest.fail(_build_error[0])
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None or shutil.which("make") is None:
        if EMU_LIB.is_file():
            return EMU_LIB
        pytest.skip(f"the kernel emulator is not built and cannot be: no C++ compiler ({cxx}) or no make")
    make = ["make", "-C", str(KERNELS_DIR), "emu"]
    stale = not EMU_LIB.is_file() or subprocess.run([*make, "-q"], capture_output=True, timeout=60).returncode != 0
    if stale:
        res = subprocess.run(make, capture_output=True, text=True, timeout=900)
        if res.returncode != 0 or not EMU_LIB.is_file():
            _build_error.append(f"`make -C kernels emu` failed:\n{(res.stdout + res.stderr)[-4000:]}")
            pytest.fail(_build_error[0])
    _built.append(EMU_LIB)
    return EMU_LIB


class EmulatorControls:
    """The emulator's extra C functions (zsbir_emu_*)."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.zsbir_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
        self.lib.zsbir_emu_configure.restype = ctypes.c_int
        self.lib.zsbir_emu_faults.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.zsbir_emu_faults.restype = ctypes.c_int
        self.lib.zsbir_emu_reset.argtypes = []
        self.lib.zsbir_emu_reset.restype = None
        self.lib.zsbir_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
        self.lib.zsbir_emu_stats.restype = None

    def configure(self, sms: int = 132, smem_optin: int = 232448, order: int = 0, seed: int = 1) -> None:
        if self.lib.zsbir_emu_configure(sms, smem_optin, order, seed) != 0:
            raise ValueError("bad emulator configuration")

    def faults(self) -> tuple[int, str]:
        buf = ctypes.create_string_buffer(1024)
        n = int(self.lib.zsbir_emu_faults(buf, len(buf)))
        return n, buf.value.decode(errors="replace")

    def reset(self) -> None:
        self.lib.zsbir_emu_reset()

    def stats(self) -> list[int]:
        """launches, blocks, last grid x/y/z, last and largest dynamic shared memory, live workspace blocks,
        largest workspace block, bytes read with streaming loads (see kernels/emu/emu.cpp)."""
        out = (ctypes.c_longlong * 10)()
        self.lib.zsbir_emu_stats(out)
        return list(out)


@dataclass
class EmulatedGpu:
    """What :func:`emulated_gpu` installed."""

    runtime: FakeCudaRuntime
    lib_path: Path
    emu: EmulatorControls

    def check(self) -> list[str]:
        """Problems so far: emulator faults, fake-runtime violations (taken), leaked workspace."""
        problems = [f"fake CUDA runtime: {v}" for v in self.runtime.take_violations()]
        n, first = self.emu.faults()
        if n:
            problems.append(f"kernel emulator: {n} fault(s), first: {first}")
        if self.emu.stats()[7]:
            problems.append(f"kernel emulator: {self.emu.stats()[7]} workspace allocation(s) never freed")
        return problems


@contextlib.contextmanager
def emulated_gpu(
    monkeypatch: pytest.MonkeyPatch,
    *,
    runtime: FakeCudaRuntime | None = None,
    order: int = 2,
    seed: int = 12345,
    check_kernels: bool = True,
    check_leaks: bool = True,
) -> Iterator[EmulatedGpu]:
    """Run zsbir_infer's GPU path on the kernel emulator and a :class:`FakeCudaRuntime`.

    Points ``$ZSBIR_KERNELS_LIB`` at the emulator (built if needed), makes ``_cuda.runtime()`` return the fake,
    wraps the loaded library in :class:`CheckedKernels` (``check_kernels``), configures the emulator's schedule
    (``order`` 0 forward, 1 reverse, 2 random with ``seed``) and resets the cached probe. On exit it runs the
    deferred work, then fails the test on emulator faults, fake-runtime violations and (``check_leaks``) device
    memory still allocated after a garbage collection.
    """
    path = emulator_library()
    rt = runtime if runtime is not None else FakeCudaRuntime()
    monkeypatch.setenv(_cuda.LIB_ENV, str(path))
    monkeypatch.delenv(_cuda.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_cuda, "runtime", lambda: rt)
    if check_kernels:
        real_load = _cuda.load_library
        wrapped: dict[int, CheckedKernels] = {}

        def load_library() -> Any:
            lib = real_load()
            if id(lib) not in wrapped:
                wrapped[id(lib)] = CheckedKernels(lib, rt)
            return wrapped[id(lib)]

        monkeypatch.setattr(_cuda, "load_library", load_library)
    _cuda.reset_cache()
    emu = EmulatorControls(path)
    emu.reset()
    emu.configure(order=order, seed=seed)
    env = EmulatedGpu(rt, path, emu)
    try:
        yield env
        gc.collect()  # buffers owned by dropped objects are freed by their finalisers
        rt.synchronize_all()
        rt.check_guards()
        problems = env.check()
        if check_leaks:
            problems += [f"device memory leaked: {a.describe()}" for a in rt.live_allocations()]
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
    finally:
        _cuda.reset_cache()
        emu.configure()  # the emulator's defaults, for whoever uses it next
        emu.reset()
