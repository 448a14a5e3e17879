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

Encoded images are not what the decoder meets at inference: a sampler's x0 (above all a few-step student's) is
smoother and off the encoder's manifold, and a decoder trained on encoder latents alone loses more text there than on
reconstructions. With ``decoder_training.generated`` = N the run first samples N latents with the model itself
(:func:`sample_latent_bank`: the data's first prompts and line positions, by the teacher and/or a student adapter,
``generated_by``), and then a ``generated_fraction`` share of every batch is a random crop of one of them (the same
crop and flip) in place of the encoded image; the target stays the full decoder's image of exactly the latent the
light decoder reads, and the text weight comes from the sample's line positions.
Only the light decoder trains; it is attached to the model as ``light_decoder`` so that the trainer's checkpoints,
resume and DDP handle it like any trainable part. At the end (:meth:`DecoderMethod.save_results`) the run writes
``OUTPUT/light_decoder.safetensors`` (what ``--tiny-decoder`` loads) and ``OUTPUT/light_decoder.json``: parameters,
multiply-accumulates and seconds per decode of both decoders measured side by side, and the PSNR of the light
decoder's images to the full decoder's on the first ``decoder_training.report_samples`` images of the data.
"""

from __future__ import annotations

import json
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
    _bank: dict | None = None

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
        hint = hint.to(device)
        if d.generated and d.generated_fraction > 0:
            bank = self.bank(model, device)
            swap = [i for i, g in enumerate(gens) if float(torch.rand((), generator=g)) < d.generated_fraction]
            if swap:
                picks = [int(torch.randint(0, len(bank["latents"]), (1,), generator=gens[i])) for i in swap]
                z, m = random_crops(bank["latents"][picks], bank["mask"][picks].float(), [gens[i] for i in swap],
                                    images.shape[-1] // model.cfg.latent_factor, 1, scale=model.cfg.latent_factor)
                with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=False):
                    z = z.to(device).float()
                    dec = model.vae.decode(z / model.scale_factor).float()
                latents, target, hint = latents.clone(), target.clone(), hint.clone()
                latents[swap], target[swap], hint[swap] = z, dec, m.to(hint)
        weight = 1.0 + d.text_loss_weight * hint if d.text_loss_weight else None
        return DecoderBatch(latents, target, weight)

    def bank(self, model: nn.Module, device) -> dict[str, torch.Tensor]:
        """This process's generated latents (``decoder_training.generated``), sampled on first use and kept in
        ``OUTPUT/generated_latents[-rankR-of-W].safetensors`` (process r samples rows r, r + W, ...); a file that
        does not match the settings is sampled anew."""
        if self._bank is None:
            import torch.distributed as dist

            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            name = "generated_latents" + (f"-rank{rank}-of-{world}" if world > 1 else "") + ".safetensors"
            self._bank = latent_bank(model, self.cfg, Path(self.cfg.output_dir) / name, rank, world, device)
        return self._bank

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
        dt = self.cfg.decoder_training
        if dt.generated:
            info.update(generated=dt.generated, generated_by=list(dt.generated_by),
                        generated_fraction=dt.generated_fraction)
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


# ---- generated latents ------------------------------------------------------------------------------------------

BANK_FORMAT = "anytext2-lcm generated latents"


def _bank_settings(cfg, rank: int, world: int) -> dict:
    """What the bank depends on (its file is re-sampled when any of it changes): the model by its weights' hashes and
    configuration (its guidance scale sets the teacher's runs)."""
    from .components import teacher_identity

    d = cfg.decoder_training
    return {"format": BANK_FORMAT, "generated": d.generated, "generated_by": list(d.generated_by),
            "generated_lora": d.generated_lora, "data": list(cfg.data.json_paths), "image_size": cfg.data.image_size,
            "model": teacher_identity(cfg.model.teacher, cfg.model), "seed": cfg.train.seed, "rank": rank,
            "world": world}


def latent_bank(model: nn.Module, cfg, path: Path, rank: int, world: int, device) -> dict[str, torch.Tensor]:
    """The generated latents of process ``rank`` of ``world``: read from ``path`` when it was written under the same
    settings, else sampled (:func:`sample_latent_bank`) and written atomically. Returns {"latents": (N, C, h, w)
    scaled float32, "mask": (N, 1, H, W) uint8 line positions}, on the CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..atomic import atomic_path

    settings = _bank_settings(cfg, rank, world)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("settings", "null"))
            if meta == settings:
                bank = load_file(str(path))
                log.info("generated latents: %d read from %s", len(bank["latents"]), path)
                return bank
            log.info("generated latents: %s was sampled under other settings; sampling anew", path)
        except Exception as e:  # noqa: BLE001 — a damaged cache is sampled anew, never trusted
            log.warning("generated latents: %s unreadable (%s); sampling anew", path, e)
    d = cfg.decoder_training
    share = list(range(rank, d.generated, world)) or [rank % d.generated]  # more processes than latents: one each
    bank = sample_latent_bank(model, list(cfg.data.json_paths), share, d.generated_by, d.generated_lora,
                              cfg.data.image_size, cfg.train.seed, device)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(bank, str(tmp), metadata={"settings": json.dumps(settings)})
    return bank


@torch.no_grad()
def sample_latent_bank(model: nn.Module, json_paths: list[str], rows: list[int], generated_by: list[str],
                       lora: str | None, size: int, seed: int, device) -> dict[str, torch.Tensor]:
    """Sample one latent per data row of ``rows`` (indices into the usable rows of ``json_paths``, wrapping around):
    row i's caption, lines and positions, sampled by ``generated_by[i % len]`` ("teacher": 20-step DDIM + CFG with
    the adapter off; "student@K": the adapter ``lora`` at K steps with its recorded sampling), seed ``seed + i``.

    The model is sampled in eval mode; a student adapter is loaded into it for the sampling and removed after, and
    every module's mode and every parameter's ``requires_grad`` are restored (the light decoder keeps training).
    Returns {"latents": (N, C, size/f, size/f) the sampler's final (scaled) latents, float32; "mask": (N, 1, size,
    size) uint8, 1 inside the rows' line polygons}.
    """
    import contextlib
    import time

    import cv2
    import numpy as np

    from .. import lora as L
    from ..defaults import Sampling, teacher_sampling
    from ..evaluate.runner import EvalConfig, load_eval_samples, text_prompt_for
    from ..generation import GenerationRequest, Generator
    from .config import _generated_run

    if not rows:
        raise ValueError("sample_latent_bank: no rows to sample")
    # only the rows needed are read (a full AnyWord-3M file has millions)
    samples, _ = load_eval_samples(EvalConfig(data=tuple(json_paths), num=max(rows) + 1, size=size,
                                              reference=False))
    if not samples:
        raise ValueError(f"data.json_paths {json_paths}: no usable rows to sample latents from")
    student = None
    if lora and any(r != "teacher" for r in generated_by):
        info = L.adapter_info(lora).get("sampling")
        student = Sampling.from_dict(info) if info else Sampling("lcm", 4, 1.0)
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    added = "generated_latents"
    if student is not None:
        if L.lora_layers(model):
            raise ValueError("sample_latent_bank: the model already carries LoRA layers; give it a plain model")
        L.load_lora(model, lora, adapter_name=added)
        model.to(device)
    gen = Generator(model)
    teacher = teacher_sampling(model.cfg)
    latents, masks = [], []
    t0 = time.perf_counter()
    try:
        for n, i in enumerate(rows):
            s = samples[i % len(samples)]
            run = generated_by[i % len(generated_by)]
            k = _generated_run(run)
            sm = teacher if k == 0 else Sampling(student.sampler, k, student.cfg, dict(student.options))
            req = GenerationRequest(
                prompt=s.caption, text_prompt=text_prompt_for(s.lines), positions=[ln.polygon for ln in s.lines],
                colors=[ln.color for ln in s.lines], height=size, width=size, seed=seed + i, steps=sm.steps,
                sampler=sm.sampler, sampler_options=dict(sm.options) if sm.sampler != "ddim" else {},
                cfg_scale=sm.cfg)
            if student is None:
                ctx = contextlib.nullcontext()
            else:
                ctx = L.disable_adapters(model) if k == 0 else L.use_adapter(model, added)
            with ctx:
                res = gen(req)
            latents.append(res.latents[:1].float().cpu())
            m = np.zeros((size, size), np.uint8)
            for ln in s.lines:
                cv2.fillPoly(m, [np.rint(np.asarray(ln.polygon, np.float32)).astype(np.int32)], 1)
            masks.append(torch.from_numpy(m)[None, None])
            if (n + 1) % 50 == 0 or n + 1 == len(rows):
                log.info("generated latents: %d/%d sampled (%.1f s/latent)", n + 1, len(rows),
                         (time.perf_counter() - t0) / (n + 1))
    finally:
        if student is not None:
            L.unload_lora(model, merge=False)
        for m, mode in modes.items():  # the run's train/eval modes and trainable parameters, as they were
            m.training = mode
        for p, g in grads.items():
            p.requires_grad_(g)
    return {"latents": torch.cat(latents).contiguous(), "mask": torch.cat(masks).contiguous()}


__all__ = ["DecoderBatch", "DecoderMethod", "LightDecoderNet", "decoder_targets", "latent_bank", "sample_latent_bank"]
