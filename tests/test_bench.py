"""``anytext2-lcm bench`` on the tiny preset, and the runtime options it measures (offload, channels_last, VAE
precision, the tiny decoder, variants that must leave the model as they found it)."""

import numpy as np
import pytest
import torch

from anytext2_lcm.cli import main
from anytext2_lcm.evaluate.bench import (COMPONENT_LABELS, BenchConfig, _variant_applied, format_report,
                                         goal_checks, parse_variant, predicted_seconds, run_bench)
from anytext2_lcm.evaluate.metrics import psnr
from anytext2_lcm.evaluate.runtime import RuntimeOptions, apply_runtime_options
from anytext2_lcm.generation import GenerationRequest, Generator
from model_helpers import trained_like_tiny


@pytest.fixture(scope="module")
def model():
    return trained_like_tiny()


def req(**kw):
    base = dict(prompt='a sign that says "Hi"', positions=[[8, 8, 56, 30]], height=64, width=64, steps=2, seed=3)
    base.update(kw)
    return GenerationRequest(**base)


def test_bench_cli_prints_runs_ratios_components_and_goals(capsys):
    assert main(["bench", "--model", "tiny", "--size", "64", "--repeats", "1", "--student-steps", "2,4"]) == 0
    out = capsys.readouterr().out
    for label in ("teacher@20", "teacher@50", "student@2", "student@4"):
        assert f"\n{label}" in out
    assert "vs teacher@20" in out and "vs teacher@50" in out
    for text in COMPONENT_LABELS.values():
        assert text in out
    assert "student 4-step vs teacher 20-step" in out and "student 2-step vs teacher 20-step" in out
    assert "eval-count ratio 10x" in out and "eval-count ratio 25x" in out and "eval-count ratio 20x" in out
    assert "peak memory: peak_rss_gib" in out


def test_bench_document_is_consistent(model):
    cfg = BenchConfig(model="tiny", size=64, teacher_steps=(2,), student_steps=(1,), repeats=1,
                      variants=("lora_merged",))
    doc = run_bench(cfg, model=model, log_fn=lambda s: None)
    base, merged = doc["variants"]
    for v in (base, merged):
        comp = v["components"]
        assert set(comp) == set(COMPONENT_LABELS) and all(t > 0 for t in comp.values())
        for lab, r in v["runs"].items():
            ph = r["phases"]
            # the generator's phases add up to its total; the total is what was timed (plus call overhead)
            assert ph["prepare"] + ph["conditioning"] + ph["denoise"] + ph["decode"] == pytest.approx(ph["total"])
            assert ph["total"] <= r["median"] + 1e-6
            # the component model is fixed costs + steps × one pass, on the run's branch count
            b = "2" if r["kind"] == "teacher" else "1"
            fixed = comp["render"] + comp["ocr_embed"] + comp[f"clip_{b}"] + comp[f"writenet_{b}"] + comp["decode"]
            assert predicted_seconds(comp, r["kind"], r["steps"]) == pytest.approx(fixed + r["steps"] * comp[
                f"unet_{b}"])
        assert v["runs"]["teacher@2"]["unet_evals"] == 4 and v["runs"]["student@1"]["unet_evals"] == 1
    # a zero-initialised merged LoRA costs nothing and changes nothing
    assert all(p == float("inf") for p in merged["psnr_vs_base"].values())
    assert goal_checks(base) == []  # no 20/50-step teacher measured
    text = format_report(doc)
    assert "== variant: lora_merged" in text and "PSNR vs base" in text


def test_variants_leave_the_model_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = parse_variant("channels_last+vae_bf16+lora_merged")
    assert v.runtime.channels_last and v.runtime.vae_dtype == "bf16" and v.lora == "merged"
    with _variant_applied(model, v):
        view, gen = apply_runtime_options(model, v.runtime)
        gen(req(steps=1))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.vae.modules())
    assert model.unet.out[2].weight.is_contiguous()
    with pytest.raises(Exception, match="unknown token"):
        parse_variant("fast")


def test_runtime_options_outputs(model):
    base = Generator(model)(req())
    # channels_last: the same math in another memory layout
    with _variant_applied(model, parse_variant("channels_last")):
        _, gen = apply_runtime_options(model, RuntimeOptions(channels_last=True))
        cl = gen(req())
    assert np.abs(cl.images[0].astype(int) - base.images[0].astype(int)).max() <= 2
    # the VAE in bf16: close, not equal; the UNet latents are untouched
    with _variant_applied(model, parse_variant("vae_bf16")):
        _, gen = apply_runtime_options(model, RuntimeOptions(vae_dtype="bf16"))
        vb = gen(req())
    a = torch.from_numpy(vb.images[0]).permute(2, 0, 1)[None] / 255.0
    b = torch.from_numpy(base.images[0]).permute(2, 0, 1)[None] / 255.0
    assert 25.0 < float(psnr(a, b)[0]) < float("inf")
    assert vb.latents.dtype == torch.float32
    # a lighter decoder: a different network with the same output contract
    _, gen = apply_runtime_options(model, RuntimeOptions(tiny_decoder="random"))
    td = gen(req())
    assert td.images[0].shape == (64, 64, 3) and torch.equal(td.latents, base.latents)


def test_offload_moves_components_in_pipeline_order(model):
    view, gen = apply_runtime_options(model, RuntimeOptions(offload=True), device=torch.device("cpu"))
    res = gen(req(steps=2, cfg_scale=7.5))
    seq = [c for i, c in enumerate(view.trace) if i == 0 or view.trace[i - 1] != c]
    assert seq == ["vae", "ocr", "clip", "writenet", "unet", "vae"]
    assert view.active == "vae"
    assert np.array_equal(res.images[0], Generator(model)(req(steps=2, cfg_scale=7.5)).images[0])
