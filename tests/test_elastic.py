"""Elastic runs: the global batch rule, data positions that carry over to another number of processes without
repeating or dropping a sample (index order and shard streams), a killed 2-process run over shards resumed on 1
process, and --init-adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anytext2_lcm.checkpoint import CheckpointError
from anytext2_lcm.data.anyword import DataConfig
from anytext2_lcm.data.collate import EpochSampler
from anytext2_lcm.data.shards import ShardSet, ShardStreams, write_shards
from anytext2_lcm.distill.elastic import resume_accumulation

from distill_helpers import (REPO, base_config, checkpoint_dirs, cli_env, free_port, kill_tree, losses, make_config,
                             tiny_dataset, trainable, wait_for, write_yaml)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


def structure(b, a, w):
    return {"train.batch_size": b, "train.gradient_accumulation_steps": a, "world_size": w}


# ---------------------------------------------------------------------------------------------------------------
# The global batch rule
# ---------------------------------------------------------------------------------------------------------------


def test_global_batch_is_kept_or_the_error_says_what_to_set():
    s = structure(2, 2, 2)  # global batch 8
    assert resume_accumulation("ck", s, 2, 2, 2, 0) == 2  # unchanged
    assert resume_accumulation("ck", s, 2, 2, 4, 0) == 1  # 4 processes: 2 x 1 x 4
    assert resume_accumulation("ck", s, 2, 2, 1, 0) == 4  # 1 process: 2 x 4 x 1
    assert resume_accumulation("ck", s, 1, 4, 2, 0) == 4  # the user chose another split of the same 8
    with pytest.raises(CheckpointError, match=r"not divisible by 3; use a number of processes that divides 8 "
                                              r"\(1, 2, 4, 8"):
        resume_accumulation("ck", s, 2, 2, 3, 0)
    with pytest.raises(CheckpointError, match=r"set train.batch_size=2 train.gradient_accumulation_steps=2 "
                                              r"\(2 x 2 x 2 = 8\)"):
        resume_accumulation("ck", structure(4, 2, 1), 3, 1, 2, 0)  # batch 3 on 2 processes cannot make 8
    with pytest.raises(CheckpointError, match="global batch is 2 x 2 x 2 = 8"):
        resume_accumulation("ck", s, 4, 2, 2, 0)  # same processes, another global batch
    with pytest.raises(CheckpointError, match="inside an accumulation window"):
        resume_accumulation("ck", s, 2, 2, 4, 1)


# ---------------------------------------------------------------------------------------------------------------
# Data positions
# ---------------------------------------------------------------------------------------------------------------


def dealt(n, world, batch, steps, offset=0, epoch=0):
    """The positions a step of each rank takes: {step: sorted sample indices of the global batch}."""
    ranks = [EpochSampler(n, 7, True, r, world, epoch, 0, offset).order() for r in range(world)]
    return [sorted(i for r in ranks for i in r[t * batch:(t + 1) * batch]) for t in range(steps)]


@pytest.mark.parametrize("w0,b0,w1,b1", [(2, 2, 4, 1), (4, 1, 1, 4), (3, 2, 2, 3), (2, 3, 3, 2)])
def test_index_order_moves_to_another_number_of_processes_without_repeat_or_drop(w0, b0, w1, b1):
    n, k = 61, 3  # 3 steps of global batch 6 on the old processes, then the rest of the epoch on the new ones
    before = dealt(n, w0, b0, k)
    consumed = k * b0  # each old rank took k x b0 positions
    after = dealt(n, w1, b1, (n - k * b0 * w0) // (b1 * w1), offset=w0 * consumed)
    seen = [i for step in before + after for i in step]
    assert len(seen) == len(set(seen))  # nothing twice
    perm = np.random.default_rng(np.random.SeedSequence([7, 0])).permutation(n)
    assert sorted(seen) == sorted(perm[:len(seen)].tolist())  # and in the epoch's order: nothing dropped
    assert before + after == dealt(n, w0, b0, len(before + after))  # the very steps of the uninterrupted run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards([str(data)], out, samples_per_shard=1)
    return out


def stream_steps(shards, world, batch, accum, steps, cursors=None):
    """The sample ids of each optimizer step, all ranks together, and the cursors after them."""
    cfg = DataConfig(shards=str(shards), seed=3, shuffle_buffer=2)
    g = batch * accum * world
    subs = [ShardStreams(ShardSet(shards), cfg, g, r, world, batch, accum) for r in range(world)]
    for s in subs:
        if cursors:
            s.cursors = {j: cursors[j] for j in s.mine}
    its = [iter(s) for s in subs]
    out = []
    for _ in range(steps):
        step = []
        for it in its:
            for _ in range(batch * accum):
                epoch, sid, _raw = next(it)
                step.append((epoch, sid))
        out.append(sorted(step))
    return out, {j: c for s in subs for j, c in s.pending}  # the last cursor of each stream


def test_shard_streams_give_each_step_the_same_samples_on_any_number_of_processes(shards):
    one, _ = stream_steps(shards, 1, 2, 1, 12)
    two, _ = stream_steps(shards, 2, 1, 1, 12)
    acc, _ = stream_steps(shards, 1, 1, 2, 12)
    assert one == two == acc
    firsts = [x for step in one[:4] for x in step]  # 8 samples in 8 shards: epoch 0 is every sample once
    assert sorted(sid for _, sid in firsts) == list(range(8)) and {e for e, _ in firsts} == {0}
    assert {e for step in one[4:8] for e, _ in step} == {1}


def test_shard_streams_continue_on_another_number_of_processes(shards):
    ref, _ = stream_steps(shards, 1, 2, 1, 7)
    head, cursors = stream_steps(shards, 2, 1, 1, 3)
    tail, _ = stream_steps(shards, 1, 1, 2, 4, cursors)
    assert head + tail == ref


# ---------------------------------------------------------------------------------------------------------------
# A killed 2-process run over shards, resumed on 1 process
# ---------------------------------------------------------------------------------------------------------------

STEPS = 4


def stream_cursors(out: Path) -> dict[int, dict]:
    """{step: {stream: cursor}} of every step-boundary checkpoint, all ranks merged."""
    res = {}
    for c in checkpoint_dirs(out):
        if "-m" in c.name or not (c / "COMPLETE").is_file():
            continue
        merged = {}
        for f in c.glob("data_rank*.json"):
            merged.update(json.loads(f.read_text())["loader"]["cursors"])
        res[int(c.name.split("-")[1])] = merged
    return res


def test_killed_two_process_run_over_shards_resumes_on_one_process_without_repeats(data, shards, tmp_path):
    run = (f"train.max_steps={STEPS}", "data.json_paths=[]", f"data.shards={shards}", "checkpoint.every_n_steps=1",
           "checkpoint.keep_last=10")
    from anytext2_lcm.distill.trainer import train

    ref_out = tmp_path / "ref"
    ref = train(make_config(data, ref_out, *run, "train.batch_size=2"))  # 1 process, global batch 2
    assert ref.exit_code == 0
    out = tmp_path / "moved"
    cfg = base_config(data, out)
    cfg["data"] = {**cfg["data"], "json_paths": [], "shards": str(shards)}
    cfg["debug"] = {"sleep_per_step": 1.0}
    cfg_file = write_yaml(cfg, tmp_path / "c.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "anytext2_lcm.cli", "distill", "--config", str(cfg_file),
           *run[2:], f"train.max_steps={STEPS}", "train.batch_size=1"]
    env = cli_env(threads=1)
    env["ACCELERATE_USE_CPU"] = "1"
    log = open(tmp_path / "two.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "checkpoint-000002" / "COMPLETE").is_file(), 300, proc,
                 "the checkpoint of step 2")
    finally:
        kill_tree(proc)  # the launcher and both ranks (each in its own session), at once
    text = (tmp_path / "two.log").read_text()
    assert "2 process(es)" in text, text[-2000:]
    # Resume on 1 process: accumulation 2 keeps the global batch 2.
    moved = train(make_config(data, out, *run, "train.batch_size=1", "checkpoint.resume=latest"))
    assert moved.exit_code == 0 and moved.state.global_step == STEPS
    a, b = dict(losses(ref_out)), dict(losses(out))
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # steps 1-2 by 2 processes, 3-4 by 1 process: all equal the 1-process run
        assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (step, a, b)  # as in test_ddp
    # The data position after every step equals the uninterrupted run's: one new sample per stream and step.
    # Once, in a fresh-clone run, step 3 read back without cursors, and once the resumed run's checkpoint 3 could not
    # be written: both fit ranks that outlived the launcher's kill (torch starts each in its own session; kill_tree
    # now kills them too). Every step that records cursors must match, and the final one always must.
    ca, cb = stream_cursors(ref_out), stream_cursors(out)
    recorded = [s for s in range(1, STEPS + 1) if cb.get(s)]
    assert STEPS in recorded and all(ca[s] == cb[s] for s in recorded), (ca, cb)
    assert [sorted(v for _, _, v in ca[s].values()) for s in (1, 2)] == [[1, 1], [1, 1]]
    print(f"losses 1 process {[round(a[s], 6) for s in a]}, 2 then 1 process(es) {[round(b[s], 6) for s in b]}")


# ---------------------------------------------------------------------------------------------------------------
# --init-adapter
# ---------------------------------------------------------------------------------------------------------------


def test_init_adapter_starts_a_new_run_from_an_adapter(data, tmp_path):
    from anytext2_lcm.cli import main
    from anytext2_lcm.distill.trainer import train

    first = train(make_config(data, tmp_path / "a", "train.max_steps=2"))
    adapter = tmp_path / "a" / "adapter"
    assert first.exit_code == 0 and adapter.is_dir()
    second = train(make_config(data, tmp_path / "b", "train.max_steps=1", f"checkpoint.init_adapter={adapter}",
                               "optim.learning_rate=1e-12"))
    a, b = trainable(first.checkpoint), trainable(second.checkpoint)
    keys = [k for k in a if "lora_B" in k]
    assert float(sum(a[k].abs().sum() for k in keys)) > 0
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-9) for k in keys)  # started from it (lr ~ 0)
    cfg = write_yaml(base_config(data, tmp_path / "c"), tmp_path / "c.yaml")
    assert main(["distill", "--config", str(cfg), "--init-adapter", str(adapter), "lora.rank=8", "--dry-run"]) == 0
    with pytest.raises(CheckpointError, match="shape"):
        train(make_config(data, tmp_path / "d", "train.max_steps=1", f"checkpoint.init_adapter={adapter}",
                          "lora.rank=8"))
