"""The original demo's extras on a request: a font mimicked from a brushed image region, revised positions, hollow
font hints and the debug images; through the Python API and ``generate`` (options checked before the model is
loaded, one-line errors, exit 2)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from anytext2_lcm.data.fonts import find_default_font
from anytext2_lcm.data.hints import hollow_font_hint, hollow_noise, mimic_font_crop, revise_position
from anytext2_lcm.factory import random_model
from anytext2_lcm.generation import GenerationRequest, Generator, InputError

SIZE = 64
BOXES = [[4, 4, 60, 28], [4, 36, 60, 60]]


@pytest.fixture(scope="module")
def font():
    return find_default_font()


def text_image(font, text="Hello", size=(256, 128), at=(40, 30)) -> np.ndarray:
    """Dark text on a light background (RGB uint8)."""
    img = Image.new("RGB", size, (230, 220, 200))
    ImageDraw.Draw(img).text(at, text, font=ImageFont.truetype(font.path, 48, index=font.index), fill=(20, 30, 40))
    return np.asarray(img)


def box_mask(shape, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def test_mimic_crop_is_the_adaptive_threshold_of_the_brushed_region(font):
    img = text_image(font)
    crop = mimic_font_crop(img, box_mask(img.shape[:2], 25, 100, 30, 200))
    assert crop.shape == (3, 74, 169)  # the sides of the mask's minimum-area rectangle
    grey = cv2.cvtColor(np.ascontiguousarray(img[25:99, 30:199]), cv2.COLOR_RGB2GRAY)
    strokes = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2) == 0
    assert ((crop[0].numpy() > 127) == strokes).mean() > 0.995 and 0.05 < strokes.mean() < 0.3
    other = img.copy()
    other[:20] = 0  # outside the brushed region: no influence
    assert torch.equal(mimic_font_crop(other, box_mask(img.shape[:2], 25, 100, 30, 200)), crop)
    with pytest.raises(ValueError, match="no brushed pixel"):
        mimic_font_crop(img, np.zeros(img.shape[:2], np.uint8))


def test_revise_position_is_the_minimum_area_rectangle_of_the_glyphs():
    glyphs = np.zeros((128, 128, 3), np.float32)
    rect = cv2.boxPoints(((64, 64), (80, 20), 30)).astype(np.int32)
    cv2.fillPoly(glyphs, [rect], (1.0, 1.0, 1.0))
    glyphs[60:68, 60:68] = 0  # a hole that the closing fills
    pos, found = revise_position(glyphs, 128, 128)
    want = np.zeros((128, 128), np.uint8)
    cv2.fillPoly(want, [rect], 1)
    iou = ((pos > 0) & (want > 0)).sum() / ((pos > 0) | (want > 0)).sum()
    assert iou > 0.9 and found.shape == (4, 2)  # one-pixel differences along the 200-pixel outline
    # OpenCV closes with an even kernel anchored off-centre, so an edge pixel of the glyphs may fall outside
    assert (pos[glyphs[..., 0] > 0] > 0).mean() > 0.98 and pos[60:68, 60:68].min() == 1.0
    two = np.zeros((128, 128, 3), np.float32)
    two[10:20, 10:20] = 1
    two[100:110, 100:110] = 1  # far apart: two regions, the original keeps the position
    assert revise_position(two, 128, 128) is None


def test_hollow_font_hint_follows_the_originals_formula():
    canvas = np.zeros((64, 64), np.float32)
    assert np.array_equal(hollow_font_hint(canvas), canvas)
    canvas[20:40, 10:50] = 1.0
    out = hollow_font_hint(canvas)
    noise = hollow_noise(64, 64).copy()
    noise[noise < 230] = 0
    bg = cv2.adaptiveThreshold(noise, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2) / 255.0
    inside, ring = canvas > 0, np.zeros((64, 64), bool)
    # the 3x3 dilation minus the 2x2 one, which OpenCV anchors at (1, 1) (it grows right and down): the outline is
    # the row above and the column left of the glyph
    ring[19, 9:51] = True
    ring[19:41, 9] = True
    assert np.allclose(out[inside], 1 - bg[inside])
    assert np.allclose(out[ring], 1.0)
    rest = ~inside & ~ring
    assert np.allclose(out[rest], bg[rest]) and 0.05 < bg[rest].mean() < 0.2  # sparse specks on black


@pytest.fixture(scope="module")
def generator():
    return Generator(random_model("tiny", init="default", seed=1).eval())


def request(**kw) -> GenerationRequest:
    base = dict(prompt='a sign that says "Hi" and "Yo"', positions=BOXES, height=SIZE, width=SIZE, steps=2, seed=3)
    return GenerationRequest(**{**base, **kw})


def test_mimic_font_feeds_the_font_ocr_of_its_line_only(generator, font):
    img = text_image(font)
    mask = box_mask(img.shape[:2], 25, 100, 30, 200)
    plain = generator.prepare(request())
    mimic = generator.prepare(request(mimic_fonts=[None, (img, mask)]))
    assert set(mimic.style_crops) == {1} and torch.equal(mimic.style_crops[1], mimic_font_crop(img, mask))
    assert torch.equal(mimic.text_info.font_hint, plain.text_info.font_hint)  # the canvas gets nothing from it
    model = generator.model
    with torch.no_grad():  # what the font OCR reads (a random tiny recogniser's features hardly depend on it)
        _, a = model.line_embeddings(plain.text_info, return_parts=True)
        _, b = model.line_embeddings(mimic.text_info, return_parts=True, style_crops=mimic.style_crops)
    seen_a, seen_b = a["font_predictor_input_batch0"], b["font_predictor_input_batch0"]
    assert seen_a.max() <= 0  # no font chosen: two blank crops (-1, right-padded with 0)
    assert sorted(bool(x.max() > 0) for x in seen_b) == [False, True] and seen_b.max() > 0.99
    res = generator(request(mimic_fonts=[None, (img, mask)]))
    assert res.debug_images["mimic_line2"].shape == (74, 169, 3)
    with pytest.raises(InputError, match="both given"):
        generator.prepare(request(fonts=[None, font.path], mimic_fonts=[None, (img, mask)]))
    with pytest.raises(InputError, match=r"mimic_fonts\[0\]: the mask has no brushed pixel"):
        generator.prepare(request(mimic_fonts=[(img, np.zeros_like(mask))]))


def test_revise_hollow_and_debug_images_in_a_request(generator, font):
    big = dict(prompt='a sign that says "Hello World"', positions=[[40, 40, 480, 200]], height=512, width=512)
    plain = generator.prepare(request(**big))
    revised = generator.prepare(request(**big, revise_position=True, fonts=[font.path], hollow_font=True))
    drawn, tight = plain.text_info.positions[0, 0, 0], revised.text_info.positions[0, 0, 0]
    glyph = plain.text_info.glyphs[0, 0].sum(0) > 0
    assert tight.sum() < 0.8 * drawn.sum() and bool((tight[glyph] > 0).all())
    assert np.asarray(revised.polygons[0]).shape == (4, 2) and not revised.warnings
    hint = revised.text_info.font_hint[0, 0].numpy()
    assert 0.05 < hint[tight.numpy() == 0].mean() < 0.2  # the hollow transform's speckled background
    dbg = revised.debug_images
    assert set(dbg) == {"glyphs", "positions", "font_hint"}
    assert np.array_equal(dbg["positions"][..., 0] > 127, tight.numpy() > 0.5)
    assert np.array_equal(dbg["font_hint"][..., 0], np.round(hint * 255).astype(np.uint8))
    edit = generator.prepare(request(**big, revise_position=True, edit_image=np.full((512, 512, 3), 128, np.uint8)))
    assert torch.equal(edit.text_info.positions, plain.text_info.positions)
    assert any("off in editing mode" in w for w in edit.warnings)


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, font):
    d = tmp_path_factory.mktemp("hints")
    Image.fromarray(text_image(font)).save(d / "photo.png")
    Image.fromarray(box_mask((128, 256), 25, 100, 30, 200)).save(d / "brush.png")
    Image.fromarray(np.zeros((128, 256), np.uint8)).save(d / "empty.png")
    (d / "boxes.json").write_text(json.dumps(BOXES))
    return d


def run_generate(capsys, monkeypatch, *extra, forbid_model: bool = False):
    from anytext2_lcm.cli import main

    if forbid_model:  # the options must be refused before any model is built
        def no_model(*a, **k):
            raise AssertionError("the model was loaded")

        monkeypatch.setattr("anytext2_lcm.commands.common.build_model", no_model)
    code = main(["generate", "--model", "tiny", "--prompt", 'a sign "Hi" and "Yo"', "--steps", "2", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, message", [
    (["--mimic-font", "{d}/photo.png"], "expected IMAGE:MASK"),
    (["--mimic-font", "{d}/absent.png:{d}/brush.png"], "absent.png does not exist"),
    (["--mimic-font", "-", "--mimic-font", "{d}/photo.png:{d}/empty.png"], "mimic_fonts[1]: the mask has no brushed"),
    (["--mimic-font", "{d}/boxes.json:{d}/brush.png"], "unreadable image"),
    (["--style-lora", "{d}/brush.png:0.5"], "expected a kohya LoRA file"),
    (["--style-lora", "{d}/absent.safetensors:0.5"], "does not exist"),
    (["--base-model", "{d}/boxes.json"], "expected an SD-1.5 checkpoint"),
    (["--debug-images", "{d}/photo.png"], "a file is in the way"),
])
def test_generate_refuses_bad_options_before_loading_the_model(files, capsys, monkeypatch, tmp_path, flags, message):
    flags = [f.format(d=files) for f in flags]
    code, _, err = run_generate(capsys, monkeypatch, "--boxes", str(files / "boxes.json"), "--out",
                                str(tmp_path / "o.png"), *flags, forbid_model=True)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("anytext2-lcm generate: error:")


def test_generate_with_the_demo_options_writes_the_debug_images(files, capsys, monkeypatch, tmp_path):
    code, out, err = run_generate(
        capsys, monkeypatch, "--boxes", str(files / "boxes.json"), "--out", str(tmp_path / "o.png"),
        "--mimic-font", "-", "--mimic-font", f"{files}/photo.png:{files}/brush.png", "--hollow-font",
        "--revise-position", "--debug-images", str(tmp_path / "debug"))
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    names = sorted(p.rsplit("/", 1)[1] for p in info["debug_images"])
    assert names == ["font_hint.png", "glyphs.png", "mimic_line2.png", "positions.png"]
    crop = np.asarray(Image.open(tmp_path / "debug" / "mimic_line2.png"))
    assert crop.shape == (74, 169, 3) and crop.max() == 255
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (SIZE, SIZE, 3)
