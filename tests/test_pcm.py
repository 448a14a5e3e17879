"""Phased consistency distillation (``method: pcm``): phase-edge targets against hand math on the 50-point grid, the
phased sampler's timesteps (and that a sampler step is exactly the trained jump), the PCM step on the tiny model
(guided teacher by hand; CFG-free teacher: cond branch only, empty prompts at the configured fraction), exact
resume, and a PCM adapter through ``anytext2-lcm generate`` / ``evaluate`` with CFG 7.5 and a negative prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from anytext2_lcm.distill.components import build_teacher
from anytext2_lcm.distill.lcm import DenoiserNet
from anytext2_lcm.distill.pcm import PCMMethod, draw_empty_prompts
from anytext2_lcm.distill.solver import (DDIMSolver, SkipPair, pcm_phase_edges, pcm_target,
                                         predicted_original_sample)
from anytext2_lcm.lora import disable_adapters
from anytext2_lcm.defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT
from anytext2_lcm.pipeline import sample
from anytext2_lcm.samplers import PCMSampler
from anytext2_lcm.samplers.schedule import NoiseSchedule

from distill_helpers import (assert_same_tensors, first_batch, lora_student, losses, make_config, tiny_dataset,
                             trainable)
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

GRID = [20 * (i + 1) - 1 for i in range(50)]  # {19, 39, ..., 999}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def _lower_edge_timestep(i: int) -> int:
    """By hand, 4 phases with edges at the 4-step LCM timesteps: [999 … 779] → 759, [759 … 519] → 499,
    [499 … 279] → 259, [259 … 19] → 0."""
    t = GRID[i]
    return 759 if t > 759 else 499 if t > 499 else 259 if t > 259 else 0


# ---------------------------------------------------------------------------------------------------------------
# Phase edges and targets (pure math)
# ---------------------------------------------------------------------------------------------------------------


def test_phase_edge_targets_by_hand():
    sched = NoiseSchedule.from_config()
    a = sched.alphas_cumprod.double()
    solver = DDIMSolver(sched, 50)
    edges = pcm_phase_edges(4, 50)
    assert edges.tolist() == [0, 13, 25, 38]  # ᾱ_prev indices of timesteps 0, 259, 499, 759
    # Inside a phase (top, middle, just above an edge, lowest phase) and on each edge index.
    index = torch.tensor([49, 37, 30, 26, 12, 1, 38, 25, 13, 0])
    start = solver.ddim_timesteps[index]
    end = (start - 20).clamp(min=0)
    g = torch.Generator().manual_seed(0)
    x_prev = torch.randn(len(index), 4, 3, 3, generator=g)
    eps = torch.randn(len(index), 4, 3, 3, generator=g)  # the no-grad student's ε at (x_prev, t_n)

    jump, edge_t = solver.phase_jump(predicted_original_sample(eps, x_prev, end, sched), eps, index, edges)
    target = pcm_target(x_prev, jump, index, edges)

    assert edge_t.tolist() == [_lower_edge_timestep(i) for i in index.tolist()]
    for b, i in enumerate(index.tolist()):
        t_n, e = GRID[i] - 20 if i else 0, _lower_edge_timestep(i)
        if i in (0, 13, 25, 38):
            # The teacher's step from grid[i] lands exactly on the edge: the target is x_prev itself.
            assert t_n == e
            assert torch.equal(target[b], x_prev[b])
            continue
        # Else the student's DDIM jump from (x_prev, t_n) to the lower edge of the same phase (ᾱ[0] for edge 0).
        x0 = (x_prev[b].double() - math.sqrt(1 - a[t_n]) * eps[b].double()) / math.sqrt(a[t_n])
        hand = math.sqrt(a[e]) * x0 + math.sqrt(1 - a[e]) * eps[b].double()
        torch.testing.assert_close(target[b].double(), hand, rtol=1e-5, atol=1e-5)


def test_sampler_timesteps_with_four_phases():
    s = PCMSampler(num_phases=4)
    assert s.timesteps(1) == [999]
    assert s.timesteps(2) == [999, 499]
    assert s.timesteps(4) == [999, 759, 499, 259]
    assert s.timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert PCMSampler(num_phases=4, convention="official").timesteps(4) == [999, 739, 499, 239]
    for bad in (3, 5, 6):
        with pytest.raises(ValueError, match="divides 4 or is a multiple"):
            s.timesteps(bad)
    # 2 and 4 steps start every step on a phase edge of the 4-phase student; 8 steps visit every edge.
    edge_ts = {759, 499, 259}
    assert set(s.timesteps(2)[1:]) <= edge_ts and set(s.timesteps(4)[1:]) == edge_ts
    assert edge_ts <= set(s.timesteps(8))


def test_sampler_step_is_the_trained_jump():
    """A 4-step run calls the model at the phase tops and each step is the student's training jump (the same
    DDIM map to the lower edge); the last one lands on ᾱ[0], the training solver's final edge."""
    sched = NoiseSchedule.from_config()
    solver = DDIMSolver(sched, 50)
    edges = pcm_phase_edges(4, 50)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g)
    calls = []

    def eps_fn(x_, t):
        t = int(t[0]) if torch.is_tensor(t) else t
        calls.append(t)
        return torch.sin(x_ * (1 + t / 1000))

    out = sample(eps_fn, PCMSampler(sched, num_phases=4), 4, x).latents
    assert calls == [999, 759, 499, 259]
    # Replay with the training map: grid index of each called timestep, jumped to its phase's lower edge.
    y = x
    for t in list(calls[:4]):
        i = torch.full((2,), GRID.index(t))
        e = eps_fn(y, t)
        y, _ = solver.phase_jump(predicted_original_sample(e, y, t, sched), e, i, edges)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


