"""Preemption: SIGTERM finishes the micro-step, saves, exits 143, and the resumed run continues at the next step;
on 2 CPU ranks a signal to one rank stops both at the same step; a second signal exits at once and leaves the last
complete checkpoint intact."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from anytext2_lcm.distill.checkpoints import CheckpointManager, CheckpointReader

from distill_helpers import (base_config, checkpoint_dirs, free_port, metrics, start_cli, start_rank, tiny_dataset,
                             wait_for, write_yaml)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def _args(cfg_file: Path, *extra: str) -> list[str]:
    return ["distill", "--config", str(cfg_file), "--resume", "latest", *extra]


def _stop_steps(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"stopping at step (\d+)", log.read_text())]


def test_sigterm_saves_exits_143_and_resume_continues(data, tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(base_config(data, out), tmp_path / "c.yaml")
    log = tmp_path / "first.log"
    proc = start_cli(*_args(cfg, "train.max_steps=50", "debug.sleep_per_step=0.3"), log=log)
    wait_for(lambda: len(metrics(out)) >= 2, 120, proc, "two steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, log.read_text()[-2000:]
    (stop,) = _stop_steps(log)
    assert [c.name for c in checkpoint_dirs(out)] == [f"checkpoint-{stop:06d}"]
    CheckpointManager(out / "checkpoints").verify(out / "checkpoints" / f"checkpoint-{stop:06d}")
    assert metrics(out)[-1]["step"] == stop
    # Resume: the first step it trains is stop + 1.
    log2 = tmp_path / "second.log"
    proc = start_cli(*_args(cfg, f"train.max_steps={stop + 2}"), log=log2)
    assert proc.wait(120) == 0, log2.read_text()[-2000:]
    assert f"at step {stop} " in log2.read_text()
    assert [m["step"] for m in metrics(out)] == list(range(1, stop + 3))


def test_second_signal_exits_at_once_without_damage(data, tmp_path):
    """A micro-step here ends in a 3 s pause (debug.sleep_per_step): the first SIGTERM lands in it, so the graceful
    path would still finish that step (log it, checkpoint it); the second one, 0.2 s later, must end the process at
    once instead, and every checkpoint on disk must still be complete and loadable."""
    out = tmp_path / "run"
    cfg = write_yaml(base_config(data, out), tmp_path / "c.yaml")
    log = tmp_path / "run.log"
    proc = start_cli(*_args(cfg, "train.max_steps=50", "checkpoint.every_n_steps=1", "debug.sleep_per_step=3"),
                     log=log)
    wait_for(lambda: len(metrics(out)) >= 1, 120, proc, "the first step")
    time.sleep(1.0)  # step 1 is saved; step 2 has computed and is pausing
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.5, f"took {elapsed:.2f}s after the second signal"
    assert [m["step"] for m in metrics(out)] == [1]  # step 2 was not finished: the exit was immediate
    assert "stopping at step" not in log.read_text()
    mgr = CheckpointManager(out / "checkpoints")
    done = mgr.complete()
    assert [i.step for i in done] == [1]
    mgr.verify(done[0].path)
    assert mgr.latest() == done[0].path
    # And the run resumes from it.
    proc = start_cli(*_args(cfg, "train.max_steps=2", "debug.sleep_per_step=0"), log=tmp_path / "resume.log")
    assert proc.wait(120) == 0
    assert f"resumed from {done[0].path}" in (tmp_path / "resume.log").read_text()
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_sigterm_on_one_of_two_ranks_stops_both_at_the_same_step(data, tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(base_config(data, out), tmp_path / "c.yaml")
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    args = _args(cfg, "train.max_steps=50", "debug.sleep_per_step=0.3")
    procs = [start_rank(r, 2, port, args, logs[r]) for r in range(2)]
    try:
        wait_for(lambda: len(metrics(out)) >= 2, 180, procs[0], "two steps")
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [143, 143], [lg.read_text()[-1500:] for lg in logs]
    stops = [_stop_steps(lg) for lg in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stop = stops[0][0]
    (ck,) = checkpoint_dirs(out)
    assert ck.name == f"checkpoint-{stop:06d}"
    r = CheckpointReader(ck)
    loaders = [r.json(f"data_rank{i}.json")["loader"] for i in range(2)]
    assert loaders[0]["epoch"] == loaders[1]["epoch"] and loaders[0]["position"] == loaders[1]["position"] >= 1
    assert r.has("rng_rank0.pt") and r.has("rng_rank1.pt")
    # Both ranks resume and continue at stop + 1.
    port = free_port()
    logs2 = [tmp_path / f"resume{r}.log" for r in range(2)]
    procs = [start_rank(r, 2, port, _args(cfg, f"train.max_steps={stop + 2}"), logs2[r]) for r in range(2)]
    try:
        codes = [p.wait(180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [lg.read_text()[-1500:] for lg in logs2]
    assert [m["step"] for m in metrics(out)] == list(range(1, stop + 3))


def test_sigint_in_process_stops_with_130_and_restores_handlers(data, tmp_path):
    """SIGINT (Ctrl-C) takes the same path: finish the micro-step, save, return 128 + 2; the previous handlers are
    back afterwards."""
    import os

    from anytext2_lcm.distill.trainer import Trainer

    from distill_helpers import make_config

    before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(make_config(data, tmp_path, "train.max_steps=10", "train.gradient_accumulation_steps=2"))
    trainer.setup()
    original = trainer._micro_step

    def micro_step(batch, ga):
        original(batch, ga)
        if trainer.state.micro_step == 3:  # inside the second accumulation window
            os.kill(os.getpid(), signal.SIGINT)

    trainer._micro_step = micro_step
    result = trainer.run()
    assert result.exit_code == 130
    assert result.checkpoint.name == "checkpoint-000001-m1"
    assert (result.checkpoint / "grads_rank0.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before
