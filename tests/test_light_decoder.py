"""The light decoder: its shape per model, ``train-decoder`` (the trainer's ``decoder`` method), the file it writes
and ``--tiny-decoder FILE`` loading it in generate, with the errors a wrong file gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anytext2_lcm.cli import main
from anytext2_lcm.config import ConfigError
from anytext2_lcm import config as model_configs
from anytext2_lcm.config import tiny
from anytext2_lcm.distill.decoder import decoder_targets
from anytext2_lcm.distill.state import sample_generators
from anytext2_lcm.light_decoder import (FILE_NAME, LightDecoderError, build_light_decoder, decoder_cost,
                                        light_decoder_config, load_light_decoder, save_light_decoder,
                                        upsampling_factor)

from distill_helpers import base_config, make_config, metrics, perturb_lora_b, tiny_dataset, write_yaml
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def decoder_config(data: Path, out: Path, **train) -> dict:
    cfg = base_config(data, out)
    del cfg["lora"]
    cfg.update(method="decoder", decoder_training={"crop": 32, "report_samples": 4, "cost_repeats": 1})
    cfg["optim"]["learning_rate"] = 1e-3
    cfg["train"].update(max_steps=30, batch_size=2, **train)
    return cfg


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """train-decoder on the tiny model (30 steps, 32 px crops) through the command line."""
    out = tmp_path_factory.mktemp("decoder")
    yaml_path = write_yaml(decoder_config(data, out / "run"), out / "decoder.yaml")
    assert main(["train-decoder", "--config", str(yaml_path), "checkpoint.every_n_steps=10"]) == 0
    return out / "run"


@pytest.mark.parametrize("cfg", [tiny(), model_configs.testbed()], ids=["tiny_x8", "testbed_x4"])
def test_the_decoder_is_sized_from_the_model_config(cfg):
    conf = light_decoder_config(cfg)
    assert upsampling_factor(conf) == cfg.latent_factor == cfg.vae.downsample_factor
    tiny_dec = build_light_decoder(conf)
    z = torch.randn(1, cfg.vae.z_channels, 8, 8)
    with torch.no_grad():
        assert tiny_dec.decode(z).sample.shape == (1, 3, 8 * cfg.latent_factor, 8 * cfg.latent_factor)


def test_targets_are_the_full_decoder_of_each_samples_own_posterior_draw():
    from anytext2_lcm.factory import build_model

    model = build_model("tiny", init="default").eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents, target = decoder_targets(model, images, sample_generators(0, 0, [3, 5]))
    # by hand: the posterior sample from each sample's generator, then the VAE decoder
    gens = sample_generators(0, 0, [3, 5])
    with torch.no_grad():
        mean, logvar = model.vae.encode(images)
        z = torch.stack([mean[i] + torch.exp(0.5 * logvar[i]) * torch.randn(mean.shape[1:], generator=g)
                         for i, g in enumerate(gens)])
        torch.testing.assert_close(latents, model.scale_factor * z)
        torch.testing.assert_close(target, model.vae.decode(z))
        # the full decoder of the scaled latent (what generation decodes) is that same target
        torch.testing.assert_close(model.decode(latents), target, rtol=1e-4, atol=1e-5)


def test_train_decoder_learns_and_writes_a_file_generate_loads(trained, tmp_path, capsys):
    losses = [m["loss"] for m in metrics(trained)]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    f = trained / FILE_NAME
    state = load_file(str(f))
    assert state and all(k.startswith("decoder.") for k in state)
    # the checkpoints hold the decoder as the only trainable part
    ckpt = sorted((trained / "checkpoints").glob("checkpoint-*"))[-1]
    assert all(k.startswith("light_decoder.decoder.") for k in load_file(str(ckpt / "trainable.safetensors")))
    report = json.loads((trained / "light_decoder.json").read_text())
    assert report["cost"]["params"]["light"] == sum(v.numel() for v in state.values())
    assert report["cost"]["seconds"]["light"] > 0 and report["fidelity"]["images"] == 4
    # generate with --tiny-decoder FILE decodes the sampler's latents with exactly that decoder
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "tiny", "--prompt", 'a sign that says "Hi"', "--boxes",
                 str(_boxes(tmp_path)), "--steps", "2", "--tiny-decoder", str(f), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["decoder"] == str(f)
    from PIL import Image

    from anytext2_lcm.factory import build_model
    from anytext2_lcm.generation import GenerationRequest, Generator

    res = Generator(build_model("tiny").eval())(GenerationRequest(
        prompt='a sign that says "Hi"', positions=[[8, 8, 56, 30]], steps=2, sampler="ddim", cfg_scale=7.5))
    dec = load_light_decoder(f, tiny()).eval()
    with torch.no_grad():
        x = dec.decode(res.latents).sample
    mine = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)[0].numpy()
    assert np.abs(np.asarray(Image.open(out)).astype(int) - mine.astype(int)).max() <= 1


def _boxes(tmp: Path) -> Path:
    p = tmp / "boxes.json"
    p.write_text(json.dumps([[8, 8, 56, 30]]))
    return p


def test_a_decoder_for_another_latent_space_is_refused_with_one_line(tmp_path, capsys):
    conf = light_decoder_config(model_configs.testbed())
    f = save_light_decoder(tmp_path / "testbed.safetensors", build_light_decoder(conf), conf, {})
    with pytest.raises(LightDecoderError, match="latent factor of 8"):
        load_light_decoder(f, tiny())
    args = ["generate", "--model", "tiny", "--prompt", 'a "Hi"', "--boxes", str(_boxes(tmp_path)), "--out",
            str(tmp_path / "y.png")]
    assert main(args + ["--tiny-decoder", str(f)]) == 2
    err = capsys.readouterr().err
    assert "latent factor" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # a missing file and a file that is not safetensors: refused before any model is built
    assert main(args + ["--tiny-decoder", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert main(args + ["--tiny-decoder", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_decoder_config_errors_name_the_field(data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^decoder_training.channels=4"):
        make_config(data, tmp_path, "method=decoder", "decoder_training.channels=4")
    with pytest.raises(ConfigError, match=r"^validation.every_n_steps=5"):
        make_config(data, tmp_path, "method=decoder", "validation.every_n_steps=5")
    yaml_path = write_yaml(decoder_config(data, tmp_path / "run"), tmp_path / "d.yaml")
    assert main(["distill", "--config", str(yaml_path)]) == 2
    assert "train-decoder" in capsys.readouterr().err
    lcm = write_yaml(base_config(data, tmp_path / "run2"), tmp_path / "l.yaml")
    assert main(["train-decoder", "--config", str(lcm)]) == 2
    assert "this command trains 'decoder'" in capsys.readouterr().err


def test_decoder_cost_counts_both_decoders():
    from anytext2_lcm.factory import build_model

    model = build_model("tiny").eval()
    dec = build_light_decoder(light_decoder_config(model.cfg, channels=16))
    cost = decoder_cost(model, dec, size=64, repeats=1)
    full = [model.vae.model.post_quant_conv, model.vae.model.decoder]
    assert cost["params"] == {"full": sum(p.numel() for m in full for p in m.parameters()),
                              "light": sum(p.numel() for p in dec.parameters())}
    # the first conv of the light decoder alone: 4 -> 16 channels, 3x3, on an 8x8 latent
    assert cost["macs"]["light"] > 4 * 16 * 9 * 8 * 8
    assert cost["seconds"]["full"] > 0 and cost["seconds"]["light"] > 0


def test_the_sd15_recipe_parses():
    from anytext2_lcm.distill.config import load_config

    from distill_helpers import REPO

    cfg = load_config(REPO / "configs" / "decoder_sd15.yaml", check_files=False, method="decoder")
    assert cfg.method == "decoder" and cfg.model.preset == "sd15" and cfg.decoder_training.crop == 256


# ---- generated latents (decoder_training.generated) --------------------------------------------------------------


def test_crops_of_a_latent_keep_its_pixel_mask_aligned():
    from anytext2_lcm.distill.autoencoder import random_crops

    f = 4
    # latent pixel (y, x) holds 100·y + x in every channel; the mask is 1 where the latent value is odd, upsampled
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    code = (100 * ys + xs).float()
    z = code.expand(3, 2, 8, 8).clone()
    odd = (code.long() % 2).float()
    mask = odd.repeat_interleave(f, 0).repeat_interleave(f, 1).expand(3, 1, 32, 32).clone()
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    zc, mc = random_crops(z, mask, gens, 5, 1, scale=f)
    assert zc.shape == (3, 2, 5, 5) and mc.shape == (3, 1, 20, 20)
    for i in range(3):
        c = zc[i, 0]
        # a contiguous window of the code grid (rows step by 100, columns by ±1 with a flip)
        assert torch.all(torch.diff(c, dim=0) == 100) and torch.all(torch.diff(c, dim=1).abs() == 1)
        # its mask is the nearest upsampling of the window's own odd/even pattern
        want = (c.long() % 2).float().repeat_interleave(f, 0).repeat_interleave(f, 1)
        torch.testing.assert_close(mc[i, 0], want)
    # whole latents (side >= the latent side): flips only
    zw, mw = random_crops(z, mask, [torch.Generator().manual_seed(0)] * 3, 8, 1, scale=f)
    assert zw.shape == z.shape and mw.shape == mask.shape


def _student_adapter(path: Path) -> Path:
    from anytext2_lcm import lora as L
    from anytext2_lcm.defaults import student_sampling
    from anytext2_lcm.factory import build_model

    m = build_model("tiny")  # only the adapter's shapes matter: it is loaded into the run's own model
    L.apply_lora(m, L.LoraSpec(rank=2, alpha=2))
    perturb_lora_b(m, seed=3)
    meta = {"method": "lcm", "sampling": json.dumps(student_sampling("lcm", original_steps=20).to_dict())}
    return L.save_lora(m, path, metadata=meta)


def test_train_decoder_on_generated_latents(data, tmp_path):
    """generated: 3 latents sampled by the teacher and the student in turn (row i, seed + i), kept in a file that a
    second run reuses; with generated_fraction 1 every training latent is a crop of one of them, and its target is
    the full decoder's image of that crop."""
    from anytext2_lcm import lora as L
    from anytext2_lcm.distill.components import build_teacher
    from anytext2_lcm.distill.config import load_config
    from anytext2_lcm.distill.decoder import DecoderMethod
    from anytext2_lcm.distill.data import build_loader
    from anytext2_lcm.evaluate.runner import EvalConfig, load_eval_samples, text_prompt_for
    from anytext2_lcm.generation import GenerationRequest, Generator

    adapter = _student_adapter(tmp_path / "student")
    d = decoder_config(data, tmp_path / "run")
    d["decoder_training"].update(generated=3, generated_by=["teacher", "student@2"], generated_lora=str(adapter),
                                 generated_fraction=1.0)
    cfg = load_config(None, base=d)
    model = build_teacher(cfg.model)
    method = DecoderMethod(cfg)
    method.configure_model(model)
    loader = build_loader(cfg)
    loader.set_epoch(0)
    tb = method.prepare(model, next(iter(loader)), cfg.train.seed, 0, "cpu")
    bank_file = tmp_path / "run" / "generated_latents.safetensors"
    bank = load_file(str(bank_file))
    assert bank["latents"].shape == (3, 4, 8, 8) and bank["mask"].shape == (3, 1, 64, 64)
    assert not L.lora_layers(model)  # the student adapter was removed after sampling
    # and the run goes on training the light decoder: its parameters still learn, the rest stays frozen
    assert model.light_decoder.training and all(p.requires_grad for p in model.light_decoder.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("light_decoder."))
    method.step(method.network(model), model, tb).loss.backward()
    assert all(p.grad is not None for p in model.light_decoder.parameters())

    # by hand: row i of the data, seed + i, the teacher (DDIM 20 + CFG) for i = 0, 2 and the student (2 steps) for 1
    samples, _ = load_eval_samples(EvalConfig(data=tuple(cfg.data.json_paths), size=64, reference=False))
    ref = build_teacher(cfg.model).eval()
    L.load_lora(ref, adapter)

    def request(i, **kw):
        s = samples[i]
        return GenerationRequest(prompt=s.caption, text_prompt=text_prompt_for(s.lines),
                                 positions=[ln.polygon for ln in s.lines], colors=[ln.color for ln in s.lines],
                                 height=64, width=64, seed=cfg.train.seed + i, **kw)

    with L.disable_adapters(ref):
        teacher0 = Generator(ref)(request(0)).latents
    student1 = Generator(ref)(request(1, steps=2, sampler="lcm", cfg_scale=1.0)).latents
    torch.testing.assert_close(bank["latents"][0], teacher0[0].float())
    torch.testing.assert_close(bank["latents"][1], student1[0].float())
    assert bank["mask"][0].sum() > 0

    # every training latent is a window of a bank latent (a 32 px crop: 32 / latent factor on a side), maybe flipped
    side = 32 // model.cfg.latent_factor
    assert tb.latents.shape[-1] == side
    for i in range(tb.batch_size):
        windows = [bank["latents"][j][:, y:y + side, x:x + side].flip(-1) if flip else
                   bank["latents"][j][:, y:y + side, x:x + side]
                   for j in range(3) for y in range(8 - side + 1) for x in range(8 - side + 1) for flip in (0, 1)]
        assert any(torch.equal(tb.latents[i], w) for w in windows)
        with torch.no_grad():
            torch.testing.assert_close(tb.target[i], model.vae.decode(tb.latents[i:i + 1] / model.scale_factor)[0])

    # a second run with the same settings reads the file instead of sampling
    stamp = bank_file.stat().st_mtime_ns
    method2 = DecoderMethod(cfg)
    method2.configure_model(model)
    assert torch.equal(method2.bank(model, "cpu")["latents"], bank["latents"])
    assert bank_file.stat().st_mtime_ns == stamp
    # the written file records how it was trained
    from anytext2_lcm.light_decoder import read_light_decoder

    method.save_results(model, tmp_path / "out")
    info = read_light_decoder(tmp_path / "out" / FILE_NAME)[2]
    assert (info["generated"], info["generated_by"], info["generated_fraction"]) == (3, ["teacher", "student@2"], 1.0)