def test_empty_prompt_draws():
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4000)]  # noqa: E731
    picks = draw_empty_prompts(gens(), 0.1)
    assert picks == draw_empty_prompts(gens(), 0.1)  # per-sample generators: reproducible
    # Binomial(4000, 0.1): mean 400, sd 19.
    assert 324 <= sum(picks) <= 476
    gs = gens()[:3]
    before = [g.get_state() for g in gs]
    assert draw_empty_prompts(gs, 0.0) == [False] * 3
    assert all(torch.equal(b, g.get_state()) for b, g in zip(before, gs))  # fraction 0 draws nothing


# ---------------------------------------------------------------------------------------------------------------
# The step on the tiny model
# ---------------------------------------------------------------------------------------------------------------


def pcm_student(cfg, lora_b_std: float = 0.05):
    return lora_student(cfg, PCMMethod, lora_b_std)


def a_batch(cfg, model):
    return first_batch(cfg, model)


def force_indices(monkeypatch, method, indices):
    """Make the step draw these grid indices (the generators still advance as in a real draw)."""
    it = iter(indices)
    solver = method.solver
    real = solver.sample_pairs

    def fake(batch, generator=None, device=None):
        real(batch, generator=generator)
        i = torch.tensor([next(it)])
        start = solver.ddim_timesteps[i]
        return SkipPair(i, start, (start - solver.step_ratio).clamp(min=0))

    monkeypatch.setattr(solver, "sample_pairs", fake)


def ddim_by_hand(model, B):
    """(col, x0, jump) by hand: a per-sample column (B, 1, 1, 1), x̂0 from ε at t, and the DDIM (η = 0) jump from t to
    t_e, on the model's ᾱ."""
    a = model.alphas_cumprod.float()
    col = lambda v: v.view(B, 1, 1, 1)  # noqa: E731
    x0 = lambda e, x, tt: (x - col((1 - a[tt]).sqrt()) * e) / col(a[tt].sqrt())  # noqa: E731
    jump = lambda e, x, tt, te: col(a[te].sqrt()) * x0(e, x, tt) + col((1 - a[te]).sqrt()) * e  # noqa: E731
    return col, x0, jump


