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

from distill_helpers import base_config, make_config, metrics, tiny_dataset, write_yaml
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
