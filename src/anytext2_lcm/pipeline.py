"""Conditioning → guided denoising loop → decode. The only place that knows cond/uncond and CFG.

AnyText2's classifier-free guidance: the conditional branch uses the image prompt (+ the added prompt) for the
UNet and the text prompt with line placeholders for the WriteNet; the unconditional branch uses the negative
prompt and "" with the *same* glyphs, positions, font hints, colours and masked image. The WriteNet residuals of
both branches are computed once (they do not depend on x_t or t) and both branches go through the UNet as one
batch; image contexts of different lengths (prompts with a different number of 75-token chunks) are zero-padded
and masked, which leaves the attention result unchanged.

Typical use::

    branches = encode_branches(model, text_info, img_prompts, text_prompts, neg_img_prompts, [""] * B)
    denoiser = GuidedDenoiser(model, branches, guidance_scale=7.5)
    result = sample(denoiser, make_sampler("ddim", schedule), 20, x_T, generator)
    images = model.decode(result.latents)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .conditioning import TextInfo
from .defaults import TEACHER_CFG
from .models.anytext2 import AnyText2, Conditions




def image_prompt(caption: str, a_prompt: str) -> str:
    """The conditional branch's image prompt: ``caption + ", " + a_prompt``, as the original builds it (also when
    ``a_prompt`` is empty: "caption, "). Generation, distillation and teacher training all use this."""
    return caption + ", " + a_prompt


@dataclass(frozen=True)
class BranchPrompts:
    """The four prompt lists of a batch under AnyText2's CFG (B strings each; ``neg_*`` None: no uncond branch)."""

    img: list[str]
    text: list[str]
    neg_img: list[str] | None
    neg_text: list[str] | None


def branch_prompts(captions: list[str], text_captions: list[str], a_prompt: str, n_prompt: str,
                   guided: bool = True) -> BranchPrompts:
    """cond = (``image_prompt(caption, a_prompt)``, text caption with ``*`` placeholders); uncond = (``n_prompt``,
    ""). The one place these strings are built: generation, the distillation teachers and validation all call it,
    so a student is trained on exactly the prompts it is sampled with."""
    B = len(captions)
    return BranchPrompts([image_prompt(c, a_prompt) for c in captions], list(text_captions),
                         [n_prompt] * B if guided else None, [""] * B if guided else None)


@dataclass
class Branches:
    """Encoded conditioning of a batch: the cond branch and optionally the uncond branch.

    Attributes:
        cond / uncond: prompt contexts (``Conditions``); ``uncond`` is None for guidance-free sampling.
        control_cond / control_uncond: WriteNet residuals (unscaled), computed once.
    """

    cond: Conditions
    control_cond: list[torch.Tensor]
    uncond: Conditions | None = None
    control_uncond: list[torch.Tensor] | None = None
    lines: list[torch.Tensor] | None = field(default=None, repr=False)


def encode_branches(model: AnyText2, text_info: TextInfo, img_prompts: list[str], text_prompts: list[str],
                    neg_img_prompts: list[str] | None = None, neg_text_prompts: list[str] | None = None,
                    lines: list[torch.Tensor] | None = None) -> Branches:
    """Encode prompts and run the WriteNet once per branch (one batched WriteNet call for both).

    Args:
        text_info: the batch's text conditioning (B samples).
        img_prompts / text_prompts: B strings each (cond branch; the image prompt already includes a_prompt).
        neg_img_prompts / neg_text_prompts: B strings each for the uncond branch, or None for no uncond branch.
        lines: precomputed line embeddings (per sample), else computed here.
    """
    if lines is None:
        lines = model.line_embeddings(text_info)
    cond = model.encode_conditions(img_prompts, text_prompts, lines)
    if neg_img_prompts is None:
        return Branches(cond, model.control(cond.text_context, text_info), lines=lines)
    neg_text_prompts = neg_text_prompts if neg_text_prompts is not None else [""] * len(neg_img_prompts)
    uncond = model.encode_conditions(neg_img_prompts, neg_text_prompts, lines)
    both = model.control(torch.cat([cond.text_context, uncond.text_context]), TextInfo.cat([text_info, text_info]))
    B = text_info.batch_size
    return Branches(cond, [c[:B] for c in both], uncond, [c[B:] for c in both], lines=lines)


