"""Figures drawn with Pillow alone (matplotlib is not a dependency): an image grid with titles and a loss curve (of a
training run's ``metrics.jsonl``, :func:`read_losses`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import save_image

WHITE, BLACK, GREY, BLUE, LIGHT = (255, 255, 255), (0, 0, 0), (120, 120, 120), (31, 90, 180), (200, 205, 215)


def read_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of a training run from the ``metrics.jsonl`` the trainer writes (torn lines skipped)."""
    import json

    out = []
    f = Path(run_dir) / "metrics.jsonl"
    if f.is_file():
        for ln in f.read_text().splitlines():
            try:
                m = json.loads(ln)
                out.append((int(m["step"]), float(m["loss"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
    return out


def _font(size: int = 12, cjk: bool = False):
    """Pillow's default font; with ``cjk``, the package's glyph font (a CJK-capable system font) when there is one,
    since row titles quote the prompts' lines, Chinese included."""
    if cjk:
        try:
            from ..data.fonts import find_default_font

            spec = find_default_font()
            return ImageFont.truetype(spec.path, size, index=spec.index)
        except Exception:  # no such font, or an unreadable one: fall back to the default font
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
    return x1 - x0


def image_grid(rows: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str], row_titles: Sequence[str] = (),
               scale: int = 3, pad: int = 6, path: str | Path | None = None) -> Image.Image:
    """A table of images (each (H, W, 3) uint8, all the same size), enlarged ``scale`` times with nearest-neighbour
    (so every generated pixel stays visible), with column titles on top and an optional title left of each row."""
    h, w = rows[0][0].shape[:2]
    tw, th = w * scale, h * scale
    font = _font(13)
    row_font = _font(13, cjk=True)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([_text_w(probe, t, row_font) for t in row_titles] + [0]) + (2 * pad if row_titles else 0)
    title_lines = max(t.count("\n") + 1 for t in col_titles)
    top = 16 * title_lines + 2 * pad
    ncol = max(len(r) for r in rows)
    W = left + ncol * (tw + pad) + pad
    H = top + len(rows) * (th + pad) + pad
    canvas = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(col_titles):
        x = left + pad + j * (tw + pad)
        for k, line in enumerate(t.split("\n")):
            draw.text((x + (tw - _text_w(draw, line, font)) // 2, pad + 16 * k), line, fill=BLACK, font=font)
    for i, r in enumerate(rows):
        y = top + i * (th + pad)
        if i < len(row_titles):
            draw.text((pad, y + th // 2 - 7), row_titles[i], fill=BLACK, font=row_font)
        for j, img in enumerate(r):
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (left + pad + j * (tw + pad), y))
    if path is not None:
        save_image(path, canvas)
    return canvas


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(series: Sequence[tuple[int, float]], path: str | Path | None = None, title: str = "loss",
               size: tuple[int, int] = (720, 400), window: int | None = None) -> Image.Image:
    """Loss per step (light) and its trailing moving average (dark) on linear axes, with ticks and labels."""
    pts = [(s, v) for s, v in series if math.isfinite(v)]
    W, H = size
    L, R, T, B = 70, 20, 36, 46
    canvas = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((L, 10), title, fill=BLACK, font=_font(14))
    if not pts:
        draw.text((L, H // 2), "no finite loss values", fill=GREY, font=font)
        if path is not None:
            save_image(path, canvas)
        return canvas
    steps = [s for s, _ in pts]
    vals = [v for _, v in pts]
    window = window or max(1, len(vals) // 10)
    smooth = moving_average(vals, window)
    x0, x1 = min(steps), max(steps)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = 0.0, max(vals) * 1.05 if max(vals) > 0 else 1.0

    def X(s: float) -> float:
        return L + (s - x0) / (x1 - x0) * (W - L - R)

    def Y(v: float) -> float:
        return H - B - (v - y0) / (y1 - y0) * (H - T - B)

    for t in _nice_ticks(y0, y1):
        y = Y(t)
        draw.line([(L, y), (W - R, y)], fill=(235, 235, 235))
        label = f"{t:.3g}"
        draw.text((L - 6 - _text_w(draw, label, font), y - 7), label, fill=GREY, font=font)
    for t in _nice_ticks(x0, x1):
        x = X(t)
        draw.line([(x, H - B), (x, H - B + 4)], fill=GREY)
        label = f"{int(round(t))}"
        draw.text((x - _text_w(draw, label, font) // 2, H - B + 6), label, fill=GREY, font=font)
    draw.line([(L, T), (L, H - B), (W - R, H - B)], fill=BLACK)
    draw.text(((W - 80) // 2, H - 18), "optimizer step", fill=BLACK, font=font)
    if len(pts) > 1:
        draw.line([(X(s), Y(v)) for s, v in pts], fill=LIGHT, width=1)
        draw.line([(X(s), Y(v)) for s, v in zip(steps, smooth)], fill=BLUE, width=2)
    else:
        draw.ellipse([X(steps[0]) - 3, Y(vals[0]) - 3, X(steps[0]) + 3, Y(vals[0]) + 3], fill=BLUE)
    legend = f"per step (light), mean of the last {window} (dark)"
    draw.text((W - R - _text_w(draw, legend, font), 12), legend, fill=GREY, font=font)
    if path is not None:
        save_image(path, canvas)
    return canvas


__all__ = ["image_grid", "loss_curve", "moving_average"]
