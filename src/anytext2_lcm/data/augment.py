"""Training-time randomised renderings of the original dataset: position morphology and font hints from the image.

Every function takes an explicit ``numpy.random.Generator`` and draws from it in the original's order, so a sample
is a function of its generator's seed alone (the original used Python's global ``random``).
"""

from __future__ import annotations

import cv2
import numpy as np

from .glyphs import long_side_vector, polygon_points

_KERNEL = np.ones((3, 3), dtype=np.uint8)


def random_position_mask(polygon, height: int, width: int, rng: np.random.Generator, prob: float = 1.0,
                         ref_size: int | None = None) -> np.ndarray:
    """The original ``draw_pos``: the filled polygon with random morphology, (H, W) uint8 {0, 1}.

    With probability ``prob`` the polygon is filled (else the mask stays empty), then: 70 % unchanged, 10 % dilated
    (3 x 3, once), 10 % eroded once, 5 % dilated twice, 5 % eroded twice. Erosion is not applied to a "small"
    polygon (a min-area-rect side < 20 px at 512, scaled with ``ref_size``); the original's if/elif chain then falls
    through, so a small polygon drawn for "erode once" is dilated twice and one drawn for "erode twice" is unchanged.

    Draws: one uniform for ``prob``, then (if filled) one for the morphology.
    """
    img = np.zeros((height, width), dtype=np.uint8)
    pts = polygon_points(polygon)
    (_, _), (w, h), _ = cv2.minAreaRect(pts.reshape(-1, 2).astype(np.float32))
    min_wh = 20 * (ref_size if ref_size is not None else min(height, width)) / 512
    small = w < min_wh or h < min_wh
    if rng.random() < prob:
        cv2.fillPoly(img, [pts], 1)
        r = rng.random()
        if r < 0.7:
            pass
        elif r < 0.8:
            img = cv2.dilate(img, _KERNEL, iterations=1)
        elif r < 0.9 and not small:
            img = cv2.erode(img, _KERNEL, iterations=1)
        elif r < 0.95:
            img = cv2.dilate(img, _KERNEL, iterations=2)
        elif not small:
            img = cv2.erode(img, _KERNEL, iterations=2)
    return img


def random_augment(crop: np.ndarray, rng: np.random.Generator, rot=(-10.0, 10.0), trans=(-10.0, 10.0),
                   scale=(0.9, 1.1)) -> np.ndarray:
    """Rotate (about the crop centre), translate, then zoom a crop; borders replicate. Same shape out.

    Draws: angle, tx, ty, scale (uniform), in that order.
    """
    h, w = crop.shape[:2]
    angle = rng.uniform(*rot)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    out = cv2.warpAffine(crop, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    tx, ty = rng.uniform(*trans), rng.uniform(*trans)
    m = np.float32([[1, 0, tx], [0, 1, ty]])
    out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    s = rng.uniform(*scale)
    sw, sh = max(int(w * s), 1), max(int(h * s), 1)
    scaled = cv2.resize(out, (sw, sh), interpolation=cv2.INTER_LINEAR)
    if s >= 1:
        return scaled[(sh - h) // 2:(sh + h) // 2, (sw - w) // 2:(sw + w) // 2]
    ph, pw = (h - sh) // 2, (w - sw) // 2
    return cv2.copyMakeBorder(scaled, ph, h - sh - ph, pw, w - sw - pw, cv2.BORDER_REPLICATE)


def training_font_hint(image: np.ndarray, polygon, rng: np.random.Generator, prob: float = 0.8,
                       area_range=(0.7, 1.0), randaug: bool = True) -> np.ndarray:
    """The original ``draw_font_hint``: the strokes of the line as they appear in the image, (H, W) uint8 {0, 1}.

    With probability ``1 - prob`` the hint is empty. Otherwise the polygon's bounding box is cropped from the image
    (optionally :func:`random_augment`-ed), converted to grey and thresholded adaptively (Gaussian, block 11, C 2;
    pixels darker than their neighbourhood = 1), kept inside the polygon, and a strip across the long side of the
    min-area rectangle covering ``(1 - u)`` of it, ``u ~ U(area_range)``, is removed at a random offset.

    Args:
        image: (H, W, 3) uint8 RGB, the training image.
        polygon: (N, 2) points in that image's pixels.
    Draws: one uniform for ``prob``; if kept: 4 for the augmentation (if ``randaug``), the strip ratio, its offset.
    """
    height, width = image.shape[:2]
    out = np.zeros((height, width), dtype=np.uint8)
    if rng.random() < 1 - prob:
        return out
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2).copy()
    poly[:, 0] = np.clip(poly[:, 0], 0, width - 1)
    poly[:, 1] = np.clip(poly[:, 1], 0, height - 1)
    pts = poly.reshape(-1, 1, 2).astype(np.int32)
    region = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(region, [pts], 1)
    rect = cv2.minAreaRect(pts)
    center = np.asarray(rect[0], dtype=np.float64)
    long_side, short_side = max(rect[1]), min(rect[1])
    x, y, w, h = cv2.boundingRect(pts)
    crop = image[y:y + h, x:x + w].astype(np.float32) / 255.0
    if randaug:
        crop = random_augment(crop, rng)
    grey = cv2.cvtColor((crop * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    thr = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2)
    strokes = np.zeros((height, width), dtype=np.uint8)
    strokes[y:y + h, x:x + w] = thr == 0

    # Remove a strip of the polygon across its long side (the part of the line the hint does not show).
    ratio = rng.uniform(*area_range)
    strip = long_side * (1 - ratio)
    v = long_side_vector(cv2.boxPoints(rect))
    start = center - v * (long_side / 2 - rng.uniform(0, long_side - strip))
    mid = start + v * (strip / 2)
    along, across = v * (strip / 2), np.array([-v[1], v[0]]) * (short_side / 2)
    corners = np.array([mid - along - across, mid + along - across, mid + along + across, mid - along + across],
                       dtype=np.int32)
    cv2.fillPoly(region, [corners], 0)
    return region * strokes
