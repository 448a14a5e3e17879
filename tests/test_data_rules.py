"""The original's data rules: a polygon partly outside the image is kept and cut at the edge (as the original draws
it), skipped only when the part inside is degenerate; "Chinese" lines are labelled simplified / traditional with
OpenCC for per-language fonts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.fonts import FontNotFoundError, find_default_font, font_language
from anytext2_lcm.data.skips import SkipRecord

S = 256


@pytest.fixture(scope="module", autouse=True)
def font():
    try:
        return find_default_font()
    except FontNotFoundError as e:
        pytest.skip(f"no CJK-capable system font: {e}")


def rotated_box(cx, cy, w, h, angle):
    """The 4 integer corners of a w x h box rotated by ``angle`` degrees about (cx, cy), as AnyWord stores them."""
    return np.rint(cv2.boxPoints(((cx, cy), (w, h), angle))).astype(int).tolist()


def real_format_file(folder, annotations, size=(512, 512)):
    """One AnyWord-3M row (the published layout: int polygons, language, valid, color, wm_score) and its image."""
    folder.mkdir(parents=True, exist_ok=True)
    img = np.full((size[1], size[0], 3), 200, np.uint8)
    img[::9] = 40
    Image.fromarray(img).save(folder / "0001.jpg")
    row = {"img_name": "0001.jpg", "caption": "a street sign", "wm_score": 0.05, "annotations": annotations}
    p = folder / "data_v1.2b.json"
    p.write_text(json.dumps({"data_root": str(folder), "data_list": [row]}, ensure_ascii=False))
    return str(p)


def test_rotated_box_13px_past_the_edge_loads_and_is_cut_at_the_edge(tmp_path):
    poly = rotated_box(470, 300, 110, 36, -20)  # its right corner pokes past x = 511
    assert max(x for x, _ in poly) - 511 >= 13
    path = real_format_file(tmp_path, [{"polygon": poly, "text": "EXIT", "language": "Latin", "valid": True,
                                        "color": [250, 20, 20]}])
    ds = AnyWordDataset(DataConfig(json_paths=(path,), image_size=S, mask_pos_prob=1.0, font_hint_prob=1.0,
                                   mask_img_prob=0.0))
    x = ds[0]
    assert isinstance(x, dict), x
    # Positions: the filled polygon cut at the image edge (cv2.fillPoly of the whole polygon, the original's way).
    scaled = np.asarray(poly, float) * S / 512
    ref = np.zeros((S, S), np.uint8)
    cv2.fillPoly(ref, [np.rint(scaled).astype(np.int32).reshape(-1, 1, 2)], 1)
    pos = x["positions"][0]
    assert pos[:, -1].any() and ref[:, -1].any()  # it reaches the edge column
    assert abs(int(pos.sum()) - int(ref.sum())) <= 0.15 * ref.sum()  # the morphology changes a rim at most
    assert x["glyphs"][0].any() and x["n_lines"] == 1


@pytest.mark.parametrize("poly,why", [
    (rotated_box(600, 300, 110, 36, -20), "entirely outside"),
    ([[511, 100], [540, 100], [540, 160], [511, 160]], "a sliver inside"),
])
def test_polygon_whose_inside_part_is_degenerate_is_skipped_as_outside(tmp_path, poly, why):
    path = real_format_file(tmp_path, [{"polygon": poly, "text": "EXIT", "language": "Latin"}])
    x = AnyWordDataset(DataConfig(json_paths=(path,), image_size=S))[0]
    assert isinstance(x, SkipRecord) and x.reason == "polygon_outside", (why, x)
    assert "inside" in x.detail


def test_absurd_coordinates_are_skipped_by_the_tolerance(tmp_path):
    path = real_format_file(tmp_path, [{"polygon": [[-5000, 0], [400, 0], [400, 40], [-5000, 40]], "text": "A",
                                        "language": "Latin"}])
    x = AnyWordDataset(DataConfig(json_paths=(path,), image_size=S))[0]
    assert isinstance(x, SkipRecord) and x.reason == "polygon_outside" and "polygon_tolerance" in x.detail


def test_chinese_lines_are_labelled_simplified_or_traditional_as_the_original():
    # OpenCC t2s changes 體 -> 体 and 館 -> 馆; a simplified or Latin text is unchanged.
    assert font_language("Chinese", "體育館") == "Chinese_tra"
    assert font_language("Chinese", "体育馆") == "Chinese_sim"
    assert font_language("Chinese", "OK") == "Chinese_sim"
    assert font_language("Latin", "體育館") == "Latin"
    assert font_language("Chinese_tra", "体") == "Chinese_tra"  # an explicit label is kept


def test_sample_languages_carry_the_labels_and_pick_the_fonts_of_their_script(tmp_path, font):
    fonts = tmp_path / "fonts"
    for lang in ("Chinese_sim", "Chinese_tra", "Latin"):
        (fonts / lang).mkdir(parents=True)
        (fonts / lang / f"{lang}.ttc").symlink_to(font.path)
    path = real_format_file(tmp_path / "d", [
        {"polygon": rotated_box(150, 100, 200, 50, 0), "text": "體育館", "language": "Chinese"},
        {"polygon": rotated_box(150, 300, 200, 50, 0), "text": "体育馆", "language": "Chinese"}])
    ds = AnyWordDataset(DataConfig(json_paths=(path,), image_size=S, rand_font=True, font_dir=str(fonts)))
    x = ds[0]
    assert sorted(x["language"][:2]) == ["Chinese_sim", "Chinese_tra"]
    assert [f.path.endswith("Chinese_tra.ttc") for f in ds.font_candidates("Chinese_tra")][0]
    assert [f.path.endswith("Chinese_sim.ttc") for f in ds.font_candidates("Chinese_sim")][0]
