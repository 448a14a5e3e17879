"""Distillation math without models: the skipping-step DDIM solver, the LCM boundary condition, teacher guidance in
the LCM form and the phased (PCM) targets.

References: LCM (Luo et al. 2023, arXiv 2310.04378) Algorithm 1 and eq. (8)-(9); the diffusers script
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` (the grid, the pair sampling, the solver);
PCM (Wang et al. 2024, arXiv 2405.18407) and its official ``train_pcm_lora_sd15.py`` (phase edges and targets).

One training step, in the shapes used here (B latents (B, 4, h, w), grid index i (B,)):

    LCM:  i ~ U{0..N-1};  t = grid[i], t_n = max(t - k, 0);  x_t = q(x_t | x_0)
          student   f = c_skip(t)·x_t + c_out(t)·x̂0_student(x_t, t)
          teacher   x̂0, ε̂ = guided(cond, uncond, w);  x_prev = solver.ddim_step(x̂0, ε̂, i)   (lands on t_n)
          target    c_skip(t_n)·x_prev + c_out(t_n)·x̂0_student(x_prev, t_n)   (no grad)
    PCM:  same pair, but both the student and the target jump with DDIM to the lower edge of i's phase, with hard
          scalings: student c_skip = 0, c_out = 1; target c_skip = 1, c_out = 0 when i is itself an edge index (the
          teacher's x_prev already lies on the edge), else c_skip = 0, c_out = 1 (:func:`pcm_target`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..samplers.base import as_schedule, distillation_grid
from ..samplers.lcm import scalings_for_boundary_conditions
from ..samplers.pcm import PCM_CONVENTIONS, phase_edge_indices
from ..samplers.schedule import NoiseSchedule

__all__ = [
    "DDIMSolver", "SkipPair", "consistency_output", "imagen_scale_to_lcm_w", "lcm_guidance",
    "lcm_w_to_imagen_scale", "pcm_lower_edge", "pcm_phase_edges", "pcm_target", "pcm_target_scalings",
    "predicted_original_sample", "sample_guidance_w", "scalings_for_boundary_conditions",
]


def _as_batch_t(t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) long tensor on ``like``'s device (an int is repeated over the batch)."""
    if not isinstance(t, torch.Tensor):
        return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)
    t = t.to(like.device).long()
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, …) matching ``like``'s rank, on its device and in its dtype."""
    return v.to(device=like.device, dtype=like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------------------------
# ε / x0 conversions and the LCM boundary condition
# ---------------------------------------------------------------------------------------------------------------


def predicted_original_sample(eps: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor,
                              schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t) for an ε-prediction (DDPM eq. 15 rearranged).

    Args:
        eps, x_t: (B, C, H, W).
        t: (B,) integer timesteps (or one int for the whole batch).
        schedule: the noise schedule (default AnyText2's).
    """
    schedule = as_schedule(schedule)
    a = schedule.alphas_cumprod.to(x_t.device)[_as_batch_t(t, x_t)]
    return (x_t - _bcast((1.0 - a).sqrt(), x_t) * eps) / _bcast(a.sqrt(), x_t)


def consistency_output(x_t: torch.Tensor, pred_x0: torch.Tensor, t: int | torch.Tensor,
                       timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> torch.Tensor:
    """The LCM consistency function f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0 (LCM eq. 9), per sample.

    Args:
        x_t, pred_x0: (B, C, H, W).
        t: (B,) timesteps or one int (f(x, 0) = x exactly).
    """
    c_skip, c_out = scalings_for_boundary_conditions(_as_batch_t(t, x_t), timestep_scaling, sigma_data)
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * pred_x0


# ---------------------------------------------------------------------------------------------------------------
# Guidance (LCM form)
# ---------------------------------------------------------------------------------------------------------------


def lcm_guidance(cond: torch.Tensor, uncond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Teacher guidance in the LCM-paper form: cond + w·(cond − uncond) = (1 + w)·cond − w·uncond (LCM eq. 11).

    AnyText2 (and diffusers pipelines) use the Imagen form uncond + s·(cond − uncond); the two agree for
    w = s − 1 (:func:`imagen_scale_to_lcm_w`), so AnyText2's default scale 9 (demo 7.5) is w = 8 (6.5).
    Apply it to ε and to x̂0 alike (both are affine in the network output).

    Args:
        cond, uncond: (B, …) the conditional and unconditional predictions.
        w: a float or a (B,) tensor (one weight per sample).
    """
    if isinstance(w, torch.Tensor) and w.dim() > 0:
        if w.dim() == 1:
            w = _bcast(w, cond)
        else:
            w = w.to(device=cond.device, dtype=cond.dtype)
    return cond + w * (cond - uncond)


def imagen_scale_to_lcm_w(scale: float) -> float:
    """Imagen/diffusers/AnyText2 CFG scale s → LCM guidance weight w = s − 1."""
    return scale - 1.0


def lcm_w_to_imagen_scale(w: float) -> float:
    """LCM guidance weight w → Imagen-form scale s = w + 1."""
    return w + 1.0


def sample_guidance_w(batch: int, w_min: float, w_max: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """w ~ U[w_min, w_max] per sample, shape (B,), float32 (the diffusers scripts draw the same way; w_min = w_max
    gives a fixed weight)."""
    if not w_min <= w_max:
        raise ValueError(f"w_min={w_min} must be <= w_max={w_max}")
    u = torch.rand((batch,), generator=generator, device=device)
    return (w_max - w_min) * u + w_min


# ---------------------------------------------------------------------------------------------------------------
# The skipping-step DDIM solver
# ---------------------------------------------------------------------------------------------------------------


class SkipPair(NamedTuple):
    """A sampled (t_{n+k}, t_n) pair per sample.

    Attributes:
        index: (B,) grid index i ∈ [0, N).
        start: (B,) t_{n+k} = grid[i].
        end: (B,) t_n = max(grid[i] − k, 0).
    """

    index: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


class DDIMSolver:
    """The DDIM ODE solver on the N-point distillation grid (N = 50, k = T/N = 20 → {19, 39, …, 999}; ``spacing``
    "leading": the teacher's own DDIM timesteps, N = 20 → {1, 51, …, 951}, :func:`~..samplers.base.distillation_grid`).

    Attributes:
        step_ratio: k.
        ddim_timesteps: (N,) long, grid[i] = k·(i + 1) − 1 (leading: k·i + 1).
        ddim_timesteps_prev: (N,) long, grid[i − 1] and 0 for i = 0 (the timestep x_prev lands on).
        ddim_alphas: (N,) float32, ᾱ[grid[i]].
        ddim_alphas_prev: (N,) float32, ᾱ[grid[i − 1]] and ᾱ[0] (not 1) for i = 0.
    """

    def __init__(self, schedule: NoiseSchedule | None = None, num_ddim_timesteps: int = 50,
                 spacing: str = "trailing"):
        self.schedule = as_schedule(schedule)
        T = self.schedule.num_timesteps
        grid = distillation_grid(T, num_ddim_timesteps, spacing)
        self.num_ddim_timesteps = num_ddim_timesteps
        self.step_ratio = T // num_ddim_timesteps
        ac = self.schedule.alphas_cumprod
        self.ddim_timesteps = torch.tensor(grid, dtype=torch.long)
        self.ddim_timesteps_prev = torch.tensor([0] + grid[:-1], dtype=torch.long)
        self.ddim_alphas = ac[self.ddim_timesteps].clone()
        # ᾱ_prev[0] is ᾱ at t = 0: the lowest pair (19 → 0) lands on the first training timestep, not on ᾱ = 1.
        self.ddim_alphas_prev = ac[self.ddim_timesteps_prev].clone()

    def to(self, device: torch.device | str) -> "DDIMSolver":
        for name in ("ddim_timesteps", "ddim_timesteps_prev", "ddim_alphas", "ddim_alphas_prev"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample_pairs(self, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> SkipPair:
        """i ~ U{0..N−1} per sample (diffusers' ``torch.randint(0, N, (B,))``); start = grid[i],
        end = max(start − k, 0)."""
        index = torch.randint(0, self.num_ddim_timesteps, (batch,), generator=generator,
                              device=device if device is not None else self.ddim_timesteps.device)
        start = self.ddim_timesteps.to(index.device)[index]
        end = (start - self.step_ratio).clamp(min=0)
        return SkipPair(index, start, end)

    def ddim_step(self, pred_x0: torch.Tensor, pred_eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step from grid[i] to grid[i − 1] (or t = 0): sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev)·ε̂.

        Args:
            pred_x0, pred_eps: (B, C, H, W) the (guided) teacher predictions at grid[i].
            index: (B,) grid indices.

        Returns:
            (B, C, H, W) x_prev on t_n.
        """
        return self._jump(pred_x0, pred_eps, index)

    def _jump(self, pred_x0: torch.Tensor, pred_eps: torch.Tensor, prev_index: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.ddim_alphas_prev.to(pred_x0.device)[prev_index.to(pred_x0.device)], pred_x0)
        return a.sqrt() * pred_x0 + (1.0 - a).sqrt() * pred_eps

    # ---- PCM -------------------------------------------------------------------------------------------------

    def phase_jump(self, pred_x0: torch.Tensor, pred_eps: torch.Tensor, index: torch.Tensor,
                   edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM (η = 0) jump from grid[i] (or from t_n, for the target) to the lower edge of i's phase.

        This is ``DDIMSolver.ddim_style_multiphase_pred`` of the official PCM code: the edge index
        e(i) = max{e ∈ E : e ≤ i}, and the jump lands on ᾱ_prev[e(i)].

        Args:
            pred_x0, pred_eps: (B, C, H, W) predictions at the point being mapped.
            index: (B,) grid index i of the pair (the same i for the student and for the target).
            edges: (M,) edge indices from :func:`pcm_phase_edges`.

        Returns:
            (x_edge (B, C, H, W), edge_timesteps (B,) long, 0 for the final edge).
        """
        e = pcm_lower_edge(index, edges)
        return self._jump(pred_x0, pred_eps, e), self.ddim_timesteps_prev.to(e.device)[e]


# ---------------------------------------------------------------------------------------------------------------
# PCM phases
# ---------------------------------------------------------------------------------------------------------------


def pcm_phase_edges(num_phases: int, grid: torch.Tensor | list[int] | int = 50,
                    convention: str = "inference") -> torch.Tensor:
    """Phase edges of a PCM student as ascending indices into the solver's ᾱ_prev table, shape (M,), long.

    Edge index e means the timestep ``ddim_timesteps_prev[e]`` (grid[e − 1], or 0 with ᾱ[0] for e = 0). The same
    function places the sampler's timesteps (:class:`anytext2_lcm.samplers.PCMSampler`).

    * "inference" (default): edges at the M-step LCM/TCD timesteps. M = 4 → [0, 13, 25, 38] = timesteps
      0, 259, 499, 759: sampling [999, 759, 499, 259] → 0.
    * "official": the official PCM training code's E = floor(linspace(0, N, M, endpoint=False)). M = 4 →
      [0, 12, 25, 37] = timesteps 0, 239, 499, 739: sampling [999, 739, 499, 239] → 0.

    Args:
        num_phases: M.
        grid: the solver grid (only its length N matters) or N itself.
        convention: "inference" or "official".
    """
    n = grid if isinstance(grid, int) else len(grid)
    if convention not in PCM_CONVENTIONS:
        raise ValueError(f"pcm: convention={convention!r} must be one of {PCM_CONVENTIONS}")
    return torch.tensor(phase_edge_indices(num_phases, n, convention), dtype=torch.long)


def pcm_lower_edge(index: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """e(i) = max{e ∈ E : e ≤ i} for each grid index, shape (B,) long. Since E[0] = 0 every index has one."""
    edges = edges.to(index.device)
    # searchsorted(right) - 1 is the position of the last edge <= i.
    pos = torch.searchsorted(edges, index.long(), right=True) - 1
    return edges[pos]


def pcm_target_scalings(index: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard boundary scalings of the PCM target, (B,) float32 each.

    c_skip = 1, c_out = 0 when i is an edge index (then the teacher step from grid[i] ends exactly on i's lower
    edge, so x_prev itself is the target); otherwise c_skip = 0, c_out = 1 (the target is the no-grad student's
    jump from x_prev to the edge). The online student always uses c_skip = 0, c_out = 1.
    """
    c_skip = torch.isin(index, edges.to(index.device)).to(torch.float32)
    return c_skip, 1.0 - c_skip


def pcm_target(x_prev: torch.Tensor, target_jump: torch.Tensor, index: torch.Tensor,
               edges: torch.Tensor) -> torch.Tensor:
    """PCM target = c_skip·x_prev + c_out·target_jump with :func:`pcm_target_scalings`.

    Args:
        x_prev: (B, C, H, W) the teacher's solver result on t_n.
        target_jump: (B, C, H, W) ``solver.phase_jump`` of the no-grad student evaluated at (x_prev, t_n).
        index, edges: as in :meth:`DDIMSolver.phase_jump`.
    """
    c_skip, c_out = pcm_target_scalings(index, edges)
    return _bcast(c_skip, x_prev) * x_prev + _bcast(c_out, x_prev) * target_jump
