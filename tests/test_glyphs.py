"""Glyph, mask and prompt rendering: geometry, colour, CJK, exactness of the fast renderer, fonts."""

from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from anytext2_lcm.data import glyphs as G
from anytext2_lcm.data.fonts import (Coverage, FontLibrary, FontNotFoundError, FontSpec, coverage,
                                     find_default_font, system_font_files)
from anytext2_lcm.data.prompts import (TEXT_CAPTION_PHRASES, build_text_caption, parse_prompt_lines,
                                       truncate_caption, watermark_caption)


@pytest.fixture(scope="module")
def font() -> FontSpec:
    try:
        return find_default_font()
    except FontNotFoundError as e:  # the OS lacks a CJK font (CI installs one with `make fonts`)
        pytest.skip(f"no CJK-capable system font: {e}")


@pytest.fixture(scope="module")
def latin_only_font() -> FontSpec:
    for p in system_font_files():
        if p.endswith("DejaVuSans.ttf"):
            return FontSpec(p)
    pytest.skip("DejaVu Sans (a font without CJK glyphs) is not installed")


def rect(cx, cy, long_side, short_side, deg):
    """Corners of a rectangle whose long side is at ``deg`` degrees counter-clockwise on screen."""
    t = math.radians(deg)
    u = np.array([math.cos(t), -math.sin(t)]) * long_side / 2
    v = np.array([math.sin(t), math.cos(t)]) * short_side / 2
    c = np.array([cx, cy])
    return np.array([c - u - v, c + u - v, c + u + v, c - u + v])


def ink_angle(img: np.ndarray) -> float:
    """Counter-clockwise on-screen angle (deg) of the principal axis of the ink pixels."""
    ys, xs = np.nonzero(img.reshape(img.shape[0], img.shape[1], -1).sum(-1))
    pts = np.stack([xs, -ys], 1).astype(np.float64)
    pts -= pts.mean(0)
    w, v = np.linalg.eigh(pts.T @ pts)
    ax = v[:, -1]
    a = math.degrees(math.atan2(ax[1], ax[0]))
    return a - 180 if a > 90 else (a + 180 if a <= -90 else a)


# ---------------------------------------------------------------------------------------------------------------
# render_line (draw_glyph)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello AnyText", "你好世界", "Mixed 混合 42"])
def test_render_line_centred_binary_fills_90_percent(font, text):
    img = G.render_line(text, font)
    assert img.shape == (80, 512) and img.dtype == np.float32
    assert set(np.unique(img)) == {0.0, 1.0}
    ys, xs = np.nonzero(img)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    # scaled until one side reaches ~90 % of the canvas
    assert max(w / 512, h / 80) == pytest.approx(0.9, abs=0.08)
    assert (xs.min() + xs.max()) / 2 == pytest.approx(256, abs=12)
    assert (ys.min() + ys.max()) / 2 == pytest.approx(40, abs=12)


def test_render_line_blank_for_space(font):
    assert G.render_line(" ", font).sum() == 0


def test_line_cache_gives_the_rendering_and_hits(font):
    render = G.cached_line_renderer(16)
    a = render("cache me 缓存", font)
    b = render("cache me 缓存", font)
    assert render.cache_info().hits == 1 and render.cache_info().misses == 1
    ref = G.render_line_u8("cache me 缓存", font)
    assert a.dtype == ref.dtype == np.uint8 and a.shape == (80, 512)
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(b, ref)
    a[:] = 0  # a caller writing into its copy does not spoil the cache
    np.testing.assert_array_equal(render("cache me 缓存", font), ref)
    assert G.cached_line_renderer(0) is G.render_line_u8


