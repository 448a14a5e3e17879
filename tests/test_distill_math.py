"""Golden tests of the distillation math: the solver grid, ᾱ_prev and boundary scalings against the numbers diffusers'
LCMScheduler uses, and the DDIM step, guidance, losses and PCM phase rules against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from anytext2_lcm.distill.losses import huber_loss, l2_loss
from anytext2_lcm.distill.solver import (DDIMSolver, consistency_output, imagen_scale_to_lcm_w, lcm_guidance,
                                         lcm_w_to_imagen_scale, pcm_lower_edge, pcm_phase_edges, pcm_target,
                                         pcm_target_scalings, predicted_original_sample, sample_guidance_w,
                                         scalings_for_boundary_conditions)
from anytext2_lcm.samplers import NoiseSchedule, PCMSampler

import diffusers  # a core dependency: an import error must fail the tests, not skip them

GRID = [20 * i + 19 for i in range(50)]  # {19, 39, ..., 999}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config()


@pytest.fixture(scope="module")
def solver(schedule):
    return DDIMSolver(schedule)


@pytest.fixture(scope="module")
def lcm_scheduler():
    s = diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", original_inference_steps=50, set_alpha_to_one=False)
    s.set_timesteps(50)  # all 50 grid points, descending
    return s


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Solver vs diffusers' LCMScheduler
# ---------------------------------------------------------------------------------------------------------------


def test_solver_grid_matches_lcm_scheduler(solver, lcm_scheduler):
    assert solver.step_ratio == 20
    assert solver.ddim_timesteps.tolist() == GRID
    assert solver.ddim_timesteps.tolist() == lcm_scheduler.timesteps.flip(0).tolist()
    assert solver.ddim_timesteps_prev.tolist() == [0] + GRID[:-1]


def test_solver_alphas_match_lcm_scheduler(solver, lcm_scheduler):
    ac = lcm_scheduler.alphas_cumprod
    torch.testing.assert_close(solver.ddim_alphas, ac[GRID], rtol=2e-6, atol=1e-7)
    # ᾱ_prev: what LCMScheduler re-noises to from grid[i] (the next timestep of its 50-step list) and, for i = 0,
    # its final ᾱ with set_alpha_to_one=False, i.e. ᾱ[0], not 1.
    ref = torch.stack([lcm_scheduler.final_alpha_cumprod] + [ac[t] for t in GRID[:-1]])
    torch.testing.assert_close(solver.ddim_alphas_prev, ref, rtol=2e-6, atol=1e-7)
    assert solver.ddim_alphas_prev[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)


@pytest.mark.parametrize("t", [0, 1, 19, 259, 499, 759, 999])
def test_boundary_scalings_match_lcm_scheduler(lcm_scheduler, t):
    ref_skip, ref_out = lcm_scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    c_skip, c_out = scalings_for_boundary_conditions(t)
    assert c_skip == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-12)
    assert c_out == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)
    # tensor form, batched
    ts = torch.tensor([t, t])
    cs, co = scalings_for_boundary_conditions(ts)
    assert cs.shape == (2,) and cs.dtype == torch.float32
    assert cs[0].item() == pytest.approx(c_skip, rel=1e-6, abs=1e-12)
    assert co[1].item() == pytest.approx(c_out, rel=1e-6, abs=1e-12)


def test_boundary_scalings_hand():
    # t = 0: (1, 0); t = 19: s·t = 190, c_skip = 0.25 / (36100.25)
    assert scalings_for_boundary_conditions(0) == (1.0, 0.0)
    c_skip, c_out = scalings_for_boundary_conditions(19)
    assert c_skip == pytest.approx(0.25 / 36100.25)
    assert c_out == pytest.approx(190 / math.sqrt(36100.25))
    assert c_skip == pytest.approx(6.925e-6, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Pair sampling, x0 and the DDIM step
# ---------------------------------------------------------------------------------------------------------------


def test_sample_pairs(solver):
    pair = solver.sample_pairs(64, generator=torch.Generator().manual_seed(3))
    # the same draw as diffusers' script: torch.randint(0, 50, (B,))
    assert torch.equal(pair.index, torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(3)))
    for i, s, e in zip(pair.index.tolist(), pair.start.tolist(), pair.end.tolist()):
        assert s == 20 * i + 19
        assert e == max(s - 20, 0)
    big = solver.sample_pairs(20000, generator=torch.Generator().manual_seed(0))
    assert big.index.min() == 0 and big.index.max() == 49
    assert set(big.end[big.index == 0].tolist()) == {0}  # 19 - 20 clamps at 0


def test_predicted_original_sample_inverts_add_noise(schedule):
    x0, eps = _rand(3, 4, 8, 8, seed=1), _rand(3, 4, 8, 8, seed=2)
    t = torch.tensor([19, 499, 999])
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(predicted_original_sample(eps, x_t, t, schedule), x0, rtol=1e-4, atol=1e-4)
    # by hand for one element
    ac = schedule.alphas_cumprod.double()
    a = ac[499].item()
    xv, ev = x_t[1, 0, 0, 0].item(), eps[1, 0, 0, 0].item()
    got = predicted_original_sample(eps, x_t, t, schedule)[1, 0, 0, 0].item()
    assert got == pytest.approx((xv - math.sqrt(1 - a) * ev) / math.sqrt(a), rel=1e-5)
    # one int for the whole batch
    torch.testing.assert_close(predicted_original_sample(eps, x_t, 499, schedule)[1],
                               predicted_original_sample(eps, x_t, t, schedule)[1])


def test_ddim_step_hand(solver, schedule):
    ac = schedule.alphas_cumprod.double()
    x0 = torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1)
    eps = torch.tensor([0.25, 2.0]).reshape(2, 1, 1, 1)
    out = solver.ddim_step(x0, eps, torch.tensor([0, 10]))
    a0, a199 = ac[0].item(), ac[199].item()  # index 0 → ᾱ[0]; index 10 (t = 219) → ᾱ[199]
    assert out[0].item() == pytest.approx(math.sqrt(a0) * 0.5 + math.sqrt(1 - a0) * 0.25, rel=1e-6)
    assert out[1].item() == pytest.approx(-math.sqrt(a199) + math.sqrt(1 - a199) * 2.0, rel=1e-6)


def test_consistency_output(schedule):
    x, x0 = _rand(2, 4, 4, 4, seed=4), _rand(2, 4, 4, 4, seed=5)
    f = consistency_output(x, x0, torch.tensor([0, 999]))
    torch.testing.assert_close(f[0], x[0])  # boundary condition f(x, 0) = x
    c_skip, c_out = scalings_for_boundary_conditions(999)
    torch.testing.assert_close(f[1], c_skip * x[1] + c_out * x0[1])


# ---------------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------------


def test_lcm_guidance_hand():
    cond, uncond = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 1.0)
    assert torch.all(lcm_guidance(cond, uncond, 3.0) == 5.0)  # 2 + 3·(2 − 1)
    out = lcm_guidance(cond, uncond, torch.tensor([0.0, 6.5]))
    assert torch.all(out[0] == 2.0) and torch.all(out[1] == 8.5)
    # Imagen form uncond + s·(cond − uncond) with s = w + 1 is the same number
    s = lcm_w_to_imagen_scale(3.0)
    assert s == 4.0 and torch.all(uncond + s * (cond - uncond) == lcm_guidance(cond, uncond, 3.0))
    assert imagen_scale_to_lcm_w(7.5) == 6.5 and imagen_scale_to_lcm_w(9.0) == 8.0


def test_sample_guidance_w():
    w = sample_guidance_w(1000, 6.0, 8.0, generator=torch.Generator().manual_seed(0))
    assert w.shape == (1000,) and w.min() >= 6.0 and w.max() <= 8.0
    assert torch.all(sample_guidance_w(3, 7.0, 7.0) == 7.0)
    with pytest.raises(ValueError):
        sample_guidance_w(3, 8.0, 7.0)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def test_huber_hand():
    pred = torch.tensor([0.0, 1.0, -0.002]).reshape(1, 3, 1, 1)
    target = torch.zeros_like(pred)
    c = 0.001
    e = [0.0, math.sqrt(1 + c * c) - c, math.sqrt(0.002 ** 2 + c * c) - c]
    assert huber_loss(pred, target).item() == pytest.approx(sum(e) / 3, rel=1e-6)
    w = torch.tensor([1.0, 3.0, 2.0]).reshape(1, 3, 1, 1)
    assert huber_loss(pred, target, weight=w).item() == pytest.approx((e[0] + 3 * e[1] + 2 * e[2]) / 3, rel=1e-6)
    assert huber_loss(pred, target, reduction="none").shape == pred.shape
    # weight of ones = unweighted; a (B, 1, H, W) text mask broadcasts over channels
    p, t = _rand(2, 4, 8, 8, seed=1), _rand(2, 4, 8, 8, seed=2)
    assert huber_loss(p, t, weight=torch.ones(2, 1, 8, 8)).item() == pytest.approx(huber_loss(p, t).item())
    with pytest.raises(ValueError, match="broadcast"):
        huber_loss(p, t, weight=torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError):
        huber_loss(p, t, c=0.0)


def test_huber_limits():
    # |d| >> c: ≈ |d|; |d| << c: ≈ d²/2c
    d = torch.tensor([5.0])
    assert huber_loss(d, torch.zeros(1)).item() == pytest.approx(5.0 - 0.001 + 0.001 ** 2 / 10, rel=1e-6)
    d = torch.tensor([1e-5])
    assert huber_loss(d, torch.zeros(1)).item() == pytest.approx(1e-10 / 0.002, rel=1e-3)


def test_l2_hand():
    pred = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    target = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert l2_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert l2_loss(pred, target, weight=torch.tensor([2.0, 0.5]).reshape(1, 2, 1, 1)).item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------------------
# PCM phases
# ---------------------------------------------------------------------------------------------------------------


def test_pcm_edges_pinned():
    # official: floor(linspace(0, 50, M, endpoint=False))
    assert pcm_phase_edges(4, GRID, "official").tolist() == [0, 12, 25, 37]
    assert pcm_phase_edges(8, GRID, "official").tolist() == [0, 6, 12, 18, 25, 31, 37, 43]
    # inference: edges e with grid[e - 1] = the LCM M-step timesteps
    assert pcm_phase_edges(4, GRID).tolist() == [0, 13, 25, 38]  # grid[12, 24, 37] = 259, 499, 759
    assert pcm_phase_edges(8, GRID).tolist() == [0, 7, 13, 19, 25, 32, 38, 44]
    for conv in ("inference", "official"):
        assert pcm_phase_edges(1, GRID, conv).tolist() == [0]
        assert pcm_phase_edges(2, GRID, conv).tolist() == [0, 25]
    with pytest.raises(ValueError):
        pcm_phase_edges(0, GRID)
    with pytest.raises(ValueError, match="convention"):
        pcm_phase_edges(4, GRID, "trailing")


@pytest.mark.parametrize("convention", ["inference", "official"])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_pcm_lower_edge_and_target_scalings(convention, m):
    edges = pcm_phase_edges(m, GRID, convention)
    index = torch.arange(50)
    lower = pcm_lower_edge(index, edges)
    # the official rule, written out: the last edge not above i
    assert lower.tolist() == [max(e for e in edges.tolist() if e <= i) for i in range(50)]
    c_skip, c_out = pcm_target_scalings(index, edges)
    assert c_skip.tolist() == [1.0 if i in edges.tolist() else 0.0 for i in range(50)]
    assert torch.all(c_skip + c_out == 1)


def test_pcm_lower_edge_official_4_hand():
    lower = pcm_lower_edge(torch.tensor([0, 11, 12, 24, 25, 36, 37, 49]), pcm_phase_edges(4, GRID, "official"))
    assert lower.tolist() == [0, 0, 12, 12, 25, 25, 37, 37]


def test_pcm_phase_jump_hand(solver, schedule):
    ac = schedule.alphas_cumprod.double()
    edges = pcm_phase_edges(4, GRID, "official")
    x0 = torch.tensor([0.3, 0.3, 0.3]).reshape(3, 1, 1, 1)
    eps = torch.tensor([-0.5, -0.5, -0.5]).reshape(3, 1, 1, 1)
    out, edge_t = solver.phase_jump(x0, eps, torch.tensor([49, 30, 5]), edges)
    assert edge_t.tolist() == [739, 499, 0]
    for k, t in enumerate([739, 499, 0]):
        a = ac[t].item()  # edge 0 → ᾱ[0]
        assert out[k].item() == pytest.approx(math.sqrt(a) * 0.3 - math.sqrt(1 - a) * 0.5, rel=1e-6)


def test_pcm_target_rule(solver, schedule):
    """Index on an edge: target = x_prev, and the no-grad student's jump from x_prev would land on x_prev anyway
    (a DDIM jump to its own ᾱ); otherwise target = the jump."""
    edges = pcm_phase_edges(4, GRID)
    index = torch.tensor([38, 40])  # 38 is an edge (grid[37] = 759 ← 779), 40 is not
    x_prev, jump = _rand(2, 4, 4, 4, seed=1), _rand(2, 4, 4, 4, seed=2)
    tgt = pcm_target(x_prev, jump, index, edges)
    torch.testing.assert_close(tgt[0], x_prev[0])
    torch.testing.assert_close(tgt[1], jump[1])
    # consistency of the c_skip = 1 rule: jump from x_prev at t_n to the edge of index 38 is x_prev
    eps = _rand(1, 4, 4, 4, seed=3)
    t_n = solver.ddim_timesteps_prev[38:39]
    x0 = predicted_original_sample(eps, x_prev[:1], t_n, schedule)
    back, edge_t = solver.phase_jump(x0, eps, index[:1], edges)
    assert edge_t.tolist() == t_n.tolist() == [759]
    torch.testing.assert_close(back, x_prev[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("convention", ["inference", "official"])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_pcm_training_edges_are_sampler_timesteps(solver, schedule, convention, m):
    """A student trained with M phases is sampled at exactly its phase edges, and the training jump from the top
    of the grid equals the sampler's first step."""
    edges = pcm_phase_edges(m, GRID, convention)
    edge_ts = sorted(solver.ddim_timesteps_prev[edges[1:]].tolist(), reverse=True)
    sampler = PCMSampler(schedule, num_phases=m, convention=convention)
    ts = sampler.timesteps(m)
    assert ts == [999] + edge_ts
    x, eps = _rand(1, 4, 4, 4, seed=6), _rand(1, 4, 4, 4, seed=7)
    x0 = predicted_original_sample(eps, x, torch.tensor([999]), schedule)
    jump, _ = solver.phase_jump(x0, eps, torch.tensor([49]), edges)
    step = sampler.step(eps, 999, ts[1] if m > 1 else None, x)
    torch.testing.assert_close(jump, step.prev_sample, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The leading grid (distill.timestep_spacing: the teacher's own DDIM timesteps)
# ---------------------------------------------------------------------------------------------------------------


def test_leading_solver_steps_along_the_teachers_ddim(schedule):
    """On the 20-point leading grid the teacher's solver steps are the steps of its own 20-step DDIM: the pairs are
    (t, t − 50) on {1, 51, …, 951}, the lowest pair lands on ᾱ[0], and a step from grid[i] equals diffusers'
    DDIMScheduler (leading spacing, steps_offset 1, η = 0) from the same timestep."""
    solver = DDIMSolver(schedule, 20, "leading")
    assert solver.ddim_timesteps.tolist() == list(range(1, 1000, 50))
    pair = solver.sample_pairs(256, generator=torch.Generator().manual_seed(0))
    for i, s, e in zip(pair.index.tolist(), pair.start.tolist(), pair.end.tolist()):
        assert s == 50 * i + 1 and e == max(s - 50, 0)
        assert e == solver.ddim_timesteps_prev[i]  # x_prev lands where the pair ends
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                                  set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(20)
    x, eps = _rand(1, 4, 4, 4, seed=8), _rand(1, 4, 4, 4, seed=9)
    for i in (19, 10, 0):
        t = int(solver.ddim_timesteps[i])
        x0 = predicted_original_sample(eps, x, torch.tensor([t]), schedule)
        ours = solver.ddim_step(x0, eps, torch.tensor([i]))
        theirs = ref.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_leading_training_edges_are_sampler_timesteps(schedule, m):
    """A student of the leading grid is sampled at its phase edges, and its training jump from the top of the grid
    (951) is the sampler's first step."""
    solver = DDIMSolver(schedule, 20, "leading")
    edges = pcm_phase_edges(m, 20)
    sampler = PCMSampler(schedule, num_phases=m, original_steps=20, timestep_spacing="leading")
    ts = sampler.timesteps(m)
    assert ts == [951] + sorted(solver.ddim_timesteps_prev[edges[1:]].tolist(), reverse=True)
    x, eps = _rand(1, 4, 4, 4, seed=6), _rand(1, 4, 4, 4, seed=7)
    x0 = predicted_original_sample(eps, x, torch.tensor([951]), schedule)
    jump, _ = solver.phase_jump(x0, eps, torch.tensor([19]), edges)
    torch.testing.assert_close(jump, sampler.step(eps, 951, ts[1] if m > 1 else None, x).prev_sample,
                               rtol=1e-5, atol=1e-5)
