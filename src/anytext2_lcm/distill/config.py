"""The training configuration: one nested tree of typed dataclasses, mirrored by a YAML file.

``anytext2-lcm distill --config FILE [key.sub=value ...]`` and ``anytext2-lcm train-teacher`` read a YAML file whose
sections are the fields of :class:`TrainConfig` (``configs/distill_tiny.yaml``, ``configs/distill_sd15.yaml`` are
complete examples)::

    method: lcm                 # lcm | pcm (distillation) | teacher (AnyText2's own objective)
    output_dir: runs/lcm
    model:      {teacher: path/to/converted, preset: sd15}
    data:       {json_paths: [...], image_size: 512, ...}   # anytext2_lcm.data.anyword.DataConfig
    lora:       {rank: 64, alpha: 64, targets: lcm}         # anytext2_lcm.lora.LoraSpec
    distill:    {guidance_scale_range: [7.0, 8.0], loss: huber, huber_c: 0.001, ...}
    pcm:        {num_phases: 4, convention: inference, cfg_free_teacher: false, empty_prompt_fraction: 0.1,
                 guided_student: false}
    teacher_training: {trainable: [writenet, embedding_manager, attnx]}
    decoder_training: {channels: 64, crop: 256, text_loss_weight: 4.0}   # method: decoder (train-decoder)
    optim:      {learning_rate: 1.0e-4, lr_scheduler: constant, lr_warmup_steps: 500, ...}
    train:      {max_steps: 1000, batch_size: 4, gradient_accumulation_steps: 1, mixed_precision: bf16, ...}
    checkpoint: {every_n_steps: 200, keep_last: 3, resume: latest}
    validation: {every_n_steps: 200, sampler: lcm, steps: [4], prompts: [...]}
    logging:    {tensorboard: true, progress_bar: true}

Every field has its meaning in the docstring below it. Validation happens in ``__post_init__`` of each section and in
:meth:`TrainConfig.__post_init__` (cross-section rules) and raises :class:`~anytext2_lcm.config.ConfigError` whose
message starts with the dotted field name (``train.batch_size=0: must be >= 1``). :func:`load_config` also checks
that the files a run needs exist (data, teacher, resume checkpoint). Nothing here imports a model, so an invalid
configuration fails in milliseconds, before anything is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MAX_SEED, PRESETS, ConfigError, _check, build_dataclass, check_image_size, is_seed
from ..data.anyword import DataConfig
from ..lora import LoraSpec
from ..defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT
from ..samplers.base import TIMESTEP_SPACINGS
from ..samplers.pcm import PCM_CONVENTIONS

METHODS = ("lcm", "pcm", "teacher", "vae", "ocr", "decoder")
"""Training objectives this trainer runs."""
TEACHER_METHODS = ("teacher", "vae", "ocr")
"""The methods that train the teacher itself (``anytext2-lcm train-teacher``): AnyText2's objective, and the
autoencoder and glyph recogniser that a teacher trained from nothing needs first."""
DISTILL_METHODS = ("lcm", "pcm")
"""The methods that distil a LoRA student from the frozen teacher."""
DECODER_METHOD = "decoder"
"""The method of ``anytext2-lcm train-decoder``: the model's VAE decoder distilled into a light decoder."""
MIXED_PRECISION = ("no", "fp16", "bf16")
LOSSES = ("huber", "l2")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit")
VALIDATION_SAMPLERS = ("lcm", "tcd", "pcm", "ddim")
TEACHER_TRAINABLE = ("writenet", "embedding_manager", "attnx", "unet")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite int or float (NaN and ±Inf are refused everywhere a number is expected)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelSection:
    """Where the teacher comes from."""

    teacher: str | None = None
    """Teacher weights: a model name ("testbed": the trained model that ships with the package; "tiny"/"sd15":
    random), a converted folder (``anytext2-lcm convert``; it carries its own architecture) or an official
    ``.ckpt`` / ``.safetensors`` in the original layout. null = a randomly initialised ``preset`` (tests, benchmarks,
    or the starting point of ``train-teacher``)."""
    preset: str = "sd15"
    """Architecture of a checkpoint file or of a random model: "sd15" (AnyText2) or "tiny" (tests)."""
    init: str = "default"
    """Random initialisation when ``teacher`` is null: "default" (PyTorch's, seeded by ``init_seed``: every layer
    non-zero, a useful random teacher) or "original" (AnyText2's zero-initialised control and output layers, the
    starting point for training a teacher from scratch)."""
    init_seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        _check(self.teacher is None or (isinstance(self.teacher, str) and self.teacher != ""), "model.teacher",
               self.teacher, "must be a path or null")
        _check(self.preset in PRESETS, "model.preset", self.preset, f"unknown preset (known: {sorted(PRESETS)})")
        _check(self.init in ("default", "original"), "model.init", self.init, "must be 'default' or 'original'")
        _check(is_seed(self.init_seed), "model.init_seed", self.init_seed, f"must be an integer in 0..{MAX_SEED}")


