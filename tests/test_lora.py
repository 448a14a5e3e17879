"""LoRA through PEFT on the tiny AnyText2 (weights of the parity fixture, all non-zero): identity at init,
training, the teacher pass with adapters disabled, save/load in every format, scale, merge/unmerge, the merged
export in the original key layout read back by the teacher loader, kohya export, refusal of pickled payloads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anytext2_lcm import lora as L
from anytext2_lcm.checkpoint import CheckpointError, load_model, load_original, save_converted
from anytext2_lcm.cli import main
from anytext2_lcm.config import ConfigError, tiny
from anytext2_lcm.models.anytext2 import AnyText2
from anytext2_lcm.parity import fixture_text_info
from conftest import assert_close_ref

SPEC = dict(rank=4, alpha=8.0, targets="lcm", zero_convs=True)


@pytest.fixture(scope="module")
def base_sd(tiny_fixture):
    return tiny_fixture[0]


@pytest.fixture(scope="module")
def inputs(tiny_fixture):
    """(x_t, t, image context, text context, TextInfo) for the 2-sample fixture batch; contexts are random (CLIP is
    not what this file tests)."""
    _, inp, _, meta = tiny_fixture
    g = torch.Generator().manual_seed(0)
    B = inp["x_t"].shape[0]
    return (inp["x_t"], inp["t"], torch.randn(B, 154, 16, generator=g), torch.randn(B, 77, 16, generator=g),
            fixture_text_info(inp, meta))


def fresh(base_sd) -> AnyText2:
    model = AnyText2(tiny())
    load_original(model, base_sd)
    return model.eval()


def eps(model, inputs, grad: bool = False) -> torch.Tensor:
    """ε of the UNet with the WriteNet residuals of the same model (so WriteNet LoRA counts)."""
    x, t, ctx, tctx, ti = inputs
    with torch.set_grad_enabled(grad):
        return model.denoise(x, t, ctx, model.control(tctx, ti))


def train(model, inputs, steps: int = 3) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.zeros_like(inputs[0])
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(eps(model, inputs, grad=True), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(base_sd, inputs):
    """A tiny model with a trained lcm + zero-conv LoRA, and its ε before / after training."""
    model = fresh(base_sd)
    base = eps(model, inputs)
    L.apply_lora(model, L.LoraSpec(**SPEC))
    train(model, inputs)
    return model, base, eps(model, inputs)


@pytest.fixture(scope="module")
def adapter_file(trained, tmp_path_factory):
    return L.save_lora(trained[0], tmp_path_factory.mktemp("adapter") / "student.safetensors")


def student_copy(base_sd, adapter_file) -> AnyText2:
    """A private copy of the trained student, for tests that merge / unmerge (which rounds the base weights)."""
    model = fresh(base_sd)
    L.load_lora(model, adapter_file)
    return model


def test_apply_lora_freezes_all_but_lora_and_starts_as_identity(base_sd, inputs):
    model = fresh(base_sd)
    base = eps(model, inputs)
    n = L.apply_lora(model, L.LoraSpec(**SPEC))
    table = L.module_table(model)
    targets = L.resolve_targets(table, "lcm+zero-convs")
    assert list(L.lora_layers(model)) == targets
    # Trainable = exactly the LoRA weights: r·(in·k² + out) per module.
    by_name = {m.name: m for m in table}
    assert n == sum(by_name[t].lora_params(4) for t in targets)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in k or ".lora_B.default." in k for k in trainable)
    assert not any(p.requires_grad for p in model.embedding_manager.parameters())
    wn_base = [p for k, p in model.control_model.named_parameters() if "lora_" not in k]
    assert wn_base and not any(p.requires_grad for p in wn_base)  # WriteNet frozen; only zero-conv LoRA trains
    assert torch.equal(eps(model, inputs), base)  # B = 0 at init


def test_embedding_manager_trainable_only_on_request(base_sd):
    model = fresh(base_sd)
    L.apply_lora(model, L.LoraSpec(rank=2, targets="attn", train_embedding_manager=True))
    assert all(p.requires_grad for p in model.embedding_manager.parameters())
    assert not any(p.requires_grad for p in model.control_model.parameters())


def test_training_changes_output_and_disable_adapters_gives_the_teacher_exactly(trained, inputs):
    model, base, student = trained
    assert (student - base).abs().max() > 1e-3
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    with L.disable_adapters(model):
        teacher = eps(model, inputs)
    assert torch.equal(teacher, base)  # one network: the teacher is the student without its LoRA
    assert torch.equal(eps(model, inputs), student)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}


def test_gradients_reach_lora_in_unet_input_blocks(base_sd, inputs):
    # DESIGN.md trap 10: the original ran the UNet input blocks under no_grad, so LoRA there got no gradient.
    model = fresh(base_sd)
    L.apply_lora(model, L.LoraSpec(**SPEC))
    eps(model, inputs, grad=True).square().mean().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if ".lora_B." in k}
    inp = {k: g for k, g in grads.items() if k.startswith("model.diffusion_model.input_blocks.")}
    assert len(inp) == 37 - 1  # every input-block Linear/Conv2d of tiny except conv_in
    assert all(g is not None and g.abs().sum() > 0 for g in inp.values())
    zero_convs = {k: g for k, g in grads.items() if ".zero_convs." in k or "middle_block_out" in k}
    assert len(zero_convs) == 7 and all(g is not None and g.abs().sum() > 0 for g in zero_convs.values())
    assert all(p.grad is None for k, p in model.named_parameters() if "lora_" not in k)


@pytest.mark.parametrize("form", ["folder", "file.safetensors"])
def test_save_load_round_trip_is_exact(trained, base_sd, inputs, tmp_path, form):
    model, _, student = trained
    out = L.save_lora(model, tmp_path / form)
    if form == "folder":
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        keys = list(load_file(out / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.") for k in keys)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    want = L.lora_state_dict(model)
    other = fresh(base_sd)
    config = L.load_lora(other, out)
    assert (config.r, config.lora_alpha) == (4, 8.0)
    got = L.lora_state_dict(other)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(eps(other, inputs), student)


def test_legacy_bin_folder_loads_through_weights_only(trained, base_sd, inputs, tmp_path):
    # PEFT's older folder form: adapter_model.bin (torch.save) + adapter_config.json; read with weights_only=True.
    model, _, student = trained
    folder = L.save_lora(model, tmp_path / "adapter")
    sd = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(sd, folder / "adapter_model.bin")
    other = fresh(base_sd)
    L.load_lora(other, folder, trainable=True)
    assert torch.equal(eps(other, inputs), student)
    trainable = [k for k, p in other.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)


def test_peft_folder_is_readable_by_plain_peft(trained, base_sd, inputs, tmp_path):
    from peft import PeftModel

    model, _, student = trained
    folder = L.save_lora(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(fresh(base_sd), str(folder))
    assert torch.equal(eps(peft_model.base_model.model, inputs), student)


def test_scale(trained, inputs):
    model, base, student = trained
    L.set_lora_scale(model, 0.0)
    assert torch.equal(eps(model, inputs), base)
    L.set_lora_scale(model, 1.0)
    assert torch.equal(eps(model, inputs), student)


def test_merge_unmerge_round_trip(trained, base_sd, adapter_file, inputs):
    _, _, student = trained
    model = student_copy(base_sd, adapter_file)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".base_layer." in k}
    assert L.merge_lora(model) == len(L.lora_layers(model))
    try:
        merged = eps(model, inputs)
        assert_close_ref(merged, student, "merged vs unmerged")
        assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())
        with pytest.raises(RuntimeError, match="merged"):
            with L.disable_adapters(model):
                pass
        with pytest.raises(RuntimeError, match="merged"):
            L.set_lora_scale(model, 0.5)
    finally:
        assert L.unmerge_lora(model) == len(L.lora_layers(model))
    after = model.state_dict()
    for k, v in before.items():
        assert (after[k] - v).abs().max() <= 1e-6 * max(1.0, v.abs().max().item()), k
    assert_close_ref(eps(model, inputs), student, "after unmerge")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_merged_export_in_original_layout_loads_with_the_teacher_loader(trained, base_sd, adapter_file, tiny_fixture,
                                                                         inputs, tmp_path, suffix):
    _, _, student = trained
    model = student_copy(base_sd, adapter_file)
    meta = tiny_fixture[3]
    L.merge_lora(model)
    try:
        merged = eps(model, inputs)
        path = L.export_merged(model, tmp_path / f"student{suffix}")
    finally:
        L.unmerge_lora(model)
    if suffix == ".safetensors":
        keys = list(load_file(path))
    else:
        obj = torch.load(path, weights_only=True)  # plain tensors only
        keys = list(obj["state_dict"])
    assert sorted(keys) == sorted(meta["state_dict_key_order"])  # the original layout, nothing else
    if suffix == ".ckpt":
        assert keys == meta["state_dict_key_order"]  # and the original order
    reloaded = load_model(path, tiny()).eval()
    assert not L.lora_layers(reloaded)
    assert_close_ref(eps(reloaded, inputs), merged, "reloaded merged export")
    assert_close_ref(eps(reloaded, inputs), student, "reloaded vs LoRA student")


def test_merged_export_of_an_unmerged_model_and_unload(trained, base_sd, inputs, tmp_path):
    # export_merged folds ΔW in itself when the model is not merged; unload_lora gives a plain model.
    model, _, student = trained
    path = L.export_merged(model, tmp_path / "m.safetensors")
    assert_close_ref(eps(load_model(path, tiny()).eval(), inputs), student, "export of unmerged model")
    # A strength baked into the export; the model's own scale is left as it was.
    base = eps(fresh(base_sd), inputs)
    path0 = L.export(model, tmp_path / "s0.safetensors", "merged", scale=0.0)
    assert_close_ref(eps(load_model(path0, tiny()).eval(), inputs), base, "merged export at scale 0")
    assert torch.equal(eps(model, inputs), student)
    copy = fresh(base_sd)
    L.load_lora(copy, L.save_lora(model, tmp_path / "a.safetensors"))
    L.unload_lora(copy, merge=True)
    assert not L.lora_layers(copy) and not hasattr(copy, "peft_config")
    assert all(".base_layer." not in k and "lora_" not in k for k in copy.state_dict())
    assert_close_ref(eps(copy, inputs), student, "unloaded")


def _ms_wrapper_merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor,
                      ratio: float = 1.0) -> torch.Tensor:
    """AnyText2 ms_wrapper.merge_loras (from kohya's merge_lora), restated: W + ratio·(alpha/dim)·up ∘ down."""
    scale = alpha / down.shape[0]
    if weight.dim() == 2:
        return weight + ratio * (up @ down) * scale
    if down.shape[2:4] == (1, 1):
        flat = up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)
        return weight + ratio * flat.unsqueeze(2).unsqueeze(3) * scale
    conved = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return weight + ratio * conved * scale