@torch.no_grad()
def branches_by_hand(model, batch, text_info):
    """AnyText2's two CFG branches, adapters off: cond = (caption + ", " + a_prompt, text caption), uncond =
    (n_prompt, "")."""
    B = len(batch["img_caption"])
    with disable_adapters(model):
        lines = model.line_embeddings(text_info)
        c = model.encode_conditions([cap + ", " + DEFAULT_A_PROMPT for cap in batch["img_caption"]],
                                    batch["text_caption"], lines)
        u = model.encode_conditions([DEFAULT_N_PROMPT] * B, [""] * B, lines)
    return c, u


def test_guided_pcm_step_matches_hand_math(data, tmp_path, monkeypatch):
    cfg = make_config(data, tmp_path, "method=pcm", "train.batch_size=4")
    model, method = pcm_student(cfg)
    batch, tb = a_batch(cfg, model)
    force_indices(monkeypatch, method, [30, 25, 49, 12])  # inside, on an edge, top phase, lowest phase
    out = method.step(DenoiserNet(model), model, tb)
    T = out.tensors
    B = 4
    assert T["index"].tolist() == [30, 25, 49, 12]
    assert T["edge"].tolist() == [499, 499, 759, 0]
    assert not T["empty"].any()  # guided PCM empties no prompt
    col, x0, jump = ddim_by_hand(model, B)

    x_t, t, s = T["x_t"], T["start"], T["end"]
    ti = tb.text_info
    c, u = branches_by_hand(model, batch, ti)
    with torch.no_grad():
        with disable_adapters(model):
            ctrl_c = model.control(c.text_context, ti)
            eps_c = model.denoise(x_t, t, c.image_context, ctrl_c)
            eps_u = model.denoise(x_t, t, u.image_context, model.control(u.text_context, ti))
        e_s = model.denoise(x_t, t, c.image_context, ctrl_c)  # the student (adapter on)
        e_t = model.denoise(T["x_prev"], s, c.image_context, ctrl_c)
    # Teacher: LCM-form guidance on x̂0 and ε, one DDIM step to t_n.
    w = col(T["w"])
    g_x0 = (1 + w) * x0(eps_c, x_t, t) - w * x0(eps_u, x_t, t)
    g_eps = (1 + w) * eps_c - w * eps_u
    a = model.alphas_cumprod.float()
    x_prev = col(a[s].sqrt()) * g_x0 + col((1 - a[s]).sqrt()) * g_eps
    torch.testing.assert_close(T["x_prev"], x_prev, rtol=1e-4, atol=1e-4)
    # Student: c_skip 0 / c_out 1, its DDIM jump from t_{n+k} to the phase edge.
    edge = T["edge"]
    torch.testing.assert_close(T["student"], jump(e_s, x_t, t, edge), rtol=1e-4, atol=1e-4)
    # Target: x_prev on the edge index (25), else the no-grad student's jump from (x_prev, t_n) to the same edge.
    hand = jump(e_t, T["x_prev"], s, edge)
    hand[1] = T["x_prev"][1]
    torch.testing.assert_close(T["target"], hand, rtol=1e-4, atol=1e-4)
    d2 = (T["student"] - T["target"]) ** 2
    assert math.isclose(float(out.loss.detach()), float((torch.sqrt(d2 + 1e-6) - 1e-3).mean()), rel_tol=1e-4)
    assert out.loss.requires_grad and math.isfinite(float(out.loss.detach()))


