"""`zsbir train` (placeholder until issue #3 (models and training) lands)."""

from zsbir_infer.cli import not_built

command = not_built("train", "issue #3 (models and training)")
