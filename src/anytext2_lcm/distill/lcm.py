"""The LCM-LoRA distillation step for AnyText2 (Luo et al. 2023, arXiv 2310.04378, Algorithm 1; LCM-LoRA, arXiv
2311.05556), in the form of diffusers' ``train_lcm_distill_lora_sd_wds.py`` with AnyText2's conditioning.

One network in memory: the teacher is the student with its LoRA disabled (``lora.disable_adapters``). The WriteNet
is frozen and, with fast control, its residuals depend only on the text conditioning — not on x_t or t — so each
micro-step runs it once, batched over cond and uncond, and reuses the residuals for the student, both teacher
branches and the target (:func:`distill_conditions`). When a LoRA sits inside the WriteNet (``lora.zero_convs`` or
a WriteNet preset) the residuals depend on the adapter: the teacher then gets them with adapters disabled, the
student recomputes its cond residuals with the adapter and with grad, and the target uses those values without grad.

Teacher guidance mirrors AnyText2 inference: cond = (image caption + ", " + a_prompt, text caption with ``*``
placeholders); uncond = (n_prompt, "") with the same glyphs, positions, font hints, colours and masked_x. The scale
s is drawn per sample from ``distill.guidance_scale_range`` (Imagen form) and applied in the LCM form with w = s − 1
to both x̂0 and ε̂. The LoRA student has no w-embedding: it learns the guided ODE over that band.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..defaults import student_sampling
from ..lora import LoraSpec, apply_lora, disable_adapters, lora_layers, save_lora
from ..pipeline import Branches, GuidedDenoiser, branch_prompts, encode_branches, pad_contexts
from ..samplers.schedule import NoiseSchedule
from .batch import Method, StepOutput, TrainBatch, randn_per_sample, text_weight_map
from .losses import huber_loss, l2_loss
from .ocr_loss import ocr_text_loss
from .solver import (DDIMSolver, consistency_output, imagen_scale_to_lcm_w, lcm_guidance, predicted_original_sample,
                     sample_guidance_w)

log = logging.getLogger(__name__)


class DenoiserNet(nn.Module):
    """The student's grad-carrying forward, as one module for DistributedDataParallel.

    ``forward(x, t, image_context, control)`` → ε (B, 4, h, w). With ``control=None`` the WriteNet residuals are
    computed inside (from ``text_context`` and ``text_info``), so that a LoRA in the WriteNet gets its gradient
    through the same DDP call. ``text_context`` may be a tuple of per-branch contexts (cond, uncond) over the same
    ``text_info``: their residuals are concatenated along the batch, for a 2B call of both CFG branches
    (``context_mask`` then masks the padded image contexts, as in :class:`~anytext2_lcm.pipeline.GuidedDenoiser`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, image_context, control=None, text_context=None, text_info=None, strength=1.0,
                attnx_scale=1.0, context_mask=None):
        if control is None:
            if isinstance(text_context, (tuple, list)):
                parts = [self.model.control(c, text_info) for c in text_context]
                control = [torch.cat(r) for r in zip(*parts)]
            else:
                control = self.model.control(text_context, text_info)
        return self.model.denoise(x, t, image_context, control, strength, attnx_scale, context_mask)


@dataclass
class DistillConditions:
    """The conditioning of a micro-step, computed once.

    Attributes:
        teacher: cond and uncond contexts with the teacher's WriteNet residuals (adapters disabled, no grad).
        student_control: the residuals the student and the target use; None when a LoRA in the WriteNet makes them
            adapter-dependent (the student then computes its own with grad, see :class:`DenoiserNet`).
    """

    teacher: Branches
    student_control: list[torch.Tensor] | None


def has_writenet_lora(model: nn.Module) -> bool:
    return any(name.startswith("control_model.") for name in lora_layers(model))


