"""Golden tests of the samplers: against the original's DDIM run (parity fixture), against diffusers' DDIM / LCM /
TCD schedulers driven with the same ε and the same noise, and against hand-computed DDIM math."""

from __future__ import annotations

import math

import pytest
import torch

from anytext2_lcm.samplers import (DDIMSampler, LCMSampler, NoiseSchedule, PCMSampler, StepResult, TCDSampler,
                                   distillation_grid, make_sampler, sampler_options)
from conftest import assert_close_ref

import diffusers  # a core dependency: an import error must fail the tests, not skip them

SHAPE = (2, 4, 8, 8)
# Schedules differ in float rounding only: ours is float64→float32 (ldm), diffusers' float32 linspace.
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config()


def _ddim_scheduler(num_steps):
    s = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                                set_alpha_to_one=False, clip_sample=False)
    s.set_timesteps(num_steps)
    return s


def _lcm_scheduler(num_steps):
    s = diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", original_inference_steps=50, clip_sample=False,
                               set_alpha_to_one=False)
    s.set_timesteps(num_steps)
    return s


def _tcd_scheduler(num_steps):
    s = diffusers.TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", original_inference_steps=50, clip_sample=False,
                               set_alpha_to_one=False)
    s.set_timesteps(num_steps)
    return s


def _eps_fn(seed):
    """A deterministic pseudo-network: ε depends on x and t (so errors would propagate like in a real run)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g)

    def fn(x, t):
        return 0.6 * x + 0.4 * torch.tanh(w * (1 + int(t) / 1000))
    return fn


def _lockstep(ours, theirs, num_steps, eps_fn, seed=0, step_kwargs=None):
    """Run our sampler and a diffusers scheduler side by side from the same x_T, with the same ε function and two
    generators seeded alike; compare timesteps, every prev_sample and the last sample."""
    ts = ours.timesteps(num_steps)
    assert ts == theirs.timesteps.tolist()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    x_ours, x_theirs = x0.clone(), x0.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        r = ours.step(eps_fn(x_ours, t), t, t_next, x_ours, generator=g_ours)
        out = theirs.step(eps_fn(x_theirs, t), torch.tensor(t), x_theirs, generator=g_theirs, **(step_kwargs or {}))
        torch.testing.assert_close(r.prev_sample, out.prev_sample, **TOL, msg=f"prev_sample at t={t}")
        x_ours, x_theirs = r.prev_sample, out.prev_sample
    return x_ours, out


# ---------------------------------------------------------------------------------------------------------------
# DDIM (the teacher)
# ---------------------------------------------------------------------------------------------------------------


def test_ddim_timesteps_hand():
    s = make_sampler("ddim")
    assert s.timesteps(20) == [951 - 50 * i for i in range(20)]
    assert s.timesteps(4) == [751, 501, 251, 1]
    # S = 6 does not divide 1000: ldm's range(0, 1000, 166) + 1 has 7 entries.
    assert s.timesteps(6) == [997, 831, 665, 499, 333, 167, 1]
    assert s.timesteps(1) == [1]
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps(501)  # 1000 // 501 = 1 would reach t = 1000
    with pytest.raises(ValueError):
        s.timesteps(0)


def test_ddim_fixture_schedule(tiny_fixture, schedule):
    """ddim_timesteps / ddim_alphas / ddim_alphas_prev of the original's 4-step run."""
    _, _, out, _ = tiny_fixture
    s = DDIMSampler(schedule)
    asc = s.timesteps(4)[::-1]
    assert asc == out["ddim_timesteps"].tolist()
    ac = schedule.alphas_cumprod
    assert_close_ref(ac[asc], out["ddim_alphas"], "ddim_alphas")
    # ᾱ_prev of step i is ᾱ of the next-visited timestep; of the last step, ᾱ[0] (not 1).
    prev = torch.stack([ac[0]] + [ac[t] for t in asc[:-1]])
    assert_close_ref(prev, out["ddim_alphas_prev"], "ddim_alphas_prev")
    assert float(out["ddim_alphas_prev"][0]) != 1.0


