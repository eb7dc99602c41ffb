"""The root of zsbir's exceptions, and how the command line shows them.

Every error zsbir raises on purpose derives from :class:`ZsbirError` (each keeps its builtin base as
well, e.g. :class:`ValueError`, so existing ``except ValueError`` code keeps working). Catch
``ZsbirError`` to handle any of them. The ``zsbir`` command line turns one into its message and
:attr:`ZsbirError.exit_code` in one place (the group in :mod:`zsbir_infer.cli`), never a traceback.

The few kinds:

- :class:`InputError`: a file or folder given to zsbir is missing or unusable (a bundle, a gallery, an
  image, a benchmark folder);
- :class:`UnavailableError`: something this machine lacks (a package, a GPU, a matching engine);
- :class:`ModelError`: a model misbehaved or failed its checks (bad output, failed verification).
"""

from __future__ import annotations

__all__ = ["InputError", "ModelError", "UnavailableError", "ZsbirError"]


class ZsbirError(Exception):
    """Base of every error zsbir raises on purpose; the message says what went wrong and what to do."""

    #: The ``zsbir`` command's exit status when this error ends it.
    exit_code: int = 1


class InputError(ZsbirError):
    """A file or folder given to zsbir is missing, malformed or does not fit (bundle, gallery, image, data)."""


class UnavailableError(ZsbirError):
    """A package, device or engine this needs is not available here."""


class ModelError(ZsbirError):
    """A model produced unusable output or failed its checks."""
