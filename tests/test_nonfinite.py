"""Non-finite values: a NaN step is skipped (no optimizer or scheduler step, weights unchanged, counted), too many in a
row stop the run with a clear message, and no checkpoint ever holds NaN/Inf."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from anytext2_lcm.distill.checkpoints import CheckpointManager, CheckpointReader
from anytext2_lcm.distill.trainer import NonFiniteTrainingError, Trainer, train

from distill_helpers import (assert_same_tensors, base_config, make_config, metrics, tiny_dataset, trainable,
                             write_yaml)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

RUN = ("train.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=5", "optim.lr_scheduler=linear")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"checkpoint-{step:06d}"


def _assert_all_finite(out: Path) -> None:
    for info in CheckpointManager(out / "checkpoints").complete():
        r = CheckpointReader(info.path)
        for k, v in r.tensors("trainable.safetensors").items():
            assert torch.isfinite(v).all(), f"{info.name}: {k}"
        for group in r.obj("optimizer.pt")["state"].values():
            for v in group.values():
                assert torch.isfinite(v).all(), info.name


def test_nan_loss_step_is_skipped(data, tmp_path):
    r = train(make_config(data, tmp_path, *RUN, "debug.nonfinite_loss_at_steps=[2]"))
    assert r.exit_code == 0
    s = r.state
    assert (s.global_step, s.optimizer_steps, s.nonfinite_steps, s.consecutive_nonfinite) == (3, 2, 1, 0)
    # Weights and optimizer state after the skipped step 2 equal those after step 1; step 3 moves on.
    assert_same_tensors(trainable(_ckpt(tmp_path, 1)), trainable(_ckpt(tmp_path, 2)))
    assert any(not torch.equal(a, b) for a, b in zip(trainable(_ckpt(tmp_path, 2)).values(),
                                                      trainable(_ckpt(tmp_path, 3)).values()))
    o1 = CheckpointReader(_ckpt(tmp_path, 1)).obj("optimizer.pt")["state"]
    o2 = CheckpointReader(_ckpt(tmp_path, 2)).obj("optimizer.pt")["state"]
    assert all(torch.equal(o1[i]["step"], o2[i]["step"]) for i in o1)
    m = {x["step"]: x for x in metrics(tmp_path)}
    assert math.isnan(m[2]["loss"]) and math.isfinite(m[1]["loss"]) and math.isfinite(m[3]["loss"])
    assert [m[i]["nonfinite_steps"] for i in (1, 2, 3)] == [0, 1, 1]
    # No scheduler step on the skipped step: step 3 runs at step 2's learning rate (linear decay otherwise).
    assert m[1]["lr"] > m[2]["lr"] == m[3]["lr"]
    _assert_all_finite(tmp_path)


def test_nonfinite_gradient_with_finite_loss_is_skipped(data, tmp_path):
    """Only the gradient of one LoRA weight goes to Inf (the loss stays finite): still skipped and counted."""
    trainer = Trainer(make_config(data, tmp_path, *RUN))
    trainer.setup()
    victim = trainer.params[0]
    original = trainer._micro_step

    def micro_step(batch, ga):
        handle = None
        if trainer.state.global_step == 1:  # the micro-step of step 2
            handle = victim.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            original(batch, ga)
        finally:
            if handle is not None:
                handle.remove()

    trainer._micro_step = micro_step
    r = trainer.run()
    assert (r.state.optimizer_steps, r.state.nonfinite_steps) == (2, 1)
    assert_same_tensors(trainable(_ckpt(tmp_path, 1)), trainable(_ckpt(tmp_path, 2)))
    m = {x["step"]: x for x in metrics(tmp_path)}
    assert math.isfinite(m[2]["loss"]) and math.isinf(m[2]["grad_norm"])
    _assert_all_finite(tmp_path)


def test_too_many_in_a_row_stop_the_run(data, tmp_path, capsys):
    with pytest.raises(NonFiniteTrainingError, match="train.max_consecutive_nonfinite=2"):
        train(make_config(data, tmp_path / "a", *RUN, "train.max_steps=5", "debug.nonfinite_loss_at_steps=[1,2,3]",
                          "train.max_consecutive_nonfinite=2"))
    _assert_all_finite(tmp_path / "a")
    # The command line reports it in one line and exits 1.
    from anytext2_lcm.cli import main

    f = write_yaml(base_config(data, tmp_path / "b"), tmp_path / "c.yaml")
    code = main(["distill", "--config", str(f), *RUN, "debug.nonfinite_loss_at_steps=[1,2,3]",
                 "train.max_consecutive_nonfinite=2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in err
