"""Glyph, position and font-hint rendering: AnyText2's per-line images, as pure functions.

Used by the training data (``data.anyword``) and by the teacher's generation pipeline. All functions are
deterministic; the randomised training-time variants (position morphology, font hints from the image) are in
:mod:`anytext2_lcm.data.augment`.

* :func:`render_line` -- the original ``draw_glyph``: the text centred on an 80 x 512 canvas, scaled to 90 % of it,
  drawn without anti-aliasing. Input of the glyph OCR (``gly_line``).
* :func:`render_in_polygon` -- the original ``draw_glyph2``: the text fitted to the polygon's minimum-area rectangle
  (largest font size whose box fits, by the same binary search), spaces inserted between characters to fill the
  long side, stacked vertically when the rectangle is within 10 deg of the axes and taller than wide, rotated to
  the rectangle's angle (nearest-neighbour, about the rectangle centre), drawn in the line colour. Colour channels
  are clipped to [10, 255], so "unspecified" (500) draws white. (``glyphs``)
* :func:`polygon_mask` -- filled polygon (``positions`` without augmentation).
* :func:`render_font_hint` -- inference font hint: the text in the chosen font inside the polygon, white.
* :func:`positions_from_mask` -- the demo's user mask -> sorted polygons.

Written for Pillow >= 10 and OpenCV >= 4.5 (the original used Pillow < 10's ``getsize``/``getoffset`` and an OpenCV
angle convention that newer versions changed): the rotation angle is computed from the rectangle's corner points,
independent of OpenCV's angle convention, as the counter-clockwise on-screen angle of the long side in (-90, 90].
The result equals, pixel for pixel, the original's steps run on a whole canvas with the same Pillow (nearest-
neighbour rotation with Pillow's fixed-point sampling, the half-pixel offset of its expand-and-paste, colour blended
as Pillow's ``paste`` rounds; ``tests/test_glyphs.py`` checks this on random polygons). It is about 3x faster: the
text is drawn and rotated on a tile around it instead of the whole canvas, and the spacing loop predicts its answer
and confirms it with two measurements instead of trying 1, 2, ... 99 spaces.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ..conditioning import UNSPECIFIED_COLOR as _UNSPECIFIED
from .fonts import FontSpec, as_font_spec
from .prompts import TEXT_CAPTION_PHRASES, build_text_caption, parse_prompt_lines  # noqa: F401  (re-exported)

LINE_HEIGHT, LINE_WIDTH = 80, 512
"""Canvas of :func:`render_line` (the glyph-OCR input)."""
UNSPECIFIED_COLOR = (_UNSPECIFIED,) * 3
"""The original's "no colour chosen" RGB: ``conditioning.UNSPECIFIED_COLOR`` per channel."""
VERTICAL_ANGLE = 10.0
"""Rectangles within this many degrees of the axes and taller than wide are laid out vertically."""


class DegeneratePolygonError(ValueError):
    """The polygon is too small or malformed to hold any text (font size < 1 px)."""


# ---------------------------------------------------------------------------------------------------------------
# Line image (draw_glyph)
# ---------------------------------------------------------------------------------------------------------------


def render_line(text: str, font) -> np.ndarray:
    """``text`` centred on an 80 x 512 canvas at 90 % of its size, binary (no anti-aliasing).

    Args:
        text: one line (any length; the caller cuts it to max_chars).
        font: :class:`FontSpec`, a font path (``file#index``) or a path-based ``FreeTypeFont``.
    Returns:
        (80, 512) float32 in {0, 1}.
    """
    return render_line_u8(text, as_font_spec(font)).astype(np.float32)


def render_line_u8(text: str, spec: FontSpec) -> np.ndarray:
    """:func:`render_line` as (80, 512) uint8 {0, 1} (the form the data pipeline keeps)."""
    # Measure at 50 px, then scale so that the ink box fills 90 % of the canvas in its tighter direction.
    left, top, right, bottom = spec.load(50).getbbox(text)
    ratio = min(LINE_WIDTH * 0.9 / max(right - left, 5), LINE_HEIGHT * 0.9 / max(bottom - top, 5))
    font = spec.load(max(int(50 * ratio), 1))
    left, top, right, bottom = font.getbbox(text)
    # Pillow < 10: getsize() = (right - left, bottom) and getoffset() = (left, top); the original centred with those.
    x = (LINE_WIDTH - (right - left)) // 2
    y = (LINE_HEIGHT - bottom) // 2 - top // 2
    img = Image.new("1", (LINE_WIDTH, LINE_HEIGHT), 0)
    ImageDraw.Draw(img).text((x, y), text, font=font, fill=1)
    return np.asarray(img, dtype=np.uint8)


