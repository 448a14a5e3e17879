"""The speed goal (``anytext2-lcm bench --goal``): the few-step student with each speed option against the teacher
run the original's way, interleaved, at several sizes in one run.

The reference is the 20-step DDIM teacher with CFG 7.5 as the original AnyText2 runs it on a CPU: fp32, the full
VAE decoder, and CFG's two branches as two UNet passes per step (``--separate-cfg``). Against it, per size:

* the student (the base weights with ``cfg = 1`` and the few-step sampler; a merged LoRA costs the same) at each of
  ``student_steps``, plain and with each option (``--options``: '+'-joined ``bench`` variant tokens such as
  ``tiny_decoder``, ``bf16``, ``channels_last``, and ``fast`` = what ``--fast`` selects on this device);
* the like-for-like pair: for the options in ``--like-for-like``, the teacher with the same options (CFG as one batch
  of two, as this project runs it), so that the ratio a user of those settings sees is there too.

Every setting is timed inside every round (round-robin: the reference teacher, then each setting's runs), so a load
change on a shared machine hits them alike; a warm-up call of each setting precedes the first round. The ratios are
medians of seconds per image (wall) and, as the cross-check on a busy machine, of process CPU time. A setting in
another precision runs on a copy of the model in that precision, made once. Outputs: each option's latent drift
from the plain student at the same seed and noise (MSE relative to the latents' mean square; 0 for a decoder-only
option) and the PSNR of its image to the plain student's image. The goal (:data:`GOAL_SPEEDUP`: the 4-step student
>= 16x at 256 px, >= 12x at 512 px) is checked per setting; whether a setting's text survives is measured apart (OCR
on the testbed, ``benchmarks/light_decoder.py``).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .bench import _CPU_TIME, BenchConfig, Variant, _request, _timed, _variant_applied, parse_variant, peak_memory
from .runtime import DTYPES, RuntimeOptions, apply_runtime_options, fast_tokens

GOAL_SPEEDUP = {256: 16.0, 512: 12.0}
"""Image side → the minimum end-to-end speed-up of the 4-step student over the reference teacher."""
GOAL_STEPS = 4
DEFAULT_OPTIONS = ("tiny_decoder", "bf16", "channels_last", "fast")


@dataclass(kw_only=True)
class GoalConfig:
    """What ``bench --goal`` measures."""

    model: str = "sd15"
    """'sd15' (the real architecture, random weights), 'tiny', 'testbed', or a converted folder / checkpoint."""
    sizes: tuple[int, ...] = (256, 512)
    """Image sides, each a full comparison."""
    device: str | None = None
    options: tuple[str, ...] = DEFAULT_OPTIONS
    """Settings of the student, each '+'-joined ``bench`` variant tokens (``fast``: the ``--fast`` settings)."""
    like_for_like: tuple[str, ...] = ("fast",)
    """Options whose teacher (same options, CFG batched) is timed too ('base': the plain fp32 teacher)."""
    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: int = 20
    teacher_cfg: float = 7.5
    student_sampler: str = "lcm"
    repeats: int = 1
    tiny_decoder: str = "random"
    """The light decoder of the options that use one ('random': untrained weights of the same shape, timing only)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from ..config import SIZE_MULTIPLE, ConfigError

        self.sizes, self.options = tuple(int(s) for s in self.sizes), tuple(self.options)
        self.like_for_like, self.student_steps = tuple(self.like_for_like), tuple(int(s) for s in self.student_steps)
        if not self.sizes or any(not isinstance(s, int) or s <= 0 or s % SIZE_MULTIPLE for s in self.sizes):
            raise ConfigError(f"bench.sizes={list(self.sizes)}: positive multiples of 64")
        if self.repeats < 1:
            raise ConfigError(f"bench.repeats={self.repeats}: must be >= 1")
        if GOAL_STEPS not in self.student_steps:
            raise ConfigError(f"bench.student_steps={list(self.student_steps)}: must include {GOAL_STEPS} (the goal)")
        for o in self.options:
            parse_variant(o.replace("fast", "base"))
        bad = [o for o in self.like_for_like if o != "base" and o not in self.options]
        if bad:
            raise ConfigError(f"bench.like_for_like: {bad} are not among the options {list(self.options)} or 'base'")


