"""The demo: the whole job on a tiny model, on the CPU, without any download, in a few minutes.

synthetic data → VAE tune → tiny teacher → LCM-LoRA distillation (the trainer) → teacher 20-step + CFG 7.5 vs student
4-step without CFG on held-out prompts from the same seed → ``grid.png``, ``loss.png``, ``report.md`` +
``report.json``. The speed ratio and the fidelity figures are measured in the same run (:mod:`.fidelity`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

QUICK = [
    "data.train_num=16", "data.eval_num=2", "vae.steps=20", "teacher.steps=20", "distill.steps=8",
    "distill.warmup_steps=2", "eval.num=2", "eval.grid_prompts=2", "eval.steps=[1,4]", "eval.extra_samplers=[]",
]
"""``--quick``: the same pipeline on a budget of about 30 CPU-seconds (tests, a first look; the figures mean
little)."""


def seed_overrides(seed: int) -> list[str]:
    """``--seed``: every stage's seed moves with it (data, VAE, teacher, distillation, evaluation noise)."""
    return [f"data.seed={seed}", f"vae.seed={seed}", f"teacher.seed={seed}", f"distill.seed={seed}",
            f"eval.seed={100 + seed}"]


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def fidelity_config(recipe: Recipe, eval_json: Path):
    from .fidelity import FidelityConfig, StudentSampler

    e = recipe.eval
    students = [StudentSampler(sampler=e.student_sampler, options=dict(e.student_options), cfg=e.student_cfg)]
    for x in e.extra_samplers:
        students.append(StudentSampler(sampler=x["sampler"], options=dict(x.get("options") or {}),
                                       cfg=float(x.get("cfg", e.student_cfg)), lora=bool(x.get("lora", True))))
    return FidelityConfig(data=str(eval_json), num=e.num, size=recipe.data.image_size, seed=e.seed, steps=e.steps,
                          teacher_steps=e.teacher_steps, teacher_cfg=e.teacher_cfg, students=students,
                          max_lines=recipe.data.max_lines)


