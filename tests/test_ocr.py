"""PP-OCRv3 recogniser, its preprocessing and the min-area-rectangle crop: parity with the original and geometry."""

from __future__ import annotations

import dataclasses
import json
import logging

import cv2
import numpy as np
import pytest
import torch

from anytext2_lcm.config import OCRConfig, sd15, tiny
from anytext2_lcm.models.ocr import (RecModel, crop_by_mask, ctc_greedy_decode, min_area_box, output_length,
                                     recognize, resize_norm, rotate_if_tall, umeyama)
from conftest import assert_close_ref, reference_dir


def _sub_state(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def text_predictor(tiny_fixture):
    sd = tiny_fixture[0]
    model = RecModel(tiny().ocr)
    model.load_state_dict(_sub_state(sd, "text_predictor."), strict=True)
    return model.eval()


def _glyph_line_images(inputs, meta) -> list[torch.Tensor]:
    """The fixture's real gly_line images as the recogniser sees them: (3, 80, 512) in 0..255, line order."""
    return [inputs[f"gly_line_{j}"][b].repeat(3, 1, 1) * 255
            for b, n in enumerate(meta["n_lines"]) for j in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original
# ---------------------------------------------------------------------------------------------------------------


def test_text_predictor_matches_fixture(tiny_fixture, text_predictor):
    _, inputs, outputs, meta = tiny_fixture
    with torch.no_grad():
        ctc, neck, batches = recognize(text_predictor, _glyph_line_images(inputs, meta), tiny().ocr,
                                       return_batches=True)
    assert_close_ref(batches[0].input, outputs["ocr_text_predictor_input_batch0"], "input_batch0")
    assert_close_ref(batches[0].ctc, outputs["ocr_text_predictor_ctc_batch0"], "ctc_batch0")
    assert_close_ref(batches[0].neck, outputs["ocr_text_predictor_neck_batch0"], "neck_batch0")
    assert_close_ref(neck, outputs["em_ocr_glyph_neck"], "em_ocr_glyph_neck")
    assert ctc.shape == (3, 40, 97)


def test_state_dict_order_matches_original(tiny_fixture):
    meta = tiny_fixture[3]
    want = [k[len("text_predictor."):] for k in meta["state_dict_key_order"] if k.startswith("text_predictor.")]
    assert list(RecModel(tiny().ocr).state_dict()) == want


def test_sd15_recogniser_matches_manifest():
    manifest = json.loads((reference_dir() / "anytext2_sd15_state_dict.json").read_text())
    want = [(e["key"][len("text_predictor."):], tuple(e["shape"]), e["dtype"])
            for e in manifest["keys"] if e["key"].startswith("text_predictor.")]
    with torch.device("meta"):
        model = RecModel(sd15().ocr)
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert len(want) == 228
    assert got == want


@pytest.mark.parametrize("cfg", [tiny().ocr, sd15().ocr], ids=["tiny", "sd15"])
def test_output_length(cfg):
    assert output_length(cfg) == 40


def test_output_length_agrees_with_network():
    cfg = OCRConfig(backbone_scale=0.125, neck_depth=1, neck_hidden_dims=16, num_classes=11, image_shape=(3, 32, 96))
    with torch.no_grad():
        out = RecModel(cfg).eval()(torch.zeros(2, 3, 32, 96))
    assert out["ctc"].shape == (2, output_length(cfg), 11)
    assert out["ctc_neck"].shape == (2, output_length(cfg), cfg.neck_dims)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------


def test_resize_norm_keeps_aspect_and_pads_with_zero():
    img = torch.full((3, 10, 33), 255.0)
    x = resize_norm(img, (3, 48, 320))
    new_w = 159  # ceil(48 * 33 / 10) = ceil(158.4)
    assert x.shape == (3, 48, 320)
    torch.testing.assert_close(x[:, :, :new_w], torch.ones(3, 48, new_w), rtol=0, atol=1e-5)
    assert torch.all(x[:, :, new_w:] == 0.0)
    black = resize_norm(torch.zeros(3, 10, 33), (3, 48, 320))
    assert torch.all(black[:, :, :new_w] == -1.0)


def test_resize_norm_caps_width():
    x = resize_norm(torch.full((3, 10, 1000), 255.0), (3, 48, 320))
    assert x.shape == (3, 48, 320)
    torch.testing.assert_close(x, torch.ones(3, 48, 320), rtol=0, atol=1e-5)  # no padding column


def test_rotation_is_counter_clockwise_above_1_2():
    img = torch.zeros(3, 13, 10)
    img[:, 0, -1] = 255.0  # top-right corner
    rot = rotate_if_tall(img)
    assert rot.shape == (3, 10, 13)
    assert torch.all(rot[:, 0, 0] == 255.0) and rot.sum() == 3 * 255.0  # CCW: top-right -> top-left
    not_tall = torch.zeros(3, 12, 10)  # h == 1.2 w exactly: not rotated
    assert rotate_if_tall(not_tall) is not_tall


def test_recognize_sorts_by_ratio_before_rotation(text_predictor):
    gen = torch.Generator().manual_seed(0)
    tall = torch.rand(3, 100, 20, generator=gen) * 255   # ratio 0.2 before rotation, 5.0 after
    wide = torch.rand(3, 20, 60, generator=gen) * 255    # ratio 3
    mid = torch.rand(3, 20, 40, generator=gen) * 255     # ratio 2
    images = [wide, tall, mid]
    cfg = dataclasses.replace(tiny().ocr, batch_size=1)
    with torch.no_grad():
        ctc, neck, batches = recognize(text_predictor, images, cfg, return_batches=True)
    # Sorted by the pre-rotation ratio: tall (0.2), mid (2), wide (3). Sorting after rotation would put tall last.
    assert [b.indices for b in batches] == [[1], [2], [0]]
    assert torch.equal(batches[0].input, resize_norm(tall.transpose(1, 2).flip(1), cfg.image_shape)[None])
    assert tall.shape == (3, 100, 20)  # inputs are not modified
    # Results come back in input order.
    with torch.no_grad():
        for i, img in enumerate(images):
            single = text_predictor(resize_norm(rotate_if_tall(img), cfg.image_shape)[None])
            torch.testing.assert_close(neck[i], single["ctc_neck"][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ctc[i], single["ctc"][0], rtol=1e-5, atol=1e-6)


def test_recognize_rejects_empty(text_predictor):
    with pytest.raises(ValueError):
        recognize(text_predictor, [], tiny().ocr)


def test_ctc_greedy_decode():
    ids = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 0]])
    logits = torch.nn.functional.one_hot(ids, 7).float()
    assert ctc_greedy_decode(logits) == [[3, 3, 5]]
    assert ctc_greedy_decode(logits[0]) == [[3, 3, 5]]


