"""The speed settings: CPU bf16 detection, what ``--fast`` selects, and ``bench --goal`` (the student with each
option against the teacher run the original's way, interleaved, with drift and the goal check)."""

from __future__ import annotations

import argparse

import pytest
import torch

from anytext2_lcm import factory
from anytext2_lcm.cli import main
from anytext2_lcm.config import ConfigError, tiny
from anytext2_lcm.evaluate import runtime
from anytext2_lcm.evaluate.bench import Variant
from anytext2_lcm.evaluate.goal import GoalConfig, Setting, converted_copy, format_goal, run_goal, summarise
from anytext2_lcm.evaluate.runtime import RuntimeOptions
from anytext2_lcm.light_decoder import FILE_NAME, build_light_decoder, light_decoder_config, save_light_decoder

from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

AMD = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
OLD = "flags\t\t: fpu sse2 avx2 avx512f\n"


def test_cpu_bf16_flags_are_read_from_cpuinfo():
    assert factory.cpu_bf16_flags(AMD) == ("avx512_bf16",)
    assert factory.cpu_bf16_flags(SPR) == ("amx_bf16",)
    assert factory.cpu_bf16_flags(OLD) == ()
    assert factory.cpu_bf16_flags("Features\t: fp asimd bf16\n") == ()  # ARM's bf16 is not one of the x86 flags
    # this machine: torch's cpuinfo and /proc/cpuinfo agree
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this OS")
    assert factory.cpu_bf16_flags() == factory.cpu_bf16_flags(text)


@pytest.mark.parametrize("flags,device,want", [(("avx512_bf16",), "cpu", "bf16"), ((), "cpu", "fp32"),
                                               ((), "cuda", "fp16")])
def test_fast_picks_the_precision_the_device_computes_natively(monkeypatch, flags, device, want):
    monkeypatch.setattr(factory, "cpu_bf16_flags", lambda cpuinfo=None: flags)
    assert runtime.fast_dtype(torch.device(device)) == want
    tokens = runtime.fast_tokens(torch.device(device))
    assert "tiny_decoder" in tokens and (want in tokens) == (want != "fp32")