def pad_contexts(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate contexts of possibly different lengths along the batch, zero-padding the shorter ones.

    Returns:
        (context (ΣB, M, D), mask (ΣB, M) bool or None when no padding was needed).
    """
    M = max(c.shape[1] for c in contexts)
    if all(c.shape[1] == M for c in contexts):
        return torch.cat(contexts), None
    padded, masks = [], []
    for c in contexts:
        pad = M - c.shape[1]
        padded.append(torch.nn.functional.pad(c, (0, 0, 0, pad)))
        m = torch.zeros(c.shape[0], M, dtype=torch.bool, device=c.device)
        m[:, :c.shape[1]] = True
        masks.append(m)
    return torch.cat(padded), torch.cat(masks)


class GuidedDenoiser:
    """ε(x_t, t) of AnyText2 with optional classifier-free guidance: ε_u + s·(ε_c − ε_u).

    With ``guidance_scale == 1`` or no uncond branch only the cond branch runs (as the original does).
    The control residuals and contexts are prepared once here; ``__call__`` is a pure function of (x, t).

    ``batch_cfg`` (default): cond and uncond go through the UNet as one batch of 2B (padded contexts with a key
    mask); False: two passes of B, as the original's sampler runs them — the same ε up to rounding, lower peak
    activation memory, usually slower.
    """

    def __init__(self, model: AnyText2, branches: Branches, guidance_scale: float = TEACHER_CFG,
                 strength: float | list[float] = 1.0, attnx_scale: float = 1.0, batch_cfg: bool = True):
        self.model = model
        self.branches = branches
        self.guidance_scale = float(guidance_scale)
        self.strength = strength
        self.attnx_scale = float(attnx_scale)
        self.batch_cfg = bool(batch_cfg)
        self.guided = branches.uncond is not None and self.guidance_scale != 1.0
        if branches.uncond is not None and self.batch_cfg:  # split() runs on this batch, guided or not
            self._context, self._mask = pad_contexts([branches.cond.image_context, branches.uncond.image_context])
            self._control = [torch.cat([c, u]) for c, u in zip(branches.control_cond, branches.control_uncond)]

    def split(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_cond, ε_uncond) at (x, t): one batched UNet call (two with ``batch_cfg=False``). Requires an uncond
        branch."""
        if self.branches.uncond is None:
            raise ValueError("split() needs an uncond branch")
        if not self.batch_cfg:
            eps_u = self.model.denoise(x, t, self.branches.uncond.image_context, self.branches.control_uncond,
                                       self.strength, self.attnx_scale)
            return self.cond(x, t), eps_u
        B = x.shape[0]
        t = t.expand(B) if t.dim() == 0 else t
        eps = self.model.denoise(torch.cat([x, x]), torch.cat([t, t]), self._context, self._control,
                                 self.strength, self.attnx_scale, self._mask)
        return eps[:B], eps[B:]

    def cond(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε of the cond branch alone."""
        return self.model.denoise(x, t, self.branches.cond.image_context, self.branches.control_cond,
                                  self.strength, self.attnx_scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.cond(x, t)
        eps_c, eps_u = self.split(x, t)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


class NonFiniteError(RuntimeError):
    """Sampling or decoding produced NaN/Inf (non-finite weights, an fp16 overflow, an extreme option): the run
    stops with this instead of returning a black image."""


def require_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN/Inf values; no image was written (check the weights and the "
                             f"numeric options; in fp16 try --dtype fp32 or --vae-dtype fp32)")


@dataclass
class SampleResult:
    """Final latents and the per-step trajectory.

    Attributes:
        latents: (B, 4, h, w) final sample.
        timesteps: the timesteps the model was called at.
        x_inter: [x_T, x after step 1, ...] (len = steps + 1).
        pred_x0: [x_T, x0 prediction of step 1, ...] (the original's logging convention: index 0 is x_T).
    """

    latents: torch.Tensor
    timesteps: list[int]
    x_inter: list[torch.Tensor]
    pred_x0: list[torch.Tensor]


def sample(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sampler, num_steps: int,
           x_T: torch.Tensor, generator: torch.Generator | None = None,
           timesteps: list[int] | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None) -> SampleResult:
    """Run a sampler (``samplers.make_sampler``) over a denoiser from x_T.

    Args:
        denoiser: (x, t (B,) long) → ε (e.g. a ``GuidedDenoiser``).
        sampler: object with ``timesteps(num_steps)`` and ``step(eps, t, t_next, x, generator)``.
        timesteps: explicit timesteps (descending) instead of the sampler's default for ``num_steps``.
        callback: called as ``callback(step_index, t, x)`` after each step.
    Raises:
        NonFiniteError: a step produced NaN/Inf (checked after every step: the run stops at once).
    """
    ts = list(timesteps) if timesteps is not None else list(sampler.timesteps(num_steps))
    x = x_T
    x_inter, pred_x0 = [x_T], [x_T]
    B = x.shape[0]
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        tt = torch.full((B,), int(t), dtype=torch.long, device=x.device)
        eps = denoiser(x, tt)
        out = sampler.step(eps, int(t), t_next, x, generator=generator)
        x = out.prev_sample
        require_finite(x, f"the latent after sampling step {i + 1} of {len(ts)} (t={int(t)})")
        x_inter.append(x)
        pred_x0.append(out.denoised)
        if callback is not None:
            callback(i, int(t), x)
    return SampleResult(x, ts, x_inter, pred_x0)
