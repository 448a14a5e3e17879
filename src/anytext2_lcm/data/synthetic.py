"""A synthetic dataset in the AnyWord-3M format: real-looking backgrounds with rendered Latin and Chinese lines.

Backgrounds are the photographs that ship inside scikit-image (``skimage.data``: astronaut, coffee, cat, rocket,
Hubble deep field, retina, ...), randomly cropped, flipped and recoloured, or procedural ones (gradients, stripes,
smooth noise, paper). Each image gets 1-5 text lines (words from the built-in lists below), each in a font that has
all its glyphs, at a random size, colour (contrasting with the background) and angle, including vertical lines;
lines do not overlap. Each line is drawn with the same fitting as the glyph renderer (:func:`~.glyphs.
render_alpha_tile`) into its rotated rectangle, so the recorded polygon is where the text is. Sometimes a small,
faint extra word is added and recorded with ``"valid": false`` (as AnyWord marks illegible text).

Output: ``OUT/images/NNNNNN.jpg`` and ``OUT/anyword_synth[_KKK].json`` with ``data_root = "images"`` (relative to
the JSON). Image i depends only on (seed, i) and the fonts available, so any part can be regenerated.
"""

from __future__ import annotations

import colorsys
import functools
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..atomic import save_image, write_json
from .fonts import FontLibrary, FontSpec, system_font_files
from .glyphs import render_alpha_tile
from .words import VOCABULARIES, random_text

log = logging.getLogger(__name__)

COLOR_NAMES = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30), "green": (30, 160, 60),
    "blue": (30, 70, 200), "yellow": (240, 210, 40), "orange": (245, 140, 30), "purple": (130, 50, 170),
    "pink": (240, 120, 170), "brown": (120, 70, 30), "grey": (128, 128, 128), "cyan": (40, 190, 210),
}


@dataclass(kw_only=True)
class SynthConfig:
    """What :func:`write_dataset` makes."""

    num: int
    """Number of images."""
    size: int = 512
    """Image side in pixels (with vary_size: the middle of the range)."""
    vary_size: bool = False
    """Random sizes (0.75-1.5 x size, non-square), to exercise the reader's resizing."""
    min_lines: int = 1
    """Fewest valid text lines per image."""
    max_lines: int = 5
    """Most valid text lines per image (fewer if they do not fit without overlap)."""
    chinese_prob: float = 0.4
    """Probability that a line is Chinese (else Latin)."""
    vertical_prob: float = 0.15
    """Probability that a line of at most 8 characters is laid out vertically (top to bottom)."""
    invalid_prob: float = 0.1
    """Probability that an image also gets a faint word recorded as valid: false."""
    no_color_prob: float = 0.1
    """Probability that a line's colour is not recorded (the reader then uses 500 = unspecified)."""
    seed: int = 0
    """Seed of everything random (backgrounds, words, layout, fonts, colours); same seed, same bytes."""
    jpeg_quality: int = 92
    """JPEG quality of the written images."""
    shard_size: int = 10000
    """Rows per JSON file."""
    font_dir: str | None = None
    """Fonts to draw with (a FontLibrary folder); default: the system's fonts, found by file."""
    font: str | None = None
    """One font file (``FILE`` or ``FILE#INDEX``) for every line, or "default": the glyph renderer's default font
    (the font the model's glyph images use, so a line's image and its glyphs have the same shapes). Overrides
    ``font_dir``."""
    backgrounds: str = "mixed"
    """"mixed": scikit-image photographs (70 %) and procedural backgrounds; "simple": plain colours, gradients and
    simple textures only (the testbed)."""
    vocabulary: str = "builtin"
    """Where line texts come from: "builtin" (sign-like words), "testbed-train" (random strings, never a held-out
    word), "testbed-heldout" (the held-out words), or a UTF-8 file with one line per row (see ``data.words``)."""
    text_size: tuple[float, float] = (0.04, 0.12)
    """Range of the font size as a fraction of the image's short side; a line too long for the image at the drawn
    size is drawn smaller (down to the low end) before it is given up."""
    max_angle: float = 60.0
    """Largest tilt of a horizontal line in degrees (65 % of lines lie within ±3°, 25 % within ±25°, the rest within
    ±60°; each range is capped at this)."""

    def __post_init__(self) -> None:
        from ..config import ConfigError

        if self.num < 1:
            raise ConfigError(f"make-data.num={self.num}: must be >= 1")
        if self.size < 64:
            raise ConfigError(f"make-data.size={self.size}: must be >= 64")
        if not 1 <= self.min_lines <= self.max_lines:
            raise ConfigError(f"make-data.min_lines={self.min_lines}, max_lines={self.max_lines}: "
                              "need 1 <= min_lines <= max_lines")
        if self.shard_size < 1:
            raise ConfigError(f"make-data.shard_size={self.shard_size}: must be >= 1")
        for name in ("chinese_prob", "vertical_prob", "invalid_prob", "no_color_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"make-data.{name}={getattr(self, name)}: must lie in [0, 1]")
        if self.backgrounds not in ("mixed", "simple"):
            raise ConfigError(f"make-data.backgrounds={self.backgrounds!r}: must be 'mixed' or 'simple'")
        if self.vocabulary not in VOCABULARIES and not os.path.isfile(self.vocabulary):
            raise ConfigError(f"make-data.vocabulary={self.vocabulary!r}: not one of {', '.join(VOCABULARIES)} "
                              "and not a word-list file")
        lo, hi = (float(v) for v in self.text_size)
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"make-data.text_size={self.text_size!r}: need 0 < low <= high < 1")
        self.text_size = (lo, hi)
        if not 0 <= self.max_angle <= 90:
            raise ConfigError(f"make-data.max_angle={self.max_angle!r}: must lie in [0, 90]")


