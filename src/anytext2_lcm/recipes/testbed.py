"""``anytext2-lcm testbed``: build the CPU-scale AnyText2 that writes legible text, from nothing.

The recipe (``configs/testbed.yaml``): two synthetic datasets (training lines are random strings; held-out lines are
real words the training generator never produces, ``data.words``), then the stages of the one Trainer:

1. ``vae`` — the autoencoder, then latent calibration; **gate**: its reconstructions of the held-out images must
   read at Sen.ACC >= ``gate.vae_min_sen_acc`` with the offline OCR, else no model built on it can pass and the
   build stops;
2. ``ocr`` — the glyph recogniser (CTC), so that the line embeddings and the OCR losses read text;
3. ``teacher`` — AnyText2's objective with the UNet trainable;
4. any further ``method: teacher`` stages that continue from it (``configs/testbed.yaml``: ``teacher_large``, a
   fine-tune on large glyphs).

The last stage's model is the result: its final weights, or with ``ship.average_checkpoints: [steps]`` the uniform
average of its checkpoints at those steps (``distill.checkpoints.average_checkpoints``; the window is chosen on a
validation set, never on the held-out lines). It is measured on the held-out lines (teacher: 20-step DDIM + the model's
CFG; the dataset's own images and the VAE's reconstructions as reference rows) into ``OUT/report.md`` / ``report.json``,
and written as a converted folder in the ``ship.dtype`` precision to ``OUT/model``; ``install`` also replaces the
weights inside the package (``factory.shipped_weights("testbed")``). The installed folder holds no light decoder: the
one shipped beside the previous weights learnt that model's own generated latents, so it is dropped (and the command
says so) rather than paired with weights it was never measured on; ``benchmarks/light_decoder.py`` trains and measures a
new one.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from ..atomic import commit_dir, write_json, write_text
from ..config import ConfigError
from .spec import Recipe
from .stages import RecipeRun, run_recipe

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


class GateError(RuntimeError):
    """A recipe gate failed (the measured figure is in the message)."""


def check_sections(recipe: Recipe) -> tuple[float, str]:
    """(gate.vae_min_sen_acc, ship.dtype), validated, and ``ship.average_checkpoints`` (:func:`averaged_steps`); the
    recipe must have the vae and teacher stages and a held-out dataset."""
    gate = recipe.sections.get("gate") or {}
    ship = recipe.sections.get("ship") or {}
    g = gate.get("vae_min_sen_acc", 0.95)
    if not isinstance(g, (int, float)) or not 0 <= g <= 1:
        raise ConfigError(f"gate.vae_min_sen_acc={g!r}: must lie in [0, 1]")
    dt = ship.get("dtype", "fp16")
    if dt not in DTYPES:
        raise ConfigError(f"ship.dtype={dt!r}: one of {', '.join(DTYPES)}")
    names = [s.name for s in recipe.stages]
    for need in ("vae", "teacher"):
        if need not in names:
            raise ConfigError(f"stages.{need}: the testbed recipe needs this stage (has {', '.join(names)})")
    last = recipe.stages[-1]
    if last.config.get("method") != "teacher":
        raise ConfigError(f"stages.{last.name}.config.method={last.config.get('method')!r}: the last stage is the "
                          f"shipped model and must be a teacher stage")
    if "heldout" not in recipe.datasets:
        raise ConfigError("datasets.heldout: the testbed recipe needs a held-out dataset")
    averaged_steps(recipe)
    return float(g), dt


def averaged_steps(recipe: Recipe) -> list[int]:
    """``ship.average_checkpoints``: the steps of the last stage whose checkpoints are averaged into the shipped
    weights ([] = its final weights). Each must be a step the trainer saves (a multiple of
    ``checkpoint.every_n_steps`` below ``train.max_steps``, or ``max_steps`` itself) and one that rotation keeps (among
    the newest ``checkpoint.keep_last``); else a one-line ConfigError naming the field."""
    steps = (recipe.sections.get("ship") or {}).get("average_checkpoints") or []
    field = "ship.average_checkpoints"
    if not isinstance(steps, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
        raise ConfigError(f"{field}={steps!r}: must be a list of training steps (integers)")
    if len(set(steps)) != len(steps):
        raise ConfigError(f"{field}={steps!r}: a step is listed twice")
    last = recipe.stages[-1]
    train, ck = last.config.get("train") or {}, last.config.get("checkpoint") or {}
    max_steps, every, keep = train.get("max_steps"), ck.get("every_n_steps", 0), ck.get("keep_last", 3)
    saved = sorted({k for k in range(every, max_steps, every)} if every else set()) + [max_steps]
    kept = saved[-keep:] if keep else saved
    for x in steps:
        if x not in kept:
            raise ConfigError(f"{field}: step {x} is not a checkpoint that stages.{last.name} keeps (it keeps "
                              f"{kept}: checkpoint.every_n_steps={every}, keep_last={keep}, "
                              f"train.max_steps={max_steps})")
    return sorted(steps)


def measure(model_path: Path, data: Path, out: Path, teacher: bool, num: int | None = None) -> dict:
    """OCR of the held-out lines: the dataset's images and the VAE's reconstructions, and (``teacher``) the
    teacher's 20-step DDIM + CFG images; returns the ``evaluate`` results document (a report is written with the
    teacher)."""
    from ..evaluate.report import write_report
    from ..evaluate.runner import EvalConfig, evaluate, read_dataset, run_specs
    from ..factory import build_model

    model = build_model(str(model_path)).eval()
    cfg = EvalConfig(data=(str(data),), num=num, reconstruction=True)
    if not teacher:
        return read_dataset(model, cfg, out)
    res = evaluate(model, cfg, out, runs=run_specs(cfg)[:1], progress=False)
    write_report(res, out, grid_rows=8, max_grids=2)
    return res


def ocr_row(res: dict, name: str) -> dict:
    for r in res["runs"]:
        if r["name"] == name:
            return r["ocr"]
    raise KeyError(name)


def build_testbed(recipe: Recipe, out: str | Path, cache: str | Path | None = None, fresh: bool = False,
                  install: bool = False, report: Callable[[str], None] = print) -> dict:
    """Run the recipe into ``out`` (stages cached under ``cache``, default ``out/work``); see the module docstring.

    Raises:
        GateError: the autoencoder's reconstructions read below the gate.
    """
    import torch

    from ..checkpoint import save_converted
    from ..factory import build_model

    gate, dtype = check_sections(recipe)
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "work"
    t0 = time.perf_counter()
    run = run_recipe(recipe, cache, fresh=fresh, only=("vae",), report=report)
    held = run.json("heldout")
    vae_res = measure(run.model("vae"), held, out / "gate", teacher=False)
    rec = ocr_row(vae_res, "reconstruction")
    acc = rec.get("Latin", rec["all"])["sen_acc"]
    report(f"gate: VAE reconstructions of held-out images read at Sen.ACC {rec['all']['sen_acc']:.3f} "
           f"(Latin {acc:.3f}; gate {gate})")
    if rec["all"]["sen_acc"] < gate:
        raise GateError(f"the autoencoder's reconstructions read at Sen.ACC {rec['all']['sen_acc']:.3f} < "
                        f"gate.vae_min_sen_acc {gate}: no model on this VAE can write legible text; train it longer "
                        f"(stages.vae.config.train.max_steps) or widen it")
    run = run_recipe(recipe, cache, fresh=False, report=report)
    final = recipe.stages[-1].name
    result = run.model(final)
    steps = averaged_steps(recipe)
    if steps:
        result = average_into(run, final, steps, out / "averaged", report)
    res = measure(result, held, out / "eval", teacher=True)
    model = build_model(str(result))
    shipped = save_converted(model, out / "model", dtype=getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None,
                             extra={"trained_by": f"anytext2-lcm testbed ({recipe.name})",
                                    "recipe": recipe.to_dict()})
    if install:
        from importlib import resources

        target = Path(str(resources.files("anytext2_lcm").joinpath("weights", "testbed")))
        target.parent.mkdir(parents=True, exist_ok=True)
        from ..light_decoder import FILE_NAME as LIGHT_DECODER

        dropped = (target / LIGHT_DECODER).is_file()
        tmp = target.with_name(".testbed.installing")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(shipped, tmp)
        commit_dir(tmp, target)  # the installed weights are replaced only once the new ones are complete
        report(f"installed {target}")
        if dropped:
            report(f"{target}: the previous {LIGHT_DECODER} was not kept (it was trained for the previous weights); "
                   "train and measure one for these with benchmarks/light_decoder.py")
    doc = summary(recipe, run, vae_res, res, time.perf_counter() - t0)
    write_json(out / "report.json", doc, indent=1, ensure_ascii=False)
    write_text(out / "report.md", summary_markdown(doc))
    report(f"wrote {out / 'report.md'} and {shipped}")
    return doc


def average_into(run: RecipeRun, stage: str, steps: list[int], out: Path, report: Callable[[str], None]) -> Path:
    """The stage's model with its trainable weights replaced by the average of its checkpoints at ``steps``, written
    (fp32) to ``out``; returns ``out``."""
    import torch

    from ..checkpoint import CheckpointError, save_converted
    from ..distill.checkpoints import average_checkpoints, checkpoint_name
    from ..factory import build_model

    root = run.stages[stage].path / "checkpoints"
    avg = average_checkpoints([root / checkpoint_name(k) for k in steps])
    model = build_model(str(run.model(stage))).eval()
    try:  # torch checks the shapes; the trainable subset leaves every other tensor as the stage's model has it
        unknown = model.load_state_dict(avg, strict=False).unexpected_keys
    except RuntimeError as e:
        raise CheckpointError(f"{root}: the averaged tensors do not fit the model ({e})") from None
    if unknown:
        raise CheckpointError(f"{root}: checkpointed tensors the model does not have: {sorted(unknown)[:3]}")
    report(f"{stage}: averaged the weights of its checkpoints at steps {steps} ({len(avg)} tensors)")
    return save_converted(model, out, dtype=torch.float32,
                          extra={"trained_by": f"stage {stage}, checkpoints {steps} averaged"})


def summary(recipe: Recipe, run: RecipeRun, vae_res: dict, res: dict, seconds: float) -> dict:
    from ..evaluate.figures import read_losses

    return {
        "recipe": recipe.to_dict(),
        "stages": {n: {"path": str(s.path), "cached": s.cached, **s.info} for n, s in run.stages.items()},
        "build_seconds": {n: s.info.get("build_seconds") for n, s in run.stages.items()},
        "seconds_this_run": seconds,
        "reference": ocr_row(res, "reference"), "reconstruction": ocr_row(vae_res, "reconstruction"),
        "teacher": ocr_row(res, "teacher"), "averaged_checkpoints": averaged_steps(recipe),
        "teacher_losses": read_losses(run.stages[recipe.stages[-1].name].path)[-1:],
    }


def summary_markdown(doc: dict) -> str:
    lines = ["# The testbed model", "", "OCR (offline PP-OCRv4) of the held-out lines (words never seen in training):",
             "", "| run | language | lines | Sen.ACC | NED |", "|---|---|---:|---:|---:|"]
    for name in ("reference", "reconstruction", "teacher"):
        for lang, r in doc[name].items():
            lines.append(f"| {name} | {lang} | {r['lines']} | {r['sen_acc']:.3f} | {r['ned']:.3f} |")
    if doc.get("averaged_checkpoints"):
        lines += ["", f"The teacher's weights: the average of the last stage's checkpoints at steps "
                      f"{doc['averaged_checkpoints']}."]
    lines += ["", "Stage build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["build_seconds"].items()
                                                       if v is not None)]
    return "\n".join(lines) + "\n"


__all__ = ["GateError", "average_into", "averaged_steps", "build_testbed", "check_sections", "measure"]
