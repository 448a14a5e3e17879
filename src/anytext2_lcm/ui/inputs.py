"""Pure helpers of the web UI: widget values → :class:`~anytext2_lcm.generation.GenerationRequest`.

Nothing here imports Gradio, so that every rule of the UI (which mask is used, how lines get their fonts and
colours, what a bad input says) is unit-testable without a browser. The values are the ones Gradio hands to an
event handler: numpy arrays for images (``uint8``; an ``ImageEditor`` value is a dict with ``background``,
``layers`` and ``composite``), strings for text, colour pickers and dropdowns, numbers for sliders.

Messages raised here are :class:`~anytext2_lcm.generation.InputError` and are written for the person in front of
the UI: lines are counted from 1, fonts are named by file name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..data.fonts import FontNotFoundError, FontSpec, find_default_font, system_font_files
from ..data.glyphs import positions_from_mask
from ..data.prompts import parse_prompt_lines
from ..generation import SIZE_MULTIPLE, GenerationRequest, InputError
from ..defaults import (DEFAULT_A_PROMPT, DEFAULT_N_PROMPT, STUDENT_DEFAULT_STEPS, STUDENT_STEPS, TEACHER_CFG,
                        TEACHER_SAMPLER, TEACHER_STEPS)

MAX_LINES = 5
"""Per-line font/colour rows in the UI (as the original demo)."""

NO_FONT = "none"
"""Font dropdown value for "no font chosen" (blank font hint)."""

MIMIC = "mimic from image"
"""Font dropdown value for "Mimic From Image": the line's font hint comes from a brushed region of an uploaded image
(the line's image editor appears)."""

TASK_GENERATE = "Generate"
TASK_EDIT = "Edit"
TASKS = (TASK_GENERATE, TASK_EDIT)

MODE_TEACHER = "teacher"
MODE_STUDENT = "teacher + student LoRA"
MODE_MERGED = "merged student"
MODES = (MODE_TEACHER, MODE_STUDENT, MODE_MERGED)

SAMPLERS = ("ddim", "lcm", "tcd", "pcm")

SORT_CHOICES = {"top-down (vertical)": "vertical", "left-right (horizontal)": "horizontal"}

STUDENT_CFG = 1.0


def mode_defaults(mode: str, teacher_cfg: float = TEACHER_CFG) -> tuple[str, int, float]:
    """(sampler, steps, CFG) a model choice starts with: the teacher's 20-step DDIM + ``teacher_cfg`` (the model's
    guidance scale, ``defaults.teacher_cfg``), a student's 4-step LCM without CFG."""
    if mode == MODE_TEACHER:
        return TEACHER_SAMPLER, TEACHER_STEPS, float(teacher_cfg)
    if mode in (MODE_STUDENT, MODE_MERGED):
        return "lcm", STUDENT_DEFAULT_STEPS, STUDENT_CFG
    raise InputError(f"unknown model choice {mode!r}; choose one of: {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------------------------
# Fonts and colours
# ---------------------------------------------------------------------------------------------------------------


def font_choices(files: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, value)``: ``none`` and ``mimic from image`` first, then one per font file (label =
    file name, with the parent folder when two files share a name; value = the path)."""
    files = list(system_font_files() if files is None else files)
    names: dict[str, int] = {}
    for f in files:
        names[os.path.basename(f)] = names.get(os.path.basename(f), 0) + 1
    out = [(NO_FONT, NO_FONT), (MIMIC, MIMIC)]
    for f in files:
        base = os.path.basename(f)
        label = base if names[base] == 1 else f"{base} ({os.path.basename(os.path.dirname(f))})"
        out.append((label, f))
    return out


def parse_color(value: Any) -> tuple[int, int, int]:
    """A colour picker's value (``#rrggbb``, ``#rgb``, ``rgb(r, g, b)``, ``rgba(r, g, b, a)``, a CSS name, or an
    (r, g, b) sequence) → (r, g, b) in 0..255."""
    if isinstance(value, str):
        from PIL import ImageColor

        text = value.strip()
        try:
            rgb = ImageColor.getrgb(text)
        except ValueError:
            rgb = None
        if rgb is None and text.lower().startswith("rgb"):
            # browsers may report fractional channels: rgba(12.5, 0, 255, 1)
            try:
                rgb = tuple(round(float(v)) for v in text[text.index("(") + 1:text.rindex(")")].split(",")[:3])
            except ValueError:
                rgb = None
        if rgb is None:
            raise InputError(f"colour {value!r}: not a colour (expected #rrggbb or rgb(r, g, b))")
    else:
        try:
            rgb = tuple(int(round(float(v))) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"colour {value!r}: not a colour (expected #rrggbb or rgb(r, g, b))") from None
    if len(rgb) < 3 or any(not 0 <= v <= 255 for v in rgb[:3]):
        raise InputError(f"colour {value!r}: three channels in 0..255")
    return tuple(int(v) for v in rgb[:3])


@dataclass(frozen=True)
class LineStyle:
    """One line's font file (None: no font chosen), colour (None: unspecified) and mimicked font ((image, mask) of
    "mimic from image", else None)."""

    font: str | None = None
    color: tuple[int, int, int] | None = None
    mimic: tuple | None = None


def mimic_from_editor(editor: Any, line: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, brushed mask) of a line's "mimic from image" editor; an InputError saying what to do when the image or
    the strokes are missing."""
    image, mask = editor_background(editor), mask_from_strokes(editor)
    if image is None:
        raise InputError(f"line {line}: 'mimic from image' is chosen: upload an image with the text whose font to copy")
    if mask is None or not mask.any():
        raise InputError(f"line {line}: brush over the text whose font to copy in the uploaded image")
    return image, mask


