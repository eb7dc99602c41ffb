"""The CUDA kernels' own sources, run on the CPU emulator (kernels/emu): their logic is tested here, on every
machine, against float64 references, the CPU path and each other; the GPU tests (test_gpu_topk.py) repeat
the checks on real hardware where one is present.

The emulator runs every CUDA thread as a fiber, interleaving them only at barriers, in an order that is a
setting (forward, reverse, seeded random): a result that changes with the order is a race. Outputs are
poisoned before every call (an unwritten element is caught), shared memory and workspace start as garbage
behind guard bands, and the launch rules the host code relies on (grid.y <= 65535, the shared-memory
opt-in) are enforced. ``test_emulator_catches_*`` show that these checks do fail on known-bad kernels.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_gpu_topk import (
    POISON_F32,
    POISON_I32,
    POISON_I64,
    check_topk,
    int_valued,
    ip_tolerance,
    ref_hamming,
    ref_topk_ip,
)

from zsbir_infer.gpu import _cpu, _cuda

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
EMU_LIB = KERNELS / "build" / "emu" / "libzsbir_kernels_emu.so"
ASAN_LIB = KERNELS / "build" / "emu-asan" / "libzsbir_kernels_emu.so"

PATHS = _cuda.PATHS
OK = 0
ERR_NULL, ERR_SHAPE, ERR_DIM, ERR_K, ERR_CODE_BYTES, ERR_DTYPE, ERR_MISALIGNED = 1, 2, 3, 4, 5, 6, 7
ERR_UNSUPPORTED, ERR_SMEM, ERR_PATH = 8, 9, 10
H100_SMEM = 232448  # opt-in shared memory per block: H100 227 KiB, A100 163 KiB, sm_86/sm_89 99 KiB
A100_SMEM = 166912
SM86_SMEM = 101376
FORWARD, REVERSE, RANDOM, LOCKSTEP = 0, 1, 2, 3


def _build(target: str) -> None:
    if shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("make or a C++ compiler is missing: the kernel emulator cannot be built")
    res = subprocess.run(["make", "-C", str(KERNELS), target], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def emu_lib() -> ctypes.CDLL:
    _build("emu")
    lib = ctypes.CDLL(str(EMU_LIB))
    _cuda._declare(lib)
    lib.zsbir_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.zsbir_emu_configure.restype = ctypes.c_int
    lib.zsbir_emu_faults.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.zsbir_emu_faults.restype = ctypes.c_int
    lib.zsbir_emu_reset.argtypes = []
    lib.zsbir_emu_reset.restype = None
    lib.zsbir_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
    lib.zsbir_emu_stats.restype = None
    lib.zsbir_emu_set_max_grid_y.argtypes = [ctypes.c_int]
    lib.zsbir_emu_set_max_grid_y.restype = ctypes.c_int
    lib.zsbir_emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.zsbir_emu_selftest.restype = ctypes.c_int
    return lib


class Emu:
    """The emulated device: configure it, call the C ABI with host arrays, read faults and statistics."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def configure(self, sms: int = 132, smem: int = H100_SMEM, order: int = FORWARD, seed: int = 0) -> None:
        assert self.lib.zsbir_emu_configure(sms, smem, order, seed) == 0

    def faults(self) -> tuple[int, str]:
        buf = ctypes.create_string_buffer(512)
        n = int(self.lib.zsbir_emu_faults(buf, 512))
        return n, buf.value.decode()

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_longlong * 10)()
        self.lib.zsbir_emu_stats(out)
        keys = ("launches", "blocks", "grid_x", "grid_y", "grid_z", "smem", "max_smem", "live_workspace",
                "max_workspace", "streamed_bytes")  # fmt: skip
        return dict(zip(keys, (int(v) for v in out), strict=True))

    def topk_ip(
        self,
        q: np.ndarray,
        g: np.ndarray,
        k: int,
        path: str = "auto",
        scales: np.ndarray | None = None,
        gallery_ptr: int | None = None,
    ) -> tuple[int, np.ndarray, np.ndarray]:
        nq, d = q.shape
        n = g.shape[0]
        scores = np.full((nq, k), POISON_F32, np.float32)
        idx = np.full((nq, k), POISON_I64, np.int64)
        dtype = _cuda.GALLERY_I8 if g.dtype == np.int8 else _cuda.GALLERY_F16
        gptr = gallery_ptr if gallery_ptr is not None else (g.ctypes.data if n else None)
        sptr = scales.ctypes.data if scales is not None else None
        st = self.lib.zsbir_topk_ip(
            q.ctypes.data if nq else None, gptr, sptr, dtype, nq, n, d, k,
            scores.ctypes.data, idx.ctypes.data, PATHS[path], None,
        )  # fmt: skip
        return int(st), scores, idx

    def hamming(self, qc: np.ndarray, c: np.ndarray, k: int) -> tuple[int, np.ndarray, np.ndarray]:
        nq, nbytes = qc.shape
        dist = np.full((nq, k), POISON_I32, np.int32)
        idx = np.full((nq, k), POISON_I64, np.int64)
        st = self.lib.zsbir_hamming_topk(
            qc.ctypes.data, c.ctypes.data if len(c) else None, nq, len(c), nbytes, k,
            dist.ctypes.data, idx.ctypes.data, None,
        )  # fmt: skip
        return int(st), dist, idx


