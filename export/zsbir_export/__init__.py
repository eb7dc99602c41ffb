"""zsbir build-time toolchain: models, training, checkpoint import and export (needs torch).

Lives in the repository's ``export/`` folder; its import name is ``zsbir_export`` so that nothing
named plain ``export`` lands on ``sys.path``.
"""

from zsbir_infer import __version__

__all__ = ["__version__"]
