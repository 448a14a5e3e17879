"""Exact resume: N steps ≡ k steps, stop, resume, N − k steps (bit-identical losses and weights on CPU fp32),
including a stop inside a gradient-accumulation window, and `kill -9` at random steps of a real CLI run."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from anytext2_lcm.distill.checkpoints import CheckpointManager
from anytext2_lcm.distill.trainer import train

from distill_helpers import (assert_same_tensors, base_config, checkpoint_dirs, cli_env, losses, make_config,
                             metrics, start_cli, tiny_dataset, trainable, wait_for, write_yaml)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

N_REF, ACCUM = 8, 2
REF_RUN = (f"train.max_steps={N_REF}", f"train.gradient_accumulation_steps={ACCUM}", "checkpoint.every_n_steps=1",
           "checkpoint.keep_last=10")
N_STEPS = 3
RUN = (f"train.max_steps={N_STEPS}", f"train.gradient_accumulation_steps={ACCUM}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run of 8 steps (16 micro-steps) with a checkpoint after every step. With the constant
    learning rate its first 3 steps are also the uninterrupted 3-step run (max_steps changes nothing else)."""
    out = tmp_path_factory.mktemp("ref")
    result = train(make_config(data, out, *REF_RUN))
    assert result.exit_code == 0 and result.state.global_step == N_REF
    return out, result


@pytest.mark.parametrize("k", [3, 4], ids=["inside-window", "at-boundary"])
def test_stop_and_resume_is_bit_exact(k, data, reference, tmp_path):
    import torch

    from anytext2_lcm.distill.checkpoints import CheckpointReader

    ref_out, ref = reference
    ref_ckpt = ref_out / "checkpoints" / f"checkpoint-{N_STEPS:06d}"
    first = train(make_config(data, tmp_path, *RUN), stop_at_micro_step=k)
    assert first.exit_code == 143
    step, micro = divmod(k, ACCUM)
    assert first.checkpoint.name == f"checkpoint-{step:06d}" + (f"-m{micro}" if micro else "")
    if micro:  # inside a window the partial gradients travel with the checkpoint
        assert (first.checkpoint / "grads_rank0.safetensors").is_file()
    second = train(make_config(data, tmp_path, *RUN, "checkpoint.resume=latest"))
    assert second.exit_code == 0 and second.state.global_step == N_STEPS
    assert second.state.micro_step == N_STEPS * ACCUM
    assert losses(tmp_path) == losses(ref_out)[:N_STEPS]  # float equality: bit-identical
    assert_same_tensors(trainable(second.checkpoint), trainable(ref_ckpt))
    a = CheckpointReader(second.checkpoint).obj("optimizer.pt")["state"]
    b = CheckpointReader(ref_ckpt).obj("optimizer.pt")["state"]
    assert a.keys() == b.keys()
    for i in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[i][name], b[i][name])


def test_resume_refuses_other_structure_or_teacher(data, tmp_path):
    from anytext2_lcm.checkpoint import CheckpointError, save_converted
    from anytext2_lcm.config import ConfigError
    from anytext2_lcm.distill.components import build_teacher
    from anytext2_lcm.distill.config import ModelSection

    teacher = tmp_path / "teacher"
    save_converted(build_teacher(ModelSection(preset="tiny", init_seed=0)), teacher)
    out = tmp_path / "run"
    run = (*RUN, f"model.teacher={teacher}")
    assert train(make_config(data, out, *run), stop_at_micro_step=2).exit_code == 143
    with pytest.raises(CheckpointError, match="lora.rank"):
        train(make_config(data, out, *run, "lora.rank=8", "checkpoint.resume=latest"))
    save_converted(build_teacher(ModelSection(preset="tiny", init_seed=1)), teacher)  # other weights, same path
    with pytest.raises(CheckpointError, match="another teacher"):
        train(make_config(data, out, *run, "checkpoint.resume=latest"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(make_config(data, out, *run))


def test_kill9_at_random_steps_then_resume(data, reference, tmp_path):
    """Five trials in a chain: each run is killed with SIGKILL at a random step and the next resumes from the last
    complete checkpoint; the stitched loss sequence and the final weights equal an uninterrupted run exactly."""
    ref_out, ref = reference
    run = (f"train.max_steps={N_REF}", f"train.gradient_accumulation_steps={ACCUM}", "checkpoint.every_n_steps=1",
           "checkpoint.keep_last=2")
    seed = random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, N_REF), 5))
    out = tmp_path / "killed"
    cfg_file = write_yaml(base_config(data, out), tmp_path / "run.yaml")
    args = ["distill", "--config", str(cfg_file), "--resume", "latest", *run]
    env = cli_env()
    for trial, target in enumerate(targets):
        before = CheckpointManager(out / "checkpoints").latest()
        log = tmp_path / f"trial{trial}.log"
        proc = start_cli(*args, log=log, env=env)
        wait_for(lambda: any(m["step"] >= target for m in metrics(out)), 120, proc, f"step {target}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        if before is not None:  # it continued from the last complete checkpoint of the previous trial
            assert f"resumed from {before}" in log.read_text(), f"trial {trial} (seed {seed})"
    log = tmp_path / "final.log"
    before = CheckpointManager(out / "checkpoints").latest()
    proc = start_cli(*args, log=log, env=env)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    assert f"resumed from {before}" in log.read_text()
    assert losses(out) == losses(ref_out), f"kill steps {targets} (seed {seed})"
    print(f"kill -9 at steps {targets} (seed {seed}): {len(losses(out))} losses and the final weights are identical")
    final = checkpoint_dirs(out)[-1]
    assert final.name == f"checkpoint-{N_REF:06d}"
    assert_same_tensors(trainable(final), trainable(ref.checkpoint))
    assert len(CheckpointManager(out / "checkpoints").complete()) == 2
