"""LCM vs PCM students distilled from the same tiny teacher with the same budget, measured in one run.

The fidelity benchmark's stages (``benchmarks/distill_fidelity.py``: synthetic data, a tuned tiny VAE, a tiny teacher
pretrained here, and the LCM-LoRA student of the recipe) are built or taken from their cache; two PCM students are
distilled next to them by the same trainer with the recipe's distillation budget (steps, batch, learning rate,
rank, grid, guidance range, loss, seed — only ``method`` and the ``pcm`` section differ):

* ``pcm``: 4 phases, teacher guided as LCM's (sampled without CFG);
* ``pcm_cfgfree``: 4 phases, CFG-free teacher with empty prompts (sampled with real CFG and a negative prompt).

Every row is then run by ``anytext2-lcm evaluate``'s runner (:func:`anytext2_lcm.evaluate.runner.evaluate`) on the
held-out prompts, from the same x_T per sample: the teacher's 20-step DDIM + CFG 7.5 output is the reference; each
row gives, at 1, 2, 4 and 8 steps, the latent MSE to that reference, the OCR Sen.ACC / NED of the rendered lines
(shown only where the teacher's own reference reads well enough to measure) and the median seconds per image.

    python benchmarks/compare_methods.py                                # stages and students from the cache
    python benchmarks/compare_methods.py --set distill.steps=300 --eval-num 8
    python benchmarks/compare_methods.py --grid 20                      # both kinds of student on a 20-point grid

Writes ``--out``/compare_methods.json and compare_methods.md (and the evaluate images under ``--out``/eval/).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "configs" / "demo_bench.yaml"  # the fidelity benchmark's recipe
STEPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Row:
    """One line of the table: a student (or the teacher) and how it is sampled."""

    name: str
    label: str
    student: str | None
    """Key of the student adapter ('lcm', 'pcm', 'pcm_cfgfree'), None for the teacher's own weights."""
    sampler: str
    cfg: float = 1.0
    options: dict = field(default_factory=dict)


def rows_for(grid: int, num_phases: int, convention: str, cfg_scale: float) -> list[Row]:
    """The table's rows. Every student sampler visits the points of the student's own N-point training grid
    (``original_steps = N``); PCM's sampler also its phase edges."""
    g = {"original_steps": grid}
    p = {"num_phases": num_phases, "convention": convention, "original_steps": grid}
    return [
        Row("teacher_ddim", f"teacher DDIM + CFG {cfg_scale:g} (not distilled)", None, "ddim", cfg_scale),
        # Controls: the teacher's own weights on the students' deterministic schedule (pcm sampler = DDIM jumps
        # at the LCM timesteps, the same map as TCD γ=0): what the distillation adds beyond the timesteps.
        Row("teacher_pcm", "teacher weights + pcm sampler, no CFG (not distilled)", None, "pcm", 1.0, p),
        Row("teacher_pcm_cfg", f"teacher weights + pcm sampler + CFG {cfg_scale:g} (not distilled)", None, "pcm",
            cfg_scale, p),
        Row("lcm", "LCM (lcm sampler)", "lcm", "lcm", 1.0, g),
        Row("lcm_tcd0", "LCM + TCD γ=0", "lcm", "tcd", 1.0, {**g, "gamma": 0.0}),
        Row("lcm_tcd03", "LCM + TCD γ=0.3", "lcm", "tcd", 1.0, {**g, "gamma": 0.3}),
        Row("pcm", "PCM (pcm sampler, no CFG)", "pcm", "pcm", 1.0, p),
        Row("pcm_cfgfree", "PCM, CFG-free teacher, no CFG", "pcm_cfgfree", "pcm", 1.0, p),
        Row("pcm_cfgfree_cfg", f"PCM, CFG-free teacher + CFG {cfg_scale:g}, negative prompt", "pcm_cfgfree", "pcm",
            cfg_scale, p),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="the fidelity benchmark's recipe YAML")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable), e.g. --set distill.steps=300")
    p.add_argument("--grid", type=int, default=50,
                   help="distillation grid N of every student (the recipe's distill.num_ddim_timesteps is set to it)")
    p.add_argument("--num-phases", type=int, default=4, help="PCM phases")
    p.add_argument("--convention", default="inference", choices=["inference", "official"], help="PCM phase edges")
    p.add_argument("--empty-prompt-fraction", type=float, default=0.1, help="CFG-free PCM: empty-prompt fraction")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale of the teacher reference and of PCM+CFG")
    p.add_argument("--eval-num", type=int, default=None, help="held-out samples (default: the recipe's eval.num)")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="student step counts")
    p.add_argument("--ocr-min-ned", type=float, default=0.5,
                   help="show OCR columns only when the teacher's reference reaches this NED")
    p.add_argument("--cache", default=str(REPO / "outputs" / "fidelity_cache"),
                   help="stage cache (shared with the fidelity benchmark: its teacher is reused)")
    p.add_argument("--out", default=str(REPO / "outputs" / "compare_methods"), help="output folder")
    p.add_argument("--fresh", action="store_true", help="rebuild every stage and student")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    return p.parse_args(argv)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def pcm_config(recipe, run, out: Path, cfg_free: bool, num_phases: int, convention: str, fraction: float):
    """The recipe's distillation config (``teacher_train_config``, as the fidelity benchmark's LCM student) with
    ``method: pcm``: same data, teacher, adapter, grid, guidance range, loss, optimizer, steps, batch and seed."""
    from anytext2_lcm.demo.stages import teacher_train_config
    from anytext2_lcm.distill.config import load_config

    d = teacher_train_config(recipe, run.train_json, out, teacher=run.teacher, method="lcm").to_dict()
    d["method"] = "pcm"
    d["pcm"] = {"num_phases": num_phases, "convention": convention, "cfg_free_teacher": cfg_free,
                "empty_prompt_fraction": fraction}
    return load_config(None, [], base=d)


