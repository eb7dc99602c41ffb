"""`zsbir data` (placeholder until issue #2 (synthetic benchmark) lands)."""

from zsbir_infer.cli import not_built

command = not_built("data", "issue #2 (synthetic benchmark)")
