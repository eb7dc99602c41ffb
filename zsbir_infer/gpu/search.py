"""Public top-k search API: fused CUDA kernels when available, identical-contract CPU path otherwise.

Results contract (both devices):

* row ``q`` holds the ``k`` best gallery rows for query ``q``, best first;
* ties (equal score or distance) are ordered by the smaller gallery index;
* when ``k > N`` the first ``N`` slots are valid and the rest are padding: index ``-1`` with score
  ``-inf`` (inner product) or distance ``INT32_MAX`` (Hamming); an empty gallery gives only padding;
* NaN scores rank like ``-inf``.

Inner-product scores are float32 sums of float16 products (int8 galleries: the row's float32 scale times
the float32 sum), so the GPU and CPU agree up to float32 summation order.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from zsbir_infer.gpu import _cpu, _cuda
from zsbir_infer.gpu._arrays import DeviceArray, Operand, as_operand, stream_handle

Device = Literal["auto", "cuda", "cpu"]
KernelPath = Literal["auto", "simt", "tensor", "tensor32"]

MAX_K = 1024
MAX_DIM = 2048
MAX_ROWS = 2**31 - 1
MIN_CODE_BYTES = 8
MAX_CODE_BYTES = 128
PAD_INDEX = _cpu.PAD_INDEX
PAD_SCORE = _cpu.PAD_SCORE
PAD_DISTANCE = int(_cpu.PAD_DISTANCE)


def is_available() -> bool:
    """True when the CUDA kernels can run here (built library, cuda-python, a device of sm_80 or newer)."""
    return _cuda.availability()[0]


def availability() -> tuple[bool, str]:
    """``(available, reason)``: the reason names the device when available, else what is missing."""
    return _cuda.availability()


# ----------------------------------------------------------------------------------------------------------
# Validation


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = operator.index(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    return k


def _check_2d(x: Operand, name: str) -> tuple[int, int]:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    rows, cols = (int(s) for s in x.shape)
    if rows > MAX_ROWS:
        raise ValueError(f"{name} has {rows} rows; at most {MAX_ROWS} are supported")
    return rows, cols


def _float16_operand(x: Operand, name: str) -> Operand:
    """Queries / fp16 galleries: host floats are rounded to float16; device arrays must already be."""
    if isinstance(x, DeviceArray):
        if x.dtype != np.float16:
            raise TypeError(f"{name} on the GPU must be float16, got {x.dtype}")
        return x
    if x.dtype == np.float16:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return np.ascontiguousarray(x, dtype=np.float16)
    raise TypeError(f"{name} must be a floating-point array (float16/32/64), got {x.dtype}")


def _gallery_operand(x: Operand) -> Operand:
    if x.dtype == np.int8:
        return x if isinstance(x, DeviceArray) else np.ascontiguousarray(x)
    return _float16_operand(x, "gallery")


def _scales_operand(scales: Any, n: int, stream: int) -> Operand:
    s = as_operand(scales, "scales", stream)
    if s.ndim != 1 or int(s.shape[0]) != n:
        raise ValueError(f"scales must have shape ({n},) (one per gallery row), got {tuple(s.shape)}")
    if isinstance(s, DeviceArray):
        if s.dtype != np.float32:
            raise TypeError(f"scales on the GPU must be float32, got {s.dtype}")
        return s
    if not np.issubdtype(s.dtype, np.floating):
        raise TypeError(f"scales must be floating point, got {s.dtype}")
    return np.ascontiguousarray(s, dtype=np.float32)


def _codes_operand(x: Operand, name: str) -> tuple[Operand, int, int]:
    rows, nbytes = _check_2d(x, name)
    if x.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 packed bits, got {x.dtype}")
    if nbytes % 8 != 0 or not MIN_CODE_BYTES <= nbytes <= MAX_CODE_BYTES:
        raise ValueError(f"{name} rows must be a multiple of 8 bytes in [8, 128] (64 to 1024 bits), got {nbytes} bytes")
    if isinstance(x, DeviceArray):
        if x.ptr % 8 != 0:
            raise ValueError(f"{name} must be 8-byte aligned on the device")
        return x, rows, nbytes
    return np.ascontiguousarray(x), rows, nbytes


# ----------------------------------------------------------------------------------------------------------
# Device choice and host/device movement


def _resolve_device(device: str, operands: Sequence[Operand | None]) -> Device:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        return "cpu"
    ok, reason = _cuda.availability()
    if device == "cuda" and not ok:
        raise RuntimeError(f"device='cuda' requested but the GPU kernels cannot run: {reason}")
    if not ok and any(isinstance(op, DeviceArray) for op in operands):
        raise RuntimeError(f"inputs are CUDA device arrays but the GPU kernels cannot run: {reason}")
    if ok:
        _check_current_device(operands)
    return "cuda" if ok else "cpu"


def _check_current_device(operands: Sequence[Operand | None]) -> None:
    """Device arrays that say where they live (DLPack) must be on the current device."""
    ids = {op.device_id for op in operands if isinstance(op, DeviceArray) and op.device_id is not None}
    if not ids:
        return
    current = _cuda.current_device()
    for dev in sorted(ids):
        if dev != current:
            raise ValueError(f"an input lives on CUDA device {dev} but the current device is {current}")


def _to_host(x: Operand, stream: int) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    out = np.empty(x.shape, dtype=x.dtype)
    _cuda.copy_to_host(out, x.ptr, stream)
    return out


def _pick_stream(stream: Any, operands: Sequence[Operand | None]) -> int:
    handle = stream_handle(stream)
    if handle is not None:
        return handle
    for op in operands:
        if isinstance(op, DeviceArray) and op.stream is not None:
            return op.stream
    return 0


def _wait_for_producers(work: int, operands: Sequence[Operand | None]) -> None:
    for op in operands:
        if isinstance(op, DeviceArray) and op.stream is not None and op.stream != work:
            _cuda.stream_wait(work, op.stream)


class _Staging:
    """Device pointers for operands; host operands are uploaded to temporaries freed on exit."""

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self._temps: list[_cuda.DeviceBuffer] = []

    def ptr(self, op: Operand | None) -> int | None:
        if op is None:
            return None
        if isinstance(op, DeviceArray):
            return op.ptr
        buf = _cuda.upload(op, self.stream)
        self._temps.append(buf)
        return buf.ptr

    def alloc(self, nbytes: int) -> int:
        buf = _cuda.DeviceBuffer(nbytes, self.stream)
        self._temps.append(buf)
        return buf.ptr

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for buf in self._temps:
            buf.free()
        self._temps.clear()


def _check_out(out: Any, shape: tuple[int, int], dtypes: tuple[Any, Any], stream: int) -> tuple[Operand, Operand]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (values, indices)")
    ops = []
    for arr, dt, name in zip(out, dtypes, ("out[0]", "out[1]"), strict=True):
        op = as_operand(arr, name, stream)
        if tuple(op.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(op.shape)}")
        if op.dtype != np.dtype(dt):
            raise TypeError(f"{name} must be {np.dtype(dt)}, got {op.dtype}")
        if isinstance(op, np.ndarray) and not (op.flags.c_contiguous and op.flags.writeable):
            raise ValueError(f"{name} must be a writeable C-contiguous array")
        if isinstance(op, DeviceArray) and op.readonly:
            raise ValueError(f"{name} is read-only (its __cuda_array_interface__ says so)")
        ops.append(op)
    return ops[0], ops[1]


def _deliver(
    results: tuple[np.ndarray, np.ndarray], out_ops: tuple[Operand, Operand] | None, stream: int
) -> tuple[Any, Any]:
    if out_ops is None:
        return results
    for res, op in zip(results, out_ops, strict=True):
        if isinstance(op, DeviceArray):
            _cuda.copy_to_device(op.ptr, np.ascontiguousarray(res), stream)
        else:
            op[...] = res
    return out_ops[0], out_ops[1]


def _launch_and_collect(
    launch: Any,
    shape: tuple[int, int],
    dtypes: tuple[Any, Any],
    out_ops: tuple[Operand, Operand] | None,
    staging: _Staging,
) -> tuple[Any, Any]:
    """Run ``launch(values_ptr, indices_ptr)`` and return host results (or fill ``out`` in place)."""
    stream = staging.stream
    if out_ops is not None and all(isinstance(op, DeviceArray) for op in out_ops):
        launch(out_ops[0].ptr, out_ops[1].ptr)  # type: ignore[union-attr]
        return out_ops
    nbytes = [int(np.prod(shape)) * np.dtype(dt).itemsize for dt in dtypes]
    vptr, iptr = staging.alloc(nbytes[0]), staging.alloc(nbytes[1])
    launch(vptr, iptr)
    values = np.empty(shape, dtype=dtypes[0])
    indices = np.empty(shape, dtype=dtypes[1])
    _cuda.copy_to_host(values, vptr, stream)
    _cuda.copy_to_host(indices, iptr, stream)
    return _deliver((values, indices), out_ops, stream)


# ----------------------------------------------------------------------------------------------------------
# Inner product


def _ip_gpu(
    q: Operand,
    g: Operand,
    s: Operand | None,
    k: int,
    path: str,
    stream: int,
    out_ops: tuple[Operand, Operand] | None,
) -> tuple[Any, Any]:
    lib = _cuda.load_library()
    nq, d = int(q.shape[0]), int(q.shape[1])
    n = int(g.shape[0])
    dtype_code = _cuda.GALLERY_I8 if g.dtype == np.int8 else _cuda.GALLERY_F16
    _wait_for_producers(stream, [q, g, s, *(out_ops or ())])
    with _Staging(stream) as staging:
        qp, gp, sp = staging.ptr(q), staging.ptr(g), staging.ptr(s)

        def launch(vptr: int, iptr: int) -> None:
            code = lib.zsbir_topk_ip(qp, gp, sp, dtype_code, nq, n, d, k, vptr, iptr, _cuda.PATHS[path], stream)
            _cuda.check_status(int(code), "zsbir_topk_ip")

        return _launch_and_collect(launch, (nq, k), (np.float32, np.int64), out_ops, staging)


def topk_ip(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    scales: Any = None,
    device: Device = "auto",
    stream: Any = None,
    path: KernelPath = "auto",
    out: Any = None,
) -> tuple[Any, Any]:
    """The ``k`` gallery rows with the largest inner product for each query.

    Args:
        queries: ``[Q, D]``; host float arrays are rounded to float16, device arrays must be float16.
        gallery: ``[N, D]`` float16 (host floats are rounded), or int8 together with ``scales``.
        k: results per query, 1..1024 (k > N pads, see the module docstring).
        scales: ``[N]`` float32 per-row scales of an int8 gallery: score = scale[n] * (q . g[n]).
        device: ``"auto"`` (GPU when available), ``"cuda"`` (error if not) or ``"cpu"``.
        stream: CUDA stream to run on (int handle, torch/CuPy/cuda-python stream); default: the CUDA Array
            Interface stream of a device input, else the legacy default stream.
        path: GPU kernel: ``"auto"``, ``"simt"`` (streaming, CUDA cores), ``"tensor"`` (tensor cores, k <= 256)
            or ``"tensor32"`` (tensor cores with 32-query tiles: a tuning option). Ignored on the CPU.
        out: optional pair ``(scores float32 [Q,k], indices int64 [Q,k])`` (host or device arrays) to fill.
            Device ``out`` arrays are written asynchronously on ``stream``.

    Returns:
        ``(scores, indices)``: new host arrays, or the ``out`` arrays.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, k or device name. RuntimeError: device="cuda" (or
        device inputs) without usable GPU kernels. GpuError: a CUDA failure.
    """
    k = _check_k(k)
    if path not in _cuda.PATHS:
        raise ValueError(f"path must be one of {sorted(_cuda.PATHS)}, got {path!r}")
    pre_stream = stream_handle(stream) or 0
    q = _float16_operand(as_operand(queries, "queries", pre_stream), "queries")
    g = _gallery_operand(as_operand(gallery, "gallery", pre_stream))
    nq, d = _check_2d(q, "queries")
    n, dg = _check_2d(g, "gallery")
    if dg != d:
        raise ValueError(f"queries have dimension {d} but the gallery has {dg}")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"dimension must be in [1, {MAX_DIM}], got {d}")
    s: Operand | None = None
    if g.dtype == np.int8:
        if scales is None:
            raise ValueError("an int8 gallery needs scales (one float32 per row)")
        s = _scales_operand(scales, n, pre_stream)
    elif scales is not None:
        raise ValueError("scales apply only to an int8 gallery")
    work = _pick_stream(stream, [q, g, s])
    out_ops = None if out is None else _check_out(out, (nq, k), (np.float32, np.int64), work)
    backend = _resolve_device(device, [q, g, s, *(out_ops or ())])
    if path in ("tensor", "tensor32") and k > 256 and backend == "cuda":
        raise ValueError("the tensor-core path serves k <= 256; use path='auto' or 'simt'")
    if backend == "cuda":
        res = _ip_gpu(q, g, s, k, path, work, out_ops)
    else:
        _wait_for_producers(work, [q, g, s, *(out_ops or ())])
        host_s = None if s is None else _to_host(s, work).astype(np.float32)
        res = _deliver(_cpu.topk_ip_cpu(_to_host(q, work), _to_host(g, work), k, host_s), out_ops, work)
    return res if out is None else (out[0], out[1])


# ----------------------------------------------------------------------------------------------------------
# Hamming


def _hamming_gpu(
    q: Operand, c: Operand, k: int, stream: int, out_ops: tuple[Operand, Operand] | None
) -> tuple[Any, Any]:
    lib = _cuda.load_library()
    nq, nbytes = int(q.shape[0]), int(q.shape[1])
    n = int(c.shape[0])
    _wait_for_producers(stream, [q, c, *(out_ops or ())])
    with _Staging(stream) as staging:
        qp, cp = staging.ptr(q), staging.ptr(c)

        def launch(vptr: int, iptr: int) -> None:
            code = lib.zsbir_hamming_topk(qp, cp, nq, n, nbytes, k, vptr, iptr, stream)
            _cuda.check_status(int(code), "zsbir_hamming_topk")

        return _launch_and_collect(launch, (nq, k), (np.int32, np.int64), out_ops, staging)


def hamming_topk(
    query_codes: Any,
    codes: Any,
    k: int,
    *,
    device: Device = "auto",
    stream: Any = None,
    out: Any = None,
) -> tuple[Any, Any]:
    """The ``k`` codes nearest in Hamming distance to each query code.

    Args:
        query_codes: ``[Q, B]`` uint8 packed bits (B a multiple of 8 in [8, 128]: 64 to 1024 bits).
        codes: ``[N, B]`` uint8 (device arrays must be 8-byte aligned).
        k: results per query, 1..1024.
        device, stream: as for :func:`topk_ip`.
        out: optional pair ``(distances int32 [Q,k], indices int64 [Q,k])`` to fill.

    Returns:
        ``(distances int32 [Q, k], indices int64 [Q, k])``, nearest first; padding distance INT32_MAX.
    """
    k = _check_k(k)
    pre_stream = stream_handle(stream) or 0
    q, nq, qb = _codes_operand(as_operand(query_codes, "query_codes", pre_stream), "query_codes")
    c, _, cb = _codes_operand(as_operand(codes, "codes", pre_stream), "codes")
    if qb != cb:
        raise ValueError(f"query codes have {qb} bytes but gallery codes have {cb}")
    work = _pick_stream(stream, [q, c])
    out_ops = None if out is None else _check_out(out, (nq, k), (np.int32, np.int64), work)
    backend = _resolve_device(device, [q, c, *(out_ops or ())])
    if backend == "cuda":
        res = _hamming_gpu(q, c, k, work, out_ops)
    else:
        _wait_for_producers(work, [q, c, *(out_ops or ())])
        res = _deliver(_cpu.hamming_topk_cpu(_to_host(q, work), _to_host(c, work), k), out_ops, work)
    return res if out is None else (out[0], out[1])


# ----------------------------------------------------------------------------------------------------------
# Resident gallery


class GpuGallery:
    """A gallery uploaded once and searched many times (GPU when available, else the CPU path).

    ``GpuGallery(vectors_f16, codes=None)`` then ``.search(queries, k)`` and/or ``.search_codes(q, k)``.
    Host arrays are copied to device memory at construction; device arrays (CAI/DLPack) are used in
    place and must stay alive and unchanged while the gallery is in use.
    """

    def __init__(
        self,
        vectors: Any = None,
        codes: Any = None,
        *,
        scales: Any = None,
        device: Device = "auto",
        stream: Any = None,
    ) -> None:
        """Validate and (on the GPU) upload ``vectors`` [N, D] (float16, or int8 with ``scales``) and/or
        ``codes`` [N, B] uint8."""
        if vectors is None and codes is None:
            raise ValueError("GpuGallery needs vectors, codes, or both")
        st = stream_handle(stream) or 0
        self._buffers: list[_cuda.DeviceBuffer] = []
        self._vectors: Operand | None = None
        self._scales: Operand | None = None
        self._codes: Operand | None = None
        self.dim: int | None = None
        self.code_bytes: int | None = None
        n_vec = n_codes = None
        if vectors is not None:
            v = _gallery_operand(as_operand(vectors, "vectors", st))
            n_vec, self.dim = _check_2d(v, "vectors")
            if not 1 <= self.dim <= MAX_DIM:
                raise ValueError(f"dimension must be in [1, {MAX_DIM}], got {self.dim}")
            if v.dtype == np.int8:
                if scales is None:
                    raise ValueError("int8 vectors need scales (one float32 per row)")
                self._scales = _scales_operand(scales, n_vec, st)
            elif scales is not None:
                raise ValueError("scales apply only to int8 vectors")
            self._vectors = v
        if codes is not None:
            c, n_codes, self.code_bytes = _codes_operand(as_operand(codes, "codes", st), "codes")
            self._codes = c
        if n_vec is not None and n_codes is not None and n_vec != n_codes:
            raise ValueError(f"vectors have {n_vec} rows but codes have {n_codes}")
        self.size = int(n_vec if n_vec is not None else n_codes)  # type: ignore[arg-type]
        self.device: Device = _resolve_device(device, [self._vectors, self._scales, self._codes])
        if self.device == "cuda":
            self._vectors = self._resident(self._vectors)
            self._scales = self._resident(self._scales)
            self._codes = self._resident(self._codes)
        else:
            self._vectors = None if self._vectors is None else _to_host(self._vectors, st)
            self._scales = None if self._scales is None else _to_host(self._scales, st)
            self._codes = None if self._codes is None else _to_host(self._codes, st)

    def _resident(self, op: Operand | None) -> Operand | None:
        if op is None or isinstance(op, DeviceArray):
            return op
        buf = _cuda.upload(op, None)
        self._buffers.append(buf)
        return DeviceArray(buf.ptr, tuple(op.shape), op.dtype, None, None, buf)

    @property
    def nbytes_device(self) -> int:
        """Bytes of device memory this object allocated (0 on the CPU path or for borrowed arrays)."""
        return sum(b.nbytes for b in self._buffers)

    def search(
        self, queries: Any, k: int, *, path: KernelPath = "auto", stream: Any = None, out: Any = None
    ) -> tuple[Any, Any]:
        """Inner-product top-k of ``queries`` [Q, D] against the vectors (see :func:`topk_ip`)."""
        if self._vectors is None:
            raise ValueError("this GpuGallery holds no vectors (only codes)")
        return topk_ip(
            queries, self._vectors, k, scales=self._scales, device=self.device, stream=stream, path=path, out=out
        )

    def search_codes(self, query_codes: Any, k: int, *, stream: Any = None, out: Any = None) -> tuple[Any, Any]:
        """Hamming top-k of ``query_codes`` [Q, B] against the codes (see :func:`hamming_topk`)."""
        if self._codes is None:
            raise ValueError("this GpuGallery holds no binary codes")
        return hamming_topk(query_codes, self._codes, k, device=self.device, stream=stream, out=out)

    def close(self) -> None:
        """Free the device memory this gallery allocated. Searching afterwards raises ValueError."""
        for b in self._buffers:
            b.free()
        self._buffers.clear()
        self._vectors = self._scales = self._codes = None

    def __enter__(self) -> GpuGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"GpuGallery(size={self.size}, dim={self.dim}, code_bytes={self.code_bytes}, device={self.device!r})"