def build_students(recipe, run, args, say) -> dict[str, dict]:
    """The LCM student (the fidelity benchmark's own stage) and the two PCM students (cached beside it)."""
    from anytext2_lcm.demo.recipe import code_version, stage_key, stage_settings
    from anytext2_lcm.demo.stages import cached_stage, distill_stage

    st = run.stages["student"]
    students = {"lcm": {"path": str(st.path), "cached": st.cached, **_numbers(st.info)}}
    settings = stage_settings(recipe)["student"]
    code = code_version("student")  # the code a student's weights depend on (the fidelity benchmark's scope)
    for name, cfg_free in (("pcm", False), ("pcm_cfgfree", True)):
        pcm = {"num_phases": args.num_phases, "convention": args.convention, "cfg_free_teacher": cfg_free,
               "empty_prompt_fraction": args.empty_prompt_fraction if cfg_free else 0.0}
        key = stage_key(name, {**settings, "pcm": pcm}, (run.stages["teacher"].path.name,), code)

        def build(out: Path, cfg_free=cfg_free, name=name) -> dict:
            cfg = pcm_config(recipe, run, out, cfg_free, args.num_phases, args.convention, args.empty_prompt_fraction)
            return distill_stage(cfg, name, say)

        st = cached_stage(Path(args.cache), name, key, args.fresh, build, say)
        path, info, was_cached = st.path, st.info, st.cached
        students[name] = {"path": str(path), "cached": was_cached, **_numbers(info)}
    return students


