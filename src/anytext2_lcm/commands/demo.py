"""``anytext2-lcm demo``: the whole job on the built-in testbed model, on the CPU, with no download.

An LCM-LoRA student distilled from the shipped testbed teacher with the project's trainer, then teacher (20 steps +
CFG) vs student (1/2/4/8 steps) vs the controls on held-out words, read by the offline OCR
(``anytext2_lcm.recipes.demo``).
"""

from __future__ import annotations

import argparse
from ..cli import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="distil a few-step student from the built-in testbed teacher and compare them (CPU, minutes)",
        formatter_class=HelpFormatter,
        description="Makes synthetic data, distils an LCM-LoRA student from the built-in testbed teacher with the "
                    "project's trainer, generates held-out words with the teacher (20 steps + CFG 7.5), the student "
                    "(1/2/4/8 steps), the teacher's own DDIM and the undistilled weights at those step counts from "
                    "the same seeds, reads every line with the offline OCR and writes OUT/grid.png, OUT/loss.png, "
                    "OUT/report.md and OUT/report.json.")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--config", default="configs/demo.yaml", help="the recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.student.config.train.max_steps=300")
    p.add_argument("--cache", default=None,
                   help="keep the data and the student here and reuse them next time (default: OUT/work, rebuilt)")
    p.add_argument("--fresh", action="store_true", help="with --cache: rebuild everything")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from ..recipes.demo import eval_section, run_demo
    from ..recipes.spec import load_recipe

    recipe = load_recipe(args.config, args.sets)
    eval_section(recipe)  # validated before anything is built
    run_demo(recipe, args.out, cache=args.cache, fresh=args.fresh,
             command="anytext2-lcm demo " + " ".join(f"--set {s}" for s in args.sets))
    return 0
