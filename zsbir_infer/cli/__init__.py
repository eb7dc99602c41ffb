"""The ``zsbir`` command line.

Each subcommand lives in its own module (``zsbir_infer.cli.<name>``) that defines ``command``; the
group imports a module only when that command runs, so ``zsbir query`` never pays for the imports of
``zsbir train``.
"""

from __future__ import annotations

import importlib

import click

from zsbir_infer import __version__

# command name -> (module, one-line help shown by `zsbir --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("zsbir_infer.cli.data", "Make or inspect benchmark data (synthetic ZS-SBIR set, real splits)."),
    "train": ("zsbir_infer.cli.train", "Train a model (Tursun et al. 2022 or DSN) on a benchmark folder."),
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
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(entry[0])
        command = getattr(module, "command", None)
        if not isinstance(command, click.Command):
            raise click.ClickException(f"internal error: {entry[0]} defines no click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from the table so that `zsbir --help` imports nothing heavy.
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsbir")
def main() -> None:
    """zsbir: draw a sketch, find photos of that kind of object, including kinds never seen in training."""