# ---------------------------------------------------------------------------------------------------------------
# render_in_polygon (draw_glyph2): geometry and colour
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["你好世界", "OPEN"])
def test_vertical_line_renders_vertically(font, text):
    poly = [[230, 60], [282, 60], [282, 460], [230, 460]]  # tall, axis-aligned
    img = G.render_in_polygon(text, poly, font, (255, 255, 255))
    ys, xs = np.nonzero(img.sum(-1))
    assert ys.max() - ys.min() > 3 * (xs.max() - xs.min())
    assert ys.max() - ys.min() > 0.7 * 400  # the characters are spread over the long side
    assert xs.min() >= 225 and xs.max() <= 287
    # one character per band: the ink rows break into len(text) runs
    rows = img.sum((1, 2)) > 0
    runs = np.count_nonzero(np.diff(rows.astype(int)) == 1) + int(rows[0])
    assert runs == len(text)


@pytest.mark.parametrize("deg", [25.0, -25.0, 55.0, -55.0, 15.0])
def test_tilted_polygon_tilts_the_right_way(font, deg):
    poly = rect(256, 256, 360, 60, deg)
    img = G.render_in_polygon("Tilted words", poly, font, (255, 255, 255))
    assert img.sum() > 0
    # deg > 0 rises to the right (image y decreases with x)
    assert ink_angle(img) == pytest.approx(deg, abs=6)


def test_near_horizontal_wide_box_is_not_vertical(font):
    img = G.render_in_polygon("wide", rect(256, 256, 300, 60, 4.0), font, (255, 255, 255))
    ys, xs = np.nonzero(img.sum(-1))
    assert xs.max() - xs.min() > 2 * (ys.max() - ys.min())


@pytest.mark.parametrize("deg", [0.0, 30.0, -70.0])
def test_cjk_renders_inside_its_polygon(font, deg):
    poly = rect(250, 270, 300, 70, deg)
    img = G.render_in_polygon("汉字渲染测试", poly, font, (255, 255, 255))
    ink = img.sum(-1) > 0
    assert ink.sum() > 1500
    inside = cv2.dilate(G.polygon_mask_u8(poly, 512, 512), np.ones((7, 7), np.uint8)).astype(bool)
    assert ink[~inside].sum() <= 0.01 * ink.sum()


def test_color_lands_in_the_glyph_image(font):
    color = (200, 30, 90)
    img = G.render_in_polygon("Colour", rect(256, 256, 300, 80, 0), font, color)
    assert img.shape == (512, 512, 3) and img.dtype == np.float32
    ink = img.sum(-1) > 0
    np.testing.assert_allclose(img[ink].max(0), np.array(color) / 255, atol=1e-6)
    full = np.isclose(img[..., 0], 200 / 255)
    assert full.sum() > 100
    np.testing.assert_allclose(img[full], np.tile(np.array(color) / 255, (full.sum(), 1)), atol=1e-6)
    # partially covered pixels keep the hue: channel ratios stay those of the colour
    r = img[ink]
    assert np.all(r[:, 1] <= r[:, 0]) and np.all(r[:, 1] <= r[:, 2])


@pytest.mark.parametrize("color,expected", [((500, 500, 500), (1.0, 1.0, 1.0)), ((0, 0, 0), (10 / 255,) * 3),
                                            ((-1, -1, -1), (1.0, 1.0, 1.0)),
                                            ((300, 5, 128), (1.0, 10 / 255, 128 / 255))])
def test_color_clipping_as_the_original(font, color, expected):
    img = G.render_in_polygon("Clip", rect(256, 256, 200, 60, 0), font, color)
    np.testing.assert_allclose(img.reshape(-1, 3).max(0), expected, atol=1e-6)


def test_glyph_scale_doubles_the_canvas(font):
    poly = rect(200, 150, 200, 50, 10)
    one = G.render_in_polygon("scale", poly, font, (255, 255, 255), 256, 384, scale=1)
    two = G.render_in_polygon("scale", poly, font, (255, 255, 255), 256, 384, scale=2)
    assert one.shape == (256, 384, 3) and two.shape == (512, 768, 3)
    assert (two.sum(-1) > 0).sum() == pytest.approx(4 * (one.sum(-1) > 0).sum(), rel=0.25)


