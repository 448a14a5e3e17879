"""Teacher training (``anytext2-lcm train-teacher``): AnyText2's own objective and trainable set.

As the original ``ControlLDM`` training (``reference/anytext2.md`` §d): x0 = scale_factor × VAE posterior sample,
t ~ U{0..T−1}, ε ~ N(0, I), x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, and the loss is the per-element ε-MSE multiplied by
(1 − inv_mask) resized to the latent grid (nearest), averaged over everything. The conditioning is the training
caption (no added prompt) for the UNet and the text caption with ``*`` placeholders for the WriteNet; the line
embeddings, the text context, the WriteNet residuals and ε all carry gradients.

What trains (``teacher_training.trainable``; the original recipe: all three): the WriteNet (``control_model``), the
text-embedding module (``embedding_manager``, including its font OCR, whose BatchNorms then train as well) and the
AttnX layers of the UNet (``attn1x``/``attn2x``). The UNet base, VAE, CLIP and the glyph OCR stay frozen and in
eval mode. Besides reproducing AnyText2's recipe, this makes small teachers on synthetic data for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import save_converted
from ..samplers.schedule import NoiseSchedule
from .batch import Method, StepOutput, TrainBatch, draw_uniform_timesteps, randn_per_sample

PART_PREFIXES = {"writenet": ("control_model.",), "embedding_manager": ("embedding_manager.",)}
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


def teacher_step(net: nn.Module, tb: TrainBatch, schedule: NoiseSchedule, strength: float = 1.0,
                 attnx_scale: float = 1.0) -> StepOutput:
    """AnyText2's ε-MSE masked by ``inv_mask`` for one micro-batch (each sample draws t, then ε, from its generator).

    Returns:
        ``StepOutput`` with the loss and, in ``tensors``: t, noise, eps, mask (B, 1, h, w).
    """
    x0 = tb.latents
    t = draw_uniform_timesteps(tb.gens, schedule.num_timesteps, x0.device)
    noise = randn_per_sample(tb.gens, tuple(x0.shape[1:]), x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    eps = net(x_t, t, tb.text_info, tb.img_captions, tb.text_captions, strength, attnx_scale)
    keep = 1.0 - F.interpolate(tb.inv_mask.float(), size=tuple(x0.shape[-2:]), mode="nearest")
    loss = ((eps.float() - noise) ** 2 * keep).mean()
    return StepOutput(loss, {"t": float(t.float().mean())},
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
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(self._trains(name))
            if p.requires_grad:
                p.data = p.data.float()
                params.append(p)
        return params

    def set_train_mode(self, model: nn.Module) -> None:
        model.eval()
        parts = self.cfg.teacher_training.trainable
        if "writenet" in parts:
            model.control_model.train()
        if "embedding_manager" in parts:
            model.embedding_manager.train()

    def network(self, model: nn.Module) -> nn.Module:
        return TeacherNet(model)

    def step(self, net: nn.Module, model: nn.Module, tb: TrainBatch) -> StepOutput:
        d = self.cfg.distill
        return teacher_step(net, tb, self.schedule, d.control_strength, d.attnx_scale)

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        return [save_converted(model, output_dir / "model", extra={"trained_by": "anytext2-lcm train-teacher"})]

    def frozen_cast_prefixes(self) -> tuple[str, ...]:
        return ("model.diffusion_model.", "cond_stage_model.")
