"""Deterministic phased sampling for Phased Consistency Model students (PCM, Wang et al. 2024, §3 and Algorithm 2).

A PCM student trained with M phases maps any point of a phase to the phase's lower edge with one DDIM (η = 0) jump
that uses its own ε (hard boundary scalings c_skip = 0, c_out = 1). Sampling therefore visits the phase edges, top
to bottom, and jumps from each to the next; the last jump lands on ᾱ[0], the same final edge the training solver
uses (``ddim_alpha_cumprods_prev[0] = ᾱ[0]``).

Where the edges are (50-point grid {19, …, 999}, N = 50). Two placements exist and both are supported:

* ``convention="inference"`` (default, this project): the edges ARE the M-step LCM/TCD inference timesteps,
  4 phases ↔ [999, 759, 499, 259] → 0. Sampling a student trained this way with diffusers'
  ``TCDScheduler(eta=0)`` (what the official PCM demo uses for its LoRAs) visits exactly the training edges.
* ``convention="official"``: the edges of the official training code (G-U-N/Phased-Consistency-Model,
  ``train_pcm_lora_sd15.py``, ``DDIMSolver.ddim_style_multiphase_pred``): edge indices
  E = floor(linspace(0, N, M, endpoint=False)) on the ASCENDING grid, and a start index i jumps to
  ᾱ_prev[max{e ∈ E : e ≤ i}], i.e. to timestep grid[e − 1] (or to ᾱ[0] for e = 0). For M = 4, E = [0, 12, 25, 37],
  so the edges are [739, 499, 239] → 0 and sampling visits [999, 739, 499, 239]. The official demo nevertheless
  samples with ``TCDScheduler`` at [999, 759, 499, 259]: one grid step (20) off at two of the three inner edges.
  The two placements coincide when M divides N (M = 1, 2, 5, 10, 25, 50).

Both are defined by :func:`phase_edge_indices`, which the distillation code (``distill.solver.pcm_phase_edges``) uses
as well, so a student and its sampler agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import (StepResult, as_int_timestep, as_schedule, check_num_steps, check_step_args, ddim_update,
                   distillation_grid, grid_positions)
from .schedule import NoiseSchedule

PCM_CONVENTIONS = ("inference", "official")


def phase_edge_indices(num_phases: int, num_points: int = 50, convention: str = "inference") -> list[int]:
    """Phase edges as ascending indices into the solver's ᾱ_prev table.

    Edge index e stands for the timestep ``grid_prev[e]`` = grid[e − 1] (e ≥ 1) or t = 0 with ᾱ[0] (e = 0), which is
    how the official PCM code indexes them. Grid index i belongs to the phase of e(i) = max{e ∈ E : e ≤ i} and its
    student jumps to ᾱ_prev[e(i)]. ``E[0]`` is always 0.

    Examples (N = 50): inference, M = 4 → [0, 13, 25, 38] (edges 0, 259, 499, 759);
    official, M = 4 → [0, 12, 25, 37] (edges 0, 239, 499, 739).

    Args:
        num_phases: M, 1 ≤ M ≤ N.
        num_points: N, the size of the solver grid.
        convention: "inference" or "official" (module docstring).
    """
    if convention not in PCM_CONVENTIONS:
        raise ValueError(f"pcm: convention={convention!r} must be one of {PCM_CONVENTIONS}")
    is_int = isinstance(num_phases, (int, np.integer)) and not isinstance(num_phases, bool)
    if not is_int or not 1 <= num_phases <= num_points:
        raise ValueError(f"pcm: num_phases={num_phases!r} must be an integer in [1, {num_points}]")
    positions = grid_positions(int(num_phases), num_points)
    if convention == "official":
        return positions
    # The M-step inference timesteps sit at descending positions p_k, i.e. ascending grid indices g_k = N-1-p_k.
    # Below each of g_1..g_{M-1} lies a phase whose lower edge is that timestep: e = g_k + 1 (ᾱ_prev[g+1] = ᾱ[grid[g]]).
    return sorted([0] + [num_points - 1 - p + 1 for p in positions[1:]])


def phase_edge_timesteps(num_phases: int, num_train_timesteps: int = 1000, original_steps: int = 50,
                         convention: str = "inference", spacing: str = "trailing") -> list[int]:
    """The descending timesteps a PCM run visits: the top of the grid, then every inner phase edge.

    The final edge (t = 0, ᾱ[0]) is where the last step lands and is not a model call. inference, M = 4 →
    [999, 759, 499, 259]; official, M = 4 → [999, 739, 499, 239]; inference on the 20-point leading grid, M = 4 →
    [951, 701, 451, 201]. Phase edges are grid indices, so the spacing moves them with the grid.
    """
    grid = distillation_grid(num_train_timesteps, original_steps, spacing)
    edges = phase_edge_indices(num_phases, len(grid), convention)
    return [grid[-1]] + [grid[e - 1] for e in reversed(edges[1:])]


@dataclass(eq=False)
class PCMSampler:
    """Deterministic PCM sampler: DDIM (η = 0) jumps between phase edges with the student's ε.

    Args:
        schedule: the noise schedule.
        num_phases: M the student was trained with (None: accept any step count). With M given, the step count must
            divide M or be a multiple of it, so that every visited timestep is a phase edge (divisor) or every phase
            edge is visited (multiple); other counts would start steps at timesteps the student never learnt to jump
            from, and are rejected.
        convention: where the phase edges are ("inference" or "official"; module docstring).
        original_steps: points of the distillation grid (50).
        timestep_spacing: the grid's spacing, "trailing" or "leading" (:func:`~.base.distillation_grid`).
    """

    schedule: NoiseSchedule | None = None
    num_phases: int | None = None
    convention: str = "inference"
    original_steps: int = 50
    timestep_spacing: str = "trailing"
    name: str = field(default="pcm", init=False)

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        distillation_grid(self.schedule.num_timesteps, self.original_steps, self.timestep_spacing)
        if self.convention not in PCM_CONVENTIONS:
            raise ValueError(f"pcm: convention={self.convention!r} must be one of {PCM_CONVENTIONS}")
        if self.num_phases is not None:
            phase_edge_indices(self.num_phases, self.original_steps, self.convention)  # validates the range

    def timesteps(self, num_steps: int) -> list[int]:
        """Descending timesteps = the ``num_steps``-phase edges (module docstring)."""
        s = check_num_steps(num_steps, 1, self.original_steps, f"pcm (original_steps={self.original_steps})")
        m = self.num_phases
        if m is not None and s % m != 0 and m % s != 0:
            ok = sorted({d for d in range(1, m + 1) if m % d == 0}
                        | {k * m for k in range(2, self.original_steps // m + 1)})
            raise ValueError(f"pcm: a student trained with num_phases={m} is sampled with a number of steps that "
                             f"divides {m} or is a multiple of it (one of {ok}); got num_steps={s}")
        return phase_edge_timesteps(s, self.schedule.num_timesteps, self.original_steps, self.convention,
                                    self.timestep_spacing)

    def step(self, eps: torch.Tensor, t: int, t_next: int | None, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepResult:
        """DDIM (η = 0) jump t → t_next, or to ᾱ[0] after the last step. ``generator`` is unused (deterministic).

        Returns:
            StepResult(prev_sample, denoised = x̂0 at ``t``).
        """
        t = as_int_timestep(t)
        t_next = None if t_next is None else as_int_timestep(t_next, "t_next")
        check_step_args(self.schedule, t, t_next)
        ac = self.schedule.alphas_cumprod.to(x.device)
        prev, x0 = ddim_update(eps, x, ac[t], ac[0] if t_next is None else ac[t_next])
        return StepResult(prev, x0)