def test_guided_student_step_matches_hand_math(data, tmp_path, monkeypatch):
    """``pcm.guided_student``: the student and the target are the adapter-on network's own CFG combination at the
    sample's w (both branches, one 2B UNet call each), jumped to the phase edge; the teacher's step is the guided
    one of the default PCM."""
    B = 3
    cfg = make_config(data, tmp_path, "method=pcm", f"train.batch_size={B}", "pcm.guided_student=true")
    model, method = pcm_student(cfg)
    batch, tb = a_batch(cfg, model)
    force_indices(monkeypatch, method, [30, 25, 49])  # inside a phase, on an edge, the top phase
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], torch.is_grad_enabled())))
    out = method.step(DenoiserNet(model), model, tb)
    out.loss.backward()
    hook.remove()
    # Student (2B, grad), teacher (2B), target (2B): three UNet calls, each over both branches.
    assert sorted(calls) == [(2 * B, False), (2 * B, False), (2 * B, True)]
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if "lora_A" in n)
    T = out.tensors
    col, x0, jump = ddim_by_hand(model, B)
    x_t, t, s, w, edge = T["x_t"], T["start"], T["end"], col(T["w"]), T["edge"]
    ti = tb.text_info
    c, u = branches_by_hand(model, batch, ti)
    with torch.no_grad():
        with disable_adapters(model):
            ctrl_c, ctrl_u = model.control(c.text_context, ti), model.control(u.text_context, ti)
            teacher = [model.denoise(x_t, t, c.image_context, ctrl_c), model.denoise(x_t, t, u.image_context, ctrl_u)]
        guided = lambda x, tt: ((1 + w) * model.denoise(x, tt, c.image_context, ctrl_c)  # noqa: E731
                                - w * model.denoise(x, tt, u.image_context, ctrl_u))
        e_s, e_t = guided(x_t, t), guided(T["x_prev"], s)  # adapter on
    g_eps = (1 + w) * teacher[0] - w * teacher[1]
    torch.testing.assert_close(T["x_prev"], jump(g_eps, x_t, t, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(T["student"], jump(e_s, x_t, t, edge), rtol=1e-4, atol=1e-4)
    hand = jump(e_t, T["x_prev"], s, edge)
    hand[1] = T["x_prev"][1]  # index 25 is an edge index: the target is the teacher's step itself
    torch.testing.assert_close(T["target"], hand, rtol=1e-4, atol=1e-4)
    # With the adapter at zero the student is exactly the teacher's guided jump to the edge: the phased DDIM with
    # CFG that the undistilled control samples with (same seed: same draws).
    model0, method0 = pcm_student(cfg, lora_b_std=0.0)
    _, tb0 = a_batch(cfg, model0)
    force_indices(monkeypatch, method0, [30, 25, 49])
    with torch.no_grad():
        out0 = method0.step(DenoiserNet(model0), model0, tb0)
    assert torch.equal(out0.tensors["x_t"], x_t)
    torch.testing.assert_close(out0.tensors["student"], jump(g_eps, x_t, t, edge), rtol=1e-4, atol=1e-4)


def test_guided_student_with_a_writenet_lora(data, tmp_path):
    """With a LoRA in the WriteNet the guided student computes both branches' residuals with its adapter and with
    grad (inside the one DDP forward), the target without grad; the zero-conv LoRA gets a gradient."""
    B = 2
    cfg = make_config(data, tmp_path, "method=pcm", f"train.batch_size={B}", "pcm.guided_student=true",
                      "lora.zero_convs=true")
    model, method = pcm_student(cfg, lora_b_std=0.2)
    batch, tb = a_batch(cfg, model)
    calls = []
    hook = model.control_model.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0],
                                                                                    torch.is_grad_enabled())))
    out = method.step(DenoiserNet(model), model, tb)
    out.loss.backward()
    hook.remove()
    # Teacher residuals (cond + uncond batched, adapters off), the student's cond and uncond (grad), the target's.
    assert calls == [(2 * B, False), (B, True), (B, True), (B, False), (B, False)]
    zc = [p for n, p in model.named_parameters() if "zero_convs" in n and "lora_" in n]
    assert zc and any(float(p.grad.abs().max()) > 0 for p in zc)
    T = out.tensors
    col, _, jump = ddim_by_hand(model, B)
    x_t, t, w, e = T["x_t"], T["start"], col(T["w"]), T["edge"]
    c, u = branches_by_hand(model, batch, tb.text_info)
    with torch.no_grad():
        eps = ((1 + w) * model.denoise(x_t, t, c.image_context, model.control(c.text_context, tb.text_info))
               - w * model.denoise(x_t, t, u.image_context, model.control(u.text_context, tb.text_info)))
    torch.testing.assert_close(T["student"], jump(eps, x_t, t, e), rtol=1e-4, atol=1e-4)


