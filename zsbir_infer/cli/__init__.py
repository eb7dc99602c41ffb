"""The ``zsbir`` command line.

Each runtime subcommand lives in its own module (``zsbir_infer.cli.<name>``) that defines ``command``;
the group imports a module only when that command runs, so ``zsbir query`` never pays for the imports
of another command. Build-time commands (``zsbir train``) come from the ``zsbir.commands`` entry points
(:mod:`zsbir_infer.cli.plugins`): listed when the build extras are installed, with the install hint
when not.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from zsbir_infer import __version__
from zsbir_infer.cli import plugins
from zsbir_infer.errors import ZsbirError

# command name -> (module, one-line help shown by `zsbir --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("zsbir_infer.cli.data", "Make or inspect benchmark data (synthetic ZS-SBIR set, real splits)."),
    "export": ("zsbir_infer.cli.export", "Export a checkpoint to a deployable bundle (ONNX/FP16/INT8/TensorRT)."),
    "embed": ("zsbir_infer.cli.embed", "Embed image files with a bundle and write an .npy file."),
    "index": ("zsbir_infer.cli.index", "Index a folder of photos into a gallery (incremental, resumable)."),
    "query": ("zsbir_infer.cli.query", "Search a gallery with one or more sketches."),
    "info": ("zsbir_infer.cli.info", "Describe a gallery: model, counts, sizes, format."),
    "eval": ("zsbir_infer.cli.eval", "Evaluate a bundle on a benchmark split (mAP@all, mAP@200, P@100, P@200)."),
    "serve": ("zsbir_infer.cli.serve", "Serve a gallery over HTTP: search API, photos, metrics and a sketch pad."),
    "demo": ("zsbir_infer.cli.demo", "Run the whole pipeline end to end on the built-in synthetic benchmark."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use; build-time ones come from entry points."""

    def _build_names(self) -> list[str]:
        return sorted((set(plugins.plugin_names(plugins.COMMAND_GROUP)) | set(plugins.BUILD_COMMANDS)) - set(COMMANDS))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *self._build_names()]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return self._build_command(cmd_name)
        module = importlib.import_module(entry[0])
        command = getattr(module, "command", None)
        if not isinstance(command, click.Command):
            raise click.ClickException(f"internal error: {entry[0]} defines no click command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; any :class:`~zsbir_infer.errors.ZsbirError` it lets through becomes its message
        and exit code (the one place that maps them; commands need not re-list the error classes)."""
        try:
            return super().invoke(ctx)
        except ZsbirError as exc:
            error = click.ClickException(str(exc) or type(exc).__name__)
            error.exit_code = exc.exit_code  # type: ignore[misc]
            raise error from exc

    def _build_command(self, name: str) -> click.Command | None:
        if name not in self._build_names():
            return None
        try:
            command = plugins.load_plugin(plugins.COMMAND_GROUP, name)
        except plugins.PluginUnavailable as exc:
            raise click.ClickException(f"zsbir {name} {exc}") from None
        if not isinstance(command, click.Command):
            raise click.ClickException(f"internal error: the entry point {name!r} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Runtime short help comes from the table so that `zsbir --help` imports nothing heavy; the
        # build-time modules import only click until their command runs.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])
        rows = []
        for name in self._build_names():
            try:
                command = plugins.load_plugin(plugins.COMMAND_GROUP, name)
                help_ = command.get_short_help_str(limit=200)
            except plugins.PluginUnavailable as exc:
                help_ = f"{plugins.BUILD_COMMANDS.get(name, '')} [{exc}]".strip()
            rows.append((name, help_))
        if rows:
            with formatter.section("Build commands (the train extra: torch, onnx)"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsbir")
def main() -> None:
    """zsbir: draw a sketch, find photos of that kind of object, including kinds never seen in training."""
