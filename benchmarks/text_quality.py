"""Does the few-step student keep the teacher's legible text? LCM, PCM and CFG-free PCM students (the last with 4
phases and, as PCM trains one student per step count, an 8-phase sibling for 8 steps), an 8-phase PCM student trained
through its own CFG (``pcm.guided_student``), the same student on the teacher's own DDIM timesteps and images
(``pcm_guided_8_td``: ``distill.timestep_spacing: leading``, dataset ``teacher_images``) and LCM with the text-aware
OCR loss, distilled from the built-in testbed
teacher with the same budget and with the prompts the evaluation uses (``prompts:`` of the recipe), measured in one
run. ``--set eval.dataset=validation`` evaluates on training-vocabulary lines instead, for choices.

    python benchmarks/text_quality.py [--config configs/text_quality.yaml] [--out outputs/text_quality]
                                      [--cache outputs/text_quality_cache] [--set KEY=VALUE ...]

The students are the stages of the recipe (``anytext2_lcm.recipes``), cached under a key of their settings, data and
training code, so a second run only re-evaluates (minutes). The evaluation is one ``evaluate`` call on the held-out
words (never in the training lines): the teacher (20-step DDIM + the testbed's CFG 5), every student at every step count
with its recorded sampling (and the extra samplers the recipe lists, e.g. TCD for the LCM student), the teacher's own
DDIM at those step counts and the undistilled weights under each student's sampling (its control), all from the same
seeds and x_T. Printed and written to OUT/report.md and OUT/results.json: Sen.ACC / NED and their retention (student ÷
teacher), the latent MSE to the teacher's output and its ratio to the teacher's own k-step DDIM and to the
student's undistilled control, seconds per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def students_of(recipe, run) -> list:
    """(Student, stage) for each ``eval.students`` entry: the stage's recorded sampling, or the entry's sampler."""
    from anytext2_lcm.defaults import Sampling
    from anytext2_lcm.evaluate.quality import Student
    from anytext2_lcm.lora import adapter_info

    out = []
    for e in recipe.sections["eval"]["students"]:
        recorded = Sampling.from_dict(adapter_info(run.adapter(e["stage"]))["sampling"])
        if "sampler" in e:
            recorded = Sampling(e["sampler"], recorded.steps, float(e.get("cfg", recorded.cfg)),
                                {**{k: v for k, v in recorded.options.items()
                                    if k in ("original_steps", "timestep_spacing")},  # the student's grid
                                 **(e.get("options") or {})})
        out.append((Student(e["label"], recorded, adapter=e["stage"]), e["stage"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "text_quality.yaml"))
    p.add_argument("--out", default="outputs/text_quality")
    p.add_argument("--cache", default="outputs/text_quality_cache", help="stage folders, reused between runs")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--language", default="Latin", help="language of the table (Latin, Chinese or all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    from anytext2_lcm import lora as L
    from anytext2_lcm.evaluate.quality import control_names, format_table, quality_runs, quality_table
    from anytext2_lcm.evaluate.runner import EvalConfig, evaluate
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.recipes.spec import load_recipe
    from anytext2_lcm.recipes.stages import run_recipe

    recipe = load_recipe(args.config, args.sets)
    ev = recipe.sections["eval"]
    t0 = time.perf_counter()
    run = run_recipe(recipe, args.cache, report=lambda m: print(f"text_quality: {m}", flush=True))
    t_train = time.perf_counter() - t0
    teacher = {s.start for s in recipe.stages}
    if len(teacher) != 1:
        raise SystemExit(f"every student must start from the same teacher (got {sorted(map(str, teacher))})")
    model = build_model(teacher.pop()).eval()
    for stage in {st for _, st in students_of(recipe, run)}:
        L.load_lora(model, run.adapter(stage), adapter_name=stage)
    students = students_of(recipe, run)
    runs = quality_runs([s for s, _ in students], ev["steps"])
    torch.set_num_threads(recipe.threads)
    prompts = {k: ev[k] for k in ("a_prompt", "n_prompt") if k in ev}  # else the runner's (AnyText's benchmark)
    cfg = EvalConfig(data=(str(run.json(ev.get("dataset", "heldout"))),), num=ev.get("num"), seed=ev.get("seed", 100),
                     save_student_images=False, **prompts)
    out = Path(args.out)
    res = evaluate(model, cfg, out, runs=runs, progress=False)
    labels = [s.label for s, _ in students]
    controls = control_names([s for s, _ in students])
    tables = {lang: quality_table(res, labels, ev["steps"], lang, controls) for lang in ("Latin", "Chinese", "all")}
    budget = {st.name: {k: st.config.get(k) for k in ("method", "train", "lora", "optim", "ocr_loss")}
              for st in recipe.stages}
    doc = {"recipe": recipe.to_dict(), "budget": budget, "training_seconds_this_run": t_train,
           "stages": {n: {"path": str(s.path), **s.info} for n, s in run.stages.items()},
           "students": {s.label: {"stage": st, "sampling": s.sampling.to_dict(), "control": controls[s.label]}
                        for s, st in students},
           "tables": tables, "runs": res["runs"], "dataset": res["dataset"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    md = "\n".join(format_table(res, tables[lang], lang) for lang in ("Latin", "Chinese"))
    (out / "report.md").write_text("# Text quality of the students\n\n" + md)
    print(format_table(res, tables[args.language], args.language))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