@dataclass
class Setting:
    """One timed configuration: its variant (options, precision), the runs it times and the model it uses."""

    name: str
    variant: Variant
    runs: list[tuple[str, str, int]]
    """(label, kind, steps)."""
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    images: dict[str, object] = field(default_factory=dict)


def expand_fast(option: str, device: torch.device) -> str:
    """Replace the ``fast`` token by the tokens of ``--fast`` on ``device``."""
    tokens = [t for t in option.replace(",", "+").split("+") if t]
    out: list[str] = []
    for t in tokens:
        out += list(fast_tokens(device)) if t == "fast" else [t]
    return "+".join(dict.fromkeys(out)) or "base"


def _settings(cfg: GoalConfig, device: torch.device) -> list[Setting]:
    teacher = ("teacher@%d" % cfg.teacher_steps, "teacher", cfg.teacher_steps)
    students = [(f"student@{k}", "student", k) for k in cfg.student_steps]
    rt = RuntimeOptions(tiny_decoder=None)
    out = [Setting("reference teacher", Variant("reference", replace(rt, separate_cfg=True), "fp32"), [teacher]),
           Setting("base", Variant("base", rt, "fp32"), students + ([teacher] if "base" in cfg.like_for_like else []))]
    for o in cfg.options:
        v = parse_variant(expand_fast(o, device))
        if v.runtime.tiny_decoder:
            v = replace(v, runtime=replace(v.runtime, tiny_decoder=cfg.tiny_decoder))
        v = replace(v, name=o, dtype=v.dtype or "fp32")
        out.append(Setting(o, v, students + ([teacher] if o in cfg.like_for_like else [])))
    return out


def converted_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype``, made without a second full-precision copy (the memo of ``deepcopy`` holds
    the cast tensors)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b.detach().clone()
    return copy.deepcopy(model, memo)


def _run_setting(s: Setting, model, bcfg: BenchConfig, device, timed: bool, log_fn) -> None:
    """Apply a setting, run its runs once (a 1-step warm-up of each kind when not ``timed``), undo it."""
    with torch.no_grad(), _variant_applied(model, s.variant):
        _, gen = apply_runtime_options(model, s.variant.runtime, device)
        if not timed:
            for kind in dict.fromkeys(k for _, k, _ in s.runs):
                gen(_request(bcfg, kind, 1))
            return
        for lab, kind, steps in s.runs:
            dt, out = _timed(lambda: gen(_request(bcfg, kind, steps)), device)
            s.times.setdefault(lab, []).append(dt)
            s.cpu.setdefault(lab, []).append(_CPU_TIME[0])
            s.latents.setdefault(lab, out.latents.float().cpu())
            s.images.setdefault(lab, out.images[0])
            log_fn(f"  {bcfg.size} px {s.name} {lab}: {dt:.2f} s (CPU {_CPU_TIME[0]:.2f} s)")


def measure_size(models: dict[torch.dtype, torch.nn.Module], cfg: GoalConfig, size: int, device: torch.device,
                 log_fn: Callable[[str], None]) -> dict:
    """Every setting at one size (warm-up, then ``cfg.repeats`` round-robin rounds) → the size's results."""
    bcfg = BenchConfig(model=cfg.model, size=size, teacher_cfg=cfg.teacher_cfg, student_sampler=cfg.student_sampler,
                       teacher_steps=(cfg.teacher_steps,), student_steps=cfg.student_steps, seed=cfg.seed)
    settings = _settings(cfg, device)
    for timed, rounds in ((False, 1), (True, cfg.repeats)):
        for r in range(rounds):
            for s in settings:
                _run_setting(s, models[DTYPES[s.variant.dtype]], bcfg, device, timed, log_fn)
    return summarise(settings, cfg, size)