def run_demo(out: str | Path, recipe: Recipe, cache: str | Path | None = None, fresh: bool = False,
             command: str = "anytext2-lcm demo", say=print) -> dict:
    """Run the demo into ``out``; returns the report document (also written as ``out/report.json``).

    Args:
        cache: where the stages live; None = ``out/work``, rebuilt from scratch (the demo trains everything).
        fresh: rebuild cached stages.
    """
    import torch

    from .fidelity import _quiet_font_ocr, measure_fidelity, row, text_effect
    from .figures import image_grid, loss_curve
    from .stages import load_student, read_student_losses, run_stages

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cache is None:
        cache = out / "work"
        fresh = True
        if cache.exists():
            shutil.rmtree(cache)
    torch.set_num_threads(recipe.threads)
    load_before = load_average()
    say(f"anytext2-lcm demo: tiny model on {torch.get_num_threads()} CPU thread(s), load average {load_before}; "
        f"stages in {cache}")
    with _quiet_font_ocr():
        run = run_stages(recipe, cache, fresh=fresh, report=lambda m: say(f"  {m}"))
        t_train = time.perf_counter() - t_start
        say("  evaluating: teacher (DDIM 20 + CFG) vs student on the held-out prompts, same x_T")
        model = load_student(run)
        fcfg = fidelity_config(recipe, run.eval_json)
        t0 = time.perf_counter()
        n_grid = min(recipe.eval.grid_prompts, recipe.eval.num)
        fid = measure_fidelity(model, fcfg, keep_images=n_grid)
        effect = text_effect(model, fcfg, num=n_grid if n_grid else None, keep_images=n_grid)
        t_eval = time.perf_counter() - t0

    main = fcfg.students[0]
    k = 4 if 4 in fcfg.steps else max(fcfg.steps)
    r4 = row(fid, k)
    sps, dps = fid["seconds_per_image"], fid["denoise_seconds_per_image"]
    speed = sps["reference"] / sps[f"{main.label}@{k}"]
    speed_denoise = dps["reference"] / dps[f"{main.label}@{k}"]

    # -- figures ---------------------------------------------------------------------------------------------
    grid_path, loss_path = out / "grid.png", out / "loss.png"
    imgs = fid["images"]
    rows, titles = [], []
    for i in range(n_grid):
        glyph = np.where(fid["glyphs"][i].max(-1, keepdims=True) > 0, 255, 0).astype(np.uint8).repeat(3, 2)
        rows.append([glyph, effect["images"][i], imgs["reference"][i], imgs[f"{main.label}@{k}"][i],
                     imgs[f"teacher@{k}"][i]])
        titles.append(f"{i + 1}: " + " / ".join(fid["texts"][i]))
    cols = ["glyphs + positions", "teacher, no text\n20 steps, CFG 7.5",
            f"teacher\n{fcfg.teacher_steps} steps, CFG {fcfg.teacher_cfg:g}",
            f"student ({main.label})\n{k} steps, CFG {main.cfg:g}",
            f"teacher DDIM\n{k} steps, CFG {fcfg.teacher_cfg:g}"]
    if rows:
        image_grid(rows, cols, titles, scale=3, path=grid_path)
    losses = read_student_losses(run.student_run)
    loss_curve(losses, loss_path, title=f"LCM-LoRA distillation loss ({recipe.distill.loss}), "
                                        f"{len(losses)} steps, batch {recipe.distill.batch_size}")

    vae_info, teacher_info, student_info = (run.stages[s].info for s in ("vae", "teacher", "student"))
    doc = {
        "command": command,
        "recipe": recipe.to_dict(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": recipe.threads,
                    "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_start": load_before, "load_average_end": load_average()},
        "stages": {name: {"path": str(st.path), "cached": st.cached, "seconds_this_run": st.seconds,
                          **{k_: v for k_, v in st.info.items() if not isinstance(v, list)}}
                   for name, st in run.stages.items()},
        "vae": {"psnr_before_db": vae_info.get("psnr_before_db"), "psnr_after_db": vae_info.get("psnr_after_db")},
        "teacher": {"loss_first_10": teacher_info.get("loss_first_10"),
                    "loss_last_10": teacher_info.get("loss_last_10"),
                    "text_effect": {k_: v for k_, v in effect.items() if k_ not in ("images", "per_sample")}},
        "student": {"steps": student_info.get("steps"), "loss_first_10": student_info.get("loss_first_10"),
                    "loss_last_10": student_info.get("loss_last_10"), "adapter": str(run.adapter)},
        "speed": {"teacher_seconds_per_image": sps["reference"], "student_seconds_per_image": sps[f"{main.label}@{k}"],
                  "ratio": speed, "denoise_ratio": speed_denoise, "student_steps": k,
                  "unet_evaluations": {"teacher": 2 * fcfg.teacher_steps, "student": k}},
        "fidelity": {k_: v for k_, v in fid.items() if k_ not in ("images", "glyphs", "per_sample")},
        "fidelity_at_k": {"steps": k, "student_mse": r4["student_mse"], "teacher_mse": r4["teacher_mse"],
                          "ratio": r4["ratio"], "goal_ratio": 0.5, "goal_met": r4["ratio"] <= 0.5,
                          "controls": {label: v for label, v in r4["students"].items() if label != main.label}},
        "seconds": {"train": t_train, "evaluate": t_eval, "total": time.perf_counter() - t_start},
        "files": {"grid": str(grid_path), "loss": str(loss_path), "report": str(out / "report.md"),
                  "report_json": str(out / "report.json"), "student_adapter": str(run.adapter),
                  "student_adapter_file": str(run.student_run / "adapter.safetensors"),
                  "teacher_model": str(run.teacher), "tensorboard": str(run.student_run / "logs"),
                  "metrics": str(run.student_run / "metrics.jsonl"), "data": str(run.stages["data"].path)},
    }
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "report.md").write_text(markdown(doc, fid))
    return doc