def cached_line_renderer(maxsize: int = 4096) -> Callable[[str, FontSpec], np.ndarray]:
    """A per-process LRU cache over :func:`render_line_u8` keyed by (text, font). ``maxsize=0``: no cache.

    Entries are stored bit-packed (5 KB instead of 40 KB: 4096 lines take 21 MB per process). A hit costs ~3 us
    instead of ~0.4 ms for rendering (``benchmarks/data_speed.py`` measures what that is worth per sample).
    """
    if maxsize <= 0:
        return render_line_u8

    @lru_cache(maxsize=maxsize)
    def packed(text: str, spec: FontSpec) -> np.ndarray:
        return np.packbits(render_line_u8(text, spec), axis=1)

    def render(text: str, spec: FontSpec) -> np.ndarray:
        return np.unpackbits(packed(text, spec), axis=1, count=LINE_WIDTH)

    render.cache_info = packed.cache_info  # type: ignore[attr-defined]
    render.cache_clear = packed.cache_clear  # type: ignore[attr-defined]
    return render


# ---------------------------------------------------------------------------------------------------------------
# Text fitted to a polygon (draw_glyph2)
# ---------------------------------------------------------------------------------------------------------------


def insert_spaces(text: str, n: int) -> str:
    """``n`` spaces between consecutive characters."""
    return (" " * n).join(text)


def long_side_angle(box: np.ndarray) -> float:
    """Counter-clockwise on-screen angle (degrees, in (-90, 90]) of a rectangle's long side, from its corners.

    Image y points down, so a side rising to the right has a positive angle. Independent of OpenCV's
    ``minAreaRect`` angle convention (which changed in OpenCV 4.5.1 and again in 5.x).
    """
    e1, e2 = box[1] - box[0], box[2] - box[1]
    v = e1 if float(np.hypot(*e1)) >= float(np.hypot(*e2)) else e2
    theta = math.degrees(math.atan2(-float(v[1]), float(v[0])))
    if theta <= -90:
        theta += 180
    elif theta > 90:
        theta -= 180
    return theta


def long_side_vector(box: np.ndarray) -> np.ndarray:
    """Unit vector (image coordinates) along a rectangle's long side."""
    e1, e2 = box[1] - box[0], box[2] - box[1]
    v = e1 if float(np.hypot(*e1)) >= float(np.hypot(*e2)) else e2
    n = float(np.hypot(*v))
    return (v / n).astype(np.float64) if n > 0 else np.array([1.0, 0.0])


def _fit_font_size(spec: FontSpec, text: str, long_side: float, short_side: float) -> float:
    """Largest size whose ink box fits (long, short): the original's binary search, float arithmetic included."""
    lo, hi = 1, short_side
    while lo < hi:
        mid = (lo + hi) // 2
        left, top, right, bottom = spec.load(max(int(mid), 1)).getbbox(text)
        if right - left <= long_side and bottom - top <= short_side:
            lo = mid + 1
        else:
            hi = mid
    return hi - 1