def line_styles(fonts: Sequence[Any], use_colors: Sequence[Any], colors: Sequence[Any],
                mimics: Sequence[Any] = ()) -> list[LineStyle]:
    """The per-line rows of the UI → one :class:`LineStyle` per row (trailing rows included); ``mimics`` are the
    rows' "mimic from image" editors."""
    n = max(len(fonts), len(use_colors), len(colors))
    out = []
    for i in range(n):
        f = fonts[i] if i < len(fonts) else None
        mimic = mimic_from_editor(mimics[i] if i < len(mimics) else None, i + 1) if f == MIMIC else None
        font = None if f in (None, "", NO_FONT, MIMIC) else str(f)
        use = bool(use_colors[i]) if i < len(use_colors) else False
        color = parse_color(colors[i]) if use and i < len(colors) and colors[i] not in (None, "") else None
        if use and color is None:
            raise InputError(f"line {i + 1}: colour is switched on but no colour is picked")
        out.append(LineStyle(font, color, mimic))
    return out


def parse_community(base_model: Any, style_loras: Any) -> tuple[str | None, tuple]:
    """The "your own models and styles" fields → (base model path or None, ``StyleLora`` per non-empty line of
    ``FILE:RATIO``). Only the syntax is checked here; the files are read by the engine."""
    from ..config import ConfigError
    from ..lora.style import StyleLora

    base = str(base_model).strip() if base_model else ""
    loras = []
    for line in str(style_loras or "").splitlines():
        if line.strip():
            try:
                loras.append(StyleLora.parse(line.strip()))
            except ConfigError as e:
                raise InputError(str(e).replace("--style-lora", "style LoRA")) from None
    return base or None, tuple(loras)


def prompt_lines(prompt: str, max_chars: int = 20) -> list[str]:
    """The quoted text lines of a prompt ([] when it quotes nothing)."""
    _, lines = parse_prompt_lines(prompt or "", max_chars)
    return [] if lines == [" "] else lines


# ---------------------------------------------------------------------------------------------------------------
# Masks and images
# ---------------------------------------------------------------------------------------------------------------


def _gray(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        return a.astype(np.float32)
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"mask: expected a grey, RGB or RGBA image, got an array of shape {a.shape}")
    if a.shape[2] in (1, 2):
        g = a[..., 0].astype(np.float32)
        return g * (a[..., 1] / 255.0) if a.shape[2] == 2 else g
    g = a[..., :3].astype(np.float32).mean(axis=2)
    if a.shape[2] == 4:  # transparent = black
        g = g * (a[..., 3].astype(np.float32) / 255.0)
    return g


def mask_from_image(img: Any, threshold: int = 127) -> np.ndarray | None:
    """An uploaded position mask (white regions on black) → (H, W) uint8 0/255; None when nothing is uploaded."""
    if img is None:
        return None
    return np.where(_gray(img) > threshold, 255, 0).astype(np.uint8)


