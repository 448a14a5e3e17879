"""The AnyText2 denoising UNet: SD-1.5's UNet (ldm layout) with AttnX, consuming WriteNet residuals.

Pure: ``forward(x, t, context, control)`` takes the control residuals as an input (computed once per sample by
the WriteNet, see ``writenet.py``); nothing is cached between calls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..config import UNetConfig
from .blocks import (ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample, build_encoder, build_middle,
                     group_norm, run_block, time_embed_mlp, timestep_embedding)


class UNet(nn.Module):
    """ε-prediction UNet (``model.diffusion_model``).

    Children in the original's order: ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``.
    AttnX lives in the middle block (``mid_attnx``) and in the decoder levels listed in ``output_attnx_level``.
    Set ``gradient_checkpointing = True`` to recompute each block in the backward pass (training memory).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc = cfg.model_channels
        self.time_embed = time_embed_mlp(mc)
        self.input_blocks, ch, chans = build_encoder(cfg, attnx=cfg.input_attnx)
        self.middle_block = build_middle(cfg, ch, attnx=cfg.mid_attnx)
        self.output_blocks = nn.ModuleList()
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            attnx = cfg.output_attnx and level in cfg.output_attnx_level
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), mc * 4, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.transformer_depth,
                                                     cfg.context_dim, attnx=attnx))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None, attnx_scale: float = 1.0,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ε.

        Args:
            x: (B, 4, h, w) noisy latents x_t.
            timesteps: (B,) integer timesteps.
            context: (B, 77·k, D) image-prompt context (UNet and AttnX cross-attention).
            control: None (no text control) or the WriteNet residuals in encoder order, already scaled:
                one per input block then the middle block, e.g. 13 tensors for SD-1.5.
            attnx_scale: multiplier of the AttnX branches.
            context_mask: (B, 77·k) bool, valid context tokens (None: all); lets branches whose prompts have
                different chunk counts share one batch (padded tokens get no attention weight).
        Returns:
            (B, 4, h, w) ε prediction.
        """
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control: expected {len(self.input_blocks) + 1} residuals, got {len(control)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        hs = []
        h = x
        ckpt = self.gradient_checkpointing
        for block in self.input_blocks:
            h = run_block(block, ckpt, h, emb, context, attnx_scale, context_mask)
            hs.append(h)
        h = run_block(self.middle_block, ckpt, h, emb, context, attnx_scale, context_mask)
        if control is not None:
            h = h + control[-1]
        for i, block in enumerate(self.output_blocks):
            skip = hs.pop()
            if control is not None:
                skip = skip + control[-(i + 2)]
            h = run_block(block, ckpt, torch.cat([h, skip], dim=1), emb, context, attnx_scale, context_mask)
        return self.out(h)


def diffusers_key_map(cfg: UNetConfig) -> dict[str, str]:
    """ldm UNet key (``input_blocks.1.1.proj_in.weight``, without ``model.diffusion_model.``) → diffusers
    ``UNet2DConditionModel`` key (``down_blocks.0.attentions.0.proj_in.weight``), for every key of this UNet.

    The map is diffusers' own ``convert_ldm_unet_checkpoint`` run on markers (each ldm key carries its index as
    the value and is found where the converter puts it), so no name is written here. AttnX keys follow the same
    rule (``...transformer_blocks.0.attn1x.to_q.weight``); a plain SD-1.5 UNet has none of them.
    """
    import json
    from dataclasses import asdict

    return dict(_diffusers_key_map(json.dumps(asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=4)
def _diffusers_key_map(cfg_json: str) -> tuple[tuple[str, str], ...]:
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNetConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    with torch.device("cpu"):  # markers must hold real values even under an ambient meta-device context
        markers = {"model.diffusion_model." + k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
        converted = convert_ldm_unet_checkpoint(markers, {"layers_per_block": cfg.num_res_blocks})
    out = {keys[int(v.item())]: dk for dk, v in converted.items()}
    if len(out) != len(keys):
        raise RuntimeError(f"diffusers' UNet converter mapped {len(out)} of {len(keys)} keys")
    return tuple((k, out[k]) for k in keys)
