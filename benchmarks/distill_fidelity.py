"""Fidelity benchmark of the LCM-LoRA student against its teacher, on a tiny model trained here on the CPU.

Builds (or loads from the cache) the tiny pipeline of ``configs/demo_bench.yaml`` — synthetic data, a tuned tiny
VAE, a tiny teacher pretrained from scratch, an LCM-LoRA student distilled by the project's trainer — then, on
held-out prompts with the same initial noise, prints one table: for 1, 2, 4 and 8 steps the latent MSE of the
student to the teacher's 20-step DDIM + CFG 7.5 output, the teacher's own DDIM error at the same step count, their
ratio (goal at 4 steps: ≤ 0.5), the same for the other samplers of the recipe (the LCM sampler; the teacher's
weights under the student's sampler, i.e. without distillation), and seconds per image.

    python benchmarks/distill_fidelity.py                        # cached stages are reused
    python benchmarks/distill_fidelity.py --fresh                # retrain everything
    python benchmarks/distill_fidelity.py --set distill.steps=800 --json outputs/fidelity.json
    python benchmarks/distill_fidelity.py --oracle               # + the error of a perfect student per sampler

Stages are cached under ``--cache`` keyed by a hash of the recipe and of the package's source code (see
``anytext2_lcm.demo.recipe``); a changed setting or code retrains exactly the stages it affects.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "configs" / "demo_bench.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable; values are YAML), e.g. --set distill.steps=800")
    p.add_argument("--cache", default=str(REPO / "outputs" / "fidelity_cache"), help="stage cache folder")
    p.add_argument("--fresh", action="store_true", help="retrain every stage")
    p.add_argument("--json", default=str(REPO / "outputs" / "distill_fidelity.json"), help="results file")
    p.add_argument("--oracle", action="store_true",
                   help="also measure a perfect student (the teacher's ODE solved to the end) under each sampler")
    p.add_argument("--curve", action="store_true",
                   help="also measure the main student at every distillation checkpoint the recipe keeps "
                        "(distill.checkpoint_every): fidelity against distillation steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from anytext2_lcm.demo.fidelity import (_quiet_font_ocr, format_table, measure_fidelity, oracle_floor, row,
                                            text_effect)
    from anytext2_lcm.demo.recipe import code_version, load_recipe
    from anytext2_lcm.demo.run import fidelity_config, load_average
    from anytext2_lcm.demo.stages import load_student, load_student_checkpoint, run_stages, student_checkpoints

    overrides = list(args.sets) + ([f"threads={args.threads}"] if args.threads else [])
    recipe = load_recipe(args.recipe, overrides)
    t0 = time.perf_counter()
    load_start = load_average()
    print(f"recipe {args.recipe} ({recipe.name}) {' '.join(overrides)}; {recipe.threads} thread(s); "
          f"load average {load_start}; cache {args.cache}", flush=True)
    with _quiet_font_ocr():
        run = run_stages(recipe, args.cache, fresh=args.fresh, report=lambda m: print(f"  {m}", flush=True))
        t_build = time.perf_counter() - t0
        model = load_student(run)
        fcfg = fidelity_config(recipe, run.eval_json)
        t1 = time.perf_counter()
        result = measure_fidelity(model, fcfg)
        effect = text_effect(model, fcfg)
        t_eval = time.perf_counter() - t1
        curve = []
        if args.curve:
            ccfg = fidelity_config(recipe, run.eval_json)
            ccfg.students = ccfg.students[:1]
            for step, ckpt in student_checkpoints(run):
                res = measure_fidelity(load_student_checkpoint(run, recipe, ckpt), ccfg)
                curve.append({"step": step, **{f"ratio@{r_['steps']}": r_["ratio"] for r_ in res["table"]},
                              **{f"student_mse@{r_['steps']}": r_["student_mse"] for r_ in res["table"]}})
                print(f"  curve: step {step}: " + ", ".join(f"{r_['steps']} steps {r_['student_mse']:.4f} "
                                                            f"(ratio {r_['ratio']:.3f})" for r_ in res["table"]),
                      flush=True)
        oracle = None
        if args.oracle:
            t2 = time.perf_counter()
            oracle = oracle_floor(model, fcfg)
            print(f"  oracle floor: {time.perf_counter() - t2:.0f} s", flush=True)
    torch.set_num_threads(recipe.threads)

    print()
    print(format_table(result, oracle))
    if curve:
        print()
        print("| distillation steps | " + " | ".join(f"ratio at {k_}" for k_ in fcfg.steps) + " |")
        print("|---:|" + "---:|" * len(fcfg.steps))
        for c in curve:
            print(f"| {c['step']} | " + " | ".join(f"{c[f'ratio@{k_}']:.3f}" for k_ in fcfg.steps) + " |")
    k = 4 if 4 in fcfg.steps else max(fcfg.steps)
    r = row(result, k)
    print()
    met = r["ratio"] <= 0.5
    print(f"{k}-step ratio student/teacher: {r['ratio']:.3f} (goal <= 0.5: {'met' if met else 'NOT met'})")
    print(f"teacher's dependence on the text lines (mean |latent change| when they are removed): inside the text "
          f"positions {effect['inside']:.4f}, outside {effect['outside']:.4f} (ratio {effect['ratio']:.2f}, "
          f"{effect['samples']} samples)")
    stages = {name: {"path": str(st.path), "cached": st.cached, "seconds_this_run": round(st.seconds, 1),
                     "build_seconds": round(st.info.get("build_seconds", 0.0), 1),
                     **{k_: v for k_, v in st.info.items() if isinstance(v, (int, float)) and k_ != "build_seconds"}}
              for name, st in run.stages.items()}
    for name, st in stages.items():
        state = "cached" if st["cached"] else "built "
        print(f"  {name:8s} {state} (built in {st['build_seconds']:.0f} s) {st['path']}")
    print(f"stages {t_build:.0f} s, evaluation {t_eval:.0f} s; load average {load_start} -> {load_average()}")

    doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
           "recipe": recipe.to_dict(), "code_version": code_version(), "torch": torch.__version__,
           "stages": stages, "seconds": {"stages": t_build, "evaluation": t_eval},
           "load_average": {"start": load_start, "end": load_average()},
           "result": {k_: v for k_, v in result.items() if k_ not in ("images", "glyphs")},
           "text_effect": {k_: v for k_, v in effect.items() if k_ != "images"},
           "oracle": oracle, "curve": curve, "goal": {"steps": k, "ratio": r["ratio"], "max_ratio": 0.5, "met": met},
           "table_markdown": format_table(result, oracle)}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
