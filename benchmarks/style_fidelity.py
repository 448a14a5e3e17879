"""Does a few-step student still follow its teacher when a style LoRA is merged under both? A tiny AnyText2 teacher
and its LCM-LoRA student (the stages of ``configs/style_fidelity.yaml``, cached), then a kohya style LoRA merged at
growing ratios into the teacher's weights with the student LoRA applied on top, unchanged (no re-training).

    python benchmarks/style_fidelity.py [--config configs/style_fidelity.yaml] [--out outputs/style_fidelity]
                                        [--cache outputs/style_fidelity_cache] [--set KEY=VALUE ...]
    python benchmarks/style_fidelity.py --teacher MODEL --adapter ADAPTER --heldout ANYWORD.json   # any pair, e.g.
                                        # a converted SD-1.5 teacher and its student on a GPU (no training here)

The style LoRA is written here in the kohya layout and goes through the same path as ``--style-lora FILE:RATIO``
(``factory.read_community`` / ``apply_community``): rank ``eval.style_rank`` on every attention, projection and
feed-forward Linear / 1x1 Conv of the UNet's transformer blocks (AttnX excluded, as community files have none) and
every attention and MLP Linear of CLIP, random directions scaled so that at ratio 1 each module's update has
``‖ΔW‖_F = eval.style_size · ‖W‖_F``. A random direction is not a trained style; it measures how sensitive the
student's agreement with its teacher is to a change of the base weights of a known size.

For each ratio and each held-out sample (same seed and x_T everywhere), latent MSE of:

* the styled teacher (20-step DDIM + CFG 7.5) to the unstyled teacher: how much the style moves the images;
* the student on the styled weights (its recorded sampling, k steps) to the styled teacher: the student's fidelity;
* the styled teacher's own k-step DDIM + CFG to the styled teacher (what k steps give without distillation).

Printed, and written to OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def style_modules(model) -> dict[str, str]:
    """kohya name → module name of the modules a community SD-1.5 style LoRA adapts (kohya's default targets)."""
    import re

    from anytext2_lcm.lora import kohya_names

    keep = re.compile(r"^lora_unet_.*_attentions_\d+_(?!.*attn[12]x).*|^lora_te_.*_(self_attn|mlp)_.*")
    return {k: m for m, k in kohya_names(model).items() if keep.match(k)}


def random_style_lora(model, rank: int, size: float, seed: int) -> dict:
    """kohya tensors (alpha = rank) whose update at ratio 1 has ‖ΔW‖ = size · ‖W‖ for every module."""
    import torch

    from anytext2_lcm.lora.style import lora_delta

    g = torch.Generator().manual_seed(seed)
    out = {}
    for kohya, name in sorted(style_modules(model).items()):
        w = model.get_submodule(name).weight.detach().float()
        down = torch.randn((rank, *w.shape[1:]), generator=g)
        up = torch.randn((w.shape[0], rank, *((1, 1) if w.dim() == 4 else ())), generator=g)
        up *= size * w.norm() / lora_delta(down, up, w.shape).norm()
        out.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                    f"{kohya}.alpha": torch.tensor(float(rank))})
    return out


def requests(samples, size: int, sampler: str, steps: int, cfg: float, options: dict):
    from anytext2_lcm.evaluate.runner import text_prompt_for
    from anytext2_lcm.generation import GenerationRequest

    return [GenerationRequest(prompt=s.caption, text_prompt=text_prompt_for(s.lines),
                              positions=[ln.polygon for ln in s.lines], colors=[ln.color for ln in s.lines],
                              height=size, width=size, seed=s.seed, steps=steps, sampler=sampler,
                              sampler_options=dict(options), cfg_scale=cfg) for s in samples]


def run_latents(model, samples, size: int, runs: dict) -> dict:
    """name → per-sample final latents; a run is (sampler, steps, cfg, options, student?)."""
    import contextlib

    import torch

    from anytext2_lcm import lora as L
    from anytext2_lcm.evaluate.runner import EvalGenerator, initial_noise
    from anytext2_lcm.evaluate.runtime import RuntimeOptions, apply_runtime_options

    _, gen = apply_runtime_options(model, RuntimeOptions(), generator_cls=EvalGenerator)
    C, h = model.cfg.unet.in_channels, size // model.cfg.latent_factor
    out = {}
    with torch.no_grad():
        for name, (sampler, steps, cfg, options, student) in runs.items():
            with contextlib.nullcontext() if student else L.disable_adapters(model):
                out[name] = [gen(r, x_T=initial_noise(s.seed, 1, C, h, h)).latents.float().cpu()
                             for r, s in zip(requests(samples, size, sampler, steps, cfg, options), samples)]
    return out


def mse(a: list, b: list) -> float:
    from anytext2_lcm.evaluate.metrics import latent_mse

    return statistics.fmean(float(latent_mse(x, y)[0]) for x, y in zip(a, b))