@pytest.fixture
def emu(emu_lib: ctypes.CDLL) -> Iterator[Emu]:
    """A freshly configured H100-like emulated device; the test fails on any emulator fault."""
    e = Emu(emu_lib)
    e.configure()
    emu_lib.zsbir_emu_reset()
    yield e
    n, first = e.faults()
    assert n == 0, f"{n} emulator fault(s), first: {first}"
    assert e.stats()["live_workspace"] == 0, "workspace leaked"


def assert_written(*arrays: np.ndarray) -> None:
    poison = {np.dtype(np.float32): POISON_F32, np.dtype(np.int64): POISON_I64, np.dtype(np.int32): POISON_I32}
    for a in arrays:
        assert not np.any(a.view(a.dtype) == poison[a.dtype]), "an output element was never written"


def with_canaries(a: np.ndarray, canaries: np.ndarray) -> np.ndarray:
    """``a`` as the first rows of a larger buffer whose next rows are ``canaries`` (rows that would win):
    a kernel reading past the end of its gallery returns them."""
    buf = np.concatenate([a, canaries.astype(a.dtype)])
    return buf[: len(a)]


def cpu_ip(q: np.ndarray, g: np.ndarray, k: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    s, i = _cpu.topk_ip_cpu(q, g, k, scales)
    return s, i


# ----------------------------------------------------------------------------------------------------------
# Shapes: Q, N, D not multiples of any tile (SIMT tile 128 rows, 8 queries per block; tensor tiles 128 rows x
# 64 or 32 queries, D in steps of 64); several chunks and several tiles per chunk; k = 1, k > N, k = 1024,
# k large enough that the selection buffer is flushed after every tile; D = 2048.
IP_SHAPES = [
    (1, 1, 1, 1),
    (1, 7, 33, 5),
    (3, 129, 64, 10),
    (5, 1000, 37, 100),
    (2, 50, 17, 60),  # k > N
    (17, 300, 96, 1),
    (70, 513, 48, 32),
    (3, 1500, 8, 1024),
    (2, 700, 2048, 7),
    (1, 6001, 64, 10),
    (40, 2100, 72, 256),
    (33, 1200, 200, 64),
    (100, 900, 64, 128),
]


def _skip_unsupported(path: str, k: int) -> None:
    if path.startswith("tensor") and k > 256:
        pytest.skip("tensor paths serve k <= 256 (returning ZSBIR_ERR_UNSUPPORTED is tested separately)")


@pytest.mark.parametrize("path", ["auto", "simt", "tensor", "tensor32"])
@pytest.mark.parametrize(("nq", "n", "d", "k"), IP_SHAPES)
def test_ip_random_against_float64(emu: Emu, path: str, nq: int, n: int, d: int, k: int) -> None:
    _skip_unsupported(path, k)
    rng = np.random.default_rng()  # fresh inputs each run
    q = rng.standard_normal((nq, d)).astype(np.float16)
    g = rng.standard_normal((n, d)).astype(np.float16)
    st, s, i = emu.topk_ip(q, g, k, path)
    assert st == OK
    assert_written(s, i)
    full, _, _ = ref_topk_ip(q, g, k)
    check_topk(s, i, full, k, ip_tolerance(q, g))


@pytest.mark.parametrize("path", ["simt", "tensor", "tensor32"])
@pytest.mark.parametrize(("nq", "n", "d", "k"), IP_SHAPES)
def test_ip_integer_data_exact_including_ties(emu: Emu, path: str, nq: int, n: int, d: int, k: int) -> None:
    """Integer-valued data makes every float32 sum exact: results equal the reference bit for bit."""
    _skip_unsupported(path, k)
    rng = np.random.default_rng()
    q = int_valued(rng, (nq, d), -3, 3)
    g = int_valued(rng, (n, d), -1, 1)  # many exact ties
    st, s, i = emu.topk_ip(q, g, k, path)
    assert st == OK
    _, val, idx = ref_topk_ip(q, g, k)
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_array_equal(s, val.astype(np.float32))


@pytest.mark.parametrize("order", [REVERSE, RANDOM, LOCKSTEP])
@pytest.mark.parametrize("path", ["simt", "tensor", "tensor32"])
def test_thread_and_block_order_do_not_change_results(emu: Emu, order: int, path: str) -> None:
    """A race between threads (or blocks) would make the result depend on the order they run in."""
    rng = np.random.default_rng()
    q = int_valued(rng, (37, 80), -3, 3)
    g = int_valued(rng, (1700, 80), -1, 1)
    st, s_ref, i_ref = emu.topk_ip(q, g, 50, path)
    assert st == OK
    for seed in (1, 2) if order == RANDOM else (0,):
        emu.configure(order=order, seed=seed)
        st, s, i = emu.topk_ip(q, g, 50, path)
        assert st == OK
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_array_equal(s, s_ref)
    qc = rng.integers(0, 256, size=(11, 16), dtype=np.uint8)
    c = rng.integers(0, 256, size=(3000, 16), dtype=np.uint8)
    emu.configure(order=order, seed=3)
    st, dist, idx = emu.hamming(qc, c, 40)
    assert st == OK
    ref_d, ref_i = ref_hamming(qc, c, 40)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(dist, ref_d)


@pytest.mark.parametrize("path", ["auto", "simt", "tensor"])
def test_int8_gallery_with_scales(emu: Emu, path: str) -> None:
    rng = np.random.default_rng()
    for nq, n, d, k in [(1, 3001, 64, 10), (40, 777, 96, 50), (3, 1000, 13, 300)]:
        if path == "tensor" and k > 256:
            continue
        q = int_valued(rng, (nq, d))
        g8 = rng.integers(-128, 128, size=(n, d), dtype=np.int8)
        scales = (2.0 ** rng.integers(-10, 0, size=n)).astype(np.float32)
        st, s, i = emu.topk_ip(q, g8, k, path, scales=scales)
        assert st == OK
        assert_written(s, i)
        s_cpu, i_cpu = cpu_ip(q, g8, k, scales)
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)


