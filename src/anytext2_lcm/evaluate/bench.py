"""End-to-end speed of the teacher vs the few-step student, measured side by side (``anytext2-lcm bench``).

What is timed (``Generator`` calls, one image each, the same request):

* teacher: DDIM with classifier-free guidance at each ``teacher_steps`` (20 = the original's default, and 50);
  cond and uncond run as one batch of 2 through the UNet, the WriteNet once for both branches;
* student: the same network with ``cfg = 1`` (no uncond branch) and a few-step sampler at each ``student_steps``.
  A LoRA student costs what the base model costs once the LoRA is merged (``--variants lora_merged`` shows it), so
  the base weights stand in for it;
* warm-up: one untimed 1-step call of each kind; then ``repeats`` rounds, each timing every run once (interleaved,
  so that load changes on a shared machine hit all runs alike); the median is reported;
* components (median over the same rounds): glyph rendering, VAE encode of the masked image (generation mode
  caches it per size, so it is paid once), OCR line embeddings, CLIP for one and two branches, the WriteNet at
  batch 1 and 2, one UNet pass at batch 1 and at batch 2 (a CFG step), the VAE decode. The sum of components
  along each run's path is printed beside the measured time.

Ratios: measured (teacher s/image ÷ student s/image; also by process CPU time, which a busy shared machine
inflates less) next to the eval-count ratio (teacher UNet evaluations ÷ student's: 2·S / k) and the ratio the
measured pass costs would give with no fixed cost at all (S·UNet batch 2 ÷ k·UNet batch 1), and PASS / below goal
for the project's goals (student 4-step ≥ 8× the 20-step teacher and ≥ 18× the 50-step one; 2-step ≥ 14× the
20-step teacher).

On a machine shared with other work, run with ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts): OpenMP
threads then sleep instead of spinning at barriers, so a busy machine slows the run down without inflating its CPU
time, and the CPU-time ratios stay meaningful (with spinning threads, 2 threads under a load of 5 took 2× the CPU
time of an idle run for the same UNet pass).

Variants (``--variants``) re-time everything with runtime options (:mod:`~anytext2_lcm.evaluate.runtime`) or a
different model dtype in the same process, report their speed-up over the base and how far their images move
(PSNR vs the base at the same seed; a changed decoder is a different network, so no PSNR there). Peak resident
memory (CPU) or peak allocated memory (GPU) is reported at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ..defaults import STUDENT_STEPS, TEACHER_STEPS, teacher_cfg
from .runtime import DTYPES, RuntimeOptions, apply_runtime_options

log = logging.getLogger(__name__)

GOALS = ((4, 20, 8.0), (4, 50, 18.0), (2, 20, 14.0))
"""(student steps, teacher steps, minimum end-to-end speed-up)."""

PROMPT = 'a shop sign that says "Hello" and "World"'
SAMPLER_STEP_KINDS = ("teacher", "student")


@dataclass(kw_only=True)
class BenchConfig:
    """What ``bench`` measures."""

    model: str = "sd15"
    """'sd15' (the real architecture, random weights), 'tiny', or a converted folder / checkpoint."""
    size: int = 256
    """Image side (256 on a CPU; 512 on a GPU)."""
    device: str | None = None
    dtype: str = "auto"
    teacher_steps: tuple[int, ...] = (TEACHER_STEPS, 50)
    student_steps: tuple[int, ...] = STUDENT_STEPS
    teacher_cfg: float | None = None
    """The teacher's CFG scale; None: the model's own (``ModelConfig.guidance_scale``)."""
    student_sampler: str = "lcm"
    repeats: int = 3
    warmup: bool = True
    components: bool = True
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Options of the base measurement."""
    variant_runs: tuple[str, ...] = ()
    """Runs timed for the variants (labels such as 'teacher@20', 'student@4'; empty: all)."""
    variants: tuple[str, ...] = ()
    """Further settings timed after the base: '+'-joined tokens channels_last, vae_bf16, vae_fp16, bf16, fp16,
    tiny_decoder, compile, lora, lora_merged."""
    seed: int = 0

    def __post_init__(self) -> None:
        from ..config import ConfigError, check_image_size

        self.teacher_steps = tuple(int(s) for s in self.teacher_steps)
        self.student_steps = tuple(int(s) for s in self.student_steps)
        check_image_size(self.size, "bench.size")
        if self.repeats < 1:
            raise ConfigError(f"bench.repeats={self.repeats}: must be >= 1")
        if not self.teacher_steps or not self.student_steps or min(self.teacher_steps + self.student_steps) < 1:
            raise ConfigError("bench: teacher_steps and student_steps need positive step counts")
        self.variants = tuple(self.variants)
        for v in self.variants:
            parse_variant(v)
        self.variant_runs = tuple(self.variant_runs)
        known = [lab for lab, _, _ in _runs(self)]
        bad = [r for r in self.variant_runs if r not in known]
        if bad:
            raise ConfigError(f"bench.variant_runs: {bad} are not among the runs {known}")


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------

