"""The recipe of the tiny end-to-end run (data → VAE → teacher → LCM-LoRA student → evaluation) and its YAML form.

A recipe is plain data (``configs/demo_*.yaml``)::

    name: demo
    threads: 1
    data:    {train_num: 128, eval_num: 8, source_size: 128, image_size: 64, max_lines: 2, seed: 0}
    vae:     {steps: 300, batch_size: 8, lr: 1.0e-3, crop: 32}
    teacher: {steps: 300, batch_size: 8, lr: 1.0e-3}
    distill: {steps: 150, batch_size: 8, lr: 5.0e-4, rank: 8, num_ddim_timesteps: 20, ...}
    eval:    {num: 8, steps: [1, 2, 4, 8], student_sampler: tcd, student_options: {gamma: 0.0}}

Each stage's output is cached under a key that hashes the settings it depends on (its own and its inputs'), the
package's source code and the torch version (:func:`stage_key`), so a rerun with the same recipe and code reuses
it and any change retrains exactly the stages it affects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .teacher import TeacherPretrainConfig
from .vae_tune import VAETuneConfig


@dataclass(kw_only=True)
class DataSection:
    """The synthetic data (``anytext2-lcm make-data``)."""

    train_num: int = 128
    """Training images (VAE, teacher and distillation all use them)."""
    eval_num: int = 8
    """Held-out images (another make-data seed) for the fidelity table and the demo grid."""
    source_size: int = 128
    """make-data's image side; text needs about 128 px to fit, the reader then resizes to ``image_size``."""
    image_size: int = 64
    """Training and generation size (a multiple of 64)."""
    max_lines: int = 2
    seed: int = 0
    """make-data seed of the training set; the held-out set uses ``seed + 1000``."""
    mask_img_prob: float = 0.0
    """Editing-mode probability of the training samples (0: generation only, what the demo and the table run)."""

    def __post_init__(self) -> None:
        _positive(self, "data", ("train_num", "eval_num", "source_size", "image_size", "max_lines"))
        if self.image_size % 64:
            raise ConfigError(f"data.image_size={self.image_size}: must be a multiple of 64")
        if not 0.0 <= self.mask_img_prob <= 1.0:
            raise ConfigError(f"data.mask_img_prob={self.mask_img_prob}: must lie in [0, 1]")


@dataclass(kw_only=True)
class DistillSection:
    """The LCM-LoRA distillation, run by ``anytext2_lcm.distill.trainer`` (see ``configs/distill_tiny.yaml``)."""

    steps: int = 80
    batch_size: int = 8
    lr: float = 1e-3
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 5
    rank: int = 8
    alpha: float = 8.0
    targets: str = "lcm"
    num_ddim_timesteps: int = 20
    """Points of the distillation grid N. 20 = the teacher's own inference step count: the student then learns the
    20-step DDIM solution (the reference of the table) and the consistency condition propagates over 20 grid points
    instead of 50, which converges faster."""
    guidance_scale_range: tuple[float, float] = (7.0, 8.0)
    loss: str = "l2"
    huber_c: float = 0.001
    seed: int = 0
    checkpoint_every: int = 0
    """Keep a trainer checkpoint every this many steps (0: only the last); the benchmark's ``--curve`` measures the
    student at each of them."""

    def __post_init__(self) -> None:
        _positive(self, "distill", ("steps", "batch_size", "rank"))
        self.guidance_scale_range = tuple(float(v) for v in self.guidance_scale_range)


@dataclass(kw_only=True)
class EvalSection:
    """What the fidelity table and the demo grid run (see ``demo.fidelity.FidelityConfig``)."""

    num: int = 4
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: int = 20
    teacher_cfg: float = 7.5
    student_sampler: str = "tcd"
    """The student's sampler in the table and the grid. ``tcd`` with gamma 0 is the deterministic multistep
    consistency sampler; ``lcm`` re-noises with fresh noise between steps, which by construction leaves the
    trajectory of the teacher's x_T (the benchmark measures both, see ``extra_samplers``)."""
    student_options: dict = field(default_factory=lambda: {"gamma": 0.0})
    student_cfg: float = 1.0
    extra_samplers: list = field(default_factory=lambda: [
        {"sampler": "lcm", "options": {}},
        {"sampler": "tcd", "options": {"gamma": 0.0}, "lora": False}])
    """More samplers measured beside the main one (same x_T): ``{sampler, options, cfg, lora}``; ``lora: false``
    runs the teacher's weights (adapters bypassed) with that sampler, the control for what distillation adds."""
    grid_prompts: int = 4
    """Held-out prompts shown in the demo grid."""
    seed: int = 100

    def __post_init__(self) -> None:
        _positive(self, "eval", ("num", "teacher_steps"))
        self.steps = tuple(int(s) for s in self.steps)


