"""The WriteNet: AnyText2's text ControlNet.

A copy of the UNet encoder whose first block is fused with an encoding of the glyphs, the positions and the
masked-image latent. With ``fast_control`` (AnyText2) its input latent is zero and its timestep 0, so its residuals
depend only on the text conditioning: compute them once per sample (cond and uncond) and pass them to every
UNet call. The module itself is pure.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import WriteNetConfig
from .blocks import TimestepEmbedSequential, build_encoder, build_middle, run_block, time_embed_mlp, timestep_embedding


def _hint_encoder(in_ch: int, widths: list[tuple[int, int]], downsample: int) -> TimestepEmbedSequential:
    """3x3 convs (out_channels, stride) each followed by SiLU; conv keys at even indices .0, .2, ...

    The first log2(``downsample``) stride-2 convs keep their stride, later ones get stride 1 (a VAE that
    downsamples less than SD's 8): same weights, same keys, output at the latent resolution."""
    layers: list[nn.Module] = []
    ch = in_ch
    halvings = downsample.bit_length() - 1
    for out, stride in widths:
        if stride == 2:
            stride = 2 if halvings > 0 else 1
            halvings -= 1
        layers += [nn.Conv2d(ch, out, 3, padding=1, stride=stride), nn.SiLU()]
        ch = out
    return TimestepEmbedSequential(*layers)


_GLYPH_WIDTHS = {
    1: [(16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)],
    2: [(8, 1), (8, 1), (16, 2), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)],
}
_POSITION_WIDTHS = [(8, 1), (8, 1), (16, 2), (16, 1), (32, 2), (32, 1), (64, 2)]


class WriteNet(nn.Module):
    """``control_model``: glyph/position/masked-latent hint → 1 + |input_blocks| residuals.

    Children in the original's order: ``glyph_block``, ``position_block``, ``fuse_block_za``, ``time_embed``,
    ``input_blocks``, ``zero_convs``, ``middle_block``, ``middle_block_out``. ``gradient_checkpointing = True``
    recomputes each block in the backward pass.
    """

    def __init__(self, cfg: WriteNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc = cfg.model_channels
        self.glyph_block = _hint_encoder(cfg.glyph_channels, _GLYPH_WIDTHS[cfg.glyph_scale],
                                         cfg.latent_factor * cfg.glyph_scale)
        self.position_block = _hint_encoder(cfg.position_channels, _POSITION_WIDTHS, cfg.latent_factor)
        self.fuse_block_za = nn.Conv2d(256 + 64 + cfg.in_channels, mc, 3, padding=1)
        self.time_embed = time_embed_mlp(mc)
        self.input_blocks, ch, chans = build_encoder(cfg, attnx=False)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in chans)
        self.middle_block = build_middle(cfg, ch, attnx=False)
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))

    @property
    def num_residuals(self) -> int:
        return len(self.zero_convs) + 1

    def forward(self, context: torch.Tensor, glyphs: torch.Tensor, positions: torch.Tensor,
                masked_x: torch.Tensor) -> list[torch.Tensor]:
        """Compute the control residuals.

        Args:
            context: (B, 77, D) text-prompt context with the line embeddings spliced in.
            glyphs: (B, L, C, H·g, W·g) rendered glyphs of each line slot (g = glyph_scale); only
                ``sum over lines and channels != 0`` is used.
            positions: (B, L, 1, H, W) position masks; summed over lines (not clipped).
            masked_x: (B, 4, H/f, W/f) masked-image latent (f = ``latent_factor``, 8 in SD).
        Returns:
            Residuals in encoder order (input blocks, then the middle block), e.g. 13 for SD-1.5,
            shapes (B, C_i, h_i, w_i).
        """
        B = masked_x.shape[0]
        glyph = (glyphs.sum(dim=(1, 2)) != 0).to(masked_x.dtype).unsqueeze(1)
        position = positions.sum(dim=1).to(masked_x.dtype)
        hint = self.fuse_block_za(torch.cat([self.glyph_block(glyph, None), self.position_block(position, None),
                                             masked_x], dim=1))
        t = torch.zeros(B, dtype=torch.long, device=masked_x.device)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(masked_x.dtype))
        h = torch.zeros_like(masked_x)
        outs = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = run_block(block, self.gradient_checkpointing, h, emb, context)
            if i == 0:
                h = h + hint
            outs.append(zero_conv(h, emb))
        h = run_block(self.middle_block, self.gradient_checkpointing, h, emb, context)
        outs.append(self.middle_block_out(h, emb))
        return outs
