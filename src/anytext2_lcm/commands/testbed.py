"""``anytext2-lcm testbed``: retrain the built-in testbed model from nothing (``recipes.testbed``)."""

from __future__ import annotations

import argparse
import logging
from ..cli import HelpFormatter

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testbed", formatter_class=HelpFormatter,
        help="retrain the built-in 128 px testbed model from nothing (data, VAE, OCR, teacher; cached stages)",
        description="Runs configs/testbed.yaml: synthetic data with held-out words, the autoencoder (stops if its "
                    "reconstructions do not read at the gate), the glyph recogniser and AnyText2's objective, all "
                    "with the project's trainer; measures the teacher's OCR on the held-out lines and writes "
                    "OUT/model (the shipped precision), OUT/report.md and OUT/report.json.")
    p.add_argument("--config", default="configs/testbed.yaml", help="the recipe")
    p.add_argument("--out", default="runs/testbed", help="output folder")
    p.add_argument("--cache", default=None, help="stage folders (default: OUT/work); a rerun reuses them")
    p.add_argument("--fresh", action="store_true", help="rebuild every stage")
    p.add_argument("--install", action="store_true",
                   help="also replace the testbed weights inside the installed package")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.teacher.config.train.max_steps=100")
    p.set_defaults(func=_testbed)


def _testbed(args) -> int:
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
