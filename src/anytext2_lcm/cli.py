"""The ``anytext2-lcm`` command line.

Every subcommand lives in ``anytext2_lcm/commands/``, one module per area, each exposing ``register(subparsers)``;
this file only lists those modules. A subcommand's handler receives the parsed ``argparse.Namespace`` and
returns an exit status (0 = success). Errors a user can fix (bad flags, missing files, invalid configs) are
raised as :class:`UsageError` (or ``ConfigError`` / ``FileNotFoundError``) and printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that provide ``register(subparsers)``, in the order of ``--help``.
COMMAND_MODULES = (
    "anytext2_lcm.commands.model",        # convert, parity, config-docs
    "anytext2_lcm.commands.generate",     # generate
    "anytext2_lcm.commands.lora",         # inspect, export (LoRA targets, adapters, merged checkpoints)
    "anytext2_lcm.commands.data",         # make-data, validate-data
    "anytext2_lcm.commands.train",        # distill, train-teacher
    "anytext2_lcm.commands.evaluate",     # evaluate, bench
    "anytext2_lcm.commands.demo",         # demo
    "anytext2_lcm.commands.ui",           # ui
)


class UsageError(Exception):
    """A mistake in how the command was called; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anytext2-lcm",
        description="AnyText2 visual-text generation and its few-step LoRA students.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"anytext2-lcm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run through the package module so that exception classes are the ones the commands import.
    from anytext2_lcm.cli import main as _main

    sys.exit(_main())
