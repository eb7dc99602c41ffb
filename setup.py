"""Build step for ``pip install .``: compile the CUDA kernels (kernels/) into the package when nvcc is found.

The metadata lives in pyproject.toml; this file only adds the kernel build to ``build_py``:

- ``nvcc`` on PATH (or ``$NVCC``): ``make -C kernels`` writes ``zsbir_infer/gpu/_lib/libzsbir_kernels.so``,
  which the wheel then ships (package data). A failed build fails the install (set ``ZSBIR_BUILD_KERNELS=0``
  to install without kernels on purpose).
- no nvcc, ``ZSBIR_BUILD_KERNELS=0``, or an editable install (``pip install -e``, which uses ``make
  kernels`` instead): the package installs without kernels and says so; GPU search then reports that the
  kernels are not built, and the CPU paths work as always.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
LIB = ROOT / "zsbir_infer" / "gpu" / "_lib" / "libzsbir_kernels.so"


def _say(msg: str) -> None:
    print(f"zsbir: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """``$NVCC`` (a path or a name on PATH), else ``nvcc`` on PATH; None when absent."""
    return shutil.which(os.environ.get("NVCC", "nvcc"))


def build_kernels(
    nvcc: str | None = None, *, out_dir: Path | None = None, build_dir: Path | None = None, make: str = "make"
) -> Path | None:
    """Run ``make -C kernels`` with ``nvcc``; returns the library's path, or None when skipped (said why).

    ``out_dir`` / ``build_dir`` override the Makefile's ``OUT_DIR`` / ``BUILD`` (tests build elsewhere).
    Raises :class:`subprocess.CalledProcessError` when the build fails.
    """
    if os.environ.get("ZSBIR_BUILD_KERNELS", "1").strip() == "0":
        _say("ZSBIR_BUILD_KERNELS=0: installing without the CUDA kernels (build them later with `make kernels`)")
        return None
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        _say("nvcc not found: installing without the CUDA kernels (GPU search needs them: `make kernels`)")
        return None
    if shutil.which(make) is None:
        _say(f"{make!r} not found: installing without the CUDA kernels")
        return None
    args = [make, "-C", str(KERNELS), f"NVCC={nvcc}"]
    if out_dir is not None:
        args.append(f"OUT_DIR={out_dir}")
        args.append(f"LIB={Path(out_dir) / LIB.name}")
    if build_dir is not None:
        args.append(f"BUILD={build_dir}")
    _say(f"building the CUDA kernels with {nvcc} ({' '.join(args)})")
    subprocess.run(args, check=True)
    lib = (Path(out_dir) if out_dir is not None else LIB.parent) / LIB.name
    _say(f"built {lib}")
    return lib


if __name__ == "__main__":
    from setuptools import setup
    from setuptools.command.build_py import build_py

    class BuildWithKernels(build_py):
        """``build_py`` that first compiles the kernels into the package (see the module docstring)."""

        def run(self) -> None:
            if getattr(self, "editable_mode", False):
                _say("editable install: the CUDA kernels are built by `make kernels`, not by pip")
            else:
                build_kernels()
            super().run()

    setup(cmdclass={"build_py": BuildWithKernels})
