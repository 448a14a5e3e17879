"""Teacher training (``anytext2-lcm train-teacher``): AnyText2's own objective and trainable set.

As the original ``ControlLDM`` training (``reference/anytext2.md`` §d): x0 = scale_factor × VAE posterior sample,
t ~ U{0..T−1}, ε ~ N(0, I), x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, and the loss is the per-element ε-MSE multiplied by
(1 − inv_mask) resized to the latent grid (nearest), averaged over everything. The conditioning is the training
caption (no added prompt) for the UNet and the text caption with ``*`` placeholders for the WriteNet; the line
embeddings, the text context, the WriteNet residuals and ε all carry gradients.

What trains (``teacher_training.trainable``; the original recipe: the first three): the WriteNet (``control_model``),
the text-embedding module (``embedding_manager``, including its font OCR, whose BatchNorms then train as well), the
AttnX layers of the UNet (``attn1x``/``attn2x``) and, for a model trained from nothing (the ``testbed``), the whole
UNet. The VAE, CLIP and the glyph OCR stay frozen and in eval mode. ``teacher_training.text_loss_weight`` λ weights
the ε-MSE 1 + λ in the latent cells that touch a text line (0: the original objective).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import save_converted
from ..samplers.schedule import NoiseSchedule
from .batch import (Method, StepOutput, TrainBatch, draw_uniform_timesteps, randn_per_sample, text_weight_map,
                    train_modules, train_only)
from .ocr_loss import ocr_text_loss
from .solver import predicted_original_sample

PART_PREFIXES = {"writenet": ("control_model.",), "embedding_manager": ("embedding_manager.",),
                 "unet": ("model.diffusion_model.",)}
UNUSED = ("embedding_manager.font_predictor.head.",)
"""Trainable in the original but never in the graph: the font OCR's CTC head (the style embedding reads the neck).
AdamW skips a parameter without gradient, so freezing it changes nothing, and DDP then needs no unused-parameter
search."""


def is_attnx(name: str) -> bool:
    return name.startswith("model.diffusion_model.") and (".attn1x." in name or ".attn2x." in name)


class TeacherNet(nn.Module):
    """Conditioning and denoising with gradients, as one module for DistributedDataParallel.

    ``forward(x_t, t, text_info, img_prompts, text_prompts)`` → ε (B, 4, h, w).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, text_info, img_prompts, text_prompts, strength=1.0, attnx_scale=1.0):
        m = self.model
        lines = m.line_embeddings(text_info)
        c = m.encode_conditions(img_prompts, text_prompts, lines)
        control = m.control(c.text_context, text_info)
        return m.denoise(x_t, t, c.image_context, control, strength, attnx_scale)


def training_prompts(tb: TrainBatch, empty_fraction: float = 0.0, a_prompt: str = "",
                     a_prompt_fraction: float = 0.0) -> tuple[list[str], list[str]]:
    """The image and text prompts of each sample: its captions, both replaced by "" with probability
    ``empty_fraction`` (the unconditional branch), else ``caption, a_prompt`` with probability ``a_prompt_fraction``
    (the form generation uses, ``pipeline.image_prompt``). Each fraction above 0 draws one uniform number per sample
    from the sample's generator, in that order; at 0 nothing is drawn."""
    from ..pipeline import image_prompt

    img, text = list(tb.img_captions), list(tb.text_captions)
    for i, g in enumerate(tb.gens):
        empty = empty_fraction > 0 and float(torch.rand((), generator=g)) < empty_fraction
        added = a_prompt_fraction > 0 and float(torch.rand((), generator=g)) < a_prompt_fraction
        if empty:
            img[i], text[i] = "", ""
        elif added:
            img[i] = image_prompt(img[i], a_prompt)
    return img, text


def teacher_step(net: nn.Module, tb: TrainBatch, schedule: NoiseSchedule, strength: float = 1.0,
                 attnx_scale: float = 1.0, text_loss_weight: float = 0.0, empty_prompt_fraction: float = 0.0,
                 a_prompt: str = "", a_prompt_fraction: float = 0.0, x0_term=None) -> StepOutput:
    """AnyText2's ε-MSE masked by ``inv_mask`` for one micro-batch (each sample draws t, then ε, then its prompt
    choices (:func:`training_prompts`) from its generator), weighted 1 + ``text_loss_weight`` in the latent cells of
    the text lines (:func:`~.batch.text_weight_map`). ``x0_term(x̂0, x0, t) → (loss, logs)``: a term added on the
    x̂0 the predicted ε implies (the OCR loss, ``distill.ocr_loss``).

    Returns:
        ``StepOutput`` with the loss and, in ``tensors``: t, noise, eps, mask (B, 1, h, w).
    """
    x0 = tb.latents
    t = draw_uniform_timesteps(tb.gens, schedule.num_timesteps, x0.device)
    noise = randn_per_sample(tb.gens, tuple(x0.shape[1:]), x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    img_prompts, text_prompts = training_prompts(tb, empty_prompt_fraction, a_prompt, a_prompt_fraction)
    eps = net(x_t, t, tb.text_info, img_prompts, text_prompts, strength, attnx_scale)
    keep = 1.0 - F.interpolate(tb.inv_mask.float(), size=tuple(x0.shape[-2:]), mode="nearest")
    weight = text_weight_map(tb.hint, tuple(x0.shape[-2:]), text_loss_weight)
    if weight is not None:
        keep = keep * weight
    loss = ((eps.float() - noise) ** 2 * keep).mean()
    logs = {"t": float(t.float().mean())}
    if x0_term is not None:
        extra, extra_logs = x0_term(predicted_original_sample(eps.float(), x_t, t, schedule), x0, t)
        loss = loss + extra
        logs.update(extra_logs)
    return StepOutput(loss, logs,
                      {"t": t, "noise": noise, "eps": eps.detach(), "mask": keep})


class TeacherMethod(Method):
    """Train AnyText2's own trainable set with its own objective; the result is a converted model folder."""

    name = "teacher"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.schedule = None

    def _trains(self, name: str) -> bool:
        parts = self.cfg.teacher_training.trainable
        if name.startswith(UNUSED):
            return False
        if "attnx" in parts and is_attnx(name):
            return True
        return any(name.startswith(p) for part in parts for p in PART_PREFIXES.get(part, ()))

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        self.schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
        return train_only(model, self._trains)

    def set_train_mode(self, model: nn.Module) -> None:
        parts = self.cfg.teacher_training.trainable
        named = {"writenet": model.control_model, "embedding_manager": model.embedding_manager, "unet": model.unet}
        train_modules(model, *(m for part, m in named.items() if part in parts))

    def network(self, model: nn.Module) -> nn.Module:
        return TeacherNet(model)

    def step(self, net: nn.Module, model: nn.Module, tb: TrainBatch) -> StepOutput:
        d, tt, o = self.cfg.distill, self.cfg.teacher_training, self.cfg.ocr_loss
        term = None
        if o.active:
            def term(x0_pred, x0, t):
                return ocr_text_loss(model, x0_pred, x0, tb.text_info, tb.texts, tb.languages, t, o)
        return teacher_step(net, tb, self.schedule, d.control_strength, d.attnx_scale, tt.text_loss_weight,
                            tt.empty_prompt_fraction, d.a_prompt, tt.a_prompt_fraction, term)

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        return [save_converted(model, output_dir / "model", extra={"trained_by": "anytext2-lcm train-teacher"})]

    def frozen_cast_prefixes(self) -> tuple[str, ...]:
        return ("cond_stage_model.",) if "unet" in self.cfg.teacher_training.trainable else \
            ("model.diffusion_model.", "cond_stage_model.")
