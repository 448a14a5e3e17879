"""Checkpoint reading, strict loading, the original key layout and converted folders."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from anytext2_lcm.checkpoint import (CheckpointError, load_converted, load_model, load_original, original_shapes,
                                     read_checkpoint, save_converted, to_original)
from anytext2_lcm.config import from_original_yaml, sd15
from anytext2_lcm.models.anytext2 import AnyText2
from anytext2_lcm.parity import fixture_text_info

REF = None


def _manifest():
    from conftest import reference_dir

    return json.loads((reference_dir() / "anytext2_sd15_state_dict.json").read_text())


def test_sd15_state_dict_equals_manifest_key_for_key():
    man = _manifest()
    with torch.device("meta"):
        model = AnyText2(sd15())
    ours = list(original_shapes(model).items())
    ref = [(e["key"], tuple(e["shape"])) for e in man["keys"]]
    assert len(ours) == man["num_keys"] == 2047
    assert ours == ref  # same keys, same order, same shapes
    dtypes = {e["key"]: e["dtype"] for e in man["keys"]}
    sd = to_original(model.state_dict(), model.cfg)
    for k, v in sd.items():
        assert str(v.dtype).removeprefix("torch.") == dtypes[k], k


@pytest.fixture(scope="module")
def tiny_model(tiny_fixture_dir):
    cfg = from_original_yaml(tiny_fixture_dir / "config.yaml")
    model = AnyText2(cfg)
    load_original(model, read_checkpoint(tiny_fixture_dir / "state_dict.safetensors"))
    return model.eval()


def _outputs(model, inputs, meta):
    with torch.no_grad():
        ti = fixture_text_info(inputs, meta)
        lines = model.line_embeddings(ti)
        cond = model.encode_conditions(meta["img_prompts"], meta["text_prompts"], lines)
        ctrl = model.control(cond.text_context, ti)
        eps = model.denoise(inputs["x_t"], inputs["t"], cond.image_context, ctrl)
        return torch.cat(lines), eps, model.decode(inputs["vae_z"])


def test_converted_folder_round_trip_gives_identical_outputs(tiny_model, tiny_fixture, tmp_path):
    _, inputs, _, meta = tiny_fixture
    out = save_converted(tiny_model, tmp_path / "conv")
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob("conv.tmp*"))
    again = load_converted(out, verify=True).eval()
    for a, b in zip(_outputs(tiny_model, inputs, meta), _outputs(again, inputs, meta)):
        assert torch.equal(a, b)
    # converting again over an existing folder replaces it atomically
    save_converted(again, out)
    assert load_converted(out).cfg == tiny_model.cfg


def test_convert_cli_round_trip_and_check(tiny_fixture_dir, tmp_path):
    out = tmp_path / "conv"
    cmd = [sys.executable, "-m", "anytext2_lcm.cli", "convert", str(tiny_fixture_dir / "state_dict.safetensors"),
           str(out), "--config", str(tiny_fixture_dir / "config.yaml")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "convert", str(out), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "strict match" in r.stdout, r.stdout + r.stderr
    # a truncated component file is detected by the manifest
    f = out / "unet.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    r = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "convert", str(out), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unet.safetensors" in r.stderr


def test_ckpt_with_state_dict_wrapper_and_position_ids_loads(tiny_fixture_dir, tmp_path):
    sd = load_file(str(tiny_fixture_dir / "state_dict.safetensors"))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path)
    model = load_model(path, from_original_yaml(tiny_fixture_dir / "config.yaml"))
    ref = load_file(str(tiny_fixture_dir / "state_dict.safetensors"))
    got = to_original(model.state_dict(), model.cfg)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_truncated_checkpoints_are_clear_errors(tiny_fixture_dir, tmp_path):
    cfg = from_original_yaml(tiny_fixture_dir / "config.yaml")
    data = (tiny_fixture_dir / "state_dict.safetensors").read_bytes()
    st = tmp_path / "cut.safetensors"
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(st, cfg)
    ck = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(str(tiny_fixture_dir / "state_dict.safetensors"))}, ck)
    ck.write_bytes(ck.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ck, cfg)


def test_foreign_and_misshaped_checkpoints_list_the_keys(tiny_fixture_dir, tmp_path):
    cfg = from_original_yaml(tiny_fixture_dir / "config.yaml")
    sd = load_file(str(tiny_fixture_dir / "state_dict.safetensors"))
    foreign = {k: v for k, v in sd.items() if not k.startswith(("control_model.", "embedding_manager."))}
    foreign["some.other.weight"] = torch.zeros(3)
    save_file(foreign, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "sd.safetensors", cfg)
    msg = str(e.value)
    assert "missing keys" in msg and "control_model." in msg and "unexpected keys: some.other.weight" in msg
    assert "not look like an AnyText2 checkpoint" in msg
    bad = dict(sd)
    bad["model.diffusion_model.out.2.weight"] = torch.zeros(5, 32, 3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.diffusion_model.out.2.weight: checkpoint \(5, 32, 3, 3\)"):
        load_model(tmp_path / "bad.safetensors", cfg)


def test_non_finite_weights_are_refused(tiny_fixture_dir, tmp_path):
    sd = load_file(str(tiny_fixture_dir / "state_dict.safetensors"))
    sd["control_model.fuse_block_za.bias"][0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(tmp_path / "nan.safetensors", from_original_yaml(tiny_fixture_dir / "config.yaml"))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    assert not marker.exists()