def test_guided_student_config_and_adapter(data, tmp_path):
    """A guided student needs the guided teacher (one-line error naming the field); its adapter records real CFG
    at the teacher's own scale when the training band holds it, else the band's midpoint."""
    from anytext2_lcm.config import ConfigError
    from anytext2_lcm.defaults import trained_cfg
    from anytext2_lcm.distill.trainer import train
    from anytext2_lcm.lora import adapter_info

    with pytest.raises(ConfigError, match=r"^pcm\.guided_student"):
        make_config(data, tmp_path / "bad", "method=pcm", "pcm.guided_student=true", "pcm.cfg_free_teacher=true")
    assert trained_cfg((4.5, 5.5), 5.0) == 5.0
    assert trained_cfg((7.0, 8.0), 5.0) == 7.5
    assert trained_cfg((7.0, 8.0), 7.0) == 7.0
    result = train(make_config(data, tmp_path / "run", "method=pcm", "pcm.guided_student=true", "train.max_steps=1",
                               "distill.guidance_scale_range=[3.0,4.0]"))
    assert result.exit_code == 0 and all(math.isfinite(v) for _, v in result.losses)
    info = adapter_info(tmp_path / "run" / "adapter")
    # The tiny preset's own scale (AnyText2's 7.5) is outside [3, 4]: the midpoint.
    assert info["sampling"]["sampler"] == "pcm" and info["sampling"]["cfg"] == 3.5
    assert _adapter_metadata(tmp_path / "run" / "adapter.safetensors")["guided_student"] == "true"


def test_leading_grid_config_training_pairs_and_adapter(data, tmp_path):
    """``distill.timestep_spacing: leading``: one-line errors naming the field; the student trains on pairs of the
    teacher's own DDIM timesteps ({1, 51, …, 951} for 20 points) and its adapter records the grid, so that its
    sampler visits the same timesteps."""
    from anytext2_lcm.config import ConfigError
    from anytext2_lcm.distill.trainer import train
    from anytext2_lcm.lora import adapter_info
    from anytext2_lcm.samplers import make_sampler

    with pytest.raises(ConfigError, match=r"^distill\.timestep_spacing"):
        make_config(data, tmp_path / "bad", "distill.timestep_spacing=middle")
    with pytest.raises(ConfigError, match=r"^distill\.num_ddim_timesteps.*leading"):
        make_config(data, tmp_path / "bad2", "distill.timestep_spacing=leading", "distill.num_ddim_timesteps=1000")
    args = ("method=pcm", "pcm.num_phases=4", "distill.num_ddim_timesteps=20", "distill.timestep_spacing=leading")
    model, method = pcm_student(make_config(data, tmp_path / "s", *args, "train.batch_size=4"))
    out = method.step(method.network(model), model, a_batch(method.cfg, model)[1])
    grid = list(range(1, 1000, 50))
    for s, e, edge in zip(out.tensors["start"].tolist(), out.tensors["end"].tolist(), out.tensors["edge"].tolist()):
        assert s in grid and e == max(s - 50, 0)
        assert edge in (0, 201, 451, 701) and edge < s
    result = train(make_config(data, tmp_path / "run", *args, "train.max_steps=1"))
    assert result.exit_code == 0
    sampling = adapter_info(tmp_path / "run" / "adapter")["sampling"]
    assert sampling["options"] == {"num_phases": 4, "convention": "inference", "original_steps": 20,
                                   "timestep_spacing": "leading"}
    assert make_sampler("pcm", **sampling["options"]).timesteps(4) == [951, 701, 451, 201]
    assert _adapter_metadata(tmp_path / "run" / "adapter.safetensors")["timestep_spacing"] == "leading"


