"""The SD autoencoder, run as diffusers' ``AutoencoderKL``, with the key mapping to the original ldm layout.

Loading the original ``first_stage_model.*`` keys uses diffusers' own converter (``convert_ldm_vae_checkpoint``).
The inverse (for exporting in the original layout, and for checking a model against the original key list) is
derived from that converter: every ldm key of the configured architecture is generated, fed through the converter
as a unique marker, and the marker's landing place gives the diffusers key. So the two directions cannot drift.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..config import VAEConfig


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """``AutoencoderKL`` constructor arguments for an ldm ``ddconfig``."""
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                norm_num_groups=cfg.norm_groups, sample_size=cfg.resolution, act_fn="silu")


def ldm_vae_keys(cfg: VAEConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every ``first_stage_model`` tensor of the ldm AutoencoderKL, in ``state_dict()`` order."""
    out: list[tuple[str, tuple[int, ...]]] = []

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        out.extend([(f"{name}.weight", (cout, cin, k, k)), (f"{name}.bias", (cout,))])

    def norm(name: str, c: int) -> None:
        out.extend([(f"{name}.weight", (c,)), (f"{name}.bias", (c,))])

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    ch, mult, nrb, levels = cfg.ch, cfg.ch_mult, cfg.num_res_blocks, len(cfg.ch_mult)
    # encoder
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    in_mult = (1,) + tuple(mult)
    for i in range(levels):
        cin, cout = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout, 3)
    top = ch * mult[-1]
    mid("encoder", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, 2 * cfg.z_channels, 3)
    # decoder (the ldm decoder registers up.0 .. up.{n-1}; it builds them from the top level down)
    conv("decoder.conv_in", cfg.z_channels, top, 3)
    mid("decoder", top)
    ups: dict[int, list] = {}
    cin = top
    for i in reversed(range(levels)):
        start = len(out)
        cout = ch * mult[i]
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cout, cout, 3)
        ups[i] = out[start:]
        del out[start:]
    for i in range(levels):
        out.extend(ups[i])
    norm("decoder.norm_out", ch * mult[0])
    conv("decoder.conv_out", ch * mult[0], cfg.out_ch, 3)
    conv("quant_conv", 2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
    conv("post_quant_conv", cfg.embed_dim, cfg.z_channels, 1)
    return out


@functools.lru_cache(maxsize=8)
def _key_maps(cfg_items: tuple) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = VAEConfig(**dict(cfg_items))
    keys = ldm_vae_keys(cfg)
    # Markers live on the CPU even when the caller builds models under ``torch.device("meta")``.
    markers = {f"first_stage_model.{k}": torch.tensor([float(i)], dtype=torch.float64, device="cpu")
               for i, (k, _) in enumerate(keys)}
    converted = convert_ldm_vae_checkpoint(markers, diffusers_vae_config(cfg))
    to_ldm = {dk: keys[int(v.item())][0] for dk, v in converted.items()}
    if len(set(to_ldm.values())) != len(keys):
        missing = {k for k, _ in keys} - set(to_ldm.values())
        raise RuntimeError(f"the diffusers VAE converter dropped ldm keys: {sorted(missing)[:5]}")
    return to_ldm, dict(keys)


def _cfg_key(cfg: VAEConfig) -> tuple:
    import dataclasses

    return tuple((k, v) for k, v in dataclasses.asdict(cfg).items())


def vae_to_ldm(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict → ldm keys (without the ``first_stage_model.`` prefix), in ldm order."""
    to_ldm, shapes = _key_maps(_cfg_key(cfg))
    unknown = set(state_dict) - set(to_ldm)
    if unknown:
        raise KeyError(f"VAE keys without an ldm counterpart: {sorted(unknown)[:5]}")
    by_ldm = {to_ldm[k]: v for k, v in state_dict.items()}
    out = {}
    for k, shape in shapes.items():
        if k in by_ldm:
            v = by_ldm[k]
            out[k] = v.reshape(shape) if tuple(v.shape) != shape and v.numel() == _numel(shape) else v
    return out


def vae_from_ldm(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """ldm VAE keys (without prefix) → diffusers ``AutoencoderKL`` keys (through diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in state_dict.items()},
                                      diffusers_vae_config(cfg))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class VAE(nn.Module):
    """``first_stage_model``: ``encode`` → posterior (mean, logvar); ``decode`` latent → image in [-1, 1]-ish."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        self.cfg = cfg
        self.model = AutoencoderKL(**diffusers_vae_config(cfg))

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1] → posterior mean and clamped log-variance, each (B, 4, H/8, W/8)."""
        moments = self.model.quant_conv(self.model.encoder(image))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w) unscaled latent → image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.model.decoder(self.model.post_quant_conv(z))
