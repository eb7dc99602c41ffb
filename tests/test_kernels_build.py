"""The CUDA kernel library: it compiles with nvcc, exports exactly the C ABI, and its argument checks and
status messages work (those need no GPU: they run before any CUDA call)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from zsbir_infer.gpu import _cuda

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
EXPORTS = {"zsbir_abi_version", "zsbir_status_string", "zsbir_topk_ip", "zsbir_hamming_topk"}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")


def exported_symbols(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.slow
@needs_nvcc
def test_make_builds_library_for_all_targets(tmp_path: Path) -> None:
    """A clean `make -C kernels` into a scratch folder: all SASS targets + PTX, only zsbir_* exported."""
    out_dir = tmp_path / "lib"
    res = subprocess.run(
        ["make", "-C", str(KERNELS), "-j2", f"OUT_DIR={out_dir}", f"BUILD={tmp_path / 'build'}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    lib = out_dir / _cuda.LIB_NAME
    assert lib.is_file()
    assert exported_symbols(lib) == EXPORTS
    if shutil.which("cuobjdump"):
        elf = subprocess.run(["cuobjdump", "--list-elf", str(lib)], capture_output=True, text=True).stdout
        for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
            assert arch in elf, f"no {arch} code in the library"
        ptx = subprocess.run(["cuobjdump", "--list-ptx", str(lib)], capture_output=True, text=True).stdout
        assert "sm_90" in ptx or "compute_90" in ptx, "no compute_90 PTX for newer GPUs"


def _built_library() -> ctypes.CDLL:
    path = _cuda.library_path()
    if not path.is_file():
        pytest.skip(f"{path} not built (run `make kernels`)")
    lib = ctypes.CDLL(str(path))
    _cuda._declare(lib)
    return lib


def test_built_library_exports_only_the_c_abi() -> None:
    _built_library()
    assert exported_symbols(_cuda.library_path()) == EXPORTS


def test_abi_version_and_status_strings() -> None:
    lib = _built_library()
    assert lib.zsbir_abi_version() == _cuda.ABI_VERSION
    assert lib.zsbir_status_string(0) == b"ok"
    assert b"k must be in [1, 1024]" in lib.zsbir_status_string(4)
    assert b"multiple of 8 bytes" in lib.zsbir_status_string(5)
    assert lib.zsbir_status_string(999) == b"unknown zsbir status code"
    assert lib.zsbir_status_string(-3) == b"unknown zsbir status code"
    # CUDA errors are ZSBIR_ERR_CUDA_BASE + cudaError_t, described by the CUDA runtime
    assert b"out of memory" in lib.zsbir_status_string(1000 + 2).lower()


# Non-null but never dereferenced: validation fails before any memory access or CUDA call.
P = ctypes.c_void_p(0x100000)
NULL = None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        # (queries, gallery, scales, dtype, Q, N, D, k, out_scores, out_idx, path) -> status
        ((P, P, NULL, 0, -1, 10, 64, 10, P, P, 0), 2),
        ((P, P, NULL, 0, 1, 2**31, 64, 10, P, P, 0), 2),
        ((P, P, NULL, 0, 1, 10, 0, 10, P, P, 0), 3),
        ((P, P, NULL, 0, 1, 10, 2049, 10, P, P, 0), 3),
        ((P, P, NULL, 0, 1, 10, 64, 0, P, P, 0), 4),
        ((P, P, NULL, 0, 1, 10, 64, 1025, P, P, 0), 4),
        ((P, P, NULL, 2, 1, 10, 64, 10, P, P, 0), 6),
        ((P, P, NULL, 1, 1, 10, 64, 10, P, P, 0), 6),  # int8 without scales
        ((P, P, P, 0, 1, 10, 64, 10, P, P, 0), 6),  # scales with fp16
        ((P, P, NULL, 0, 1, 10, 64, 10, P, P, 4), 10),
        ((P, P, NULL, 0, 1, 10, 64, 10, P, P, -1), 10),
        ((P, P, NULL, 0, 1, 10, 64, 257, P, P, 3), 8),  # 32-query tensor tiles, k > 256
        ((P, P, NULL, 0, 1, 10, 64, 257, P, P, 2), 8),  # tensor path, k > 256
        ((NULL, P, NULL, 0, 1, 10, 64, 10, P, P, 0), 1),
        ((P, NULL, NULL, 0, 1, 10, 64, 10, P, P, 0), 1),
        ((P, P, NULL, 0, 1, 10, 64, 10, NULL, P, 0), 1),
        ((NULL, NULL, NULL, 0, 0, 10, 64, 10, NULL, NULL, 0), 0),  # Q = 0: nothing to do
    ],
)
def test_topk_ip_argument_checks(args: tuple, code: int) -> None:
    lib = _built_library()
    assert lib.zsbir_topk_ip(*args, None) == code


@pytest.mark.parametrize(
    ("args", "code"),
    [
        # (query_codes, codes, Q, N, code_bytes, k, out_dist, out_idx) -> status
        ((P, P, 1, 10, 12, 10, P, P), 5),
        ((P, P, 1, 10, 0, 10, P, P), 5),
        ((P, P, 1, 10, 136, 10, P, P), 5),
        ((P, P, 1, 10, 8, 0, P, P), 4),
        ((P, P, -2, 10, 8, 1, P, P), 2),
        ((ctypes.c_void_p(0x100004), P, 1, 10, 8, 1, P, P), 7),
        ((NULL, P, 1, 10, 8, 1, P, P), 1),
        ((P, P, 1, 10, 8, 1, P, NULL), 1),
        ((NULL, NULL, 0, 10, 8, 1, NULL, NULL), 0),
    ],
)
def test_hamming_argument_checks(args: tuple, code: int) -> None:
    lib = _built_library()
    assert lib.zsbir_hamming_topk(*args, None) == code


def test_valid_call_without_gpu_returns_a_cuda_error() -> None:
    lib = _built_library()
    ok, _ = _cuda.availability()
    if ok:
        pytest.skip("a GPU is present: covered by the @gpu tests")
    code = lib.zsbir_topk_ip(P, NULL, NULL, 0, 1, 0, 64, 10, P, P, 0, None)  # empty gallery, 1 query
    assert code > 1000
    assert lib.zsbir_status_string(code)
