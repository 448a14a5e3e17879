"""Models shared by the generation, bench, UI and guidance tests."""

from __future__ import annotations

import torch

from anytext2_lcm.config import tiny
from anytext2_lcm.models.anytext2 import AnyText2
from anytext2_lcm.models.init import initialize


def trained_like_tiny() -> AnyText2:
    """The tiny model with AnyText2's initialisation plus small noise on every weight matrix (seed 1), in eval mode:
    non-zero "trained-like" weights everywhere, so that every input matters (zero-initialised outputs would hide
    every difference)."""
    m = initialize(AnyText2(tiny()), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()
