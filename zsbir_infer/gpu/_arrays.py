"""Array interop without torch: host numpy arrays, ``__cuda_array_interface__`` and DLPack device arrays.

A device array (torch, CuPy, cuda-python, pycuda, Numba, ...) is described by a :class:`DeviceArray`:
pointer, shape, dtype and, for the CUDA Array Interface, the producer's stream. Only C-contiguous arrays
on the current device are accepted; anything else raises ``ValueError`` with the reason.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# DLPack device types.
_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_CUDA_HOST = 3
_KDL_CUDA_MANAGED = 13

_DLPACK_DTYPES: dict[tuple[int, int], np.dtype] = {
    (0, 8): np.dtype(np.int8),
    (0, 16): np.dtype(np.int16),
    (0, 32): np.dtype(np.int32),
    (0, 64): np.dtype(np.int64),
    (1, 8): np.dtype(np.uint8),
    (1, 16): np.dtype(np.uint16),
    (1, 32): np.dtype(np.uint32),
    (1, 64): np.dtype(np.uint64),
    (2, 16): np.dtype(np.float16),
    (2, 32): np.dtype(np.float32),
    (2, 64): np.dtype(np.float64),
}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_pyapi = ctypes.PyDLL(None)
_capsule_pointer = _pyapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass
class DeviceArray:
    """A C-contiguous array in CUDA device memory that this package does not own."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device_id: int | None = None
    stream: int | None = None  # the stream the data is ready on: CAI v3 producer's, or the one DLPack was asked for
    keepalive: Any = field(default=None, repr=False)
    readonly: bool = False  # the CUDA Array Interface producer marked the data read-only

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


Operand = np.ndarray | DeviceArray


def _contiguous_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    acc = itemsize
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    if strides is None:
        return True
    want = _contiguous_strides(shape, itemsize)
    # strides of size-1 (or size-0 arrays) do not matter
    if any(d == 0 for d in shape):
        return True
    return all(d == 1 or s == w for d, s, w in zip(shape, strides, want, strict=True))


def _from_cai(obj: Any, name: str) -> DeviceArray:
    cai = obj.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked CUDA arrays are not supported")
    strides = cai.get("strides")
    if not _is_contiguous(shape, None if strides is None else tuple(int(s) for s in strides), dtype.itemsize):
        raise ValueError(f"{name} must be C-contiguous (got strides {tuple(strides)} for shape {shape})")
    ptr = int(cai["data"][0] or 0)
    readonly = bool(cai["data"][1]) if len(cai["data"]) > 1 else False
    stream = cai.get("stream")
    return DeviceArray(ptr, shape, dtype, None, None if stream is None else int(stream), obj, readonly)


def _from_dlpack(obj: Any, name: str, stream: int) -> DeviceArray:
    # DLPack: the consumer names the stream it will use; 0 is reserved, 1 = legacy default stream.
    dl_stream = stream if stream not in (0, None) else 1
    try:
        capsule = obj.__dlpack__(stream=dl_stream)
    except TypeError:
        capsule = obj.__dlpack__()
    addr = _capsule_pointer(capsule, b"dltensor")
    if not addr:
        raise ValueError(f"{name}: __dlpack__ returned an unusable capsule")
    t = _DLTensor.from_address(addr)
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    key = (int(t.dtype.code), int(t.dtype.bits))
    if int(t.dtype.lanes) != 1 or key not in _DLPACK_DTYPES:
        raise TypeError(f"{name}: unsupported DLPack dtype (code {key[0]}, bits {key[1]}, lanes {t.dtype.lanes})")
    dtype = _DLPACK_DTYPES[key]
    strides = None
    if t.strides:
        strides = tuple(int(t.strides[i]) * dtype.itemsize for i in range(t.ndim))
    if not _is_contiguous(shape, strides, dtype.itemsize):
        raise ValueError(f"{name} must be C-contiguous")
    ptr = int(t.data or 0) + int(t.byte_offset)
    # the producer made the data ready on the stream we named (0 and 1 both mean the legacy default stream)
    return DeviceArray(ptr, shape, dtype, int(t.device.device_id), int(stream or 0), (obj, capsule))


def is_device_array(obj: Any) -> bool:
    """Whether ``obj`` lives in CUDA device memory (CUDA Array Interface or a CUDA DLPack device)."""
    if isinstance(obj, (np.ndarray, DeviceArray)):
        return isinstance(obj, DeviceArray)
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None:
        try:
            dtype_code = int(dev()[0])
        except Exception:
            return False
        return dtype_code in (_KDL_CUDA, _KDL_CUDA_MANAGED)
    return False


def as_operand(obj: Any, name: str, stream: int = 0) -> Operand:
    """Describe ``obj`` as a host numpy array or a :class:`DeviceArray` (nothing is copied)."""
    if obj is None:
        raise TypeError(f"{name} is required")
    if isinstance(obj, (np.ndarray, DeviceArray)):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cai(obj, name)
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None:
        dev_type = int(dev()[0])
        if dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            return _from_dlpack(obj, name, stream)
        if dev_type in (_KDL_CPU, _KDL_CUDA_HOST):
            return np.from_dlpack(obj)
        raise ValueError(f"{name}: unsupported DLPack device type {dev_type}")
    try:
        return np.asarray(obj)
    except Exception as exc:
        raise TypeError(f"{name}: cannot read {type(obj).__name__} as an array") from exc


def stream_handle(stream: Any) -> int | None:
    """The raw ``cudaStream_t`` value of a stream object (int, torch, CuPy, cuda-python) or None."""
    if stream is None:
        return None
    if isinstance(stream, bool):
        raise TypeError("stream must be a CUDA stream, not a bool")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        value = getattr(stream, attr, None)
        if isinstance(value, int):
            return value
    try:
        return int(stream)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot use {type(stream).__name__} as a CUDA stream") from exc