def test_cfg_free_teacher_cond_branch_only_and_empty_prompts(data, tmp_path, monkeypatch):
    import anytext2_lcm.distill.pcm as pcm_mod

    B = 4
    seen = []
    real_encode = pcm_mod.encode_branches

    def spy(model, text_info, img, txt, neg_img=None, neg_txt=None, lines=None):
        seen.append((list(img), list(txt), neg_img, neg_txt))
        return real_encode(model, text_info, img, txt, neg_img, neg_txt, lines)

    monkeypatch.setattr(pcm_mod, "encode_branches", spy)
    for fraction in (0.0, 0.5, 1.0):
        cfg = make_config(data, tmp_path / str(fraction), "method=pcm", f"train.batch_size={B}",
                          "pcm.cfg_free_teacher=true", f"pcm.empty_prompt_fraction={fraction}")
        model, method = pcm_student(cfg)
        batch, tb = a_batch(cfg, model)
        calls = {"writenet": [], "unet": []}
        hooks = [model.control_model.register_forward_pre_hook(lambda m, a: calls["writenet"].append(
                     (a[0].shape[0], torch.is_grad_enabled()))),
                 model.unet.register_forward_pre_hook(lambda m, a: calls["unet"].append(
                     (a[0].shape[0], torch.is_grad_enabled())))]
        seen.clear()
        out = method.step(DenoiserNet(model), model, tb)
        out.loss.backward()
        for h in hooks:
            h.remove()
        assert math.isfinite(float(out.loss.detach()))
        # No uncond branch anywhere: one WriteNet call for the cond branch (B), and three B-sized UNet calls —
        # student (grad), teacher (cond only) and target.
        assert calls["writenet"] == [(B, False)]
        assert sorted(calls["unet"]) == [(B, False), (B, False), (B, True)]
        # Empty prompts exactly where the step says it drew them; the rest keep caption + a_prompt and the text
        # caption with its placeholders.
        (img, txt, neg_img, neg_txt), = seen
        assert neg_img is None and neg_txt is None
        empty = out.tensors["empty"].tolist()
        for b in range(B):
            if empty[b]:
                # by default the negative prompt the student is sampled with (distill.n_prompt), no text prompt
                assert (img[b], txt[b]) == (DEFAULT_N_PROMPT, "")
            else:
                assert img[b] == batch["img_caption"][b] + ", " + DEFAULT_A_PROMPT
                assert txt[b] == batch["text_caption"][b] and "*" in txt[b]
        assert sum(empty) == {0.0: 0, 1.0: B}.get(fraction, sum(empty))
        assert out.logs["empty_prompts"] == sum(empty) / B
        if fraction == 1.0:
            # The teacher's step is the unguided ε of the (empty-prompt) cond branch: no w.
            a = model.alphas_cumprod.float()
            x_t, t, s = out.tensors["x_t"], out.tensors["start"], out.tensors["end"]
            col = lambda v: v.view(B, 1, 1, 1)  # noqa: E731
            with torch.no_grad(), disable_adapters(model):
                c = model.encode_conditions([DEFAULT_N_PROMPT] * B, [""] * B, model.line_embeddings(tb.text_info))
                e = model.denoise(x_t, t, c.image_context, model.control(c.text_context, tb.text_info))
            x0 = (x_t - col((1 - a[t]).sqrt()) * e) / col(a[t].sqrt())
            torch.testing.assert_close(out.tensors["x_prev"], col(a[s].sqrt()) * x0 + col((1 - a[s]).sqrt()) * e,
                                       rtol=1e-4, atol=1e-4)


