"""Samplers: pure math, one stateless interface for all of them (k-diffusion style: network and sampler apart).

Interface
---------
Every sampler is a small object built by :func:`make_sampler` (or its class) with two methods::

    sampler.timesteps(num_steps) -> list[int]
        # the DESCENDING timesteps at which the model is called, e.g. lcm 4 → [999, 759, 499, 259]

    sampler.step(eps, t, t_next, x, generator=None) -> StepResult(prev_sample, denoised)
        # eps:    (B, C, H, W) the ε-prediction at x / t, already guided (CFG is the pipeline's business)
        # t:      the current timestep (an element of timesteps())
        # t_next: the next element of the list, or None after the last one
        # x:      (B, C, H, W) the current latent
        # prev_sample: the latent at t_next; after the last step the sample to decode
        # denoised:    the step's estimate of x0

After the last step ddim, tcd and pcm return the latent at ᾱ[0] (as the original and diffusers do; it still holds
sqrt(1 − ᾱ[0]) ≈ 0.029 of ε), lcm returns its denoised estimate; in every case ``prev_sample`` is what to decode.

No state is kept between calls, so steps can be replayed, skipped or run for several images in any order. The one loop over
them is ``pipeline.sample``: ``ts = s.timesteps(n)``, then for each t
``x = s.step(denoiser(x, t), t, next_t_or_None, x, g).prev_sample``.

Samplers
--------
====  =====================================================================  ====================================
name  what                                                                   options (defaults)
====  =====================================================================  ====================================
ddim  the teacher's ldm DDIM: timesteps range(0, T, T//S)+1, last → ᾱ[0]     eta (0.0)
lcm   diffusers LCMScheduler: boundary condition, fresh-noise restarts       original_steps (50),
                                                                             timestep_spacing ("trailing"),
                                                                             timestep_scaling (10.0),
                                                                             sigma_data (0.5)
tcd   diffusers TCDScheduler: DDIM jump to floor((1-γ)·t_next), re-noise     gamma (0.3), original_steps (50),
                                                                             timestep_spacing ("trailing")
pcm   deterministic DDIM jumps between PCM phase edges                       num_phases (None),
                                                                             convention ("inference"),
                                                                             original_steps (50),
                                                                             timestep_spacing ("trailing")
====  =====================================================================  ====================================

Randomness: samplers that draw noise (ddim η > 0, lcm, tcd γ > 0) take it from ``generator`` with one
``torch.randn(x.shape, generator=...)`` per step, exactly as diffusers does; the same seed therefore reproduces
diffusers' schedulers number for number.
"""

from __future__ import annotations

import dataclasses

from .base import StepResult, distillation_grid, grid_inference_timesteps
from .ddim import DDIMSampler, ldm_ddim_timesteps
from .lcm import LCMSampler, scalings_for_boundary_conditions
from .pcm import PCMSampler, phase_edge_indices, phase_edge_timesteps
from .schedule import NoiseSchedule
from .tcd import TCDSampler

SAMPLERS = {"ddim": DDIMSampler, "lcm": LCMSampler, "tcd": TCDSampler, "pcm": PCMSampler}


def sampler_options(name: str) -> tuple[str, ...]:
    """The option names :func:`make_sampler` accepts for sampler ``name``."""
    cls = _lookup(name)
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "schedule")


def _lookup(name: str):
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


def make_sampler(name: str, schedule: NoiseSchedule | None = None, **options):
    """Build a sampler by name.

    Args:
        name: "ddim", "lcm", "tcd" or "pcm".
        schedule: the noise schedule (None: AnyText2's default).
        **options: the sampler's options (table above).

    Raises:
        ValueError: unknown name, unknown option (the message lists the valid ones) or invalid option value.
    """
    cls = _lookup(name)
    allowed = sampler_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(allowed) or '(none)'}")
    return cls(schedule=schedule, **options)


__all__ = [
    "DDIMSampler", "LCMSampler", "NoiseSchedule", "PCMSampler", "SAMPLERS", "StepResult", "TCDSampler",
    "distillation_grid", "grid_inference_timesteps", "ldm_ddim_timesteps", "make_sampler", "phase_edge_indices",
    "phase_edge_timesteps", "sampler_options", "scalings_for_boundary_conditions",
]
