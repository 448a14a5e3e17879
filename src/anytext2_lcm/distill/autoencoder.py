"""The autoencoder objective (``method: vae``): the first stage of a model trained from nothing.

SD-1.5's VAE comes pretrained; a small model built from a preset (the ``testbed``) starts with a random one, whose
decoder turns every latent into noise. This method trains the model's VAE on the data's images as a deterministic
autoencoder — the posterior mean is decoded, the loss is L1 + L2 on pixels, weighted 1 + λ inside the text lines
(``vae_training.text_loss_weight``) because legible text is what the later stages need — on random crops aligned to
the latent grid (``vae_training.crop``) with random horizontal flips, every draw from the sample's own generator.

At the end (:meth:`VAEMethod.save_results`) the latent space is calibrated for diffusion (:func:`calibrate_latents`)
and the whole model is written as a converted folder: the ``model.teacher`` of the next stage (``method: teacher``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import save_converted
from .batch import Method, StepOutput, train_modules, train_only
from .state import sample_generators


class AutoencoderNet(nn.Module):
    """``forward(x)`` → decode(encode(x).mean): images (B, 3, H, W) in [-1, 1] → reconstructions (B, 3, H, W)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, _ = self.vae.encode(x)
        return self.vae.decode(mean)


@dataclass
class ImageBatch:
    """A micro-batch of the autoencoder objective.

    Attributes:
        images: (B, 3, H, W) in [-1, 1].
        hint: (B, 1, H, W) {0, 1}: union of the lines' positions.
        gens: B CPU generators (crops and flips).
    """

    images: torch.Tensor
    hint: torch.Tensor
    gens: list[torch.Generator]

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]


def random_crops(x: torch.Tensor, hint: torch.Tensor, gens: list[torch.Generator], crop: int,
                 grid: int, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``crop``-sided square per sample, its corner on a multiple of ``grid`` (so that crops see the same
    downsampling phase as whole images), flipped left-right with probability 1/2; each sample draws from its own
    generator. ``crop`` 0 or ≥ the image side: whole images, flips only. ``hint`` may be ``scale`` times finer than
    ``x`` (a latent and its pixel mask): its crop is the same square, ``scale`` times larger."""
    H, W = x.shape[-2:]
    xs, hs = [], []
    for i, g in enumerate(gens):
        xi, hi = x[i], hint[i]
        if 0 < crop < min(H, W):
            oy = int(torch.randint(0, (H - crop) // grid + 1, (1,), generator=g)) * grid
            ox = int(torch.randint(0, (W - crop) // grid + 1, (1,), generator=g)) * grid
            xi = xi[:, oy:oy + crop, ox:ox + crop]
            hi = hi[:, oy * scale:(oy + crop) * scale, ox * scale:(ox + crop) * scale]
        if float(torch.rand((), generator=g)) < 0.5:
            xi, hi = xi.flip(-1), hi.flip(-1)
        xs.append(xi)
        hs.append(hi)
    return torch.stack(xs), torch.stack(hs)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """mean(w · (|r − x| + (r − x)²)) over every pixel and channel (w = 1 where ``weight`` is None)."""
    err = (recon.float() - target.float())
    per = err.abs() + err.pow(2)
    if weight is not None:
        per = per * weight
    return per.mean()


@torch.no_grad()
def calibrate_latents(vae: nn.Module, images: torch.Tensor, scale_factor: float, posterior_std: float = 0.01,
                      batch: int = 16) -> float:
    """Rescale the latent space so that ``scale_factor`` × posterior mean has unit standard deviation over ``images``
    and make the posterior's log-variance one constant; returns the standard deviation before calibration.

    * scale: the mean half of ``quant_conv`` is multiplied by a = 1/std and ``post_quant_conv``'s input weights by
      1/a, so decode(encode(x).mean) is unchanged (up to rounding) and only the latent scale moves (SD's 0.18215
      does the same job for SD's VAE);
    * width: the autoencoder objective never trains the log-variance half, so it is set to one constant, posterior
      std = ``posterior_std`` × the latent std. Training batches and the masked-image latent draw *samples*, as the
      original does, and those stay close to the mean.
    """
    am = vae.model
    means = torch.cat([vae.encode(images[i:i + batch])[0] for i in range(0, len(images), batch)])
    std = float((scale_factor * means).std())
    a = 1.0 / std
    z = am.quant_conv.out_channels // 2
    qc, pqc = am.quant_conv, am.post_quant_conv
    qc.weight[:z] *= a
    qc.bias[:z] *= a
    pqc.weight /= a  # post_quant_conv(a·z) must equal the old post_quant_conv(z)
    qc.weight[z:] = 0.0
    qc.bias[z:] = 2.0 * math.log(posterior_std / scale_factor)
    return std


class VAEMethod(Method):
    """Train the model's VAE (everything else frozen); the result is a converted model folder with a calibrated
    latent space. See the module docstring."""

    name = "vae"

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        return train_only(model, lambda name: name.startswith("first_stage_model."))

    def set_train_mode(self, model: nn.Module) -> None:
        train_modules(model, model.vae)

    def network(self, model: nn.Module) -> nn.Module:
        return AutoencoderNet(model.vae)

    def prepare(self, model: nn.Module, batch: dict, seed: int, epoch: int, device) -> ImageBatch:
        return ImageBatch(images=batch["img"].to(device=device, dtype=torch.float32),
                          hint=batch["hint"].to(device=device, dtype=torch.float32),
                          gens=sample_generators(seed, epoch, batch["index"]))

    def step(self, net: nn.Module, model: nn.Module, tb: ImageBatch) -> StepOutput:
        v = self.cfg.vae_training
        x, hint = random_crops(tb.images, tb.hint, tb.gens, v.crop, model.cfg.size_multiple)
        recon = net(x)
        weight = 1.0 + v.text_loss_weight * hint if v.text_loss_weight else None
        loss = reconstruction_loss(recon, x, weight)
        return StepOutput(loss, {}, {"recon": recon.detach(), "target": x})

    def calibration_images(self) -> torch.Tensor:
        """The first ``vae_training.calibration_samples`` training images (epoch 0 order), (N, 3, H, W)."""
        from .data import build_loader

        loader = build_loader(self.cfg)
        loader.set_epoch(0)
        out, n = [], 0
        for batch in loader:
            out.append(batch["img"].float())
            n += len(out[-1])
            if n >= self.cfg.vae_training.calibration_samples:
                break
        return torch.cat(out)[: self.cfg.vae_training.calibration_samples]

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        images = self.calibration_images().to(model.device)
        model.vae.eval()
        std = calibrate_latents(model.vae, images, model.scale_factor, self.cfg.vae_training.posterior_std)
        return [save_converted(model, output_dir / "model", extra={
            "trained_by": "anytext2-lcm train-teacher (method: vae)", "latent_std_before_calibration": std})]

    def frozen_cast_prefixes(self) -> tuple[str, ...]:
        return ("model.diffusion_model.", "control_model.", "cond_stage_model.")


__all__ = ["AutoencoderNet", "ImageBatch", "VAEMethod", "calibrate_latents", "random_crops", "reconstruction_loss"]