def mask_from_strokes(editor: Any) -> np.ndarray | None:
    """What was brushed on an ``ImageEditor`` → (H, W) uint8 0/255 (any non-transparent layer pixel counts;
    the background is not part of it). None when the editor holds nothing."""
    if not editor:
        return None
    layers = [np.asarray(x) for x in (editor.get("layers") or []) if x is not None]
    ref = editor.get("background")
    if ref is None:
        ref = editor.get("composite")
    if not layers:
        if ref is None:
            return None
        return np.zeros(np.asarray(ref).shape[:2], np.uint8)
    out = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        if layer.shape[:2] != out.shape:
            layer = _resize(layer, out.shape, nearest=True)
        if layer.ndim == 3 and layer.shape[2] == 4:
            out |= layer[..., 3] > 0
        else:  # no alpha: anything not black was drawn
            out |= _gray(layer) > 0
    return np.where(out, 255, 0).astype(np.uint8)


def editor_background(editor: Any) -> np.ndarray | None:
    """The image under the strokes of an ``ImageEditor`` (RGB uint8, transparency flattened on white)."""
    if not editor:
        return None
    bg = editor.get("background")
    if bg is None:
        return None
    a = np.asarray(bg)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = np.rint(a[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def _resize(img: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_LINEAR)
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interp)


def combine_masks(masks: Sequence[np.ndarray | None], hw: tuple[int, int]) -> np.ndarray | None:
    """Union of the given masks, each resized (nearest) to ``hw``; None when none is given."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = np.zeros(hw, np.uint8)
    for m in masks:
        out = np.maximum(out, _resize(m, hw, nearest=True))
    return out


def blank_canvas(width: int, height: int) -> np.ndarray:
    """The black drawing canvas for positions (white strokes on it are the text regions)."""
    return np.zeros((int(height), int(width), 3), np.uint8)


def fit_edit_image(img: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an image to edit so that its longest side is at most ``max_side`` (multiples of 64 as the model
    needs; the aspect is kept within the rounding)."""
    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    nh = max(SIZE_MULTIPLE, int(round(h * s / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    nw = max(SIZE_MULTIPLE, int(round(w * s / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    return _resize(img, (nh, nw), nearest=False)


# ---------------------------------------------------------------------------------------------------------------
# Building and checking the request
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UiInputs:
    """The values of the UI's widgets (one generate click)."""

    prompt: str
    task: str = TASK_GENERATE
    drawn: Any = None
    """Generation: the positions canvas (``ImageEditor`` value); white strokes on black."""
    uploaded_mask: Any = None
    """An uploaded position mask (white on black); added to the strokes."""
    edit: Any = None
    """Editing: the ``ImageEditor`` value: the image to edit as background, the regions to rewrite brushed on it."""
    sort: str = "vertical"
    styles: list[LineStyle] = dataclasses.field(default_factory=list)
    mode: str = MODE_TEACHER
    sampler: str = TEACHER_SAMPLER
    steps: int = TEACHER_STEPS
    seed: int = 0
    cfg_scale: float = TEACHER_CFG
    strength: float = 1.0
    width: int = 256
    height: int = 256
    num_images: int = 1
    edit_max_side: int = 512
    a_prompt: str = DEFAULT_A_PROMPT
    n_prompt: str = DEFAULT_N_PROMPT
    glyph_font: str | None = None
    revise_position: bool = False
    """The original demo's "Revise Position" (off by default; ignored in editing)."""
    hollow_font: bool = True
    """The original demo's "Use hollow font" (on by default there)."""


def _int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {value!r} is not a number") from None
    if not np.isfinite(f) or f != int(f):
        raise InputError(f"{name}: {value!r} is not a whole number")
    v = int(f)
    if v < lo or (hi is not None and v > hi):
        raise InputError(f"{name}: {v} is out of range ({lo}..{hi})" if hi is not None else f"{name}: must be >= {lo}")
    return v


def _float(value: Any, name: str, lo: float, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {value!r} is not a number") from None
    if not np.isfinite(v) or v < lo or (strict and v == lo):
        raise InputError(f"{name}: {v} must be {'>' if strict else '>='} {lo}")
    return v


def build_request(ui: UiInputs) -> tuple[GenerationRequest, list[str]]:
    """Turn the widget values into a request, with every check a person can act on.

    Returns:
        (request, notes): notes are non-fatal remarks for a ``gr.Warning`` (unused positions, styles of lines
        that do not exist, ...).
    Raises:
        InputError: an empty prompt, no positions for quoted lines, an empty mask, fewer regions than lines, a
            font without a glyph of its line, no image to edit, an unknown sampler, bad numbers.
    """
    notes: list[str] = []
    prompt = (ui.prompt or "").strip()
    if not prompt:
        raise InputError('Type a prompt first, with the text to draw in "double quotes", e.g. '
                         'a shop sign that says "Hello"')
    lines = prompt_lines(prompt)
    if ui.task not in TASKS:
        raise InputError(f"unknown task {ui.task!r}; choose {' or '.join(TASKS)}")
    if ui.mode not in MODES:
        raise InputError(f"unknown model choice {ui.mode!r}; choose one of: {', '.join(MODES)}")
    if ui.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {ui.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    sort = SORT_CHOICES.get(ui.sort, ui.sort)
    if sort not in ("vertical", "horizontal"):
        raise InputError(f"sort order {ui.sort!r}: choose top-down or left-right")
    steps = _int(ui.steps, "steps", 1, 1000)
    seed = _int(ui.seed, "seed", 0, 2 ** 63 - 1)
    num_images = _int(ui.num_images, "images", 1, 16)
    cfg = _float(ui.cfg_scale, "CFG scale", 0.0, strict=True)
    strength = _float(ui.strength, "strength", 0.0)

    edit_image, mask, height, width = _canvas_and_mask(ui)
    notes += _check_positions(ui, lines, mask, sort)

    styles = list(ui.styles or [])
    if len(lines) > MAX_LINES:
        notes.append(f"{len(lines)} lines: lines after the {MAX_LINES}th get no font and an unspecified colour.")
    extra = [i + 1 for i, s in enumerate(styles) if i >= len(lines) and (s.font or s.color or s.mimic)]
    if extra:
        notes.append(f"font/colour set for line{'s' if len(extra) > 1 else ''} {', '.join(map(str, extra))} but the "
                     f"prompt has {len(lines)} quoted line{'s' if len(lines) != 1 else ''}: ignored.")
    styles = styles[:len(lines)]
    check_fonts(lines, styles, ui.glyph_font)

    req = GenerationRequest(
        prompt=prompt, mask=mask if (mask is not None and lines) else None, sort=sort,
        fonts=[s.font for s in styles] or None, colors=[s.color for s in styles] or None,
        mimic_fonts=[s.mimic for s in styles] or None, revise_position=bool(ui.revise_position),
        hollow_font=bool(ui.hollow_font),
        edit_image=edit_image, height=height, width=width, num_images=num_images, seed=seed, steps=steps,
        sampler=ui.sampler, cfg_scale=cfg, strength=strength, a_prompt=ui.a_prompt, n_prompt=ui.n_prompt,
        glyph_font=ui.glyph_font)
    return req, notes


def _canvas_and_mask(ui: UiInputs) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
    """(image to edit or None, position mask or None, height, width) from the editor or the canvas widgets."""
    edit_image = None
    if ui.task == TASK_EDIT:
        edit_image = editor_background(ui.edit)
        if edit_image is None:
            raise InputError("Editing: upload the image to edit first, then brush over the text regions to rewrite")
        strokes = mask_from_strokes(ui.edit)
        max_side = _int(ui.edit_max_side, "edit size", SIZE_MULTIPLE)
        src_hw = edit_image.shape[:2]
        edit_image = fit_edit_image(edit_image, max_side)
        if strokes is not None and strokes.shape != src_hw:
            strokes = _resize(strokes, src_hw, nearest=True)
        height, width = edit_image.shape[:2]
        mask = combine_masks([strokes, mask_from_image(ui.uploaded_mask)], (height, width))
    else:
        width = _int(ui.width, "width", SIZE_MULTIPLE, 4096)
        height = _int(ui.height, "height", SIZE_MULTIPLE, 4096)
        for name, v in (("width", width), ("height", height)):
            if v % SIZE_MULTIPLE:
                raise InputError(f"{name} {v}: must be a multiple of {SIZE_MULTIPLE}")
        mask = combine_masks([mask_from_strokes(ui.drawn), mask_from_image(ui.uploaded_mask)], (height, width))

    return edit_image, mask, height, width


def _check_positions(ui: UiInputs, lines: list[str], mask: np.ndarray | None, sort: str) -> list[str]:
    """Check the mask against the quoted lines (one region per line, ``sort`` order); returns the non-fatal notes."""
    notes: list[str] = []
    where = ("brush over the text regions of the image" if ui.task == TASK_EDIT
             else "draw one white region per line on the canvas, or upload a white-on-black mask")
    if lines:
        if mask is None or not mask.any():
            raise InputError(f"The position mask is empty: {where} ({len(lines)} quoted "
                             f"line{'s' if len(lines) > 1 else ''}).")
        regions = positions_from_mask(mask, sort)
        if not regions:
            raise InputError(f"The position mask has no region large enough (at least 20 pixels each): {where}.")
        if len(regions) < len(lines):
            raise InputError(f"{len(lines)} quoted lines but only {len(regions)} position"
                             f"{'s' if len(regions) > 1 else ''} in the mask: {where}, one per line "
                             "(regions that touch count as one).")
        if len(regions) > len(lines):
            notes.append(f"{len(regions)} positions but {len(lines)} quoted line{'s' if len(lines) > 1 else ''}: "
                         "the extra positions are left empty.")
    elif ui.task == TASK_EDIT:
        raise InputError('Editing rewrites text: quote the new text in the prompt, e.g. a sign that says "Open", '
                         "one quoted line per brushed region.")
    else:
        notes.append('No "quoted" text in the prompt: generating without text lines.')

    return notes


def check_fonts(lines: Sequence[str], styles: Sequence[LineStyle], glyph_font: str | None = None) -> None:
    """Every line's chosen font, and the glyph font, must have a glyph for each of its characters."""
    try:
        glyph = find_default_font(glyph_font)
    except FontNotFoundError as e:
        raise InputError(str(e)) from None
    for i, text in enumerate(lines):
        missing = glyph.missing_chars(text)
        if missing:
            raise InputError(f'Line {i + 1} "{text}": the glyph font {glyph.name} has no glyph for '
                             f"{''.join(missing)!r}; start the UI with a font that covers it.")
    for i, (text, style) in enumerate(zip(lines, styles)):
        if not style.font:
            continue
        try:
            spec = FontSpec.parse(style.font)
        except FontNotFoundError as e:
            raise InputError(f"Line {i + 1}: {e}") from None
        missing = spec.missing_chars(text)
        if missing:
            raise InputError(f'Line {i + 1} "{text}": the font {os.path.basename(spec.path)} has no glyph for '
                             f"{''.join(missing)!r}; pick another font for this line (or none).")


# ---------------------------------------------------------------------------------------------------------------
# Compare view
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparePlan:
    """One cell of the compare view: its caption, the model choice it runs with and its request."""

    label: str
    mode: str
    request: GenerationRequest


def compare_plan(base: GenerationRequest, student_mode: str = MODE_STUDENT, student_sampler: str = "lcm",
                 student_steps: Sequence[int] = STUDENT_STEPS, teacher_steps: int = TEACHER_STEPS,
                 teacher_cfg: float = TEACHER_CFG) -> list[ComparePlan]:
    """The teacher (DDIM + CFG, ``teacher_steps``) beside the student at each of ``student_steps`` (no CFG),
    everything else (prompt, positions, fonts, colours, seed, size) as in ``base``; one image each."""
    if student_mode not in (MODE_STUDENT, MODE_MERGED):
        student_mode = MODE_STUDENT
    if student_sampler == "ddim" or student_sampler not in SAMPLERS:
        student_sampler = "lcm"
    out = [ComparePlan(f"teacher · DDIM {teacher_steps} steps · CFG {teacher_cfg:g}", MODE_TEACHER,
                       dataclasses.replace(base, sampler="ddim", steps=teacher_steps, cfg_scale=teacher_cfg,
                                           sampler_options={}, num_images=1))]
    for n in student_steps:
        out.append(ComparePlan(f"student · {student_sampler.upper()} {n} step{'s' if n > 1 else ''}", student_mode,
                               dataclasses.replace(base, sampler=student_sampler, steps=int(n),
                                                   cfg_scale=STUDENT_CFG, sampler_options={}, num_images=1)))
    return out


def format_seconds(seconds: dict[str, float]) -> str:
    """``'3.21 s (conditioning 0.40, denoise 2.50, decode 0.31)'``."""
    total = seconds.get("total", sum(seconds.values()))
    parts = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items() if k not in ("total", "prepare"))
    return f"{total:.2f} s ({parts})" if parts else f"{total:.2f} s"
