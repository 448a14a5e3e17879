"""Latent-space fidelity of a few-step student to its teacher, next to the teacher's own few-step error.

For each held-out AnyWord-format sample (its caption, lines, polygons and colours, read as ``anytext2-lcm evaluate``
reads them) and one x_T per sample:

* the **reference** is the teacher's 20-step DDIM with CFG 7.5 (AnyText2's inference setting);
* the **teacher at K steps** is the same DDIM + CFG at K steps (what sampling the teacher with fewer steps gives;
  ldm's timesteps, e.g. K = 4 → 751, 501, 251, 1, exactly as the original runs);
* the **student at K steps** is the LoRA student without CFG under one or more few-step samplers.

Every run of a sample starts from the same x_T and the same masked-image posterior sample (both drawn from the
sample's seed; sampler noise too), and the error is the mean squared difference of the final latents to the
reference, before decoding, so it does not depend on the VAE. ratio = student error / teacher error at the same K:
below 1 the student is closer to the 20-step result than the teacher itself at K steps.

Seconds per image are the generator's wall time (rendering, conditioning, sampling, decoding; the median over the
samples) after one untimed warm-up call per setting, on the device and thread count the caller set.

:func:`oracle_floor` answers "how good could a student be with this sampler?": it replaces the student by a perfect
consistency function (the teacher's own guided ODE solved to t = 0) and measures the same error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StudentSampler:
    """One way to sample the student."""

    sampler: str = "tcd"
    options: dict = field(default_factory=dict)
    cfg: float = 1.0
    lora: bool = True
    """False: the same sampler on the teacher's weights (adapters bypassed) — the control that shows what the
    distillation adds beyond the sampler and its timesteps."""

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.options.items()))
        name = f"{self.sampler}({opts})" if opts else self.sampler
        return name if self.lora else f"undistilled {name}"


@dataclass(kw_only=True)
class FidelityConfig:
    """What :func:`measure_fidelity` runs."""

    data: str
    """AnyWord-format annotation file with the held-out samples."""
    num: int = 8
    """Samples (the first ``num`` usable rows)."""
    size: int = 64
    """Generation size (the training size of the tiny model)."""
    seed: int = 100
    """Seed of sample 0; sample i uses seed + i for x_T, the masked-image sample and the sampler's noise."""
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: int = 20
    teacher_cfg: float = 7.5
    students: list[StudentSampler] = field(default_factory=lambda: [StudentSampler()])
    """Student samplers; the first is the main one (the table's ``ratio``)."""
    max_lines: int = 5
    a_prompt: str | None = None
    """Added prompt (None: the generator's default, the original demo's)."""
    n_prompt: str | None = None
    """Negative prompt (None: the generator's default)."""
    glyph_font: str | None = None

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        self.students = [s if isinstance(s, StudentSampler) else StudentSampler(**s) for s in self.students]
        if not self.students:
            raise ValueError("FidelityConfig.students: give at least one student sampler")


def _request(sample, cfg: FidelityConfig, sampler: str, steps: int, guidance: float, options: dict):
    from ..evaluate.runner import text_prompt_for
    from ..generation import GenerationRequest

    extra = {}
    if cfg.a_prompt is not None:
        extra["a_prompt"] = cfg.a_prompt
    if cfg.n_prompt is not None:
        extra["n_prompt"] = cfg.n_prompt
    return GenerationRequest(
        prompt=sample.caption, text_prompt=text_prompt_for(sample.lines),
        positions=[ln.polygon for ln in sample.lines], colors=[ln.color for ln in sample.lines],
        height=cfg.size, width=cfg.size, seed=sample.seed, steps=steps, sampler=sampler,
        sampler_options=dict(options) if sampler != "ddim" else {}, cfg_scale=guidance,
        glyph_font=cfg.glyph_font, **extra)


def load_samples(cfg: FidelityConfig):
    """The held-out samples (``evaluate``'s reader: captions verbatim, lines cut, polygons scaled to ``size``)."""
    from ..evaluate.runner import EvalConfig, load_eval_samples
    from ..generation import InputError

    samples, rep = load_eval_samples(EvalConfig(data=(cfg.data,), num=cfg.num, size=cfg.size, seed=cfg.seed,
                                                max_lines=cfg.max_lines))
    if not samples:
        raise InputError(f"no usable sample in {cfg.data} (skipped: {dict(rep.skipped)})")
    return samples


