"""``anytext2-lcm demo``: the whole job on the built-in testbed model, on the CPU, with no download.

An LCM-LoRA student distilled from the shipped testbed teacher with the project's trainer, then teacher (20 steps +
CFG) vs student (1/2/4/8 steps) vs the controls on held-out words, read by the offline OCR
(``anytext2_lcm.recipes.demo``).
"""

from __future__ import annotations

import argparse
from .common import add_recipe_args, command


def register(sub: argparse._SubParsersAction) -> None:
    add_recipe_args(command(sub, "demo", _demo), "configs/demo.yaml", "outputs/demo")


def _demo(args) -> int:
    """distil a few-step student from the built-in testbed teacher and compare them (CPU, minutes)

    Makes synthetic data, distils an LCM-LoRA student from the built-in testbed teacher with the project's trainer,
    generates held-out words with the teacher (20 steps + the model's CFG, 5), the student (1/2/4/8 steps), the
    teacher's own DDIM and the undistilled weights at those step counts from the same seeds, reads every line with the
    offline OCR and writes OUT/grid.png, OUT/loss.png, OUT/report.md and OUT/report.json. Without --cache everything is
    rebuilt.
    """
    from ..recipes.demo import eval_section, run_demo
    from ..recipes.spec import load_recipe

    recipe = load_recipe(args.config, args.sets)
    eval_section(recipe)  # validated before anything is built
    run_demo(recipe, args.out, cache=args.cache, fresh=args.fresh,
             command="anytext2-lcm demo " + " ".join(f"--set {s}" for s in args.sets))
    return 0
