"""``dpolab``: one thin command line over the stages.

Each stage package owns its sub-commands in a ``cli.py`` with ``register(subparsers)``; this
module only wires them together, sets up logging, and turns user errors into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dpolab import __version__
from dpolab.errors import DpolabError

# Stage modules that add sub-commands, in the order `dpolab --help` lists them.
COMMAND_MODULES = [
    "dpolab.dpo.cli",       # train
    "dpolab.sweep.cli",     # sweep
    "dpolab.evaluate.cli",  # evaluate
    "dpolab.report.cli",    # report
    "dpolab.hub.cli",       # export, push
    "dpolab.serve.cli",     # serve
    "dpolab.demo",          # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpolab", description="Direct Preference Optimization for GPT-2 on HH-RLHF: "
        "train, sweep, evaluate, report, export, push, serve.")
    parser.add_argument("--version", action="version", version=f"dpolab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except DpolabError as exc:
        print(f"dpolab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpolab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