@dataclass(kw_only=True)
class DistillSection:
    """The consistency-distillation objective (LCM; shared by the phased variant)."""

    num_ddim_timesteps: int = 50
    """Points of the DDIM solver grid (N); the skipping interval is k = T / N (50 → k = 20, grid {19, 39, …, 999})."""
    timestep_spacing: str = "trailing"
    """Where the grid's points are: "trailing" (LCM / PCM: {k·i − 1}, from T − 1 = 999 down) or "leading" (the
    teacher's own N-step DDIM timesteps {k·i + 1}: N = 20 → {1, 51, …, 951}, so the student learns the trajectory of
    the teacher's 20-step run that it is compared with). Recorded in the adapter's sampling; N must be ≤ T / 2."""
    guidance_scale_range: tuple[float, float] = (7.0, 8.0)
    """Teacher CFG scale s in AnyText2's (Imagen) form, drawn per sample from U[low, high]; the LCM weight is
    w = s − 1. AnyText2 samples at 7.5–9, so the default is a narrow band around 7.5. [s, s] fixes it."""
    loss: str = "huber"
    """Consistency loss: "huber" (pseudo-Huber, the LCM-LoRA default) or "l2"."""
    huber_c: float = 0.001
    """The pseudo-Huber constant c."""
    text_loss_weight: float = 0.0
    """Extra loss weight λ inside the text regions: weight = 1 + λ·(latent cell touches a line's position)."""
    timestep_scaling: float = 10.0
    """LCM boundary-condition timestep scaling (c_skip, c_out are computed at timestep_scaling · t)."""
    sigma_data: float = 0.5
    """LCM boundary-condition σ_data."""
    a_prompt: str = DEFAULT_A_PROMPT
    """Added to every image caption of the conditional branch as ``caption + ", " + a_prompt`` (AnyText2 inference)."""
    n_prompt: str = DEFAULT_N_PROMPT
    """Image prompt of the unconditional branch (its text prompt is "")."""
    control_strength: float = 1.0
    """Scale of the WriteNet residuals (AnyText2's ``strength``)."""
    attnx_scale: float = 1.0
    """AttnX strength."""

    def __post_init__(self) -> None:
        _check(_is_int(self.num_ddim_timesteps) and self.num_ddim_timesteps >= 1, "distill.num_ddim_timesteps",
               self.num_ddim_timesteps, "must be an integer >= 1")
        _check(self.timestep_spacing in TIMESTEP_SPACINGS, "distill.timestep_spacing", self.timestep_spacing,
               f"must be one of {TIMESTEP_SPACINGS}")
        r = self.guidance_scale_range
        _check(isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_num(v) for v in r),
               "distill.guidance_scale_range", r, "must be [low, high] numbers")
        self.guidance_scale_range = (float(r[0]), float(r[1]))
        lo, hi = self.guidance_scale_range
        _check(lo <= hi, "distill.guidance_scale_range", r, "low must be <= high (the range is reversed)")
        _check(lo >= 1.0, "distill.guidance_scale_range", r,
               "scales must be >= 1 (Imagen form: 1 = no guidance; the LCM weight is w = s - 1)")
        _check(self.loss in LOSSES, "distill.loss", self.loss, f"must be one of {LOSSES}")
        _check(_is_num(self.huber_c) and self.huber_c > 0, "distill.huber_c", self.huber_c, "must be > 0")
        _check(_is_num(self.text_loss_weight) and self.text_loss_weight >= 0, "distill.text_loss_weight",
               self.text_loss_weight, "must be >= 0")
        _check(_is_num(self.timestep_scaling) and self.timestep_scaling > 0, "distill.timestep_scaling",
               self.timestep_scaling, "must be > 0")
        _check(_is_num(self.sigma_data) and self.sigma_data > 0, "distill.sigma_data", self.sigma_data, "must be > 0")
        _check(isinstance(self.a_prompt, str), "distill.a_prompt", self.a_prompt, "must be a string")
        _check(isinstance(self.n_prompt, str), "distill.n_prompt", self.n_prompt, "must be a string")
        _check(_is_num(self.control_strength) and self.control_strength >= 0, "distill.control_strength",
               self.control_strength, "must be >= 0")
        _check(_is_num(self.attnx_scale), "distill.attnx_scale", self.attnx_scale, "must be a number")


