"""The original demo's extras around a request's text conditioning, as pure functions (``ms_wrapper.forward``):

* :func:`mimic_font_crop` -- "Mimic From Image": the font hint of a line taken from a brushed text region of an
  uploaded image instead of a font file;
* :func:`revise_position` -- "Revise Position": a line's position replaced by the minimum-area rectangle of its
  rendered glyphs;
* :func:`hollow_font_hint` -- "Use hollow font": the font-hint canvas turned into hollow, outlined glyphs on a
  thresholded noise background;
* :func:`debug_images` / :func:`write_debug_images` -- "Show Debug": the glyph, position and font-hint images.

The noise background. The original reads ``font/bg_noise.png``, which is not distributed with its code or
weights. :func:`hollow_noise` draws uniform white noise (0..255 per pixel) from a fixed seed at the canvas size
instead, and the original's steps then run unchanged (pixels below 230 set to 0, Gaussian adaptive threshold,
block 11, C 2). With uniform noise about 10 % of the pixels survive the cut, so the threshold keeps sparse specks
and blanks the rest: a mostly black background with scattered white points, and glyph interiors with scattered
holes, with a one-pixel outline above and left of the glyphs (the original's 3x3 minus 2x2 dilation; OpenCV anchors
the 2x2 kernel off-centre, so the other two sides get none). That is the look of the training font hints, which are adaptive-threshold
crops of real photographs (strokes plus texture specks on black, :func:`~anytext2_lcm.data.augment.training_font_hint`);
a smooth or bright noise would instead flood the background with white. The seed is fixed so that the same request
gives the same bytes; the exact pattern of the original's image cannot be reproduced.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

HOLLOW_NOISE_SEED = 0
"""Seed of the uniform noise that replaces the original's ``font/bg_noise.png``."""


def hollow_noise(height: int, width: int) -> np.ndarray:
    """(H, W) uint8 uniform noise from :data:`HOLLOW_NOISE_SEED` (the same for every call of a size)."""
    return np.random.default_rng(HOLLOW_NOISE_SEED).integers(0, 256, (height, width), dtype=np.uint8)


def hollow_font_hint(canvas: np.ndarray) -> np.ndarray:
    """The original's ``font_hollow`` transform of a font-hint canvas.

    Args:
        canvas: (H, W) float in [0, 1], the sum of the lines' font hints (clipped).
    Returns:
        (H, W) float32 in [0, 1]: (glyphs − noise background + a one-pixel outline) inside the glyphs, the noise
        background outside; an empty canvas is returned as it is.
    """
    fg = np.clip(np.asarray(canvas, dtype=np.float64), 0, 1) * 255
    if fg.mean() <= 0:
        return np.asarray(canvas, dtype=np.float32)
    noise = hollow_noise(*fg.shape)
    noise[noise < 230] = 0
    bg = cv2.adaptiveThreshold(noise, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2)
    fg_u8 = fg.astype(np.uint8)
    ring = cv2.dilate(fg_u8, np.ones((3, 3), np.uint8)) - cv2.dilate(fg_u8, np.ones((2, 2), np.uint8))
    out = np.clip(fg - bg + ring, 0, 255)
    bg[fg > 0] = 0
    return (np.clip(out + bg, 0, 255) / 255.0).astype(np.float32)


