"""Where does a guided PCM student err: at the states it is trained on, or only along its samples?

For a guided PCM student (``pcm.guided_student``) trained in a folder (its ``config.yaml`` and ``adapter/``), take
batches of a dataset, forward-noise them to every point of the student's solver grid (the states training sees),
and compare two jumps to the phase edge with the teacher's exact path there (its guided DDIM steps, grid point by
grid point, down to the edge): the student's jump and the undistilled control's (the same jump with the adapter
off). Prints the mean squared error of both per grid point and their ratio; a ratio below 1 means the student is
closer to the teacher's path than the control at those states. The quality benchmark measures the same thing along
the samples (latent error to the teacher's 20-step output), so the two together tell whether a student is limited
by what it learnt or by where it was trained.

    python benchmarks/phase_error.py STAGE_FOLDER --data FILE.json [--batches 1] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", help="a guided PCM student's training folder (config.yaml, adapter/)")
    p.add_argument("--data", required=True, help="AnyWord annotation file with images (e.g. a validation set)")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from anytext2_lcm.defaults import Sampling
    from anytext2_lcm.distill.batch import prepare_batch
    from anytext2_lcm.distill.config import load_config
    from anytext2_lcm.distill.data import build_loader
    from anytext2_lcm.distill.lcm import DenoiserNet, guided_teacher, has_writenet_lora, student_guided_eps
    from anytext2_lcm.distill.pcm import pcm_conditions
    from anytext2_lcm.distill.solver import DDIMSolver, pcm_lower_edge, pcm_phase_edges, predicted_original_sample
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.lora import adapter_info, disable_adapters, load_lora
    from anytext2_lcm.samplers.schedule import NoiseSchedule

    torch.set_num_threads(args.threads)
    stage = Path(args.stage)
    cfg = load_config(stage / "config.yaml", [f"data.json_paths=[{args.data}]", f"train.batch_size={args.batch_size}",
                                              "train.num_workers=0", f"output_dir={stage / 'phase_error'}"])
    if cfg.method != "pcm" or not cfg.pcm.guided_student:
        raise SystemExit(f"{stage}: not a guided PCM student (method pcm, pcm.guided_student true)")
    d, pc = cfg.distill, cfg.pcm
    model = build_model(cfg.model.teacher).eval()
    load_lora(model, stage / "adapter")
    w_val = Sampling.from_dict(adapter_info(stage / "adapter")["sampling"]).cfg - 1.0  # the LCM form of its CFG
    schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
    solver = DDIMSolver(schedule, d.num_ddim_timesteps, d.timestep_spacing)
    edges = pcm_phase_edges(pc.num_phases, d.num_ddim_timesteps, pc.convention)
    net = DenoiserNet(model)
    knobs = (d.control_strength, d.attnx_scale)
    loader = build_loader(cfg)
    loader.set_epoch(0)
    n_grid = d.num_ddim_timesteps
    sums = torch.zeros(n_grid, 2, dtype=torch.float64)
    with torch.no_grad():
        for b, batch in enumerate(loader):
            if b >= args.batches:
                break
            tb = prepare_batch(model, batch, cfg.train.seed + b, 0, "cpu")
            B = tb.latents.shape[0]
            cond = pcm_conditions(model, tb, d.a_prompt, d.n_prompt, [False] * B, False, "", has_writenet_lora(model))
            noise = torch.randn(tb.latents.shape, generator=torch.Generator().manual_seed(b))
            w = torch.full((B,), w_val)
            for i in range(n_grid):
                index = torch.full((B,), i, dtype=torch.long)
                e = int(pcm_lower_edge(index, edges)[0])
                t = solver.ddim_timesteps[index]
                x_t = schedule.add_noise(tb.latents, noise, t)
                path = x_t
                for j in range(i, e - 1, -1):  # the teacher's guided DDIM steps down to the edge
                    idx = torch.full((B,), j, dtype=torch.long)
                    x0, eps = guided_teacher(model, cond, path, solver.ddim_timesteps[idx], w, schedule, *knobs)
                    path = solver.ddim_step(x0, eps, idx)
                for k, adapter_on in enumerate((True, False)):
                    if adapter_on:
                        eps = student_guided_eps(net, cond, tb, x_t, t, w, *knobs)
                    else:
                        with disable_adapters(model):
                            eps = student_guided_eps(net, cond, tb, x_t, t, w, *knobs)
                    jump, _ = solver.phase_jump(predicted_original_sample(eps, x_t, t, schedule), eps, index, edges)
                    sums[i, k] += float(((jump - path) ** 2).mean())
    sums /= max(1, min(args.batches, b + 1))
    print(f"{stage.name}: jump to the phase edge from forward-noised data, MSE to the teacher's path "
          f"({pc.num_phases} phases, {d.timestep_spacing} grid of {n_grid}, CFG {w_val + 1:g})")
    print("| grid point | t | edge | student | control | student ÷ control |")
    print("|---:|---:|---:|---:|---:|---:|")
    tops = []
    for i in range(n_grid):
        e = int(pcm_lower_edge(torch.tensor([i]), edges)[0])
        s, c = float(sums[i, 0]), float(sums[i, 1])
        on_edge = i == e  # one teacher step reaches the edge: the control's jump is that step itself
        ratio = "" if on_edge or c == 0 else f"{s / c:.2f}"
        print(f"| {i} | {int(solver.ddim_timesteps[i])} | {int(solver.ddim_timesteps_prev[e])} | {s:.6f} | {c:.6f} "
              f"| {ratio} |")
        if not on_edge:
            tops.append((s, c))
    s_mean = sum(s for s, _ in tops) / len(tops) if tops else float("nan")
    c_mean = sum(c for _, c in tops) / len(tops) if tops else float("nan")
    print(f"mean over the points more than one step above their edge: student {s_mean:.6f}, control {c_mean:.6f}, "
          f"ratio {s_mean / c_mean:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