def test_add_space_spreads_characters(font):
    poly = rect(256, 256, 440, 60, 0)
    spread = G.render_in_polygon("abc", poly, font, (255, 255, 255), add_space=True)
    tight = G.render_in_polygon("abc", poly, font, (255, 255, 255), add_space=False)
    width = lambda im: np.ptp(np.nonzero(im.sum(-1))[1])  # noqa: E731
    assert width(spread) > 1.5 * width(tight)


def test_degenerate_polygon_raises(font):
    with pytest.raises(G.DegeneratePolygonError):
        G.render_in_polygon("thin", [[10, 10], [200, 10], [200, 10.5], [10, 10.5]], font)
    with pytest.raises(G.DegeneratePolygonError):
        G.render_in_polygon("two points", [[10, 10], [200, 10]], font)


def test_long_side_angle_is_independent_of_the_opencv_convention():
    for deg in (0, 12, 45, 60, 89, -10, -45, -80):
        box = cv2.boxPoints(cv2.minAreaRect(rect(100, 100, 120, 30, deg).astype(np.float32)))
        assert G.long_side_angle(box) == pytest.approx(deg, abs=0.01) or abs(deg) == 90


# ---------------------------------------------------------------------------------------------------------------
# The fast renderer equals the original's full-canvas steps, pixel for pixel
# ---------------------------------------------------------------------------------------------------------------


def reference_glyph(spec, text, polygon, color, width, height, scale=1, add_space=True):
    """The original draw_glyph2 written plainly on the whole canvas (Pillow >= 10 calls, convention-free angle):
    binary-searched size, spaces tried 1..99, text drawn on a full RGBA layer, rotate(expand) + paste."""
    c = np.asarray(color, float)
    c = np.full(3, 255.0) if c.mean() < 0 else c
    fill = tuple(int(v) for v in np.clip(c, 10, 255)) + (255,)
    poly = np.asarray(polygon, np.float64) * scale
    r = cv2.minAreaRect(poly.astype(np.float32))
    box_f = cv2.boxPoints(r)
    box = box_f.astype(np.int64)
    lo_side, hi_side = min(r[1]), max(r[1])
    angle = G.long_side_angle(box_f)
    vert = False
    bw, bh = np.ptp(box[:, 0]), np.ptp(box[:, 1])
    if (abs(angle) % 90 < 10 or abs(90 - abs(angle) % 90) % 90 < 10) and bh >= bw:
        vert, angle = True, 0
    size = (width * scale, height * scale)
    measure = ImageDraw.Draw(Image.new("RGB", size, "white"))
    lo, hi = 1, lo_side
    while lo < hi:
        mid = (lo + hi) // 2
        bb = measure.textbbox((0, 0), text, font=spec.load(int(mid)))
        if bb[2] - bb[0] <= hi_side and bb[3] - bb[1] <= lo_side:
            lo = mid + 1
        else:
            hi = mid
    f = spec.load(int(hi - 1))
    extra = 0
    if add_space and vert:
        tot = sum(measure.textbbox((0, 0), ch, font=f)[3] - measure.textbbox((0, 0), ch, font=f)[1] for ch in text)
        if tot < hi_side and len(text) > 1:
            extra = (hi_side - tot) // (len(text) - 1)
    elif add_space:
        for i in range(1, 100):
            bb = measure.textbbox((0, 0), G.insert_spaces(text, i), font=f)
            if bb[2] - bb[0] > hi_side or bb[3] - bb[1] > lo_side:
                text = G.insert_spaces(text, i - 1)
                break
    left, top, right, bottom = measure.textbbox((0, 0), text, font=f)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if not vert:
        d.text((r[0][0] - (right - left) / 2, r[0][1] - (bottom - top) / 2 - top), text, font=f, fill=fill)
    else:
        x, y = box[:, 0].min() + bw // 2 - (bottom - top) // 2, box[:, 1].min() - top
        for ch in text:
            d.text((x, y), ch, font=f, fill=fill)
            _, t, _, b = d.textbbox((0, 0), ch, font=f)
            y += b - t + extra
    rot = layer.rotate(angle, expand=1, center=(r[0][0], r[0][1]))
    img = Image.new("RGB", size)
    img.paste(rot, (int((img.width - rot.width) / 2), int((img.height - rot.height) / 2)), rot)
    return np.asarray(img)