# ---------------------------------------------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SynthFonts:
    latin: list[FontSpec]
    cjk: list[FontSpec]

    def pick(self, text: str, chinese: bool, rng: np.random.Generator) -> FontSpec | None:
        pool = self.cjk if chinese else self.latin
        ok = [f for f in pool if f.covers(text)]
        return ok[int(rng.integers(len(ok)))] if ok else None


@functools.lru_cache(maxsize=4)
def synth_fonts(font_dir: str | None = None, font: str | None = None) -> SynthFonts:
    """Fonts that cover basic Latin (and, for ``cjk``, common Chinese), sorted by path (deterministic); ``font``:
    just that one ("default": the glyph renderer's default font)."""
    if font:
        from .fonts import find_default_font

        spec = find_default_font(None if font == "default" else font)
        return SynthFonts([spec], [spec] if _safe_covers(spec, "的一是了你好世界") else [])
    if font_dir:
        specs = FontLibrary.from_dir(font_dir).all_fonts()
    else:
        specs = []
        for p in system_font_files():
            base = os.path.basename(p).lower()
            if any(k in base for k in ("emoji", "symbol", "math", "icon", "awesome")):
                continue
            try:
                specs.append(FontSpec.parse(p))
            except OSError:
                continue
    latin = [f for f in specs if _safe_covers(f, "AaBbZz019")]
    cjk = [f for f in latin if _safe_covers(f, "的一是了你好世界")]
    if not cjk:
        raise FileNotFoundError("make-data needs a CJK-capable font: install fonts-noto-cjk or fonts-wqy-microhei "
                                "(`make fonts`) or pass --font-dir")
    return SynthFonts(sorted(latin), sorted(cjk))


def _safe_covers(spec: FontSpec, text: str) -> bool:
    try:
        return spec.covers(text)
    except OSError:  # an unreadable font file is simply not used
        return False


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------------------------

_PHOTOS = {
    "astronaut": "a photo of an astronaut", "coffee": "a cup of coffee on a table", "chelsea": "a photo of a cat",
    "rocket": "a rocket on a launch pad", "hubble_deep_field": "a starry deep-space sky",
    "retina": "a medical image of a retina", "immunohistochemistry": "a microscope image of stained tissue",
    "page": "a scanned book page", "camera": "a black and white photo of a cameraman", "brick": "a brick wall",
    "grass": "a patch of grass", "gravel": "gravel on the ground", "moon": "the surface of the moon",
    "coins": "old coins on a table", "text": "handwriting on paper", "clock": "a clock face",
    "colorwheel": "a colour wheel", "logo": "a logo on a white background", "cell": "a microscope image of a cell",
}


