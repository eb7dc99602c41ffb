"""Make the published `tensorrt-stubs` usable by mypy.

The `tensorrt-stubs` wheels (10.8 to 10.13) install `tensorrt/__init__.pyi` and
`tensorrt_bindings/*.pyi` without a `py.typed` marker, and `tensorrt_bindings/tensorrt.pyi` is not
valid Python: parameters named after keywords (`in`) and parameters without a default after ones
with a default. mypy therefore ignores them and every TensorRT call is silently `Any`.

This script copies the installed stubs into `.typings/` (named in `mypy_path`) and repairs exactly
those two defects, line by line, re-parsing after each repair; any other syntax error stops it.
Run by `make lint` before mypy.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

KEYWORD_PARAM = re.compile(r"(?<![\w.])(in|from|lambda|is|not|and|or|if|else|for|while|with|as|import|pass)(\s*:)")


def _site_dir(package: str) -> Path:
    for entry in sys.path:
        candidate = Path(entry) / package
        if candidate.is_dir() and any(candidate.glob("*.pyi")):
            return candidate
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} stubs are not installed: pip install --no-deps tensorrt-stubs")
    return Path(next(iter(spec.submodule_search_locations)))


def _default_trailing(line: str) -> str:
    """Give every parameter after the first defaulted one a `= ...` default (stub-legal)."""
    head, _, rest = line.partition("(")
    params, close, tail = rest.rpartition(")")
    parts = [p for p in params.split(",")]
    seen_default = False
    out = []
    for part in parts:
        bare = part.strip()
        if "=" in bare:
            seen_default = True
        elif seen_default and bare and not bare.startswith("*"):
            part = part + " = ..."
        out.append(part)
    return f"{head}({','.join(out)}{close}{tail}"


def repair(source: str, name: str) -> str:
    lines = source.splitlines()
    for _ in range(10_000):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            line = lines[index]
            if "non-default argument follows default argument" in str(exc.msg) or (
                "parameter without a default follows parameter with a default" in str(exc.msg)
            ):
                fixed = _default_trailing(line)
            else:
                fixed = KEYWORD_PARAM.sub(r"\1_\2", line)
            if fixed == line:
                raise SystemExit(f"{name}:{exc.lineno}: cannot repair: {exc.msg}: {line.strip()[:120]}") from exc
            lines[index] = fixed
    raise SystemExit(f"{name}: too many syntax errors")


def main() -> int:
    out_root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".typings")
    for package in ("tensorrt", "tensorrt_bindings"):
        src_dir = _site_dir(package)
        dst_dir = out_root / package
        dst_dir.mkdir(parents=True, exist_ok=True)
        for stub in sorted(src_dir.glob("*.pyi")):
            text = repair(stub.read_text(encoding="utf-8"), f"{package}/{stub.name}")
            tmp = dst_dir / (stub.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dst_dir / stub.name)
    print(f"tensorrt stubs prepared in {out_root}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
