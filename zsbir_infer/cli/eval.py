"""`zsbir eval` (placeholder until issue #5 (runtime and gallery) lands)."""

from zsbir_infer.cli import not_built

command = not_built("eval", "issue #5 (runtime and gallery)")
