"""The CLI lists every planned command and the runtime imports without torch."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from zsbir_infer.cli import COMMANDS, main

PLANNED = {"data", "train", "export", "embed", "index", "query", "eval", "demo"}


def test_help_lists_planned_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in PLANNED:
        assert name in result.output
    assert set(COMMANDS) >= PLANNED


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys, zsbir_infer, zsbir_infer.cli\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
