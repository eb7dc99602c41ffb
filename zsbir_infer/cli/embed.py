"""`zsbir embed` (placeholder until issue #4 (export) lands)."""

from zsbir_infer.cli import not_built

command = not_built("embed", "issue #4 (export)")