@dataclass(kw_only=True)
class PCMSection:
    """Phased consistency distillation (``method: pcm``; Wang et al. 2024, arXiv 2405.18407). Shares the solver grid,
    the guidance range, the loss and the prompts of ``distill``."""

    num_phases: int = 4
    """Phases M the ODE trajectory is split into; the student maps every point of a phase to the phase's lower edge
    and is sampled deterministically at M steps (or a divisor / multiple of M: ``--sampler pcm --num-phases M``)."""
    convention: str = "inference"
    """Where the phase edges are: "inference" (at the M-step LCM timesteps, 4 → 999, 759, 499, 259 → 0) or
    "official" (the PCM code's placement, 4 → 999, 739, 499, 239 → 0). The sampler must use the same one."""
    cfg_free_teacher: bool = False
    """true: the teacher runs without guidance (cond branch only, the official ``--not_apply_cfg_solver``) and a
    fraction of samples get empty prompts, so the student keeps the teacher's unguided ODE and is sampled with real
    CFG and negative prompts (``--cfg 7.5 --n-prompt ...``, 2 UNet passes per step). false: the teacher is guided
    with ``distill.guidance_scale_range`` like LCM and the student is sampled without CFG."""
    empty_prompt_fraction: float = 0.1
    """With ``cfg_free_teacher``: probability that a sample's prompts are replaced by empty ones (image prompt
    ``empty_image_prompt``, by default the negative prompt; text prompt ""; glyphs, positions and masked image kept,
    as in AnyText2's uncond branch) for the student, the teacher and the target alike, so that the uncond branch of
    CFG is learnt too. The official SD1.5 CFG-free example uses 0.15. Ignored without ``cfg_free_teacher``."""
    empty_image_prompt: str | None = None
    """Image prompt of a sample whose prompts were emptied. None (default): ``distill.n_prompt``, the negative prompt
    the student is sampled with, so the uncond branch it learns is the one CFG runs (AnyText2 always samples with a
    negative prompt). "" is the official PCM code's choice, for pipelines sampled with an empty negative prompt."""
    guided_student: bool = False
    """true (with the guided teacher): the student and its target are the CFG combination of the adapter-on
    network's cond and uncond branches at the teacher's drawn scale, so the student is trained as it is sampled —
    with real CFG (the teacher's own scale when ``distill.guidance_scale_range`` holds it, else the range's
    midpoint) and the negative prompt — and starts, at adapter zero, from the teacher's phased DDIM with CFG.
    Two student passes per sample. Not in the PCM paper; compared in ``benchmarks/text_quality.py``."""

    def __post_init__(self) -> None:
        _check(_is_int(self.num_phases) and 1 <= self.num_phases, "pcm.num_phases", self.num_phases,
               "must be an integer >= 1")
        _check(self.convention in PCM_CONVENTIONS, "pcm.convention", self.convention,
               f"must be one of {PCM_CONVENTIONS}")
        _check(isinstance(self.cfg_free_teacher, bool), "pcm.cfg_free_teacher", self.cfg_free_teacher,
               "must be true or false")
        _check(_is_num(self.empty_prompt_fraction) and 0.0 <= self.empty_prompt_fraction <= 1.0,
               "pcm.empty_prompt_fraction", self.empty_prompt_fraction, "must lie in [0, 1]")
        _check(self.empty_image_prompt is None or isinstance(self.empty_image_prompt, str), "pcm.empty_image_prompt",
               self.empty_image_prompt, "must be a string (or null: distill.n_prompt)")
        _check(isinstance(self.guided_student, bool), "pcm.guided_student", self.guided_student,
               "must be true or false")
        _check(not (self.guided_student and self.cfg_free_teacher), "pcm.guided_student", self.guided_student,
               "needs the guided teacher (pcm.cfg_free_teacher: false)")


@dataclass(kw_only=True)
class TeacherTrainingSection:
    """AnyText2's own objective (``method: teacher``): ε-MSE outside ``inv_mask``."""

    trainable: tuple[str, ...] = ("writenet", "embedding_manager", "attnx")
    """What trains (the original recipe: these three): "writenet" (``control_model``), "embedding_manager" (the
    text-embedding module incl. its font OCR), "attnx" (the UNet's attn1x/attn2x), and "unet" (the whole UNet, for a
    teacher trained from nothing: on top of a pretrained SD-1.5 the original keeps it frozen). Everything else (VAE,
    CLIP, the glyph OCR) is frozen."""
    text_loss_weight: float = 0.0
    """λ: the ε-MSE is weighted 1 + λ in latent cells that touch a text line (0: AnyText2's objective as is). Text
    covers a few percent of a small image, so a model trained from nothing learns the glyphs last without it."""
    empty_prompt_fraction: float = 0.0
    """Probability that a sample's image and text prompts are both replaced by "" (glyphs, positions and masked
    image kept: the unconditional branch of AnyText2's CFG). SD-1.5 learnt its unconditional branch in
    pretraining; a model trained from nothing needs this to be sampled with CFG (SD's recipe: 0.1)."""
    a_prompt_fraction: float = 0.0
    """Probability that ``distill.a_prompt`` is appended to a sample's image caption (``caption, a_prompt``), as
    generation does; a model trained from nothing then knows that prompt."""

    def __post_init__(self) -> None:
        _check(_is_num(self.text_loss_weight) and self.text_loss_weight >= 0, "teacher_training.text_loss_weight",
               self.text_loss_weight, "must be >= 0")
        for name in ("empty_prompt_fraction", "a_prompt_fraction"):
            v = getattr(self, name)
            _check(_is_num(v) and 0.0 <= v <= 1.0, f"teacher_training.{name}", v, "must lie in [0, 1]")
        t = self.trainable
        if isinstance(t, str):
            t = (t,)
        _check(isinstance(t, (list, tuple)) and len(t) >= 1, "teacher_training.trainable", self.trainable,
               f"must be a non-empty list of {TEACHER_TRAINABLE}")
        bad = [x for x in t if x not in TEACHER_TRAINABLE]
        _check(not bad, "teacher_training.trainable", self.trainable, f"unknown part(s) {bad}; known: "
               f"{TEACHER_TRAINABLE}")
        self.trainable = tuple(t)


