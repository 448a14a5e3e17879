"""Initial weights of a fresh AnyText2 (for training from scratch and for the built-in tiny model).

Mirrors how the original initialises before training: PyTorch defaults, then the zero-initialised layers
(WriteNet zero-convs, ``middle_block_out`` and ``fuse_block_za``; every SpatialTransformer ``proj_out``; every
ResBlock's last conv; the UNet's output conv; the embedding projections ``proj``/``style_proj``/``color_proj``) set to
zero, and AttnX copied from the block's own attention (``attn1x`` ← ``attn1``, ``attn2x`` ← ``attn2``), as
``tool_add_anytext.py`` does. With these, an untrained WriteNet adds nothing and AttnX starts as a second copy of
the pretrained attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import BasicTransformerBlock, ResBlock, SpatialTransformer


def _zero(m: nn.Module) -> None:
    for p in m.parameters():
        nn.init.zeros_(p)


@torch.no_grad()
def initialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` (an ``AnyText2``) deterministically from ``seed``; returns it."""
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(g_state)
    for m in model.modules():
        if isinstance(m, SpatialTransformer):
            _zero(m.proj_out)
        elif isinstance(m, ResBlock):
            _zero(m.out_layers[3])
        elif isinstance(m, BasicTransformerBlock) and m.attnx:
            m.attn1x.load_state_dict(m.attn1.state_dict())
            m.attn2x.load_state_dict(m.attn2.state_dict())
    _zero(model.unet.out[2])
    wn = model.control_model
    for zc in wn.zero_convs:
        _zero(zc)
    _zero(wn.middle_block_out)
    _zero(wn.fuse_block_za)
    em = model.embedding_manager
    for name in ("proj", "style_proj", "color_proj"):
        if hasattr(em, name):
            _zero(getattr(em, name)[0])
    return model
