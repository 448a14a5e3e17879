"""Community SD-1.5 weights on the tiny AnyText2: base models in the ldm layout (.safetensors / .ckpt) and as a
diffusers folder (written by diffusers and transformers themselves), kohya style LoRAs (LoRA and LoCon) merged at a
ratio against hand math and against PEFT, the student LoRA on top, and one-line errors for malformed files."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from anytext2_lcm import lora as L
from anytext2_lcm.checkpoint import (CLIP_PREFIX, UNET_PREFIX, CheckpointError, load_base_model, read_base_model,
                                     to_original)
from anytext2_lcm.config import ConfigError
from anytext2_lcm.factory import apply_community, random_model, read_community
from anytext2_lcm.lora.style import StyleLora, merge_style_lora, read_style_lora

RANK, RATIO = 3, 0.7


def fresh():
    """The AnyText2 model that receives community weights (every layer non-zero)."""
    return random_model("tiny", init="default", seed=2).eval()


@pytest.fixture(scope="module")
def donor():
    """The 'community' model whose UNet and CLIP weights are written in community layouts."""
    return random_model("tiny", init="default", seed=1).eval()


def is_attnx(k: str) -> bool:
    return ".attn1x." in k or ".attn2x." in k


def is_base_part(k: str) -> bool:
    return (k.startswith(UNET_PREFIX) and not is_attnx(k)) or k.startswith(CLIP_PREFIX + "text_model.")


def write_ldm(donor, path, drop: str | None = None, extra: dict | None = None):
    """An SD-1.5-style file: the donor's UNet (no AttnX) and CLIP, its VAE in ldm names and an EMA entry (unused)."""
    sd = to_original(donor.state_dict(), donor.cfg)
    keep = {k: v.clone() for k, v in sd.items() if is_base_part(k) or k.startswith("first_stage_model.")}
    keep["model_ema.decay"] = torch.tensor(0.9999)
    if drop:
        del keep[drop]
    keep.update(extra or {})
    if path.suffix == ".safetensors":
        save_file(keep, str(path))
    else:
        torch.save({"state_dict": keep, "global_step": 7}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_base_model_replaces_unet_and_clip_and_keeps_the_anytext2_parts(donor, tmp_path, suffix):
    path = write_ldm(donor, tmp_path / f"base{suffix}")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_base_model(model, path)
    theirs = donor.state_dict()
    replaced = 0
    for k, v in model.state_dict().items():
        if is_base_part(k):
            assert torch.equal(v, theirs[k]), k
            replaced += 1
        else:  # AttnX, WriteNet, text embedding, OCR, VAE, schedule: the AnyText2 model's own
            assert torch.equal(v, before[k]), k
    n_attnx = sum(1 for k in before if k.startswith(UNET_PREFIX) and is_attnx(k))
    n_vae = sum(1 for k in to_original(donor.state_dict(), donor.cfg) if k.startswith("first_stage_model."))
    assert (report.layout, report.replaced, report.kept) == ("ldm", replaced, n_attnx) and n_attnx == 30
    assert report.missing == [] and report.unexpected == [] and report.ignored == n_vae + 1


def test_missing_and_unexpected_keys_are_reported_and_the_rest_applied(donor, tmp_path, caplog):
    gone = UNET_PREFIX + "out.2.weight"
    path = write_ldm(donor, tmp_path / "partial.safetensors", drop=gone,
                     extra={UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(2, 2)})
    model = fresh()
    kept = model.state_dict()[gone].clone()
    with caplog.at_level(logging.WARNING):
        report = load_base_model(model, path)
    assert report.missing == [gone] and report.unexpected == [UNET_PREFIX + "label_emb.0.0.weight"]
    assert torch.equal(model.state_dict()[gone], kept)
    assert torch.equal(model.state_dict()[UNET_PREFIX + "out.0.weight"], donor.state_dict()[UNET_PREFIX + "out.0.weight"])
    assert "lacks 1 UNet/CLIP keys" in caplog.text and "were not used" in caplog.text


def diffusers_folder(path, cfg):
    """A diffusers model folder saved by diffusers' ``UNet2DConditionModel`` and transformers' ``CLIPTextModel``
    sized like the tiny preset (random non-zero weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=32)
    c = cfg.clip
    text = CLIPTextModel(CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                        num_attention_heads=c.num_attention_heads, hidden_act=c.hidden_act,
                                        max_position_embeddings=c.max_position_embeddings))
    with torch.no_grad():
        for p in [*unet.parameters(), *text.parameters()]:
            p.normal_(0, 0.05)
    unet.save_pretrained(str(path / "unet"))
    text.save_pretrained(str(path / "text_encoder"))
    return unet.eval(), text.eval()


def test_diffusers_folder_gives_the_same_unet_and_text_encoder_as_diffusers_and_transformers(tmp_path):
    model = fresh()
    unet, text = diffusers_folder(tmp_path / "community", model.cfg)
    attnx = {k: v.clone() for k, v in model.state_dict().items() if is_attnx(k)}
    report = load_base_model(model, tmp_path / "community")
    assert report.layout == "diffusers" and not report.missing and not report.unexpected and report.kept == 30
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    t = torch.tensor([10, 600])
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():  # AttnX off: the UNet is SD-1.5's; the reference is diffusers' own forward
        assert torch.equal(model.unet(x, t, ctx, None, attnx_scale=0.0), unet(x, t, encoder_hidden_states=ctx).sample)
        ours = model.cond_stage_model.transformer.text_model(input_ids=ids).last_hidden_state
        assert torch.equal(ours, text(input_ids=ids).last_hidden_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in attnx.items())


# ---------------------------------------------------------------------------------------------------------------
# Style LoRAs (kohya)
# ---------------------------------------------------------------------------------------------------------------

STYLE_MODULES = {  # kohya name → alpha (None: the file has no alpha, kohya's default alpha = rank)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 1.5,     # Linear
    "lora_unet_down_blocks_0_attentions_0_proj_in": 6.0,                             # 1x1 Conv2d
    "lora_unet_down_blocks_0_resnets_0_conv1": 1.5,                                  # 3x3 Conv2d: LoCon
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": None,           # Linear, no alpha
    "lora_te_text_model_encoder_layers_0_mlp_fc1": 3.0,                              # CLIP Linear
}


def module_of(model, kohya: str):
    inverse = {v: k for k, v in L.kohya_names(model).items()}
    return inverse[kohya]


def write_style(model, path, modules=STYLE_MODULES, seed: int = 0):
    """A kohya LoRA file for ``model``'s shapes: down (r, in[, k, k]) and up (out, r[, 1, 1]), random values."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, alpha in modules.items():
        w = model.get_submodule(module_of(model, name)).weight
        down_shape = (RANK, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], RANK, *((1, 1) if w.dim() == 4 else ()))
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.2
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path, tensors


