"""Distillation losses: pseudo-Huber (the LCM-LoRA default) and L2, with an optional per-pixel weight map.

The weight map is how text regions get extra weight: ``weight = 1 + λ·text_mask`` with the union of the line position
masks resized to the latent grid. The weighted loss is the plain mean of ``weight · elementwise_loss`` (not
normalised by the weight sum), so a weight of ones gives exactly the unweighted loss and a text-heavy image
contributes more in total, which is the intent.
"""

from __future__ import annotations

import torch

__all__ = ["huber_loss", "l2_loss"]


def _reduce(elem: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is not None:
        weight = weight.to(device=elem.device, dtype=elem.dtype)
        try:
            torch.broadcast_shapes(weight.shape, elem.shape)
        except RuntimeError:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to the prediction's shape "
                             f"{tuple(elem.shape)} (use e.g. (B, 1, H, W))") from None
        elem = weight * elem
    if reduction == "mean":
        return elem.mean()
    if reduction == "none":
        return elem
    raise ValueError(f"reduction={reduction!r} must be 'mean' or 'none'")


def huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001, weight: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Pseudo-Huber loss mean(sqrt((pred − target)² + c²) − c) (Song & Dhariwal 2023, "Improved techniques for
    training consistency models", §3.3; the diffusers LCM scripts' ``--loss_type huber``, c = 0.001).

    Quadratic (≈ d²/2c) for |d| ≪ c and linear (≈ |d|) for |d| ≫ c; computed in float32 whatever the input dtype,
    in the algebraically equal form d² / (sqrt(d² + c²) + c), which stays accurate for |d| ≪ c.

    Args:
        pred, target: (B, C, H, W).
        c: the Huber constant (> 0).
        weight: optional map broadcastable to ``pred`` (e.g. (B, 1, H, W)); see the module docstring.
        reduction: "mean" (scalar) or "none" (elementwise, weighted).
    """
    if not c > 0:
        raise ValueError(f"huber c={c!r} must be > 0")
    d2 = (pred.float() - target.float()) ** 2
    # sqrt(d² + c²) − c written as d² / (sqrt(d² + c²) + c): the same number, without the float32 cancellation
    # that the literal form suffers for |d| ≲ c (it loses ~3 digits at |d| = 1e-5 with c = 1e-3).
    return _reduce(d2 / (torch.sqrt(d2 + c * c) + c), weight, reduction)


def l2_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Mean squared error mean((pred − target)²), optionally weighted like :func:`huber_loss`; float32."""
    d = pred.float() - target.float()
    return _reduce(d * d, weight, reduction)
