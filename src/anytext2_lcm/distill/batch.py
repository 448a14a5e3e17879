"""What every training method shares: the prepared batch, the step's output and the method interface.

A data batch (``anytext2_lcm.data.collate``) becomes a :class:`TrainBatch` once per micro-step: the image and the
masked image are VAE-encoded (posterior samples, × scale_factor, as the original's ``get_input``), the text
conditioning is packed into a :class:`~anytext2_lcm.conditioning.TextInfo`, and each sample gets its own random
generator seeded by (train seed, epoch, sample index). A method (:class:`Method`) turns a TrainBatch into a loss; a
method that needs other inputs overrides :meth:`Method.prepare` (the autoencoder, recogniser and light-decoder
objectives read the images or the line crops instead).

A method is one subclass of :class:`Method` (what trains, the network DDP wraps, ``prepare``, ``step``, the result
files), one entry in :data:`anytext2_lcm.distill.trainer.METHODS` and its name in ``distill.config.METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning import TextInfo
from .state import randn_per_sample, sample_generators


@dataclass
class TrainBatch:
    """One micro-batch, ready for a training step (B kept samples, latent h × w).

    Attributes:
        latents: (B, 4, h, w) x0 = scale_factor × VAE posterior sample of the image, float32.
        text_info: the text conditioning; ``masked_x`` (B, 4, h, w) = scale_factor × posterior sample of the masked
            image (all −1 in generation mode).
        img_captions: B image captions (without the added prompt).
        text_captions: B text captions with one ``*`` per line.
        inv_mask: (B, 1, H, W) {0, 1}: 1 where the teacher objective ignores the loss.
        hint: (B, 1, H, W) {0, 1}: union of the lines' positions.
        gens: B CPU generators; a method draws each sample's timestep, guidance and noise from its own.
        indices: dataset indices of the samples.
        epoch: data epoch.
        texts / languages: per sample, the texts and language labels of its line slots (the OCR loss reads them).
    """

    latents: torch.Tensor
    text_info: TextInfo
    img_captions: list[str]
    text_captions: list[str]
    inv_mask: torch.Tensor
    hint: torch.Tensor
    gens: list[torch.Generator]
    indices: list[int]
    epoch: int
    texts: list[list[str]] = field(default_factory=list)
    languages: list[list[str]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def prepare_batch(model: nn.Module, batch: dict, seed: int, epoch: int, device: torch.device | str) -> TrainBatch:
    """Encode a collated batch (see module docstring). The VAE runs in fp32 with autocast off: it is the usual
    source of fp16 NaNs, and its output is the teacher's input.

    Each sample's generator first draws the posterior noise of its image, then of its masked image; the method
    draws next.
    """
    gens = sample_generators(seed, epoch, batch["index"])
    img = batch["img"].to(device=device, dtype=torch.float32)
    masked = batch["masked_img"].to(device=device, dtype=torch.float32)
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        mean, logvar = model.vae.encode(torch.cat([img, masked]))
    B = img.shape[0]
    std = torch.exp(0.5 * logvar.float())
    shape = tuple(mean.shape[1:])
    # Per sample: image noise, then masked-image noise, from the sample's own generator.
    noise = torch.stack([torch.stack([torch.randn(shape, generator=g), torch.randn(shape, generator=g)])
                         for g in gens]).to(device)
    z = mean.float() + std * torch.cat([noise[:, 0], noise[:, 1]])
    z = model.scale_factor * z
    fields = {k: batch[k].to(device) for k in ("glyphs", "positions", "gly_line", "colors", "font_hint")}
    text_info = TextInfo(n_lines=batch["n_lines"].to(device), masked_x=z[B:], **fields)
    return TrainBatch(latents=z[:B], text_info=text_info, img_captions=list(batch["img_caption"]),
                      text_captions=list(batch["text_caption"]), inv_mask=batch["inv_mask"].to(device),
                      hint=batch["hint"].to(device), gens=gens, indices=list(batch["index"]), epoch=epoch,
                      texts=[list(t) for t in batch.get("texts", [])],
                      languages=[list(t) for t in batch.get("language", [])])


def text_weight_map(hint: torch.Tensor, size: tuple[int, int], extra: float) -> torch.Tensor | None:
    """Loss weight 1 + λ·m on the latent grid, m = 1 where a latent cell touches a text line (max-pooled ``hint``).

    Args:
        hint: (B, 1, H, W) union of the line positions.
        size: latent (h, w).
        extra: λ; 0 gives None (no weighting).
    Returns:
        (B, 1, h, w) float32 or None.
    """
    if not extra:
        return None
    m = (F.adaptive_max_pool2d(hint.float(), size) > 0).float()
    return 1.0 + extra * m


def draw_uniform_timesteps(gens: list[torch.Generator], num_timesteps: int, device) -> torch.Tensor:
    """t ~ U{0..T−1} per sample, (B,) long."""
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in gens]).to(device)


@dataclass
class StepOutput:
    """The result of one training micro-step.

    Attributes:
        loss: scalar float32 with grad (before division by the accumulation steps).
        logs: extra scalars to log (means over the batch).
        tensors: detached intermediates for tests and debugging (method-specific names).
    """

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def train_only(model: nn.Module, trains) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` but those whose name ``trains(name)`` accepts; those are made fp32 and
    returned in model order (the optimizer's parameters)."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trains(name)))
        if p.requires_grad:
            p.data = p.data.float()
            params.append(p)
    return params


def train_modules(model: nn.Module, *modules: nn.Module) -> None:
    """Everything in eval mode (frozen BatchNorms keep their statistics), then ``modules`` in training mode."""
    model.eval()
    for m in modules:
        m.train()


class Method:
    """A training objective: what trains, the network DDP wraps, and the loss of a step.

    Attributes:
        name: the config's ``method``.
        validation_sampler_default: sampler name for validation images when the config does not choose.
    """

    name = ""

    def __init__(self, cfg):
        self.cfg = cfg

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        """Freeze / adapt ``model`` in place; return the trainable parameters (fp32)."""
        raise NotImplementedError

    def set_train_mode(self, model: nn.Module) -> None:
        """Put each module in the right train/eval mode (frozen OCR BatchNorms must stay in eval)."""
        raise NotImplementedError

    def network(self, model: nn.Module) -> nn.Module:
        """The module whose ``forward`` carries the gradient (wrapped by DDP)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, batch: dict, seed: int, epoch: int, device) -> TrainBatch:
        """A collated data batch → what :meth:`step` takes (default: :func:`prepare_batch`)."""
        return prepare_batch(model, batch, seed, epoch, device)

    def step(self, net: nn.Module, model: nn.Module, tb: TrainBatch) -> StepOutput:
        """The loss of one micro-batch."""
        raise NotImplementedError

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        """Write the run's result files (main process only); return their paths."""
        raise NotImplementedError

    def frozen_cast_prefixes(self) -> tuple[str, ...]:
        """Module prefixes whose frozen weights may be stored in the autocast dtype (``train.cast_frozen``)."""
        return ("model.diffusion_model.", "control_model.", "cond_stage_model.")


__all__ = ["Method", "StepOutput", "TrainBatch", "draw_uniform_timesteps", "prepare_batch", "randn_per_sample",
           "text_weight_map", "train_modules", "train_only"]