def test_same_draws_as_lcm(data, tmp_path):
    """With the same seed an LCM and a PCM step see the same grid indices, guidance and noise (a fair comparison)."""
    from anytext2_lcm.distill.lcm import LCMMethod

    outs = []
    for method_name in ("lcm", "pcm"):
        cfg = make_config(data, tmp_path / method_name, f"method={method_name}", "train.batch_size=2")
        model = build_teacher(cfg.model)
        method = (LCMMethod if method_name == "lcm" else PCMMethod)(cfg)
        method.configure_model(model)
        method.set_train_mode(model)
        _, tb = a_batch(cfg, model)
        outs.append(method.step(DenoiserNet(model), model, tb).tensors)
    for k in ("index", "w", "x_t", "x_prev"):
        assert torch.equal(outs[0][k], outs[1][k]), k


# ---------------------------------------------------------------------------------------------------------------
# The trainer: resume; the adapter through generate and evaluate
# ---------------------------------------------------------------------------------------------------------------

PCM_RUN = ("method=pcm", "pcm.cfg_free_teacher=true", "pcm.empty_prompt_fraction=0.5", "train.max_steps=3",
           "train.gradient_accumulation_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep_last=10")


def test_pcm_resume_equals_uninterrupted(data, tmp_path):
    from anytext2_lcm.checkpoint import CheckpointError
    from anytext2_lcm.distill.trainer import train

    ref = train(make_config(data, tmp_path / "ref", *PCM_RUN))
    assert ref.exit_code == 0 and all(math.isfinite(v) for _, v in ref.losses)
    out = tmp_path / "run"
    first = train(make_config(data, out, *PCM_RUN), stop_at_micro_step=3)  # inside the window of step 2
    assert first.exit_code == 143 and first.checkpoint.name == "checkpoint-000001-m1"
    with pytest.raises(CheckpointError, match="pcm.num_phases"):
        train(make_config(data, out, *PCM_RUN, "pcm.num_phases=2", "checkpoint.resume=latest"))
    second = train(make_config(data, out, *PCM_RUN, "checkpoint.resume=latest"))
    assert second.exit_code == 0 and second.state.global_step == 3
    assert losses(out) == losses(tmp_path / "ref")  # bit-identical
    assert_same_tensors(trainable(second.checkpoint), trainable(ref.checkpoint))
    meta = _adapter_metadata(out / "adapter.safetensors")
    assert meta["method"] == "pcm" and meta["num_phases"] == "4" and meta["cfg_free_teacher"] == "true"


def _adapter_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def pcm_adapter(data, tmp_path_factory):
    """A converted tiny teacher that records its own guidance scale (4, not AnyText2's 7.5) and a CFG-free PCM adapter
    distilled from it (a few steps: the route, not quality)."""
    import dataclasses

    from anytext2_lcm.checkpoint import save_converted
    from anytext2_lcm.distill.config import ModelSection
    from anytext2_lcm.distill.trainer import train

    root = tmp_path_factory.mktemp("pcm_adapter")
    teacher = root / "teacher"
    model = build_teacher(ModelSection(preset="tiny", init_seed=0))
    model.cfg = dataclasses.replace(model.cfg, guidance_scale=TEACHER_GUIDANCE)
    save_converted(model, teacher)
    result = train(make_config(data, root / "run", "method=pcm", "pcm.cfg_free_teacher=true", "train.max_steps=2",
                               f"model.teacher={teacher}"))
    assert result.exit_code == 0
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps([[8, 20, 56, 44]]))
    return teacher, root / "run" / "adapter", boxes


TEACHER_GUIDANCE = 4.0