@torch.no_grad()
def distill_conditions(model: nn.Module, tb: TrainBatch, a_prompt: str, n_prompt: str,
                       writenet_lora: bool | None = None) -> DistillConditions:
    """Line embeddings, CLIP contexts and WriteNet residuals for cond and uncond: one batched WriteNet call.

    ``writenet_lora``: whether a LoRA sits in the WriteNet (None: look it up).
    """
    p = branch_prompts(tb.img_captions, tb.text_captions, a_prompt, n_prompt)
    with disable_adapters(model):
        branches = encode_branches(model, tb.text_info, p.img, p.text, p.neg_img, p.neg_text)
    if writenet_lora is None:
        writenet_lora = has_writenet_lora(model)
    return DistillConditions(branches, None if writenet_lora else branches.control_cond)


@dataclass
class StepDraws:
    """A micro-step's per-sample draws, each from the sample's own generator and in this order: the grid index i
    (t_{n+k} = ``start``, t_n = ``end``), the guidance weight w = s − 1 and the noise (B, 4, h, w)."""

    index: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor


def draw_step(tb: TrainBatch, solver: DDIMSolver, guidance_scale_range: tuple[float, float]) -> StepDraws:
    """Skipping-step pair on the DDIM grid (Alg. 1, k = T / N): i ~ U{0..N−1}, t_{n+k} = grid[i],
    t_n = max(t_{n+k} − k, 0); guidance w = s − 1 with s ~ U[low, high] (Imagen form); then the noise."""
    device = tb.latents.device
    pairs = [solver.sample_pairs(1, generator=g) for g in tb.gens]
    lo, hi = (imagen_scale_to_lcm_w(s) for s in guidance_scale_range)
    w = torch.cat([sample_guidance_w(1, lo, hi, generator=g) for g in tb.gens]).to(device)
    noise = randn_per_sample(tb.gens, tuple(tb.latents.shape[1:]), device)
    return StepDraws(torch.cat([p.index for p in pairs]).to(device), torch.cat([p.start for p in pairs]).to(device),
                     torch.cat([p.end for p in pairs]).to(device), w, noise)


def student_eps(net: nn.Module, cond: DistillConditions, tb: TrainBatch, x_t: torch.Tensor, t: torch.Tensor,
                strength: float, attnx_scale: float) -> torch.Tensor:
    """ε of the online student with grad (cond branch only) through ``net`` (the DDP-wrapped forward)."""
    image_context = cond.teacher.cond.image_context
    if cond.student_control is not None:
        return net(x_t, t, image_context, cond.student_control, strength=strength, attnx_scale=attnx_scale)
    return net(x_t, t, image_context, None, cond.teacher.cond.text_context, tb.text_info, strength, attnx_scale)


@torch.no_grad()
def target_eps(model: nn.Module, cond: DistillConditions, tb: TrainBatch, x: torch.Tensor, t: torch.Tensor,
               strength: float, attnx_scale: float) -> torch.Tensor:
    """ε of the same student without grad (no separate target network for a LoRA student), cond branch only."""
    control = cond.student_control
    if control is None:
        control = model.control(cond.teacher.cond.text_context, tb.text_info)
    return model.denoise(x, t, cond.teacher.cond.image_context, control, strength, attnx_scale)


def student_guided_eps(net: nn.Module, cond: DistillConditions, tb: TrainBatch, x_t: torch.Tensor, t: torch.Tensor,
                       w: torch.Tensor, strength: float, attnx_scale: float) -> torch.Tensor:
    """The online student's own CFG combination (1 + w)·ε_c − w·ε_u with grad (float32), both branches in one 2B
    call through ``net`` (one DDP forward). Needs the uncond branch in ``cond.teacher``; with a WriteNet LoRA the
    residuals of both branches are computed inside ``net`` with the adapter."""
    br = cond.teacher
    context, mask = pad_contexts([br.cond.image_context, br.uncond.image_context])
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    if cond.student_control is not None:
        control = [torch.cat([c, u]) for c, u in zip(cond.student_control, br.control_uncond)]
        eps = net(x2, t2, context, control, strength=strength, attnx_scale=attnx_scale, context_mask=mask)
    else:
        eps = net(x2, t2, context, None, (br.cond.text_context, br.uncond.text_context), tb.text_info, strength,
                  attnx_scale, mask)
    B = x_t.shape[0]
    return lcm_guidance(eps[:B].float(), eps[B:].float(), w)


