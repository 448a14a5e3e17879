"""``anytext2-lcm testbed``: retrain the built-in testbed model from nothing (``recipes.testbed``)."""

from __future__ import annotations

import argparse
import logging
from .common import add_recipe_args, command

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "testbed", _testbed)
    add_recipe_args(p, "configs/testbed.yaml", "runs/testbed")
    p.add_argument("--install", action="store_true",
                   help="also replace the testbed weights inside the installed package")


def _testbed(args) -> int:
    """retrain the built-in 128 px testbed model from nothing (data, VAE, OCR, teacher; cached stages)

    Runs configs/testbed.yaml: synthetic data with held-out words, the autoencoder (stops if its reconstructions do
    not read at the gate), the glyph recogniser and AnyText2's objective, all with the project's trainer; measures
    the teacher's OCR on the held-out lines and writes OUT/model (the shipped precision), OUT/report.md and
    OUT/report.json.
    """
    import sys

    from ..recipes.spec import load_recipe
    from ..recipes.testbed import GateError, build_testbed, check_sections

    recipe = load_recipe(args.config, args.sets)
    check_sections(recipe)
    try:
        build_testbed(recipe, args.out, cache=args.cache, fresh=args.fresh, install=args.install,
                      report=lambda m: print(f"testbed: {m}", flush=True))
    except GateError as e:
        print(f"anytext2-lcm testbed: stopped: {e}", file=sys.stderr)
        return 1
    return 0
