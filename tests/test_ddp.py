"""Data parallelism on the CPU: `accelerate launch --multi_gpu --num_processes 2` (gloo) trains the tiny
distillation to the same losses and weights as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import torch

from anytext2_lcm.distill.trainer import train

from distill_helpers import (REPO, base_config, checkpoint_dirs, cli_env, free_port, losses, make_config,
                             tiny_dataset, trainable, write_yaml)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

STEPS = 3


def launch_two(cfg_file, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of `distill --config cfg_file overrides`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "anytext2_lcm.cli",
           "distill", "--config", str(cfg_file), *overrides]
    env = cli_env(threads=1)
    env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr, proc.stderr[-2000:]
    return proc


def test_two_process_run_over_shards_matches_one_process(tmp_path):
    """WebDataset shards (`make-shards`, `data.shards`): the ranks read disjoint shards, and the 2-process run trains
    each step on the samples of the 1-process run with the same global batch (one stream per sample of a step)."""
    from anytext2_lcm.cli import main

    data = tiny_dataset(tmp_path / "data")
    shards = tmp_path / "shards"
    assert main(["make-shards", str(data), "--out", str(shards), "--samples-per-shard", "2"]) == 0
    src = ("data.json_paths=[]", f"data.shards={shards}", f"train.max_steps={STEPS}")
    single = train(make_config(data, tmp_path / "one", *src, "train.batch_size=2"))
    out = tmp_path / "two"
    launch_two(write_yaml(base_config(data, out), tmp_path / "c.yaml"), *src, "train.batch_size=1")
    one, two = losses(tmp_path / "one"), losses(out)
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
    assert abs(one[0][1] - two[0][1]) <= 1e-6  # step 1: the same samples and weights, up to the reduction order
    for (_, a), (_, b) in zip(one, two):  # later steps: Adam moves near-zero-gradient weights by ±lr either way
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)  # (other samples would differ by ~1e-1)
    ranks = [json.loads((checkpoint_dirs(out)[-1] / f"data_rank{r}.json").read_text())["loader"]["cursors"]
             for r in (0, 1)]
    assert set(ranks[0]) == {"0"} and set(ranks[1]) == {"1"}  # each rank its own stream (and shards)
    assert {**ranks[0], **ranks[1]} == json.loads((single.checkpoint / "data_rank0.json").read_text())["loader"][
        "cursors"]


def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    # One process, batch 2.
    single = train(make_config(data, tmp_path / "one", f"train.max_steps={STEPS}", "train.batch_size=2"))
    # Two processes, batch 1 each: rank r takes every second sample of the same epoch order, so each step sees the
    # same two samples, and every sample draws its noise from (seed, epoch, index), not from its rank.
    out = tmp_path / "two"
    launch_two(write_yaml(base_config(data, out), tmp_path / "c.yaml"), f"train.max_steps={STEPS}", "train.batch_size=1")
    one, two = losses(tmp_path / "one"), losses(out)
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)
    a = trainable(single.checkpoint)
    b = trainable(checkpoint_dirs(out)[-1])
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): an element whose gradient is ~0 moves by ±lr whichever way rounding tips it, so a few
    # elements may differ by up to lr·steps. The update as a whole must agree.
    keys = [k for k in a if "lora_B" in k]  # lora_B starts at 0: these tensors are the learned update
    ua = torch.cat([a[k].flatten() for k in keys])
    ub = torch.cat([b[k].flatten() for k in keys])
    assert float(ua.abs().max()) > 0  # the weights did move
    cos = float(torch.nn.functional.cosine_similarity(ua, ub, dim=0))
    assert cos > 0.9999, cos
    n_diff = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    n_all = sum(a[k].numel() for k in a)
    assert n_diff <= 0.02 * n_all, f"{n_diff} of {n_all} weights differ by more than 1e-5"
    print(f"losses 1 process {[round(l, 6) for _, l in one]}, 2 processes {[round(l, 6) for _, l in two]}; "
          f"update cosine {cos:.7f}; {n_diff}/{n_all} weights differ by > 1e-5")
    # Both ranks wrote their random and data states into the same checkpoint.
    names = {p.name for p in checkpoint_dirs(out)[-1].iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt", "data_rank0.json", "data_rank1.json"} <= names
