"""Trainer modes: precision on the CPU (fp16 → fp32 with a warning, bf16 with frozen weights cast), skipped data
counted and a run stopped past the skip rate, and teacher training (AnyText2's objective and trainable set)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anytext2_lcm.distill.trainer import Trainer, train

from distill_helpers import base_config, make_config, metrics, tiny_dataset, write_yaml
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def test_fp16_on_cpu_becomes_fp32_with_a_warning(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        t = Trainer(make_config(data, tmp_path, "train.mixed_precision=fp16"))
    assert t.mixed_precision == "no"
    assert "fp16 on a CPU" in caplog.text


def test_bf16_with_cast_frozen_weights_trains(data, tmp_path):
    r = train(make_config(data, tmp_path, "train.mixed_precision=bf16", "train.cast_frozen=true",
                          "train.max_steps=2"))
    assert r.exit_code == 0 and r.state.optimizer_steps == 2
    assert all(torch.isfinite(torch.tensor(l)) for _, l in r.losses)
    from safetensors.torch import load_file

    saved = load_file(str(r.checkpoint / "trainable.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # fp32 master weights


def _with_missing_images(src: Path, dst: Path, rows: list[int]) -> Path:
    doc = json.loads(src.read_text())
    doc["data_root"] = str(src.parent / doc["data_root"])
    for i in rows:
        doc["data_list"][i]["img_name"] = f"missing_{i}.jpg"
    dst.write_text(json.dumps(doc))
    return dst


def test_skipped_samples_are_counted_and_too_many_stop_the_run(data, tmp_path, capsys):
    bad = _with_missing_images(data, tmp_path / "bad.json", [1, 6])
    # One epoch (8 items, batch 2): the two missing images are skipped, counted and logged.
    r = train(make_config(bad, tmp_path / "a", "train.max_steps=4", "train.batch_size=2", "data.max_skip_rate=0.5"))
    assert r.exit_code == 0
    assert r.state.skipped_samples == 2 and r.state.samples_seen == 6
    assert metrics(tmp_path / "a")[-1]["skipped_samples"] == 2
    # Past the skip rate the command stops with the counts (exit 1), before training on more data.
    from anytext2_lcm.cli import main

    cfg = base_config(bad, tmp_path / "b")
    cfg["data"].update(max_skip_rate=0.1, min_items_for_skip_rate=2)
    cfg["train"].update(batch_size=2, max_steps=4)
    code = main(["distill", "--config", str(write_yaml(cfg, tmp_path / "c.yaml"))])
    assert code == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "image_missing" in err


def test_teacher_objective_by_hand(data, tmp_path):
    from anytext2_lcm.distill.batch import prepare_batch
    from anytext2_lcm.distill.data import build_loader
    from anytext2_lcm.distill.teacher import TeacherMethod, TeacherNet
    from anytext2_lcm.distill.components import build_teacher

    cfg = make_config(data, tmp_path, "method=teacher", "train.batch_size=4")
    model = build_teacher(cfg.model)
    method = TeacherMethod(cfg)
    method.configure_model(model)
    method.set_train_mode(model)
    loader = build_loader(cfg)
    loader.set_epoch(0)
    batch = next(iter(loader))
    tb = prepare_batch(model, batch, 0, 0, "cpu")
    tb.inv_mask[0, :, :32, :32] = 1.0  # a loss-masked region
    out = method.step(TeacherNet(model), model, tb)
    T = out.tensors
    keep = 1.0 - F.interpolate(tb.inv_mask, size=(8, 8), mode="nearest")
    assert float(keep[0].mean()) < 1.0
    torch.testing.assert_close(T["mask"], keep)
    by_hand = (((T["eps"] - T["noise"]) ** 2) * keep).mean()
    torch.testing.assert_close(out.loss.detach(), by_hand)
    out.loss.backward()
    # Every trainable weight is in the graph (so DDP needs no unused-parameter search) ...
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().max()) > 0}
    assert any(n.startswith("control_model.") for n in trained)
    assert any(n.startswith("embedding_manager.") for n in trained)
    assert any(".attn1x." in n or ".attn2x." in n for n in trained)
    for n in trained:  # ... and nothing outside the original's trainable set
        assert n.startswith(("control_model.", "embedding_manager.")) or ".attn1x." in n or ".attn2x." in n, n


def test_train_teacher_command_and_distill_from_its_result(data, tmp_path):
    from anytext2_lcm.checkpoint import load_model
    from anytext2_lcm.cli import main
    from anytext2_lcm.distill.components import build_teacher

    cfg = base_config(data, tmp_path / "teacher")
    cfg["method"] = "teacher"
    cfg["train"].update(max_steps=2, batch_size=2)
    f = write_yaml(cfg, tmp_path / "teacher.yaml")
    assert main(["train-teacher", "--config", str(f)]) == 0
    trained = load_model(tmp_path / "teacher" / "model")
    start = build_teacher(make_config(data, tmp_path / "x").model)
    a, b = start.state_dict(), trained.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert any(k.startswith("control_model.") for k in changed)
    assert any(".attn1x." in k or ".attn2x." in k for k in changed)
    frozen = ("first_stage_model.", "cond_stage_model.", "text_predictor.")
    assert not any(k.startswith(frozen) for k in changed)
    assert not any(k.startswith("model.diffusion_model.") and ".attn1x." not in k and ".attn2x." not in k
                   for k in changed)
    # The trained folder is a teacher for distillation.
    r = train(make_config(data, tmp_path / "student", f"model.teacher={tmp_path / 'teacher' / 'model'}",
                          "train.max_steps=1"))
    assert r.exit_code == 0 and (tmp_path / "student" / "adapter" / "adapter_model.safetensors").is_file()
