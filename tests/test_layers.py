"""The layering the code promises: the runtime never imports the build toolchain, build-time commands
arrive through entry points, and the import-linter contracts hold."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zsbir_infer.cli import COMMANDS, main
from zsbir_infer.cli.plugins import BUILD_EXTRAS_HINT

ROOT = Path(__file__).resolve().parents[1]
BUILD = ("zsbir_export", "torch", "onnx", "onnxscript")

# Runs the zsbir CLI and reports, at exit, which build-time modules were ever imported.
PROBE = (
    "import atexit, sys\n"
    "BUILD = {build!r}\n"
    "def report():\n"
    "    seen = {{m.split('.')[0] for m, v in list(sys.modules.items()) if v is not None}}\n"
    "    sys.stderr.write('IMPORTED=' + ','.join(sorted(seen & set(BUILD))) + '\\n')\n"
    "atexit.register(report)\n"
    "{pre}\n"
    "from zsbir_infer.cli import main\n"
    "main()\n"
)


def _zsbir(
    args: list[str], cwd: Path, *, hide_torch: bool = False
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    pre = "sys.modules['torch'] = None  # as if torch were not installed" if hide_torch else ""
    code = PROBE.format(build=BUILD, pre=pre)
    env = {**os.environ, "ZSBIR_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ZSBIR_GALLERY", None)
    res = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in res.stderr.splitlines() if line.startswith("IMPORTED=")]
    assert lines, res.stderr
    imported = set(filter(None, lines[-1].removeprefix("IMPORTED=").split(",")))
    return res, imported


def test_cpu_query_never_imports_the_build_toolchain(tmp_path: Path) -> None:
    pytest.importorskip("onnx")  # the tiny bundle is written with onnx, here in the test process
    from indexer_support import write_photos, write_sketch
    from tiny_bundle import make_bundle

    bundle = make_bundle(tmp_path / "bundle")[0]
    write_photos(tmp_path / "photos", 5)
    write_sketch(tmp_path / "sketch.png")
    res, imported = _zsbir(["index", "photos", "--model", str(bundle), "--backend", "ort-cpu", "-q"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert imported == set(), imported
    res, imported = _zsbir(["query", "sketch.png", "--backend", "ort-cpu", "-k", "3"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 3, res.stdout
    assert imported == set(), f"zsbir query imported {sorted(imported)}"
    # The probe itself can see an import: the build command's help pulls in zsbir_export (only).
    res, imported = _zsbir(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert imported == {"zsbir_export"}, imported


def test_help_lists_every_command_and_each_has_help() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ") and line.split()}
    assert set(COMMANDS) <= listed
    assert "train" in listed and "Build commands" in result.output
    for name in [*COMMANDS, "train"]:
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert f"Usage: main {name}" in res.output or f"Usage: zsbir {name}" in res.output, res.output


def test_without_the_build_extras_the_cli_says_how_to_get_them(tmp_path: Path) -> None:
    res, imported = _zsbir(["--help"], tmp_path, hide_torch=True)
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and BUILD_EXTRAS_HINT in " ".join(res.stdout.split())
    assert "torch" not in imported
    res, _ = _zsbir(["train", "--method", "tursun", "--data", ".", "--out", "run"], tmp_path, hide_torch=True)
    assert res.returncode == 1 and BUILD_EXTRAS_HINT in res.stderr and "Traceback" not in res.stderr
    res, _ = _zsbir(["export", "ckpt.safetensors", "-o", "b"], tmp_path, hide_torch=True)
    assert res.returncode == 1 and "exporting a checkpoint needs the build extras" in res.stderr
    assert BUILD_EXTRAS_HINT in res.stderr and not (tmp_path / "b").exists()


def test_import_linter_contracts_hold() -> None:
    """The same check `make lint` runs: no build-toolchain import in the runtime, no cycles inside it."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the dev extra: pip install -e '.[dev]')")
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" not in res.stdout.lower().replace("0 broken", "")