@functools.lru_cache(maxsize=1)
def background_photos() -> tuple[tuple[str, str, np.ndarray], ...]:
    """(name, description, RGB uint8) of the scikit-image sample photos that load offline."""
    from skimage import data as skdata

    out = []
    for name, desc in _PHOTOS.items():
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception as e:  # a missing optional image (needs pooch/network) is just not used
            log.debug("skimage.data.%s unavailable: %s", name, e)
            continue
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append((name, desc, np.ascontiguousarray(img[..., :3])))
    if not out:
        raise RuntimeError("no scikit-image sample images could be loaded")
    return tuple(out)


def _recolor(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    if float(hsv[..., 1].mean()) < 8 and rng.random() < 0.6:  # grey photo: tint it
        hsv[..., 0] = rng.uniform(0, 180)
        hsv[..., 1] = rng.uniform(30, 120)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-25, 25)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out = (out - 128) * rng.uniform(0.75, 1.15) + 128 + rng.uniform(-25, 25)
    return np.clip(out, 0, 255).astype(np.uint8)


def _photo_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    photos = background_photos()
    name, desc, src = photos[int(rng.integers(len(photos)))]
    sh, sw = src.shape[:2]
    frac = rng.uniform(0.35, 1.0)
    ch = max(int(sh * frac), 16)
    cw = max(min(int(ch * w / h * rng.uniform(0.85, 1.15)), sw), 16)
    ch = min(ch, sh)
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_AREA)
    return _recolor(img, rng), desc


def _random_color(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0))
    return np.array([r, g, b]) * 255