def make_generator(model):
    """``evaluate``'s generator (the caption is the image prompt verbatim; lines come from the text prompt)."""
    from ..evaluate.runner import EvalGenerator
    from ..evaluate.runtime import RuntimeOptions, apply_runtime_options

    _, gen = apply_runtime_options(model, RuntimeOptions(), generator_cls=EvalGenerator)
    return gen


@contextlib.contextmanager
def _quiet_font_ocr():
    """The font OCR logs a fallback for every empty font hint (every line without a chosen font): silence it."""
    lg = logging.getLogger("anytext2_lcm.models.ocr")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _teacher_context(model):
    from .. import lora as L

    return L.disable_adapters(model) if L.lora_layers(model) else contextlib.nullcontext()


def _median(v: list[float]) -> float | None:
    return float(statistics.median(v)) if v else None


def measure_fidelity(model, cfg: FidelityConfig, keep_images: int = 0) -> dict:
    """Reference, teacher at each K and every student sampler at each K, for every sample: errors, ratios, timings.

    Args:
        model: an ``AnyText2`` with the student LoRA loaded (unmerged); the teacher runs with the adapters bypassed.
            Without a LoRA the "student" is the teacher's weights run by the student samplers.
        keep_images: also return the decoded images (and glyph previews) of the first ``keep_images`` samples.

    Returns:
        ``{"config", "samples", "reference_mean_square", "table", "seconds_per_image", "denoise_seconds_per_image",
        "per_sample", "images", "glyphs", "captions", "texts"}``. ``table`` has one row per K: ``teacher_mse``,
        ``students`` (label → mse, ratio, better-on count, seconds) and, for the main student, ``student_mse`` and
        ``ratio``. Errors are means over samples of the per-sample latent MSE.
    """
    from ..evaluate.metrics import latent_mse
    from ..evaluate.runner import initial_noise

    samples = load_samples(cfg)
    gen = make_generator(model)
    C = model.cfg.unet.in_channels
    h = w = cfg.size // 8

    runs = [("reference", "ddim", cfg.teacher_steps, cfg.teacher_cfg, {}, False)]
    runs += [(f"teacher@{k}", "ddim", k, cfg.teacher_cfg, {}, False) for k in cfg.steps]
    for st in cfg.students:
        runs += [(f"{st.label}@{k}", st.sampler, k, st.cfg, st.options, st.lora) for k in cfg.steps]
    seconds: dict[str, list[float]] = {name: [] for name, *_ in runs}
    denoise: dict[str, list[float]] = {name: [] for name, *_ in runs}
    latents: dict[str, list[torch.Tensor]] = {name: [] for name, *_ in runs}
    images: dict[str, list] = {name: [] for name, *_ in runs}
    glyphs: list = []
    with torch.no_grad(), _quiet_font_ocr():
        for name, sampler, steps, guidance, options, student in runs:
            with (contextlib.nullcontext() if student else _teacher_context(model)):
                warm = _request(samples[0], cfg, sampler, steps, guidance, options)
                gen(warm, x_T=initial_noise(samples[0].seed, 1, C, h, w))  # untimed warm-up at the same shapes
                for i, s in enumerate(samples):
                    res = gen(_request(s, cfg, sampler, steps, guidance, options),
                              x_T=initial_noise(s.seed, 1, C, h, w))
                    seconds[name].append(res.seconds["total"])
                    denoise[name].append(res.seconds["denoise"])
                    latents[name].append(res.latents.float().cpu())
                    if i < keep_images:
                        images[name].append(res.images[0])
                        if name == "reference":
                            glyphs.append(res.glyph_preview)
    ref = latents["reference"]

    def errors(name: str) -> list[float]:
        return [float(latent_mse(a, b)[0]) for a, b in zip(latents[name], ref)]

    table, per_sample = [], {}
    for k in cfg.steps:
        te = errors(f"teacher@{k}")
        per_sample[f"teacher@{k}"] = te
        t_mean = statistics.fmean(te)
        row = {"steps": k, "teacher_mse": t_mean, "teacher_seconds": _median(seconds[f"teacher@{k}"]),
               "students": {}}
        for st in cfg.students:
            name = f"{st.label}@{k}"
            se = errors(name)
            per_sample[name] = se
            s_mean = statistics.fmean(se)
            row["students"][st.label] = {
                "mse": s_mean, "ratio": s_mean / t_mean if t_mean > 0 else math.inf,
                "better_samples": sum(a < b for a, b in zip(se, te)), "seconds": _median(seconds[name])}
        main = row["students"][cfg.students[0].label]
        row.update(student_mse=main["mse"], ratio=main["ratio"], student_seconds=main["seconds"])
        table.append(row)
    return {
        "config": asdict(cfg),
        "samples": len(samples),
        "reference_mean_square": statistics.fmean(float(r.double().pow(2).mean()) for r in ref),
        "table": table,
        "seconds_per_image": {name: _median(v) for name, v in seconds.items()},
        "denoise_seconds_per_image": {name: _median(v) for name, v in denoise.items()},
        "per_sample": per_sample,
        "images": images if keep_images else {},
        "glyphs": glyphs,
        "captions": [s.caption for s in samples],
        "texts": [[ln.text for ln in s.lines] for s in samples],
    }


