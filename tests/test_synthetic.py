"""The synthetic AnyWord generator and ``make-data``: format, content, determinism, and that the reader accepts it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anytext2_lcm.cli import main
from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.fonts import FontNotFoundError, find_default_font
from anytext2_lcm.data.glyphs import long_side_angle
from anytext2_lcm.data.synthetic import SynthConfig, background_photos, generate_sample, write_dataset
from anytext2_lcm.data.validate import validate_files

S = 256


@pytest.fixture(scope="module", autouse=True)
def cjk_font():
    try:
        find_default_font()
    except FontNotFoundError as e:
        pytest.skip(f"no CJK-capable system font: {e}")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made")
    assert main(["make-data", "--out", str(out), "--num", "16", "--size", str(S), "--seed", "4"]) == 0
    return out


def test_make_data_writes_the_anyword_format(made):
    content = json.loads((made / "anyword_synth.json").read_text(encoding="utf-8"))
    assert set(content) == {"data_root", "data_list"} and content["data_root"] == "images"
    rows = content["data_list"]
    assert len(rows) == 16
    langs, colors_missing, vertical, tilted = set(), 0, 0, 0
    for r in rows:
        img = Image.open(made / "images" / r["img_name"])
        assert img.size == (S, S) and img.mode == "RGB"
        assert isinstance(r["caption"], str) and r["caption"]
        valid = [a for a in r["annotations"] if a["valid"]]
        assert 1 <= len(valid) <= 5
        for a in r["annotations"]:
            poly = np.asarray(a["polygon"])
            assert poly.shape == (4, 2) and poly.dtype.kind == "i"
            assert poly.min() >= 0 and poly.max() < S
            assert isinstance(a["text"], str) and a["text"].strip() and len(a["text"]) <= 20
            assert a["language"] in ("Latin", "Chinese")
            if a["valid"]:
                langs.add(a["language"])
                if "color" in a:
                    assert len(a["color"]) == 3 and all(0 <= c <= 255 and isinstance(c, int) for c in a["color"])
                else:
                    colors_missing += 1
                (w, h) = cv2.minAreaRect(poly.astype(np.float32))[1]
                angle = long_side_angle(cv2.boxPoints(cv2.minAreaRect(poly.astype(np.float32))))
                vertical += abs(angle) > 80
                tilted += 5 < abs(angle) < 80
        if "wm_score" in r:
            assert 0 <= r["wm_score"] <= 0.3
    assert langs == {"Latin", "Chinese"}
    assert vertical and tilted  # vertical and rotated lines both occur


def test_made_data_validates_with_no_skips(made, capsys):
    assert main(["validate-data", "--image-size", str(S), str(made / "anyword_synth.json")]) == 0
    out = capsys.readouterr().out
    assert "skipped: 0" in out and "skipped by reason: none" in out and f"{S} x {S}" in out
    rep = validate_files([str(made / "anyword_synth.json")], DataConfig(image_size=S), full=True)
    assert rep.n_skipped == 0 and rep.usable == 16


def test_text_is_drawn_where_the_polygon_says(made):
    rows = json.loads((made / "anyword_synth.json").read_text(encoding="utf-8"))["data_list"]
    checked = 0
    for r in rows[:8]:
        img = np.asarray(Image.open(made / "images" / r["img_name"]).convert("L"), dtype=np.float32)
        edges = np.abs(cv2.Laplacian(img, cv2.CV_32F))
        for a in r["annotations"]:
            if not a["valid"]:
                continue
            m = np.zeros((S, S), np.uint8)
            cv2.fillPoly(m, [np.asarray(a["polygon"], np.int32)], 1)
            ring = cv2.dilate(m, np.ones((15, 15), np.uint8)) - cv2.dilate(m, np.ones((5, 5), np.uint8))
            # strokes inside the box: much more high-frequency energy than just around it
            assert edges[m > 0].mean() > 1.5 * edges[ring > 0].mean() or edges[m > 0].mean() > 25
            checked += 1
    assert checked >= 8


def test_generation_is_deterministic_per_seed_and_index():
    cfg = SynthConfig(num=3, size=S, seed=9)
    a_img, a_row = generate_sample(2, cfg)
    b_img, b_row = generate_sample(2, cfg)
    np.testing.assert_array_equal(a_img, b_img)
    assert a_row == b_row
    c_img, c_row = generate_sample(2, SynthConfig(num=3, size=S, seed=10))
    assert c_row != a_row


def test_vertical_lines_and_varied_sizes(tmp_path):
    cfg = SynthConfig(num=6, size=S, seed=2, vertical_prob=1.0, vary_size=True, invalid_prob=0.0)
    (path,) = write_dataset(cfg, tmp_path)
    rows = json.loads(path.read_text(encoding="utf-8"))["data_list"]
    sizes = {Image.open(tmp_path / "images" / r["img_name"]).size for r in rows}
    assert len(sizes) > 1
    n_vertical = 0
    for r in rows:
        for a in r["annotations"]:
            if len(a["text"]) <= 8:  # longer lines stay horizontal (documented)
                x0, y0 = np.min(a["polygon"], 0)
                x1, y1 = np.max(a["polygon"], 0)
                assert (y1 - y0) > (x1 - x0)  # laid out top to bottom
                n_vertical += 1
    assert n_vertical >= 6
    ds = AnyWordDataset(DataConfig(json_paths=(str(path),), image_size=S))
    for i in range(len(ds)):
        x = ds[i]
        assert isinstance(x, dict) and x["img"].shape == (S, S, 3)
        for j in range(x["n_lines"]):
            if len(x["texts"][j]) <= 8 and len(x["texts"][j]) > 1:
                ys, xs = np.nonzero(x["glyphs"][j].sum(0))
                assert np.ptp(ys) > np.ptp(xs)  # the glyph image is vertical too, after resizing


def test_backgrounds_are_skimage_photographs():
    names = [n for n, _, _ in background_photos()]
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(names)
    for _, desc, img in background_photos():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and desc


def test_make_data_refuses_to_overwrite(made, capsys):
    assert main(["make-data", "--out", str(made), "--num", "1", "--size", str(S)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["make-data", "--out", str(made / "x"), "--num", "0"]) == 2


def test_parallel_generation_writes_the_same_dataset(tmp_path):
    cfg = SynthConfig(num=5, size=128, seed=6)
    (one,) = write_dataset(cfg, tmp_path / "one")
    (two,) = write_dataset(cfg, tmp_path / "two", workers=2)
    assert one.read_bytes() == two.read_bytes()
    for img in sorted((tmp_path / "one" / "images").iterdir()):
        assert img.read_bytes() == (tmp_path / "two" / "images" / img.name).read_bytes()