def test_ddim_fixture_steps(tiny_fixture, schedule):
    """Replay the original's run: recover ε of each step from its (x_t, x̂0) and check our update lands on the
    recorded next latent and x̂0. The recorded x_inter_k / pred_x0_k are after step k (index 0 is x_T)."""
    _, _, out, _ = tiny_fixture
    s = DDIMSampler(schedule)
    ts = s.timesteps(4)
    ac = schedule.alphas_cumprod.double()
    for k, t in enumerate(ts):
        x = out[f"ddim_x_inter_{k}"]
        x0_ref = out[f"ddim_pred_x0_{k + 1}"]
        eps = ((x.double() - ac[t].sqrt() * x0_ref.double()) / (1 - ac[t]).sqrt()).float()
        r = s.step(eps, t, ts[k + 1] if k + 1 < len(ts) else None, x)
        assert_close_ref(r.denoised, x0_ref, f"pred_x0 step {k}")
        assert_close_ref(r.prev_sample, out[f"ddim_x_inter_{k + 1}"], f"x_inter step {k}")
    assert_close_ref(r.prev_sample, out["ddim_samples"], "ddim_samples")


@pytest.mark.parametrize("num_steps", [20, 4])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(schedule, num_steps, eta):
    ours = DDIMSampler(schedule, eta=eta)
    theirs = _ddim_scheduler(num_steps)
    _lockstep(ours, theirs, num_steps, _eps_fn(1), step_kwargs={"eta": eta})


def test_ddim_s6_differs_from_diffusers():
    """Documented difference: ldm gives 7 steps for S = 6, diffusers' "leading" spacing 6 (ours minus the 997)."""
    ours = make_sampler("ddim").timesteps(6)
    theirs = _ddim_scheduler(6).timesteps.tolist()
    assert len(ours) == 7 and len(theirs) == 6
    assert theirs == ours[1:]


def test_ddim_step_hand(schedule):
    """One η = 0 step by hand, in float64."""
    ac = schedule.alphas_cumprod.double()
    x = torch.full((1, 1, 1, 1), 0.7)
    eps = torch.full((1, 1, 1, 1), -0.3)
    r = make_sampler("ddim").step(eps, 501, 251, x)
    a, ap = ac[501].item(), ac[251].item()
    x0 = (0.7 - math.sqrt(1 - a) * -0.3) / math.sqrt(a)
    assert r.denoised.item() == pytest.approx(x0, rel=1e-6)
    assert r.prev_sample.item() == pytest.approx(math.sqrt(ap) * x0 + math.sqrt(1 - ap) * -0.3, rel=1e-6)
    # last step: to ᾱ[0]
    r = make_sampler("ddim").step(eps, 1, None, x)
    a, a0 = ac[1].item(), ac[0].item()
    x0 = (0.7 + 0.3 * math.sqrt(1 - a)) / math.sqrt(a)
    assert r.prev_sample.item() == pytest.approx(math.sqrt(a0) * x0 - 0.3 * math.sqrt(1 - a0), rel=1e-6)


def test_ddim_eta_zero_draws_no_noise(schedule):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    make_sampler("ddim").step(torch.zeros(SHAPE), 501, 251, torch.ones(SHAPE), generator=g)
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------------------------------
# LCM
# ---------------------------------------------------------------------------------------------------------------


def test_lcm_timesteps():
    s = make_sampler("lcm")
    assert s.timesteps(1) == [999]
    assert s.timesteps(2) == [999, 499]
    assert s.timesteps(4) == [999, 759, 499, 259]
    assert s.timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps(51)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(schedule, num_steps):
    ours = LCMSampler(schedule)
    theirs = _lcm_scheduler(num_steps)
    x, out = _lockstep(ours, theirs, num_steps, _eps_fn(2), seed=7)
    torch.testing.assert_close(x, out.denoised, **TOL)  # the last step returns the denoised sample


def test_lcm_last_step_is_denoised_and_renoise_uses_generator(schedule):
    s = LCMSampler(schedule)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    last = s.step(eps, 259, None, x)
    assert torch.equal(last.prev_sample, last.denoised)
    a = s.step(eps, 999, 759, x, generator=torch.Generator().manual_seed(5))
    b = s.step(eps, 999, 759, x, generator=torch.Generator().manual_seed(5))
    c = s.step(eps, 999, 759, x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.prev_sample, b.prev_sample) and not torch.equal(a.prev_sample, c.prev_sample)
    # re-noising by hand: sqrt(ᾱ_759)·denoised + sqrt(1 − ᾱ_759)·z
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ac = schedule.alphas_cumprod
    torch.testing.assert_close(a.prev_sample, ac[759].sqrt() * a.denoised + (1 - ac[759]).sqrt() * z)