def text_effect(model, cfg: FidelityConfig, num: int | None = None, keep_images: int = 0) -> dict:
    """How much, and where, the teacher's output depends on the text lines.

    For each sample the teacher (adapters bypassed; ``teacher_steps`` DDIM + ``teacher_cfg``) runs twice from the
    same x_T: with the sample's lines, and with the same caption but no text (blank glyphs and positions, empty
    text prompt). On the latent grid, the mean absolute difference inside the lines' positions is compared with the
    one outside: ``ratio`` > 1 means the text changes the image where the text goes more than elsewhere.

    Returns:
        ``{"inside", "outside", "ratio", "samples", "per_sample", "images"}`` (images: the no-text outputs of the
        first ``keep_images`` samples).
    """
    import numpy as np
    import torch.nn.functional as F

    from ..data.glyphs import polygon_mask
    from ..evaluate.runner import initial_noise

    samples = load_samples(cfg)[: num or cfg.num]
    gen = make_generator(model)
    C, h = model.cfg.unet.in_channels, cfg.size // 8
    per, images = [], []
    with torch.no_grad(), _quiet_font_ocr(), _teacher_context(model):
        for i, s in enumerate(samples):
            x_T = initial_noise(s.seed, 1, C, h, h)
            req = _request(s, cfg, "ddim", cfg.teacher_steps, cfg.teacher_cfg, {})
            with_text = gen(req, x_T=x_T)
            req.text_prompt, req.positions, req.colors = "", None, None
            no_text = gen(req, x_T=x_T)
            if i < keep_images:
                images.append(no_text.images[0])
            diff = (with_text.latents.float() - no_text.latents.float()).abs().mean(1)[0]  # (h, w)
            hint = np.clip(sum(polygon_mask(np.asarray(ln.polygon), cfg.size, cfg.size) for ln in s.lines), 0, 1)
            cells = F.adaptive_max_pool2d(torch.from_numpy(hint.astype(np.float32))[None, None], (h, h))[0, 0] > 0
            if cells.all() or not cells.any():
                continue
            per.append({"inside": float(diff[cells].mean()), "outside": float(diff[~cells].mean()),
                        "text_cells": int(cells.sum())})
    inside = statistics.fmean(p["inside"] for p in per) if per else math.nan
    outside = statistics.fmean(p["outside"] for p in per) if per else math.nan
    return {"inside": inside, "outside": outside, "ratio": inside / outside if outside > 0 else math.nan,
            "samples": len(per), "per_sample": per, "images": images}