def test_the_teachers_own_guidance_scale_reaches_the_student_and_the_defaults(pcm_adapter, tmp_path, capsys):
    """The converted teacher records guidance 4: its CFG-free student records real CFG 4 in its adapter, and
    ``generate`` runs the teacher (no adapter) and the student (no --cfg) at 4, not at AnyText2's 7.5."""
    from anytext2_lcm.cli import main
    from anytext2_lcm.lora import adapter_info

    teacher, adapter, boxes = pcm_adapter
    assert adapter_info(adapter)["sampling"]["cfg"] == TEACHER_GUIDANCE
    base = ["generate", "--model", str(teacher), "--prompt", 'a sign that says "Hi"', "--boxes", str(boxes),
            "--height", "64", "--width", "64", "--steps", "2"]
    for extra in ([], ["--lora", str(adapter)]):
        assert main([*base, *extra, "--out", str(tmp_path / f"{len(extra)}.png")]) == 0
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert info["cfg"] == TEACHER_GUIDANCE and info["sampler"] == ("pcm" if extra else "ddim")


def test_generate_pcm_with_cfg_and_negative_prompt(pcm_adapter, tmp_path, capsys):
    from anytext2_lcm.cli import main

    teacher, adapter, boxes = pcm_adapter
    base = ["generate", "--model", str(teacher), "--lora", str(adapter), "--prompt", 'a sign that says "Hi"',
            "--boxes", str(boxes), "--height", "64", "--width", "64", "--seed", "3"]
    pcm4 = ["--sampler", "pcm", "--steps", "4", "--num-phases", "4", "--cfg", "7.5"]
    outs = []
    for i, neg in enumerate(["blurry, unreadable text", "blurry, unreadable text", "a dog"]):
        path = tmp_path / f"{i}.png"
        assert main([*base, *pcm4, "--n-prompt", neg, "--out", str(path)]) == 0
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert info["sampler"] == "pcm" and info["steps"] == 4 and info["cfg"] == 7.5
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]  # deterministic sampler, same seed: the same bytes
    assert outs[0] != outs[2]  # the negative prompt reaches the uncond branch of real CFG
    # PCM options are checked: a step count the 4-phase student cannot take, a PCM flag on another sampler.
    assert main([*base, "--sampler", "pcm", "--steps", "3", "--num-phases", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert "divides 4" in capsys.readouterr().err
    assert main([*base, "--sampler", "lcm", "--num-phases", "4", "--out", str(tmp_path / "y.png")]) == 2
    assert "applies to --sampler pcm" in capsys.readouterr().err
    assert main([*base, "--sampler", "ddim", "--timestep-spacing", "leading", "--out", str(tmp_path / "z.png")]) == 2
    assert "--timestep-spacing applies to the student samplers" in capsys.readouterr().err
    # the grid flags reach the sampler: the 20-point leading grid starts at 951, not 999
    for spacing in ("trailing", "leading"):
        assert main([*base, *pcm4, "--original-steps", "20", "--timestep-spacing", spacing,
                     "--out", str(tmp_path / f"{spacing}.png")]) == 0
    assert (tmp_path / "leading.png").read_bytes() != (tmp_path / "trailing.png").read_bytes()


def test_evaluate_pcm_with_cfg_and_negative_prompt(pcm_adapter, data, tmp_path, capsys):
    from anytext2_lcm.cli import main

    teacher, adapter, _ = pcm_adapter
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(teacher), "--lora", str(adapter), "--data", str(data), "--num", "1",
                 "--size", "64", "--teacher-steps", "4", "--student-steps", "2,4", "--student-sampler", "pcm",
                 "--num-phases", "4", "--student-cfg", "7.5", "--n-prompt", "blurry, unreadable text",
                 "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in res["runs"]}
    assert {"teacher", "student@2", "student@4"} <= set(runs)
    assert runs["teacher"]["cfg"] == TEACHER_GUIDANCE  # no --teacher-cfg: the model's own scale
    s4 = runs["student@4"]
    assert s4["sampler"] == "pcm" and s4["cfg"] == 7.5 and s4["sampler_options"] == {"num_phases": 4, "original_steps": 50, "convention": "inference"}
    assert s4["unet_evals_per_image"] == 8  # 4 steps × (cond + uncond)
    assert res["config"]["n_prompt"] == "blurry, unreadable text"
    assert s4["fidelity_to_teacher"]["latent_mse"] is not None and s4["seconds_per_image"]["median"] > 0
