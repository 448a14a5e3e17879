"""Phased consistency distillation (PCM, Wang et al. 2024, arXiv 2405.18407, §3.1–3.3 and Algorithm 1) for AnyText2,
beside LCM in the same trainer (``method: pcm``).

What changes against :func:`~.lcm.lcm_step` (everything else — one network with the teacher as the adapters-off
student, the WriteNet residuals computed once, AnyText2's CFG semantics, the pair (t_{n+k}, t_n) on the N-point
grid, the per-sample draws, pseudo-Huber — is shared):

* **Phases.** The grid is cut into M phases at the edges E = :func:`~.solver.pcm_phase_edges` (M = 4, "inference"
  convention: timesteps 759, 499, 259 and 0). Grid index i belongs to the phase of its lower edge
  e(i) = max{e ∈ E : e ≤ i}.
* **Student** (PCM eq. 5, hard boundary condition c_skip = 0, c_out = 1): the student's x̂0 and ε at (x_t, t_{n+k})
  taken by one DDIM (η = 0) jump to the phase edge, ``solver.phase_jump`` — the parameterisation the deterministic
  sampler uses (:class:`~anytext2_lcm.samplers.PCMSampler`).
* **Target** (PCM eq. 6): the no-grad student at (x_prev, t_n) jumped to the *same* edge; when i is itself an edge
  index the teacher's step already ends on the edge and the target is x_prev (c_skip = 1, c_out = 0,
  :func:`~.solver.pcm_target`). Consistency is thus enforced only inside a phase, never across an edge.
* **CFG-free teacher** (optional, ``pcm.cfg_free_teacher``; the official ``--not_apply_cfg_solver`` with
  ``--proportion_empty_prompts``): the teacher's solver step uses the cond branch alone (no uncond pass, w unused)
  and a fraction of samples get empty prompts (by default the negative prompt and no text prompt: the uncond branch
  CFG samples with) for all three passes. The student then follows the teacher's unguided ODE for both prompted and
  empty inputs, and is sampled with real CFG and negative prompts.
* **Guided student** (optional, ``pcm.guided_student``; not in the paper): the teacher is guided as by default, and
  the student and the target are the CFG combination of the adapter-on network's own cond and uncond branches at the
  same w (one 2B call each). The student is then sampled with real CFG at that scale and is trained exactly as it
  is sampled: its phase jumps are those of the guided ODE that the teacher's many-step sampler follows. With the
  adapter at zero it *is* the teacher's phased DDIM with CFG (the undistilled control), so training starts from
  that control instead of from the unguided network; the CFG-free student, in contrast, learns each branch's
  unguided ODE and is combined only at sampling, which is not the map it learnt. Costs two student passes per
  sample (the teacher's guided step already runs both branches).

The adversarial consistency term of the paper (§3.4) is not implemented; ``docs/methods.md`` discusses whether it
would pay off here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..defaults import student_sampling, teacher_cfg, trained_cfg
from ..lora import disable_adapters, save_lora
from ..pipeline import GuidedDenoiser, branch_prompts, encode_branches
from ..samplers.schedule import NoiseSchedule
from .batch import StepOutput, TrainBatch
from .lcm import (DistillConditions, LCMMethod, distance, draw_step, guided_teacher, student_eps, student_guided_eps,
                  target_eps, target_guided_eps)
from .solver import DDIMSolver, pcm_phase_edges, pcm_target, predicted_original_sample

__all__ = ["PCMMethod", "draw_empty_prompts", "pcm_conditions", "pcm_step"]


def draw_empty_prompts(gens: list[torch.Generator], fraction: float) -> list[bool]:
    """Per sample: empty its prompts with probability ``fraction`` (one uniform from the sample's own generator, so
    the choice does not depend on the rank or on resuming). ``fraction`` 0 draws nothing and empties nothing."""
    if fraction <= 0:
        return [False] * len(gens)
    return [bool(torch.rand((1,), generator=g) < fraction) for g in gens]


@torch.no_grad()
def pcm_conditions(model: nn.Module, tb: TrainBatch, a_prompt: str, n_prompt: str, empty: list[bool],
                   cfg_free: bool, empty_image_prompt: str = "", writenet_lora: bool = False) -> DistillConditions:
    """Contexts and WriteNet residuals of a PCM micro-step (adapters off), one batched WriteNet call.

    Args:
        empty: per sample, whether its prompts are replaced by (``empty_image_prompt``, "") — the shape of AnyText2's
            uncond branch; glyphs, positions, font hints, colours and masked_x stay.
        cfg_free: no uncond branch is encoded (the CFG-free teacher never uses it).
    """
    p = branch_prompts(tb.img_captions, tb.text_captions, a_prompt, n_prompt, guided=not cfg_free)
    img = [empty_image_prompt if e else c for c, e in zip(p.img, empty)]
    txt = ["" if e else t for t, e in zip(p.text, empty)]
    with disable_adapters(model):
        branches = encode_branches(model, tb.text_info, img, txt, p.neg_img, p.neg_text)
    return DistillConditions(branches, None if writenet_lora else branches.control_cond)


def pcm_step(net: nn.Module, model: nn.Module, tb: TrainBatch, solver: DDIMSolver, schedule: NoiseSchedule,
             edges: torch.Tensor, guidance_scale_range: tuple[float, float], cfg_free: bool = False,
             empty_prompt_fraction: float = 0.0, empty_image_prompt: str = "", a_prompt: str = "",
             n_prompt: str = "", writenet_lora: bool = False, loss_type: str = "huber", huber_c: float = 0.001,
             text_loss_weight: float = 0.0, strength: float = 1.0, attnx_scale: float = 1.0,
             x0_term=None, guided_student: bool = False) -> StepOutput:
    """One PCM consistency-distillation loss (B samples, latents (B, 4, h, w)).

    Args:
        net: the student's grad-carrying forward (:class:`~.lcm.DenoiserNet`, possibly DDP-wrapped).
        model: the AnyText2 with its LoRA; the teacher is ``model`` inside ``disable_adapters``.
        tb: the prepared batch; sample b draws, from ``tb.gens[b]`` and in this order, its grid index, its guidance
            weight, its noise (exactly LCM's draws, so an LCM and a PCM run with the same seed see the same pairs
            and noise) and then, with ``cfg_free``, whether its prompts are emptied.
        edges: (M,) ascending phase-edge indices (:func:`~.solver.pcm_phase_edges`).
        guidance_scale_range: Imagen-form CFG scale range of the guided teacher (unused with ``cfg_free``).
        cfg_free: CFG-free teacher with empty prompts at ``empty_prompt_fraction``.
        guided_student: the student's and the target's ε are the LCM-form CFG combination (1 + w)·ε_c − w·ε_u of the
            adapter-on network at the sample's w (needs the guided teacher: ``cfg_free`` False).
        x0_term: as in :func:`~.lcm.lcm_step`, called with the student's x̂0 at t_{n+k} (with grad) and the
            teacher's x̂0 there (twice: PCM's target is a phase edge, not an x̂0).
    Returns:
        ``StepOutput``; ``tensors``: index, start, end, edge, w, empty, x_t, student, x_prev, target_jump, target.
    """
    if guided_student and cfg_free:
        raise ValueError("pcm.guided_student needs the guided teacher (pcm.cfg_free_teacher: false)")
    # 1. The draws of LCM (same generators, same order), then, CFG-free, whether the prompts are emptied.
    d = draw_step(tb, solver, guidance_scale_range)
    empty = draw_empty_prompts(tb.gens, empty_prompt_fraction if cfg_free else 0.0)
    cond = pcm_conditions(model, tb, a_prompt, n_prompt, empty, cfg_free, empty_image_prompt, writenet_lora)

    # 2. Forward diffusion to t_{n+k}.
    x_t = schedule.add_noise(tb.latents, d.noise, d.start)

    # 3. Online student with grad, c_skip = 0 / c_out = 1: its DDIM jump from t_{n+k} to the lower edge of i's phase
    #    (guided student: of its own CFG combination at w, both branches in one call).
    if guided_student:
        eps = student_guided_eps(net, cond, tb, x_t, d.start, d.w, strength, attnx_scale)
    else:
        eps = student_eps(net, cond, tb, x_t, d.start, strength, attnx_scale)
    student_x0 = predicted_original_sample(eps, x_t, d.start, schedule)
    student, edge_t = solver.phase_jump(student_x0, eps, d.index, edges)

    with torch.no_grad():
        # 4. Teacher (adapters off), one DDIM step t_{n+k} → t_n. CFG-free: the cond branch alone; else guided in
        #    the LCM form with both branches batched, as in LCM.
        if cfg_free:
            with disable_adapters(model):
                pred_eps = GuidedDenoiser(model, cond.teacher, 1.0, strength, attnx_scale).cond(x_t, d.start).float()
            pred_x0 = predicted_original_sample(pred_eps, x_t, d.start, schedule)
        else:
            pred_x0, pred_eps = guided_teacher(model, cond, x_t, d.start, d.w, schedule, strength, attnx_scale)
        x_prev = solver.ddim_step(pred_x0, pred_eps, d.index)

        # 5. Target: the no-grad student at (x_prev, t_n) jumped to the same edge, or x_prev itself where i is an
        #    edge index (the teacher's step already landed on the edge).
        if guided_student:
            eps_t = target_guided_eps(model, cond, tb, x_prev, d.end, d.w, strength, attnx_scale)
        else:
            eps_t = target_eps(model, cond, tb, x_prev, d.end, strength, attnx_scale)
        target_jump, _ = solver.phase_jump(predicted_original_sample(eps_t, x_prev, d.end, schedule), eps_t, d.index,
                                           edges)
        target = pcm_target(x_prev, target_jump, d.index, edges)

    # 6. Distance, as LCM (+ the text-aware term).
    loss = distance(student, target, tb, loss_type, huber_c, text_loss_weight)
    logs = {"w": float(d.w.mean()), "t": float(d.start.float().mean()), "empty_prompts": sum(empty) / len(empty)}
    if x0_term is not None:
        extra, extra_logs = x0_term(student_x0, pred_x0, pred_x0, d.start)
        loss = loss + extra
        logs.update(extra_logs)
    return StepOutput(loss, logs,
                      {"index": d.index, "start": d.start, "end": d.end, "edge": edge_t, "w": d.w,
                       "empty": torch.tensor(empty), "x_t": x_t.detach(), "student": student.detach(),
                       "x_prev": x_prev, "target_jump": target_jump, "target": target})


class PCMMethod(LCMMethod):
    """PCM-LoRA: the LCM-LoRA setup (adapter, frozen teacher, solver) with the phased objective :func:`pcm_step`."""

    name = "pcm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.edges = None

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        params = super().configure_model(model)
        p = self.cfg.pcm
        self.edges = pcm_phase_edges(p.num_phases, self.solver.num_ddim_timesteps, p.convention)
        return params

    def step(self, net: nn.Module, model: nn.Module, tb: TrainBatch) -> StepOutput:
        d, p = self.cfg.distill, self.cfg.pcm
        empty_image = d.n_prompt if p.empty_image_prompt is None else p.empty_image_prompt
        return pcm_step(net, model, tb, self.solver, self.schedule, self.edges, d.guidance_scale_range,
                        p.cfg_free_teacher, p.empty_prompt_fraction, empty_image, d.a_prompt, d.n_prompt,
                        self.writenet_lora, d.loss, d.huber_c, d.text_loss_weight, d.control_strength,
                        d.attnx_scale, self.x0_term(model, tb), p.guided_student)

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        name = self.cfg.lora.adapter_name
        p, n = self.cfg.pcm, self.cfg.distill.num_ddim_timesteps
        # How to sample this adapter (generate / evaluate / the UI read it when no sampler is given): a student of a
        # CFG-free teacher is guided with the teacher model's own scale, a guided student with the scale it learnt.
        r = self.cfg.distill.guidance_scale_range
        cfg = trained_cfg(r, teacher_cfg(model.cfg)) if p.guided_student else teacher_cfg(model.cfg)
        sampling = student_sampling("pcm", p.num_phases, p.convention, n, p.cfg_free_teacher or p.guided_student, cfg,
                                    self.cfg.distill.timestep_spacing)
        meta = {"method": self.name, "num_phases": str(p.num_phases), "convention": p.convention,
                "num_ddim_timesteps": str(n), "timestep_spacing": self.cfg.distill.timestep_spacing,
                "cfg_free_teacher": str(p.cfg_free_teacher).lower(),
                "guided_student": str(p.guided_student).lower(),
                "guidance_scale_range": json.dumps(list(self.cfg.distill.guidance_scale_range)),
                "sampling": json.dumps(sampling.to_dict())}
        return [save_lora(model, output_dir / "adapter", name, metadata=meta),
                save_lora(model, output_dir / "adapter.safetensors", name, metadata=meta)]
