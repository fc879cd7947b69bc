"""`python -m foak_compile explain MODEL`: what the foak backend fuses in a tiny replica of MODEL."""

import argparse
import os
import sys

from . import explain


def _rerun_interpreted() -> None:
    """explain runs the fused ops on CPU tensors: Triton must interpret them, and triton.jit reads
    TRITON_INTERPRET when foak_compile (imported before this module) defines its kernels."""
    from .kernels.common import INTERPRET

    if INTERPRET or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "foak_compile", *sys.argv[1:]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m foak_compile", description="foak-compile tools")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "explain",
        help="what foak fuses in a tiny CPU replica of a model: per decoder layer, "
        "whole model, and every near-miss with its reason",
        description=explain.__doc__.split("\n\n")[0],
    )
    explain.add_arguments(ex)
    args = p.parse_args(argv)
    if args.command == "explain":
        if argv is None:
            _rerun_interpreted()
        return explain.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
