"""The diffusion noise schedule of AnyText2 / SD-1.5 (ldm ``DDPM.register_schedule``).

betas are linear in sqrt space from ``linear_start`` to ``linear_end`` (diffusers' "scaled_linear"), computed in
float64 and stored as float32 exactly as the original registers its buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import DiffusionConfig


def schedule_buffers(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The 13 top-level buffers of the original checkpoint, in its order, as float32 tensors of shape (T,)."""
    T = cfg.timesteps
    betas = np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, T, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(T),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in bufs.items()}


@dataclass
class NoiseSchedule:
    """ᾱ_t for t = 0 .. T-1 (float32, as the original uses it at sampling time).

    Attributes:
        alphas_cumprod: (T,) float32 tensor, ᾱ_t.
    """

    alphas_cumprod: torch.Tensor

    @classmethod
    def from_config(cls, cfg: DiffusionConfig | None = None) -> "NoiseSchedule":
        return cls(schedule_buffers(cfg or DiffusionConfig())["alphas_cumprod"])

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) for integer timesteps ``t`` (any shape), float32."""
        ac = self.alphas_cumprod.to(t.device)[t.long()]
        return ac.sqrt(), (1 - ac).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise, ``t`` of shape (B,)."""
        a, s = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return a.view(shape).to(x0.dtype) * x0 + s.view(shape).to(x0.dtype) * noise
