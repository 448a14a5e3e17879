"""Replay a parity fixture made by running the ORIGINAL AnyText2 code, and compare every output.

A fixture folder (layout of ``reference/tiny/``) holds ``config.yaml`` (the original yaml + ``tiny_overrides``),
``state_dict.safetensors`` (original key layout), ``inputs.safetensors``, ``outputs.safetensors`` and ``meta.json``
(prompts, ``n_lines``, call list, ``run_params``). Everything that varies between fixtures is read from them —
the number of line slots (``glyphs_<j>`` inputs), residuals, DDIM steps, CFG scale, strength, AttnX scale — so the
same code replays any fixture made the same way.

Tolerance per tensor: ``max|ours − ref| ≤ 5e-5 · max(1, max|ref|)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_original, read_checkpoint
from .conditioning import TextInfo
from .config import from_original_yaml
from .models.anytext2 import AnyText2
from .pipeline import GuidedDenoiser, encode_branches, sample
from .samplers import make_sampler
from .samplers.schedule import NoiseSchedule

REL_TOL = 5e-5


@dataclass
class Row:
    name: str
    max_abs_err: float | None
    tolerance: float
    ok: bool
    note: str = ""


def _line_slots(inputs: dict[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in inputs if (m := re.fullmatch(r"glyphs_(\d+)", k))]
    if not idx:
        raise ValueError("fixture inputs hold no glyphs_<j> tensors")
    return max(idx) + 1


def fixture_text_info(inputs: dict[str, torch.Tensor], meta: dict) -> TextInfo:
    """Stack the fixture's per-line inputs into a :class:`TextInfo`."""
    L = _line_slots(inputs)
    stack = lambda k: torch.stack([inputs[f"{k}_{j}"] for j in range(L)], dim=1)  # noqa: E731
    return TextInfo(glyphs=stack("glyphs"), positions=stack("positions"), gly_line=stack("gly_line"),
                    colors=stack("colors"), n_lines=torch.tensor(meta["n_lines"], dtype=torch.long),
                    font_hint=inputs["font_hint"], masked_x=inputs["masked_x"])


