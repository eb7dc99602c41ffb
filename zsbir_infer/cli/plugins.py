"""Commands and build steps that other packages register into ``zsbir`` through entry points.

The runtime never imports the build toolchain by name: the build-time package (``zsbir_export``,
installed with ``pip install 'zsbir[train]'``) declares its parts in two entry-point groups, and this
module finds them with :mod:`importlib.metadata`:

``zsbir.commands``  name -> a :class:`click.Command` (``train``);
``zsbir.builders``  name -> the build step of a runtime command (``export``: checkpoint -> bundle).

A plugin whose module raises :class:`ImportError` on import (its extras are not installed) is reported
as unavailable with that reason.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, distributions
from typing import Any

from zsbir_infer.errors import UnavailableError

__all__ = [
    "BUILDER_GROUP",
    "BUILD_COMMANDS",
    "BUILD_EXTRAS_HINT",
    "COMMAND_GROUP",
    "PluginUnavailable",
    "load_plugin",
    "plugin_names",
]

COMMAND_GROUP = "zsbir.commands"
BUILDER_GROUP = "zsbir.builders"
#: How to install the build-time commands.
BUILD_EXTRAS_HINT = "pip install 'zsbir[train]'"
#: Build-time commands ``zsbir --help`` names even when they are not installed, with their help.
BUILD_COMMANDS: dict[str, str] = {
    "train": "Train a model (Tursun et al. 2022 or DSN) on a benchmark folder.",
}


class PluginUnavailable(UnavailableError, LookupError):
    """A registered command or build step is absent or cannot be imported here; the message says why."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    # Every distribution's entry points, not only the first of each name: a stale ``zsbir.egg-info`` in
    # the working directory (left by a build) would otherwise hide the installed metadata.
    found: dict[str, EntryPoint] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == group:
                found.setdefault(ep.name, ep)
    return found


def plugin_names(group: str) -> list[str]:
    """Names registered in ``group``, sorted."""
    return sorted(_entry_points(group))


def load_plugin(group: str, name: str) -> Any:
    """The object the entry point ``name`` of ``group`` names; :class:`PluginUnavailable` if there is none
    or its module cannot be imported."""
    ep = _entry_points(group).get(name)
    if ep is None:
        raise PluginUnavailable(f"not installed: {BUILD_EXTRAS_HINT}")
    try:
        return ep.load()
    except ImportError as exc:
        raise PluginUnavailable(str(exc)) from exc
