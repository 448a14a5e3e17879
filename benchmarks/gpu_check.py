"""The GPU check: one command that measures what the README's GPU figures need, written as JSON and Markdown.

    python benchmarks/gpu_check.py --out gpu_check            # on a CUDA machine: sd15 architecture, 512 px
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gc  # the same route at toy sizes on a CPU (CI runs it)

Without CUDA (or with ``--cpu-smoke``) every section runs at toy sizes on the CPU, so that the route stays working.
Sections (each timed; one that fails records its error and the others still run):

1. **parity**: the parity fixture (``tests/fixtures/tiny``, recorded from the original code) replayed on the device
   in fp32 (TF32 off), every output against the project's tolerance ``5e-5 · max(1, max|ref|)``;
2. **drift**: the model in fp16 and bf16 against fp32 (random weights, every layer non-zero): one conditioned UNet
   ε at t = 499 (MSE relative to ε's mean square, max |Δ|) and one decoded image (PSNR, max |Δ|);
3. **speed**: ``bench`` in fp16: the 20-step DDIM + CFG teacher and the student at 1/2/4 steps, s/image side by side,
   without and with ``torch.compile``, peak memory of each;
4. **distill**: the real trainer, LCM-LoRA (rank 64, the ``lcm`` targets), batch 4, bf16 autocast, 20 steps,
   gradient checkpointing off and on: s/step (median after the first 2 steps) and peak memory;
5. **loader**: the data loader's samples/s (AnyWord reader on synthetic data, 8 workers).

GPU sizes: sd15 architecture with random weights at 512 px (about 5 minutes on one H100-class GPU, most of it model
initialisation and compilation). CPU smoke sizes: the tiny architecture at 64 px, 3 distillation steps, 2 workers,
no ``torch.compile`` (the section says so), under a minute on one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # data_speed.py, beside this file

GPU = {"preset": "sd15", "size": 512, "distill_steps": 20, "batch": 4, "workers": 8, "loader_samples": 400,
       "data_num": 64, "repeats": 2, "compile": True, "dtypes": ("fp16", "bf16")}
SMOKE = {"preset": "tiny", "size": 64, "distill_steps": 3, "batch": 2, "workers": 2, "loader_samples": 16,
         "data_num": 8, "repeats": 1, "compile": False, "dtypes": ("bf16",)}


def _cuda_peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def check_parity(device, fixture: Path) -> dict:
    import torch

    from anytext2_lcm.parity import compare, compute_outputs, load_fixture

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, inputs, refs, meta = load_fixture(fixture)
    model.to(device)
    with torch.no_grad():
        ours = compute_outputs(model, {k: v.to(device) for k, v in inputs.items()}, meta)
    rows = compare({k: v.detach().cpu() for k, v in ours.items()}, refs)
    ratios = [r.max_abs_err / r.tolerance for r in rows if r.max_abs_err is not None]
    return {"outputs": len(rows), "within_tolerance": sum(r.ok for r in rows),
            "worst_error_over_tolerance": max(ratios) if ratios else None,
            "failed": [r.name for r in rows if not r.ok], "pass": all(r.ok for r in rows)}


def _eps_and_image(model, size: int):
    """One conditioned UNet ε at t = 499 from a fixed x_t, and the decoded image of a fixed latent (float32, CPU)."""
    import torch

    from anytext2_lcm.evaluate.bench import PROMPT, _boxes
    from anytext2_lcm.generation import GenerationRequest, Generator
    from anytext2_lcm.pipeline import GuidedDenoiser, encode_branches

    gen = Generator(model)
    dev, dt = gen.device, gen.dtype
    req = GenerationRequest(prompt=PROMPT, positions=_boxes(size), height=size, width=size, seed=0, steps=1,
                            sampler="lcm", cfg_scale=1.0)
    prep = gen.prepare(req)
    f, c = model.cfg.latent_factor, model.cfg.unet.in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, size // f, size // f, generator=g)
    z = torch.randn(1, c, size // f, size // f, generator=g)
    with torch.no_grad():
        masked = model.scale_factor * model.vae.encode(prep.masked_img.to(dev, dt))[0]
        ti = prep.text_info.to(dev, dt).with_masked_x(masked)
        br = encode_branches(model, ti, [prep.img_prompt], [prep.text_prompt])
        t = torch.full((1,), 499, dtype=torch.long, device=dev)
        eps = GuidedDenoiser(model, br, 1.0)(x.to(dev, dt), t)
        img = model.decode(z.to(dev, dt))
    return eps.float().cpu(), img.float().cpu()


def check_drift(models: dict, size: int) -> dict:
    import torch

    eps32, img32 = _eps_and_image(models["fp32"], size)
    out = {}
    for name, m in models.items():
        if name == "fp32":
            continue
        eps, img = _eps_and_image(m, size)
        mse = float(((img.clamp(-1, 1) - img32.clamp(-1, 1)) / 2).pow(2).mean())
        out[name] = {"eps_rel_mse": float((eps - eps32).pow(2).mean() / eps32.pow(2).mean()),
                     "eps_max_abs": float((eps - eps32).abs().max()),
                     "image_psnr_db": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20)))),
                     "image_max_abs": float((img - img32).abs().max())}
    return out


def check_speed(model, spec: dict, device, dtype: str) -> dict:
    from anytext2_lcm.evaluate.bench import BenchConfig, run_bench
    from anytext2_lcm.evaluate.runtime import RuntimeOptions

    out = {}
    for compiled in ((False, True) if spec["compile"] else (False,)):
        _cuda_peak_reset(device)
        cfg = BenchConfig(model=spec["preset"], size=spec["size"], device=str(device), dtype=dtype,
                          teacher_steps=(20,), student_steps=(1, 2, 4), repeats=spec["repeats"], components=False,
                          runtime=RuntimeOptions(compile=compiled))
        runs = run_bench(cfg, model=model)["variants"][0]["runs"]
        t = runs["teacher@20"]["median"]
        out["compile" if compiled else "eager"] = {
            "s_per_image": {lab: r["median"] for lab, r in runs.items()},
            "speedup_vs_teacher": {lab: t / r["median"] for lab, r in runs.items() if lab.startswith("student")},
            "peak_cuda_gib": _cuda_peak_gib(device)}
    if not spec["compile"]:
        out["compile"] = "not run in the CPU smoke mode (TorchInductor's C++ build takes minutes on a CPU)"
    return out


def _distill_config(spec: dict, data: Path, out: Path, checkpointing: bool, device) -> dict:
    return {"method": "lcm", "output_dir": str(out),
            "model": {"teacher": None, "preset": spec["preset"], "init": "default"},
            "data": {"json_paths": [str(data)], "image_size": spec["size"], "max_lines": 2},
            "lora": {"rank": 64, "alpha": 64, "targets": "lcm"},
            "optim": {"learning_rate": 1e-4, "lr_scheduler": "constant"},
            "train": {"max_steps": spec["distill_steps"], "batch_size": spec["batch"], "mixed_precision": "bf16",
                      "gradient_checkpointing": checkpointing, "num_workers": min(spec["workers"], 4),
                      "device": device.type},
            "checkpoint": {"every_n_steps": 0, "keep_last": 1},
            "validation": {"every_n_steps": 0},
            "logging": {"tensorboard": False, "progress_bar": False}}


def check_distill(spec: dict, data: Path, work: Path, device) -> dict:
    import torch

    from anytext2_lcm.distill.config import load_config
    from anytext2_lcm.distill.trainer import train

    out = {}
    for checkpointing in (False, True):
        folder = work / f"distill_gc_{'on' if checkpointing else 'off'}"
        gc.collect()  # the first run's models must be gone, or the second run's peak counts them too
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _cuda_peak_reset(device)
        start = torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        t0 = time.perf_counter()
        result = train(load_config(None, base=_distill_config(spec, data, folder, checkpointing, device)))
        wall = time.perf_counter() - t0
        rates = [json.loads(ln)["steps_per_sec"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
        steady = rates[2:] or rates
        out["checkpointing_" + ("on" if checkpointing else "off")] = {
            "steps": result.state.optimizer_steps, "s_per_step": 1.0 / statistics.median(steady),
            "run_seconds": wall, "peak_cuda_gib": _cuda_peak_gib(device), "start_cuda_gib": start,
            "exit_code": result.exit_code}
        del result
    return out


def check_loader(spec: dict, data: Path) -> dict:
    from data_speed import _loader_rate

    from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig

    ds = AnyWordDataset(DataConfig(json_paths=(str(data),), image_size=spec["size"]))
    rate, cpu_ms = _loader_rate(ds, spec["batch"], spec["workers"], spec["loader_samples"])
    return {"workers": spec["workers"], "samples_per_s": rate, "cpu_ms_per_sample": cpu_ms, "size": spec["size"]}


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _section(doc: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        doc["sections"][name] = {"result": fn(), "seconds": time.perf_counter() - t0}
    except Exception as e:  # one failing section must not lose the others' figures
        doc["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                                 "seconds": time.perf_counter() - t0}
    print(f"[gpu_check] {name}: {'error' if 'error' in doc['sections'][name] else 'done'} in "
          f"{doc['sections'][name]['seconds']:.1f} s", flush=True)
    # the section's figures at once, so that a run stopped later still leaves them in its log
    print(json.dumps({name: {k: v for k, v in doc["sections"][name].items() if k != "traceback"}}, default=str),
          flush=True)


SECTIONS = ("parity", "drift", "speed", "distill", "loader")


def run_check(smoke: bool, work: Path, fixture: Path, sections: tuple[str, ...] = SECTIONS) -> dict:
    import torch

    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset
    from anytext2_lcm.evaluate.goal import converted_copy
    from anytext2_lcm.factory import build_model

    device = torch.device("cpu" if smoke else "cuda")
    spec = SMOKE if smoke else GPU
    doc = {"mode": "cpu smoke" if smoke else "gpu", "device": torch.cuda.get_device_name(0) if not smoke else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": spec, "sections": {}}
    t0 = time.perf_counter()
    if "parity" in sections:
        _section(doc, "parity", lambda: check_parity(device, fixture))
    if "drift" in sections or "speed" in sections:
        base = build_model(None, preset=spec["preset"], init="default").to(device).eval()
        models = {"fp32": base, **{d: converted_copy(base, {"fp16": torch.float16, "bf16": torch.bfloat16}[d])
                                   for d in spec["dtypes"]}}
        if "drift" in sections:
            _section(doc, "drift", lambda: check_drift(models, spec["size"]))
            if smoke:
                doc["sections"]["drift"]["note"] = "fp16 is not run on a CPU (no fast fp16 kernels there)"
        speed_dtype = "fp32" if smoke else "fp16"
        if "speed" in sections:
            _section(doc, "speed", lambda: check_speed(models.get(speed_dtype, base), spec, device, speed_dtype))
        models = base = None  # free the model copies before the distillation check
    if "distill" in sections or "loader" in sections:
        data = write_dataset(SynthConfig(num=spec["data_num"], size=spec["size"], seed=0), work / "data")[0]
        if "distill" in sections:
            _section(doc, "distill", lambda: check_distill(spec, Path(data), work, device))
        if "loader" in sections:
            _section(doc, "loader", lambda: check_loader(spec, Path(data)))
    doc["total_seconds"] = time.perf_counter() - t0
    return doc


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def to_markdown(doc: dict) -> str:
    s = doc["sections"]
    L = [f"# GPU check ({doc['mode']}: {doc['device']}, torch {doc['torch']}, {doc['total_seconds']:.0f} s)", ""]
    for name, sec in s.items():
        if "error" in sec:
            L += [f"## {name}: ERROR", "", "    " + sec["error"], ""]
            continue
        r = sec["result"]
        L += [f"## {name} ({sec['seconds']:.1f} s)", ""]
        if name == "parity":
            L.append(f"{r['within_tolerance']}/{r['outputs']} outputs within tolerance (worst error / tolerance "
                     f"{_fmt(r['worst_error_over_tolerance'])}){'' if r['pass'] else ': FAILED ' + str(r['failed'])}")
        elif name == "drift":
            L += ["| dtype | ε rel. MSE | ε max abs | image PSNR dB | image max abs |", "|---|---|---|---|---|"]
            L += [f"| {d} | {v['eps_rel_mse']:.2e} | {v['eps_max_abs']:.3g} | {v['image_psnr_db']:.1f} | "
                  f"{v['image_max_abs']:.3g} |" for d, v in r.items()]
        elif name == "speed":
            L += ["| mode | run | s/image | speed-up vs teacher | peak GiB |", "|---|---|---|---|---|"]
            for mode, v in r.items():
                if isinstance(v, str):
                    L.append(f"| {mode} | {v} | | | |")
                    continue
                L += [f"| {mode} | {lab} | {sec_:.3f} | {_fmt(v['speedup_vs_teacher'].get(lab), '.1f')} | "
                      f"{_fmt(v['peak_cuda_gib'], '.2f')} |" for lab, sec_ in v["s_per_image"].items()]
        elif name == "distill":
            L += ["| gradient checkpointing | steps | s/step | peak GiB | GiB held at the start |",
                  "|---|---|---|---|---|"]
            L += [f"| {k.split('_')[-1]} | {v['steps']} | {v['s_per_step']:.3f} | {_fmt(v['peak_cuda_gib'], '.2f')} | "
                  f"{_fmt(v.get('start_cuda_gib'), '.2f')} |" for k, v in r.items()]
        elif name == "loader":
            L.append(f"{r['samples_per_s']:.1f} samples/s with {r['workers']} workers at {r['size']} px "
                     f"({_fmt(r['cpu_ms_per_sample'], '.1f')} CPU ms/sample)")
        if sec.get("note"):
            L.append(f"\n{sec['note']}")
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (automatic without CUDA)")
    ap.add_argument("--fixture", default=str(REPO / "tests" / "fixtures" / "tiny"), help="parity fixture folder")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    args = ap.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown} (known: {', '.join(SECTIONS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from anytext2_lcm.atomic import write_json, write_text
    from anytext2_lcm.evaluate.report import _strict

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        print("[gpu_check] no CUDA device: running the CPU smoke sizes", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        doc = run_check(smoke, Path(work), Path(args.fixture), sections)
    md = to_markdown(doc)
    write_json(out / "gpu_check.json", _strict(doc))
    write_text(out / "gpu_check.md", md)
    print(md)
    return 0 if all("error" not in s for s in doc["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