def oracle_floor(model, cfg: FidelityConfig, solver_steps: int = 20) -> dict:
    """The table's error for a *perfect* student: the consistency function f(x, t) is replaced by the teacher's
    guided ODE solved from (x, t) to t = 1 with ``solver_steps`` DDIM steps (CFG ``teacher_cfg``), and sampled on the
    distillation grid two ways: ``lcm`` (fresh noise between steps, as the LCM sampler) and ``deterministic`` (a
    DDIM jump with the x0 estimate, as TCD with gamma 0). Costs about K × ``solver_steps`` guided UNet calls per
    sample and K.

    Returns:
        ``{"lcm": {K: mse}, "deterministic": {K: mse}}`` (means over samples).
    """
    import numpy as np

    from ..evaluate.runner import initial_noise
    from ..pipeline import GuidedDenoiser, encode_branches, sample
    from ..samplers import grid_inference_timesteps, make_sampler
    from ..samplers.schedule import NoiseSchedule

    samples = load_samples(cfg)
    gen = make_generator(model)
    schedule = NoiseSchedule(model.alphas_cumprod.float().cpu())
    ddim = make_sampler("ddim", schedule)
    ac = schedule.alphas_cumprod
    C, h = model.cfg.unet.in_channels, cfg.size // 8
    out: dict[str, dict[int, list[float]]] = {"lcm": {}, "deterministic": {}}
    with torch.no_grad(), _quiet_font_ocr(), _teacher_context(model):
        for s in samples:
            req = _request(s, cfg, "ddim", cfg.teacher_steps, cfg.teacher_cfg, {})
            prep = gen.prepare(req)
            g = torch.Generator().manual_seed(int(s.seed))
            masked_x = gen._masked_x(prep.masked_img, g, blank=True)  # the generator's own first draw of the seed
            ti = prep.text_info.with_masked_x(masked_x)
            branches = encode_branches(model, ti, [prep.img_prompt + ", " + req.a_prompt], [prep.text_prompt],
                                       [req.n_prompt], [""])
            den = GuidedDenoiser(model, branches, cfg.teacher_cfg)
            x_T = initial_noise(s.seed, 1, C, h, h)
            ref = sample(den, ddim, cfg.teacher_steps, x_T).latents

            def f(x, t):
                ts = sorted({int(v) for v in np.linspace(t, 1, solver_steps).round()}, reverse=True)
                return sample(den, ddim, len(ts), x, timesteps=ts).latents

            for k in cfg.steps:
                ts = grid_inference_timesteps(k, schedule.num_timesteps, 50)
                for mode in out:
                    noise_g = torch.Generator().manual_seed(int(s.seed))
                    x = x_T
                    for i, t in enumerate(ts):
                        x0 = f(x, t)
                        if i + 1 == len(ts):
                            x = x0
                            break
                        a_t, a_s = ac[t], ac[ts[i + 1]]
                        if mode == "lcm":
                            z = torch.randn(x.shape, generator=noise_g)
                        else:
                            z = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                        x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * z
                    out[mode].setdefault(k, []).append(float((x - ref).double().pow(2).mean()))
    return {mode: {k: statistics.fmean(v) for k, v in d.items()} for mode, d in out.items()}


def format_table(result: dict, oracle: dict | None = None) -> str:
    """The benchmark's table as Markdown: per K the teacher's DDIM error and, per student sampler, its error and
    ratio, plus seconds per image (and the oracle floor columns when given)."""
    cfg = result["config"]
    labels = list(result["table"][0]["students"])
    head = ["steps", f"teacher DDIM (CFG {cfg['teacher_cfg']:g})"]
    for lb in labels:
        head += [f"student {lb}", "ratio"]
    if oracle:
        head += ["perfect student, lcm", "perfect student, deterministic"]
    head += ["teacher s/img", f"student {labels[0]} s/img"]
    lines = [f"Latent MSE to the teacher's {cfg['teacher_steps']}-step DDIM + CFG {cfg['teacher_cfg']:g} output "
             f"from the same x_T; mean over {result['samples']} held-out samples (reference mean square "
             f"{result['reference_mean_square']:.3f}). ratio = student / teacher at the same steps.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "---:|" * len(head)]
    for r in result["table"]:
        cells = [str(r["steps"]), f"{r['teacher_mse']:.4f}"]
        for lb in labels:
            st = r["students"][lb]
            cells += [f"{st['mse']:.4f}", f"**{st['ratio']:.3f}**" if lb == labels[0] else f"{st['ratio']:.3f}"]
        if oracle:
            cells += [f"{oracle['lcm'].get(r['steps'], math.nan):.4f}",
                      f"{oracle['deterministic'].get(r['steps'], math.nan):.4f}"]
        cells += [f"{r['teacher_seconds']:.3f}", f"{r['student_seconds']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ref_s = result["seconds_per_image"]["reference"]
    lines.append("")
    lines.append(f"Reference ({cfg['teacher_steps']} steps + CFG, {2 * cfg['teacher_steps']} UNet evaluations): "
                 f"{ref_s:.3f} s/image.")
    return "\n".join(lines)


def row(result: dict, steps: int) -> dict:
    """The table row of ``steps``."""
    for r in result["table"]:
        if r["steps"] == steps:
            return r
    raise KeyError(f"no row for {steps} steps (have {[r['steps'] for r in result['table']]})")


__all__ = ["FidelityConfig", "StudentSampler", "format_table", "load_samples", "make_generator", "measure_fidelity",
           "oracle_floor", "row", "text_effect"]