def _simple_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A plain colour (a third), else a gradient, soft stripes or paper."""
    if rng.random() < 1 / 3:
        c = _random_color(rng)
        img = np.broadcast_to(c[None, None], (h, w, 3)) + rng.normal(0, 2.0, (h, w, 1))
        return np.clip(img, 0, 255).astype(np.uint8), "a plain background"
    return _procedural_background(rng, w, h, kinds=(0, 1, 3))


def _procedural_background(rng: np.random.Generator, w: int, h: int,
                           kinds: tuple[int, ...] = (0, 1, 2, 3)) -> tuple[np.ndarray, str]:
    kind = kinds[int(rng.integers(len(kinds)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = _random_color(rng), _random_color(rng)
    if kind == 0:
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        desc = "a smooth gradient background"
    elif kind == 1:
        period = rng.uniform(20, 120)
        a = rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        desc = "a striped pattern"
    elif kind == 2:
        low = rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        t = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        desc = "an abstract colourful background"
    else:
        t = np.zeros((h, w), np.float32)
        c1 = np.array([235, 225, 205]) + rng.uniform(-20, 15, 3)
        desc = "a textured paper background"
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    grain = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), rng.uniform(0.5, 2.0))
    img = img + grain[..., None] * rng.uniform(3, 12)
    return np.clip(img, 0, 255).astype(np.uint8), desc


# ---------------------------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------------------------


def _rotated_rect(cx: float, cy: float, long_side: float, short_side: float, deg: float) -> np.ndarray:
    """Corners (4, 2) of a rectangle whose long side is at ``deg`` degrees counter-clockwise on screen."""
    t = math.radians(deg)
    u = np.array([math.cos(t), -math.sin(t)]) * long_side / 2
    v = np.array([math.sin(t), math.cos(t)]) * short_side / 2
    c = np.array([cx, cy])
    return np.array([c - u - v, c + u - v, c + u + v, c - u + v])


def _line_box(font, text: str, vertical: bool) -> tuple[float, float]:
    """(long, short) side of a rectangle that holds ``text`` at this font size, with a small margin."""
    if vertical:
        heights = [font.getbbox(c)[3] - font.getbbox(c)[1] for c in text]
        widths = [font.getbbox(c)[2] - font.getbbox(c)[0] for c in text]
        gap = 0.15 * font.size
        return sum(heights) + gap * (len(text) + 1), max(widths) + 0.3 * font.size
    left, top, right, bottom = font.getbbox(text)
    return (right - left) + 0.3 * font.size, (bottom - top) + 0.3 * font.size


def _contrast_color(region_mean: float, rng: np.random.Generator) -> np.ndarray:
    best, score = None, -1.0
    for _ in range(8):
        c = np.array([0, 0, 0]) if rng.random() < 0.15 else (
            np.array([255, 255, 255]) if rng.random() < 0.15 else _random_color(rng))
        lum = float(c @ [0.299, 0.587, 0.114])
        if abs(lum - region_mean) > score:
            best, score = c, abs(lum - region_mean)
    return np.round(best).astype(np.int64)


def _color_name(rgb) -> str:
    return min(COLOR_NAMES, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLOR_NAMES[k], rgb)))


def _place_line(img: np.ndarray, occupied: np.ndarray, text: str, spec: FontSpec, vertical: bool, size_px: int,
                rng: np.random.Generator, faint: bool = False, min_size_px: int | None = None,
                max_angle: float = 60.0):
    """Try to put ``text`` somewhere free; returns (polygon (4, 2) float, colour) or None. A line longer than the
    image at ``size_px`` is drawn smaller, down to ``min_size_px``."""
    h, w = img.shape[:2]
    limit = 0.92 * (h if vertical else w)
    font = spec.load(size_px)
    long_side, short_side = _line_box(font, text, vertical)
    if long_side > limit and min_size_px is not None and min_size_px < size_px:
        size_px = max(min_size_px, int(size_px * limit / long_side))
        font = spec.load(size_px)
        long_side, short_side = _line_box(font, text, vertical)
    if long_side > limit or short_side < 4:
        return None
    if vertical:
        deg = 90.0 + rng.uniform(-3, 3)
    else:
        r = rng.random()
        span = 3.0 if r < 0.65 else (25.0 if r < 0.9 else 60.0)
        span = min(span, max_angle)
        deg = rng.uniform(-span, span)
    for _ in range(30):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        poly = _rotated_rect(cx, cy, long_side, short_side, deg)
        if poly[:, 0].min() < 2 or poly[:, 1].min() < 2 or poly[:, 0].max() > w - 3 or poly[:, 1].max() > h - 3:
            continue
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.rint(poly).astype(np.int32)], 1)
        if (mask & occupied).any():
            continue
        occupied |= cv2.dilate(mask, np.ones((9, 9), np.uint8))
        alpha, (x0, y0) = render_alpha_tile(text, poly, spec, h, w, 1, add_space=vertical)
        region = img[mask.astype(bool)].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        color = _contrast_color(float(region.mean()), rng)
        if alpha is not None:
            a = alpha.astype(np.float32) / 255.0
            if faint:
                a = cv2.GaussianBlur(a, (0, 0), 1.2) * 0.45
            elif rng.random() < 0.2:  # a soft drop shadow under the text
                sh = np.roll(np.roll(cv2.GaussianBlur(a, (0, 0), 1.5), 2, 0), 2, 1)[..., None] * 0.5
                tile = img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]].astype(np.float32)
                img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = (tile * (1 - sh)).astype(np.uint8)
            tile = img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]].astype(np.float32)
            blended = tile * (1 - a[..., None]) + color.astype(np.float32) * a[..., None]
            img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return poly, color
    return None


# ---------------------------------------------------------------------------------------------------------------
# One image, the whole dataset
# ---------------------------------------------------------------------------------------------------------------


def generate_sample(index: int, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """Image ``index``: (H, W, 3) uint8 RGB and its ``data_list`` entry (without ``img_name``)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    fonts = synth_fonts(cfg.font_dir, cfg.font)
    if cfg.vary_size:
        w = int(round(cfg.size * rng.uniform(0.75, 1.5) / 8)) * 8
        h = int(round(w * rng.uniform(0.75, 1.33) / 8)) * 8
    else:
        w = h = cfg.size
    if cfg.backgrounds == "simple":
        img, desc = _simple_background(rng, w, h)
    else:
        img, desc = _photo_background(rng, w, h) if rng.random() < 0.7 else _procedural_background(rng, w, h)
    occupied = np.zeros((h, w), np.uint8)
    n_target = int(rng.integers(cfg.min_lines, cfg.max_lines + 1))
    annotations, used_colors, texts, langs = [], [], [], []
    attempts = 0
    while len(annotations) < n_target and attempts < 4 * n_target:
        attempts += 1
        chinese = rng.random() < cfg.chinese_prob
        text = random_text(cfg.vocabulary, rng, chinese)
        spec = fonts.pick(text, chinese, rng)
        vertical = rng.random() < cfg.vertical_prob and len(text) <= 8
        size_px = int(min(w, h) * rng.uniform(*cfg.text_size))
        if spec is None or size_px < 8:
            continue
        placed = _place_line(img, occupied, text, spec, vertical, size_px, rng,
                             min_size_px=max(8, int(min(w, h) * cfg.text_size[0])), max_angle=cfg.max_angle)
        if placed is None:
            continue
        poly, color = placed
        ann = {"polygon": np.rint(poly).astype(int).tolist(), "text": text,
               "language": "Chinese" if chinese else "Latin", "valid": True}
        if rng.random() >= cfg.no_color_prob:
            ann["color"] = [int(c) for c in color]
        annotations.append(ann)
        used_colors.append(_color_name(color))
        texts.append(text)
        langs.append("Chinese" if chinese else "English")
    if rng.random() < cfg.invalid_prob:
        text = random_text(cfg.vocabulary, rng, False)
        spec = fonts.pick(text, False, rng)
        if spec is not None:
            placed = _place_line(img, occupied, text, spec, False, max(int(min(w, h) * 0.025), 8), rng, faint=True)
            if placed is not None:
                annotations.append({"polygon": np.rint(placed[0]).astype(int).tolist(), "text": text,
                                    "language": "Latin", "valid": False})
    row = {"caption": _caption(desc, texts, langs, used_colors, rng), "annotations": annotations}
    if rng.random() < 0.5:
        row["wm_score"] = round(float(rng.uniform(0, 0.3)), 3)
    return img, row


