"""Multistep latent-consistency sampling (LCM, Luo et al. 2023, Algorithm 3), with diffusers ``LCMScheduler``
semantics.

The student's consistency function is parameterised with the boundary condition of Song et al. 2023 (eq. 3 / §3 of
the LCM paper):

    f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0(x_t, t),
    c_skip(t) = σ_d² / ((s·t)² + σ_d²),   c_out(t) = s·t / sqrt((s·t)² + σ_d²)

with timestep_scaling s = 10 and σ_d = 0.5, so c_skip(0) = 1, c_out(0) = 0, and already c_skip(19) ≈ 7e-6.
Between steps the estimate is re-noised to the next timestep with FRESH Gaussian noise (so multistep LCM is
stochastic: fix the generator for comparisons); the last step returns f itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (StepResult, as_int_timestep, as_schedule, check_num_steps, check_step_args, distillation_grid,
                   grid_inference_timesteps, randn_like_latent)
from .schedule import NoiseSchedule


def scalings_for_boundary_conditions(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM boundary-condition scalings (c_skip, c_out) at timestep ``t``.

    Args:
        t: an int, or an integer/float tensor of any shape (e.g. (B,)).
        timestep_scaling: s in s·t (diffusers' default 10, the training scripts' ``timestep / 0.1``).
        sigma_data: σ_d.

    Returns:
        Python floats for a scalar ``t``; float32 tensors shaped like ``t`` otherwise (computed in float64).
    """
    if isinstance(t, torch.Tensor):
        st = t.to(torch.float64) * timestep_scaling
        c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
        c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
        return c_skip.to(torch.float32), c_out.to(torch.float32)
    st = float(t) * timestep_scaling
    return sigma_data ** 2 / (st ** 2 + sigma_data ** 2), st / (st ** 2 + sigma_data ** 2) ** 0.5


@dataclass(eq=False)
class LCMSampler:
    """LCM multistep sampler on the distillation grid.

    Args:
        schedule: the noise schedule.
        original_steps: points of the distillation grid (50 → {19, 39, …, 999}).
        timestep_spacing: the grid's spacing, "trailing" or "leading" (:func:`~.base.distillation_grid`).
        timestep_scaling, sigma_data: boundary-condition constants (10, 0.5).
    """

    schedule: NoiseSchedule | None = None
    original_steps: int = 50
    timestep_spacing: str = "trailing"
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    name: str = field(default="lcm", init=False)

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        # validates original_steps and the spacing
        distillation_grid(self.schedule.num_timesteps, self.original_steps, self.timestep_spacing)
        if not self.timestep_scaling > 0 or not self.sigma_data > 0:
            raise ValueError(f"{self.name}: timestep_scaling and sigma_data must be > 0, got "
                             f"{self.timestep_scaling!r}, {self.sigma_data!r}")

    def timesteps(self, num_steps: int) -> list[int]:
        """Descending grid timesteps: 1 → [999]; 2 → [999, 499]; 4 → [999, 759, 499, 259]; 8 → [999, 879, …, 139]."""
        check_num_steps(num_steps, 1, self.original_steps, f"{self.name} (original_steps={self.original_steps})")
        return grid_inference_timesteps(num_steps, self.schedule.num_timesteps, self.original_steps,
                                        self.timestep_spacing)

    def step(self, eps: torch.Tensor, t: int, t_next: int | None, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepResult:
        """One LCM step: f(x_t, t), then (unless last) re-noise to ``t_next`` with fresh noise from ``generator``.

        Args:
            eps: (B, C, H, W) ε at ``x``/``t`` (a LoRA student is normally run without CFG, or with a small scale).
            t, t_next: current and next timestep (``t_next`` None on the last step).
            x: (B, C, H, W) current latent.

        Returns:
            StepResult(prev_sample, denoised) with denoised = f(x_t, t); prev_sample = denoised on the last step.
        """
        t = as_int_timestep(t)
        t_next = None if t_next is None else as_int_timestep(t_next, "t_next")
        check_step_args(self.schedule, t, t_next)
        ac = self.schedule.alphas_cumprod.to(x.device)
        alpha_t = ac[t]
        pred_x0 = (x - (1.0 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        c_skip, c_out = scalings_for_boundary_conditions(t, self.timestep_scaling, self.sigma_data)
        denoised = c_out * pred_x0 + c_skip * x
        if t_next is None:
            return StepResult(denoised, denoised)
        alpha_s = ac[t_next]
        noise = randn_like_latent(denoised, generator)
        return StepResult(alpha_s.sqrt() * denoised + (1.0 - alpha_s).sqrt() * noise, denoised)
