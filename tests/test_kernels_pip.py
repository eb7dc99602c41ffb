"""`pip install .` builds the CUDA kernels when nvcc is there (setup.py's build step) and installs without
them, saying so, when it is not. A stand-in nvcc (a script that writes its -o file and logs its arguments)
checks the wiring here; the real compile is `make kernels` (CI and tests/test_kernels_build.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_NVCC = """#!/bin/sh
echo "$@" >> "{log}"
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; fi
  shift
done
echo fake > "$out"
"""


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zsbir_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the build step, runs no setup()
    return module


def _fake_nvcc(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "nvcc.log"
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC.format(log=log))
    nvcc.chmod(0o755)
    return nvcc, log


def test_without_nvcc_the_build_step_skips_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = _setup_module()
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc here
    monkeypatch.delenv("NVCC", raising=False)
    assert setup.find_nvcc() is None
    assert setup.build_kernels(out_dir=tmp_path / "lib") is None
    assert "nvcc not found: installing without the CUDA kernels" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()
    monkeypatch.setenv("ZSBIR_BUILD_KERNELS", "0")
    assert setup.build_kernels(nvcc="/bin/true", out_dir=tmp_path / "lib") is None
    assert "ZSBIR_BUILD_KERNELS=0" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_with_nvcc_the_build_step_runs_the_kernels_makefile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _setup_module()
    nvcc, log = _fake_nvcc(tmp_path)
    monkeypatch.delenv("ZSBIR_BUILD_KERNELS", raising=False)
    monkeypatch.setenv("NVCC", str(nvcc))
    assert setup.find_nvcc() == str(nvcc)
    lib = setup.build_kernels(out_dir=tmp_path / "lib", build_dir=tmp_path / "build")
    assert lib == tmp_path / "lib" / "libzsbir_kernels.so" and lib.read_text() == "fake\n"
    calls = log.read_text().splitlines()
    # one compile per source and one link, for the Makefile's architectures
    assert sum(" -c " in c for c in calls) == 3 and sum("-shared" in c for c in calls) == 1
    assert all("arch=compute_90,code=sm_90" in c for c in calls)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_pip_wheel_ships_the_kernels_built_with_nvcc(tmp_path: Path) -> None:
    """A real `pip wheel` of a copy of the tree, with the stand-in nvcc on PATH: the wheel holds the library."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = sorted({*files, "setup.py", "pyproject.toml"})
    src = tmp_path / "src"
    for rel in files:
        if rel.startswith(("zsbir_infer/assets/", "benchmarks/", "tests/")) and not rel.endswith("__init__.py"):
            continue  # not needed to build the package; keeps the copy small
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_file():
            shutil.copy2(ROOT / rel, src / rel)
    nvcc, _ = _fake_nvcc(tmp_path)
    env = {**os.environ, "PATH": f"{nvcc.parent}:{os.environ['PATH']}", "NVCC": "nvcc"}
    env.pop("ZSBIR_BUILD_KERNELS", None)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path / "w"),
            ".",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "building the CUDA kernels" in res.stdout + res.stderr
    (wheel,) = (tmp_path / "w").glob("zsbir-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "zsbir_infer/gpu/_lib/libzsbir_kernels.so" in z.namelist()
