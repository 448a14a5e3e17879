"""``anytext2-lcm demo``: the whole job on a built-in tiny model, on the CPU, with no download.

synthetic data → VAE tune → tiny teacher → LCM-LoRA distillation → teacher 20-step + CFG vs student 4-step images
side by side, a loss curve and a report with the measured speed ratio and fidelity (see ``anytext2_lcm.demo.run``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole job on a built-in tiny model (CPU, no download, a few minutes)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Makes synthetic data, tunes the tiny VAE, trains a tiny teacher, distils an LCM-LoRA student "
                    "with the project's trainer, renders teacher (20 steps + CFG 7.5) and student (4 steps) side by "
                    "side on held-out prompts from the same seed, and writes OUT/grid.png, OUT/loss.png, "
                    "OUT/report.md and OUT/report.json.")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every stage (data, VAE, teacher, distillation, evaluation); default: the recipe's (0)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller budget (for tests and a first look; the figures mean little)")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: the built-in demo recipe, "
                                                   "= configs/demo_default.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set distill.steps=300 (repeatable; values are YAML)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's, 1)")
    p.add_argument("--cache", default=None,
                   help="keep the trained stages here and reuse them on the next run (default: OUT/work, "
                        "rebuilt every run)")
    p.add_argument("--fresh", action="store_true", help="with --cache: rebuild every stage")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from ..demo.run import main

    return main(args)
