"""The light decoder: diffusers' ``AutoencoderTiny`` decoder (the TAESD design) sized for a model, and its file.

The full VAE decoder is the fixed cost of every image (on a CPU as much as 1.5–2.5 UNet passes); a student that needs
4 UNet passes spends 30–40 % of its time there. The light decoder is a plain convolutional decoder (a 3×3 conv, then
per level a few residual blocks, a nearest-neighbour upsampling and a conv; ReLU; no normalisation, no attention)
with 64 channels everywhere: about 1.2 M parameters for SD's 8× latent against the VAE decoder's 49 M.

* **Architecture**: diffusers' ``AutoencoderTiny`` (its encoder dropped). The number of upsamplings follows the
  model's latent factor (sd15 and tiny: 8 → 3; the testbed: 4 → 2) and its input channels the model's latent
  channels (:func:`light_decoder_config`). Like TAESD it reads the *scaled* diffusion latent (what a sampler
  returns) and returns an image in [-1, 1].
* **Training**: ``anytext2-lcm train-decoder`` (``distill.decoder``) distils the model's own VAE decoder into it.
* **File**: one safetensors file holding the ``AutoencoderTiny`` state dict (``decoder.*`` keys) and, in its
  metadata, the constructor arguments, the latent factor and what it was trained from (:func:`save_light_decoder`).
  ``--tiny-decoder FILE`` (generate, evaluate, bench, ``--fast``) loads it (:func:`load_light_decoder`), checking
  that it fits the model. A TAESD folder in diffusers' layout (``from_pretrained``) loads too.
* **Cost**: :func:`decoder_cost` times it beside the full decoder (interleaved rounds, median) and counts the
  multiply-accumulates of both with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError

FORMAT = "anytext2-lcm light decoder"
"""The ``format`` metadata value of a light-decoder file."""
FILE_NAME = "light_decoder.safetensors"
"""The file ``train-decoder`` writes into its output folder."""


class LightDecoderError(CheckpointError):
    """A light-decoder file that cannot be used (not one, or made for another latent space); the command line
    prints it as one line (exit 2)."""


def light_decoder_config(model_cfg, channels: int = 64) -> dict:
    """``AutoencoderTiny`` arguments for a model: ``latent_channels`` = the VAE's, one upsampling per factor of 2 of
    the latent factor (TAESD's blocks per level: 3, …, 3, then 1 at full resolution), ``channels`` everywhere."""
    ups = int(math.log2(model_cfg.latent_factor))
    return {"latent_channels": int(model_cfg.vae.z_channels), "out_channels": 3,
            "decoder_block_out_channels": [int(channels)] * (ups + 1), "num_decoder_blocks": [3] * ups + [1]}


def upsampling_factor(config: dict) -> int:
    """Pixels per latent pixel of a decoder built from ``config`` (2 ** upsamplings)."""
    return int(config.get("upsampling_scaling_factor", 2)) ** (len(config["decoder_block_out_channels"]) - 1)


def build_light_decoder(config: dict) -> nn.Module:
    """An ``AutoencoderTiny`` (fp32, CPU, seeded by the caller's RNG) from :func:`light_decoder_config` arguments, its
    encoder removed: ``.decode(z).sample`` maps a scaled latent (B, C, h, w) to an image (B, 3, f·h, f·w)."""
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(**config)
    tiny.encoder = None
    return tiny


def moved(tiny: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """``tiny.to(device, dtype)``, eval mode, frozen, without diffusers' warning that a cast model may have modules to
    keep in fp32 (``AutoencoderTiny`` has none)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return tiny.to(device=device, dtype=dtype).eval().requires_grad_(False)
    finally:
        dlog.set_verbosity(level)


def save_light_decoder(path: str | Path, tiny: nn.Module, config: dict, info: dict) -> Path:
    """Write the decoder's state dict (fp32, ``decoder.*`` keys) and its metadata as one safetensors file,
    atomically."""
    from .atomic import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float() for k, v in tiny.state_dict().items() if k.startswith("decoder.")}
    meta = {"format": FORMAT, "config": json.dumps(config), "info": json.dumps(info)}
    return save_safetensors(path, state, meta)


def read_light_decoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, ``AutoencoderTiny`` arguments, info) of a light-decoder file. A safetensors file without our
    metadata is taken as a plain ``AutoencoderTiny`` state dict with diffusers' default arguments (SD's TAESD)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"light decoder {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a foreign file
        raise LightDecoderError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") == FORMAT:
        return state, json.loads(meta["config"]), json.loads(meta.get("info", "{}"))
    return state, {}, {}


def load_light_decoder(path: str | Path, model_cfg=None) -> nn.Module:
    """The decoder of a file (see :func:`read_light_decoder`), checked against ``model_cfg`` when given: the latent
    channels and the upsampling factor must be the model's."""
    path = Path(path)
    state, config, _ = read_light_decoder(path)
    if not any(k.startswith("decoder.") for k in state):
        raise LightDecoderError(f"{path}: no decoder.* tensors: not an AutoencoderTiny / light-decoder file")
    full = {"latent_channels": 4, "decoder_block_out_channels": [64] * 4, **config}
    if model_cfg is not None:
        want = (int(model_cfg.vae.z_channels), int(model_cfg.latent_factor))
        got = (int(full["latent_channels"]), upsampling_factor(full))
        if got != want:
            raise LightDecoderError(
                f"{path}: made for {got[0]}-channel latents upsampled {got[1]}x, but this model has {want[0]}-channel "
                f"latents and a latent factor of {want[1]}: train one for this model with `anytext2-lcm train-decoder`")
    tiny = build_light_decoder(config)
    missing, unexpected = tiny.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LightDecoderError(f"{path}: tensors do not match the recorded architecture (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    return tiny


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(fn) -> int:
    """Multiply-accumulates of one call of ``fn`` (torch's FLOP counter counts 2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@torch.no_grad()
def decoder_cost(model: nn.Module, tiny: nn.Module, size: int | None = None, repeats: int = 3) -> dict:
    """The light decoder beside the model's VAE decoder at ``size`` px (default: the model's image size), batch 1, on
    the decoders' device and dtype: parameters, multiply-accumulates, and seconds per decode (a warm-up each, then
    ``repeats`` interleaved rounds, median)."""
    p = next(tiny.parameters())
    size = size or model.cfg.image_size
    f = model.cfg.latent_factor
    z = torch.randn(1, model.cfg.vae.z_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
    z = z.to(p.device, p.dtype)
    vae = next(model.vae.parameters())
    runs = {"full": lambda: model.decode(z.to(vae.device, vae.dtype)), "light": lambda: tiny.decode(z).sample}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(max(repeats, 1)):
        for k, fn in runs.items():
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            t0 = time.perf_counter()
            fn()
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            seconds[k].append(time.perf_counter() - t0)
    full_s, light_s = statistics.median(seconds["full"]), statistics.median(seconds["light"])
    vae_decoder = [model.vae.model.post_quant_conv, model.vae.model.decoder]
    return {"size": size, "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "repeats": repeats,
            "params": {"full": sum(parameter_count(m) for m in vae_decoder), "light": parameter_count(tiny)},
            "macs": {"full": _macs(runs["full"]), "light": _macs(runs["light"])},
            "seconds": {"full": full_s, "light": light_s}, "speedup": full_s / light_s if light_s else None}


__all__ = ["FILE_NAME", "FORMAT", "LightDecoderError", "build_light_decoder", "decoder_cost", "light_decoder_config",
           "load_light_decoder", "moved", "parameter_count", "read_light_decoder", "save_light_decoder",
           "upsampling_factor"]
