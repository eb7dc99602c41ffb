"""``python -m zsbir_infer.triton install [--wheel FILE]``: unpack tritonserver from the nvidia-pytriton wheel
and install the packages its Python models run with (numpy<2 ...) beside it;
``python -m zsbir_infer.triton where``: print the server zsbir would run (exit status 1 when there is none)."""

from __future__ import annotations

import argparse
import sys

from zsbir_infer.triton import TritonError
from zsbir_infer.triton.server import find_tritonserver, install_model_env, install_tritonserver, model_env_dir


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m zsbir_infer.triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="download nvidia-pytriton (no dependencies) and unpack its tritonserver")
    inst.add_argument("--wheel", help="an already downloaded nvidia_pytriton-*.whl")
    inst.add_argument("--optional", action="store_true", help="print the failure but exit 0 (for make install)")
    sub.add_parser("where", help="print the tritonserver zsbir would run")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            found = install_tritonserver(args.wheel, log=lambda m: print(m, file=sys.stderr))
            install_model_env(log=lambda m: print(m, file=sys.stderr))
        else:
            found = find_tritonserver()
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 0 if getattr(args, "optional", False) else 1
    env = model_env_dir()
    print(
        f"{found.binary} (backends {found.backends}; {found.source}); models' packages: "
        f"{env if env.is_dir() else 'not installed'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