def _space_out(font, text: str, long_side: float, short_side: float) -> str:
    """Widest spacing (1..98 spaces between characters) that still fits; the text unchanged if 99 fit or 1 does not.

    The original tried 1, 2, ... 99 spaces in turn and kept ``i - 1`` at the first ``i`` that overflowed. The width
    grows with ``i`` by about one space advance per gap, so the first overflow is predicted from the widths at 0 and
    1 space and then confirmed exactly (``i`` overflows and ``i - 1`` does not); measuring a few short strings
    instead of up to 99 long ones is most of the renderer's speed. Bisection takes over when the prediction misses.
    """
    if len(text) < 2:
        return text

    def overflows(i: int) -> bool:
        left, top, right, bottom = font.getbbox(insert_spaces(text, i))
        return right - left > long_side or bottom - top > short_side

    def result(first: int | None) -> str:  # first overflowing i in 1..99, or None
        return text if first is None else insert_spaces(text, first - 1)

    if overflows(1):
        return result(1)
    w0 = font.getbbox(text)
    w1 = font.getbbox(insert_spaces(text, 1))
    step = (w1[2] - w1[0]) - (w0[2] - w0[0])
    if step > 0:
        guess = int((long_side - (w0[2] - w0[0])) // step) + 1
        for i in (guess, guess + 1, guess - 1, guess + 2):  # the boundary is almost always the guess itself
            if 2 <= i <= 99 and overflows(i) and not overflows(i - 1):
                return result(i)
        if guess > 99 and not overflows(99):
            return result(None)
    if not overflows(99):
        return result(None)
    lo, hi = 2, 99  # overflows(hi), not overflows(1): bisect for the first overflow
    while lo < hi:
        mid = (lo + hi) // 2
        if overflows(mid):
            hi = mid
        else:
            lo = mid + 1
    return result(lo)


def _div255(v: np.ndarray) -> np.ndarray:
    """round(v / 255) exactly as Pillow blends (``paste`` with a mask)."""
    v = v + 128
    return (v + (v >> 8)) >> 8


def _line_color(color) -> np.ndarray:
    c = np.asarray(color if color is not None else UNSPECIFIED_COLOR, dtype=np.float64).reshape(-1)[:3]
    if c.size != 3 or not np.all(np.isfinite(c)):
        raise ValueError(f"colour must be 3 finite numbers, got {color!r}")
    if c.mean() < 0:  # the original's "negative = white"
        c = np.full(3, 255.0)
    return np.clip(c, 10, 255).astype(np.int64)  # >= 10 keeps a glyph non-zero; 500 ("unspecified") -> white


def render_in_polygon(text: str, polygon, font, color_rgb=UNSPECIFIED_COLOR, height: int = 512, width: int = 512,
                      scale: int = 1, add_space: bool = True) -> np.ndarray:
    """``text`` fitted, spaced and rotated into ``polygon``, drawn in ``color_rgb`` on black.

    Args:
        text: the line (already cut to max_chars).
        polygon: (N, 2) x, y points in image pixels (N >= 3).
        font: :class:`FontSpec`, a font path or a path-based ``FreeTypeFont``.
        color_rgb: RGB 0-255 per channel; clipped to [10, 255] (500 = unspecified -> white; negative -> white).
        height, width: image size; the canvas is (height*scale, width*scale).
        scale: glyph scale (the WriteNet's ``glyph_scale``); the polygon is scaled with it.
        add_space: spread the characters over the long side.
    Returns:
        (height*scale, width*scale, 3) float32 in [0, 1] (colour x coverage).
    Raises:
        DegeneratePolygonError: the rectangle is too small for a 1 px font.
    """
    out = render_in_polygon_u8(text, polygon, as_font_spec(font), color_rgb, height, width, scale, add_space)
    return out.astype(np.float32) / 255.0


def render_in_polygon_u8(text: str, polygon, spec: FontSpec, color_rgb=UNSPECIFIED_COLOR, height: int = 512,
                         width: int = 512, scale: int = 1, add_space: bool = True) -> np.ndarray:
    """:func:`render_in_polygon` as uint8 0-255 (exactly the original's 8-bit image before its division by 255)."""
    canvas = np.zeros((height * scale, width * scale, 3), dtype=np.uint8)
    paint_in_polygon(canvas, text, polygon, spec, color_rgb, scale, add_space)
    return canvas


def paint_in_polygon(canvas: np.ndarray, text: str, polygon, spec: FontSpec, color_rgb=UNSPECIFIED_COLOR,
                     scale: int = 1, add_space: bool = True) -> None:
    """Draw :func:`render_in_polygon`'s result into a black (H*scale, W*scale, 3) uint8 ``canvas``, in place.

    Only the tile the text covers is written (the rest of the canvas is left as it is).
    """
    color = _line_color(color_rgb)
    alpha, (x0, y0) = render_alpha_tile(text, polygon, spec, canvas.shape[0], canvas.shape[1], scale, add_space)
    if alpha is not None:
        th, tw = alpha.shape
        canvas[y0:y0 + th, x0:x0 + tw] = _div255(alpha.astype(np.int32)[..., None] * color.astype(np.int32))


def draw_line(canvas: np.ndarray, text: str, polygon, spec: FontSpec, color_rgb=UNSPECIFIED_COLOR, scale: int = 1,
              line_renderer: Callable[[str, FontSpec], np.ndarray] = render_line_u8) -> np.ndarray:
    """One text line's glyph conditioning, the one way both the data reader and generation build it: the line
    fitted into ``polygon`` in its colour, painted into ``canvas`` ((H·scale, W·scale, 3) uint8, in place), and its
    80 × 512 line image for the glyph OCR, returned ((80, 512) uint8 {0, 1}; ``line_renderer`` may cache it).

    Raises:
        DegeneratePolygonError: the rectangle is too small for a 1 px font.
    """
    paint_in_polygon(canvas, text, polygon, spec, color_rgb, scale, True)
    return line_renderer(text, spec)


def render_alpha_tile(text: str, polygon, spec: FontSpec, canvas_h: int, canvas_w: int, scale: int = 1,
                      add_space: bool = True) -> tuple[np.ndarray | None, tuple[int, int]]:
    """Coverage (uint8 0-255) of the rendered line on the smallest canvas tile holding it, and the tile's (x, y).

    Returns ``(None, (0, 0))`` when nothing lands on the canvas.
    """
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * scale
    if len(poly) < 3 or not np.all(np.isfinite(poly)):
        raise DegeneratePolygonError(f"polygon needs >= 3 finite points, got {len(poly)}")
    rect = cv2.minAreaRect(poly.astype(np.float32))
    (cx, cy), (rw, rh) = rect[0], rect[1]
    box_f = cv2.boxPoints(rect)
    box = box_f.astype(np.int64)  # truncation toward zero, as np.int0 did
    long_side, short_side = max(rw, rh), min(rw, rh)
    angle = long_side_angle(box_f)

    vertical = False
    bw = int(box[:, 0].max() - box[:, 0].min())
    bh = int(box[:, 1].max() - box[:, 1].min())
    if abs(angle) % 90 < VERTICAL_ANGLE or abs(90 - abs(angle) % 90) % 90 < VERTICAL_ANGLE:
        if bh >= bw:
            vertical, angle = True, 0.0

    size = _fit_font_size(spec, text, long_side, short_side)
    if int(size) < 1:
        raise DegeneratePolygonError(f"rectangle {rw:.1f} x {rh:.1f} px is too small for text {text!r}")
    font = spec.load(int(size))

    extra_space = 0
    if add_space:
        if vertical:
            total = sum(b - t for _, t, _, b in (font.getbbox(c) for c in text))
            if total < long_side and len(text) > 1:
                extra_space = (long_side - total) // (len(text) - 1)
        else:
            text = _space_out(font, text, long_side, short_side)
    left, top, right, bottom = font.getbbox(text)
    text_w, text_h = right - left, bottom - top

    # Where each piece of text is drawn (canvas coordinates) and the canvas region its ink can reach.
    if not vertical:
        pieces = [((cx - text_w / 2, cy - text_h / 2 - top), text)]
    else:
        x_s = int(box[:, 0].min()) + bw // 2 - text_h // 2
        y_s = int(box[:, 1].min()) - top
        pieces = []
        for c in text:
            pieces.append(((x_s, y_s), c))
            _, t, _, b = font.getbbox(c)
            y_s += (b - t) + extra_space
    # The tile starts at or before every draw origin, so that Pillow splits each origin into the same integer and
    # fractional parts as on the full canvas (the fraction is a sub-pixel offset of the rasterised outline).
    ink = [_ink_box(font, xy, s) for xy, s in pieces]
    src = _clip_box((min([b[0] - 2 for b in ink] + [math.floor(xy[0]) for xy, _ in pieces]),
                     min([b[1] - 2 for b in ink] + [math.floor(xy[1]) for xy, _ in pieces]),
                     max(b[2] for b in ink) + 2, max(b[3] for b in ink) + 2), canvas_w, canvas_h)
    if src is None:
        return None, (0, 0)
    sx0, sy0, sx1, sy1 = src
    tile = Image.new("L", (sx1 - sx0, sy1 - sy0), 0)
    draw = ImageDraw.Draw(tile)
    for (x, y), s in pieces:
        draw.text((x - sx0, y - sy0), s, font=font, fill=255)
    if angle == 0:  # the original's rotate(0) is an exact copy
        return np.asarray(tile), (sx0, sy0)
    return _rotate_tile(tile, src, angle, (cx, cy), canvas_w, canvas_h)


def _ink_box(font, xy, s) -> tuple[float, float, float, float]:
    left, top, right, bottom = font.getbbox(s)
    return xy[0] + left, xy[1] + top, xy[0] + right, xy[1] + bottom


def _clip_box(b, w: int, h: int) -> tuple[int, int, int, int] | None:
    x0, y0 = max(int(math.floor(b[0])), 0), max(int(math.floor(b[1])), 0)
    x1, y1 = min(int(math.ceil(b[2])), w), min(int(math.ceil(b[3])), h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _rotate_tile(tile: Image.Image, src, angle: float, center, canvas_w: int, canvas_h: int):
    """Rotate the drawn tile exactly as the original rotated its whole canvas layer.

    The original called ``layer.rotate(angle, expand=1, center=c)`` on the W x H layer and pasted the result at
    ``int((W - nw) / 2), int((H - nh) / 2)``: a rotation about ``c`` plus half a pixel of shift along an axis whose
    expanded size differs from the canvas by an odd number. Pillow samples that rotation (NEAREST) with 16.16
    fixed-point steps; the tile's coefficients are chosen so that its fixed-point source coordinates equal the
    full canvas's, minus the tile origin, so every pixel comes out identical.
    """
    # Pillow's rotate(): inverse map (output -> input) about the centre, then the expand translation.
    a_rad = -math.radians(angle)
    a, b = round(math.cos(a_rad), 15), round(math.sin(a_rad), 15)
    d, e = round(-math.sin(a_rad), 15), round(math.cos(a_rad), 15)
    cx, cy = center
    c0 = a * -cx + b * -cy + 0.0 + cx
    f0 = d * -cx + e * -cy + 0.0 + cy
    xs = [a * x + b * y + c0 for x, y in ((0, 0), (canvas_w, 0), (canvas_w, canvas_h), (0, canvas_h))]
    ys = [d * x + e * y + f0 for x, y in ((0, 0), (canvas_w, 0), (canvas_w, canvas_h), (0, canvas_h))]
    nw = math.ceil(max(xs)) - math.floor(min(xs))
    nh = math.ceil(max(ys)) - math.floor(min(ys))
    tx, ty = -(nw - canvas_w) / 2.0, -(nh - canvas_h) / 2.0
    c1, f1 = a * tx + b * ty + c0, d * tx + e * ty + f0
    ox, oy = int((canvas_w - nw) / 2), int((canvas_h - nh) / 2)  # paste offset of the expanded image

    # Destination tile: the source tile's corners rotated about the centre, plus a margin, on the canvas.
    sx0, sy0, sx1, sy1 = src
    corners = np.array([[sx0, sy0], [sx1, sy0], [sx1, sy1], [sx0, sy1]], dtype=np.float64)
    rad = math.radians(angle)
    rot = np.array([[math.cos(rad), math.sin(rad)], [-math.sin(rad), math.cos(rad)]])
    moved = (corners - [cx, cy]) @ rot.T + [cx, cy]
    dst = _clip_box((moved[:, 0].min() - 3, moved[:, 1].min() - 3, moved[:, 0].max() + 3, moved[:, 1].max() + 3),
                    canvas_w, canvas_h)
    if dst is None:
        return None, (0, 0)
    dx0, dy0, dx1, dy1 = dst

    # Pillow's affine NEAREST: source x of output (x, y) = (FIX(c + a/2 + b/2) + y FIX(b) + x FIX(a)) >> 16.
    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    ux, uy = dx0 - ox, dy0 - oy  # tile pixel (0, 0) is expanded-image pixel (ux, uy)
    k2 = fix(c1 + a * 0.5 + b * 0.5) + uy * fix(b) + ux * fix(a) - sx0 * 65536
    k5 = fix(f1 + d * 0.5 + e * 0.5) + uy * fix(e) + ux * fix(d) - sy0 * 65536
    coeffs = (a, b, k2 / 65536.0 - a * 0.5 - b * 0.5, d, e, k5 / 65536.0 - d * 0.5 - e * 0.5)
    out = tile.transform((dx1 - dx0, dy1 - dy0), Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST)
    return np.asarray(out), (dx0, dy0)


# ---------------------------------------------------------------------------------------------------------------
# Masks and font hints
# ---------------------------------------------------------------------------------------------------------------


def polygon_points(polygon) -> np.ndarray:
    """(N, 1, 2) int32 points for OpenCV drawing (rounded)."""
    return np.rint(np.asarray(polygon, dtype=np.float64).reshape(-1, 2)).astype(np.int32).reshape(-1, 1, 2)


def polygon_mask_u8(polygon, height: int, width: int) -> np.ndarray:
    """Filled polygon, (H, W) uint8 {0, 1}."""
    img = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(img, [polygon_points(polygon)], 1)
    return img


def polygon_mask(polygon, height: int, width: int) -> np.ndarray:
    """Filled polygon (the line's position), (H, W) float32 in {0, 1}."""
    return polygon_mask_u8(polygon, height, width).astype(np.float32)


def render_font_hint(text: str, polygon, font, height: int, width: int) -> np.ndarray:
    """Inference font hint of one line: ``text`` in the chosen ``font`` inside ``polygon``, white on black.

    The pipeline sums the lines' hints and clips to [0, 1] (``font_hint``). Returns (H, W) float32 in [0, 1].
    """
    spec = as_font_spec(font)
    alpha, (x0, y0) = render_alpha_tile(text, polygon, spec, height, width, 1, True)
    out = np.zeros((height, width), dtype=np.float32)
    if alpha is not None:
        # white (255) blended by coverage, as the original drew it, then / 255
        out[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = _div255(alpha.astype(np.int64) * 255) / 255.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# User mask -> positions (the demo)
# ---------------------------------------------------------------------------------------------------------------

_SORT_KEYS = {"vertical": (1, 0), "↕": (1, 0), "y": (1, 0), "horizontal": (0, 1), "↔": (0, 1), "x": (0, 1)}


def positions_from_mask(mask_image: np.ndarray, sort: str = "vertical", min_area: int = 20, gap: int = 102,
                        return_masks: bool = False):
    """Split a drawn position mask into one polygon per text line, in reading order.

    As the AnyText2 demo: the first channel is thresholded at 254 (only pure white counts), split into
    8-connected components with area >= ``min_area``, sorted by ``(cy // gap, cx // gap)`` (``sort="vertical"``,
    top-down first) or ``(cx // gap, cy // gap)`` (``"horizontal"``), and each component's largest outer contour is
    simplified with ``approxPolyDP`` (epsilon = 0.01 x perimeter).

    Args:
        mask_image: (H, W) or (H, W, C) uint8, white strokes on black.
    Returns:
        list of (N, 2) int32 polygons; with ``return_masks``, a list of (polygon, (H, W) float32 {0, 1} mask) where
        the mask is the component with its polygon filled in (the demo's position image).
    """
    if sort not in _SORT_KEYS:
        raise ValueError(f"sort must be one of {sorted(_SORT_KEYS)}, got {sort!r}")
    img = np.asarray(mask_image)
    if img.ndim == 3:
        img = img[..., 0]
    img = cv2.convertScaleAbs(img)
    _, img = cv2.threshold(img, 254, 255, cv2.THRESH_BINARY)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(img)
    comps = [(lab, centroids[lab]) for lab in range(1, n) if stats[lab, cv2.CC_STAT_AREA] >= min_area]
    fir, sec = _SORT_KEYS[sort]
    comps.sort(key=lambda c: (c[1][fir] // gap, c[1][sec] // gap))  # stable, as the demo's list.sort
    out = []
    for lab, _ in comps:
        comp = np.where(labels == lab, 255, 0).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        biggest = max(contours, key=cv2.contourArea)
        poly = cv2.approxPolyDP(biggest, 0.01 * cv2.arcLength(biggest, True), True).reshape(-1, 2).astype(np.int32)
        if return_masks:
            cv2.drawContours(comp, [poly], -1, 255, -1)
            out.append((poly, (comp > 0).astype(np.float32)))
        else:
            out.append(poly)
    return out

