"""What every sampler shares: the step result, the DDIM update and the 50-point distillation grid.

Notation (DDIM, Song et al. 2021, eq. 12): ᾱ_t = ``alphas_cumprod[t]``; for an ε-prediction at ``x_t``

    x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)
    x_s = sqrt(ᾱ_s)·x̂0 + sqrt(1 − ᾱ_s − σ²)·ε + σ·z,   z ~ N(0, I)

Every coefficient is computed from the float32 ``alphas_cumprod`` in float32 (as ldm's DDIM sampler does), then
broadcast against the latent, so the latent's dtype decides the dtype of the result.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .schedule import NoiseSchedule


class StepResult(NamedTuple):
    """The outcome of one sampler step.

    Attributes:
        prev_sample: (B, C, H, W) the latent at the next timestep of the list; after the last step, the sample to
            decode.
        denoised: (B, C, H, W) the step's estimate of the clean latent x0 (LCM: with the boundary condition applied).
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def as_schedule(schedule: NoiseSchedule | None) -> NoiseSchedule:
    """``schedule`` or, when None, the AnyText2 / SD-1.5 default schedule."""
    if schedule is None:
        return NoiseSchedule.from_config()
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def as_int_timestep(t: int | torch.Tensor, name: str = "t") -> int:
    """A scalar timestep as a Python int (accepts ints and 0-d / one-element tensors)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a single timestep, got a tensor of shape {tuple(t.shape)}")
        return int(t.item())
    if isinstance(t, (int, np.integer)):
        return int(t)
    raise TypeError(f"{name} must be an int timestep, got {type(t).__name__}")


def check_step_args(schedule: NoiseSchedule, t: int, t_next: int | None) -> None:
    """Reject timesteps outside [0, T) and a next timestep that is not below the current one."""
    T = schedule.num_timesteps
    if not 0 <= t < T:
        raise ValueError(f"t={t} is outside the schedule's range [0, {T})")
    if t_next is not None and not 0 <= t_next < t:
        raise ValueError(f"t_next={t_next} must satisfy 0 <= t_next < t={t}")


def ddim_update(eps: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from ᾱ_t to ᾱ_s (Song et al. 2021, eq. 12).

    Args:
        eps: (B, C, H, W) ε-prediction at ``x``.
        x: (B, C, H, W) latent x_t.
        alpha_t, alpha_s: 0-d float32 tensors ᾱ_t and ᾱ_s.
        sigma: 0-d float32 tensor σ (None: 0, the deterministic update).
        noise: (B, C, H, W) z ~ N(0, I), required when ``sigma`` is given and non-zero.

    Returns:
        (x_s, x̂0), both (B, C, H, W).
    """
    # The operation order mirrors ldm's p_sample_ddim so that float32 results agree bit for bit.
    pred_x0 = (x - (1.0 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if sigma is None:
        dir_xt = (1.0 - alpha_s).sqrt() * eps
        return alpha_s.sqrt() * pred_x0 + dir_xt, pred_x0
    dir_xt = (1.0 - alpha_s - sigma ** 2).sqrt() * eps
    x_s = alpha_s.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_s = x_s + sigma * noise
    return x_s, pred_x0


def randn_like_latent(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn the way diffusers' ``randn_tensor`` draws it on one device
    (one ``torch.randn`` call with the given generator), so that a shared seed gives identical noise."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The distillation grid (LCM, Luo et al. 2023, §4.3 "skipping-step"; diffusers LCMScheduler / TCDScheduler)
# ---------------------------------------------------------------------------------------------------------------


TIMESTEP_SPACINGS = ("trailing", "leading")


def distillation_grid(num_train_timesteps: int = 1000, original_steps: int = 50,
                      spacing: str = "trailing") -> list[int]:
    """The ascending solver grid of N = ``original_steps`` points, k = T // N apart.

    * "trailing" (default; LCM, TCD and PCM): {k·i − 1 : i = 1..N}, the top point is T − 1. T = 1000, N = 50:
      [19, 39, …, 999]; N = 20: [49, 99, …, 999].
    * "leading": {k·(i − 1) + 1 : i = 1..N}, the timesteps of the teacher's own N-step DDIM (the original's ldm
      "uniform" discretisation; diffusers' "leading" spacing with ``steps_offset`` 1). N = 20: [1, 51, …, 951]. A
      student distilled on it learns the trajectory the teacher's N-step DDIM run follows (it starts from pure noise
      at 951, not at 999), which is the reference its outputs are compared with. Needs T % N == 0 and k ≥ 2.

    Students are trained only on these timesteps.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} must be one of {TIMESTEP_SPACINGS}")
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps={original_steps} must be in [1, {num_train_timesteps}]")
    k = num_train_timesteps // original_steps
    if spacing == "trailing":
        return [k * i - 1 for i in range(1, original_steps + 1)]
    if num_train_timesteps % original_steps or k < 2:
        raise ValueError(f"original_steps={original_steps}: the leading grid needs a divisor of "
                         f"{num_train_timesteps} of at most {num_train_timesteps // 2}")
    from .ddim import ldm_ddim_timesteps  # the teacher's own timesteps have one home (ddim imports this module)

    return ldm_ddim_timesteps(original_steps, num_train_timesteps)


def grid_positions(num_steps: int, num_points: int) -> list[int]:
    """floor(linspace(0, num_points, num_steps, endpoint=False)): the evenly spaced positions diffusers' LCM and TCD
    schedulers pick in the (descending) grid. numpy's linspace is used on purpose so that the float rounding is the
    same as diffusers'."""
    return np.floor(np.linspace(0, num_points, num=num_steps, endpoint=False)).astype(np.int64).tolist()


def grid_inference_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50,
                             spacing: str = "trailing") -> list[int]:
    """The descending timesteps of an ``num_steps``-step LCM/TCD run on the distillation grid.

    The grid is reversed and evenly spaced positions are taken from it: 1 → [999]; 2 → [999, 499];
    4 → [999, 759, 499, 259]; 8 → [999, 879, 759, 639, 499, 379, 259, 139] (trailing, 50 points); leading, 20
    points: 4 → [951, 701, 451, 201].
    """
    grid = distillation_grid(num_train_timesteps, original_steps, spacing)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= len(grid):
        raise ValueError(f"num_steps={num_steps!r} must be an integer in [1, {len(grid)}] "
                         f"(the number of points of the distillation grid, original_steps={original_steps})")
    desc = grid[::-1]
    return [desc[p] for p in grid_positions(int(num_steps), len(grid))]


def check_num_steps(num_steps: int, low: int, high: int, what: str) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if not low <= num_steps <= high:
        raise ValueError(f"num_steps={num_steps} must be in [{low}, {high}] for {what}")
    return int(num_steps)


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def float32_sigma(eta: float, alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
    """DDIM σ_t(η) = η·sqrt((1 − ᾱ_s)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_s)) (Song et al. 2021, eq. 16), computed in float64 from
    the float32 ᾱ values and rounded to float32, as ldm's ``make_ddim_sampling_parameters`` does."""
    a_t, a_s = float(alpha_t), float(alpha_s)
    return _scalar(eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)))


__all__: Sequence[str] = (
    "StepResult", "TIMESTEP_SPACINGS", "as_schedule", "ddim_update", "distillation_grid", "grid_inference_timesteps",
    "grid_positions",
)