def test_misaligned_gallery_uses_the_scalar_loads(emu: Emu) -> None:
    """A gallery 2 bytes off a 16-byte boundary must not be read with 16-byte vector loads."""
    rng = np.random.default_rng()
    raw = np.zeros(3001 * 40 * 2 + 64, np.uint8)
    off = (-raw.ctypes.data) % 16 + 2  # exactly 2 bytes past a 16-byte boundary
    g = np.frombuffer(raw[off : off + 3001 * 40 * 2].data, np.float16).reshape(3001, 40)
    g[:] = int_valued(rng, (3001, 40))
    assert g.ctypes.data % 16 == 2
    q = int_valued(rng, (20, 40))
    s_cpu, i_cpu = cpu_ip(q, np.ascontiguousarray(g), 17)
    for path in ("simt", "tensor", "tensor32"):
        st, s, i = emu.topk_ip(q, g, 17, path)
        assert st == OK
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(s, s_cpu)


@pytest.mark.parametrize("path", ["simt", "tensor"])
def test_nan_ranks_last_and_negative_zero_ties_with_zero(emu: Emu, path: str) -> None:
    q = np.ones((16, 4), np.float16)
    g = np.zeros((6, 4), np.float16)
    g[0] = np.nan
    g[1] = [-1, 0, 0, 0]
    g[3] = [1, 0, 0, 0]
    g[5] = [np.inf, 0, 0, 0]
    st, s, i = emu.topk_ip(q, g, 6, path)
    assert st == OK
    # scores: inf(5), 1(3), 0(2), 0(4), -1(1), NaN -> -inf (0); ties by index
    np.testing.assert_array_equal(i[0], [5, 3, 2, 4, 1, 0])
    assert np.all(i == i[0])
    assert np.isposinf(s[0, 0]) and np.isneginf(s[0, 5])
    # int8 rows with negative scales: a zero dot product times -1 is -0.0, which ties with +0.0 by index
    g8 = np.zeros((4, 4), np.int8)
    g8[1] = -1
    scales = np.array([-1.0, -1.0, 1.0, -1.0], np.float32)
    st, s, i = emu.topk_ip(q, g8, 4, path, scales=scales)
    assert st == OK
    np.testing.assert_array_equal(i[0], [1, 0, 2, 3])
    np.testing.assert_array_equal(s[0], [4.0, 0.0, 0.0, 0.0])