def test_fast_renderer_matches_full_canvas_reference(font, latin_only_font):
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        deg = float(rng.choice([0.0, rng.uniform(-90, 90), rng.uniform(-8, 8), 90.0]))
        long_side, short_side = rng.uniform(30, 400), rng.uniform(10, 90)
        poly = rect(*rng.uniform(-20, 530, 2), long_side, short_side, deg)
        if rng.random() < 0.3:
            poly = poly[:, ::-1].copy()  # tall boxes too
        if rng.random() < 0.5:
            poly = np.rint(poly)
        spec, text = (font, str(rng.choice(["Hello", "你好世界", "Mix 混合 ij", "W"]))) if rng.random() < 0.7 \
            else (latin_only_font, "Serif face")
        width, height, scale = (512, 512, 1) if rng.random() < 0.8 else (448, 320, 2)
        color = rng.integers(0, 256, 3)
        try:
            ref = reference_glyph(spec, text, poly, color, width, height, scale)
        except ValueError:  # font size 0: the original printed the error and returned a blank image
            with pytest.raises(G.DegeneratePolygonError):
                G.render_in_polygon_u8(text, poly, spec, color, height, width, scale)
            continue
        ours = G.render_in_polygon_u8(text, poly, spec, color, height, width, scale)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{text!r} {deg:.1f} deg {long_side:.0f}x{short_side:.0f}")
        checked += int(ref.any())
    assert checked > 30


# ---------------------------------------------------------------------------------------------------------------
# Masks, font hints, positions from a drawn mask
# ---------------------------------------------------------------------------------------------------------------


def test_polygon_mask_area_and_values():
    poly = rect(200, 220, 180, 50, 30)
    m = G.polygon_mask(poly, 512, 512)
    assert m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
    assert m.sum() == pytest.approx(180 * 50, rel=0.05)


def test_render_font_hint_is_white_text_in_the_polygon(font):
    poly = rect(256, 300, 260, 60, -20)
    hint = G.render_font_hint("Font 字体", poly, font, 512, 512)
    assert hint.shape == (512, 512) and hint.dtype == np.float32
    assert hint.max() == 1.0 and hint.min() == 0.0 and (hint > 0).sum() > 500
    inside = cv2.dilate(G.polygon_mask_u8(poly, 512, 512), np.ones((7, 7), np.uint8)).astype(bool)
    assert (hint[~inside] > 0).sum() == 0


def test_positions_from_mask_components_sorted_and_polygonal():
    mask = np.zeros((512, 512, 3), np.uint8)
    boxes = {"a": (300, 40, 460, 90), "b": (40, 60, 200, 110), "c": (60, 300, 220, 360)}
    for x0, y0, x1, y1 in boxes.values():
        mask[y0:y1, x0:x1] = 255
    mask[450:453, 450:453] = 255  # 9 px: below the 20 px minimum
    mask[400:440, 300:420] = 200  # not pure white: ignored by the 254 threshold
    polys = G.positions_from_mask(mask, "vertical")
    assert len(polys) == 3
    # top-down first: 'a' and 'b' share the band y // 102 == 0 and sort by x // 102
    order = [min(boxes, key=lambda k: abs(p[:, 0].mean() - (boxes[k][0] + boxes[k][2]) / 2)
                 + abs(p[:, 1].mean() - (boxes[k][1] + boxes[k][3]) / 2)) for p in polys]
    assert order == ["b", "a", "c"]
    horiz = G.positions_from_mask(mask, "horizontal")
    order_h = [min(boxes, key=lambda k: abs(p[:, 0].mean() - (boxes[k][0] + boxes[k][2]) / 2)) for p in horiz]
    assert order_h == ["b", "c", "a"]
    for p in polys:
        assert p.dtype == np.int32 and p.shape == (4, 2)
    pairs = G.positions_from_mask(mask[..., 0], "↕", return_masks=True)
    assert [m.sum() for _, m in pairs] == [(y1 - y0) * (x1 - x0) for x0, y0, x1, y1 in
                                           (boxes["b"], boxes["a"], boxes["c"])]
    with pytest.raises(ValueError):
        G.positions_from_mask(mask, "diagonal")