@torch.no_grad()
def compute_outputs(model: AnyText2, inputs: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Run every call the fixture README describes; returns ``{output name: tensor}``.

    One long function on purpose: it replays the recorded calls in the fixture's order, one short block per recorded
    output, so it reads side by side with the fixture's list; splitting it would scatter that order."""
    rp = meta.get("run_params", {})
    out: dict[str, torch.Tensor] = {}
    ti = fixture_text_info(inputs, meta)
    B = ti.batch_size
    img_prompts, text_prompts = list(meta["img_prompts"]), list(meta["text_prompts"])
    neg_img = [meta["uncond_img_prompt"]] * B
    neg_text = [meta.get("uncond_text_prompt", "")] * B

    # 1. line embeddings and their parts
    lines, parts = model.line_embeddings(ti, return_parts=True)
    out["em_line_embeddings"] = torch.cat(lines) if lines else torch.zeros(0)
    for k, v in parts.items():
        name = "ocr_" + k if k.startswith(("text_predictor", "font_predictor")) else "em_" + k
        out[name] = v

    # 2. every CLIP call of the cond branch: the image-prompt chunks, then the text prompt (cursor reset)
    te = model.text_encoder
    calls = [("img", ids) for ids in te.tokenize_image_prompts(img_prompts)]
    calls.append(("text", te.tokenize_text_prompts(text_prompts)))
    cursor = [0] * B
    for i, (kind, ids) in enumerate(calls):
        if kind == "text":
            cursor = [0] * B
        _, cursor, emb = te.encode_ids(ids, lines, cursor)
        out[f"em_forward_tokens_call{i}"] = ids
        out[f"em_forward_output_call{i}"] = emb

    # 3. contexts and WriteNet residuals of both branches
    br = encode_branches(model, ti, img_prompts, text_prompts, neg_img, neg_text, lines=lines)
    out["cond_img_context"], out["cond_text_context"] = br.cond.image_context, br.cond.text_context
    out["uncond_img_context"], out["uncond_text_context"] = br.uncond.image_context, br.uncond.text_context
    for i, (c, u) in enumerate(zip(br.control_cond, br.control_uncond)):
        out[f"control_cond_{i:02d}"], out[f"control_uncond_{i:02d}"] = c, u

    # 4. one CFG step at (x_t, t), a second pair at (x_t2, t2) reusing the residuals
    s = float(rp.get("single_step_cfg_scale", 7.5))
    den = GuidedDenoiser(model, br, guidance_scale=s)
    for suffix, xk, tk in (("", "x_t", "t"), ("_t2", "x_t2", "t2")):
        if xk not in inputs:
            continue
        out[xk], out[tk] = inputs[xk], inputs[tk]
        ec, eu = den.split(inputs[xk], inputs[tk].long())
        out[f"eps_cond{suffix}"], out[f"eps_uncond{suffix}"] = ec, eu
        if not suffix:
            out["eps_cfg"] = eu + s * (ec - eu)

    # 5. a strength / AttnX variant of the cond prediction, and the UNet without control
    if "x_t" in inputs:
        x, t = inputs["x_t"], inputs["t"].long()
        out["eps_cond_variant"] = model.denoise(x, t, br.cond.image_context, br.control_cond,
                                                float(rp.get("variant_strength", 1.0)),
                                                float(rp.get("variant_attnx_scale", 1.0)))
        out["eps_unet_no_control"] = model.denoise(x, t, br.cond.image_context, None)

    # 6. full DDIM sampling with CFG from the given x_T
    if "ddim_x_T" in inputs:
        steps = int(rp.get("ddim_steps", 20))
        schedule = NoiseSchedule(model.alphas_cumprod.float().cpu())
        sampler = make_sampler("ddim", schedule, eta=float(rp.get("ddim_eta", 0.0)))
        ddim_den = GuidedDenoiser(model, br, guidance_scale=float(rp.get("ddim_cfg_scale", 7.5)),
                                  strength=float(rp.get("ddim_control_strength", 1.0)),
                                  attnx_scale=float(rp.get("ddim_attnx_scale", 1.0)))
        g = torch.Generator().manual_seed(0)
        res = sample(ddim_den, sampler, steps, inputs["ddim_x_T"], generator=g)
        asc = sorted(res.timesteps)
        ac = schedule.alphas_cumprod
        out["ddim_x_T"] = inputs["ddim_x_T"]
        out["ddim_timesteps"] = torch.tensor(asc)
        out["ddim_alphas"] = ac[asc]
        out["ddim_alphas_prev"] = torch.cat([ac[:1], ac[asc[:-1]]])
        for i, (xi, x0) in enumerate(zip(res.x_inter, res.pred_x0)):
            out[f"ddim_x_inter_{i}"], out[f"ddim_pred_x0_{i}"] = xi, x0
        out["ddim_samples"] = res.latents
        out["ddim_decoded"] = model.decode(res.latents)

    # 7. the VAE
    if "vae_z" in inputs:
        out["vae_z"] = inputs["vae_z"]
        out["vae_decode_first_stage"] = model.decode(inputs["vae_z"])
    if "masked_img" in inputs:
        mean, logvar = model.vae.encode(inputs["masked_img"])
        out["vae_encoder_mean"], out["vae_encoder_logvar"] = mean, logvar
    return out


def load_fixture(fixture_dir: str | Path):
    """(model, inputs, outputs, meta) of a fixture folder; the model is loaded strictly from its state dict."""
    from safetensors.torch import load_file

    d = Path(fixture_dir)
    for name in ("config.yaml", "state_dict.safetensors", "inputs.safetensors", "outputs.safetensors", "meta.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"fixture {d}: {name} is missing")
    cfg = from_original_yaml(d / "config.yaml")
    model = AnyText2(cfg)
    load_original(model, read_checkpoint(d / "state_dict.safetensors"), source=str(d / "state_dict.safetensors"))
    model.eval()
    return model, load_file(str(d / "inputs.safetensors")), load_file(str(d / "outputs.safetensors")), \
        json.loads((d / "meta.json").read_text())


def compare(ours: dict[str, torch.Tensor], refs: dict[str, torch.Tensor]) -> list[Row]:
    """One row per reference output; a reference we did not produce is a failure."""
    rows = []
    for name, ref in refs.items():
        ref = ref.double()
        tol = REL_TOL * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        if name not in ours:
            rows.append(Row(name, None, tol, False, "not produced"))
            continue
        got = ours[name].detach().double().cpu()
        if tuple(got.shape) != tuple(ref.shape):
            rows.append(Row(name, None, tol, False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"))
            continue
        err = (got - ref).abs().max().item() if ref.numel() else 0.0
        rows.append(Row(name, err, tol, err <= tol))
    return rows


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> list[Row]:
    if threads:
        torch.set_num_threads(threads)
    model, inputs, refs, meta = load_fixture(fixture_dir)
    return compare(compute_outputs(model, inputs, meta), refs)


def format_rows(rows: list[Row]) -> str:
    w = max(len(r.name) for r in rows) if rows else 10
    lines = [f"{'output':<{w}}  {'max_abs_err':>11}  {'tolerance':>9}  ok"]
    for r in rows:
        err = "-" if r.max_abs_err is None else f"{r.max_abs_err:.3e}"
        lines.append(f"{r.name:<{w}}  {err:>11}  {r.tolerance:>9.2e}  {'yes' if r.ok else 'NO'}"
                     + (f"  ({r.note})" if r.note else ""))
    n_ok = sum(r.ok for r in rows)
    lines.append(f"{n_ok}/{len(rows)} outputs within tolerance")
    return "\n".join(lines)
