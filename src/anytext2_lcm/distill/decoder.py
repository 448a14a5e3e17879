"""The light-decoder objective (``method: decoder``, ``anytext2-lcm train-decoder``): the model's own VAE decoder
distilled into a small decoder (:mod:`anytext2_lcm.light_decoder`, diffusers' ``AutoencoderTiny`` shape).

Per micro-step, for every image of the data (a random crop aligned to the latent grid, ``decoder_training.crop``,
flipped left-right half the time, every draw from the sample's own generator):

1. the frozen VAE encodes it and a posterior sample z is drawn (the latents a diffusion model was trained on);
2. the frozen VAE decoder decodes z: the target (fp32, autocast off);
3. the light decoder decodes ``scale_factor`` · z (the scaled latent a sampler returns) and the loss is L1 + L2 to
   the target, weighted 1 + λ inside the text lines (``decoder_training.text_loss_weight``): text is the fine detail
   a small decoder loses first, and what this model is for.

The student learns to reproduce the full decoder, so its images are the full decoder's images, only cheaper; its
text cost is measured by ``benchmarks/light_decoder.py`` (OCR of the same student latents through both decoders).
Only the light decoder trains; it is attached to the model as ``light_decoder`` so that the trainer's checkpoints,
resume and DDP handle it like any trainable part. At the end (:meth:`DecoderMethod.save_results`) the run writes
``OUTPUT/light_decoder.safetensors`` (what ``--tiny-decoder`` loads) and ``OUTPUT/light_decoder.json``: parameters,
multiply-accumulates and seconds per decode of both decoders measured side by side, and the PSNR of the light
decoder's images to the full decoder's on the first ``decoder_training.report_samples`` images of the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import write_json
from ..light_decoder import FILE_NAME, build_light_decoder, decoder_cost, light_decoder_config, save_light_decoder
from .autoencoder import random_crops, reconstruction_loss
from .batch import Method, StepOutput, train_modules
from .state import sample_generators

log = logging.getLogger(__name__)


class LightDecoderNet(nn.Module):
    """``forward(z)`` → the light decoder's image: scaled latents (B, C, h, w) → (B, 3, f·h, f·w) in [-1, 1]."""

    def __init__(self, tiny: nn.Module):
        super().__init__()
        self.tiny = tiny

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tiny.decoder(z)


@dataclass
class DecoderBatch:
    """A micro-batch of the decoder objective.

    Attributes:
        latents: (B, C, h, w) scale_factor × posterior sample of each (cropped) image, float32.
        target: (B, 3, f·h, f·w) the full VAE decoder's image of the same latent, float32.
        weight: (B, 1, f·h, f·w) loss weight, 1 + λ inside the text lines; None when λ = 0.
    """

    latents: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def decoder_targets(model: nn.Module, images: torch.Tensor, gens: list[torch.Generator]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] → (scaled posterior samples (B, C, H/f, W/f), the full decoder's images of
    them (B, 3, H, W)), both float32, computed with autocast off; sample i's noise comes from ``gens[i]``."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        mean, logvar = model.vae.encode(images.float())
        noise = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=g) for g in gens]).to(mean)
        z = mean + torch.exp(0.5 * logvar) * noise
        return model.scale_factor * z, model.vae.decode(z).float()