def markdown(doc: dict, fid: dict) -> str:
    """The human-readable report."""
    from .fidelity import format_table

    r = doc["recipe"]
    sp, fk, te = doc["speed"], doc["fidelity_at_k"], doc["teacher"]["text_effect"]
    st = doc["stages"]
    m = doc["machine"]
    k = fk["steps"]
    lines = [
        "# anytext2-lcm demo report",
        "",
        f"`{doc['command']}` — {doc['seconds']['total']:.0f} s in all ({doc['seconds']['train']:.0f} s building the "
        f"models, {doc['seconds']['evaluate']:.0f} s evaluating) on {m['threads']} thread(s) of a {m['cpus']}-CPU "
        f"machine, load average {m['load_average_start']} at the start, {m['load_average_end']} at the end; "
        f"torch {m['torch']}.",
        "",
        "A tiny AnyText2 (the `tiny` architecture: 32-channel UNet and WriteNet, 8×8 latents at 64×64 px) trained "
        "here from scratch on synthetic data, distilled into an LCM-LoRA student by the project's trainer. The "
        "images are tiny and text is not readable at this size; what the demo shows is the pipeline end to end, "
        "where the teacher puts marks, and how closely the few-step student follows the 40-evaluation teacher.",
        "",
        "## Result",
        "",
        f"* **Speed**: teacher {doc['recipe']['eval']['teacher_steps']} steps + CFG "
        f"({sp['unet_evaluations']['teacher']} UNet evaluations) {sp['teacher_seconds_per_image']:.3f} s/image, "
        f"student {k} steps without CFG ({sp['unet_evaluations']['student']} evaluations) "
        f"{sp['student_seconds_per_image']:.3f} s/image: **{sp['ratio']:.1f}× faster** per image "
        f"(denoising loop alone {sp['denoise_ratio']:.1f}×; the rest is glyph rendering, conditioning and decoding, "
        f"which both pay once). Medians over {fid['samples']} images, measured in this run.",
        f"* **Fidelity** (latent MSE to the teacher's 20-step CFG output from the same x_T): student at {k} steps "
        f"{fk['student_mse']:.4f}, teacher's own DDIM at {k} steps {fk['teacher_mse']:.4f}: ratio "
        f"**{fk['ratio']:.3f}** (goal ≤ {fk['goal_ratio']}: {'met' if fk['goal_met'] else 'not met'} with this "
        f"demo's training budget; `python benchmarks/distill_fidelity.py` runs the longer recipe)."
        + "".join(f" {label}: {v['mse']:.4f} (ratio {v['ratio']:.3f})." for label, v in fk["controls"].items()),
        f"* **Text conditioning**: removing the text lines changes the teacher's latent by {te['inside']:.4f} "
        f"(mean |Δ|) inside the text positions and {te['outside']:.4f} outside: ratio {te['ratio']:.2f} "
        f"over {te['samples']} prompts.",
        "",
        "![teacher vs student](grid.png)",
        "",
        "Columns: the glyphs and positions the model is given; the teacher without the text lines (same seed); the "
        f"teacher (DDIM {r['eval']['teacher_steps']} steps, CFG {r['eval']['teacher_cfg']}); the student "
        f"({r['eval']['student_sampler']} {r['eval']['student_options']}, {k} steps, CFG {r['eval']['student_cfg']}); "
        f"the teacher's DDIM at {k} steps. Same x_T in every column of a row. Pixels enlarged 3× (nearest).",
        "",
        "## Fidelity table",
        "",
        format_table(fid),
        "",
        "Reading it: *teacher DDIM* is the teacher sampled as AnyText2 does, with fewer steps (ldm's timesteps: 4 "
        "steps start at t = 751). *undistilled* runs the teacher's own weights with the student's sampler and no CFG "
        "(its timesteps start at t = 999): the part of the student's advantage that comes from the sampler rather "
        "than from distillation. *lcm* re-noises with fresh noise between steps, so even a perfect student leaves "
        "the trajectory of the teacher's x_T (the benchmark's `--oracle` measures that floor).",
        "",
        "## Distillation loss",
        "",
        "![loss](loss.png)",
        "",
        f"{doc['student']['steps']} optimizer steps; mean loss of the first 10 steps "
        f"{doc['student']['loss_first_10']:.4f}, of the last 10 {doc['student']['loss_last_10']:.4f}.",
        "",
        "## Stages",
        "",
        "| stage | what | seconds | cached | result |",
        "|---|---|---:|---|---|",
        f"| data | make-data: {r['data']['train_num']} training + {r['data']['eval_num']} held-out images "
        f"({r['data']['source_size']} px, read at {r['data']['image_size']} px) | {st['data']['seconds_this_run']:.1f} "
        f"| {st['data']['cached']} | |",
        f"| vae | reconstruction tune, {r['vae']['steps']} steps × {r['vae']['batch_size']} crops of "
        f"{r['vae']['crop']} px, lr {r['vae']['lr']} | {st['vae']['seconds_this_run']:.1f} | {st['vae']['cached']} "
        f"| held-out PSNR {doc['vae']['psnr_before_db']:.1f} → {doc['vae']['psnr_after_db']:.1f} dB |",
        f"| teacher | pretraining of the whole tiny AnyText2, {r['teacher']['steps']} steps × "
        f"{r['teacher']['batch_size']}, lr {r['teacher']['lr']}, text weight {r['teacher']['text_loss_weight']} | "
        f"{st['teacher']['seconds_this_run']:.1f} | {st['teacher']['cached']} | ε-MSE "
        f"{doc['teacher']['loss_first_10']:.3f} → {doc['teacher']['loss_last_10']:.3f} |",
        f"| student | `distill` (LCM-LoRA, rank {r['distill']['rank']}, N = {r['distill']['num_ddim_timesteps']}, "
        f"guidance {r['distill']['guidance_scale_range']}), {r['distill']['steps']} steps × "
        f"{r['distill']['batch_size']}, lr {r['distill']['lr']} | {st['student']['seconds_this_run']:.1f} | "
        f"{st['student']['cached']} | loss {doc['student']['loss_first_10']:.4f} → "
        f"{doc['student']['loss_last_10']:.4f} |",
        "",
        "The tiny VAE keeps layout and contrast but not an image's overall colour: its last GroupNorm has one channel "
        "per group, which removes each channel's per-image mean (see `anytext2_lcm/demo/vae_tune.py`).",
        "",
        "## Files",
        "",
    ]
    lines += [f"* {name}: `{path}`" for name, path in doc["files"].items()]
    lines.append("")
    return "\n".join(lines)