# ---------------------------------------------------------------------------------------------------------------
# Prompts and captions
# ---------------------------------------------------------------------------------------------------------------


def test_parse_prompt_lines_as_the_original():
    prompt, lines = parse_prompt_lines("a sign that reads \u201cHello\u201d and \"World\", then \"Hello\" again")
    assert lines == ["Hello", "World", "Hello"]
    assert prompt == "a sign that reads * and *, then * again"
    prompt, lines = parse_prompt_lines('says "A"', pad_placeholder=True)
    assert prompt == "says  * " and lines == ["A"]
    assert parse_prompt_lines("no quotes here") == ("no quotes here", [" "])
    _, lines = parse_prompt_lines('"' + "x" * 30 + '"', max_chars=20)
    assert lines == ["x" * 20]


def test_text_caption_format():
    assert build_text_caption(3, phrase="Text says ") == "Text says * , * , * . "
    rng = np.random.default_rng(0)
    caps = {build_text_caption(1, rng) for _ in range(200)}
    assert caps == {p + "* . " for p in TEXT_CAPTION_PHRASES}
    assert len(TEXT_CAPTION_PHRASES) == 6 and TEXT_CAPTION_PHRASES[-1] == "Text:  "


def test_caption_watermark_and_truncation():
    assert watermark_caption("a *star* sign", 0.7) == "a  star  sign with watermarks "
    assert watermark_caption("plain", 0.2) == "plain no watermarks "
    assert watermark_caption("plain", None) == "plain"
    assert watermark_caption("plain", 0.9, cap_watermark=False) == "plain"
    short = "a short caption. "
    assert truncate_caption(short, 128, np.random.default_rng(0)) == short
    long = ". ".join(f"sentence {i} has five words" for i in range(40)) + ". "
    out = truncate_caption(long, 20, np.random.default_rng(1))
    assert out.startswith("sentence 0 has five words. ")
    assert len(out.split()) <= 21
    assert out == truncate_caption(long, 20, np.random.default_rng(1))
    assert len(truncate_caption("word " * 300, 10, np.random.default_rng(0)).split()) == 10


# ---------------------------------------------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------------------------------------------


def test_default_font_is_found_by_file_and_covers_latin_and_cjk(font):
    assert font.covers("Hello, World! 0123")
    assert font.covers("你好世界欢迎光临")
    assert font.missing_chars("ok \U0010fffd x") == ["\U0010fffd"]  # private use, plane 16: in no font
    assert font.covers("   \t")


def test_latin_font_lacks_cjk_and_render_fallback_agrees(latin_only_font, font):
    assert latin_only_font.missing_chars("Abc你好") == ["你", "好"]
    for spec in (latin_only_font, font):
        from_cmap = coverage(spec)
        by_render = Coverage(None, None, spec)
        assert from_cmap.from_cmap and not by_render.from_cmap
        for ch in "AZaz09,.你好界\U0010fffd":
            assert from_cmap.has(ord(ch)) == by_render.has(ord(ch)), ch


def test_font_spec_parse_and_collection_face(font, tmp_path):
    assert FontSpec.parse(f"{font.path}#{font.index}") == font
    with pytest.raises(FontNotFoundError):
        FontSpec.parse(tmp_path / "nope.ttf")
    if font.path.endswith(".ttc") and "NotoSansCJK" in font.path:
        assert font.index == 2 and font.load(20).getname()[0] == "Noto Sans CJK SC"