# ---------------------------------------------------------------------------------------------------------------
# Min-area-rectangle crop
# ---------------------------------------------------------------------------------------------------------------


def _tilted_rect_mask(size: int, center, wh, angle: float) -> np.ndarray:
    corners = cv2.boxPoints((center, wh, angle)).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [corners], 255)
    return mask


@pytest.mark.parametrize("angle", [25.0, -25.0, 0.0])
def test_crop_by_mask_tilted_rectangle_is_upright(angle):
    size = 120
    mask = _tilted_rect_mask(size, (60, 60), (70, 20), angle)
    # Image brightness grows with x: an upright, unmirrored crop must grow from left to right.
    xs = torch.arange(size, dtype=torch.float32) * 2.0
    image = torch.stack([xs.expand(size, size)] * 3)
    crop = crop_by_mask(image, mask)
    c, h, w = crop.shape
    assert c == 3
    assert 68 <= w <= 72 and 18 <= h <= 22, (h, w)
    assert 0 <= crop.min() and crop.max() <= 255
    row = crop[0, h // 2]
    assert row[-3] - row[2] > 60  # increases along the long side
    # And it samples the rectangle: the centre of the crop is the image value at the rectangle's centre.
    assert abs(float(crop[0, h // 2, w // 2]) - 120.0) < 6.0


def test_crop_by_mask_accepts_hw1_masks_and_corner_order():
    mask = np.zeros((50, 80, 1), np.uint8)
    mask[10:20, 5:45] = 255
    box = min_area_box(mask)
    tl, tr, br, bl = box
    assert tl[0] < tr[0] and bl[0] < br[0] and tl[1] < bl[1] and tr[1] < br[1]
    crop = crop_by_mask(torch.full((3, 50, 80), 200.0), mask)
    assert crop.shape[0] == 3 and crop.shape[1] in (9, 10) and crop.shape[2] in (39, 40)


def test_crop_by_mask_empty_mask_uses_fallback_box(caplog):
    with caplog.at_level(logging.WARNING, logger="anytext2_lcm.models.ocr"):
        image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
        crop = crop_by_mask(image, np.zeros((64, 64), np.uint8))
    # The fallback box (0,0)-(100,100) is already upright: an identity warp, cut to the image (as the original).
    assert crop.shape == (3, 64, 64)
    torch.testing.assert_close(crop, image, rtol=0, atol=1e-2)  # float32 grid round-off only
    assert any("empty mask" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("box", [(10, 12, 11, 13), (5, 20, 6, 40), (5, 20, 30, 21)])
def test_crop_by_mask_one_pixel_row_or_column_is_finite(box):
    """Regions without area: a single pixel has no similarity transform (all corners equal) and gets the
    axis-aligned box; a row or a column keeps the rotated crop, at least 1 px thick. Never NaN."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    mask = np.zeros((64, 64), np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = 255
    crop = crop_by_mask(image, mask)
    assert torch.isfinite(crop).all() and crop.shape[0] == 3 and min(crop.shape[1:]) >= 1
    if (y1 - y0, x1 - x0) == (1, 1):
        torch.testing.assert_close(crop, image[:, y0:y1, x0:x1])


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (6, 2))
    a, s, t = 0.4, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = src @ (s * rot).T + t
    m = umeyama(src, dst, estimate_scale=True)
    np.testing.assert_allclose(m[:2, :2], s * rot, atol=1e-9)
    np.testing.assert_allclose(m[:2, 2], t, atol=1e-9)
    assert np.isnan(umeyama(np.ones((4, 2)), np.ones((4, 2)))).all()
