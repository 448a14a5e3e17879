"""The tiny end-to-end run as cached stages: data → VAE → teacher → student, each a folder under a cache root.

=========  ============================================================  =====================================
stage      what                                                          output (under ``ROOT/<stage>-<key>/``)
=========  ============================================================  =====================================
data       ``make-data`` twice: training images and held-out images       train/anyword_synth.json, eval/...
vae        reconstruction tune + latent calibration of the tiny VAE       vae.safetensors, log.json
teacher    pretraining of the whole tiny AnyText2 (``demo.teacher``)      model/ (a converted folder), log.json
student    ``distill`` (the trainer, LCM-LoRA) from that teacher          the trainer's run folder: adapter/,
                                                                          adapter.safetensors, metrics.jsonl,
                                                                          logs/ (TensorBoard), config.yaml
=========  ============================================================  =====================================

A stage folder is complete when its ``done.json`` exists; it is built under a temporary name and renamed into
place, so an interrupted run never leaves a folder that looks complete. ``fresh=True`` rebuilds every stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .recipe import Recipe, stage_key, stage_settings

log = logging.getLogger(__name__)

DONE = "done.json"


@dataclass
class StageInfo:
    name: str
    path: Path
    cached: bool
    seconds: float
    """Wall time of this run's build (0 when the cache was used); ``info["build_seconds"]`` keeps the original."""
    info: dict = field(default_factory=dict)


@dataclass
class RunPaths:
    """Where the stages of a run are, and what each one reported."""

    root: Path
    stages: dict[str, StageInfo] = field(default_factory=dict)

    @property
    def train_json(self) -> Path:
        return self.stages["data"].path / "train" / "anyword_synth.json"

    @property
    def eval_json(self) -> Path:
        return self.stages["data"].path / "eval" / "anyword_synth.json"

    @property
    def vae(self) -> Path:
        return self.stages["vae"].path / "vae.safetensors"

    @property
    def teacher(self) -> Path:
        return self.stages["teacher"].path / "model"

    @property
    def student_run(self) -> Path:
        return self.stages["student"].path

    @property
    def adapter(self) -> Path:
        return self.stages["student"].path / "adapter"


def cached_stage(root: Path, name: str, key: str, fresh: bool, build: Callable[[Path], dict],
                 report: Callable[[str], None]) -> StageInfo:
    """The stage folder ``root/key``: taken from the cache when its done.json exists, else built by
    ``build(tmp)`` under a temporary name (its returned dict + build_seconds become done.json) and renamed."""
    final = root / key
    if not fresh and (final / DONE).is_file():
        info = json.loads((final / DONE).read_text())
        report(f"{name}: cached {final}")
        return StageInfo(name, final, True, 0.0, info)
    if final.exists():
        shutil.rmtree(final)
    tmp = root / f".{key}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    report(f"{name}: building {final}")
    t0 = time.perf_counter()
    info = build(tmp) or {}
    seconds = time.perf_counter() - t0
    info["build_seconds"] = seconds
    (tmp / DONE).write_text(json.dumps(info, indent=1))
    tmp.rename(final)
    _retarget(final, tmp)
    return StageInfo(name, final, False, seconds, info)


def _retarget(final: Path, tmp: Path) -> None:
    """The trainer wrote its absolute output_dir into config.yaml; point it at the final folder."""
    cfg = final / "config.yaml"
    if cfg.is_file():
        cfg.write_text(cfg.read_text().replace(str(tmp), str(final)))


def distill_stage(cfg, name: str, report: Callable[[str], None]) -> dict:
    """Run the trainer on ``cfg`` (a stage build) → the stage's done.json numbers: steps, mean loss of the first and
    last 10 steps, the output files (relative to the run folder). A run that does not finish is an error."""
    from ..distill.trainer import train

    t0 = time.perf_counter()
    result = train(cfg)
    if result.exit_code:
        raise RuntimeError(f"{name}: distillation stopped with exit code {result.exit_code}")
    losses = [loss for _, loss in result.losses]
    report(f"{name}: {len(losses)} steps in {time.perf_counter() - t0:.0f} s, loss "
           f"{_mean(losses[:10]):.4f} (first 10) -> {_mean(losses[-10:]):.4f} (last 10)")
    out = Path(cfg.output_dir)
    return {"steps": len(losses), "loss_first_10": _mean(losses[:10]), "loss_last_10": _mean(losses[-10:]),
            "outputs": [str(Path(p).relative_to(out)) for p in result.outputs]}


