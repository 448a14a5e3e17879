"""The teacher's sampler: ldm's DDIM exactly as AnyText2 runs it (``cldm/ddim_hacked.py``, "uniform" schedule).

Differences from a textbook/diffusers DDIM that matter for parity:

* timesteps are ``range(0, T, T // S) + 1`` (S = 20 → 1, 51, …, 951), so S that does not divide T gives MORE steps
  than asked: S = 6 → 7 steps [1, 167, …, 997];
* the last step goes to ᾱ[0] (not ᾱ = 1), i.e. the final sample still carries sqrt(1 − ᾱ[0]) ≈ 0.029 of ε;
* ᾱ values are the float32 ``alphas_cumprod`` buffer and all coefficients are float32; σ_t(η) is computed in float64
  from those values.

diffusers' ``DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)``
gives the same timesteps and updates when S divides T (S = 20, 4) and one step fewer otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (StepResult, as_int_timestep, as_schedule, check_num_steps, check_step_args, ddim_update,
                   float32_sigma, randn_like_latent)
from .schedule import NoiseSchedule


def ldm_ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """ldm ``make_ddim_timesteps(ddim_discr_method="uniform")``: ascending ``range(0, T, T // S) + 1``.

    Raises:
        ValueError: when the list would reach t = T, outside the schedule (``T // S < 2``, or ``T // S`` divides
            ``T − 1``: S = 3, 9, 27, 37, ... for T = 1000). The original fails there too (an index error); the
            message names the nearest usable step counts.
    """
    s = check_num_steps(num_steps, 1, num_train_timesteps // 2, "ldm DDIM (T // S must be >= 2)")
    c = num_train_timesteps // s
    ts = [t + 1 for t in range(0, num_train_timesteps, c)]
    if ts[-1] >= num_train_timesteps:
        ok = [n for n in range(1, num_train_timesteps // 2 + 1)
              if (num_train_timesteps - 1) % (num_train_timesteps // n) != 0]
        near = sorted(ok, key=lambda n: (abs(n - s), n))[:2]
        raise ValueError(f"ddim: {s} steps is not usable with the original's uniform timesteps "
                         f"(range(0, {num_train_timesteps}, {c}) + 1 reaches t={ts[-1]}); use {' or '.join(map(str, sorted(near)))}")
    return ts


@dataclass(eq=False)
class DDIMSampler:
    """ldm DDIM with optional η (Song et al. 2021, eq. 12 and 16).

    Args:
        schedule: the noise schedule (default: AnyText2's).
        eta: η ≥ 0; 0 is the deterministic DDIM the teacher uses.
    """

    schedule: NoiseSchedule | None = None
    eta: float = 0.0
    name: str = field(default="ddim", init=False)

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        if not self.eta >= 0:
            raise ValueError(f"ddim: eta={self.eta!r} must be >= 0")

    def timesteps(self, num_steps: int) -> list[int]:
        """Descending timesteps, e.g. S = 20 → [951, 901, …, 51, 1]; S = 6 → [997, 831, …, 167, 1] (7 steps)."""
        return ldm_ddim_timesteps(num_steps, self.schedule.num_timesteps)[::-1]

    def step(self, eps: torch.Tensor, t: int, t_next: int | None, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepResult:
        """x_t → x_{t_next}; ᾱ_prev = ᾱ[t_next], or ᾱ[0] after the last step (``t_next=None``).

        Args:
            eps: (B, C, H, W) guided ε at ``x``/``t``.
            t, t_next: current and next timestep of :meth:`timesteps` (``t_next`` None after the last one).
            x: (B, C, H, W) current latent.
            generator: RNG for the η > 0 noise (unused for η = 0, so no random numbers are consumed then).
        """
        t = as_int_timestep(t)
        t_next = None if t_next is None else as_int_timestep(t_next, "t_next")
        check_step_args(self.schedule, t, t_next)
        ac = self.schedule.alphas_cumprod
        alpha_t = ac[t]
        alpha_s = ac[0] if t_next is None else ac[t_next]
        if self.eta == 0:
            prev, x0 = ddim_update(eps, x, alpha_t.to(x.device), alpha_s.to(x.device))
            return StepResult(prev, x0)
        sigma = float32_sigma(self.eta, alpha_t, alpha_s).to(x.device)
        noise = randn_like_latent(x, generator)
        prev, x0 = ddim_update(eps, x, alpha_t.to(x.device), alpha_s.to(x.device), sigma, noise)
        return StepResult(prev, x0)