_TOKENS = {"base", "channels_last", "vae_bf16", "vae_fp16", "vae_fp32", "writenet_bf16", "writenet_fp16", "bf16",
           "fp16", "fp32", "tiny_decoder", "compile", "offload", "separate_cfg", "lora", "lora_merged"}


@dataclass(frozen=True)
class Variant:
    name: str
    runtime: RuntimeOptions
    dtype: str | None = None
    """Convert the whole model to this dtype (None: keep)."""
    lora: str | None = None
    """None, 'unmerged' or 'merged' (a rank-64 LoRA on the LCM target set, zero-initialised)."""


def parse_variant(text: str, base: RuntimeOptions | None = None) -> Variant:
    """'bf16+channels_last' → :class:`Variant` (tokens: see :class:`BenchConfig`.variants)."""
    from ..config import ConfigError

    tokens = [t for t in text.replace(",", "+").split("+") if t]
    bad = [t for t in tokens if t not in _TOKENS]
    if bad or not tokens:
        raise ConfigError(f"bench variant {text!r}: unknown token(s) {bad}; known: {sorted(_TOKENS)}")
    rt = replace(base) if base is not None else RuntimeOptions()
    dtype = lora = None
    for t in tokens:
        if t == "channels_last":
            rt = replace(rt, channels_last=True)
        elif t.startswith("vae_"):
            rt = replace(rt, vae_dtype=t[4:])
        elif t.startswith("writenet_"):
            rt = replace(rt, writenet_dtype=t[9:])
        elif t in ("bf16", "fp16", "fp32"):
            dtype = t
        elif t == "tiny_decoder":
            rt = replace(rt, tiny_decoder=rt.tiny_decoder or "random")
        elif t == "compile":
            rt = replace(rt, compile=True)
        elif t == "offload":
            rt = replace(rt, offload=True)
        elif t == "separate_cfg":
            rt = replace(rt, separate_cfg=True)
        elif t == "lora":
            lora = "unmerged"
        elif t == "lora_merged":
            lora = "merged"
    return Variant(text, rt, dtype, lora)