@dataclass(kw_only=True)
class OCRLossSection:
    """AnyText's text-aware loss terms (``distill.ocr_loss``), off by default: the model's frozen glyph recogniser
    reads every line of the decoded x̂0. ``method: teacher``: x̂0 from the predicted ε against the training image's
    latent; ``lcm``/``pcm``: the student's x̂0 against ``reference``."""

    alpha: float = 0.0
    """Weight of the OCR perceptual term: mean (neck(pred) − neck(reference))² (AnyText's ``loss_alpha``, 0.003)."""
    beta: float = 0.0
    """Weight of the CTC term: the recogniser's CTC loss of the predicted lines against their texts
    (AnyText's ``loss_beta``)."""
    latin_weight: float = 1.0
    """Extra weight of Latin lines (AnyText's ``latin_weight``)."""
    step_weight: bool = True
    """Weight each sample's lines by ᾱ_t of its timestep (AnyText's ``with_step_weight``)."""
    reference: str = "target"
    """Distillation: "target" (LCM: the consistency target, the student's own no-grad estimate one teacher step
    later) or "teacher" (the guided teacher's x̂0 at the student's point; PCM always uses this)."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "latin_weight"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0 and v == v and v != float("inf"), f"ocr_loss.{name}", v,
                   "must be a finite number >= 0")
        _check(isinstance(self.step_weight, bool), "ocr_loss.step_weight", self.step_weight, "must be true or false")
        _check(self.reference in ("target", "teacher"), "ocr_loss.reference", self.reference,
               "must be 'target' or 'teacher'")

    @property
    def active(self) -> bool:
        return bool(self.alpha or self.beta)


@dataclass(kw_only=True)
class AutoencoderSection:
    """The autoencoder objective (``method: vae``): the model's VAE trained as a deterministic autoencoder on the
    data's images (L1 + L2 reconstruction of the posterior mean), then calibrated for diffusion (``distill.vae``)."""

    crop: int = 64
    """Train on random crops of this side, aligned to the latent grid (0: whole images). The networks are
    convolutional, so the result is used on whole images; crops cost a fraction of the time."""
    text_loss_weight: float = 4.0
    """λ: the reconstruction error is weighted 1 + λ inside the text lines (their positions)."""
    posterior_std: float = 0.01
    """Posterior standard deviation after calibration, relative to the latent standard deviation."""
    calibration_samples: int = 256
    """Training images whose latents set the scale (scale_factor × latent has unit standard deviation)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.crop) and self.crop >= 0, "vae_training.crop", self.crop, "must be an integer >= 0")
        _check(_is_num(self.text_loss_weight) and self.text_loss_weight >= 0, "vae_training.text_loss_weight",
               self.text_loss_weight, "must be >= 0")
        _check(_is_num(self.posterior_std) and self.posterior_std > 0, "vae_training.posterior_std",
               self.posterior_std, "must be > 0")
        _check(_is_int(self.calibration_samples) and self.calibration_samples >= 1,
               "vae_training.calibration_samples", self.calibration_samples, "must be an integer >= 1")


def _generated_run(run: str) -> int | None:
    """The step count of a ``decoder_training.generated_by`` entry: 0 for "teacher", K for "student@K" (K >= 1),
    None when it is neither."""
    if run == "teacher":
        return 0
    head, _, k = run.partition("@")
    return int(k) if head == "student" and k.isdigit() and int(k) >= 1 else None


@dataclass(kw_only=True)
class DecoderTrainingSection:
    """The light-decoder objective (``method: decoder``, ``anytext2-lcm train-decoder``): the model's own VAE decoder
    distilled into diffusers' ``AutoencoderTiny`` decoder (``distill.decoder``); the rest of the model is frozen."""

    channels: int = 64
    """Width of every level of the light decoder (TAESD: 64; about 1.2 M parameters for an 8x latent factor)."""
    crop: int = 256
    """Train on random crops of this side, aligned to the latent grid (0, or at least the image side: whole images).
    The decoder is convolutional, so it is used on whole images; crops cost a fraction of the time."""
    text_loss_weight: float = 4.0
    """λ: the error to the full decoder's image is weighted 1 + λ inside the text lines (their positions)."""
    report_samples: int = 16
    """Images of the data whose light and full decodes are compared (PSNR) in ``OUTPUT/light_decoder.json``."""
    cost_repeats: int = 3
    """Timed decodes per decoder (interleaved, median) for the cost in ``OUTPUT/light_decoder.json``."""
    generated: int = 0
    """Latents the model samples itself before training (0: none), from the prompts and line positions of the first
    rows of the data: a decoder trained on encoded images alone meets latents it never saw when it decodes what a
    sampler returns. Kept in ``OUTPUT/generated_latents*.safetensors``, reused on resume."""
    generated_by: list = field(default_factory=lambda: ["teacher"])
    """Who samples the generated latents, cycled over them: "teacher" (20-step DDIM + CFG, adapter off) or
    "student@K" (the ``generated_lora`` student at K steps, with the sampling its adapter records)."""
    generated_lora: str | None = None
    """The student adapter of the "student@K" entries (a file or folder ``generate --lora`` reads)."""
    generated_fraction: float = 0.5
    """Share of the samples of each batch whose latent is a crop of a generated latent instead of an encoded image
    (the target is always the full decoder's image of the latent the light decoder sees)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.channels) and self.channels >= 8, "decoder_training.channels", self.channels,
               "must be an integer >= 8")
        _check(_is_int(self.generated) and self.generated >= 0, "decoder_training.generated", self.generated,
               "must be an integer >= 0")
        _check(_is_num(self.generated_fraction) and 0 <= self.generated_fraction <= 1,
               "decoder_training.generated_fraction", self.generated_fraction, "must lie in [0, 1]")
        _check(isinstance(self.generated_by, list) and bool(self.generated_by)
               and all(isinstance(r, str) and _generated_run(r) is not None for r in self.generated_by),
               "decoder_training.generated_by", self.generated_by,
               'must be a non-empty list of "teacher" and "student@K" (K >= 1)')
        if any(r != "teacher" for r in self.generated_by) and self.generated and not self.generated_lora:
            raise ConfigError(f"decoder_training.generated_by={self.generated_by!r}: the student entries need "
                              f"decoder_training.generated_lora (the adapter that samples them)")
        _check(_is_int(self.crop) and self.crop >= 0, "decoder_training.crop", self.crop, "must be an integer >= 0")
        _check(_is_num(self.text_loss_weight) and self.text_loss_weight >= 0, "decoder_training.text_loss_weight",
               self.text_loss_weight, "must be >= 0")
        for name in ("report_samples", "cost_repeats"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"decoder_training.{name}", v, "must be an integer >= 1")


@dataclass(kw_only=True)
class OptimSection:
    """Optimizer and learning-rate schedule (steps count optimizer steps)."""

    optimizer: str = "adamw"
    """"adamw" (torch) or "adamw8bit" (bitsandbytes, which must be installed)."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    adam_epsilon: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: str = "constant_with_warmup"
    """Schedule (diffusers' ``get_scheduler``): constant, constant_with_warmup, linear, cosine,
    cosine_with_restarts, polynomial."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule_steps: int | None = None
    """Optimizer steps the learning-rate schedule spans (null: ``train.max_steps``). Longer than ``max_steps``, a
    run stops part-way through its schedule: the same weights as a longer run's checkpoint at that step."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping; the norm is still measured and logged)."""

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if self.optimizer == "adamw8bit":
            _check(importlib.util.find_spec("bitsandbytes") is not None, "optim.optimizer", self.optimizer,
                   "needs the bitsandbytes package (pip install bitsandbytes), or use 'adamw'")
        _check(_is_num(self.learning_rate) and self.learning_rate > 0, "optim.learning_rate", self.learning_rate,
               "must be > 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 <= v < 1, f"optim.{name}", v, "must lie in [0, 1)")
        _check(_is_num(self.adam_epsilon) and self.adam_epsilon > 0, "optim.adam_epsilon", self.adam_epsilon,
               "must be > 0")
        _check(self.lr_schedule_steps is None or (_is_int(self.lr_schedule_steps) and self.lr_schedule_steps >= 1),
               "optim.lr_schedule_steps", self.lr_schedule_steps, "must be a whole number >= 1, or null")
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
               "must be >= 0")
        _check(self.lr_scheduler in LR_SCHEDULERS, "optim.lr_scheduler", self.lr_scheduler,
               f"must be one of {LR_SCHEDULERS}")
        _check(_is_int(self.lr_warmup_steps) and self.lr_warmup_steps >= 0, "optim.lr_warmup_steps",
               self.lr_warmup_steps, "must be an integer >= 0")
        _check(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
               "optim.max_grad_norm", self.max_grad_norm, "must be > 0 or null")