def _caption(desc: str, texts: list[str], langs: list[str], colors: list[str], rng: np.random.Generator) -> str:
    if not texts:
        return desc
    quoted = ", ".join(f'"{t}"' for t in texts[:3])
    lang = " and ".join(sorted(set(langs)))
    color = " and ".join(sorted(set(colors))[:2])
    templates = (f"{desc} with {color} {lang} text that reads {quoted}",
                 f"{desc}, with the words {quoted} written on it",
                 f"{desc} and {len(texts)} line{'s' if len(texts) > 1 else ''} of {lang} text in {color}")
    return templates[int(rng.integers(len(templates)))]


def _write_chunk(args) -> list[dict]:
    indices, cfg, img_dir = args
    rows = []
    for i in indices:
        img, row = generate_sample(i, cfg)
        name = f"{i:06d}.jpg"
        save_image(os.path.join(img_dir, name), img, format="JPEG", quality=cfg.jpeg_quality)
        rows.append({"img_name": name, **row})
    return rows


def write_dataset(cfg: SynthConfig, out: str | os.PathLike, workers: int = 1) -> list[Path]:
    """Write ``cfg.num`` images and their AnyWord JSON file(s) to ``out``; returns the JSON paths.

    Files are written to temporary names and renamed, so an interrupted run leaves no half-written JSON.
    """
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    synth_fonts(cfg.font_dir, cfg.font)  # fail early (and once) when no CJK font exists
    chunk = 16
    jobs = [(list(range(s, min(s + chunk, cfg.num))), cfg, str(img_dir)) for s in range(0, cfg.num, chunk)]
    rows: list[dict] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for part in ex.map(_write_chunk, jobs):
                rows += part
    else:
        for job in jobs:
            rows += _write_chunk(job)
    paths = []
    n_shards = math.ceil(len(rows) / cfg.shard_size)
    for k in range(n_shards):
        name = "anyword_synth.json" if n_shards == 1 else f"anyword_synth_{k:03d}.json"
        content = {"data_root": "images", "data_list": rows[k * cfg.shard_size:(k + 1) * cfg.shard_size]}
        paths.append(write_json(out / name, content, ensure_ascii=False, indent=1))
    n_lines = sum(sum(1 for a in r["annotations"] if a.get("valid", True)) for r in rows)
    log.info("wrote %d images with %d text lines to %s (%s)", len(rows), n_lines, out,
             ", ".join(p.name for p in paths))
    return paths
