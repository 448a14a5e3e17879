"""``anytext2-lcm demo``: the whole job on the built-in testbed model, on the CPU, without any download.

The recipe (``configs/demo.yaml``): synthetic training lines and held-out words → a LoRA student (PCM from the
CFG-free teacher) distilled from the shipped ``testbed`` teacher by the project's trainer → one evaluation
(:mod:`~anytext2_lcm.evaluate.quality`) of the teacher (20-step DDIM + CFG), the student at 1/2/4/8 steps, the
teacher's own DDIM and the undistilled weights at those step counts, all from the same seeds and x_T, every line read
by the offline OCR → ``OUT/grid.png``
(glyphs | teacher | student | teacher's DDIM | undistilled, at the grid's step count), ``OUT/loss.png``,
``OUT/report.md`` and ``OUT/report.json``.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from ..atomic import write_json, write_text
from ..config import ConfigError
from .spec import Recipe
from .stages import run_recipe

EVAL_FIELDS = {"num": 16, "steps": [1, 2, 4, 8], "grid_steps": 4, "grid_rows": 6, "seed": 100, "dataset": "heldout"}
"""The ``eval`` section of a demo recipe and its defaults."""


def eval_section(recipe: Recipe) -> dict:
    e = dict(EVAL_FIELDS, **(recipe.sections.get("eval") or {}))
    unknown = sorted(set(e) - set(EVAL_FIELDS))
    if unknown:
        raise ConfigError(f"eval.{unknown[0]}: unknown field (known: {', '.join(sorted(EVAL_FIELDS))})")
    if not isinstance(e["num"], int) or e["num"] < 1:
        raise ConfigError(f"eval.num={e['num']!r}: must be an integer >= 1")
    steps = e["steps"]
    if not isinstance(steps, list) or not steps or any(not isinstance(k, int) or k < 1 for k in steps):
        raise ConfigError(f"eval.steps={steps!r}: a non-empty list of integers >= 1")
    if e["grid_steps"] not in steps:
        raise ConfigError(f"eval.grid_steps={e['grid_steps']!r}: must be one of eval.steps {steps}")
    if e["dataset"] not in recipe.datasets:
        raise ConfigError(f"eval.dataset={e['dataset']!r}: no such dataset (known: {', '.join(recipe.datasets)})")
    students = [s for s in recipe.stages if s.config.get("method") in ("lcm", "pcm")]
    if len(students) != 1:
        raise ConfigError("stages: the demo distils exactly one student (method lcm or pcm)")
    return e


def run_demo(recipe: Recipe, out: str | Path, cache: str | Path | None = None, fresh: bool = False,
             command: str = "anytext2-lcm demo", say=print) -> dict:
    """Run the demo into ``out``; returns the report document (also ``out/report.json``).

    Args:
        cache: where the datasets and the student live; None: ``out/work``, rebuilt from scratch.
    """
    import torch

    from .. import lora as L
    from ..evaluate.figures import image_grid, loss_curve, read_losses
    from ..defaults import teacher_cfg
    from ..distill.config import DistillSection
    from ..evaluate.quality import Student, format_table, quality_runs, quality_table
    from ..evaluate.runner import EvalConfig, evaluate
    from ..factory import build_model

    e = eval_section(recipe)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cache is None:
        cache, fresh = out / "work", True
        shutil.rmtree(cache, ignore_errors=True)
    torch.set_num_threads(recipe.threads)
    say(f"anytext2-lcm demo: {torch.get_num_threads()} CPU thread(s); stages in {cache}")
    run = run_recipe(recipe, cache, fresh=fresh, report=lambda m: say(f"  {m}"))
    stage = next(s for s in recipe.stages if s.config.get("method") in ("lcm", "pcm"))
    t_train = time.perf_counter() - t0
    model = build_model(stage.start).eval()
    L.load_lora(model, run.adapter(stage.name), adapter_name="student")
    sampling = _sampling(run.adapter(stage.name))
    say(f"  evaluating on {e['num']} held-out samples: teacher (DDIM 20 + CFG), student, teacher's DDIM and the "
        f"undistilled weights at {e['steps']} steps")
    # Evaluated with the prompts it was distilled with (a_prompt; the negative prompt of CFG and of its emptied
    # samples), which are also generate's defaults, so the student is sampled as it learnt.
    d = DistillSection(**stage.config.get("distill", {}))
    cfg = EvalConfig(data=(str(run.json(e["dataset"])),), num=e["num"], seed=e["seed"], save_student_images=True,
                     a_prompt=d.a_prompt, n_prompt=d.n_prompt)
    runs = quality_runs([Student("student", sampling)], e["steps"])
    res = evaluate(model, cfg, out / "eval", runs=runs, progress=False)
    rows = quality_table(res, ["student"], e["steps"])
    k = e["grid_steps"]
    t_cfg = teacher_cfg(model.cfg)
    cols = ["glyphs", f"teacher\nDDIM 20, CFG {t_cfg:g}", f"student\n{sampling.sampler} {k}, CFG {sampling.cfg:g}",
            f"teacher DDIM {k}\nCFG {t_cfg:g}", f"undistilled\n{sampling.sampler} {k}"]
    grid_rows = _grid_rows(out / "eval", k, e["grid_rows"])
    if grid_rows:
        image_grid(grid_rows, cols, [" / ".join(s["texts"]) for s in res["samples"][:len(grid_rows)]], scale=2,
                   path=out / "grid.png")
    losses = read_losses(run.stages[stage.name].path)
    loss_curve(losses, out / "loss.png", title=f"{stage.config.get('method')} distillation loss, {len(losses)} steps")
    doc = {
        "command": command, "recipe": recipe.to_dict(), "seconds": {"training": t_train,
                                                                    "total": time.perf_counter() - t0},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": recipe.threads,
                    "cpus": os.cpu_count()},
        "stages": {n: {"path": str(s.path), "cached": s.cached, **s.info} for n, s in run.stages.items()},
        "sampling": sampling.to_dict(), "table": rows,
        "runs": {r["name"]: {"ocr": r["ocr"], "fidelity_to_teacher": r["fidelity_to_teacher"],
                             "seconds_per_image": r["seconds_per_image"]["mean"]} for r in res["runs"]},
        "grid": "grid.png" if grid_rows else None,
    }
    write_json(out / "report.json", doc, indent=1, ensure_ascii=False)
    write_text(out / "report.md", _markdown(doc, format_table(res, rows)))
    say(format_table(res, rows))
    say(f"  wrote {out / 'report.md'}, {out / 'grid.png'}, {out / 'loss.png'} in {doc['seconds']['total']:.0f} s")
    return doc


def _sampling(adapter: Path):
    from ..defaults import Sampling
    from ..lora import adapter_info

    return Sampling.from_dict(adapter_info(adapter)["sampling"])


def _grid_rows(eval_dir: Path, k: int, n: int) -> list[list[np.ndarray]]:
    from PIL import Image

    img = eval_dir / "images"
    rows = []
    for i in range(n):
        names = [("glyphs", f"{i:05d}.png"), ("teacher", f"{i:05d}_0.png"), (f"student_{k}", f"{i:05d}_0.png"),
                 (f"ddim_{k}", f"{i:05d}_0.png"), (f"undistilled_{k}", f"{i:05d}_0.png")]
        paths = [img / d / f for d, f in names]
        if not all(p.is_file() for p in paths):
            break
        rows.append([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return rows


def _markdown(doc: dict, table: str) -> str:
    st = next(iter(doc["stages"].values()))
    return "\n".join([
        "# anytext2-lcm demo", "",
        f"`{doc['command']}` — a student ({doc['sampling']['sampler']} sampler) distilled from the built-in "
        f"testbed teacher "
        f"({st.get('steps')} steps, {st.get('build_seconds', 0):.0f} s), evaluated on held-out words it never saw; "
        f"total {doc['seconds']['total']:.0f} s on {doc['machine']['threads']} CPU thread(s).", "",
        table, "![teacher vs student](grid.png)", "", "![distillation loss](loss.png)", ""])


__all__ = ["EVAL_FIELDS", "eval_section", "run_demo"]
