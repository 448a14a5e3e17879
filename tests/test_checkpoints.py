"""Training checkpoints: a failure at each phase of a write, rotation, corrupt files, non-finite values, and a
malicious pickle that must be refused without running."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from anytext2_lcm.checkpoint import CheckpointError
from anytext2_lcm.distill.checkpoints import (MARKER, PHASES, CheckpointManager, CheckpointReader,
                                              NonFiniteCheckpointError, checkpoint_name, parse_name)

from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


class Crash(Exception):
    """A simulated crash inside a save."""


def payload(step: int) -> tuple[dict, dict]:
    shared = {"trainable.safetensors": {"w": torch.full((4, 3), float(step))},
              "optimizer.pt": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3)}},
                               "param_groups": [{"lr": 1e-3, "params": [0]}]},
              "train_state.json": {"step": step}}
    local = {"rng_rank0.pt": {"torch": torch.random.get_rng_state()}, "data_rank0.json": {"position": step}}
    return shared, local


def save(mgr: CheckpointManager, step: int, micro: int = 0) -> Path:
    shared, local = payload(step)
    return mgr.save(step, micro, shared, local)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if parse_name(p.name) is None)


def test_names_sort_by_position():
    assert checkpoint_name(100) == "checkpoint-000100"
    assert checkpoint_name(100, 1) == "checkpoint-000100-m1"
    assert parse_name("checkpoint-000100-m1") == (100, 1)
    assert parse_name("checkpoint-000100.tmp") is None


def test_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = save(mgr, 7)
    marker = mgr.verify(path)
    assert marker["step"] == 7 and set(marker["files"]) == {"trainable.safetensors", "optimizer.pt",
                                                            "train_state.json", "rng_rank0.pt", "data_rank0.json"}
    r = CheckpointReader(path)
    assert torch.equal(r.tensors("trainable.safetensors")["w"], torch.full((4, 3), 7.0))
    assert r.obj("optimizer.pt")["state"][0]["step"].item() == 7.0
    assert r.json("data_rank0.json") == {"position": 7}
    assert mgr.latest() == path


@pytest.mark.parametrize("phase", PHASES)
def test_failure_at_each_phase_keeps_the_previous_checkpoint(tmp_path, phase):
    good = save(CheckpointManager(tmp_path, keep_last=3), 10)

    def fault(p):
        if p == phase:
            raise Crash(p)

    with pytest.raises(Crash):
        save(CheckpointManager(tmp_path, keep_last=3, fault=fault), 20)
    mgr = CheckpointManager(tmp_path, keep_last=3)
    latest = mgr.latest()
    if PHASES.index(phase) < PHASES.index("renamed"):
        # Not committed: `resume latest` takes the previous complete checkpoint, and it is intact.
        assert latest == good
        assert [i.step for i in mgr.complete()] == [10]
    else:
        # The rename is the commit point: after it the new checkpoint is complete and is the latest.
        assert latest is not None and latest.name == "checkpoint-000020"
    mgr.verify(good)
    assert CheckpointReader(latest).json("train_state.json")["step"] == (10 if latest == good else 20)
    # The next successful save removes whatever the crash left behind.
    save(mgr, 30)
    assert leftovers(tmp_path) == []


def test_hard_crash_leftovers_and_corrupt_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    save(mgr, 1)
    second = save(mgr, 2)
    # A process killed mid-write leaves a .tmp folder with partial files (no marker).
    tmp = tmp_path / "checkpoint-000003.tmp"
    tmp.mkdir()
    (tmp / "trainable.safetensors").write_bytes(b"\x00" * 10)
    assert mgr.latest() == second
    # A complete checkpoint whose file was damaged afterwards fails verification: fall back to the previous one.
    f = second / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        mgr.verify(second)
    assert mgr.latest().name == "checkpoint-000001"
    # A truncated file is caught by its size even without hashing.
    f.write_bytes(bytes(data[:-5]))
    with pytest.raises(CheckpointError, match="truncated"):
        mgr.verify(second, full=False)


def test_rotation_keeps_exactly_three(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in range(1, 11):
        save(mgr, step)
        done = mgr.complete()
        assert len(done) == min(step, 3)
        assert done[-1].step == step  # the newest is never the one deleted
    assert [i.name for i in mgr.complete()] == ["checkpoint-000008", "checkpoint-000009", "checkpoint-000010"]
    assert leftovers(tmp_path) == []
    for i in mgr.complete():
        mgr.verify(i.path)


def test_keep_last_one_never_leaves_zero(tmp_path):
    def fault(p):
        if p == "marker_written":
            raise Crash(p)

    mgr = CheckpointManager(tmp_path, keep_last=1)
    save(mgr, 1)
    with pytest.raises(Crash):
        save(CheckpointManager(tmp_path, keep_last=1, fault=fault), 2)
    assert [i.step for i in mgr.complete()] == [1]
    save(mgr, 3)
    assert [i.step for i in mgr.complete()] == [3]


def test_mid_window_checkpoint_sorts_after_its_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    save(mgr, 4)
    mid = save(mgr, 4, micro=1)
    assert mgr.latest() == mid
    assert [(i.step, i.micro) for i in mgr.complete()] == [(4, 0), (4, 1)]


@pytest.mark.parametrize("where", ["shared", "local"])
def test_non_finite_values_are_never_saved(tmp_path, where):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    good = save(mgr, 1)
    shared, local = payload(2)
    if where == "shared":
        shared["trainable.safetensors"]["w"][0, 0] = float("nan")
    else:
        local["grads_rank0.safetensors"] = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteCheckpointError, match="NaN/Inf"):
        mgr.save(2, 0, shared, local)
    assert mgr.latest() == good
    assert leftovers(tmp_path) == []


class _Evil:
    """Unpickling this creates a file: proof that code from the file ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_pickle(path: Path, target: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "x": _Evil(str(target))}, f)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
    path = save(mgr, 1)
    target = tmp_path / "pwned"
    _evil_pickle(path / "optimizer.pt", target)
    # Re-sign the marker so that the checksum does not stop it first: the loader itself must refuse.
    marker = json.loads((path / MARKER).read_text())
    from anytext2_lcm.checkpoint import sha256_file

    f = path / "optimizer.pt"
    marker["files"]["optimizer.pt"] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (path / MARKER).write_text(json.dumps(marker))
    mgr.verify(path)
    with pytest.raises(CheckpointError, match="refused"):
        CheckpointReader(path).obj("optimizer.pt")
    assert not target.exists()
    # The same file as a zip-format torch checkpoint (torch.save of the object) is refused too.
    torch.save({"x": _Evil(str(target))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        CheckpointReader(path).obj("optimizer.pt")
    assert not target.exists()


def test_malicious_adapter_is_refused_and_not_executed(tmp_path):
    from anytext2_lcm.checkpoint import load_model
    from anytext2_lcm.lora import load_lora

    target = tmp_path / "pwned"
    evil = tmp_path / "adapter.bin"
    _evil_pickle(evil, target)
    model = load_model(None, preset="tiny")
    with pytest.raises(CheckpointError, match="refused"):
        load_lora(model, evil)
    assert not target.exists()


def test_resume_refuses_a_malicious_checkpoint_before_running_it(tmp_path, monkeypatch):
    """End to end: a run resumed from a checkpoint whose optimizer state is a code-running pickle stops with a
    CheckpointError and the code never runs."""
    from anytext2_lcm.distill.trainer import train

    from distill_helpers import make_config, tiny_dataset

    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    train(make_config(data, out, "train.max_steps=1"))
    ck = CheckpointManager(out / "checkpoints").latest()
    target = tmp_path / "pwned"
    _evil_pickle(ck / "optimizer.pt", target)
    from anytext2_lcm.checkpoint import sha256_file

    marker = json.loads((ck / MARKER).read_text())
    marker["files"]["optimizer.pt"] = {"bytes": os.path.getsize(ck / "optimizer.pt"),
                                       "sha256": sha256_file(ck / "optimizer.pt")}
    (ck / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="refused"):
        train(make_config(data, out, "train.max_steps=2", "checkpoint.resume=latest"))
    assert not target.exists()


def test_average_of_checkpoints_is_the_hand_mean_and_a_damaged_one_stops_it(tmp_path):
    from anytext2_lcm.distill.checkpoints import average_checkpoints

    mgr = CheckpointManager(tmp_path, keep_last=5)
    paths = [save(mgr, k) for k in (1, 2, 6)]
    avg = average_checkpoints(paths)
    assert torch.equal(avg["w"], torch.full((4, 3), 3.0))  # (1 + 2 + 6) / 3
    assert avg["w"].dtype == torch.float32
    assert torch.equal(average_checkpoints(paths[:1])["w"], torch.full((4, 3), 1.0))
    # one damaged file: nothing is averaged, and the error names the checkpoint
    f = paths[1] / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint-000002.*sha256"):
        average_checkpoints(paths)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([])


def test_average_refuses_checkpoints_of_different_runs(tmp_path):
    from anytext2_lcm.distill.checkpoints import average_checkpoints

    a, b = CheckpointManager(tmp_path / "a"), CheckpointManager(tmp_path / "b")
    pa = save(a, 1)
    shared, local = payload(2)
    shared["trainable.safetensors"] = {"w": torch.zeros(3, 4)}
    pb = b.save(2, 0, shared, local)
    with pytest.raises(CheckpointError, match=r"w is torch.float32 \(3, 4\)"):
        average_checkpoints([pa, pb])