def test_kohya_export_merges_like_anytext2_ms_wrapper_and_reloads(trained, base_sd, inputs, tmp_path):
    model, _, student = trained
    path = tmp_path / "kohya.safetensors"
    counts = L.export_kohya(model, path)
    assert counts == {"modules": 159, "ms_wrapper_mergeable": 128, "skipped_by_ms_wrapper": 31}  # 24 AttnX + 7 WN
    sd = load_file(path)
    names = L.kohya_names(model)
    assert names["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert names["model.diffusion_model.input_blocks.1.0.in_layers.2"] == "lora_unet_down_blocks_0_resnets_0_conv1"
    merged = L.merged_state_dict(model)
    plain = fresh(base_sd).state_dict()
    for module, kname in names.items():
        if f"{kname}.lora_down.weight" not in sd:
            continue
        w = _ms_wrapper_merge(plain[f"{module}.weight"], sd[f"{kname}.lora_down.weight"],
                              sd[f"{kname}.lora_up.weight"], sd[f"{kname}.alpha"])
        assert (w - merged[f"{module}.weight"]).abs().max() <= 1e-5, module
    other = fresh(base_sd)
    config = L.load_lora(other, path)
    assert config.r == 4
    assert_close_ref(eps(other, inputs), student, "kohya reload")


def test_malicious_pickle_adapter_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (Path.touch, (self.target,))

    # The payload is live: a plain unpickle runs it (on a separate marker).
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()

    path = tmp_path / "adapter_model.bin"
    torch.save({"model.diffusion_model.out.2.lora_A.weight": Payload(marker)}, path)
    model = AnyText2(tiny())
    with pytest.raises(CheckpointError, match="refused"):
        L.load_lora(model, path)
    assert not marker.exists()
    assert not L.lora_layers(model)


def test_load_errors_are_clear_and_leave_the_model_untouched(trained, base_sd, tmp_path):
    model, _, _ = trained
    good = L.save_lora(model, tmp_path / "good.safetensors")
    sd = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()

    # An adapter for modules this model does not have (e.g. made for another architecture).
    bad = dict(sd)
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.lora_A.weight"
    moved = k.replace("input_blocks.1.", "input_blocks.99.")
    bad[moved] = bad.pop(k)
    bad[moved.replace("lora_A", "lora_B")] = bad.pop(k.replace("lora_A", "lora_B"))
    save_file(bad, str(tmp_path / "lacks.safetensors"), metadata=meta)
    target = fresh(base_sd)
    with pytest.raises(CheckpointError, match="modules this model lacks"):
        L.load_lora(target, tmp_path / "lacks.safetensors")
    assert not L.lora_layers(target) and not L.adapter_names(target)

    # Weights of another rank than the adapter config says.
    bad = {k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "rank.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="rank 4"):
        L.load_lora(target, tmp_path / "rank.safetensors")
    assert not L.lora_layers(target)

    # Not a LoRA at all.
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match="not plain LoRA"):
        L.load_lora(target, tmp_path / "full.safetensors")
    with pytest.raises(FileNotFoundError):
        L.load_lora(target, tmp_path / "missing.safetensors")


def test_spec_validation():
    with pytest.raises(ConfigError, match="lora.rank"):
        L.LoraSpec(rank=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        L.LoraSpec(dropout=1.0)
    with pytest.raises(ConfigError, match="unknown target preset"):
        L.LoraSpec(targets="lcm+everything")
    assert L.LoraSpec().to_dict()["rank"] == 64 and L.LoraSpec().alpha == 64.0 and L.LoraSpec().dropout == 0.0


def test_cli_export(trained, base_sd, inputs, tmp_path, capsys):
    model, _, student = trained
    adapter = L.save_lora(model, tmp_path / "a.safetensors")
    base_dir = save_converted(fresh(base_sd), tmp_path / "base")

    out = tmp_path / "student.safetensors"
    assert main(["export", str(adapter), "--format", "merged", "--checkpoint", str(base_dir),
                 "--out", str(out)]) == 0
    assert_close_ref(eps(load_model(out, tiny()).eval(), inputs), student, "cli merged export")

    # Format conversion needs no base weights (the architecture on the meta device).
    folder = tmp_path / "peft"
    assert main(["export", str(adapter), "--format", "peft", "--preset", "tiny", "--out", str(folder)]) == 0
    other = fresh(base_sd)
    L.load_lora(other, folder)
    assert torch.equal(eps(other, inputs), student)

    assert main(["export", str(adapter), "--format", "merged", "--preset", "tiny", "--out", str(out)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # An adapter for the tiny model against the real architecture: one-line error, exit 2.
    assert main(["export", str(adapter), "--format", "peft", "--preset", "sd15", "--out", str(folder)]) == 2
    assert "modules this model lacks" in capsys.readouterr().err
