"""``dpolab``: one thin command line over the stages.

Each stage package owns its sub-commands in a ``cli.py`` with ``register(subparsers)``; this
module only wires them together, sets up logging, and turns user errors into one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from dpolab import __version__
from dpolab.config import did_you_mean
from dpolab.errors import ConfigError, DpolabError

# OSErrors that are the user's environment, not a bug: a path that is a file, a folder that is
# not writable, a full disk. They name the path; a traceback would add nothing.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                  errno.ENOSPC, errno.EDQUOT}

# Stage modules that add sub-commands, in the order `dpolab --help` lists them.
COMMAND_MODULES = [
    "dpolab.data.cli",      # data check
    "dpolab.sft.cli",       # sft
    "dpolab.dpo.cli",       # train
    "dpolab.sweep.cli",     # sweep
    "dpolab.evaluate.cli",  # evaluate
    "dpolab.report.cli",    # report
    "dpolab.hub.cli",       # export, push
    "dpolab.serve.cli",     # serve
    "dpolab.demo",          # demo
]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (``dpolab train: error: ...``) and exit 2, like every other user
    error: with dozens of options the usage block would bury the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dpolab", description="Direct Preference Optimization for GPT-2 on HH-RLHF: "
        "train, sweep, evaluate, report, export, push, serve.")
    parser.add_argument("--version", action="version", version=f"dpolab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if extra:
            raise ConfigError(unknown_argument(extra, getattr(args, "known_options", [])))
        return int(args.func(args) or 0)
    except DpolabError as exc:
        print(f"dpolab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        logging.getLogger(__name__).debug("details", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dpolab {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpolab {args.command}: interrupted", file=sys.stderr)
        return 130


def unknown_argument(extra: list[str], known: list[str]) -> str:
    """``command line: unknown key 'bta' (did you mean 'beta'?)`` for the first unknown option."""
    option = next((token for token in extra if token.startswith("--")), None)
    if option is None:
        return f"command line: unexpected argument {extra[0]!r}"
    key = option[2:].split("=", 1)[0].replace("-", "_")
    return f"command line: unknown key {key!r}{did_you_mean(key, known)}"


if __name__ == "__main__":
    sys.exit(main())
