"""Linear/Conv2d inventory, roles and LoRA target presets: the real architecture (sd15, on the meta device) against
the measured manifest, the seed's categories (DESIGN.md §3 trap 12), and the targets file PEFT consumes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from anytext2_lcm import lora as L
from anytext2_lcm.cli import main
from anytext2_lcm.config import ConfigError, sd15, tiny
from anytext2_lcm.models.anytext2 import AnyText2
from conftest import reference_dir

# Network names of the manifest → ours.
NET = {"unet": "unet", "controlnet": "writenet", "first_stage_model": "vae", "cond_stage_model": "clip",
       "embedding_manager": "embedding_manager", "text_predictor": "text_predictor"}


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        return AnyText2(sd15())


@pytest.fixture(scope="module")
def sd15_table(sd15_meta):
    return L.module_table(sd15_meta)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((reference_dir() / "anytext2_sd15_linear_conv_modules.json").read_text())["modules"]


def test_sd15_inventory_equals_manifest_module_for_module(sd15_table, manifest):
    assert len(sd15_table) == len(manifest) == 731
    ours = [m for m in sd15_table if m.net != "vae"]
    ref = [m for m in manifest if m["net"] != "first_stage_model"]
    assert len(ours) == len(ref) == 731 - 72
    for o, r in zip(ours, ref):  # same order, names, shapes and role tags
        assert (o.name, o.type, o.in_features, o.out_features, o.bias) == \
               (r["name"], r["type"], r["in"], r["out"], r["bias"])
        assert o.kernel == (tuple(r["kernel"]) if r["kernel"] else None), r["name"]
        assert (o.net, o.part, o.role) == (NET[r["net"]], r["part"], r["role"]), r["name"]
    # The native VAE is diffusers' AutoencoderKL (other module order; its attention q/k/v/out are Linear where ldm
    # has 1x1 convs): the same 72 modules under their original names, through the VAE key map.
    vae = {m.original_name: m.out_features for m in sd15_table if m.net == "vae"}
    assert vae == {r["name"]: r["out"] for r in manifest if r["net"] == "first_stage_model"}
    ours_groups = Counter((m.net, m.part, m.role) for m in sd15_table)
    ref_groups = Counter((NET[m["net"]], m["part"], m["role"]) for m in manifest)
    assert ours_groups == ref_groups


def test_seed_categories_are_253_not_517(sd15_table):
    cats = L.seed_categories(sd15_table)
    assert list(cats.values()) == [13, 56, 48, 16, 120, 253]


@pytest.mark.parametrize("expr, unet, attnx, writenet", [
    ("attn", 184, 56, 0),
    ("attnx", 56, 56, 0),
    ("attn-ff", 248, 56, 0),
    ("lcm", 334, 56, 0),
    ("writenet-attn", 0, 0, 56),
    ("writenet-lcm", 0, 0, 119),
    ("zero-convs", 0, 0, 13),
    ("seed", 184, 56, 69),
    ("lcm+zero-convs", 334, 56, 13),
    ("lcm+writenet-lcm+zero-convs", 334, 56, 132),
])
def test_target_presets_on_sd15(sd15_table, expr, unet, attnx, writenet):
    by_name = {m.name: m for m in sd15_table}
    names = L.resolve_targets(sd15_table, expr)
    sel = [by_name[n] for n in names]
    assert len(names) == len(set(names)) == unet + writenet
    assert sum(m.net == "unet" for m in sel) == unet
    assert sum(m.role == "attnx_proj" for m in sel) == attnx
    assert sum(m.net == "writenet" for m in sel) == writenet
    assert names == [m.name for m in sd15_table if m.name in set(names)]  # model order


def test_lcm_preset_is_the_diffusers_list_mapped_to_ldm(sd15_table):
    # The rule stated in reference §f: every Linear/Conv2d in input_blocks (but .0.0), middle_block, output_blocks.
    lcm = set(L.resolve_targets(sd15_table, "lcm"))
    expected = {m.name for m in sd15_table if m.net == "unet" and m.part in ("input_blocks", "middle_block",
                                                                             "output_blocks")}
    expected.discard("model.diffusion_model.input_blocks.0.0")
    assert lcm == expected
    # Without AttnX it is the familiar SD-1.5 LCM-LoRA set of 278 modules.
    assert sum("attn1x" not in n and "attn2x" not in n for n in lcm) == 278
    roles = Counter(m.role for m in sd15_table if m.name in lcm)
    assert roles == {"attn_proj": 128, "attnx_proj": 56, "ff": 32, "transformer_proj_in_out": 32,
                     "resblock_conv": 44, "resblock_skip": 14, "resblock_time_emb_proj": 22,
                     "downsample_conv": 3, "upsample_conv": 3}


def test_sd15_merged_state_dict_is_the_original_layout():
    # What `export --format merged` writes for the real model, checked on the meta device: after a LoRA on the
    # lcm + zero-conv targets, the merged state dict in the original layout is the reference key list, in order.
    from anytext2_lcm.checkpoint import to_original

    with torch.device("meta"):
        model = AnyText2(sd15())
    L.apply_lora(model, L.LoraSpec(targets="lcm", zero_convs=True))
    sd = to_original(L.merged_state_dict(model), model.cfg)
    ref = json.loads((reference_dir() / "anytext2_sd15_state_dict.json").read_text())["keys"]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(e["key"], tuple(e["shape"])) for e in ref]


def test_every_trunk_module_has_a_role():
    for cfg in (sd15(), tiny()):
        with torch.device("meta"):
            table = L.module_table(AnyText2(cfg))
        assert not [m.name for m in table if m.net in ("unet", "writenet") and m.role == "other"]


def test_explicit_lists_and_regex_follow_peft_rules(sd15_table):
    # A list entry matches a full name or a name suffix (PEFT's rule for lists).
    assert len(L.resolve_targets(sd15_table, ["attn1x.to_q"])) == 7
    one = "control_model.zero_convs.3.0"
    assert L.resolve_targets(sd15_table, [one]) == [one]
    assert len(L.resolve_targets(sd15_table, r"re:model\.diffusion_model\..*\.attn2x\.to_(k|v)")) == 14
    with pytest.raises(ConfigError, match="matches no"):
        L.resolve_targets(sd15_table, ["to_qq"])
    with pytest.raises(ConfigError, match="unknown target preset"):
        L.resolve_targets(sd15_table, "lcm+nope")


def test_cli_inspect_sd15_writes_targets_that_peft_loads_on_the_meta_model(tmp_path, capsys, sd15_meta):
    from peft import LoraConfig, inject_adapter_in_model

    out = tmp_path / "targets.json"
    rc = main(["inspect", "--preset", "sd15", "--preset-targets", "lcm", "--zero-convs", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "731 Linear/Conv2d modules" in text
    total_row = next(line for line in text.splitlines() if line.startswith("total "))
    # U.in U.mid U.out U.all W.in W.mid W.all VAE CLIP emb OCR all
    assert total_row.split()[1:13] == ["102", "26", "207", "338", "102", "18", "150", "72", "72", "54", "45", "731"]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("The seed's LoRA categories"))
    seed = {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1]) for line in lines[start + 1:start + 7]}
    assert seed == {"WriteNet zero-convs": 13, "WriteNet attention q/k/v/out": 56, "UNet input-block attention": 48,
                    "UNet middle-block attention + AttnX": 16, "UNet output-block attention + AttnX": 120,
                    "total": 253}

    doc = json.loads(out.read_text())
    assert doc["count"] == 347 and doc["by_network"] == {"unet": 334, "writenet": 13}
    names = doc["peft"]["target_modules"]

    # The file is a PEFT config as is: inject it into the real architecture built on the meta device.
    with torch.device("meta"):
        model = AnyText2(sd15())
    inject_adapter_in_model(LoraConfig(**doc["peft"]), model, low_cpu_mem_usage=True)
    assert list(L.lora_layers(model)) == names
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_lora == doc["lora_params"]

    # ... and through our own entry point, which also freezes everything but the LoRA.
    trainable = L.apply_lora(sd15_meta, L.LoraSpec(targets=str(out)))
    assert trainable == doc["lora_params"]
    assert list(L.lora_layers(sd15_meta)) == names
    assert not any(p.requires_grad for n, p in sd15_meta.named_parameters() if "lora_" not in n)


def test_cli_inspect_list_and_checkpoint_sources(tmp_path, capsys):
    from safetensors.torch import save_file

    from anytext2_lcm.checkpoint import save_converted, to_original

    model = AnyText2(tiny())
    folder = save_converted(model, tmp_path / "conv")
    assert main(["inspect", "--checkpoint", str(folder), "--list"]) == 0
    text = capsys.readouterr().out
    assert "converted folder" in text and "390 Linear/Conv2d modules" in text
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2x.to_k" in text
    assert "(original: first_stage_model.encoder.conv_in)" in text

    f = tmp_path / "orig.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(model.state_dict(), model.cfg).items()}, str(f))
    assert main(["inspect", "--checkpoint", str(f), "--preset", "tiny"]) == 0
    assert "keys and shapes match" in capsys.readouterr().out
    # The tiny file against the real architecture: a clean error, exit status 2.
    assert main(["inspect", "--checkpoint", str(f), "--preset", "sd15"]) == 2
    assert "does not match the model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["inspect", "--preset", "tiny", "--preset-targets", "lcm+nope", "--out", "x.json"], "unknown target preset"),
    (["inspect", "--preset", "tiny", "--out", "x.json"], "--out needs --preset-targets"),
    (["inspect", "--preset", "tiny", "--zero-convs"], "--zero-convs needs --preset-targets"),
    (["inspect", "--preset", "tiny", "--rank", "0"], "--rank"),
])
def test_cli_inspect_usage_errors(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
