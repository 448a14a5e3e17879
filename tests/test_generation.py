"""Teacher generation and editing: determinism, CFG batching, the WriteNet run once, clear input errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from anytext2_lcm.data.fonts import find_default_font, system_font_files
from anytext2_lcm.generation import GenerationRequest, Generator, InputError
from anytext2_lcm.pipeline import GuidedDenoiser, encode_branches, pad_contexts
from model_helpers import trained_like_tiny

BOXES = [[8, 8, 120, 40], [[10, 70], [110, 60], [114, 100], [14, 110]]]


@pytest.fixture(scope="module")
def model():
    return trained_like_tiny()


def req(**kw):
    base = dict(prompt='a sign that says "Hi" and "世界"', positions=BOXES, height=128, width=128, steps=4, seed=5)
    base.update(kw)
    return GenerationRequest(**base)


def test_same_seed_same_bytes_other_seed_differs(model):
    gen = Generator(model)
    a, b, c = gen(req()), gen(req()), gen(req(seed=6))
    assert np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.images[0], c.images[0])
    assert a.images[0].shape == (128, 128, 3) and a.images[0].dtype == np.uint8
    assert a.texts == ["Hi", "世界"]
    assert a.prompts["text"] == "Text says * , * . " and "*" in a.prompts["image"]


def test_text_conditioning_is_rendered_into_the_positions(model):
    prep = Generator(model).prepare(req(colors=[(255, 0, 0), None]))
    ti = prep.text_info
    assert ti.n_lines.tolist() == [2]
    pos0 = ti.positions[0, 0, 0]
    assert pos0[8:40, 8:120].min() == 1 and pos0[60:, :].max() == 0
    glyph0 = ti.glyphs[0, 0]
    inside = glyph0[:, pos0 > 0]
    assert inside.abs().sum() > 0 and glyph0[:, pos0 == 0].abs().sum() == 0
    red = glyph0[0][glyph0.sum(0) > 0]
    assert (glyph0[1][glyph0.sum(0) > 0] <= red + 1e-6).all()  # red-dominant glyph
    assert torch.allclose(ti.colors[0, 1], torch.full((3,), 500 / 255))  # unspecified colour
    assert ti.gly_line[0, :, 0].sum() > 0 and ti.gly_line.shape[-2:] == (80, 512)
    assert torch.all(prep.masked_img == -1)  # generation mode


def test_editing_blanks_the_text_regions_only(model, tmp_path):
    img = np.full((128, 128, 3), 200, np.uint8)
    path = tmp_path / "src.png"
    Image.fromarray(img).save(path)
    gen = Generator(model)
    prep = gen.prepare(req(edit_image=str(path)))
    m = prep.masked_img[0]
    assert torch.all(m[:, 8:40, 8:120] == -1)
    assert torch.allclose(m[:, 120:, :10], torch.full_like(m[:, 120:, :10], 200 / 127.5 - 1))
    a, b = gen(req(edit_image=str(path))), gen(req(edit_image=str(path)))
    assert np.array_equal(a.images[0], b.images[0])


def test_writenet_runs_once_per_call_and_cfg_is_one_batch(model):
    calls = {"writenet": 0, "unet": []}
    h1 = model.control_model.register_forward_hook(lambda m, i, o: calls.__setitem__("writenet", calls["writenet"] + 1))
    h2 = model.unet.register_forward_hook(lambda m, i, o: calls["unet"].append(i[0].shape[0]))
    try:
        Generator(model)(req(steps=4, num_images=2))
    finally:
        h1.remove()
        h2.remove()
    assert calls["writenet"] == 1
    assert calls["unet"] == [4, 4, 4, 4]  # 2 images x (cond + uncond) per step, one call per step


def test_separate_cfg_passes_give_the_same_image(model):
    """Generator.batch_cfg = False: two UNet passes of B per step (as the original), the same result up to
    rounding, and the option reaches the generator through the runtime options (bench / evaluate --separate-cfg)."""
    from anytext2_lcm.evaluate.bench import parse_variant
    from anytext2_lcm.evaluate.runtime import RuntimeOptions, apply_runtime_options

    calls = []
    h = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a = Generator(model)(req(steps=3, sampler="lcm", cfg_scale=3.0, num_images=2))
        b = Generator(model, batch_cfg=False)(req(steps=3, sampler="lcm", cfg_scale=3.0, num_images=2))
    finally:
        h.remove()
    assert calls == [4] * 3 + [2, 2] * 3
    assert np.abs(a.images[0].astype(int) - b.images[0].astype(int)).max() <= 1
    assert parse_variant("separate_cfg").runtime.separate_cfg
    _, vgen = apply_runtime_options(model, RuntimeOptions(separate_cfg=True))
    assert vgen.batch_cfg is False and RuntimeOptions(separate_cfg=True).label() == "separate_cfg"


def test_batched_cfg_with_padded_contexts_equals_separate_passes(model):
    gen = Generator(model)
    prep = gen.prepare(req())
    ti = prep.text_info
    long_prompt = "a " + "very " * 90 + "long prompt"  # two 75-token chunks vs one for the negative prompt
    br = encode_branches(model, ti, [long_prompt], [prep.text_prompt], ["blurry"], [""])
    assert br.cond.image_context.shape[1] == 154 and br.uncond.image_context.shape[1] == 77
    den = GuidedDenoiser(model, br, guidance_scale=7.5)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        ec, eu = den.split(x, t)
        ec_ref = model.denoise(x, t, br.cond.image_context, br.control_cond)
        eu_ref = model.denoise(x, t, br.uncond.image_context, br.control_uncond)
    torch.testing.assert_close(ec, ec_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(eu, eu_ref, atol=2e-5, rtol=1e-4)
    ctx, mask = pad_contexts([br.cond.image_context, br.uncond.image_context])
    assert ctx.shape[1] == 154 and mask[1, 77:].sum() == 0 and mask[0].all()


@pytest.mark.parametrize("kw, msg", [
    (dict(positions=BOXES[:1]), "2 quoted text lines but only 1 positions"),
    (dict(positions=None, mask=np.zeros((128, 128), np.uint8)), "no position found"),
    (dict(height=100), "multiple of 32 for this model"),
    (dict(positions=[[500, 500, 600, 600], BOXES[1]]), "outside"),
    (dict(positions=[[10, 10, 10, 40], BOXES[1]]), "no area"),
    (dict(colors=[(1, 2)]), "colors[0]"),
    (dict(sampler="euler"), "unknown sampler"),
])
def test_bad_inputs_are_clear_errors(model, kw, msg):
    with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("(", r"\(")):
        Generator(model)(req(**kw))


def test_unreadable_image_and_missing_font(model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="unreadable image"):
        Generator(model)(req(edit_image=str(bad)))
    with pytest.raises(FileNotFoundError):
        Generator(model)(req(edit_image=str(tmp_path / "none.png")))
    with pytest.raises(InputError, match="font file not found"):
        Generator(model)(req(fonts=[str(tmp_path / "none.ttf"), None]))


def test_font_without_the_needed_glyph(model):
    latin_only = [p for p in system_font_files() if p.lower().endswith("dejavusans.ttf")]
    if not latin_only:
        pytest.skip("DejaVuSans.ttf (a font without CJK glyphs) is not installed")
    with pytest.raises(InputError, match="has no glyph for '世界'"):
        Generator(model)(req(fonts=[None, latin_only[0]]))
    with pytest.raises(InputError, match="glyph font"):
        Generator(model)(req(glyph_font=latin_only[0]))


def test_generate_cli_same_bytes_and_edit_mode(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[64, 96, 448, 192], [[96, 300], [420, 280], [428, 380], [104, 400]]]))
    base = [sys.executable, "-m", "anytext2_lcm.cli", "generate", "--model", "tiny", "--width", "512", "--prompt",
            'a shop sign that says "Hello" and "世界"', "--boxes", str(boxes), "--seed", "1", "--steps", "2"]
    for name in ("a.png", "b.png"):
        r = subprocess.run(base + ["--height", "512", "--out", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    Image.fromarray(np.full((512, 512, 3), 90, np.uint8)).save(tmp_path / "src.png")
    for name in ("e1.png", "e2.png"):
        r = subprocess.run(base + ["--edit-image", str(tmp_path / "src.png"), "--out", str(tmp_path / name)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "e1.png").read_bytes() == (tmp_path / "e2.png").read_bytes()
    r = subprocess.run(base[:-4] + ["--seed", "1", "--out", str(tmp_path / "c.png"), "--height", "100"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "height=100" in r.stderr


def test_default_font_is_cjk_capable():
    spec = find_default_font()
    assert spec.covers("Hello 世界")
