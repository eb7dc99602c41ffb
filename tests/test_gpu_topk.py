"""Fused top-k search (zsbir_infer.gpu): CPU path against float64 references everywhere, GPU kernels
against the same references and against the CPU path where a GPU is present (@pytest.mark.gpu).

Integer-valued float16 data makes every float32 sum exact, so for such inputs any correct
implementation (any summation order) returns *exactly* the float64 reference, including the tie order.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zsbir_infer import gpu
from zsbir_infer.gpu import _cpu, _cuda
from zsbir_infer.gpu._arrays import DeviceArray, as_operand, is_device_array, stream_handle

# ----------------------------------------------------------------------------------------------------------
# References (float64, explicit tie rule) and checks


def ref_topk_ip(q: np.ndarray, g: np.ndarray, k: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """float64 scores [Q, N] and the reference top-k (scores, indices) with ties by smaller index."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if scales is not None:
        s = s * scales.astype(np.float64)[None, :]
    s = np.where(np.isnan(s), -np.inf, s)
    nq, n = s.shape
    idx = np.full((nq, k), -1, dtype=np.int64)
    val = np.full((nq, k), -np.inf)
    for r in range(nq):
        order = np.lexsort((np.arange(n), -s[r]))[:k]
        idx[r, : len(order)] = order
        val[r, : len(order)] = s[r, order]
    return s, val, idx