def _tiny_model(seed: int):
    from .. import config as C
    from ..models.anytext2 import AnyText2
    from ..models.init import initialize

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return initialize(AnyText2(C.tiny()), seed=seed)


def teacher_train_config(recipe: Recipe, train_json: Path, output_dir: Path, teacher: Path | None = None,
                         method: str = "teacher"):
    """The trainer configuration of a stage (``method: teacher`` for the loader of the pretraining; ``lcm`` for the
    distillation)."""
    from ..distill.config import load_config

    d, s = recipe.data, recipe.distill
    base = {
        "method": method,
        "output_dir": str(output_dir),
        "model": {"teacher": str(teacher) if teacher else None, "preset": "tiny", "init": "original",
                  "init_seed": 0},
        "data": {"json_paths": [str(train_json)], "image_size": d.image_size, "max_lines": d.max_lines,
                 "mask_img_prob": d.mask_img_prob, "seed": d.seed},
        "train": {"max_steps": s.steps if method == "lcm" else max(recipe.teacher.steps, 1),
                  "batch_size": s.batch_size if method == "lcm" else recipe.teacher.batch_size,
                  "num_workers": 0, "seed": s.seed if method == "lcm" else recipe.teacher.seed,
                  "mixed_precision": "no", "device": "cpu"},
        "checkpoint": {"every_n_steps": 0, "keep_last": 1, "resume": None},  # the lcm run may keep more (below)
        "validation": {"every_n_steps": 0, "image_size": d.image_size},
        "logging": {"tensorboard": True, "progress_bar": False},
    }
    if method == "lcm":
        if s.checkpoint_every:
            base["checkpoint"].update(every_n_steps=s.checkpoint_every, keep_last=s.steps // s.checkpoint_every + 1)
        base.update({
            "lora": {"rank": s.rank, "alpha": s.alpha, "targets": s.targets},
            "distill": {"num_ddim_timesteps": s.num_ddim_timesteps,
                        "guidance_scale_range": list(s.guidance_scale_range), "loss": s.loss, "huber_c": s.huber_c},
            "optim": {"learning_rate": s.lr, "lr_scheduler": s.lr_scheduler,
                      "lr_warmup_steps": min(s.warmup_steps, s.steps), "max_grad_norm": 1.0},
        })
    return load_config(None, [], base=base)


def run_stages(recipe: Recipe, root: str | Path, fresh: bool = False,
               report: Callable[[str], None] = print) -> RunPaths:
    """Build (or reuse) every stage of ``recipe`` under ``root``; returns their paths and reports."""
    from safetensors.torch import load_file, save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    settings = stage_settings(recipe)
    run = RunPaths(root)
    d = recipe.data

    # -- data ----------------------------------------------------------------------------------------------
    def build_data(out: Path) -> dict:
        from ..data.synthetic import SynthConfig, write_dataset

        t = write_dataset(SynthConfig(num=d.train_num, size=d.source_size, max_lines=d.max_lines, seed=d.seed),
                          out / "train")
        e = write_dataset(SynthConfig(num=d.eval_num, size=d.source_size, max_lines=d.max_lines,
                                      seed=d.seed + 1000), out / "eval")
        return {"train": [str(p.relative_to(out)) for p in t], "eval": [str(p.relative_to(out)) for p in e]}

    k_data = stage_key("data", settings["data"], ())
    run.stages["data"] = cached_stage(root, "data", k_data, fresh, build_data, report)

    # -- VAE -----------------------------------------------------------------------------------------------
    def build_vae(out: Path) -> dict:
        from .vae_tune import calibrate_latents, load_images, tune_vae

        model = _tiny_model(0)
        train = sorted((run.stages["data"].path / "train" / "images").glob("*.jpg"))
        held = sorted((run.stages["data"].path / "eval" / "images").glob("*.jpg"))
        images = load_images(train, d.image_size)
        held_out = load_images(held, d.image_size)
        res = tune_vae(model.vae, images, recipe.vae, held_out=held_out,
                       progress=_every(max(1, recipe.vae.steps // 5), "vae", report))
        std = calibrate_latents(model.vae, images, model.scale_factor, recipe.vae.posterior_std)
        save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()}, str(out / "vae.safetensors"))
        info = {"psnr_before_db": res.psnr_before, "psnr_after_db": res.psnr_after, "latent_std_before": std,
                "seconds": res.seconds, "losses": res.losses}
        (out / "log.json").write_text(json.dumps(info))
        return {k: v for k, v in info.items() if k != "losses"}

    k_vae = stage_key("vae", settings["vae"], (k_data,))
    run.stages["vae"] = cached_stage(root, "vae", k_vae, fresh, build_vae, report)

    # -- teacher -------------------------------------------------------------------------------------------
    def build_teacher(out: Path) -> dict:
        from ..checkpoint import save_converted
        from .teacher import pretrain_teacher

        model = _tiny_model(0)
        model.vae.load_state_dict(load_file(str(run.vae)))
        tcfg = teacher_train_config(recipe, run.train_json, out / "unused")
        res = pretrain_teacher(model, tcfg, recipe.teacher,
                               progress=_every(max(1, recipe.teacher.steps // 5), "teacher", report))
        save_converted(model, out / "model", extra={"trained_by": "anytext2_lcm.demo.teacher (pretraining)"})
        info = {"seconds": res.seconds, "trainable_parameters": res.trainable, "losses": res.losses}
        (out / "log.json").write_text(json.dumps(info))
        return {"seconds": res.seconds, "trainable_parameters": res.trainable,
                "loss_first_10": _mean(res.losses[:10]), "loss_last_10": _mean(res.losses[-10:])}

    k_teacher = stage_key("teacher", settings["teacher"], (k_vae,))
    run.stages["teacher"] = cached_stage(root, "teacher", k_teacher, fresh, build_teacher, report)

    # -- student (the trainer) -----------------------------------------------------------------------------
    def build_student(out: Path) -> dict:
        cfg = teacher_train_config(recipe, run.train_json, out, teacher=run.teacher, method="lcm")
        return distill_stage(cfg, "student", report)

    k_student = stage_key("student", settings["student"], (k_teacher,))
    run.stages["student"] = cached_stage(root, "student", k_student, fresh, build_student, report)
    return run


def read_student_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of a distillation run from its ``metrics.jsonl`` (torn lines skipped)."""
    out = []
    f = Path(run_dir) / "metrics.jsonl"
    if f.is_file():
        for ln in f.read_text().splitlines():
            try:
                m = json.loads(ln)
                out.append((int(m["step"]), float(m["loss"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
    return out


def student_checkpoints(run: RunPaths) -> list[tuple[int, Path]]:
    """(step, folder) of the complete step-boundary checkpoints the distillation kept, oldest first."""
    from ..distill.checkpoints import MARKER, parse_name

    root = run.student_run / "checkpoints"
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        pos = parse_name(p.name)
        if pos is not None and pos[1] == 0 and (p / MARKER).is_file():
            out.append((pos[0], p))
    return sorted(out)


def load_student_checkpoint(run: RunPaths, recipe: Recipe, checkpoint: Path):
    """The teacher with the LoRA of a distillation checkpoint (its ``trainable.safetensors``)."""
    from ..checkpoint import load_model
    from ..distill.checkpoints import CheckpointReader
    from ..distill.trainer import load_trainable
    from ..lora import LoraSpec, apply_lora

    model = load_model(run.teacher).eval()
    s = recipe.distill
    apply_lora(model, LoraSpec(rank=s.rank, alpha=s.alpha, targets=s.targets))
    load_trainable(model, CheckpointReader(checkpoint).tensors("trainable.safetensors"), str(checkpoint))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_student(run: RunPaths):
    """The teacher with the student LoRA loaded (unmerged: the teacher is the same model with adapters bypassed)."""
    from ..checkpoint import load_model
    from ..lora import load_lora

    model = load_model(run.teacher).eval()
    load_lora(model, run.adapter)
    return model


def _mean(v) -> float:
    v = list(v)
    return float(sum(v) / len(v)) if v else float("nan")


def _every(n: int, name: str, report: Callable[[str], None]) -> Callable[[int, float], None]:
    window: list[float] = []
    t0 = time.perf_counter()

    def cb(step: int, loss: float) -> None:
        window.append(loss)
        if step % n == 0:
            report(f"{name}: step {step}, loss {_mean(window):.4f} (mean of the last {len(window)}), "
                   f"{time.perf_counter() - t0:.0f} s")
            window.clear()

    return cb


__all__ = ["RunPaths", "StageInfo", "cached_stage", "distill_stage", "load_student", "load_student_checkpoint", "read_student_losses", "run_stages",
           "student_checkpoints", "teacher_train_config"]