def test_lcm_boundary_condition_by_hand(schedule):
    """At t = 1: c_skip = 0.25 / (10² + 0.25), c_out = 10 / sqrt(10² + 0.25); at t = 0 f(x) = x."""
    ac = schedule.alphas_cumprod.double()
    x = torch.tensor([[[[0.9]]]])
    eps = torch.tensor([[[[-0.2]]]])
    r = LCMSampler(schedule).step(eps, 1, None, x)
    x0 = (0.9 + 0.2 * math.sqrt(1 - ac[1].item())) / math.sqrt(ac[1].item())
    assert r.denoised.item() == pytest.approx(0.25 / 100.25 * 0.9 + 10 / math.sqrt(100.25) * x0, rel=1e-6)
    assert LCMSampler(schedule).step(eps, 0, None, x).denoised.item() == pytest.approx(0.9, rel=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# TCD
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_tcd_matches_diffusers(schedule, num_steps, gamma):
    ours = TCDSampler(schedule, gamma=gamma)
    theirs = _tcd_scheduler(num_steps)
    _lockstep(ours, theirs, num_steps, _eps_fn(3), seed=11, step_kwargs={"eta": gamma})


def test_tcd_gamma_zero_is_deterministic_ddim(schedule):
    """γ = 0: the step is the DDIM jump t → t_next, by hand."""
    ac = schedule.alphas_cumprod
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    r = TCDSampler(schedule, gamma=0.0).step(eps, 759, 499, x)
    x0 = (x - (1 - ac[759]).sqrt() * eps) / ac[759].sqrt()
    torch.testing.assert_close(r.prev_sample, ac[499].sqrt() * x0 + (1 - ac[499]).sqrt() * eps)


def test_tcd_gamma_one_is_close_to_lcm(schedule):
    """γ = 1 jumps to s = 0 and re-noises to t_next: LCM's restart up to ᾱ[0] ≠ 1 and c_skip ≈ 0."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    tcd = TCDSampler(schedule, gamma=1.0).step(eps, 999, 759, x, generator=torch.Generator().manual_seed(3))
    lcm = LCMSampler(schedule).step(eps, 999, 759, x, generator=torch.Generator().manual_seed(3))
    tcd0 = TCDSampler(schedule, gamma=0.0).step(eps, 999, 759, x)
    d1 = (tcd.prev_sample - lcm.prev_sample).abs().max().item()
    d0 = (tcd0.prev_sample - lcm.prev_sample).abs().max().item()
    assert d1 < 0.05 * lcm.prev_sample.abs().max().item()
    assert d0 > 20 * d1


# ---------------------------------------------------------------------------------------------------------------
# PCM
# ---------------------------------------------------------------------------------------------------------------


def test_pcm_timesteps_both_conventions():
    inf = make_sampler("pcm")
    assert inf.timesteps(1) == [999]
    assert inf.timesteps(2) == [999, 499]
    assert inf.timesteps(4) == [999, 759, 499, 259]
    assert inf.timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    off = make_sampler("pcm", convention="official")
    # official PCM: E = floor(linspace(0, 50, M, endpoint=False)) on the ascending grid, edge = grid[e - 1]
    # M = 4: E = [0, 12, 25, 37] → grid[36] = 739, grid[24] = 499, grid[11] = 239 (grid[i] = 20 i + 19)
    assert off.timesteps(4) == [999, 739, 499, 239]
    # M = 8: E = [0, 6, 12, 18, 25, 31, 37, 43]
    assert off.timesteps(8) == [999, 859, 739, 619, 499, 359, 239, 119]
    assert off.timesteps(2) == [999, 499] == inf.timesteps(2)
    assert off.timesteps(1) == [999]


def test_pcm_step_count_rules():
    s = make_sampler("pcm", num_phases=4)
    for n in (1, 2, 4, 8, 12):
        assert len(s.timesteps(n)) == n
    for n in (3, 5, 6):
        with pytest.raises(ValueError, match="num_phases=4"):
            s.timesteps(n)
    # multiples visit every phase edge, divisors visit only edges
    edges4 = set(s.timesteps(4))
    assert edges4 <= set(s.timesteps(8))
    assert set(s.timesteps(2)) <= edges4
    with pytest.raises(ValueError, match="convention"):
        make_sampler("pcm", convention="trailing")
    with pytest.raises(ValueError, match="num_phases"):
        make_sampler("pcm", num_phases=0)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_pcm_inference_convention_matches_diffusers_tcd_gamma0(schedule, num_steps):
    """What the official PCM demo samples its LoRAs with: TCDScheduler, eta 0."""
    _lockstep(PCMSampler(schedule), _tcd_scheduler(num_steps), num_steps, _eps_fn(4), step_kwargs={"eta": 0.0})


def test_pcm_step_hand(schedule):
    """One jump 999 → 739 (official 4-phase) and the last jump 239 → ᾱ[0], by hand in float64."""
    ac = schedule.alphas_cumprod.double()
    s = make_sampler("pcm", num_phases=4, convention="official")
    x = torch.tensor([[[[1.3]]]])
    eps = torch.tensor([[[[0.4]]]])
    r = s.step(eps, 999, 739, x)
    x0 = (1.3 - math.sqrt(1 - ac[999].item()) * 0.4) / math.sqrt(ac[999].item())
    assert r.denoised.item() == pytest.approx(x0, rel=1e-5)
    assert r.prev_sample.item() == pytest.approx(math.sqrt(ac[739].item()) * x0 + math.sqrt(1 - ac[739].item()) * 0.4,
                                                 rel=1e-5)
    r = s.step(eps, 239, None, x)
    x0 = (1.3 - math.sqrt(1 - ac[239].item()) * 0.4) / math.sqrt(ac[239].item())
    assert r.prev_sample.item() == pytest.approx(math.sqrt(ac[0].item()) * x0 + math.sqrt(1 - ac[0].item()) * 0.4,
                                                 rel=1e-5)


def test_leading_grid_is_the_teachers_ddim(schedule):
    """The leading grid is the teacher's own DDIM discretisation: its points are ldm's "uniform" timesteps, the
    samplers pick their few steps from it (by hand: positions floor(linspace(0, 20, n)) of [951, 901, …, 1]), and a
    20-step PCM run of the undistilled model on it is diffusers' 20-step DDIM (η = 0), step for step."""
    assert distillation_grid(1000, 20, "leading") == [50 * i + 1 for i in range(20)]
    assert distillation_grid(1000, 50, "leading")[-1] == 981
    for name in ("lcm", "tcd", "pcm"):
        s = make_sampler(name, original_steps=20, timestep_spacing="leading")
        assert s.timesteps(1) == [951]
        assert s.timesteps(4) == [951, 701, 451, 201]
        assert s.timesteps(8) == [951, 851, 701, 601, 451, 351, 201, 101]
    _lockstep(PCMSampler(schedule, original_steps=20, timestep_spacing="leading"), _ddim_scheduler(20), 20,
              _eps_fn(5), step_kwargs={"eta": 0.0})
    for bad in (dict(original_steps=1000), dict(original_steps=30)):
        with pytest.raises(ValueError, match="leading grid"):
            make_sampler("lcm", timestep_spacing="leading", **bad)
    with pytest.raises(ValueError, match="timestep_spacing='middle'"):
        make_sampler("pcm", timestep_spacing="middle")


# ---------------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------------


def test_make_sampler_errors_and_options():
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim, lcm, tcd, pcm"):
        make_sampler("euler")
    with pytest.raises(ValueError, match="no option.*gamma.*valid options: eta"):
        make_sampler("ddim", gamma=0.3)
    with pytest.raises(ValueError, match="gamma"):
        make_sampler("tcd", gamma=1.5)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("ddim", eta=-1.0)
    assert sampler_options("tcd") == ("gamma", "original_steps", "timestep_spacing")
    assert make_sampler("tcd", gamma=0.1).gamma == 0.1


@pytest.mark.parametrize("name", ["ddim", "lcm", "tcd", "pcm"])
def test_interface_uniform(name):
    s = make_sampler(name)
    ts = s.timesteps(4)
    assert all(isinstance(t, int) for t in ts) and ts == sorted(ts, reverse=True)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    r = s.step(torch.zeros(SHAPE), ts[0], ts[1], x, generator=torch.Generator().manual_seed(0))
    assert isinstance(r, StepResult) and r.prev_sample.shape == SHAPE and r.denoised.shape == SHAPE
    with pytest.raises(ValueError, match="t_next"):
        s.step(torch.zeros(SHAPE), ts[1], ts[0], x)
    # tensor timesteps are accepted
    r2 = s.step(torch.zeros(SHAPE), torch.tensor(ts[0]), torch.tensor(ts[1]), x,
                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.prev_sample, r2.prev_sample)
    # the one sampling loop (pipeline.sample) runs the list and returns the last prev_sample
    from anytext2_lcm.pipeline import sample

    res = sample(lambda x, t: torch.zeros_like(x), s, 4, x, generator=torch.Generator().manual_seed(0))
    assert res.latents.shape == SHAPE and torch.isfinite(res.latents).all() and res.timesteps == list(ts)