def ref_hamming(qc: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hamming top-k from unpacked bits, ties by smaller index."""
    qb = np.unpackbits(qc, axis=1).astype(np.int64)
    cb = np.unpackbits(c, axis=1).astype(np.int64)
    d = (qb[:, None, :] != cb[None, :, :]).sum(axis=2) if len(c) else np.zeros((len(qc), 0), np.int64)
    nq, n = d.shape
    dist = np.full((nq, k), np.iinfo(np.int32).max, dtype=np.int64)
    idx = np.full((nq, k), -1, dtype=np.int64)
    for r in range(nq):
        order = np.lexsort((np.arange(n), d[r]))[:k]
        idx[r, : len(order)] = order
        dist[r, : len(order)] = d[r, order]
    return dist.astype(np.int32), idx


def check_topk(scores: np.ndarray, indices: np.ndarray, full: np.ndarray, k: int, tol: np.ndarray) -> None:
    """Approximate check: valid indices, scores match the float64 scores, same set except near-ties at k-th.

    ``tol[q]`` bounds the score error of query q.
    """
    nq, n = full.shape
    assert scores.shape == (nq, k) and indices.shape == (nq, k)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    valid = min(k, n)
    assert np.all(indices[:, valid:] == -1) and np.all(np.isneginf(scores[:, valid:]))
    for r in range(nq):
        got = indices[r, :valid]
        assert np.all((got >= 0) & (got < n)), "index out of range"
        assert len(np.unique(got)) == valid, "duplicate index"
        np.testing.assert_allclose(scores[r, :valid], full[r, got], rtol=0, atol=tol[r])
        assert np.all(np.diff(scores[r, :valid].astype(np.float64)) <= tol[r]), "not sorted best first"
        if valid == 0:
            continue
        kth = np.sort(full[r])[::-1][valid - 1]
        must = np.flatnonzero(full[r] > kth + 2 * tol[r])
        assert set(must.tolist()) <= set(got.tolist()), "a clearly better row is missing"
        assert np.all(full[r, got] >= kth - 2 * tol[r]), "a clearly worse row was returned"


def ip_tolerance(q: np.ndarray, g: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """Per-query bound on float32 accumulation error: D * eps32 * max_n sum_d |q_d g_nd| * |scale|."""
    a = np.abs(q.astype(np.float64)) @ np.abs(g.astype(np.float64)).T if len(g) else np.zeros((len(q), 1))
    if scales is not None and len(g):
        a = a * np.abs(scales.astype(np.float64))[None, :]
    d = q.shape[1]
    return (d + 2) * np.finfo(np.float32).eps * (a.max(axis=1) + 1e-30) + 1e-6


def int_valued(rng: np.random.Generator, shape: tuple[int, ...], lo: int = -4, hi: int = 4) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.float16)


# Shapes: N, Q, D not multiples of 8/16/tiles; k > N; N = 0; k = 1; k = 1024.
SHAPES = [
    (1, 1, 1, 1),
    (1, 7, 33, 5),
    (3, 129, 64, 10),
    (5, 1000, 37, 100),
    (2, 50, 17, 60),  # k > N
    (4, 0, 16, 3),  # empty gallery
    (17, 300, 96, 1),
    (70, 513, 48, 32),
    (3, 1500, 8, 1024),
    (2, 2000, 2048, 7),
]


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the CPU path regardless of the machine."""
    monkeypatch.setenv(_cuda.DISABLE_ENV, "1")
    _cuda.reset_cache()
    yield
    _cuda.reset_cache()


# ----------------------------------------------------------------------------------------------------------
# CPU path


@pytest.mark.parametrize(("nq", "n", "d", "k"), SHAPES)
def test_cpu_random_floats_match_float64(nq: int, n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(1000 * nq + n + d + k)
    q = rng.standard_normal((nq, d)).astype(np.float16)
    g = rng.standard_normal((n, d)).astype(np.float16)
    full, _, _ = ref_topk_ip(q, g, k)
    s, i = gpu.topk_ip(q, g, k, device="cpu")
    check_topk(s, i, full, k, ip_tolerance(q, g))


@pytest.mark.parametrize(("nq", "n", "d", "k"), SHAPES)
def test_cpu_integer_data_exact_including_ties(nq: int, n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(7 + nq * n + d * k)
    q = int_valued(rng, (nq, d))
    g = int_valued(rng, (n, d), -1, 1)  # few distinct scores: many ties
    _, val, idx = ref_topk_ip(q, g, k)
    s, i = gpu.topk_ip(q, g, k, device="cpu")
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(s, val.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(1, 6),
    n=st.integers(0, 300),
    d=st.integers(1, 40),
    k=st.integers(1, 400),
    block=st.sampled_from([8, 64, 1 << 22]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_property_exact_on_integer_data(nq: int, n: int, d: int, k: int, block: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = int_valued(rng, (nq, d), -2, 2)
    g = int_valued(rng, (n, d), -1, 1)
    saved = _cpu._BLOCK_ELEMENTS
    _cpu._BLOCK_ELEMENTS = block  # exercise chunk merging (restored below)
    try:
        s, i = gpu.topk_ip(q, g, k, device="cpu")
        codes = rng.integers(0, 4, size=(n, 8), dtype=np.uint8)
        dq, di = gpu.hamming_topk(codes[:1] if n else np.zeros((1, 8), np.uint8), codes, k, device="cpu")
    finally:
        _cpu._BLOCK_ELEMENTS = saved
    _, val, idx = ref_topk_ip(q, g, k)
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(s, val.astype(np.float32))
    dist, hidx = ref_hamming(codes[:1] if n else np.zeros((1, 8), np.uint8), codes, k)
    np.testing.assert_array_equal(di, hidx)
    np.testing.assert_array_equal(dq, dist)


def test_cpu_chunked_merge_keeps_tie_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many tiny chunks so the running best-k is merged over and over."""
    monkeypatch.setattr(_cpu, "_BLOCK_ELEMENTS", 16)
    rng = np.random.default_rng(3)
    q = int_valued(rng, (4, 9))
    g = np.repeat(int_valued(rng, (40, 9), -1, 1), 5, axis=0)  # every row 5 times: exact ties
    for k in (1, 7, 64, 300):
        _, val, idx = ref_topk_ip(q, g, k)
        s, i = gpu.topk_ip(q, g, k, device="cpu")
        np.testing.assert_array_equal(i, idx)
        np.testing.assert_array_equal(s, val.astype(np.float32))


def test_cpu_all_equal_scores_give_first_k_indices() -> None:
    q = np.ones((2, 8), np.float16)
    g = np.ones((100, 8), np.float16)
    s, i = gpu.topk_ip(q, g, 10, device="cpu")
    np.testing.assert_array_equal(i, np.tile(np.arange(10), (2, 1)))
    assert np.all(s == 8.0)


def test_cpu_int8_gallery_with_scales() -> None:
    rng = np.random.default_rng(11)
    q = int_valued(rng, (6, 40))
    g8 = rng.integers(-128, 128, size=(333, 40), dtype=np.int8)
    scales = (2.0 ** rng.integers(-8, 2, size=333)).astype(np.float32)  # exact multiplications
    _, val, idx = ref_topk_ip(q, g8, 25, scales)
    s, i = gpu.topk_ip(q, g8, 25, scales=scales, device="cpu")
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(s, val.astype(np.float32))
    # random real scales: approximate
    sc = rng.uniform(0.001, 0.02, size=333).astype(np.float32)
    qf = rng.standard_normal((6, 40)).astype(np.float16)
    full, _, _ = ref_topk_ip(qf, g8, 25, sc)
    s, i = gpu.topk_ip(qf, g8, 25, scales=sc, device="cpu")
    check_topk(s, i, full, 25, ip_tolerance(qf, g8, sc))


def test_cpu_nan_ranks_as_minus_inf() -> None:
    q = np.ones((1, 4), np.float16)
    g = np.array([[np.nan, 0, 0, 0], [-1, -1, -1, -1], [1, 1, 1, 1], [np.nan] * 4], np.float16)
    s, i = gpu.topk_ip(q, g, 4, device="cpu")
    np.testing.assert_array_equal(i[0], [2, 1, 0, 3])
    assert s[0, 0] == 4 and s[0, 1] == -4 and np.isneginf(s[0, 2:]).all()


def test_cpu_float32_inputs_are_rounded_to_float16() -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 20))
    g = rng.standard_normal((90, 20)).astype(np.float32)
    s1, i1 = gpu.topk_ip(q, g, 9, device="cpu")
    s2, i2 = gpu.topk_ip(q.astype(np.float16), g.astype(np.float16), 9, device="cpu")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_cpu_out_arrays_are_filled() -> None:
    rng = np.random.default_rng(8)
    q = rng.standard_normal((3, 16)).astype(np.float16)
    g = rng.standard_normal((40, 16)).astype(np.float16)
    out = (np.full((3, 5), np.nan, np.float32), np.full((3, 5), 12345, np.int64))
    s, i = gpu.topk_ip(q, g, 5, device="cpu", out=out)
    assert s is out[0] and i is out[1]
    s2, i2 = gpu.topk_ip(q, g, 5, device="cpu")
    np.testing.assert_array_equal(out[0], s2)
    np.testing.assert_array_equal(out[1], i2)


@pytest.mark.parametrize(
    ("nq", "n", "nbytes", "k"),
    [(1, 1, 8, 1), (3, 100, 8, 10), (2, 77, 16, 80), (4, 500, 128, 1024), (2, 0, 8, 3), (5, 257, 32, 5)],
)
def test_cpu_hamming_exact(nq: int, n: int, nbytes: int, k: int) -> None:
    rng = np.random.default_rng(nq + n + nbytes + k)
    c = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    # few bits set -> many equal distances
    c &= rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8) & 0x11
    qc = rng.integers(0, 256, size=(nq, nbytes), dtype=np.uint8) & 0x11
    dist, idx = ref_hamming(qc, c, k)
    d, i = gpu.hamming_topk(qc, c, k, device="cpu")
    assert d.dtype == np.int32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(d, dist)


def test_cpu_hamming_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu, "_BLOCK_ELEMENTS", 8)
    rng = np.random.default_rng(21)
    c = rng.integers(0, 4, size=(600, 8), dtype=np.uint8)
    qc = rng.integers(0, 4, size=(3, 8), dtype=np.uint8)
    for k in (1, 13, 700):
        dist, idx = ref_hamming(qc, c, k)
        d, i = gpu.hamming_topk(qc, c, k, device="cpu")
        np.testing.assert_array_equal(i, idx)
        np.testing.assert_array_equal(d, dist)


def test_gallery_object_cpu(cpu_only: None) -> None:
    rng = np.random.default_rng(2)
    v = rng.standard_normal((120, 24)).astype(np.float16)
    codes = rng.integers(0, 256, size=(120, 8), dtype=np.uint8)
    with gpu.GpuGallery(v, codes=codes) as gal:
        assert gal.device == "cpu" and len(gal) == 120 and gal.dim == 24 and gal.code_bytes == 8
        q = rng.standard_normal((4, 24)).astype(np.float16)
        s, i = gal.search(q, 7)
        s2, i2 = gpu.topk_ip(q, v, 7, device="cpu")
        np.testing.assert_array_equal(i, i2)
        np.testing.assert_array_equal(s, s2)
        d, j = gal.search_codes(codes[:3], 4)
        assert np.all(d[:, 0] == 0) and np.all(j[:, 0] == np.arange(3))
    with pytest.raises(ValueError, match="no binary codes"):
        gpu.GpuGallery(v).search_codes(codes[:1], 3)
    with pytest.raises(ValueError, match="no vectors"):
        gpu.GpuGallery(codes=codes).search(q, 3)
    with pytest.raises(ValueError, match="rows"):
        gpu.GpuGallery(v, codes=codes[:5])
    with pytest.raises(ValueError, match="vectors, codes"):
        gpu.GpuGallery()


# ----------------------------------------------------------------------------------------------------------
# Errors


def _qg(d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((2, d), np.float16) + 1, np.ones((5, d), np.float16)


@pytest.mark.parametrize("k", [0, -1, 1025])
def test_bad_k_values(k: int) -> None:
    q, g = _qg()
    with pytest.raises(ValueError, match="k must be in"):
        gpu.topk_ip(q, g, k, device="cpu")
    with pytest.raises(ValueError, match="k must be in"):
        gpu.hamming_topk(np.zeros((1, 8), np.uint8), np.zeros((3, 8), np.uint8), k, device="cpu")


@pytest.mark.parametrize("k", [2.0, True, "3", None])
def test_bad_k_types(k: Any) -> None:
    q, g = _qg()
    with pytest.raises(TypeError, match="k must be an int"):
        gpu.topk_ip(q, g, k, device="cpu")


def test_bad_shapes_and_dtypes() -> None:
    q, g = _qg()
    with pytest.raises(ValueError, match="queries must be 2-D"):
        gpu.topk_ip(q[0], g, 1, device="cpu")
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        gpu.topk_ip(q, g[None], 1, device="cpu")
    with pytest.raises(ValueError, match="dimension 8 but the gallery has 9"):
        gpu.topk_ip(q, np.ones((5, 9), np.float16), 1, device="cpu")
    with pytest.raises(ValueError, match="dimension must be in"):
        gpu.topk_ip(np.ones((1, 0), np.float16), np.ones((3, 0), np.float16), 1, device="cpu")
    with pytest.raises(ValueError, match="dimension must be in"):
        gpu.topk_ip(np.ones((1, 2049), np.float16), np.ones((3, 2049), np.float16), 1, device="cpu")
    with pytest.raises(TypeError, match="gallery must be a floating-point"):
        gpu.topk_ip(q, g.astype(np.int32), 1, device="cpu")
    with pytest.raises(TypeError, match="queries must be a floating-point"):
        gpu.topk_ip(q.astype(np.int8), g, 1, device="cpu")
    with pytest.raises(ValueError, match="needs scales"):
        gpu.topk_ip(q, g.astype(np.int8), 1, device="cpu")
    with pytest.raises(ValueError, match="only to an int8"):
        gpu.topk_ip(q, g, 1, scales=np.ones(5, np.float32), device="cpu")
    with pytest.raises(ValueError, match=r"scales must have shape \(5,\)"):
        gpu.topk_ip(q, g.astype(np.int8), 1, scales=np.ones(4, np.float32), device="cpu")
    with pytest.raises(TypeError, match="scales must be floating"):
        gpu.topk_ip(q, g.astype(np.int8), 1, scales=np.ones(5, np.int32), device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        gpu.topk_ip(q, g, 1, device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path must be"):
        gpu.topk_ip(q, g, 1, path="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"out\[0\] must have shape"):
        gpu.topk_ip(q, g, 3, device="cpu", out=(np.empty((2, 2), np.float32), np.empty((2, 3), np.int64)))
    with pytest.raises(TypeError, match=r"out\[1\] must be int64"):
        gpu.topk_ip(q, g, 3, device="cpu", out=(np.empty((2, 3), np.float32), np.empty((2, 3), np.int32)))
    with pytest.raises(TypeError, match="out must be a pair"):
        gpu.topk_ip(q, g, 3, device="cpu", out=np.empty((2, 3), np.float32))


def test_bad_codes() -> None:
    c = np.zeros((4, 8), np.uint8)
    with pytest.raises(ValueError, match="multiple of 8 bytes"):
        gpu.hamming_topk(np.zeros((1, 12), np.uint8), np.zeros((4, 12), np.uint8), 1, device="cpu")
    with pytest.raises(ValueError, match="multiple of 8 bytes"):
        gpu.hamming_topk(np.zeros((1, 136), np.uint8), np.zeros((4, 136), np.uint8), 1, device="cpu")
    with pytest.raises(TypeError, match="uint8"):
        gpu.hamming_topk(np.zeros((1, 1), np.uint64), c, 1, device="cpu")
    with pytest.raises(ValueError, match="8 bytes but gallery codes have 16"):
        gpu.hamming_topk(np.zeros((1, 8), np.uint8), np.zeros((4, 16), np.uint8), 1, device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        gpu.hamming_topk(np.zeros(8, np.uint8), c, 1, device="cpu")


def test_cuda_requested_without_gpu_is_an_error(cpu_only: None) -> None:
    q, g = _qg()
    with pytest.raises(RuntimeError, match="device='cuda' requested"):
        gpu.topk_ip(q, g, 1, device="cuda")
    fake = _FakeCAI(0x10000, (5, 8), "<f2")
    with pytest.raises(RuntimeError, match="CUDA device arrays"):
        gpu.topk_ip(q, fake, 1)


# ----------------------------------------------------------------------------------------------------------
# Availability and interop plumbing


def test_availability_reports_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, reason = gpu.availability()
    assert isinstance(ok, bool) and reason and gpu.is_available() == ok
    monkeypatch.setenv(_cuda.DISABLE_ENV, "1")
    _cuda.reset_cache()
    assert gpu.availability() == (False, f"GPU path disabled by {_cuda.DISABLE_ENV}")
    monkeypatch.delenv(_cuda.DISABLE_ENV)
    monkeypatch.setenv(_cuda.LIB_ENV, "/nonexistent/libzsbir_kernels.so")
    _cuda.reset_cache()
    ok, reason = gpu.availability()
    assert not ok and "not built" in reason
    with pytest.raises(gpu.GpuError, match="not built"):
        _cuda.load_library()
    monkeypatch.delenv(_cuda.LIB_ENV)
    _cuda.reset_cache()


class _FakeCAI:
    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str, strides: Any = None, stream: Any = None):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": strides,
            "stream": stream,
        }


def test_cuda_array_interface_parsing() -> None:
    a = as_operand(_FakeCAI(0x7000, (3, 64), "<f2", None, 42), "x")
    assert isinstance(a, DeviceArray)
    assert (a.ptr, a.shape, a.dtype, a.stream, a.nbytes) == (0x7000, (3, 64), np.float16, 42, 3 * 64 * 2)
    b = as_operand(_FakeCAI(0x7000, (3, 64), "|i1", (64, 1)), "x")
    assert isinstance(b, DeviceArray) and b.dtype == np.int8 and b.stream is None
    with pytest.raises(ValueError, match="C-contiguous"):
        as_operand(_FakeCAI(0x7000, (3, 64), "<f2", (2, 6)), "x")
    assert is_device_array(_FakeCAI(1, (1,), "<f4")) and not is_device_array(np.zeros(2))


class _DLManaged(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class _FakeDLPackCUDA:
    """Exposes a hand-built DLPack capsule describing CUDA memory (never dereferenced)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], code: int, bits: int, strides: tuple[int, ...] | None):
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        self._t = _DLManaged(ptr, 2, 0, len(shape), code, bits, 1, self._shape, self._strides, 16, None, None)
        self.seen_stream: Any = "unset"

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, stream: Any = None) -> Any:
        self.seen_stream = stream
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._t), b"dltensor", None)


def test_dlpack_cuda_parsing() -> None:
    x = _FakeDLPackCUDA(0x9000, (4, 32), 2, 16, None)
    a = as_operand(x, "x", stream=0)
    assert isinstance(a, DeviceArray)
    assert (a.ptr, a.shape, a.dtype, a.device_id) == (0x9000 + 16, (4, 32), np.float16, 0)
    assert x.seen_stream == 1  # the legacy default stream, as DLPack spells it
    as_operand(x, "x", stream=77)
    assert x.seen_stream == 77
    b = as_operand(_FakeDLPackCUDA(0x9000, (4, 32), 1, 8, (32, 1)), "x")
    assert isinstance(b, DeviceArray) and b.dtype == np.uint8
    with pytest.raises(ValueError, match="C-contiguous"):
        as_operand(_FakeDLPackCUDA(0x9000, (4, 32), 2, 16, (1, 4)), "x")
    with pytest.raises(TypeError, match="unsupported DLPack dtype"):
        as_operand(_FakeDLPackCUDA(0x9000, (4, 32), 5, 64, None), "x")
    assert is_device_array(x)


def test_dlpack_cpu_and_sequences_become_numpy() -> None:
    class Wrap:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def __dlpack__(self, stream: Any = None) -> Any:
            return self.a.__dlpack__()

        def __dlpack_device__(self) -> tuple[int, int]:
            return self.a.__dlpack_device__()

    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    got = as_operand(Wrap(arr), "x")
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, arr)
    lst = as_operand([[1.0, 2.0]], "x")
    assert isinstance(lst, np.ndarray) and lst.shape == (1, 2)
    _, i = gpu.topk_ip(Wrap(arr), [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], 2, device="cpu")
    np.testing.assert_array_equal(i, [[1, 0], [1, 0]])


