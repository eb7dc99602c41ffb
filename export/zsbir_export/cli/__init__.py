"""The build-time part of the ``zsbir`` command line, registered into it through entry points.

``pyproject.toml`` declares, for the runtime's lazy group (:mod:`zsbir_infer.cli`) to find:

``zsbir.commands``  whole commands (``zsbir train``);
``zsbir.builders``  the build step of a runtime command (``export``: checkpoint -> bundle).

Importing these modules is cheap (click only). They raise :class:`ImportError` when the build extras
are missing, so that the runtime can say how to install them instead of listing a command that fails.
"""

from __future__ import annotations

import importlib.util

__all__ = ["BUILD_EXTRAS_HINT", "missing_build_extras", "require_build_extras"]

#: How to get the build toolchain.
BUILD_EXTRAS_HINT = "pip install 'zsbir[train]'"

#: Modules the build commands cannot run without.
_REQUIRED = ("torch", "onnx")


def missing_build_extras() -> list[str]:
    """The required build modules that cannot be imported here (found without importing them)."""
    missing = []
    for name in _REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_build_extras() -> None:
    """Raise :class:`ImportError` naming the missing modules and :data:`BUILD_EXTRAS_HINT`."""
    missing = missing_build_extras()
    if missing:
        raise ImportError(f"needs the build extras ({', '.join(missing)} not installed): {BUILD_EXTRAS_HINT}")