def print_summary(doc: dict, say=print) -> None:
    sp, fk = doc["speed"], doc["fidelity_at_k"]
    say("")
    say(f"done in {doc['seconds']['total']:.0f} s. Teacher 20 steps + CFG: {sp['teacher_seconds_per_image']:.3f} "
        f"s/image; student {fk['steps']} steps: {sp['student_seconds_per_image']:.3f} s/image ({sp['ratio']:.1f}x "
        f"faster). Latent MSE to the teacher at {fk['steps']} steps: student {fk['student_mse']:.4f} vs teacher DDIM "
        f"{fk['teacher_mse']:.4f} (ratio {fk['ratio']:.3f}).")
    f = doc["files"]
    say(f"  report:          {f['report']} (+ {Path(f['report_json']).name})")
    say(f"  image grid:      {f['grid']}")
    say(f"  loss curve:      {f['loss']}")
    say(f"  student adapter: {f['student_adapter']} (PEFT folder), {f['student_adapter_file']}")
    say(f"  teacher model:   {f['teacher_model']} (converted folder)")
    say(f"  TensorBoard:     {f['tensorboard']}  metrics: {f['metrics']}")


def main(args) -> int:
    overrides = []
    if args.quick:
        overrides += QUICK
    if args.seed is not None:
        overrides += seed_overrides(args.seed)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    overrides += list(args.sets or [])
    recipe = load_recipe(args.recipe, overrides)
    argv = " ".join(sys.argv[1:]) if sys.argv and "anytext2" in Path(sys.argv[0]).name else ""
    doc = run_demo(args.out, recipe, cache=args.cache, fresh=args.fresh,
                   command=f"anytext2-lcm {argv}".strip() if argv else "anytext2-lcm demo")
    print_summary(doc)
    return 0


__all__ = ["QUICK", "fidelity_config", "main", "markdown", "print_summary", "run_demo", "seed_overrides"]