@torch.no_grad()
def target_guided_eps(model: nn.Module, cond: DistillConditions, tb: TrainBatch, x: torch.Tensor, t: torch.Tensor,
                      w: torch.Tensor, strength: float, attnx_scale: float) -> torch.Tensor:
    """The same CFG combination of the student without grad (adapters on), both branches in one batched call."""
    br = cond.teacher
    if cond.student_control is not None:
        controls = cond.student_control, br.control_uncond
    else:
        controls = (model.control(br.cond.text_context, tb.text_info),
                    model.control(br.uncond.text_context, tb.text_info))
    eps_c, eps_u = GuidedDenoiser(model, Branches(br.cond, controls[0], br.uncond, controls[1]), 1.0, strength,
                                  attnx_scale).split(x, t)
    return lcm_guidance(eps_c.float(), eps_u.float(), w)


@torch.no_grad()
def guided_teacher(model: nn.Module, cond: DistillConditions, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
                   schedule: NoiseSchedule, strength: float, attnx_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher (adapters off): ε_c and ε_u in one batched call, guided in the LCM form on x̂0 and on ε
    (LCM eq. 11: (1 + w)·cond − w·uncond). Returns (x̂0, ε̂), float32."""
    with disable_adapters(model):
        eps_c, eps_u = GuidedDenoiser(model, cond.teacher, 1.0, strength, attnx_scale).split(x_t, t)
    x0_c = predicted_original_sample(eps_c, x_t, t, schedule)
    x0_u = predicted_original_sample(eps_u, x_t, t, schedule)
    return lcm_guidance(x0_c.float(), x0_u.float(), w), lcm_guidance(eps_c.float(), eps_u.float(), w)


def distance(student: torch.Tensor, target: torch.Tensor, tb: TrainBatch, loss_type: str, huber_c: float,
             text_loss_weight: float) -> torch.Tensor:
    """Pseudo-Huber (c) or L2 between student and target, optionally weighted 1 + λ inside the text regions."""
    weight = text_weight_map(tb.hint, tuple(student.shape[-2:]), text_loss_weight)
    if loss_type == "huber":
        return huber_loss(student.float(), target.float(), huber_c, weight)
    return l2_loss(student.float(), target.float(), weight)


def lcm_step(net: nn.Module, model: nn.Module, tb: TrainBatch, cond: DistillConditions, solver: DDIMSolver,
             schedule: NoiseSchedule, guidance_scale_range: tuple[float, float], loss_type: str = "huber",
             huber_c: float = 0.001, text_loss_weight: float = 0.0, timestep_scaling: float = 10.0,
             sigma_data: float = 0.5, strength: float = 1.0, attnx_scale: float = 1.0,
             x0_term=None) -> StepOutput:
    """One LCM consistency-distillation loss (B samples, latents (B, 4, h, w)).

    Args:
        net: :class:`DenoiserNet` over ``model`` (possibly DDP-wrapped): the student pass with grad goes through it.
        model: the AnyText2 with its LoRA; the teacher is ``model`` inside ``disable_adapters``.
        tb: the prepared batch; each sample draws its grid index, guidance and noise from ``tb.gens[b]``.
        cond: :func:`distill_conditions` of ``tb``.
        solver: the DDIM solver on the N-point grid.
        guidance_scale_range: (low, high) of the teacher's Imagen-form CFG scale.
        x0_term: ``x0_term(student, target, teacher_x0, t) → (loss, logs)`` added to the distance (the OCR loss,
            ``distill.ocr_loss``): the student's output with grad, the consistency target and the guided teacher's
            x̂0 at ``t`` = t_{n+k}.
    Returns:
        ``StepOutput`` with the loss and, in ``tensors``: index, start, end, w, x_t, student, x_prev, target.
    """
    # 1. The per-sample draws: grid pair, guidance, noise.
    d = draw_step(tb, solver, guidance_scale_range)

    # 2. Forward diffusion to t_{n+k}: x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε.
    x_t = schedule.add_noise(tb.latents, d.noise, d.start)

    # 3. Online student with grad: f_θ(x_t, t_{n+k}) = c_skip x_t + c_out x̂0(ε_θ) (LCM eq. 9); cond branch only.
    eps = student_eps(net, cond, tb, x_t, d.start, strength, attnx_scale)
    student = consistency_output(x_t, predicted_original_sample(eps, x_t, d.start, schedule), d.start,
                                 timestep_scaling, sigma_data)

    with torch.no_grad():
        # 4. Teacher (adapters off), guided, then one DDIM step from t_{n+k} to t_n.
        pred_x0, pred_eps = guided_teacher(model, cond, x_t, d.start, d.w, schedule, strength, attnx_scale)
        x_prev = solver.ddim_step(pred_x0, pred_eps, d.index)

        # 5. Target: the same student without grad at (x_prev, t_n).
        eps_t = target_eps(model, cond, tb, x_prev, d.end, strength, attnx_scale)
        target = consistency_output(x_prev, predicted_original_sample(eps_t, x_prev, d.end, schedule), d.end,
                                    timestep_scaling, sigma_data)

    # 6. Distance (+ the text-aware term).
    loss = distance(student, target, tb, loss_type, huber_c, text_loss_weight)
    logs = {"w": float(d.w.mean()), "t": float(d.start.float().mean())}
    if x0_term is not None:
        extra, extra_logs = x0_term(student, target, pred_x0, d.start)
        loss = loss + extra
        logs.update(extra_logs)
    return StepOutput(loss, logs,
                      {"index": d.index, "start": d.start, "end": d.end, "w": d.w, "x_t": x_t.detach(),
                       "student": student.detach(), "x_prev": x_prev, "target": target})


class LCMMethod(Method):
    """LCM-LoRA: a PEFT LoRA on the frozen teacher, trained with :func:`lcm_step`."""

    name = "lcm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.schedule = None
        self.solver = None
        self.writenet_lora = False

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        d = self.cfg.distill
        self.schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
        self.solver = DDIMSolver(self.schedule, d.num_ddim_timesteps, d.timestep_spacing)
        spec: LoraSpec = self.cfg.lora
        apply_lora(model, spec)
        self.writenet_lora = has_writenet_lora(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # fp32 master weights whatever the base dtype
        return params

    def set_train_mode(self, model: nn.Module) -> None:
        # Everything frozen stays in eval (the OCR BatchNorms must not update their statistics: that would change
        # the teacher); only LoRA dropout follows the training mode.
        model.eval()
        for name, m in model.named_modules():
            if name.endswith("lora_dropout"):
                m.train()

    def network(self, model: nn.Module) -> nn.Module:
        return DenoiserNet(model)

    def step(self, net: nn.Module, model: nn.Module, tb: TrainBatch) -> StepOutput:
        d = self.cfg.distill
        cond = distill_conditions(model, tb, d.a_prompt, d.n_prompt, self.writenet_lora)
        return lcm_step(net, model, tb, cond, self.solver, self.schedule, d.guidance_scale_range, d.loss, d.huber_c,
                        d.text_loss_weight, d.timestep_scaling, d.sigma_data, d.control_strength, d.attnx_scale,
                        self.x0_term(model, tb))

    def x0_term(self, model: nn.Module, tb: TrainBatch):
        """The OCR loss of the student's x̂0 against ``ocr_loss.reference`` (None when the section is off)."""
        o = self.cfg.ocr_loss
        if not o.active:
            return None

        def term(student, target, teacher_x0, t):
            ref = teacher_x0 if o.reference == "teacher" else target
            return ocr_text_loss(model, student, ref, tb.text_info, tb.texts, tb.languages, t, o)
        return term

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        name = self.cfg.lora.adapter_name
        d = self.cfg.distill
        sampling = student_sampling("lcm", original_steps=d.num_ddim_timesteps, spacing=d.timestep_spacing)
        meta = {"method": self.name, "guidance_scale_range": json.dumps(list(self.cfg.distill.guidance_scale_range)),
                "sampling": json.dumps(sampling.to_dict())}
        return [save_lora(model, output_dir / "adapter", name, metadata=meta),
                save_lora(model, output_dir / "adapter.safetensors", name, metadata=meta)]
