"""Strategic stochastic sampling of Trajectory Consistency Distillation (TCD, Zheng et al. 2024, §3.3 / Algorithm 4),
with diffusers ``TCDScheduler`` semantics.

For a step t → t_next with stochasticity γ ∈ [0, 1] (``eta`` in diffusers, ``gamma`` here):

    s   = floor((1 − γ)·t_next)                             (an intermediate, lower timestep)
    x_s = sqrt(ᾱ_s)·x̂0 + sqrt(1 − ᾱ_s)·ε                   (deterministic DDIM jump t → s)
    x_{t_next} = sqrt(ᾱ_{t_next}/ᾱ_s)·x_s + sqrt(1 − ᾱ_{t_next}/ᾱ_s)·z   (re-noise s → t_next; not on the last step)

γ = 0 is the deterministic DDIM jump between grid points; γ = 1 jumps to s = 0 and re-noises, which is (almost) the
LCM restart. After the last step t_next is taken as 0, so the final sample is x_0 = sqrt(ᾱ[0])·x̂0 + sqrt(1 − ᾱ[0])·ε.
Timesteps are LCM's (the same 50-point grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (StepResult, as_int_timestep, as_schedule, check_num_steps, check_step_args, distillation_grid,
                   grid_inference_timesteps, randn_like_latent)
from .schedule import NoiseSchedule


@dataclass(eq=False)
class TCDSampler:
    """TCD sampler.

    Args:
        schedule: the noise schedule.
        gamma: γ ∈ [0, 1] (0: deterministic; diffusers' default 0.3).
        original_steps: points of the distillation grid (50).
        timestep_spacing: the grid's spacing, "trailing" or "leading" (:func:`~.base.distillation_grid`).
    """

    schedule: NoiseSchedule | None = None
    gamma: float = 0.3
    original_steps: int = 50
    timestep_spacing: str = "trailing"
    name: str = field(default="tcd", init=False)

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        # validates original_steps and the spacing
        distillation_grid(self.schedule.num_timesteps, self.original_steps, self.timestep_spacing)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"tcd: gamma={self.gamma!r} must be in [0, 1]")

    def timesteps(self, num_steps: int) -> list[int]:
        """The LCM timesteps: 4 → [999, 759, 499, 259]."""
        check_num_steps(num_steps, 1, self.original_steps, f"tcd (original_steps={self.original_steps})")
        return grid_inference_timesteps(num_steps, self.schedule.num_timesteps, self.original_steps,
                                        self.timestep_spacing)

    def intermediate_timestep(self, t_next: int | None) -> int:
        """s = floor((1 − γ)·t_next), with t_next = 0 after the last step.

        Computed as diffusers does (a float32 product of the integer timestep and the Python float 1 − γ), so the
        floor agrees with it exactly.
        """
        tn = torch.tensor(0 if t_next is None else t_next, dtype=torch.long)
        return int(torch.floor((1 - self.gamma) * tn).long())

    def step(self, eps: torch.Tensor, t: int, t_next: int | None, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepResult:
        """One TCD step. Returns StepResult(prev_sample, denoised = x̂0 at ``t``).

        Noise is drawn from ``generator`` only when γ > 0 and this is not the last step.
        """
        t = as_int_timestep(t)
        t_next = None if t_next is None else as_int_timestep(t_next, "t_next")
        check_step_args(self.schedule, t, t_next)
        ac = self.schedule.alphas_cumprod.to(x.device)
        alpha_t = ac[t]
        alpha_s = ac[self.intermediate_timestep(t_next)]
        pred_x0 = (x - (1.0 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        x_s = alpha_s.sqrt() * pred_x0 + (1.0 - alpha_s).sqrt() * eps
        if self.gamma == 0 or t_next is None:
            return StepResult(x_s, pred_x0)
        ratio = ac[t_next] / alpha_s
        noise = randn_like_latent(x_s, generator)
        return StepResult(ratio.sqrt() * x_s + (1.0 - ratio).sqrt() * noise, pred_x0)
