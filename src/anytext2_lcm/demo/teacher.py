"""Pretraining of a tiny AnyText2 teacher from scratch on synthetic data, with AnyText2's own objective.

The real teacher is SD-1.5 (trained for months) plus AnyText2's WriteNet, text embedding and AttnX trained on
AnyWord-3M. ``anytext2-lcm train-teacher`` reproduces the second part only: it keeps the UNet trunk frozen, which
is right on top of a pretrained SD-1.5 and hopeless on a random tiny UNet (measured: ε-MSE stays above 1.0, the
loss of predicting zero). For the demo and the fidelity benchmark this module plays both roles at once: it trains
the tiny model's UNet trunk *and* AnyText2's trainable set (WriteNet, text-embedding module incl. its font OCR,
AttnX) together, on the same objective, data pipeline and per-sample randomness as the trainer
(``distill.teacher.teacher_step`` on ``distill.batch.prepare_batch`` of ``distill.data.build_loader`` batches).
The VAE, CLIP text encoder and glyph OCR stay frozen, as in AnyText2.

The result is saved as a converted model folder, the form ``anytext2-lcm distill`` takes as ``model.teacher``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

FROZEN_PREFIXES = ("first_stage_model.", "cond_stage_model.", "text_predictor.")
"""What does not train in the pretraining: the VAE (tuned before), the CLIP text encoder and the glyph OCR."""


@dataclass(kw_only=True)
class TeacherPretrainConfig:
    """The teacher pretraining run."""

    steps: int = 300
    batch_size: int = 8
    """Samples per step (the loader's ``train.batch_size``)."""
    lr: float = 1e-3
    """AdamW learning rate (linear warm-up over the first 5% of the steps, then constant)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    """Seed of the per-sample randomness (timestep, noise, VAE samples; as the trainer's ``train.seed``)."""
    text_loss_weight: float = 0.0
    """λ: the ε-MSE is weighted 1 + λ in latent cells that touch a text line (0: AnyText2's objective as is). Text
    covers a few percent of a tiny image, so without it the glyph conditioning is learnt last."""
    writenet_init: str = "zero"
    """"zero": AnyText2's zero-initialised WriteNet outputs (zero-convs, ``middle_block_out``, ``fuse_block_za``);
    "default": PyTorch's initialisation for those too, so the control path carries signal from the first step."""

    def __post_init__(self) -> None:
        from ..config import ConfigError

        if self.writenet_init not in ("zero", "default"):
            raise ConfigError(f"teacher.writenet_init={self.writenet_init!r}: must be 'zero' or 'default'")
        if not isinstance(self.steps, int) or self.steps < 1 or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"teacher.steps={self.steps!r}, batch_size={self.batch_size!r}: integers >= 1")
        if self.text_loss_weight < 0:
            raise ConfigError(f"teacher.text_loss_weight={self.text_loss_weight!r}: must be >= 0")


@dataclass
class TeacherPretrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0


def pretrain_teacher(model: nn.Module, train_cfg, cfg: TeacherPretrainConfig,
                     progress: Callable[[int, float], None] | None = None) -> TeacherPretrainResult:
    """Train ``model`` (an ``AnyText2`` on the CPU) in place.

    Args:
        model: the model to train (its VAE already tuned).
        train_cfg: a ``distill.config.TrainConfig`` with ``method: teacher``; its ``data`` section and
            ``train.batch_size`` / ``train.num_workers`` build the loader (the same loader the trainer uses).
        cfg: steps, learning rate, seed.
    """
    from ..distill.batch import prepare_batch
    from ..distill.data import build_loader
    from ..distill.teacher import TeacherNet, teacher_step
    from ..samplers.schedule import NoiseSchedule

    res = TeacherPretrainResult()
    t0 = time.perf_counter()
    if cfg.writenet_init == "default":
        wn = model.control_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for m in [*wn.zero_convs, wn.middle_block_out, wn.fuse_block_za]:
                for sub in m.modules():
                    if hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
    params = []
    for name, p in model.named_parameters():
        train = not name.startswith(FROZEN_PREFIXES)
        p.requires_grad_(train)
        if train:
            params.append(p)
    res.trainable = sum(p.numel() for p in params)
    model.eval()
    for part in (model.unet, model.control_model, model.embedding_manager):
        part.train()
    schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
    net = TeacherNet(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    loader = build_loader(train_cfg)
    epoch = 0
    loader.set_epoch(epoch)
    it = iter(loader)
    # The font OCR of the text-embedding module has dropout, which draws from the global generator: seed it (inside
    # a fork, so the caller's stream is untouched), else two runs of the same recipe differ.
    rng = contextlib.ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(cfg.seed)
    try:
        for step in range(cfg.steps):
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                loader.set_epoch(epoch)
                it = iter(loader)
                batch = next(it)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / warm)
            tb = prepare_batch(model, batch, cfg.seed, epoch, "cpu")
            if cfg.text_loss_weight:
                loss = weighted_teacher_loss(net, tb, schedule, cfg.text_loss_weight)
            else:
                loss = teacher_step(net, tb, schedule).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            res.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, res.losses[-1])
    finally:
        rng.close()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    res.seconds = time.perf_counter() - t0
    return res


def weighted_teacher_loss(net: nn.Module, tb, schedule, text_loss_weight: float) -> torch.Tensor:
    """AnyText2's masked ε-MSE (``distill.teacher.teacher_step``, same draws of t and ε from each sample's
    generator) with the weight 1 + λ in the text cells (``distill.batch.text_weight_map``)."""
    import torch.nn.functional as F

    from ..distill.batch import draw_uniform_timesteps, randn_per_sample, text_weight_map

    x0 = tb.latents
    t = draw_uniform_timesteps(tb.gens, schedule.num_timesteps, x0.device)
    noise = randn_per_sample(tb.gens, tuple(x0.shape[1:]), x0.device)
    eps = net(schedule.add_noise(x0, noise, t), t, tb.text_info, tb.img_captions, tb.text_captions)
    keep = 1.0 - F.interpolate(tb.inv_mask.float(), size=tuple(x0.shape[-2:]), mode="nearest")
    weight = text_weight_map(tb.hint, tuple(x0.shape[-2:]), text_loss_weight)
    return ((eps.float() - noise) ** 2 * keep * weight).mean()


__all__ = ["FROZEN_PREFIXES", "TeacherPretrainConfig", "TeacherPretrainResult", "pretrain_teacher",
           "weighted_teacher_loss"]