def _args(**kw) -> argparse.Namespace:
    base = dict(fast=True, dtype="auto", model="tiny", tiny_decoder=None, channels_last=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_fast_takes_the_light_decoder_inside_the_model_folder(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(factory, "cpu_bf16_flags", lambda cpuinfo=None: ("avx512_bf16",))
    folder = tmp_path / "model"
    conf = light_decoder_config(tiny())
    save_light_decoder(folder / FILE_NAME, build_light_decoder(conf), conf, {})
    a = _args(model=str(folder))
    runtime.resolve_runtime_args(a, torch.device("cpu"))
    assert a.dtype == "bf16" and a.tiny_decoder == str(folder / FILE_NAME)
    # an explicit precision and decoder win; without a decoder the full VAE stays, with a warning
    b = _args(model=str(folder), dtype="fp32", tiny_decoder="random")
    runtime.resolve_runtime_args(b, torch.device("cpu"))
    assert b.dtype == "fp32" and b.tiny_decoder == "random"
    c = _args(model="tiny")
    runtime.resolve_runtime_args(c, torch.device("cpu"))
    assert c.tiny_decoder is None and "no light decoder" in caplog.text
    d = _args(fast=False)
    runtime.resolve_runtime_args(d, torch.device("cpu"))
    assert d.dtype == "auto" and d.tiny_decoder is None


def _setting(name: str, times: dict[str, float], runtime_opts=None, dtype="fp32") -> Setting:
    s = Setting(name, Variant(name, runtime_opts or RuntimeOptions(), dtype), [])
    for lab, t in times.items():
        s.times[lab], s.cpu[lab] = [t], [t * 2]
        s.latents[lab] = torch.ones(1, 4, 2, 2) * (1.1 if name == "bf16" else 1.0)
        s.images[lab] = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    return s


def test_goal_ratios_and_checks_by_hand():
    cfg = GoalConfig(model="tiny", sizes=(256,), options=("bf16",), like_for_like=("bf16",))
    settings = [_setting("reference teacher", {"teacher@20": 40.0}, RuntimeOptions(separate_cfg=True)),
                _setting("base", {"student@1": 4.0, "student@2": 5.0, "student@4": 8.0}),
                _setting("bf16", {"student@1": 1.0, "student@2": 1.5, "student@4": 2.0, "teacher@20": 12.0},
                         dtype="bf16")]
    doc = summarise(settings, cfg, 256)
    base, bf = doc["settings"]
    assert doc["reference_teacher"]["seconds"] == 40.0 and doc["reference_teacher"]["runtime"] == "separate_cfg"
    assert base["vs_reference"] == {"student@1": 10.0, "student@2": 8.0, "student@4": 5.0}
    assert base["goal"] == {"min": 16.0, "measured": 5.0, "measured_cpu_time": 5.0, "pass": False,
                            "pass_cpu_time": False}
    assert bf["vs_reference"]["student@4"] == 20.0 and bf["goal"]["pass"]
    assert bf["vs_reference_cpu_time"]["student@4"] == 20.0  # CPU times are 2x both sides
    assert bf["vs_like_for_like"]["student@4"] == 6.0 and "vs_like_for_like" not in base
    assert bf["cpu_seconds"]["student@4"] == 4.0 and bf["vs_like_for_like_cpu_time"]["student@4"] == 6.0
    # latents 1.1 vs 1.0: relative MSE 0.01; identical images: infinite PSNR
    assert bf["drift"]["student@4"]["latent_rel_mse"] == pytest.approx(0.01)
    assert bf["drift"]["student@4"]["image_psnr_db"] == float("inf")


def test_goal_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="bench.sizes"):
        GoalConfig(sizes=(100,))
    with pytest.raises(ConfigError, match="bench.student_steps"):
        GoalConfig(student_steps=(1, 2))
    with pytest.raises(ConfigError, match="bench.like_for_like"):
        GoalConfig(options=("bf16",), like_for_like=("fast",))
    with pytest.raises(ConfigError, match="unknown token"):
        GoalConfig(options=("bf17",))


def test_converted_copy_leaves_the_original_alone():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    c = converted_copy(m, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in c.parameters())
    assert c[1].num_batches_tracked.dtype == torch.long
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    torch.testing.assert_close(c[0].weight.float(), m[0].weight, rtol=1e-2, atol=1e-2)


def test_goal_run_on_the_tiny_model(capsys):
    from anytext2_lcm.factory import build_model

    cfg = GoalConfig(model="tiny", sizes=(64,), options=("tiny_decoder", "bf16", "fast"), like_for_like=("fast",),
                     student_steps=(1, 4))
    doc = run_goal(cfg, model=build_model("tiny", init="default"))
    (size,) = doc["sizes"]
    rows = {r["setting"]: r for r in size["settings"]}
    assert list(rows) == ["base", "tiny_decoder", "bf16", "fast"]
    ref = size["reference_teacher"]["seconds"]
    for r in rows.values():
        for lab, s in r["seconds"].items():
            if lab.startswith("student"):
                assert r["vs_reference"][lab] == pytest.approx(ref / s)
        assert r["goal"] is None  # no goal at 64 px
    assert rows["tiny_decoder"]["drift"]["student@4"]["latent_rel_mse"] == 0.0  # the decoder alone changed
    assert 0 < rows["bf16"]["drift"]["student@4"]["latent_rel_mse"] < 1e-2
    assert "vs_like_for_like" in rows["fast"] and "vs_like_for_like" not in rows["bf16"]
    text = format_goal(doc)
    assert "reference teacher teacher@20" in text and "| fast (" in text
    assert main(["bench", "--goal", "--model", "tiny", "--sizes", "64", "--repeats", "1", "--options", "bf16",
                 "--like-for-like", "bf16"]) == 0
    assert "| bf16 (bf16) |" in capsys.readouterr().out