def test_empty_gallery_pads_and_no_queries_write_nothing(emu: Emu) -> None:
    q = np.ones((3, 8), np.float16)
    for path in ("auto", "simt", "tensor"):
        st, s, i = emu.topk_ip(q, np.zeros((0, 8), np.float16), 5, path)
        assert st == OK
        assert np.all(i == -1) and np.all(np.isneginf(s))
    st, dist, idx = emu.hamming(np.zeros((2, 8), np.uint8), np.zeros((0, 8), np.uint8), 4)
    assert st == OK
    assert np.all(idx == -1) and np.all(dist == np.iinfo(np.int32).max)
    st, s, i = emu.topk_ip(np.zeros((0, 8), np.float16), np.ones((4, 8), np.float16), 3)
    assert st == OK and s.size == 0
    assert emu.stats()["launches"] == 3 + 1  # three empty-gallery IP merges, one Hamming merge; Q = 0: none


@pytest.mark.parametrize(
    ("nq", "n", "nbytes", "k"),
    [(1, 1, 8, 1), (1, 20_003, 8, 10), (3, 100, 8, 200), (20, 5000, 16, 100), (2, 3000, 128, 1024),
     (9, 2345, 32, 7), (70, 700, 64, 33), (5, 4100, 8, 600)],
)  # fmt: skip
def test_hamming_exact(emu: Emu, nq: int, n: int, nbytes: int, k: int) -> None:
    rng = np.random.default_rng()
    c = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    if n > 10:
        c[n // 2 : n // 2 + 5] = c[1]  # exact ties
    qc = rng.integers(0, 256, size=(nq, nbytes), dtype=np.uint8)
    st, dist, idx = emu.hamming(qc, c, k)
    assert st == OK
    assert_written(dist, idx)
    ref_d, ref_i = ref_hamming(qc, c, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(dist, ref_d)


@pytest.mark.parametrize(("smem", "sms"), [(H100_SMEM, 132), (A100_SMEM, 108), (SM86_SMEM, 84), (H100_SMEM, 1)])
def test_other_devices_shared_memory_and_sm_counts(emu: Emu, smem: int, sms: int) -> None:
    """Smaller opt-in shared memory shrinks the query groups (or leaves the tensor path); results stay exact."""
    emu.configure(sms=sms, smem=smem)
    rng = np.random.default_rng()
    q = int_valued(rng, (70, 2048) if smem == SM86_SMEM else (40, 256), -2, 2)
    g = int_valued(rng, (900, q.shape[1]), -1, 1)
    _, val, idx = ref_topk_ip(q, g, 1024)
    for path, k in (("simt", 1024), ("tensor", 256), ("tensor32", 200), ("auto", 100)):
        st, s, i = emu.topk_ip(q, g, k, path)
        if st == ERR_SMEM:
            assert path.startswith("tensor"), f"{path} must always fit"
            continue
        assert st == OK, (path, k, st)
        assert emu.stats()["max_smem"] <= smem
        np.testing.assert_array_equal(i, idx[:, :k])
        np.testing.assert_array_equal(s, val[:, :k].astype(np.float32))


def test_forced_tensor_path_reports_missing_shared_memory(emu: Emu) -> None:
    emu.configure(smem=48 * 1024)  # a device with no opt-in beyond 48 KiB
    q = np.ones((20, 64), np.float16)
    g = np.ones((300, 64), np.float16)
    st, s, i = emu.topk_ip(q, g, 100, "tensor")
    assert st == ERR_SMEM
    assert np.all(i == POISON_I64), "a failed call must not write its outputs"
    st, s, i = emu.topk_ip(q, g, 100, "auto")  # auto falls back to the SIMT path
    assert st == OK
    np.testing.assert_array_equal(i, np.tile(np.arange(100), (20, 1)))  # all tie: smallest indices first
    assert np.all(s == 64.0)


def test_more_chunks_than_one_wave_and_one_chunk(emu: Emu) -> None:
    """The gallery is cut into chunks per SM count; the cross-chunk merge gives the same answer."""
    rng = np.random.default_rng()
    q = int_valued(rng, (3, 64), -3, 3)
    g = int_valued(rng, (9000, 64), -1, 1)
    _, val, idx = ref_topk_ip(q, g, 64)
    grids = set()
    for sms in (1, 2, 132):  # 8, 16 and 18 chunks (the last capped by rows per chunk)
        emu.configure(sms=sms)
        emu.lib.zsbir_emu_reset()
        st, s, i = emu.topk_ip(q, g, 64, "simt")
        assert st == OK
        np.testing.assert_array_equal(i, idx)
        np.testing.assert_array_equal(s, val.astype(np.float32))
        assert emu.stats()["launches"] == 2  # stage 1 + merge
        grids.add(emu.stats()["blocks"] - 3)  # minus the merge kernel's one block per query
    assert len(grids) == 3, f"SM count did not change the number of chunks: {grids}"


@pytest.mark.parametrize("limit", [1, 2])
def test_queries_beyond_the_grid_limit_run_in_slices(emu: Emu, limit: int) -> None:
    """More query groups than gridDim.y allows (65535 on real GPUs, lowered here) run as several launches."""
    assert emu.lib.zsbir_emu_set_max_grid_y(limit) == 0
    rng = np.random.default_rng()
    g = int_valued(rng, (700, 48), -1, 1)
    for nq, path, per_group in ((37, "simt", 8), (150, "tensor", 64), (70, "tensor32", 32)):
        q = int_valued(rng, (nq, 48), -3, 3)
        emu.lib.zsbir_emu_reset()
        st, s, i = emu.topk_ip(q, g, 20, path)
        assert st == OK, (path, st)
        slices = -(-nq // (per_group * limit))
        assert emu.stats()["launches"] == 2 * slices  # stage 1 + merge per slice
        _, val, idx = ref_topk_ip(q, g, 20)
        np.testing.assert_array_equal(i, idx)
        np.testing.assert_array_equal(s, val.astype(np.float32))
    qc = rng.integers(0, 256, size=(19, 8), dtype=np.uint8)
    c = rng.integers(0, 256, size=(600, 8), dtype=np.uint8)
    emu.lib.zsbir_emu_reset()
    st, dist, idx = emu.hamming(qc, c, 9)
    assert st == OK
    assert emu.stats()["launches"] == 2 * -(-19 // (8 * limit))
    ref_d, ref_i = ref_hamming(qc, c, 9)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(dist, ref_d)


# ----------------------------------------------------------------------------------------------------------
# Traffic: the design's byte counts, which the roofline floors in benchmarks/README_gpu.md assume.


@pytest.mark.parametrize("sms", [1, 132])
def test_each_gallery_byte_is_streamed_once_per_query_group(emu: Emu, sms: int) -> None:
    """Q <= 8 (one query group) reads the gallery exactly once, whatever the chunking; Q queries in groups of 8
    read it ceil(Q / 8) times. The Q x N scores never reach device memory: the only workspace is k keys per
    query and chunk."""
    emu.configure(sms=sms)
    rng = np.random.default_rng()
    n, d, k = 5000, 64, 10
    g = int_valued(rng, (n, d), -1, 1)
    g8 = rng.integers(-128, 128, size=(n, d), dtype=np.int8)
    for nq in (1, 8, 20):
        q = int_valued(rng, (nq, d))
        for gallery, scales, esize in ((g, None, 2), (g8, np.ones(n, np.float32), 1)):
            emu.lib.zsbir_emu_reset()
            st, _, _ = emu.topk_ip(q, gallery, k, "simt", scales=scales)
            assert st == OK
            stats = emu.stats()
            groups = -(-nq // 8)
            chunks = (stats["blocks"] - nq) // groups  # stage-1 blocks: chunks x query groups; merge: 1 per query
            assert stats["streamed_bytes"] == groups * n * d * esize
            assert stats["max_workspace"] == nq * chunks * k * 8 < nq * n * 4
    codes = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    for nq in (1, 8, 9):
        emu.lib.zsbir_emu_reset()
        st, _, _ = emu.hamming(rng.integers(0, 256, size=(nq, 16), dtype=np.uint8), codes, k)
        assert st == OK
        assert emu.stats()["streamed_bytes"] == -(-nq // 8) * n * 16


# ----------------------------------------------------------------------------------------------------------
# Argument checks: a bad call returns a status code and writes nothing.


def test_bad_arguments_return_status_codes(emu: Emu) -> None:
    lib = emu.lib
    q = np.ones((2, 8), np.float16)
    g = np.ones((5, 8), np.float16)
    g8 = np.ones((5, 8), np.int8)
    sc = np.ones(5, np.float32)
    s = np.zeros((2, 4), np.float32)
    i = np.zeros((2, 4), np.int64)

    def ip(**kw: Any) -> int:
        a: dict[str, Any] = dict(q=q.ctypes.data, g=g.ctypes.data, sc=None, dt=0, nq=2, n=5, d=8, k=4,
                                 s=s.ctypes.data, i=i.ctypes.data, path=0)  # fmt: skip
        a.update(kw)
        return int(lib.zsbir_topk_ip(a["q"], a["g"], a["sc"], a["dt"], a["nq"], a["n"], a["d"], a["k"], a["s"],
                                     a["i"], a["path"], None))  # fmt: skip

    assert ip() == OK
    cases = {
        ERR_SHAPE: [dict(nq=-1), dict(n=-1), dict(n=2**31)],
        ERR_DIM: [dict(d=0), dict(d=2049)],
        ERR_K: [dict(k=0), dict(k=1025)],
        ERR_DTYPE: [dict(dt=2), dict(dt=1, g=g8.ctypes.data), dict(sc=sc.ctypes.data)],
        ERR_PATH: [dict(path=4), dict(path=-1)],
        ERR_UNSUPPORTED: [dict(path=2, k=257), dict(path=3, k=1024)],
        ERR_NULL: [dict(q=None), dict(g=None), dict(s=None), dict(i=None)],
    }
    s[:] = 7
    i[:] = 7
    for code, variants in cases.items():
        for kw in variants:
            assert ip(**kw) == code, kw
    assert np.all(s == 7) and np.all(i == 7)
    assert ip(dt=1, g=g8.ctypes.data, sc=sc.ctypes.data) == OK

    qc = np.zeros((2, 8), np.uint8)
    c = np.zeros((5, 16), np.uint8)
    dist = np.zeros((2, 4), np.int32)

    def ham(**kw: Any) -> int:
        a: dict[str, Any] = dict(qc=qc.ctypes.data, c=c.ctypes.data, nq=2, n=5, nb=8, k=4, d=dist.ctypes.data,
                                 i=i.ctypes.data)  # fmt: skip
        a.update(kw)
        return int(lib.zsbir_hamming_topk(a["qc"], a["c"], a["nq"], a["n"], a["nb"], a["k"], a["d"], a["i"], None))

    assert ham() == OK
    for code, kw in [
        (ERR_CODE_BYTES, dict(nb=12)), (ERR_CODE_BYTES, dict(nb=0)), (ERR_CODE_BYTES, dict(nb=136)),
        (ERR_K, dict(k=0)), (ERR_SHAPE, dict(n=-5)), (ERR_NULL, dict(c=None)), (ERR_NULL, dict(d=None)),
        (ERR_MISALIGNED, dict(c=c.ctypes.data + 4)),
    ]:  # fmt: skip
        assert ham(**kw) == code, kw
    for code in (ERR_NULL, ERR_SMEM, 1000 + 1, 123456):
        assert lib.zsbir_status_string(code)


# ----------------------------------------------------------------------------------------------------------
# The emulator's own checks fail on known-bad kernels (kernels/emu/selftest.cpp).


def _selftest(emu: Emu, which: int) -> tuple[int, np.ndarray, int, str]:
    out = np.full(256, -1, np.int32)
    st = int(emu.lib.zsbir_emu_selftest(which, out.ctypes.data))
    n, first = emu.faults()
    emu.lib.zsbir_emu_reset()
    return st, out, n, first


def test_emulator_catches_a_missing_barrier(emu: Emu) -> None:
    st, good, n, _ = _selftest(emu, 0)
    assert st == 0 and n == 0
    np.testing.assert_array_equal(good, (np.arange(256) + 1) % 256)
    results = set()
    for order in (FORWARD, REVERSE, RANDOM):
        emu.configure(order=order, seed=5)
        st, racy, n, _ = _selftest(emu, 1)
        assert st == 0 and n == 0
        results.add(racy.tobytes())
    assert len(results) > 1, "the order of threads did not change the result of a racy kernel"
    assert good.tobytes() not in results or len(results) > 1


def test_emulator_catches_divergent_barriers_and_overruns(emu: Emu) -> None:
    st, _, n, first = _selftest(emu, 2)
    assert st == 719 and n == 1 and "deadlock" in first
    st, _, n, first = _selftest(emu, 3)
    assert st == 719 and "shared memory written past" in first
    st, out, n, _ = _selftest(emu, 4)
    assert st == 0 and n == 0
    np.testing.assert_array_equal(out, (np.arange(256) ^ 1) * 10)
    st, _, n, _ = _selftest(emu, 5)
    assert st == 9 and n == 0  # cudaErrorInvalidConfiguration: gridDim.y > 65535
    st, _, n, _ = _selftest(emu, 6)
    assert st == 1 and n == 0  # cudaErrorInvalidValue: > 48 KiB without the opt-in attribute


# ----------------------------------------------------------------------------------------------------------
# AddressSanitizer + UBSan build: no out-of-bounds access on any path (and the sanitizer does catch one).

_ASAN_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_kernels_emu import Emu, PATHS
    from zsbir_infer.gpu import _cuda
    lib = ctypes.CDLL({lib!r})
    _cuda._declare(lib)
    lib.zsbir_emu_faults.argtypes = [ctypes.c_char_p, ctypes.c_int]
    e = Emu(lib)
    rng = np.random.default_rng(0)
    mode = sys.argv[1]
    if mode == "clean":
        for nq, n, d, k in [(3, 1000, 37, 100), (20, 515, 64, 16), (35, 300, 130, 256), (2, 600, 2048, 1024)]:
            q = rng.integers(-3, 4, (nq, d)).astype(np.float16)
            g = rng.integers(-1, 2, (n, d)).astype(np.float16)
            for path in PATHS:
                if path.startswith("tensor") and k > 256:
                    continue
                st, s, i = e.topk_ip(q, g, k, path)
                assert st == 0, (path, st)
            g8 = rng.integers(-128, 128, (n, d)).astype(np.int8)
            st, s, i = e.topk_ip(q, g8, k, "simt", scales=np.ones(n, np.float32))
            assert st == 0
        for nq, n, nb, k in [(3, 2000, 8, 10), (9, 700, 128, 1024)]:
            st, dd, ii = e.hamming(rng.integers(0, 256, (nq, nb), dtype=np.uint8),
                                   rng.integers(0, 256, (n, nb), dtype=np.uint8), k)
            assert st == 0
        raw = np.zeros(301 * 40 + 8, np.float16)
        off = ((-raw.ctypes.data) % 16) // 2 + 1  # a gallery 2 bytes past a 16-byte boundary
        g = raw[off : off + 301 * 40].reshape(301, 40)
        g[:] = rng.integers(-1, 2, (301, 40))
        q = rng.integers(-3, 4, (20, 40)).astype(np.float16)
        for path in PATHS:
            st, s, i = e.topk_ip(q, g, 9, path)
            assert st == 0
        nf = lib.zsbir_emu_faults(None, 0)
        assert nf == 0, nf
        print("clean run ok")
    else:  # claim more gallery rows than the buffer holds: an out-of-bounds read
        q = np.ones((1, 64), np.float16)
        g = np.ones((100, 64), np.float16)
        s = np.zeros((1, 5), np.float32); i = np.zeros((1, 5), np.int64)
        lib.zsbir_topk_ip(q.ctypes.data, g.ctypes.data, None, 0, 1, 101, 64, 5, s.ctypes.data, i.ctypes.data, 1,
                          None)
        print("no error found")
    """
)


@pytest.mark.slow
def test_sanitizer_build_finds_no_out_of_bounds_access(tmp_path: Path) -> None:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not runtime or not Path(runtime).exists():
        pytest.skip("libasan is not installed")
    _build("emu-asan")
    script = tmp_path / "asan_run.py"
    script.write_text(_ASAN_SCRIPT.format(tests=str(ROOT / "tests"), lib=str(ASAN_LIB)))
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(ROOT))
    clean = subprocess.run([sys.executable, str(script), "clean"], capture_output=True, text=True, env=env,
                           timeout=900)  # fmt: skip
    assert clean.returncode == 0 and "clean run ok" in clean.stdout, clean.stderr[-4000:]
    assert "AddressSanitizer" not in clean.stderr and "runtime error" not in clean.stderr, clean.stderr[-4000:]
    bad = subprocess.run([sys.executable, str(script), "overrun"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, (bad.stdout + bad.stderr)[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Mutation check: plausible one-line bugs in the kernel sources must make this battery fail (a wrong answer,
# a fault, an error status or a crash). A battery that passed them would prove nothing about the kernels.

MUTANTS = [
    ("ip_topk.cu", "      __syncthreads();\n      ++kc;", "      ++kc;"),
    ("ip_topk.cu", "if (!(v < thr_e[i])) {", "if (v > thr_e[i]) {"),
    ("ip_topk.cu", "pos[i] = static_cast<int>(probe.x[i]);", "pos[i] = (threadIdx.x & 31) * NE + i;"),
    ("ip_topk.cu", "if (c0 + kk < d) {", "if (c0 + kk + 16 <= d) {"),
    ("ip_topk.cu", "v += __shfl_xor_sync(0xffffffffu, v, 4);", "// partial sum removed"),
    ("ip_topk.cu", "ok[r] = rows[r] < end;", "ok[r] = rows[r] <= end;"),
    ("hamming_topk.cu", "ok[r] = rows[r] < end;", "ok[r] = rows[r] <= end;"),
    ("common.cu", "if (i < m) sel.offer(0, cand[i], thr);", "if (i <= m) sel.offer(0, cand[i], thr);"),
    ("select.cuh", "  __device__ __forceinline__ void flush_all(int limit) const {\n    __syncthreads();",
     "  __device__ __forceinline__ void flush_all(int limit) const {"),
]  # fmt: skip


def battery(lib_path: str) -> str:
    """Run a short version of the checks above on a library; 'ok' or the first failure."""
    lib = ctypes.CDLL(lib_path)
    _cuda._declare(lib)
    lib.zsbir_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.zsbir_emu_faults.argtypes = [ctypes.c_char_p, ctypes.c_int]
    e = Emu(lib)
    rng = np.random.default_rng(7)
    for order in (FORWARD, REVERSE, RANDOM, LOCKSTEP):
        e.configure(sms=2, order=order, seed=order)
        for nq, n, d, k, path in [
            (3, 1500, 37, 40, "simt"),
            (40, 700, 72, 30, "tensor"),
            (20, 900, 150, 20, "tensor32"),
        ]:
            q = int_valued(rng, (nq, d), -3, 3)
            g = with_canaries(int_valued(rng, (n, d), -1, 1), 8 * q[:2])
            st, s, i = e.topk_ip(q, g, k, path)
            _, val, idx = ref_topk_ip(q, g, k)
            if st != OK or not np.array_equal(i, idx) or not np.array_equal(s, val.astype(np.float32)):
                return f"ip {path} {nq}x{n}x{d} k={k} order={order}: status {st}, results differ"
        qc = rng.integers(0, 256, size=(5, 8), dtype=np.uint8)
        c = with_canaries(rng.integers(0, 256, size=(2500, 8), dtype=np.uint8), qc[:2])
        st, dist, idx = e.hamming(qc, c, 30)
        ref_d, ref_i = ref_hamming(qc, c, 30)
        if st != OK or not np.array_equal(idx, ref_i) or not np.array_equal(dist, ref_d):
            return f"hamming order={order}: status {st}, results differ"
        n_faults, first = e.faults()
        if n_faults:
            return f"emulator fault: {first}"
    return "ok"


@pytest.mark.slow
@pytest.mark.parametrize(("src", "old", "new"), MUTANTS, ids=[f"{m[0]}:{i}" for i, m in enumerate(MUTANTS)])
def test_battery_catches_mutated_kernels(emu_lib: ctypes.CDLL, tmp_path: Path, src: str, old: str, new: str) -> None:
    work = tmp_path / "kernels"
    shutil.copytree(KERNELS, work, ignore=shutil.ignore_patterns("build"))
    text = (work / src).read_text()
    assert text.count(old) == 1, f"mutation site not found once in {src}: {old!r}"
    (work / src).write_text(text.replace(old, new))
    res = subprocess.run(["make", "-C", str(work), "-j2", "emu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lib = work / "build" / "emu" / "libzsbir_kernels_emu.so"
    tests = str(ROOT / "tests")
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_kernels_emu as t; print(t.battery({str(lib)!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    verdict = run.stdout.strip().splitlines()[-1] if run.returncode == 0 and run.stdout.strip() else "crashed"
    assert verdict != "ok", f"the battery did not notice the mutation {old!r} -> {new!r}"


def test_battery_passes_the_real_kernels(emu_lib: ctypes.CDLL) -> None:
    assert battery(str(EMU_LIB)) == "ok"