def test_generated_latent_settings_are_checked(data, tmp_path):
    with pytest.raises(ConfigError, match=r"^decoder_training.generated_by=\['student@2'\]: the student entries "
                                          r"need decoder_training.generated_lora"):
        make_config(data, tmp_path, "method=decoder", "decoder_training.generated=4",
                    "decoder_training.generated_by=[student@2]")
    with pytest.raises(ConfigError, match=r"^decoder_training.generated_by=\['student@0'\]"):
        make_config(data, tmp_path, "method=decoder", "decoder_training.generated_by=[student@0]")
    with pytest.raises(ConfigError, match=r"^decoder_training.generated_fraction=1.5"):
        make_config(data, tmp_path, "method=decoder", "decoder_training.generated_fraction=1.5")
    with pytest.raises(ConfigError, match=r"^decoder_training.generated_lora=.*adapter not found"):
        make_config(data, tmp_path, "method=decoder", "decoder_training.generated=4",
                    "decoder_training.generated_by=[student@2]", f"decoder_training.generated_lora={tmp_path}/no")


def test_the_benchmark_trains_on_the_shipped_stages_data(tmp_path):
    """benchmarks/light_decoder.py learns from the dataset of the recipe's last stage (the shipped model's glyph
    sizes) unless told otherwise, and an unknown dataset name is refused with the flag's name."""
    import importlib.util
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("light_decoder_bench", repo / "benchmarks" / "light_decoder.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    recipe = yaml.safe_load((repo / "configs" / "testbed.yaml").read_text())
    last = list(recipe["stages"].values())[-1]["data"]
    assert last != "train"  # the shipped stage is fine-tuned on another set than the first teacher's

    got = bench.make_data(repo / "configs" / "testbed.yaml", tmp_path / "a", 3, 2)
    first = bench.make_data(repo / "configs" / "testbed.yaml", tmp_path / "b", 3, 2, "train")
    want = recipe["datasets"][last]
    assert got["train"].parent.name != first["train"].parent.name  # other data, another cache folder
    assert got["heldout"].parent.name == first["heldout"].parent.name  # the held-out set does not move
    # the images are the named set's: its seed and glyph sizes reproduce them
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

    fields = {k: v for k, v in want.items() if k in SynthConfig.__dataclass_fields__}
    ref = write_dataset(SynthConfig(**{**fields, "num": 3}), tmp_path / "ref")[0]
    assert json.loads(ref.read_text())["data_list"] == json.loads(got["train"].read_text())["data_list"]
    assert json.loads(ref.read_text())["data_list"] != json.loads(first["train"].read_text())["data_list"]
    with pytest.raises(ValueError, match=r"^--train-set 'nope': not a dataset of"):
        bench.make_data(repo / "configs" / "testbed.yaml", tmp_path / "c", 3, 2, "nope")