def measure(teacher: str, adapter: str, style_file: Path, samples, ev: dict) -> list[dict]:
    from anytext2_lcm import lora as L
    from anytext2_lcm.defaults import Sampling
    from anytext2_lcm.factory import apply_community, build_model, read_community

    sampling = Sampling.from_dict(L.adapter_info(adapter)["sampling"])
    runs = {"teacher": ("ddim", 20, 7.5, {}, False)}
    for k in ev["steps"]:
        runs[f"student@{k}"] = (sampling.sampler, k, sampling.cfg, sampling.options, True)
        runs[f"teacher@{k}"] = ("ddim", k, 7.5, {}, False)
    rows, plain = [], None
    for ratio in ev["ratios"]:
        model = build_model(teacher).eval()
        if ratio:
            apply_community(model, read_community(None, [f"{style_file}:{ratio}"]))
        L.load_lora(model, adapter)
        lat = run_latents(model, samples, ev["size"], runs)
        plain = lat["teacher"] if plain is None else plain
        row = {"ratio": ratio, "style_effect": mse(lat["teacher"], plain), "steps": {},
               "teacher_mean_square": statistics.fmean(float(x.double().pow(2).mean()) for x in lat["teacher"])}
        for k in ev["steps"]:
            row["steps"][k] = {"student": mse(lat[f"student@{k}"], lat["teacher"]),
                               "teacher_ddim": mse(lat[f"teacher@{k}"], lat["teacher"])}
        rows.append(row)
        print(f"style_fidelity: ratio {ratio:g}: " + ", ".join(
            f"{k} steps student {v['student']:.4f}" for k, v in row["steps"].items()), flush=True)
    return rows


def format_table(rows: list[dict], steps: list[int], style_size: float | None) -> str:
    """One row per ratio: the update size, the style's effect on the teacher, the student's error at each step count
    (and its ratio to the unstyled student's), the styled teacher's own DDIM error at those step counts."""
    base = rows[0]["steps"]
    head = ("| style ratio | ‖ΔW‖ / ‖W‖ | style effect on the teacher | " +
            " | ".join(f"student {k} steps (× ratio 0)" for k in steps) +
            f" | teacher DDIM {' / '.join(map(str, steps))} steps |")
    lines = [head, "|" + "---:|" * (4 + len(steps))]
    for r in rows:
        cells = [f"{r['ratio']:g}", f"{r['ratio'] * style_size:g}" if style_size is not None else "(the file's)",
                 f"{r['style_effect']:.4f} (teacher's mean square {r['teacher_mean_square']:.2f})"]
        cells += [f"{r['steps'][k]['student']:.3f} ({r['steps'][k]['student'] / base[k]['student']:.2f}×)"
                  for k in steps]
        cells.append(" / ".join(f"{r['steps'][k]['teacher_ddim']:.3f}" for k in steps))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "style_fidelity.yaml"))
    p.add_argument("--out", default="outputs/style_fidelity")
    p.add_argument("--cache", default="outputs/style_fidelity_cache", help="stage folders, reused between runs")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--teacher", help="measure this teacher (a model name or folder) instead of the recipe's stages")
    p.add_argument("--adapter", help="with --teacher: its student adapter")
    p.add_argument("--heldout", help="with --teacher: the AnyWord-format samples to generate")
    p.add_argument("--style-file", help="a kohya style LoRA to merge instead of the random one (eval.style_* unused)")
    args = p.parse_args(argv)
    given = [args.teacher, args.adapter, args.heldout]
    if any(given) and not all(given):
        p.error("--teacher, --adapter and --heldout go together")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from anytext2_lcm.atomic import save_safetensors, write_json, write_text
    from anytext2_lcm.evaluate.runner import EvalConfig, load_eval_samples
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.recipes.spec import load_recipe
    from anytext2_lcm.recipes.stages import run_recipe

    recipe = load_recipe(args.config, args.sets)
    ev = recipe.sections["eval"]
    t0 = time.perf_counter()
    if args.teacher:
        teacher, adapter, heldout = args.teacher, args.adapter, args.heldout
    else:
        run = run_recipe(recipe, args.cache, report=lambda m: print(f"style_fidelity: {m}", flush=True))
        teacher, adapter = str(run.model("teacher")), str(run.adapter("student"))
        heldout = str(run.json(ev["dataset"]))
    torch.set_num_threads(recipe.threads)
    out = Path(args.out)
    style = Path(args.style_file) if args.style_file else save_safetensors(
        out / "style_lora.safetensors",
        random_style_lora(build_model(teacher), ev["style_rank"], ev["style_size"], ev["style_seed"]))
    samples, _ = load_eval_samples(EvalConfig(data=(heldout,), num=ev["num"], size=ev["size"], seed=ev["seed"]))
    rows = measure(teacher, adapter, style, samples, ev)
    table = format_table(rows, ev["steps"], None if args.style_file else ev["style_size"])
    print(table)
    write_json(out / "results.json", {"recipe": recipe.to_dict(), "teacher": teacher, "adapter": adapter,
                                      "heldout": heldout, "style": str(style), "samples": len(samples), "rows": rows,
                                      "seconds": time.perf_counter() - t0})
    write_text(out / "table.md", table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