@dataclass(kw_only=True)
class Recipe:
    """The whole tiny run."""

    name: str = "demo"
    threads: int = 1
    """torch intra-op threads. 1 by default: the tiny model's tensors are small, so threads mostly add
    synchronisation, and on a shared CPU a 2-thread run was measured up to 30× slower per step than a 1-thread one
    (OpenMP threads spinning on a busy core)."""
    data: DataSection = field(default_factory=DataSection)
    vae: VAETuneConfig = field(default_factory=lambda: VAETuneConfig(steps=200))
    teacher: TeacherPretrainConfig = field(
        default_factory=lambda: TeacherPretrainConfig(steps=120, text_loss_weight=4.0, writenet_init="default"))
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads={self.threads!r}: must be an integer >= 1")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"data": DataSection, "vae": VAETuneConfig, "teacher": TeacherPretrainConfig,
             "distill": DistillSection, "eval": EvalSection}


def _positive(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{prefix}.{n}={v!r}: must be an integer >= 1")


def _build(cls: type, values: dict | None, prefix: str) -> Any:
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if isinstance(v, str) and hints.get(k) in ("float", float):  # YAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix}: {e}") from None


def recipe_from_dict(d: dict) -> Recipe:
    """Build and validate a :class:`Recipe` from plain data; unknown keys are errors."""
    d = dict(d or {})
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        if k in _SECTIONS:
            kwargs[k] = _build(_SECTIONS[k], v, k)
        elif k in ("name", "threads"):
            kwargs[k] = v
        else:
            raise ConfigError(f"{k}: unknown recipe section (known: name, threads, {', '.join(_SECTIONS)})")
    return Recipe(**kwargs)


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """A recipe from a YAML file (None: the defaults) with ``section.key=value`` overrides (values are YAML)."""
    from ..distill.config import apply_overrides, read_yaml

    d = read_yaml(path) if path is not None else {}
    apply_overrides(d, list(overrides or []))
    return recipe_from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# Cache keys
# ---------------------------------------------------------------------------------------------------------------


STAGE_CODE: dict[str, tuple[str, ...]] = {
    "data": ("data/",),
    "vae": ("demo/vae_tune.py", "demo/stages.py", "models/", "config.py"),
    "teacher": ("demo/teacher.py", "demo/stages.py", "models/", "distill/", "data/", "conditioning.py", "config.py",
                "samplers/", "checkpoint.py"),
    "student": ("demo/stages.py", "distill/", "lora/", "models/", "samplers/", "data/", "pipeline.py",
                "conditioning.py", "config.py", "checkpoint.py"),
}
"""The package sources (relative to ``anytext2_lcm/``) whose code produces each stage's weights: a change there
retrains the stage. Evaluation, report and figure code do not invalidate trained stages, nor does this file (the
resolved settings themselves are hashed, so a changed default only matters where it changes a setting)."""


def code_version(stage: str | None = None) -> str:
    """sha256 (16 hex) of the torch version and the ``.py`` sources of the installed ``anytext2_lcm`` package that
    ``stage`` depends on (:data:`STAGE_CODE`; None: every source file)."""
    import torch

    import anytext2_lcm

    root = Path(anytext2_lcm.__file__).resolve().parent
    parts = STAGE_CODE[stage] if stage is not None else ("",)
    h = hashlib.sha256(torch.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(rel == q or (q.endswith("/") or q == "") and rel.startswith(q) for q in parts):
            h.update(rel.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, settings: dict, inputs: tuple[str, ...] = (), code: str | None = None) -> str:
    """``stage-<hash>``: the hash of the stage's settings, the keys of the stages it reads and the code version of
    the stage (:func:`code_version`)."""
    doc = {"stage": stage, "settings": settings, "inputs": list(inputs), "code": code or code_version(stage)}
    return f"{stage}-{hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]}"


def stage_settings(recipe: Recipe) -> dict[str, dict]:
    """What each stage depends on (besides its input stages)."""
    r = recipe.to_dict()
    d = r["data"]
    return {
        "data": {k: d[k] for k in ("train_num", "eval_num", "source_size", "max_lines", "seed")},
        "vae": {"vae": r["vae"], "image_size": d["image_size"], "threads": recipe.threads},
        "teacher": {"teacher": r["teacher"], "image_size": d["image_size"], "max_lines": d["max_lines"],
                    "mask_img_prob": d["mask_img_prob"], "threads": recipe.threads},
        "student": {"distill": r["distill"], "image_size": d["image_size"], "max_lines": d["max_lines"],
                    "mask_img_prob": d["mask_img_prob"], "threads": recipe.threads},
    }


__all__ = ["DataSection", "DistillSection", "EvalSection", "Recipe", "STAGE_CODE", "code_version", "load_recipe",
           "recipe_from_dict", "stage_key", "stage_settings"]
