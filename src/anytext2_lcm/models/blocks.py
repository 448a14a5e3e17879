"""Building blocks of the AnyText2 UNet and WriteNet (ldm ``openaimodel`` / ``attention`` layout).

Module and parameter names follow the original exactly (``in_layers.2``, ``emb_layers.1``, ``out_layers.3``,
``skip_connection``, ``op``, ``proj_in``, ``transformer_blocks.0.attn1.to_q``, ...), so the official checkpoint
loads without key surgery. Attention uses ``F.scaled_dot_product_attention`` (same math as the original's einsum
path: softmax(q kᵀ / sqrt(d)) v).

AnyText2 specifics kept here:
* ``BasicTransformerBlock(attnx=True)`` adds AttnX: after the usual self- and cross-attention, a second pair
  ``attn1x`` (self) / ``attn2x`` (cross) re-applies ``norm1`` / ``norm2`` to the updated hidden states and is scaled
  by ``attnx_scale``. Registration order (hence key order): attn1, ff, attn2, attn1x, attn2x, norm1, norm2, norm3.
* GroupNorm runs in the input dtype (the original's GroupNorm32 has its fp32 up-cast commented out).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep features, [cos, sin] order (ldm ``timestep_embedding``).

    Args:
        timesteps: (B,) integer or float timesteps.
        dim: feature width.
    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """32-group GroupNorm (ldm ``normalization``: eps 1e-5; SpatialTransformer's ``Normalize``: eps 1e-6)."""
    return nn.GroupNorm(32, channels, eps=eps, affine=True)


def time_embed_mlp(model_channels: int) -> nn.Sequential:
    """Timestep MLP: Linear(C, 4C) → SiLU → Linear(4C, 4C); keys ``time_embed.0`` / ``time_embed.2``."""
    d = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, d), nn.SiLU(), nn.Linear(d, d))


# ---------------------------------------------------------------------------------------------------------------
# Convolutional blocks
# ---------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """ldm ResBlock without scale-shift norm: x + F(x, emb) with an optional 1x1 skip projection.

    Shapes: x (B, C_in, h, w), emb (B, E) → (B, C_out, h, w).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key ``op``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head (self- or cross-) attention with ldm key names ``to_q/to_k/to_v/to_out.0``.

    x (B, N, C) attends to context (B, M, C_ctx) (or to itself when context is None) → (B, N, C).
    ``mask`` (B, M) bool marks the valid context tokens (None: all valid); padded tokens get no weight.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    """Gated GELU: proj → (x, gate) → x · gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-norm and residual; optional AttnX.

    With ``attnx=True`` (AnyText2), after attn2: x += s·attn1x(norm1(x)); x += s·attn2x(norm2(x), ctx),
    s = ``attnx_scale``, then the feed-forward.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, attnx: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.attnx = attnx
        if attnx:
            self.attn1x = CrossAttention(dim, None, heads, dim_head)
            self.attn2x = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attnx_scale: float = 1.0,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        if self.attnx:
            x = x + attnx_scale * self.attn1x(self.norm1(x))
            x = x + attnx_scale * self.attn2x(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1x1 proj_in → transformer blocks over the h·w tokens → 1x1 proj_out, residual.

    x (B, C, h, w), context (B, M, C_ctx) → (B, C, h, w).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, attnx: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, attnx=attnx) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attnx_scale: float = 1.0,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context, attnx_scale, context_mask)
        h = h.transpose(1, 2).reshape(B, -1, H, W)
        return x + self.proj_out(h)


def run_block(block: nn.Module, checkpointed: bool, *args) -> torch.Tensor:
    """``block(*args)``, recomputed in the backward pass when ``checkpointed`` and gradients are on.

    Uses ``torch.utils.checkpoint`` in its non-reentrant form, which works with frozen base weights and LoRA
    (the original's ldm helper does not: DESIGN trap 11).
    """
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class TimestepEmbedSequential(nn.Sequential):
    """A sequential container that routes ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                attnx_scale: float = 1.0, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attnx_scale, context_mask)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# The shared encoder layout
# ---------------------------------------------------------------------------------------------------------------


def build_encoder(cfg, attnx: bool = False) -> tuple[nn.ModuleList, int, list[int]]:
    """The UNet encoder (``input_blocks``) shared by the UNet and the WriteNet.

    Args:
        cfg: a ``UNetConfig`` or ``WriteNetConfig``.
        attnx: AttnX in the encoder's transformers (AnyText2: never).
    Returns:
        (input_blocks, ch, input_block_chans): the blocks, the channel count at the lowest resolution, and the
        channel count after each input block (the UNet decoder pops these for its skips; the WriteNet puts a
        zero-conv on each).
    """
    mc, emb_ch = cfg.model_channels, cfg.model_channels * 4
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.transformer_depth,
                                                 cfg.context_dim, attnx=attnx))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    return blocks, ch, chans


def build_middle(cfg, ch: int, attnx: bool) -> TimestepEmbedSequential:
    """ResBlock → SpatialTransformer → ResBlock at the lowest resolution."""
    emb_ch = cfg.model_channels * 4
    return TimestepEmbedSequential(
        ResBlock(ch, emb_ch),
        SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.transformer_depth, cfg.context_dim, attnx=attnx),
        ResBlock(ch, emb_ch),
    )
