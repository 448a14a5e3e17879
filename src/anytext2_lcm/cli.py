"""The ``anytext2-lcm`` command line.

Every subcommand lives in ``anytext2_lcm/commands/``, one module per area, each exposing ``register(subparsers)``;
this file only lists those modules. A subcommand's handler receives the parsed ``argparse.Namespace`` and
returns an exit status (0 = success). Errors a user can fix (bad flags, missing files, invalid configs) are
raised as :class:`UsageError` (or ``ConfigError`` / ``FileNotFoundError`` / ``CheckpointError``) and printed as
one line, exit 2, before any model is loaded where possible; a failed write (``atomic.WriteError``: disk full, a
file-size limit, permissions; the previous file is kept) or a non-finite result is one line too, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

# Modules that provide ``register(subparsers)``, in the order of ``--help``.
COMMAND_MODULES = (
    "anytext2_lcm.commands.model",        # convert, parity, config-docs
    "anytext2_lcm.commands.generate",     # generate
    "anytext2_lcm.commands.lora",         # inspect, export (LoRA targets, adapters, merged checkpoints)
    "anytext2_lcm.commands.data",         # make-data, validate-data
    "anytext2_lcm.commands.train",        # distill, train-teacher
    "anytext2_lcm.commands.evaluate",     # evaluate, bench
    "anytext2_lcm.commands.testbed",      # testbed (retrain the built-in model)
    "anytext2_lcm.commands.demo",         # demo
    "anytext2_lcm.commands.ui",           # ui
)


class UsageError(Exception):
    """A mistake in how the command was called; printed without a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where the help text already states it (it says "default")
    or there is none to show (None, ``store_true`` flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or action.default == []):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``anytext2-lcm generate: error: argument --cfg: 'nan': must be a finite
    number (see --help)`` and exit 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anytext2-lcm",
        description="AnyText2 visual-text generation and its few-step LoRA students.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit fails the write (cleanly, atomically) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line, 2) or --help (0): an exit status like any other
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .atomic import WriteError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.skips import DataFileError
    from .pipeline import NonFiniteError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, FileNotFoundError, CheckpointError, DataFileError) as e:
        print(f"anytext2-lcm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (WriteError, NonFiniteError, OSError) as e:  # disk full, a file-size limit, permissions, NaN weights
        print(f"anytext2-lcm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    # Run through the package module so that exception classes are the ones the commands import.
    from anytext2_lcm.cli import main as _main

    sys.exit(_main())