def _drift(s: Setting, base: Setting, lab: str) -> dict:
    from .metrics import psnr

    a, b = s.latents[lab], base.latents[lab]
    rel = float((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12))
    ia = torch.from_numpy(s.images[lab]).permute(2, 0, 1)[None].double() / 255
    ib = torch.from_numpy(base.images[lab]).permute(2, 0, 1)[None].double() / 255
    return {"latent_rel_mse": rel, "image_psnr_db": float(psnr(ia, ib)[0])}


def summarise(settings: list[Setting], cfg: GoalConfig, size: int) -> dict:
    """Medians, ratios to the reference teacher (wall and CPU time) and to the like-for-like teacher, drift, goal."""
    ref, base = settings[0], settings[1]
    t_lab = f"teacher@{cfg.teacher_steps}"
    ref_s, ref_c = statistics.median(ref.times[t_lab]), statistics.median(ref.cpu[t_lab])
    goal = GOAL_SPEEDUP.get(size)
    rows = []
    for s in settings[1:]:
        med = {lab: statistics.median(v) for lab, v in s.times.items()}
        cpu = {lab: statistics.median(v) for lab, v in s.cpu.items()}
        row = {"setting": s.name, "tokens": s.variant.runtime.label(), "dtype": s.variant.dtype, "seconds": med,
               "cpu_seconds": cpu,
               "vs_reference": {lab: ref_s / v for lab, v in med.items() if lab.startswith("student")},
               "vs_reference_cpu_time": {lab: ref_c / v for lab, v in cpu.items() if lab.startswith("student")}}
        if t_lab in med:
            row["vs_like_for_like"] = {lab: med[t_lab] / v for lab, v in med.items() if lab.startswith("student")}
            row["vs_like_for_like_cpu_time"] = {lab: cpu[t_lab] / v for lab, v in cpu.items()
                                                if lab.startswith("student")}
        if s is not base:
            row["drift"] = {lab: _drift(s, base, lab) for lab in s.latents if lab.startswith("student")}
        k = f"student@{GOAL_STEPS}"
        g, gc = row["vs_reference"].get(k), row["vs_reference_cpu_time"].get(k)
        row["goal"] = None if goal is None else {"min": goal, "measured": g, "measured_cpu_time": gc,
                                                 "pass": g is not None and g >= goal,
                                                 "pass_cpu_time": gc is not None and gc >= goal}
        rows.append(row)
    return {"size": size, "reference_teacher": {"label": t_lab, "seconds": ref_s, "cpu_seconds": ref_c,
                                                "runtime": ref.variant.runtime.label(), "dtype": "fp32"},
            "settings": rows}


def run_goal(cfg: GoalConfig, model=None, log_fn: Callable[[str], None] | None = None,
             on_size: Callable[[dict], None] | None = None) -> dict:
    """Build the model (unless given, fp32), make the lower-precision copies the options need, measure each size;
    ``on_size`` receives the document after each size (a long run keeps what it measured)."""
    import os

    from ..factory import build_model, pick_device

    log_fn = log_fn or (lambda s: None)
    device = pick_device(cfg.device)
    if model is None:
        model = build_model(cfg.model)
    models = {torch.float32: model.to(device=device, dtype=torch.float32).eval()}
    for s in _settings(cfg, device):
        dt = DTYPES[s.variant.dtype]
        if dt not in models:
            if dt == torch.float16 and device.type == "cpu":
                from ..config import ConfigError

                raise ConfigError(f"bench --goal option {s.name!r}: fp16 on a CPU (use bf16)")
            models[dt] = converted_copy(models[torch.float32], dt)
    load0 = os.getloadavg()
    sizes: list[dict] = []
    for size in cfg.sizes:
        sizes.append(measure_size(models, cfg, size, device, log_fn))
        if on_size is not None:
            on_size(_document(cfg, device, load0, sizes))
    return _document(cfg, device, load0, sizes)


