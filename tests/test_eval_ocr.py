"""The offline PP-OCRv4 reader: it reads clean rendered Latin and Chinese words, and crops lines by their position
masks (tilted and vertical lines in a larger image) the way the AnyText benchmark does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from anytext2_lcm.evaluate import ocr  # noqa: E402

FONT_DIRS = ["/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts", "/Library/Fonts",
             "C:/Windows/Fonts"]
# File-name stems of CJK fonts that also cover Latin (Droid Sans Fallback does not: no ASCII glyphs).
CJK_FONT_STEMS = ("notosanscjk", "notosanssc", "sourcehansans", "wqy-microhei", "wqy-zenhei", "arialuni")

WORDS = ["Hello", "AnyText", "Coffee", "Garden", "SALE", "Welcome",
         "你好世界", "深度学习", "北京大学", "欢迎光临", "人工智能", "中文字体"]


def _find_cjk_font() -> tuple[str, int] | None:
    """(path, index) of a CJK font with Latin glyphs, found by searching the font folders (never a fixed path).
    Regular weights first; in a .ttc, the Simplified-Chinese face (Noto Sans CJK SC)."""
    dirs = [Path(os.path.expanduser(d)) for d in FONT_DIRS]
    if os.environ.get("ANYTEXT2_FONT_DIR"):
        dirs.insert(0, Path(os.environ["ANYTEXT2_FONT_DIR"]))
    files = [p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".ttc", ".otf")]

    def rank(p: Path):
        name = p.name.lower().replace(" ", "")
        stem = next((k for k, s in enumerate(CJK_FONT_STEMS) if s in name), None)
        if stem is None or "mono" in name or "serif" in name:
            return None
        return (stem, "regular" not in name, "bold" in name or "black" in name or "light" in name, str(p))

    ranked = sorted((r, p) for p in files if (r := rank(p)) is not None)
    for _, p in ranked:
        for i in range(8 if p.suffix.lower() == ".ttc" else 1):
            try:
                family = ImageFont.truetype(str(p), 12, index=i).getname()[0]
            except OSError:
                break
            if family.endswith(" SC") or "WenQuanYi" in family or p.suffix.lower() != ".ttc":
                return str(p), i
        return str(p), 0
    return None


@pytest.fixture(scope="module")
def font():
    found = _find_cjk_font()
    if found is None:
        pytest.skip("no CJK font with Latin glyphs (Noto Sans CJK / WenQuanYi / Source Han Sans) in the font folders; "
                    "install fonts-noto-cjk or fonts-wqy-microhei")
    return ImageFont.truetype(found[0], 40, index=found[1])


@pytest.fixture(scope="module")
def reader():
    return ocr.TextReader()


def _render(text, font, fg=(0, 0, 0), bg=(255, 255, 255), margin=8):
    left, top, right, bottom = font.getbbox(text)
    im = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), bg)
    ImageDraw.Draw(im).text((margin - left, margin - top), text, font=font, fill=fg)
    return np.array(im)


def test_reads_clean_words(reader, font):
    crops = [_render(w, font) for w in WORDS]
    got = reader.recognize(crops)
    exact = sum(g == w for g, w in zip(got, WORDS))
    assert exact >= 0.9 * len(WORDS), list(zip(WORDS, got))
    # scores and input order are kept; BGR input reads the same here (black on white)
    scored = reader.recognize(crops[:3], return_scores=True)
    assert [s[0] for s in scored] == got[:3] and all(0 < s[1] <= 1 for s in scored)


def _scene_with_line(text, font, angle, size=(384, 512), center=(256, 192), fg=(20, 20, 120), seed=0):
    """A light, slightly noisy scene with one line of text rotated by ``angle`` degrees (counter-clockwise, cv2
    convention) about ``center``, and that line's position mask (its padded box, rotated the same way)."""
    h, w = size
    rng = np.random.default_rng(seed)
    bg = np.full((h, w, 3), (235, 225, 205), np.float32) + rng.normal(0, 4, (h, w, 3))
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left, bottom - top
    layer = Image.new("L", (w, h), 0)
    x0, y0 = center[0] - tw // 2, center[1] - th // 2
    ImageDraw.Draw(layer).text((x0 - left, y0 - top), text, font=font, fill=255)
    box = np.zeros((h, w), np.uint8)
    cv2.rectangle(box, (x0 - 6, y0 - 6), (x0 + tw + 6, y0 + th + 6), 1, thickness=-1)
    rot = cv2.getRotationMatrix2D(center, angle, 1.0)
    ink = cv2.warpAffine(np.array(layer), rot, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    mask = cv2.warpAffine(box, rot, (w, h), flags=cv2.INTER_NEAREST)
    img = bg * (1 - ink[..., None]) + np.array(fg, np.float32) * ink[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), mask, ink


@pytest.mark.parametrize("text,angle", [("AnyText2", 18.0), ("深度学习", -12.0)])
def test_read_lines_tilted(reader, font, text, angle):
    img, mask, ink = _scene_with_line(text, font, angle)
    assert (ink[mask == 0] > 0.5).sum() == 0  # the mask really covers the rotated text
    # a second, distractor line elsewhere must not leak into the crop
    other, other_mask, _ = _scene_with_line("Garden", font, 0.0, center=(256, 330), seed=1)
    img = np.where(other_mask[..., None] > 0, other, img)
    got = ocr.read_lines(img, [mask, other_mask.astype(bool)], reader=reader)
    assert got == [text, "Garden"]
    # the crop is upright: about as wide as the rendered line, not the whole image
    crop = reader.crop_lines(img, [mask])[0]
    left, top, right, bottom = font.getbbox(text)
    assert abs(crop.shape[1] - (right - left + 12)) <= 4 and abs(crop.shape[0] - (bottom - top + 12)) <= 4


def test_read_lines_vertical(reader, font):
    """A line rotated 90° clockwise (reading top to bottom) gives a tall crop, turned back by the 1.2 rule."""
    img, mask, _ = _scene_with_line("人工智能", font, -90.0)
    crop = reader.crop_lines(img, [mask])[0]
    assert crop.shape[0] > 1.2 * crop.shape[1]
    assert ocr.read_lines(img, [mask[..., None] * 255], reader=reader) == ["人工智能"]


def test_mask_checks(reader):
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        reader.read_lines(img, [np.zeros((32, 32), np.uint8)])
    assert reader.recognize([]) == []
    assert len(reader.charset) == 6624 and reader.charset[-1] == " "


def test_missing_model_names_the_install(monkeypatch, tmp_path):
    with pytest.raises(ocr.OCRModelNotFound, match="pip install --no-deps rapidocr-onnxruntime"):
        ocr.TextReader(model_path=tmp_path / "missing.onnx")
    monkeypatch.setattr(ocr.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(ocr.MODEL_ENV, raising=False)
    with pytest.raises(ocr.OCRModelNotFound, match="rapidocr_onnxruntime is not installed"):
        ocr.find_rec_model()