def _binary_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 3] if m.shape[2] == 4 else m.max(axis=2)
    if m.ndim != 2:
        raise ValueError(f"the mask must be an (H, W) or (H, W, C) image, got shape {m.shape}")
    if m.shape != shape:
        m = cv2.resize(np.ascontiguousarray(m.astype(np.uint8)), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.where(m > 0, 255, 0).astype(np.uint8)


def mimic_font_crop(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The font-OCR input of a line whose font is mimicked from an image region (the original's
    ``draw_font_hint(image, polygon)`` then ``crop_image(hint, mask)``).

    The brushed region's largest contour, simplified (``approxPolyDP``, ε = 1 % of its perimeter), selects the
    strokes of the image (grey, Gaussian adaptive threshold, block 11, C 2: pixels darker than their surroundings;
    the inference setting of :func:`~anytext2_lcm.data.augment.training_font_hint`: no strip removed, no
    augmentation); the minimum-area rectangle of the mask is then cut out upright. The original demo flips the
    uploaded image to BGR before its RGB-to-grey conversion (red and blue weights swapped); here the grey value is
    computed from RGB as intended.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) or (H, W, C) image, non-zero = brushed (an alpha channel is used when there is one); resized
            to the image (nearest) when its size differs.
    Returns:
        (3, h, w) float32 tensor in 0..255 (h, w: the sides of the mask's rectangle), the image the font OCR reads.
    Raises:
        ValueError: an empty mask.
    """
    from ..models.ocr import crop_by_mask
    from .augment import training_font_hint

    image = np.ascontiguousarray(np.asarray(image)[..., :3]).astype(np.uint8)
    m = _binary_mask(mask, image.shape[:2])
    if not m.any():
        raise ValueError("the mask has no brushed pixel: brush over the text whose font to mimic")
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    biggest = max(contours, key=cv2.contourArea)
    poly = cv2.approxPolyDP(biggest, 0.01 * cv2.arcLength(biggest, True), True).reshape(-1, 2)
    strokes = training_font_hint(image, poly, np.random.default_rng(0), prob=1.0, area_range=(1.0, 1.0),
                                 randaug=False)
    hint = torch.from_numpy(strokes.astype(np.float32) * 255.0)[None].repeat(3, 1, 1)
    return crop_by_mask(hint, m)


def revise_position(glyphs: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The original's ``revise_pos``: the glyphs, resized to the image, closed with an (H/10) x (W/10) kernel; when
    that leaves exactly one region, the position becomes its minimum-area rectangle (corners truncated to integers,
    as ``np.int0``), filled over the closed glyphs.

    Args:
        glyphs: (gH, gW, 3) float in [0, 1], the line's rendered glyphs (at ``glyph_scale`` times the image size).
    Returns:
        (position (H, W) float32 in [0, 1], rectangle (4, 2) int64), or None when the glyphs do not close into one
        region (the position is then kept, with a warning, as the original does).
    """
    g = cv2.resize(np.asarray(glyphs, dtype=np.float32), (width, height))
    closed = cv2.morphologyEx((g * 255).astype(np.uint8), cv2.MORPH_CLOSE,
                              np.ones((max(1, height // 10), max(1, width // 10)), np.uint8), iterations=1)
    first = np.ascontiguousarray(closed[..., 0] if closed.ndim == 3 else closed)
    contours, _ = cv2.findContours(first, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if len(contours) != 1:
        return None
    rect = cv2.boxPoints(cv2.minAreaRect(contours[0])).astype(np.int64)
    cv2.drawContours(first, [rect], -1, 255, -1)
    return first.astype(np.float32) / 255.0, rect


def _rgb(gray01: np.ndarray) -> np.ndarray:
    g = (np.clip(gray01, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def debug_images(glyph_preview: np.ndarray, positions: np.ndarray, font_hint: np.ndarray,
                 mimic_crops: dict[int, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """The original's ``show_debug`` images, (H, W, 3) uint8 each: ``glyphs`` (the glyphs with the position
    outlines), ``positions`` (the lines' position masks, white), ``font_hint`` (the canvas the font OCR crops
    from, after the hollow transform) and ``mimic_line<N>`` (the crop read for a mimicked line N, counted from 1).

    Args:
        positions: (n, H, W) float in [0, 1]. font_hint: (H, W) float in [0, 1].
    """
    out = {"glyphs": np.asarray(glyph_preview, dtype=np.uint8),
           "positions": _rgb(np.clip(positions.sum(0), 0, 1) if len(positions) else np.zeros(font_hint.shape)),
           "font_hint": _rgb(font_hint)}
    for i, crop in sorted((mimic_crops or {}).items()):
        out[f"mimic_line{i + 1}"] = crop.detach().float().clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return out


def write_debug_images(images: dict[str, np.ndarray], folder: str | Path) -> list[Path]:
    """Write each image as ``folder/<name>.png`` (each file atomically); returns the paths."""
    from ..atomic import save_image

    folder = Path(folder)
    return [save_image(folder / f"{name}.png", img) for name, img in images.items()]


__all__ = ["HOLLOW_NOISE_SEED", "debug_images", "hollow_font_hint", "hollow_noise", "mimic_font_crop",
           "revise_position", "write_debug_images"]
