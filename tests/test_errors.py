"""One error root: every exception class zsbir defines derives from ZsbirError (keeping its builtin base),
and the zsbir group turns one into its message and exit code, without a traceback."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import zsbir_infer.cli as cli
from zsbir_infer.errors import InputError, ModelError, UnavailableError, ZsbirError

ROOT = Path(__file__).resolve().parents[1]
# Modules whose exception classes are not zsbir errors on purpose: the HTTP service's ApiError carries a
# status code and a JSON body to the client, it never reaches the zsbir command.
NOT_SCANNED = ("zsbir_infer/serve/",)


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class name) of every class whose name ends in Error/Unavailable/Failed, found by parsing."""
    found = []
    for base in (ROOT / "zsbir_infer", ROOT / "export" / "zsbir_export"):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(NOT_SCANNED):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Unavailable", "Failed")):
                    module = rel.removeprefix("export/").removesuffix(".py").replace("/", ".")
                    found.append((module.removesuffix(".__init__"), node.name))
    return found


def test_every_exception_class_derives_from_the_root() -> None:
    pytest.importorskip("torch")  # the build-time modules import it
    classes = _exception_classes()
    assert len(classes) >= 20, classes
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, ZsbirError), f"{module}.{name} does not derive from ZsbirError"
    # The builtin bases stay, so `except ValueError` keeps catching what it caught.
    from zsbir_infer.backends import BackendUnavailable
    from zsbir_infer.bundle import BundleError
    from zsbir_infer.gallery import GalleryError, ModelMismatchError

    assert issubclass(BundleError, ValueError) and issubclass(BundleError, InputError)
    assert issubclass(BackendUnavailable, RuntimeError) and issubclass(BackendUnavailable, UnavailableError)
    assert issubclass(ModelMismatchError, GalleryError)


class _Exit3(ModelError):
    exit_code = 3


@click.command("boom")
@click.argument("kind")
def command(kind: str) -> None:
    """Raise the error KIND names."""
    if kind == "model":
        raise _Exit3("the model said no; re-export it")
    raise InputError("no such photo folder: /nowhere")


def test_the_group_maps_errors_to_message_and_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "boom", (__name__, "raises a ZsbirError"))
    res = CliRunner().invoke(cli.main, ["boom", "input"])
    assert res.exit_code == 1 and res.output == "Error: no such photo folder: /nowhere\n"
    assert isinstance(res.exception, SystemExit)  # handled: not the error itself escaping
    res = CliRunner().invoke(cli.main, ["boom", "model"])
    assert res.exit_code == 3 and "Error: the model said no; re-export it" in res.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["info", "{tmp}/missing"], "is not a gallery (no manifest.json)"),
        (["info", "{tmp}/bad"], "is not a zsbir gallery manifest"),
        (["data", "info", "{tmp}/empty"], "is not a known benchmark layout"),
        (["eval", "--data", "{tmp}/empty"], "is not a known benchmark layout"),
        (["query", "--gallery", "{tmp}/bad", "{tmp}/sketch.png"], "is not a zsbir gallery manifest"),
    ],
)
def test_commands_leave_zsbir_errors_to_the_group(tmp_path: Path, args: list[str], expected: str) -> None:
    """Commands that no longer catch zsbir's errors themselves still end with one 'Error: ...' line, exit 1."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{}")
    (tmp_path / "sketch.png").write_bytes(b"not an image")
    res = CliRunner().invoke(cli.main, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output and f"Error: {tmp_path}" in res.output and expected in res.output