def _document(cfg: GoalConfig, device: torch.device, load0, sizes: list[dict]) -> dict:
    import os

    return {"config": {"model": cfg.model, "device": str(device), "threads": torch.get_num_threads(),
                       "repeats": cfg.repeats, "teacher_steps": cfg.teacher_steps, "teacher_cfg": cfg.teacher_cfg,
                       "student_sampler": cfg.student_sampler, "tiny_decoder": cfg.tiny_decoder,
                       "fast": "+".join(fast_tokens(device)), "torch": torch.__version__},
            "load_before": load0, "load_after": os.getloadavg(), "sizes": sizes, "memory": peak_memory(device)}


def _goal_row(r: dict, labs: list[str]) -> str:
    k = f"student@{GOAL_STEPS}"
    d, g = r.get("drift", {}).get(k), r["goal"]
    lfl, lflc = r.get("vs_like_for_like", {}).get(k), r.get("vs_like_for_like_cpu_time", {}).get(k)
    verdict = "-" if g is None else (f"{'PASS' if g['pass'] else 'below'} / {'PASS' if g['pass_cpu_time'] else 'below'}"
                                     f" (>= {g['min']:.0f}x)")
    return (f"| {r['setting']} ({r['dtype']}{', ' + r['tokens'] if r['tokens'] != 'none' else ''}) | "
            + " | ".join(f"{r['seconds'][lab]:.2f} / {r['cpu_seconds'][lab]:.2f}" for lab in labs) + " | "
            + " | ".join(f"{r['vs_reference'][lab]:.1f}x / {r['vs_reference_cpu_time'][lab]:.1f}x" for lab in labs)
            + f" | {f'{lfl:.1f}x / {lflc:.1f}x' if lfl else '-'} | "
            + (f"{d['latent_rel_mse']:.2e} | {d['image_psnr_db']:.1f} dB" if d else "0 | -") + f" | {verdict} |")


def format_goal(doc: dict) -> str:
    """Markdown tables, one per size: seconds and speed-ups of every setting, drift, the goal."""
    c = doc["config"]
    L = [f"bench --goal: model {c['model']}, {c['device']}, {c['threads']} thread(s), {c['repeats']} round(s) "
         f"(median), student sampler {c['student_sampler']}, light decoder {c['tiny_decoder']}, --fast = {c['fast']}; "
         f"load avg {doc['load_before'][0]:.2f} -> {doc['load_after'][0]:.2f}"]
    for sz in doc["sizes"]:
        ref = sz["reference_teacher"]
        labs = [lab for lab in sz["settings"][0]["seconds"] if lab.startswith("student")]
        L += ["", f"### {sz['size']} px: reference teacher {ref['label']} + CFG {c['teacher_cfg']}, fp32, CFG as two "
                  f"passes, full decoder: {ref['seconds']:.1f} s/image (CPU {ref['cpu_seconds']:.1f} s)", "",
              "Each cell: wall / process CPU time (the cross-check on a busy machine).", ""]
        L.append("| setting | " + " | ".join(f"{lab} s" for lab in labs) + " | " + " | ".join(
            f"{lab} vs reference" for lab in labs) + " | like-for-like @4 | latent drift @4 | PSNR vs base @4 | goal |")
        L.append("|---" * (2 * len(labs) + 5) + "|")
        L += [_goal_row(r, labs) for r in sz["settings"]]
    L += ["", "peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in doc["memory"].items())]
    return "\n".join(L)


__all__ = ["DEFAULT_OPTIONS", "GOAL_SPEEDUP", "GOAL_STEPS", "GoalConfig", "converted_copy", "expand_fast",
           "format_goal", "measure_size", "run_goal", "summarise"]