@dataclass(kw_only=True)
class TrainSection:
    """The loop: length, batch, precision, reliability limits."""

    max_steps: int = 1000
    """Optimizer steps to train for (a step that is skipped for non-finite values counts)."""
    batch_size: int = 4
    """Samples per micro-batch and process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = batch_size × accumulation × processes."""
    mixed_precision: str = "no"
    """"no" (fp32), "bf16" or "fp16" autocast; trainable weights stay fp32. On a CPU fp16 is mapped to fp32 with a
    warning (it is a no-op or ~40× slower there)."""
    cast_frozen: bool = False
    """With bf16/fp16: store the frozen UNet, WriteNet, CLIP and OCR weights in that dtype (halves their memory).
    The VAE and the trainable weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute UNet block activations in the backward pass (``torch.utils.checkpoint``): less memory, ~30% slower."""
    seed: int = 0
    """Training seed: sample i of epoch e draws its timestep, guidance, noise and VAE samples from
    SeedSequence([seed, e, i]), so results do not depend on the rank or worker that processes it."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    max_consecutive_nonfinite: int = 10
    """Stop the run after this many optimizer steps in a row were skipped for a non-finite loss or gradient."""
    ddp_find_unused_parameters: bool = False
    """Passed to DistributedDataParallel (needed only when some trainable weight gets no gradient)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_consecutive_nonfinite"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"train.{name}", v, "must be an integer >= 1")
        _check(self.mixed_precision in MIXED_PRECISION, "train.mixed_precision", self.mixed_precision,
               f"must be one of {MIXED_PRECISION}")
        _check(is_seed(self.seed), "train.seed", self.seed, f"must be an integer in 0..{MAX_SEED}")
        _check(_is_int(self.num_workers) and self.num_workers >= 0, "train.num_workers", self.num_workers,
               "must be an integer >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "must be auto, cpu or cuda")


@dataclass(kw_only=True)
class CheckpointSection:
    """Training checkpoints (``OUTPUT/checkpoints/checkpoint-NNNNNN``, see ``distill.checkpoints``)."""

    every_n_steps: int = 500
    """Save every this many optimizer steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str | None = None
    """null (start fresh; refuses an output_dir that already holds checkpoints), "latest" (the newest checkpoint
    that verifies; a fresh start only when there is no checkpoint at all: when checkpoints exist but none verifies,
    the run stops (exit 2) naming each one and why), "fresh" (start from step 0 even though checkpoints exist: they
    are moved to ``checkpoints/previous-<time>/``, never deleted) or a checkpoint folder."""

    init_adapter: str | None = None
    """A LoRA adapter (PEFT folder or ``.safetensors``, e.g. another run's ``OUTPUT/adapter``) whose weights start a
    fresh run instead of PEFT's initialisation (fine-tuning it, or moving a run to another teacher or data); the
    optimizer, schedule and data position start anew. Its modules and ranks must be this run's ``lora``. Not used
    when the run resumes from a checkpoint (``--init-adapter``)."""

    def __post_init__(self) -> None:
        _check(self.init_adapter is None or (isinstance(self.init_adapter, str) and self.init_adapter != ""),
               "checkpoint.init_adapter", self.init_adapter, "must be an adapter path or null")
        _check(_is_int(self.every_n_steps) and self.every_n_steps >= 0, "checkpoint.every_n_steps",
               self.every_n_steps, "must be an integer >= 0")
        _check(_is_int(self.keep_last) and self.keep_last >= 1, "checkpoint.keep_last", self.keep_last,
               "must be an integer >= 1 (the rotation limit)")
        _check(self.resume is None or (isinstance(self.resume, str) and self.resume != ""), "checkpoint.resume",
               self.resume, "must be null, 'latest', 'fresh' or a checkpoint folder")


@dataclass(kw_only=True)
class ValidationPrompt:
    """One validation image: a prompt with "quoted" lines and one box per line."""

    prompt: str
    """Image prompt; each "quoted" span is a text line."""
    positions: list = field(default_factory=list)
    """One box [x0, y0, x1, y1] or polygon [[x, y], ...] per line, in pixels of the validation image."""

    def __post_init__(self) -> None:
        _check(isinstance(self.prompt, str) and self.prompt.strip() != "", "validation.prompts.prompt", self.prompt,
               "must be a non-empty string")
        _check(isinstance(self.positions, list), "validation.prompts.positions", self.positions, "must be a list")


@dataclass(kw_only=True)
class ValidationSection:
    """Validation images rendered by the student at the exact inference timesteps, logged to TensorBoard."""

    every_n_steps: int = 0
    """Render every this many optimizer steps and at the end (0: never)."""
    sampler: str = "lcm"
    """Sampler of the student: lcm, tcd, pcm (a teacher run: ddim)."""
    steps: tuple[int, ...] = (4,)
    """Step counts to render (lcm 4 → timesteps [999, 759, 499, 259])."""
    cfg_scale: float = 1.0
    """CFG scale at validation (1: the distilled student needs none)."""
    seed: int = 100
    """Seed of every validation image (AnyText's benchmark seed)."""
    image_size: int = 512
    """Side of the validation images (a multiple of 64)."""
    prompts: list = field(default_factory=list)
    """ValidationPrompt entries; empty: two built-in prompts."""

    def __post_init__(self) -> None:
        _check(_is_int(self.every_n_steps) and self.every_n_steps >= 0, "validation.every_n_steps",
               self.every_n_steps, "must be an integer >= 0")
        _check(self.sampler in VALIDATION_SAMPLERS, "validation.sampler", self.sampler,
               f"unknown sampler (known: {VALIDATION_SAMPLERS})")
        steps = (self.steps,) if _is_int(self.steps) else self.steps
        _check(isinstance(steps, (list, tuple)) and len(steps) >= 1 and all(_is_int(s) and s >= 1 for s in steps),
               "validation.steps", self.steps, "must be a non-empty list of integers >= 1")
        self.steps = tuple(steps)
        _check(_is_num(self.cfg_scale) and self.cfg_scale > 0, "validation.cfg_scale", self.cfg_scale, "must be > 0")
        _check(is_seed(self.seed), "validation.seed", self.seed, f"must be an integer in 0..{MAX_SEED}")
        check_image_size(self.image_size, "validation.image_size")
        _check(isinstance(self.prompts, list), "validation.prompts", self.prompts, "must be a list")
        self.prompts = [p if isinstance(p, ValidationPrompt) else build_dataclass(ValidationPrompt, p, "validation.prompts")
                        for p in self.prompts]


@dataclass(kw_only=True)
class LoggingSection:
    """Scalars (TensorBoard, ``OUTPUT/metrics.jsonl``) and the console."""

    tensorboard: bool = True
    """Write TensorBoard events to ``OUTPUT/logs`` (loss, lr, grad norm, skipped samples, steps/s, images)."""
    progress_bar: bool = True
    """A tqdm progress bar on the main process."""
    log_every_n_steps: int = 1
    """Scalars every this many optimizer steps."""

    def __post_init__(self) -> None:
        _check(_is_int(self.log_every_n_steps) and self.log_every_n_steps >= 1, "logging.log_every_n_steps",
               self.log_every_n_steps, "must be an integer >= 1")


@dataclass(kw_only=True)
class DebugSection:
    """Fault injection for the reliability tests. Leave empty in real runs."""

    nonfinite_loss_at_steps: tuple[int, ...] = ()
    """Optimizer steps (1-based) whose loss is replaced by NaN on every rank."""
    sleep_per_step: float = 0.0
    """Seconds to sleep after each micro-step (gives signal tests a window)."""

    def __post_init__(self) -> None:
        v = self.nonfinite_loss_at_steps
        _check(isinstance(v, (list, tuple)) and all(_is_int(s) and s >= 1 for s in v), "debug.nonfinite_loss_at_steps",
               v, "must be a list of integers >= 1")
        self.nonfinite_loss_at_steps = tuple(v)
        _check(_is_num(self.sleep_per_step) and self.sleep_per_step >= 0, "debug.sleep_per_step", self.sleep_per_step,
               "must be >= 0")


def _check_output_dir(path: str) -> None:
    """``output_dir`` must be a folder or creatable as one: not an existing file, not below a file, writable."""
    p = Path(path)
    _check(not (p.exists() and not p.is_dir()), "output_dir", path, "is an existing file, not a folder")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _check(parent.is_dir(), "output_dir", path, f"cannot be created: {parent} is a file")
    _check(os.access(parent, os.W_OK | os.X_OK), "output_dir", path, f"{parent} is not writable")


# ---------------------------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainConfig:
    """A whole training run (``distill`` or ``train-teacher``)."""

    method: str = "lcm"
    """Objective: "lcm" (LCM-LoRA distillation from the frozen teacher), "pcm" (phased consistency distillation,
    section ``pcm``), "teacher" (AnyText2's own objective), "vae" (the autoencoder, section ``vae_training``), "ocr"
    (the glyph recogniser, CTC; ``distill.recognizer``) or "decoder" (a light decoder distilled from the VAE
    decoder, section ``decoder_training``; ``anytext2-lcm train-decoder``)."""
    output_dir: str = "runs/distill"
    """Run folder: checkpoints/, logs/ (TensorBoard), metrics.jsonl, validation/, config.yaml and the results
    (adapter/ + adapter.safetensors; a teacher run: model/)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    """The data reader (``anytext2_lcm.data.anyword.DataConfig``)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The student adapter (``anytext2_lcm.lora.LoraSpec``); unused by ``method: teacher``."""
    distill: DistillSection = field(default_factory=DistillSection)
    pcm: PCMSection = field(default_factory=PCMSection)
    teacher_training: TeacherTrainingSection = field(default_factory=TeacherTrainingSection)
    vae_training: AutoencoderSection = field(default_factory=AutoencoderSection)
    ocr_loss: OCRLossSection = field(default_factory=OCRLossSection)
    decoder_training: DecoderTrainingSection = field(default_factory=DecoderTrainingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", self.method, f"unknown method (known: {METHODS})")
        _check(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir", self.output_dir,
               "must be a folder path")
        _check_output_dir(self.output_dir)
        _check(len(self.data.json_paths) >= 1 or bool(self.data.index or self.data.shards), "data.json_paths",
               list(self.data.json_paths), "give at least one AnyWord annotation file (or data.index, data.shards)")
        _check(self.checkpoint.init_adapter is None or self.method in DISTILL_METHODS, "checkpoint.init_adapter",
               self.checkpoint.init_adapter, f"starts a LoRA student: methods {DISTILL_METHODS} only")
        T = 1000  # every preset's diffusion.timesteps; the grid must tile it
        n = self.distill.num_ddim_timesteps
        _check(n <= T and T % n == 0, "distill.num_ddim_timesteps", n, f"must divide the {T} training timesteps")
        _check(self.distill.timestep_spacing == "trailing" or 2 * n <= T, "distill.num_ddim_timesteps", n,
               f"the leading grid (distill.timestep_spacing) needs at most {T // 2} points")
        if self.method == "pcm":
            _check(self.pcm.num_phases <= n, "pcm.num_phases", self.pcm.num_phases,
                   f"must not exceed distill.num_ddim_timesteps ({n}): every phase needs a grid point")
            _check(not self.ocr_loss.active or self.ocr_loss.reference == "teacher", "ocr_loss.reference",
                   self.ocr_loss.reference, "PCM's target is a phase edge, not an x0: use 'teacher'")
        _check(not self.ocr_loss.active or self.method in ("teacher", "lcm", "pcm"), "ocr_loss.alpha",
               self.ocr_loss.alpha, f"the OCR loss applies to teacher, lcm and pcm, not {self.method!r}")
        if self.method in DISTILL_METHODS:
            _check(not self.lora.train_embedding_manager, "lora.train_embedding_manager",
                   self.lora.train_embedding_manager,
                   "must be false for distillation: the teacher shares the embedding manager, training it would "
                   "change the teacher")
            _check(self.validation.sampler != "ddim" or self.validation.every_n_steps == 0, "validation.sampler",
                   self.validation.sampler, "a distilled student is validated with lcm, tcd or pcm")
        elif self.method == "teacher":
            _check(self.validation.sampler == "ddim" or self.validation.every_n_steps == 0, "validation.sampler",
                   self.validation.sampler, "a teacher is validated with ddim (and e.g. steps [20], cfg_scale 7.5)")
        elif self.method == DECODER_METHOD:
            _check(self.validation.every_n_steps == 0, "validation.every_n_steps", self.validation.every_n_steps,
                   "must be 0 for method decoder (its report compares the decoders at the end of the run)")
        _check(self.optim.lr_warmup_steps <= self.train.max_steps or self.optim.lr_scheduler == "constant",
               "optim.lr_warmup_steps", self.optim.lr_warmup_steps,
               f"must not exceed train.max_steps ({self.train.max_steps})")

    # ---- views ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain data (lists instead of tuples), the form written to ``OUTPUT/config.yaml``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def structure(self) -> dict:
        """The settings a checkpoint can only be resumed under (others may change between runs).

        Changing these alters the trained tensors' shapes or meaning, or the data position's meaning.
        """
        s: dict[str, Any] = {
            "method": self.method,
            "model.preset": self.model.preset,
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train.seed": self.train.seed,
            "data.image_size": self.data.image_size,
            "data.max_lines": self.data.max_lines,
            "data.seed": self.data.seed,
        }
        if self.model.teacher is None:
            s.update({"model.init": self.model.init, "model.init_seed": self.model.init_seed})
        if self.method == "teacher":
            s["teacher_training.trainable"] = list(self.teacher_training.trainable)
        elif self.method == "vae":
            s["vae_training.crop"] = self.vae_training.crop
        elif self.method == DECODER_METHOD:
            s.update({"decoder_training.channels": self.decoder_training.channels,
                      "decoder_training.crop": self.decoder_training.crop})
        else:
            s.update({"lora.rank": self.lora.rank, "lora.alpha": float(self.lora.alpha),
                      "lora.targets": self.lora.targets if isinstance(self.lora.targets, str)
                      else list(self.lora.targets), "lora.zero_convs": self.lora.zero_convs})
        if self.method == "pcm":  # the phases give the trained adapter its meaning (where it jumps to)
            s.update({"pcm.num_phases": self.pcm.num_phases, "pcm.convention": self.pcm.convention})
        return s

    def fingerprint(self) -> str:
        """sha256 of the resolved configuration (for logs and the run folder)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Building from YAML / dicts, overrides
# ---------------------------------------------------------------------------------------------------------------


def config_from_dict(d: dict) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data (a parsed YAML document)."""
    return build_dataclass(TrainConfig, d, "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` → (["train", "max_steps"], 10); the value is parsed as YAML (``[7, 8]``, ``null``)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a plain-data config in place (unknown keys are caught by the build)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = d
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: {p} is not a section")
            node = nxt
        node[path[-1]] = value
    return d


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return doc


def check_paths(cfg: TrainConfig) -> None:
    """The files a run needs exist: data annotation files, the teacher, an explicit resume checkpoint."""
    for p in cfg.data.json_paths:
        _check(Path(p).is_file(), "data.json_paths", p, "file not found")
    if cfg.data.index:
        _check(Path(cfg.data.index).is_file(), "data.index", cfg.data.index, "file not found (write it with "
               "`anytext2-lcm index-data`)")
    if cfg.data.shards:
        _check((Path(cfg.data.shards) / "shards.json").is_file(), "data.shards", cfg.data.shards,
               "no shards.json in that folder (write shards with `anytext2-lcm make-shards`)")
    if cfg.method == DECODER_METHOD and cfg.decoder_training.generated_lora and cfg.decoder_training.generated:
        _check(Path(cfg.decoder_training.generated_lora).exists(), "decoder_training.generated_lora",
               cfg.decoder_training.generated_lora, "adapter not found")
    if cfg.checkpoint.init_adapter:
        _check(Path(cfg.checkpoint.init_adapter).exists(), "checkpoint.init_adapter", cfg.checkpoint.init_adapter,
               "adapter not found")
    if cfg.model.teacher is not None:
        from ..factory import MODEL_NAMES

        _check(cfg.model.teacher in MODEL_NAMES or Path(cfg.model.teacher).exists(), "model.teacher",
               cfg.model.teacher, f"file or folder not found (or a model name: {', '.join(MODEL_NAMES)})")
    r = cfg.checkpoint.resume
    if r is not None and r not in ("latest", "fresh"):
        _check(Path(r).is_dir(), "checkpoint.resume", r, "checkpoint folder not found (or use 'latest' or 'fresh')")
    if isinstance(cfg.lora.targets, str) and cfg.lora.targets.endswith(".json"):
        _check(Path(cfg.lora.targets).is_file(), "lora.targets", cfg.lora.targets, "targets file not found")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None, check_files: bool = True,
                method: str | tuple[str, ...] | None = None) -> TrainConfig:
    """Read, override, build and validate a configuration; no model is built.

    Args:
        path: YAML file (None: start from ``base`` or the defaults).
        overrides: ``key.sub=value`` strings applied after the file.
        base: plain-data config to start from when ``path`` is None.
        check_files: also check that data, teacher and resume paths exist (:func:`check_paths`).
        method: force ``method``; a tuple: the method must be one of them, the first is the default (the
            ``train-teacher`` command passes :data:`TEACHER_METHODS`).
    Raises:
        ConfigError: the first invalid value, named by its dotted field.
        FileNotFoundError: the YAML file does not exist.
    """
    d = read_yaml(path) if path is not None else json.loads(json.dumps(base or {}))
    if method is not None:
        allowed = (method,) if isinstance(method, str) else tuple(method)
        if d.get("method", allowed[0]) not in allowed:
            raise ConfigError(f"method={d['method']!r}: this command trains {' or '.join(map(repr, allowed))}")
        d["method"] = d.get("method", allowed[0])
    apply_overrides(d, overrides or [])
    cfg = config_from_dict(d)
    if check_files:
        check_paths(cfg)
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