class DecoderMethod(Method):
    """Distil the model's VAE decoder into a light decoder (everything of the model frozen); see the module
    docstring."""

    name = "decoder"

    def config(self, model: nn.Module) -> dict:
        return light_decoder_config(model.cfg, self.cfg.decoder_training.channels)

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        model.requires_grad_(False)
        tiny = build_light_decoder(self.config(model))  # seeded by the trainer (train.seed)
        model.add_module("light_decoder", tiny)
        return [p for p in tiny.parameters()]

    def set_train_mode(self, model: nn.Module) -> None:
        train_modules(model, model.light_decoder)

    def network(self, model: nn.Module) -> nn.Module:
        return LightDecoderNet(model.light_decoder)

    def prepare(self, model: nn.Module, batch: dict, seed: int, epoch: int, device) -> DecoderBatch:
        d = self.cfg.decoder_training
        gens = sample_generators(seed, epoch, batch["index"])
        images, hint = random_crops(batch["img"].float(), batch["hint"].float(), gens, d.crop,
                                    model.cfg.latent_factor)
        latents, target = decoder_targets(model, images.to(device), gens)
        weight = 1.0 + d.text_loss_weight * hint.to(device) if d.text_loss_weight else None
        return DecoderBatch(latents, target, weight)

    def step(self, net: nn.Module, model: nn.Module, tb: DecoderBatch) -> StepOutput:
        recon = net(tb.latents)
        loss = reconstruction_loss(recon, tb.target, tb.weight)
        return StepOutput(loss, {}, {"recon": recon.detach(), "target": tb.target})

    def frozen_cast_prefixes(self) -> tuple[str, ...]:
        return ("model.diffusion_model.", "control_model.", "cond_stage_model.")

    # ---- results --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fidelity(self, model: nn.Module) -> dict:
        """PSNR (dB, images in [0, 1]) of the light decoder's images to the full decoder's, over the first
        ``decoder_training.report_samples`` images of the data (whole images, posterior means), inside the text
        lines and over the whole image."""
        from .data import build_loader

        n = self.cfg.decoder_training.report_samples
        loader = build_loader(self.cfg)
        loader.set_epoch(0)
        dev = next(model.light_decoder.parameters()).device
        sq, sq_text, px, px_text, seen = 0.0, 0.0, 0, 0, 0
        for batch in loader:
            img = batch["img"].float()[: n - seen].to(dev)
            hint = batch["hint"].float()[: n - seen].to(dev)
            mean, _ = model.vae.encode(img)
            full = model.vae.decode(mean).clamp(-1, 1)
            light = model.light_decoder.decoder(model.scale_factor * mean).clamp(-1, 1)
            err = ((light - full) / 2).pow(2)
            sq += float(err.sum())
            px += err.numel()
            sq_text += float((err * hint).sum())
            px_text += int(hint.sum()) * 3
            seen += len(img)
            if seen >= n:
                break

        def psnr(s: float, count: int) -> float | None:
            return None if not count else float(10 * torch.log10(torch.tensor(count / max(s, 1e-12))))

        return {"images": seen, "psnr_db": psnr(sq, px), "psnr_text_db": psnr(sq_text, px_text)}

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        tiny = model.light_decoder.eval()
        info = {"trained_by": "anytext2-lcm train-decoder", "model": self.cfg.model.teacher or self.cfg.model.preset,
                "latent_factor": model.cfg.latent_factor, "image_size": self.cfg.data.image_size,
                "steps": self.cfg.train.max_steps, "text_loss_weight": self.cfg.decoder_training.text_loss_weight}
        path = save_light_decoder(Path(output_dir) / FILE_NAME, tiny, self.config(model), info)
        report = {"file": path.name, **info, "fidelity": self.fidelity(model),
                  "cost": decoder_cost(model, tiny, self.cfg.data.image_size, self.cfg.decoder_training.cost_repeats)}
        rpath = write_json(Path(output_dir) / "light_decoder.json", report)
        c = report["cost"]
        log.info("light decoder: %d parameters (full decoder %d), %.2f M vs %.2f M multiply-accumulates, decode "
                 "%.4f s vs %.4f s at %d px (%.1fx), PSNR to the full decoder %.1f dB (text %.1f dB)",
                 c["params"]["light"], c["params"]["full"], c["macs"]["light"] / 1e6, c["macs"]["full"] / 1e6,
                 c["seconds"]["light"], c["seconds"]["full"], c["size"], c["speedup"] or 0.0,
                 report["fidelity"]["psnr_db"] or 0.0, report["fidelity"]["psnr_text_db"] or 0.0)
        return [path, rpath]


__all__ = ["DecoderBatch", "DecoderMethod", "LightDecoderNet", "decoder_targets"]