def test_stream_handles() -> None:
    class TorchLike:
        cuda_stream = 123

    class CupyLike:
        ptr = 456

    class IntLike:
        def __int__(self) -> int:
            return 789

    assert stream_handle(None) is None
    assert stream_handle(5) == 5
    assert stream_handle(TorchLike()) == 123
    assert stream_handle(CupyLike()) == 456
    assert stream_handle(IntLike()) == 789
    with pytest.raises(TypeError):
        stream_handle(True)
    with pytest.raises(TypeError, match="CUDA stream"):
        stream_handle("s")


def test_runtime_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from zsbir_infer import gpu; "
        "gpu.topk_ip(np.ones((1,8),np.float16), np.ones((3,8),np.float16), 2); "
        "gpu.hamming_topk(np.zeros((1,8),np.uint8), np.zeros((3,8),np.uint8), 2); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------------------------
# GPU (skipped without an NVIDIA GPU; on a GPU machine the kernels must be built: `make kernels`)


@pytest.fixture
def on_gpu() -> None:
    _cuda.reset_cache()
    ok, reason = gpu.availability()
    if not ok:
        pytest.fail(f"a GPU is present but the kernels cannot run: {reason}")


class _DevBuf:
    """Device memory exposed through __cuda_array_interface__ (no CuPy/torch needed)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, stream: int | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.buf = _cuda.DeviceBuffer(int(np.prod(shape)) * self.dtype.itemsize)
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": self.dtype.str,
            "data": (self.buf.ptr, False),
            "version": 3,
            "strides": None,
            "stream": stream,
        }

    @classmethod
    def from_host(cls, a: np.ndarray, stream: int | None = None) -> _DevBuf:
        d = cls(a.shape, a.dtype, stream)
        _cuda.copy_to_device(d.buf.ptr, np.ascontiguousarray(a), 0)
        return d

    def poison(self) -> None:
        rt = _cuda.runtime()
        _cuda.cuda_call(rt.cudaMemset(self.buf.ptr, 0x7F, self.buf.nbytes), "cudaMemset")
        _cuda.cuda_call(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")  # before any other stream runs

    def host(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        _cuda.copy_to_host(out, self.buf.ptr, 0)
        return out


POISON_F32 = np.frombuffer(b"\x7f\x7f\x7f\x7f", np.float32)[0]
POISON_I64 = np.frombuffer(b"\x7f" * 8, np.int64)[0]
POISON_I32 = np.frombuffer(b"\x7f" * 4, np.int32)[0]

GPU_SHAPES = [
    *SHAPES,
    (1, 100_003, 64, 10),
    (16, 4097, 64, 100),
    (64, 20_000, 128, 10),
    (100, 9_999, 72, 256),
    (33, 5000, 200, 64),
    (1, 70_000, 31, 1024),
    (9, 3000, 2048, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["auto", "simt", "tensor", "tensor32"])
@pytest.mark.parametrize(("nq", "n", "d", "k"), GPU_SHAPES)
def test_gpu_ip_random_against_float64(on_gpu: None, path: str, nq: int, n: int, d: int, k: int) -> None:
    if path.startswith("tensor") and k > 256:
        pytest.skip("tensor paths serve k <= 256")
    rng = np.random.default_rng()  # fresh inputs each run
    q = rng.standard_normal((nq, d)).astype(np.float16)
    g = rng.standard_normal((n, d)).astype(np.float16)
    out = (_DevBuf((nq, k), np.float32), _DevBuf((nq, k), np.int64))
    for o in out:
        o.poison()
    gpu.topk_ip(q, g, k, device="cuda", path=path, out=out)  # type: ignore[arg-type]
    s, i = out[0].host(), out[1].host()
    assert not np.any(s == POISON_F32) and not np.any(i == POISON_I64), "unwritten output"
    full, _, _ = ref_topk_ip(q, g, k)
    check_topk(s, i, full, k, ip_tolerance(q, g))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["simt", "tensor", "tensor32"])
@pytest.mark.parametrize(("nq", "n", "d", "k"), GPU_SHAPES)
def test_gpu_ip_integer_data_equals_cpu_exactly(on_gpu: None, path: str, nq: int, n: int, d: int, k: int) -> None:
    if path.startswith("tensor") and k > 256:
        pytest.skip("tensor paths serve k <= 256")
    rng = np.random.default_rng()
    q = int_valued(rng, (nq, d), -3, 3)
    g = int_valued(rng, (n, d), -1, 1)  # many exact ties
    s, i = gpu.topk_ip(q, g, k, device="cuda", path=path)  # type: ignore[arg-type]
    s_cpu, i_cpu = gpu.topk_ip(q, g, k, device="cpu")
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["simt", "tensor"])
def test_gpu_int8_gallery(on_gpu: None, path: str) -> None:
    rng = np.random.default_rng()
    for nq, n, d, k in [(1, 50_001, 64, 10), (40, 7777, 96, 50), (3, 1000, 13, 300)]:
        if path == "tensor" and k > 256:
            continue
        q = int_valued(rng, (nq, d))
        g8 = rng.integers(-128, 128, size=(n, d), dtype=np.int8)
        scales = (2.0 ** rng.integers(-10, 0, size=n)).astype(np.float32)
        s, i = gpu.topk_ip(q, g8, k, scales=scales, device="cuda", path=path)  # type: ignore[arg-type]
        s_cpu, i_cpu = gpu.topk_ip(q, g8, k, scales=scales, device="cpu")
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)


@pytest.mark.gpu
def test_gpu_misaligned_and_odd_dims_use_scalar_path(on_gpu: None) -> None:
    rng = np.random.default_rng()
    base = int_valued(rng, (3001 * 40 + 1,))
    g = base[1:].reshape(3001, 40)  # 2-byte offset: not 16-byte aligned
    q = int_valued(rng, (20, 40))
    dg = _DevBuf.from_host(np.ascontiguousarray(base))
    view = DeviceArray(dg.buf.ptr + 2, (3001, 40), np.dtype(np.float16), None, None, dg)
    for path in ("simt", "tensor", "tensor32"):
        s, i = gpu.topk_ip(q, view, 17, device="cuda", path=path)  # type: ignore[arg-type]
        s_cpu, i_cpu = gpu.topk_ip(q, g, 17, device="cpu")
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("nq", "n", "nbytes", "k"),
    [(1, 1, 8, 1), (1, 1_000_003, 8, 10), (3, 100, 8, 200), (20, 50_000, 16, 100), (2, 30_000, 128, 1024),
     (9, 12_345, 32, 7), (4, 0, 8, 5), (70, 2000, 64, 33)],
)  # fmt: skip
def test_gpu_hamming_equals_cpu(on_gpu: None, nq: int, n: int, nbytes: int, k: int) -> None:
    rng = np.random.default_rng()
    c = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    qc = rng.integers(0, 256, size=(nq, nbytes), dtype=np.uint8)
    out = (_DevBuf((nq, k), np.int32), _DevBuf((nq, k), np.int64))
    for o in out:
        o.poison()
    gpu.hamming_topk(qc, c, k, device="cuda", out=out)
    d, i = out[0].host(), out[1].host()
    assert not np.any(d == POISON_I32) and not np.any(i == POISON_I64), "unwritten output"
    d_cpu, i_cpu = gpu.hamming_topk(qc, c, k, device="cpu")
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(d, d_cpu)
    if n <= 2000:
        dist, idx = ref_hamming(qc, c, k)
        np.testing.assert_array_equal(i, idx)
        np.testing.assert_array_equal(d, dist)


@pytest.mark.gpu
def test_gpu_device_inputs_streams_and_gallery(on_gpu: None) -> None:
    rt = _cuda.runtime()
    stream = int(_cuda.cuda_call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"))
    try:
        rng = np.random.default_rng()
        q = int_valued(rng, (5, 64))
        g = int_valued(rng, (12_345, 64), -1, 1)
        s_cpu, i_cpu = gpu.topk_ip(q, g, 20, device="cpu")
        dq, dg = _DevBuf.from_host(q, stream), _DevBuf.from_host(g, stream)  # CAI with a stream
        out = (_DevBuf((5, 20), np.float32), _DevBuf((5, 20), np.int64))
        for o in out:
            o.poison()
        gpu.topk_ip(dq, dg, 20, out=out)  # runs on the CAI stream, asynchronously
        _cuda.synchronize(stream)
        np.testing.assert_array_equal(out[1].host(), i_cpu)
        np.testing.assert_array_equal(out[0].host(), s_cpu)
        s, i = gpu.topk_ip(dq, dg, 20, stream=stream)  # explicit stream, host results
        np.testing.assert_array_equal(i, i_cpu)
        with gpu.GpuGallery(g, codes=rng.integers(0, 256, size=(12_345, 8), dtype=np.uint8)) as gal:
            assert gal.device == "cuda" and gal.nbytes_device == 12_345 * (64 * 2 + 8)
            s, i = gal.search(q, 20)
            np.testing.assert_array_equal(i, i_cpu)
            np.testing.assert_array_equal(s, s_cpu)
        with gpu.GpuGallery(dg) as gal:  # borrowed device array: nothing allocated
            assert gal.nbytes_device == 0
            np.testing.assert_array_equal(gal.search(q, 20)[1], i_cpu)
    finally:
        _cuda.cuda_call(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


@pytest.mark.gpu
def test_gpu_tensor_path_rejects_large_k(on_gpu: None) -> None:
    q, g = _qg()
    with pytest.raises(ValueError, match="k <= 256"):
        gpu.topk_ip(q, g, 257, device="cuda", path="tensor")


@pytest.mark.gpu
def test_gpu_inputs_from_cupy(on_gpu: None) -> None:
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng()
    q = int_valued(rng, (7, 48))
    g = int_valued(rng, (5000, 48), -1, 1)
    s_cpu, i_cpu = gpu.topk_ip(q, g, 12, device="cpu")
    s, i = gpu.topk_ip(cp.asarray(q), cp.asarray(g), 12, stream=cp.cuda.get_current_stream())
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
    out = (cp.full((7, 12), cp.nan, dtype=cp.float32), cp.full((7, 12), 99, dtype=cp.int64))
    gpu.topk_ip(cp.asarray(q), cp.asarray(g), 12, out=out)
    np.testing.assert_array_equal(cp.asnumpy(out[1]), i_cpu)


@pytest.mark.gpu
@pytest.mark.torch
def test_gpu_inputs_from_torch_dlpack_and_cai(on_gpu: None) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    rng = np.random.default_rng()
    q = int_valued(rng, (7, 48))
    g = int_valued(rng, (5000, 48), -1, 1)
    s_cpu, i_cpu = gpu.topk_ip(q, g, 12, device="cpu")
    tq, tg = torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda()
    s, i = gpu.topk_ip(tq, tg, 12, stream=torch.cuda.current_stream())  # CAI
    np.testing.assert_array_equal(i, i_cpu)

    class OnlyDLPack:
        def __init__(self, t: Any) -> None:
            self.t = t

        def __dlpack__(self, stream: Any = None) -> Any:
            return self.t.__dlpack__(stream=stream)

        def __dlpack_device__(self) -> Any:
            return self.t.__dlpack_device__()

    s, i = gpu.topk_ip(OnlyDLPack(tq), OnlyDLPack(tg), 12)
    np.testing.assert_array_equal(i, i_cpu)
    np.testing.assert_array_equal(s, s_cpu)