@contextlib.contextmanager
def _variant_applied(model, v: Variant):
    """Apply the parts of a variant that change the model (LoRA, VAE precision, memory format); undo on exit.

    The model dtype is not undone (a bf16 → fp32 round trip would not restore the weights): variants that change
    it run last.
    """
    from .. import lora as L

    # run_in_dtype converts a part in place: keep its weights to restore them exactly
    parts = [m for m, dt in ((model.vae, v.runtime.vae_dtype), (model.control_model, v.runtime.writenet_dtype))
             if dt is not None]
    saved = [{k: t.clone() for k, t in m.state_dict().items()} for m in parts]
    watched = [m for p in (model.vae, model.control_model) for m in p.modules()]
    hooks_before = {id(m): (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in watched}
    if v.lora:
        L.apply_lora(model, L.LoraSpec(rank=64, alpha=64))
        if v.lora == "merged":
            L.merge_lora(model)
    try:
        yield
    finally:
        if v.lora:
            L.unmerge_lora(model)
            L.unload_lora(model, merge=False)
        for m in watched:  # drop the casting hooks run_in_dtype added
            pre, post = hooks_before.get(id(m), ({}, {}))
            for k in list(m._forward_pre_hooks):
                if k not in pre:
                    del m._forward_pre_hooks[k]
            for k in list(m._forward_hooks):
                if k not in post:
                    del m._forward_hooks[k]
        dt = next(model.unet.parameters()).dtype
        for m, state in zip(parts, saved):
            m.to(dt)
            m.load_state_dict(state)
        if v.runtime.channels_last:
            for m in (model.unet, model.control_model, model.vae):
                m.to(memory_format=torch.contiguous_format)


def _order_variants(variants: list[Variant], base_dtype: torch.dtype) -> list[Variant]:
    """Variants that keep the model dtype first (their order kept), then those that change it."""
    keep = [v for v in variants if v.dtype is None or DTYPES[v.dtype] == base_dtype]
    change = [v for v in variants if v not in keep]
    dts = {v.dtype for v in change}
    if len(dts) > 1:
        from ..config import ConfigError

        raise ConfigError(f"bench variants change the model dtype to {sorted(dts)}: one lower precision per run")
    return keep + change


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CPU_TIME: list[float] = []
"""CPU seconds (all threads of this process) of the last ``_timed`` call."""


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall seconds of ``fn()`` (device synchronised) and its result; its process CPU time goes to ``_CPU_TIME``.

    CPU time is the cross-check on a shared machine: time spent descheduled by other processes' work inflates the
    wall time but not the CPU time.
    """
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    wall = time.perf_counter() - t0
    _CPU_TIME[:] = [time.process_time() - c0]
    return wall, out


def _boxes(size: int) -> list[list[float]]:
    s = size / 256
    return [[24 * s, 40 * s, 232 * s, 100 * s], [40 * s, 150 * s, 216 * s, 210 * s]]


def _request(cfg: BenchConfig, kind: str, steps: int):
    from ..generation import GenerationRequest

    teacher = kind == "teacher"
    return GenerationRequest(prompt=PROMPT, positions=_boxes(cfg.size), height=cfg.size, width=cfg.size,
                             seed=cfg.seed, steps=steps, sampler="ddim" if teacher else cfg.student_sampler,
                             cfg_scale=cfg.teacher_cfg if teacher else 1.0)


def _runs(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """(label, kind, steps) of every timed run."""
    out = [(f"teacher@{s}", "teacher", s) for s in cfg.teacher_steps]
    out += [(f"student@{k}", "student", k) for k in cfg.student_steps]
    return out


def _components(model_view, gen, cfg: BenchConfig, device, dtype) -> dict[str, Callable[[], object]]:
    """Closures that run one component each, on prepared inputs of the benchmark request."""
    from ..conditioning import TextInfo
    from ..pipeline import GuidedDenoiser, encode_branches

    req_t = _request(cfg, "teacher", 1)
    prep = gen.prepare(req_t)
    g = torch.Generator().manual_seed(cfg.seed)
    masked_img = prep.masked_img.to(device, dtype)
    with torch.no_grad():
        mean, _ = model_view.vae.encode(masked_img)  # the posterior mean stands in for the sample (same shapes)
        ti = prep.text_info.to(device, dtype).with_masked_x(model_view.scale_factor * mean)
        img_p = [prep.img_prompt + ", " + req_t.a_prompt]
        txt_p = [prep.text_prompt]
        both = encode_branches(model_view, ti, img_p, txt_p, [req_t.n_prompt], [""])
        single = encode_branches(model_view, ti, img_p, txt_p)
    lines = both.lines
    teacher_eps = GuidedDenoiser(model_view, both, cfg.teacher_cfg, batch_cfg=getattr(gen, "batch_cfg", True))
    student_eps = GuidedDenoiser(model_view, single, 1.0)
    h = cfg.size // 8
    x = torch.randn((1, model_view.cfg.unet.in_channels, h, h), generator=g).to(device, dtype)
    t = torch.full((1,), 499, dtype=torch.long, device=device)
    ti2 = TextInfo.cat([ti, ti])
    ctx2 = torch.cat([both.cond.text_context, both.uncond.text_context])
    return {
        "render": lambda: gen.prepare(req_t),
        "vae_encode": lambda: model_view.vae.encode(masked_img),
        "ocr_embed": lambda: model_view.line_embeddings(ti),
        "clip_1": lambda: model_view.encode_conditions(img_p, txt_p, lines),
        "clip_2": lambda: (model_view.encode_conditions(img_p, txt_p, lines),
                           model_view.encode_conditions([req_t.n_prompt], [""], lines)),
        "writenet_1": lambda: model_view.control(single.cond.text_context, ti),
        "writenet_2": lambda: model_view.control(ctx2, ti2),
        "unet_1": lambda: student_eps(x, t),
        "unet_2": lambda: teacher_eps(x, t),
        "decode": lambda: model_view.decode(x),
    }


COMPONENT_LABELS = {
    "render": "glyph rendering (CPU)", "vae_encode": "VAE encode (cached per size)", "ocr_embed": "OCR line embedding",
    "clip_1": "CLIP, 1 branch", "clip_2": "CLIP, 2 branches", "writenet_1": "WriteNet, batch 1",
    "writenet_2": "WriteNet, batch 2 (CFG)", "unet_1": "UNet pass, batch 1", "unet_2": "UNet, cond + uncond (CFG)",
    "decode": "VAE decode",
}


def predicted_seconds(comp: dict[str, float], kind: str, steps: int) -> float:
    """A run's time from its components: fixed costs + steps × one pass (the VAE encode is cached)."""
    b = "2" if kind == "teacher" else "1"
    return (comp["render"] + comp["ocr_embed"] + comp[f"clip_{b}"] + comp[f"writenet_{b}"]
            + steps * comp[f"unet_{b}"] + comp["decode"])


@dataclass
class VariantResult:
    name: str
    runs: dict[str, dict] = field(default_factory=dict)
    """label → {kind, steps, unet_evals, seconds: [...], median, phases: {phase: median}}."""
    components: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    """label → the first repeat's image (for the precision comparison)."""
    psnr_vs_base: dict[str, float] = field(default_factory=dict)
    changes_numerics: str = ""


def _measure(model, cfg: BenchConfig, v: Variant, device: torch.device, log_fn, only: tuple[str, ...] = ()
             ) -> VariantResult:
    dtype = next(model.unet.parameters()).dtype
    view, gen = apply_runtime_options(model, v.runtime, device)
    res = VariantResult(v.name)
    runs = [r for r in _runs(cfg) if not only or r[0] in only]
    times: dict[str, list[float]] = {lab: [] for lab, _, _ in runs}
    cpu: dict[str, list[float]] = {lab: [] for lab, _, _ in runs}
    phases: dict[str, dict[str, list[float]]] = {lab: {} for lab, _, _ in runs}
    with torch.no_grad():
        if cfg.warmup:
            for kind in SAMPLER_STEP_KINDS:
                dt, _ = _timed(lambda: gen(_request(cfg, kind, 1)), device)
                log_fn(f"  warm-up {kind} 1 step: {dt:.2f} s")
        comps = _components(view, gen, cfg, device, dtype) if cfg.components else {}
        comp_times: dict[str, list[float]] = {k: [] for k in comps}
        for r in range(cfg.repeats):
            for lab, kind, steps in runs:
                dt, out = _timed(lambda: gen(_request(cfg, kind, steps)), device)
                times[lab].append(dt)
                cpu[lab].append(_CPU_TIME[0])
                for k, s in out.seconds.items():
                    phases[lab].setdefault(k, []).append(s)
                if r == 0:
                    res.images[lab] = out.images[0]
                log_fn(f"  round {r + 1}/{cfg.repeats} {lab}: {dt:.2f} s")
            for k, fn in comps.items():
                fn()  # each component once untimed per round: its own warm-up, cache effects alike
                dt, _ = _timed(fn, device)
                comp_times[k].append(dt)
            if comps:
                log_fn("  round {}/{} components: {}".format(r + 1, cfg.repeats, ", ".join(
                    f"{k} {v[-1]:.3f}" for k, v in comp_times.items())))
    for lab, kind, steps in runs:
        evals = steps * (2 if kind == "teacher" and cfg.teacher_cfg != 1.0 else 1)
        res.runs[lab] = {"kind": kind, "steps": steps, "unet_evals": evals, "seconds": times[lab],
                         "median": statistics.median(times[lab]), "cpu_seconds": cpu[lab],
                         "cpu_median": statistics.median(cpu[lab]),
                         "phases": {k: statistics.median(s) for k, s in phases[lab].items()}}
    res.components = {k: statistics.median(s) for k, s in comp_times.items()}
    if v.runtime.tiny_decoder:
        res.changes_numerics = "different decoder"
    elif v.runtime.vae_dtype or v.runtime.writenet_dtype or v.dtype:
        res.changes_numerics = "lower precision"
    return res


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------------


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident set of this process (GiB, Linux ru_maxrss) and, on CUDA, peak allocated device memory."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.type == "cuda":
        out["peak_cuda_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def run_bench(cfg: BenchConfig, model=None, log_fn: Callable[[str], None] | None = None) -> dict:
    """Build the model (unless given), time the base setting and every variant; returns the results document."""
    from ..factory import build_model, pick_device, pick_dtype

    log_fn = log_fn or (lambda s: log.info(s))
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if model is None:
        model = build_model(cfg.model)
    model = model.to(device=device, dtype=dtype).eval()
    build_s = time.perf_counter() - t0
    if cfg.teacher_cfg is None:
        cfg = replace(cfg, teacher_cfg=teacher_cfg(model.cfg))
    log_fn(f"model {cfg.model} ready in {build_s:.1f} s on {device} ({str(dtype).removeprefix('torch.')}), "
           f"{torch.get_num_threads()} threads, load {load0[0]:.2f}")
    base = Variant("base", cfg.runtime)
    variants = [base] + _order_variants([parse_variant(v, cfg.runtime) for v in cfg.variants], dtype)
    results: list[VariantResult] = []
    for v in variants:
        if v.dtype is not None and DTYPES[v.dtype] != next(model.unet.parameters()).dtype:
            if v.dtype == "fp16" and device.type == "cpu":
                from ..config import ConfigError

                raise ConfigError("bench variant fp16: not on a CPU (use bf16)")
            model.to(DTYPES[v.dtype])
        log_fn(f"variant {v.name} ({v.runtime.label()}"
               f"{', model ' + v.dtype if v.dtype else ''}{', LoRA ' + v.lora if v.lora else ''})")
        with _variant_applied(model, v):
            r = _measure(model, cfg, v, device, log_fn, cfg.variant_runs if results else ())
        if results:
            for lab, img in r.images.items():
                b = results[0].images.get(lab)
                if b is not None and r.changes_numerics != "different decoder":
                    from .metrics import psnr

                    a_t = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
                    b_t = torch.from_numpy(b).permute(2, 0, 1)[None].double() / 255
                    r.psnr_vs_base[lab] = float(psnr(a_t, b_t)[0])
        results.append(r)
    load1 = os.getloadavg()
    return {
        "config": {"model": cfg.model, "size": cfg.size, "device": str(device),
                   "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                   "repeats": cfg.repeats, "teacher_cfg": cfg.teacher_cfg, "student_sampler": cfg.student_sampler,
                   "runtime": cfg.runtime.label(), "torch": torch.__version__},
        "load_before": load0, "load_after": load1, "build_seconds": build_s,
        "variants": [{"name": r.name, "runs": r.runs, "components": r.components, "psnr_vs_base": r.psnr_vs_base,
                      "changes_numerics": r.changes_numerics} for r in results],
        "memory": peak_memory(device),
    }


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def ratios(v: dict) -> list[dict]:
    """Per student run and teacher run: measured and eval-count speed-ups."""
    out = []
    runs = v["runs"]
    for ls, s in runs.items():
        if s["kind"] != "student":
            continue
        for lt, t in runs.items():
            if t["kind"] != "teacher":
                continue
            out.append({"student": ls, "teacher": lt, "measured": t["median"] / s["median"],
                        "eval_count": t["unet_evals"] / s["unet_evals"]})
    return out


def goal_checks(v: dict) -> list[dict]:
    out = []
    for k, S, goal in GOALS:
        s, t = v["runs"].get(f"student@{k}"), v["runs"].get(f"teacher@{S}")
        if s is None or t is None:
            continue
        m = t["median"] / s["median"]
        comp = v.get("components") or {}
        # what the ratio would be with no fixed cost at all: the teacher's CFG batch of 2 costs less than 2 passes
        ceiling = S * comp["unet_2"] / (k * comp["unet_1"]) if comp.get("unet_1") else None
        out.append({"student_steps": k, "teacher_steps": S, "goal": goal, "measured": m,
                    "measured_cpu_time": t["cpu_median"] / s["cpu_median"],
                    "eval_count": t["unet_evals"] / s["unet_evals"], "zero_fixed_cost_ceiling": ceiling,
                    "pass": m >= goal})
    return out


def format_report(doc: dict) -> str:
    """The printed tables: per variant, runs with ratios, components, goals; then a comparison of variants."""
    c = doc["config"]
    L = [f"anytext2-lcm bench: model {c['model']}"
         f"{' (random weights)' if c['model'] in ('sd15', 'tiny') else ''}, {c['size']}x{c['size']}, {c['device']} "
         f"{c['dtype']}, {c['threads']} threads (OMP_WAIT_POLICY {c.get('omp_wait_policy', '?')}), "
         f"{c['repeats']} round(s) (median), student sampler "
         f"{c['student_sampler']}, teacher DDIM + CFG {c['teacher_cfg']}; load avg "
         f"{doc['load_before'][0]:.2f} -> {doc['load_after'][0]:.2f}"]
    base = doc["variants"][0]
    for v in doc["variants"]:
        L.append("")
        L.append(f"== variant: {v['name']}" + (f" (changes numerics: {v['changes_numerics']})"
                                              if v["changes_numerics"] else ""))
        teachers = [lab for lab, r in v["runs"].items() if r["kind"] == "teacher"]
        hdr = (f"{'run':<14}{'UNet evals':>11}{'s/image':>10}{'CPU s':>8}{'render':>8}{'cond':>8}{'denoise':>9}"
               f"{'decode':>8}"
               + "".join(f"{'vs ' + t:>14}{'(evals)':>9}" for t in teachers))
        if v is not base:
            hdr += f"{'vs base':>9}{'PSNR vs base':>14}"
        L.append(hdr)
        for lab, r in v["runs"].items():
            ph = r["phases"]
            row = (f"{lab:<14}{r['unet_evals']:>11}{r['median']:>10.2f}{r['cpu_median']:>8.1f}"
                   f"{ph.get('prepare', 0):>8.2f}"
                   f"{ph.get('conditioning', 0):>8.2f}{ph.get('denoise', 0):>9.2f}{ph.get('decode', 0):>8.2f}")
            for t in teachers:
                tr = v["runs"][t]
                if r["kind"] == "student":
                    row += f"{tr['median'] / r['median']:>13.2f}x{tr['unet_evals'] / r['unet_evals']:>8.1f}x"
                else:
                    row += f"{'':>14}{'':>9}"
            if v is not base:
                b = base["runs"].get(lab)
                row += f"{b['median'] / r['median']:>8.2f}x" if b else f"{'':>9}"
                p = v["psnr_vs_base"].get(lab)
                row += f"{('inf' if p == float('inf') else f'{p:.1f} dB') if p is not None else 'n/a':>14}"
            L.append(row)
        comp = v["components"]
        if comp:
            L.append("components (median seconds):")
            for k, lab in COMPONENT_LABELS.items():
                if k in comp:
                    extra = ""
                    if k == "unet_2" and comp.get("unet_1"):
                        extra = f"   (= {comp['unet_2'] / comp['unet_1']:.2f} x batch 1)"
                    if k in ("decode", "writenet_1", "vae_encode") and comp.get("unet_1"):
                        extra = f"   (= {comp[k] / comp['unet_1']:.2f} UNet passes)"
                    L.append(f"  {lab:<28}{comp[k]:>8.3f}{extra}")
            L.append("sum of components along each run vs measured:")
            for lab, r in v["runs"].items():
                p = predicted_seconds(comp, r["kind"], r["steps"])
                L.append(f"  {lab:<14}{p:>8.2f} s  (measured {r['median']:.2f} s)")
            st = comp["render"] + comp["ocr_embed"] + comp["clip_1"] + comp["writenet_1"] + comp["decode"]
            L.append(f"student fixed cost per image (render + OCR emb + CLIP + WriteNet + decode): {st:.2f} s "
                     f"= {st / comp['unet_1']:.2f} UNet passes")
        goals = goal_checks(v)
        if goals:
            L.append("goals (end to end, measured side by side):")
            for g in goals:
                ceil = g["zero_fixed_cost_ceiling"]
                L.append(f"  student {g['student_steps']}-step vs teacher {g['teacher_steps']}-step: "
                         f"{g['measured']:.2f}x (CPU time {g['measured_cpu_time']:.2f}x; goal >= {g['goal']:.0f}x; "
                         f"eval-count ratio {g['eval_count']:.0f}x"
                         + (f"; with zero fixed cost {ceil:.1f}x" if ceil else "") + "): "
                         f"{'PASS' if g['pass'] else 'below goal'}")
    m = doc["memory"]
    L.append("")
    L.append("peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
             + f"; model build {doc['build_seconds']:.1f} s")
    return "\n".join(L)