def test_font_library_per_language_folder(font, latin_only_font, tmp_path):
    (tmp_path / "Latin").mkdir()
    (tmp_path / "Chinese").mkdir()
    (tmp_path / "Latin" / "latin.ttf").symlink_to(latin_only_font.path)
    ext = ".ttc" if font.path.endswith(".ttc") else ".ttf"
    (tmp_path / "Chinese" / f"cjk{ext}").symlink_to(font.path)
    lib = FontLibrary.from_dir(tmp_path, default=font)
    assert [f.name for f in lib.candidates("Latin")] == ["latin.ttf"]
    assert lib.candidates("en") == lib.candidates("Latin")
    assert lib.candidates("Chinese_sim") == lib.candidates("Chinese")
    assert lib.candidates("Korean") == [font]  # nothing for the language: the default
    rng = np.random.default_rng(0)
    assert lib.choose("Latin", "abc", rng).name == "latin.ttf"
    assert lib.choose("Latin", "汉字", rng) is None  # the Latin font cannot render it
    manifest = tmp_path / "m"
    manifest.mkdir()
    (manifest / "fonts.json").write_text('{"Latin": ["%s"], "Chinese": ["%s#%d"]}'
                                         % (latin_only_font.path, font.path, font.index))
    lib2 = FontLibrary.from_dir(manifest, default=font)
    assert lib2.candidates("Chinese") == [font]


# ---------------------------------------------------------------------------------------------------------------
# Training-time augmentations (augment.py)
# ---------------------------------------------------------------------------------------------------------------


def test_position_morphology_frequencies_and_small_polygons():
    from anytext2_lcm.data.augment import random_position_mask

    big = rect(256, 256, 200, 60, 15)
    base = G.polygon_mask_u8(big, 512, 512).sum()
    rng = np.random.default_rng(0)
    kinds = Counter()
    for _ in range(2000):
        area = random_position_mask(big, 512, 512, rng).sum()
        kinds["same" if area == base else ("grown" if area > base else "shrunk")] += 1
    assert kinds["same"] / 2000 == pytest.approx(0.70, abs=0.04)
    assert kinds["grown"] / 2000 == pytest.approx(0.15, abs=0.03)  # dilate once 10 % + twice 5 %
    assert kinds["shrunk"] / 2000 == pytest.approx(0.15, abs=0.03)
    small = rect(100, 100, 120, 12, 0)  # a side < 20 px: never eroded (the original's elif chain)
    sbase = G.polygon_mask_u8(small, 512, 512).sum()
    assert all(random_position_mask(small, 512, 512, rng).sum() >= sbase for _ in range(300))
    assert random_position_mask(big, 512, 512, rng, prob=0.0).sum() == 0


def test_training_font_hint_follows_the_strokes_inside_the_polygon(font):
    from anytext2_lcm.data.augment import training_font_hint

    poly = rect(256, 200, 360, 80, 0)
    ink = G.render_in_polygon("Strokes 字形", poly, font, (255, 255, 255)).sum(-1) > 0
    image = np.full((512, 512, 3), 235, np.uint8)
    image[ink] = 20  # dark text on a light background
    rng = np.random.default_rng(3)
    hint = training_font_hint(image, poly, rng, prob=1.0, area_range=(1.0, 1.0), randaug=False)
    assert hint.dtype == np.uint8 and set(np.unique(hint)) == {0, 1}
    inside = G.polygon_mask_u8(poly, 512, 512).astype(bool)
    assert not hint[~inside].any()
    overlap = (hint.astype(bool) & ink).sum() / ink.sum()
    assert overlap > 0.8  # the dark strokes are what the hint shows
    half = training_font_hint(image, poly, rng, prob=1.0, area_range=(0.5, 0.5), randaug=False)
    assert 0.35 < half.sum() / hint.sum() < 0.65  # a strip of half the long side is removed
    assert not training_font_hint(image, poly, rng, prob=0.0).any()
    aug = training_font_hint(image, poly, np.random.default_rng(4), prob=1.0, randaug=True)
    assert aug.any() and not aug[~inside].any()
