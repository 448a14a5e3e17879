"""The LCM step against hand math: teacher CFG as AnyText2 inference (separate cond and uncond passes here), the DDIM
step on the grid, boundary scalings, a target without gradient, the WriteNet run once (frozen) or with the adapter
(zero-conv LoRA), and a loss that goes down over a short run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from anytext2_lcm.distill.batch import prepare_batch
from anytext2_lcm.distill.config import TrainConfig
from anytext2_lcm.distill.lcm import DenoiserNet, LCMMethod, distill_conditions
from anytext2_lcm.distill.components import build_teacher
from anytext2_lcm.lora import disable_adapters
from anytext2_lcm.defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT

from distill_helpers import first_batch, lora_student, make_config, tiny_dataset
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def student(cfg: TrainConfig, lora_b_std: float = 0.05):
    return lora_student(cfg, LCMMethod, lora_b_std)


a_batch = first_batch


def alphas(model) -> torch.Tensor:
    return model.alphas_cumprod.float()


def test_step_matches_hand_math(data, tmp_path):
    cfg = make_config(data, tmp_path, "train.batch_size=2", "distill.guidance_scale_range=[7.0, 8.0]")
    model, method = student(cfg)
    batch, tb = a_batch(cfg, model)
    out = method.step(DenoiserNet(model), model, tb)
    T = out.tensors
    B = tb.batch_size

    # The pair lies on the 50-point grid {19, 39, ..., 999}, one skip (k = 20) apart; w = s − 1 with s in [7, 8].
    assert torch.equal(T["start"], 20 * (T["index"] + 1) - 1)
    assert torch.equal(T["end"], (T["start"] - 20).clamp(min=0))
    assert ((T["w"] >= 6.0) & (T["w"] <= 7.0)).all()
    # x_t is the forward process at t_{n+k} from the encoded image.
    a = alphas(model)
    at = a[T["start"]].view(B, 1, 1, 1)
    eps_true = (T["x_t"] - at.sqrt() * tb.latents) / (1 - at).sqrt()
    assert abs(float(eps_true.std()) - 1.0) < 0.35  # it is Gaussian noise (a few hundred numbers)

    # Teacher by hand, as AnyText2 inference: cond = (caption + ", " + a_prompt, text caption), uncond = (n_prompt,
    # ""), same glyphs / positions / masked_x; two separate passes with the adapters off.
    x_t, t, s = T["x_t"], T["start"], T["end"]
    ti = tb.text_info
    with torch.no_grad(), disable_adapters(model):
        lines = model.line_embeddings(ti)
        c = model.encode_conditions([cap + ", " + DEFAULT_A_PROMPT for cap in batch["img_caption"]],
                                    batch["text_caption"], lines)
        u = model.encode_conditions([DEFAULT_N_PROMPT] * B, [""] * B, lines)
        eps_c = model.denoise(x_t, t, c.image_context, model.control(c.text_context, ti))
        eps_u = model.denoise(x_t, t, u.image_context, model.control(u.text_context, ti))
    w = T["w"].view(B, 1, 1, 1)
    x0 = lambda e, x, tt: (x - (1 - a[tt]).sqrt().view(B, 1, 1, 1) * e) / a[tt].sqrt().view(B, 1, 1, 1)
    g_x0 = (1 + w) * x0(eps_c, x_t, t) - w * x0(eps_u, x_t, t)
    g_eps = (1 + w) * eps_c - w * eps_u
    a_prev = a[s].view(B, 1, 1, 1)  # t_n; for the lowest pair that is ᾱ[0], not 1
    x_prev = a_prev.sqrt() * g_x0 + (1 - a_prev).sqrt() * g_eps
    torch.testing.assert_close(T["x_prev"], x_prev, rtol=1e-4, atol=1e-4)

    # Boundary scalings (LCM eq. 9, timestep_scaling 10, σ_data 0.5) and the student / target by hand.
    def f(x, tt, e):
        st = 10.0 * tt.float().view(B, 1, 1, 1)
        c_skip = 0.25 / (st ** 2 + 0.25)
        c_out = st / (st ** 2 + 0.25).sqrt()
        return c_skip * x + c_out * x0(e, x, tt)

    with torch.no_grad():
        e_s = model.denoise(x_t, t, c.image_context, model.control(c.text_context, ti))
        e_t = model.denoise(T["x_prev"], s, c.image_context, model.control(c.text_context, ti))
    torch.testing.assert_close(T["student"], f(x_t, t, e_s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(T["target"], f(T["x_prev"], s, e_t), rtol=1e-4, atol=1e-4)
    # Pseudo-Huber with c = 0.001.
    d2 = (T["student"] - T["target"]) ** 2
    huber = (torch.sqrt(d2 + 1e-6) - 1e-3).mean()
    assert math.isclose(float(out.loss.detach()), float(huber), rel_tol=1e-4)
    # The student with the adapter is not the teacher (the comparison above is not trivial).
    assert not torch.allclose(e_s, eps_c, atol=1e-4)


def test_writenet_once_one_grad_pass_and_no_grad_target(data, tmp_path):
    cfg = make_config(data, tmp_path, "train.batch_size=2")
    model, method = student(cfg)
    _, tb = a_batch(cfg, model)
    calls = {"writenet": [], "unet": []}
    hooks = [model.control_model.register_forward_pre_hook(lambda m, a: calls["writenet"].append(
                 (a[0].shape[0], torch.is_grad_enabled()))),
             model.unet.register_forward_pre_hook(lambda m, a: calls["unet"].append(
                 (a[0].shape[0], torch.is_grad_enabled())))]
    out = method.step(DenoiserNet(model), model, tb)
    out.loss.backward()
    for h in hooks:
        h.remove()
    # One WriteNet call per step: cond and uncond batched (2B), without grad, reused by all passes.
    assert calls["writenet"] == [(4, False)]
    # Three UNet calls: student (grad), teacher cond+uncond batched (2B, no grad), target (no grad).
    assert sorted(calls["unet"]) == [(2, False), (2, True), (4, False)]
    assert not out.tensors["target"].requires_grad
    # Gradients reach exactly the LoRA weights, and all of them.
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_zero_conv_lora_teacher_without_student_with_adapter(data, tmp_path):
    cfg = make_config(data, tmp_path, "train.batch_size=2", "lora.zero_convs=true")
    model, method = student(cfg, lora_b_std=0.2)
    _, tb = a_batch(cfg, model)
    cond = distill_conditions(model, tb, DEFAULT_A_PROMPT, DEFAULT_N_PROMPT)
    assert cond.student_control is None  # adapter-dependent residuals: the student computes its own
    with torch.no_grad():
        with_adapter = model.control(cond.teacher.cond.text_context, tb.text_info)
        with disable_adapters(model):
            without = model.control(cond.teacher.cond.text_context, tb.text_info)
    # The teacher's residuals are the adapter-free ones; the student's differ.
    for r_teacher, r_plain in zip(cond.teacher.control_cond, without):
        torch.testing.assert_close(r_teacher, r_plain)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(with_adapter, without))
    calls = []
    h = model.control_model.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    out = method.step(DenoiserNet(model), model, tb)
    out.loss.backward()
    h.remove()
    # Teacher residuals (cond + uncond, adapters off), the student's (adapter on, with grad), the target's (adapter
    # on, no grad).
    assert calls == [False, True, False]
    zc = [p for n, p in model.named_parameters() if "zero_convs" in n and "lora_" in n]
    assert zc and all(p.grad is not None for p in zc)
    assert any(float(p.grad.abs().max()) > 0 for p in zc)


def test_gradient_checkpointing_gives_the_same_gradients(data, tmp_path):
    from anytext2_lcm.distill.components import enable_gradient_checkpointing

    cfg = make_config(data, tmp_path)
    grads = []
    for ckpt in (False, True):
        model, method = student(cfg)
        if ckpt:
            assert enable_gradient_checkpointing(model) > 0
        _, tb = a_batch(cfg, model)
        out = method.step(DenoiserNet(model), model, tb)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def _probe(model, method, batch) -> float:
    """Mean LCM loss of a fixed batch over four fixed draws (seeded, so it compares model states, not luck)."""
    net = DenoiserNet(model)
    with torch.no_grad():
        return sum(float(method.step(net, model, prepare_batch(model, batch, 1000 + k, 0, "cpu")).loss)
                   for k in range(4)) / 4


def test_loss_decreases_over_a_short_run(tmp_path_factory, tmp_path):
    """16 optimizer steps of the real trainer (batch 2, 4 images, random tiny teacher, CFG 7–8) lower the
    distillation loss of the training images under fixed draws; TensorBoard and validation images are written."""
    from safetensors.torch import load_file

    from anytext2_lcm.distill.trainer import train

    data = tiny_dataset(tmp_path_factory.mktemp("data4"), num=4)
    cfg = make_config(data, tmp_path / "run", "train.max_steps=16", "train.batch_size=2", "optim.learning_rate=3e-3",
                      "logging.tensorboard=true", "validation.every_n_steps=16", "validation.steps=[1, 4]")
    result = train(cfg)
    assert result.exit_code == 0 and result.state.optimizer_steps == 16

    probe_cfg = make_config(data, tmp_path / "probe", "train.batch_size=4")
    before, method = student(cfg, lora_b_std=0.0)  # the initial LoRA (B = 0): student = teacher
    batch = a_batch(probe_cfg, before)[0]
    after, _ = student(cfg, lora_b_std=0.0)
    named = dict(after.named_parameters())
    for k, v in load_file(str(result.checkpoint / "trainable.safetensors")).items():
        named[k].data.copy_(v)
    p0, p1 = _probe(before, method, batch), _probe(after, method, batch)
    print(f"probe loss {p0:.5f} -> {p1:.5f} ({p1 / p0 - 1:+.1%}); step losses "
          f"{[round(l, 4) for _, l in result.losses]}")
    assert p1 < 0.985 * p0
    # The adapter files load and carry the same weights.
    from anytext2_lcm.lora import load_lora

    fresh = build_teacher(cfg.model)
    load_lora(fresh, tmp_path / "run" / "adapter.safetensors")
    lora = {n: p for n, p in fresh.named_parameters() if "lora_B" in n}
    trained = {n: p for n, p in named.items() if "lora_B" in n}
    assert lora.keys() == trained.keys()
    assert all(torch.equal(lora[k], trained[k]) for k in lora)
    # TensorBoard scalars for every step and validation images at the exact inference timesteps (1 and 4 steps).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((tmp_path / "run" / "logs").glob("**/events.out.tfevents.*")).parent))
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/skipped_samples", "train/steps_per_sec"):
        assert tag in scalars, scalars
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 17))
    assert {"validation/0_lcm1", "validation/0_lcm4", "validation/1_lcm4"} <= set(ea.Tags()["images"])
    pngs = sorted(p.name for p in (tmp_path / "run" / "validation" / "step-000016").glob("*.png"))
    assert pngs == ["0_lcm1.png", "0_lcm4.png", "1_lcm1.png", "1_lcm4.png"]