def hand_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW[o, i, ...] = Σ_r up[o, r] · down[r, i, ...] (a 3x3 LoCon composes a 1x1 up with a 3x3 down: the same sum)."""
    return torch.einsum("or,ri...->oi...", up.double().flatten(1), down.double())


def test_style_lora_merges_as_hand_math_and_as_peft(tmp_path):
    model = fresh()
    path, tensors = write_style(model, tmp_path / "style.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = merge_style_lora(model, path, RATIO)
    assert (report.modules, report.unet, report.text_encoder) == (5, 4, 1)
    changed = set()
    for name, alpha in STYLE_MODULES.items():
        key = module_of(model, name) + ".weight"
        changed.add(key)
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        scale = RATIO * (alpha if alpha is not None else RANK) / RANK
        want = before[key].double() + scale * hand_delta(down, up)
        assert (model.state_dict()[key].double() - want).abs().max() < 1e-6, name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k not in changed)
    # PEFT's own LoRA layers (the file loaded as an adapter at scale RATIO) fold in the same update
    peft = fresh()
    L.load_lora(peft, path, scale=RATIO)
    merged = L.merged_state_dict(peft)
    for key in changed:
        assert (merged[key] - model.state_dict()[key]).abs().max() < 1e-6, key


def save_random_student(model, folder, seed: int = 3):
    """A student LoRA of ``model`` (lcm targets, rank 4, non-zero lora_B), saved as the distillation saves it."""
    L.apply_lora(model, L.LoraSpec(rank=4, alpha=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return L.save_lora(model, folder)


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    return save_random_student(fresh(), tmp_path_factory.mktemp("student") / "adapter")


def eps(model):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 16, generator=g)
    with torch.no_grad():
        return model.denoise(x, torch.tensor([400]), ctx, None)


def test_student_lora_applies_on_top_of_a_base_model_and_a_style(donor, student_file, tmp_path):
    base = write_ldm(donor, tmp_path / "base.safetensors")
    style, _ = write_style(fresh(), tmp_path / "style.safetensors")
    community = read_community(str(base), [f"{style}:{RATIO}"])
    first = fresh()
    apply_community(first, community)
    teacher = eps(first)
    L.load_lora(first, student_file)
    student = eps(first)
    with L.disable_adapters(first):  # the student's teacher is the swapped, styled model
        assert torch.equal(eps(first), teacher)
    later = fresh()  # a base model goes under the student only before the student is loaded
    L.load_lora(later, student_file)
    with pytest.raises(RuntimeError, match="before any LoRA"):
        load_base_model(later, community.base)
    other = fresh()  # a style merged after the student was loaded gives the same model (the merge order is free)
    load_base_model(other, community.base)
    L.load_lora(other, student_file)
    merge_style_lora(other, style, RATIO)
    assert (eps(other) - student).abs().max() < 1e-5
    assert (student - teacher).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Malformed community files: one-line errors, nothing applied
# ---------------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _pickle_file(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f)
    return path


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_malformed_base_models_are_refused_with_one_line(donor, tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "pickle": (_pickle_file(tmp_path / "evil.ckpt", marker), "arbitrary unpickling"),
        "nan": (write_ldm(donor, tmp_path / "nan.safetensors",
                          extra={UNET_PREFIX + "out.2.weight": torch.full((4, 32, 3, 3), float("nan"))}), "NaN/Inf"),
        "layout": (_save(tmp_path / "foreign.safetensors", {"encoder.w": torch.zeros(2)}), "not an SD-1.5 checkpoint"),
        "lora": (write_style(fresh(), tmp_path / "lora.safetensors")[0], "a kohya LoRA, not a base model"),
        "unet file": (_save(tmp_path / "unet.safetensors", {"down_blocks.0.x": torch.zeros(2)}), "bare diffusers UNet"),
        "suffix": (_save(tmp_path / "weights.txt", {}), "expected an SD-1.5 checkpoint"),
    }
    (tmp_path / "empty").mkdir()
    cases["folder"] = (tmp_path / "empty", "not a diffusers model folder")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError) as e:
            read_base_model(path)
        assert message in _one_line(e), (name, str(e.value))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        read_base_model(tmp_path / "absent.safetensors")


def test_a_base_model_of_another_shape_changes_nothing(donor, tmp_path):
    path = write_ldm(donor, tmp_path / "sd2.safetensors",
                     extra={CLIP_PREFIX + "text_model.final_layer_norm.weight": torch.ones(1024)})
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_base_model(model, path)
    assert "1 shape mismatches" in _one_line(e) and "(1024,)" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _save(path, tensors):
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        path.write_text("not weights")
    return path


def test_malformed_style_loras_are_refused_with_one_line(tmp_path):
    marker = tmp_path / "pwned"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.ones(RANK, 32), torch.ones(32, RANK)
    cases = {
        "pickle": (_pickle_file(tmp_path / "evil.pt", marker), "arbitrary unpickling"),
        "nan": ({f"{name}.lora_down.weight": down * float("nan"), f"{name}.lora_up.weight": up}, "NaN/Inf"),
        "peft": ({"base_model.model.x.lora_A.weight": down}, "not a kohya LoRA file"),
        "loha": ({f"{name}.hada_w1_a": down}, "LyCORIS LoHa is not supported"),
        "half": ({f"{name}.lora_down.weight": down}, "lora_down or lora_up missing"),
        "ranks": ({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.ones(32, 2)}, "do not form"),
    }
    for case, (content, message) in cases.items():
        path = content if not isinstance(content, dict) else _save(tmp_path / f"{case}.safetensors", content)
        with pytest.raises(CheckpointError) as e:
            read_style_lora(path)
        assert message in _one_line(e), (case, str(e.value))
    assert not marker.exists()


def test_a_style_lora_for_another_model_changes_nothing(tmp_path):
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(RANK, 16),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(32, RANK)}
    with pytest.raises(CheckpointError) as e:
        merge_style_lora(model, _save(tmp_path / "sdxl.safetensors", sdxl), 1.0)
    assert "an SDXL or SD-2 LoRA?" in _one_line(e)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wide = {f"{name}.lora_down.weight": torch.ones(RANK, 320), f"{name}.lora_up.weight": torch.ones(320, RANK)}
    with pytest.raises(CheckpointError) as e:
        merge_style_lora(model, _save(tmp_path / "wide.safetensors", wide), 1.0)
    assert "do not fit the weight (32, 32)" in _one_line(e)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("text, message", [("style.safetensors", "expected FILE:RATIO"),
                                           ("style.safetensors:strong", "expected FILE:RATIO"),
                                           ("style.safetensors:nan", "finite number"), (":0.5", "expected FILE:RATIO")])
def test_style_lora_flag_syntax(text, message):
    with pytest.raises(ConfigError, match=message):
        StyleLora.parse(text)
    assert StyleLora.parse("C:/styles/a.safetensors:-0.5") == StyleLora("C:/styles/a.safetensors", -0.5)


def test_style_fidelity_benchmark_style_lora_has_the_stated_size(tmp_path):
    """benchmarks/style_fidelity.py: its recipe validates, and its style LoRA, merged at ratio 1 through the
    --style-lora path, changes every adapted module by 0.1 of its norm (AttnX untouched, CLIP included)."""
    import importlib.util
    from pathlib import Path

    from anytext2_lcm.recipes.spec import load_recipe

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("style_fidelity", repo / "benchmarks" / "style_fidelity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = load_recipe(repo / "configs" / "style_fidelity.yaml")
    assert [s.name for s in recipe.stages] == ["teacher", "student"] and recipe.sections["eval"]["style_size"] == 0.1
    model = fresh()
    modules = bench.style_modules(model)
    assert not any("attn1x" in k or "attn2x" in k for k in modules)
    assert any(k.startswith("lora_te_") for k in modules) and any("_ff_net_" in k for k in modules)
    save_file(bench.random_style_lora(model, 4, 0.1, 0), str(tmp_path / "style.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_community(model, read_community(None, [f"{tmp_path / 'style.safetensors'}:1"]))
    for name in modules.values():
        w0 = before[name + ".weight"]
        assert abs(float((model.state_dict()[name + ".weight"] - w0).norm() / w0.norm()) - 0.1) < 1e-4, name
