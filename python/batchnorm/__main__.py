"""Command line: ``python -m batchnorm info`` (build configuration), ``python -m batchnorm demo [...]``
(the same as ``python -m batchnorm.demo [...]``)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="Batch Normalization with C + OpenMP kernels for NumPy.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="show the build and runtime configuration (batchnorm.show_config())")
    sub.add_parser("demo", add_help=False,
                   help="train small nets with and without BN on digits; an experiment name may "
                        "follow (python -m batchnorm demo --help)")
    # Everything after 'demo' (an experiment name, options) belongs to the demo's own parser.
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command == "info":
        from ._config import show_config
        show_config()
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