def _numbers(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _mean(v) -> float:
    v = list(v)
    return float(sum(v) / len(v)) if v else float("nan")


def allowed_steps(row: Row, steps: tuple[int, ...]) -> tuple[int, ...]:
    """PCM samples a number of steps that divides its phase count or is a multiple of it."""
    m = row.options.get("num_phases") if row.sampler == "pcm" else None
    return tuple(s for s in steps if m is None or m % s == 0 or s % m == 0)


def measure(row: Row, model, recipe, eval_json: Path, steps, num: int, cfg_scale: float, out: Path, reader) -> dict:
    """One ``evaluate`` run of a row: the teacher reference, then the row at each step count."""
    from anytext2_lcm.evaluate.runner import EvalConfig, evaluate
    from anytext2_lcm.pipeline import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT

    # The distillation's own prompts (the trainer's distill.a_prompt / n_prompt defaults) for every run: the
    # reference's uncond branch and PCM+CFG's negative prompt are both DEFAULT_N_PROMPT.
    cfg = EvalConfig(data=(str(eval_json),), num=num, size=recipe.data.image_size, seed=recipe.eval.seed,
                     teacher_steps=recipe.eval.teacher_steps, teacher_cfg=cfg_scale, student_steps=steps,
                     student_sampler=row.sampler, student_cfg=row.cfg,
                     student_options=dict(row.options) if row.sampler != "ddim" else {},
                     max_lines=recipe.data.max_lines, a_prompt=DEFAULT_A_PROMPT, n_prompt=DEFAULT_N_PROMPT,
                     save_student_images=True)
    return evaluate(model, cfg, out / "eval" / row.name, reader=reader, progress=False)


def summarise(row: Row, res: dict) -> dict:
    runs = {r["name"]: r for r in res["runs"]}
    cells = {}
    for name, r in runs.items():
        if not name.startswith("student@"):
            continue
        ocr = r["ocr"].get("all", {})
        cells[r["steps"]] = {"latent_mse": r["fidelity_to_teacher"]["latent_mse"], "sen_acc": ocr.get("sen_acc"),
                             "ned": ocr.get("ned"), "seconds_per_image": r["seconds_per_image"]["median"],
                             "unet_evals_per_image": r["unet_evals_per_image"], "failed": r["failed_samples"]}

    def ocr_of(name: str) -> dict:
        o = runs.get(name, {}).get("ocr", {}).get("all", {})
        return {"sen_acc": o.get("sen_acc"), "ned": o.get("ned"), "lines": o.get("lines")}

    return {"row": asdict(row), "cells": cells,
            "reference": {**ocr_of("teacher"), "seconds_per_image": runs["teacher"]["seconds_per_image"]["median"]},
            "dataset_images_ocr": ocr_of("reference")}


def _f(v, digits=4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_table(doc: dict) -> str:
    steps = doc["steps"]
    ocr_ok = doc["ocr_measurable"]
    head = ["method"]
    for k in steps:
        head += [f"{k} step{'s' if k > 1 else ''}: MSE", "Sen.ACC / NED" if ocr_ok else "OCR", "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    best = {}
    for k in steps:
        cand = [(r["cells"][str(k)]["latent_mse"], r["row"]["name"]) for r in doc["rows"]
                if r["row"]["student"] and str(k) in r["cells"] and r["cells"][str(k)]["latent_mse"] is not None]
        best[k] = min(cand)[1] if cand else None
    for r in doc["rows"]:
        cells = [r["row"]["label"]]
        for k in steps:
            c = r["cells"].get(str(k))
            if c is None:
                cells += ["n/a", "", ""]
                continue
            mse = _f(c["latent_mse"])
            if best[k] == r["row"]["name"]:
                mse = f"**{mse}**"
            ocr = f"{_f(c['sen_acc'], 2)} / {_f(c['ned'], 2)}" if ocr_ok else "–"
            cells += [mse, ocr, _f(c["seconds_per_image"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    r, b, ref, ds = doc["recipe"], doc["budget"], doc["reference"], doc["dataset_images_ocr"]
    ocr_note = (f"OCR (PP-OCRv4, Sen.ACC / NED over {ref['lines']} lines) is shown because the teacher's reference "
                f"reads at Sen.ACC {_f(ref['sen_acc'], 2)} / NED {_f(ref['ned'], 2)}."
                if doc["ocr_measurable"] else
                f"OCR is not shown: the tiny teacher's own 20-step reference reads at Sen.ACC {_f(ref['sen_acc'], 2)}"
                f" / NED {_f(ref['ned'], 2)} over {ref['lines']} lines (threshold NED {doc['ocr_min_ned']}), and the "
                f"held-out dataset images themselves, resized to {r['data']['image_size']} px and read by the same "
                f"OCR path, give Sen.ACC {_f(ds.get('sen_acc'), 2)} / NED {_f(ds.get('ned'), 2)}: at this size the "
                f"students' OCR would measure the recogniser, not the students. The values are in the JSON.")
    out = [
        "# LCM vs PCM students, same teacher, same budget",
        "",
        f"`{doc['command']}` — {doc['seconds']['total']:.0f} s in all ({doc['seconds']['students']:.0f} s stages and "
        f"students, {doc['seconds']['evaluate']:.0f} s evaluating) on {doc['threads']} thread(s), load average "
        f"{doc['load_average']['start']} at the start, {doc['load_average']['end']} at the end; torch {doc['torch']}.",
        "",
        f"Teacher: the fidelity benchmark's tiny AnyText2 ({r['data']['image_size']} px, recipe `{doc['recipe_file']}`)."
        f" Every student: LoRA rank {r['distill']['rank']}, {b['steps']} steps × batch {b['batch_size']}, lr "
        f"{r['distill']['lr']}, {r['distill']['loss']} loss, N = {b['grid']} grid, teacher CFG "
        f"{r['distill']['guidance_scale_range']} (LCM and guided PCM), seed {r['distill']['seed']}; PCM "
        f"{b['num_phases']} phases ({b['convention']} edges); CFG-free PCM with {b['empty_prompt_fraction']:g} "
        f"empty prompts.",
        "",
        f"Cells: latent MSE to the teacher's {r['eval']['teacher_steps']}-step DDIM + CFG {doc['cfg']:g} output from "
        f"the same x_T (mean over {doc['samples']} held-out prompts; **bold** = lowest student error at that step "
        f"count), OCR, median seconds per image (rendering, conditioning, sampling, decoding). Reference: "
        f"{_f(ref['seconds_per_image'], 3)} s/image.",
        "",
        format_table(doc),
        "",
        ocr_note,
        "",
        "Students' distillation loss (mean of the first / last 10 steps): " + "; ".join(
            f"{k} {v.get('loss_first_10', math.nan):.3g} → {v.get('loss_last_10', math.nan):.3g}" for k, v in doc["students"].items()),
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from anytext2_lcm.checkpoint import load_model
    from anytext2_lcm.demo.recipe import load_recipe
    from anytext2_lcm.demo.stages import run_stages
    from anytext2_lcm.evaluate.ocr import TextReader
    from anytext2_lcm.lora import load_lora

    steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
    overrides = list(args.sets) + [f"distill.num_ddim_timesteps={args.grid}"]
    if args.threads:
        overrides.append(f"threads={args.threads}")
    if args.eval_num:
        overrides.append(f"eval.num={args.eval_num}")
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = load_average()
    say = lambda m: print(f"  {m}", flush=True)  # noqa: E731
    print(f"recipe {args.recipe} {' '.join(overrides)}; {recipe.threads} thread(s); load average {load_start}; "
          f"cache {args.cache}", flush=True)
    ocr_log = logging.getLogger("anytext2_lcm.models.ocr")
    ocr_log.setLevel(logging.ERROR)  # the font OCR logs a fallback for every line without a font hint

    run = run_stages(recipe, args.cache, fresh=args.fresh, report=say)
    students = build_students(recipe, run, args, say)
    t_build = time.perf_counter() - t0

    torch.set_num_threads(recipe.threads)
    reader = TextReader()
    rows = rows_for(args.grid, args.num_phases, args.convention, args.cfg)
    results, t1 = [], time.perf_counter()
    for row in rows:
        model = load_model(run.teacher).eval()
        if row.student:
            load_lora(model, Path(students[row.student]["path"]) / "adapter")
        t = time.perf_counter()
        res = measure(row, model, recipe, run.eval_json, allowed_steps(row, steps), recipe.eval.num, args.cfg, out,
                      reader)
        results.append(summarise(row, res))
        say(f"{row.name}: evaluated in {time.perf_counter() - t:.0f} s")
    t_eval = time.perf_counter() - t1
    ref = results[0]["reference"]
    doc = {
        "command": " ".join(["python benchmarks/compare_methods.py", *(sys.argv[1:] if argv is None else argv)]),
        "recipe_file": str(args.recipe), "recipe": recipe.to_dict(), "torch": torch.__version__,
        "threads": recipe.threads, "cfg": args.cfg, "steps": list(steps), "samples": recipe.eval.num,
        "budget": {"steps": recipe.distill.steps, "batch_size": recipe.distill.batch_size, "grid": args.grid,
                   "num_phases": args.num_phases, "convention": args.convention,
                   "empty_prompt_fraction": args.empty_prompt_fraction},
        "students": students,
        "stages": {n: {"path": str(s.path), "cached": s.cached} for n, s in run.stages.items()},
        "reference": ref, "dataset_images_ocr": results[0]["dataset_images_ocr"], "ocr_min_ned": args.ocr_min_ned,
        "ocr_measurable": ref["ned"] is not None and ref["ned"] >= args.ocr_min_ned,
        "rows": [{**r, "cells": {str(k): v for k, v in r["cells"].items()}} for r in results],
        "seconds": {"students": t_build, "evaluate": t_eval, "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": load_average()},
    }
    doc["table_markdown"] = format_table(doc)
    md = markdown(doc)
    (out / "compare_methods.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "compare_methods.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / 'compare_methods.json'} and {out / 'compare_methods.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
