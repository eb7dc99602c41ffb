"""Shared pytest configuration: markers that skip cleanly where a dependency is absent."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_torch = None if _has_torch() else pytest.mark.skip(reason="torch is not installed (train extra)")
    no_gpu = None if _has_cuda_gpu() else pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if no_torch is not None and "torch" in item.keywords:
            item.add_marker(no_torch)
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)
