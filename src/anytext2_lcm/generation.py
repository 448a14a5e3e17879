"""Generation and editing: user inputs → rendered text conditioning → sampling → images.

This is the user-facing API over :mod:`anytext2_lcm.pipeline`. It follows the original inference
(``ms_wrapper.AnyText2Model.forward``):

* the image prompt's "quoted" spans become ``*`` placeholders; the lines are the quoted texts of the text prompt
  (by default the image prompt's own quotes, with the training-style text caption ``Text says * , * . ``);
* positions come from polygons/boxes or from a position mask (connected components, sorted top-down or
  left-right); fewer positions than lines is an error, more is a warning;
* per line: the 80×512 line image and the polygon glyphs are drawn in the glyph font (a CJK-capable font, the
  original's Arial Unicode role), the glyphs in the line colour (default "unspecified" = 500), the font hint in the
  line's chosen font (blank when none is chosen);
* masked image: generation uses an all −1 image, editing ``(img/127.5 − 1 − 10·hint).clip(−1, 1)`` with text
  regions blanked; masked_x = scale_factor × a posterior *sample* (the original's behaviour);
* cond = (image prompt + ", " + a_prompt, text prompt), uncond = (negative prompt, "") with the same text
  conditioning; DDIM with the original's timesteps for the teacher, or a few-step sampler for a student.

Everything random (masked_x sample, x_T, sampler noise) is drawn from one ``torch.Generator`` seeded with ``seed``
on the CPU, so the same inputs give the same bytes.

Example::

    pipe = Generator(model)
    result = pipe(GenerationRequest(prompt='a shop sign that says "Hello" and "世界"',
                                    positions=[[[64, 100], [448, 100], [448, 200], [64, 200]],
                                               [[64, 300], [448, 300], [448, 400], [64, 400]]]))
    result.images[0]  # (512, 512, 3) uint8
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .conditioning import UNSPECIFIED_COLOR, TextInfo
from .config import MAX_SEED
from .data.fonts import FontNotFoundError, FontSpec, as_font_spec, find_default_font
from .data.glyphs import DegeneratePolygonError, draw_line, polygon_mask, positions_from_mask, render_font_hint
from .data.hints import debug_images, hollow_font_hint, mimic_font_crop, revise_position
from .data.prompts import build_text_caption, parse_prompt_lines
from .models.anytext2 import AnyText2
from .defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT, TEACHER, teacher_cfg
from .pipeline import GuidedDenoiser, branch_prompts, encode_branches, require_finite, sample
from .samplers import make_sampler
from .samplers.schedule import NoiseSchedule

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 64
"""Edit images are resized to multiples of this (the original's rule); a model needs sides that are multiples of
its ``cfg.size_multiple`` (sd15 64, tiny 32, testbed 16)."""
MAX_EDIT_SIDE = 1024
MAX_SIDE = 2048
"""Default upper bound of a generated image's side (``GenerationRequest.max_side``, ``generate --max-size``)."""
MAX_IMAGES = 64
"""Most images of one request (one batch)."""
MAX_INPUT_PIXELS = 8192 * 8192
"""Largest edit image / mask read (pixels), checked from the file header before decoding."""


class InputError(ValueError):
    """A generation input that cannot be used (the message says which and why)."""


@dataclass(kw_only=True)
class GenerationRequest:
    """Everything one generation / editing call takes.

    Polygons are lists of (x, y) points in image pixels; a box ``[x0, y0, x1, y1]`` is accepted too.
    """

    prompt: str
    """Image prompt; "quoted" spans are the text lines (unless ``text_prompt`` is given)."""
    text_prompt: str | None = None
    """Text prompt for the WriteNet with "quoted" lines (default: built from the prompt's quotes)."""
    positions: list | None = None
    """One polygon or box per line, in reading order."""
    mask: Any = None
    """Position mask instead of ``positions``: an (H, W[, C]) uint8 array or an image path, white on black."""
    sort: str = "vertical"
    """Order of mask components: 'vertical' (top-down first) or 'horizontal' (left-right first)."""
    fonts: list | None = None
    """Per line: a font file for the font hint (None: no font chosen)."""
    colors: list | None = None
    """Per line: (r, g, b) 0-255 or None (unspecified)."""
    edit_image: Any = None
    """Editing mode: the image (array or path) whose text regions (the positions) are rewritten."""
    height: int | None = None
    """Image height in pixels, a multiple of the model's ``size_multiple`` (None: the model's own size,
    ``cfg.image_size``; editing uses the edit image's size)."""
    width: int | None = None
    """Image width in pixels (as ``height``)."""
    num_images: int = 1
    """Images generated from the same conditioning (one batch)."""
    seed: int = 0
    """Seed of every random draw (masked-image posterior sample, x_T, sampler noise)."""
    steps: int = TEACHER.steps
    """Sampler steps (the teacher's DDIM: 20; students: 1-8)."""
    sampler: str = TEACHER.sampler
    """'ddim' (teacher), or a student sampler: 'lcm', 'tcd', 'pcm'."""
    sampler_options: dict = field(default_factory=dict)
    """Extra sampler options, e.g. {"gamma": 0.3} for 'tcd'."""
    cfg_scale: float | None = None
    """Classifier-free guidance scale (1 disables the uncond branch); None: the model's own
    (``ModelConfig.guidance_scale``: AnyText2's 7.5, the testbed's 5)."""
    strength: float = 1.0
    """WriteNet control strength."""
    attnx_scale: float = 1.0
    """Strength of the AttnX attention branches."""
    eta: float = 0.0
    """DDIM η (teacher sampler)."""
    a_prompt: str = DEFAULT_A_PROMPT
    """Added prompt, appended to the image prompt as ``prompt + ", " + a_prompt`` (the original demo's default)."""
    n_prompt: str = DEFAULT_N_PROMPT
    """Negative prompt of the unconditional branch (the original demo's default)."""
    max_chars: int = 20
    """Lines are cut to this many characters (the original's max_chars)."""
    glyph_font: str | None = None
    """Font for glyphs and line images (default: a CJK-capable system font)."""
    max_side: int = MAX_SIDE
    """Largest height / width accepted (a memory guard: raise it for large images on a large GPU)."""
    mimic_fonts: list | None = None
    """Per line: None, or (image, mask) whose brushed region holds the text whose font the line mimics (arrays or
    paths; the original demo's "Mimic From Image", :func:`~anytext2_lcm.data.hints.mimic_font_crop`). A line takes
    a font file (``fonts``) or a mimic, not both."""
    revise_position: bool = False
    """Replace each line's position by the minimum-area rectangle of its rendered glyphs (the original's revise_pos;
    ignored in editing mode, as there)."""
    hollow_font: bool = False
    """Hollow font hints (the original demo's default; :func:`~anytext2_lcm.data.hints.hollow_font_hint`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InputError("prompt: must be a string")
        _check_int(self.max_side, "max_side", 1, 1 << 20)
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None:
                _check_int(v, name, 1, self.max_side, " (max_side; None: the model's size)")
        _check_int(self.num_images, "num_images", 1, MAX_IMAGES)
        _check_int(self.steps, "steps", 1, 1000)
        _check_int(self.seed, "seed", 0, MAX_SEED)
        for name in ("cfg_scale", "strength", "attnx_scale", "eta"):
            v = getattr(self, name)
            if v is None and name == "cfg_scale":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{name}={v!r}: must be a finite number")
        if self.cfg_scale is not None and not 0 < self.cfg_scale <= 100:
            raise InputError(f"cfg_scale={self.cfg_scale}: must lie in (0, 100]")
        if self.positions is not None and self.mask is not None:
            raise InputError("give positions or mask, not both")
        if self.sort not in ("vertical", "horizontal"):
            raise InputError(f"sort={self.sort!r}: must be 'vertical' or 'horizontal'")
        if self.mimic_fonts is not None and not isinstance(self.mimic_fonts, (list, tuple)):
            raise InputError("mimic_fonts: a list with one (image, mask) pair or None per line")


def _check_int(v, name: str, lo: int, hi: int, note: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InputError(f"{name}={v!r}: must be an integer in {lo}..{hi}{note}")


@dataclass
class GenerationResult:
    """Images and what produced them.

    Attributes:
        images: num_images × (H, W, 3) uint8.
        latents: (B, 4, H/8, W/8) final latents.
        texts: the text lines.
        polygons: one polygon per line (None for an empty position).
        glyph_preview: (H, W, 3) uint8 rendering of the glyphs with the position outlines.
        seconds: wall time per phase ('prepare', 'conditioning', 'denoise', 'decode', 'total').
        warnings: non-fatal remarks (more positions than lines, cut lines, ...).
    """

    images: list[np.ndarray]
    latents: torch.Tensor
    texts: list[str]
    polygons: list
    glyph_preview: np.ndarray
    seconds: dict[str, float]
    warnings: list[str]
    prompts: dict[str, str]
    debug_images: dict[str, np.ndarray] = field(default_factory=dict)
    """The glyph, position and font-hint images of the request, (H, W, 3) uint8 each
    (:func:`~anytext2_lcm.data.hints.debug_images`)."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def as_polygon(p, name: str = "position") -> np.ndarray:
    """A polygon (N ≥ 3 points) or a box [x0, y0, x1, y1] → (N, 2) float array."""
    try:
        a = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: not a list of numbers: {p!r}") from None
    if a.ndim == 1 and a.shape[0] == 4:
        x0, y0, x1, y1 = a
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"{name}: box {a.tolist()} has no area (need x0 < x1 and y0 < y1)")
        a = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 3:
        raise InputError(f"{name}: expected a box [x0, y0, x1, y1] or >= 3 [x, y] points, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{name}: non-finite coordinates")
    return a


def load_positions(path: str | Path) -> list[np.ndarray]:
    """Polygons/boxes from a JSON file: a list, or ``{"positions": [...]}`` / ``{"polygons": [...]}``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path}: not a readable JSON file ({e})") from None
    if isinstance(doc, dict):
        doc = doc.get("positions", doc.get("polygons", doc.get("boxes")))
    if not isinstance(doc, list) or not doc:
        raise InputError(f"{path}: expected a non-empty list of polygons or boxes")
    return [as_polygon(p, f"{path.name}[{i}]") for i, p in enumerate(doc)]


def read_image(img, name: str = "image") -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a path or an array."""
    if isinstance(img, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        p = Path(img)
        if not p.is_file():
            raise FileNotFoundError(f"{name} {p} does not exist")
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_INPUT_PIXELS:  # from the header: nothing decoded yet
                    raise InputError(f"{name} {p}: {im.width} x {im.height} px is more than the "
                                     f"{MAX_INPUT_PIXELS:,} pixels read")
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{name} {p}: unreadable image ({type(e).__name__}: {e})") from None
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InputError(f"{name}: expected (H, W[, C]) with C in 1, 3, 4; got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def usable_font(font, what: str = "font") -> FontSpec:
    """A font that opens: ``font`` (path, ``path#index``, FontSpec) or, for None, the default CJK-capable font.
    A missing file or one that is not a font (or has no face ``#index``) is an InputError naming ``what``."""
    try:
        spec = as_font_spec(font) if font is not None else find_default_font(None)
        spec.load(16)
    except FontNotFoundError as e:
        raise InputError(f"{what}: {e}") from None
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{what} {font}: not a usable font file ({type(e).__name__}: {e})") from None
    return spec


def resize_for_edit(img: np.ndarray, max_side: int = MAX_EDIT_SIDE) -> np.ndarray:
    """The original ``resize_image``: keep the aspect, longest side ≤ max_side, both sides multiples of 64 (a
    multiple of every preset's ``size_multiple``)."""
    import cv2

    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    nh = max(SIZE_MULTIPLE, int(round(h * s / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    nw = max(SIZE_MULTIPLE, int(round(w * s / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR)
    return img


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedInputs:
    text_info: TextInfo
    img_prompt: str
    text_prompt: str
    texts: list[str]
    polygons: list
    masked_img: torch.Tensor
    glyph_preview: np.ndarray
    warnings: list[str]
    height: int
    width: int
    style_crops: dict = field(default_factory=dict)
    """Line index → font-OCR input of a mimicked font (replaces that line's font-hint crop)."""
    debug_images: dict = field(default_factory=dict)


class Generator:
    """AnyText2 generation / editing with a teacher (DDIM + CFG) or a LoRA student (few-step samplers).

    Args:
        model: an ``AnyText2`` (with or without a LoRA adapter applied), on its device and dtype.
        glyph_font: default font for glyphs (None: a CJK-capable system font).
        batch_cfg: see :class:`~.pipeline.GuidedDenoiser` (False: the original's two passes per step).
    """

    def __init__(self, model: AnyText2, glyph_font: str | None = None, batch_cfg: bool = True):
        self.model = model.eval()
        self._glyph_font = glyph_font
        self._blank_posterior: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch_cfg = batch_cfg
        """CFG's cond and uncond branches as one UNet batch (True) or two passes (False: less activation memory)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    def _font(self, req: GenerationRequest) -> FontSpec:
        return usable_font(req.glyph_font or self._glyph_font, "glyph font")

    # ---- step 1: rendering -------------------------------------------------------------------------------------

    def prepare(self, req: GenerationRequest) -> PreparedInputs:
        """Parse prompts, find positions, render every line, build the masked image."""
        warnings: list[str] = []
        img_prompt, text_prompt, texts = _parse_texts(req, warnings)
        no_text = texts == [" "]
        edit = None
        cfg = self.model.cfg
        H, W = req.height or cfg.image_size, req.width or cfg.image_size
        for name, v in (("height", H), ("width", W)):
            if v % cfg.size_multiple:
                raise InputError(f"{name}={v}: must be a multiple of {cfg.size_multiple} for this model")
        if req.edit_image is not None:
            edit = resize_for_edit(read_image(req.edit_image, "edit_image"))
            H, W = edit.shape[:2]
        polygons, masks = _find_positions(req, H, W, len(texts), no_text, warnings)
        n = len(texts)
        style_crops = mimic_crops(req, n, warnings) if not no_text else {}  # no line: nothing to mimic for
        lines = self._render_lines(req, texts, polygons, masks, H, W, no_text, edit is None, style_crops, warnings)
        if req.revise_position and edit is not None:
            warnings.append("revise_position is off in editing mode (as in the original)")
        hint = np.clip(lines.positions.sum(0), 0, 1)
        if edit is None:
            masked = np.full((H, W, 3), -1.0, np.float32)
        else:
            masked = np.clip(np.clip(edit, 1, 255).astype(np.float32) / 127.5 - 1.0 - hint[..., None] * 10, -1, 1)
        ti = lines.text_info(req.num_images, n, H, W, cfg.writenet.glyph_scale, cfg.vae.z_channels,
                             cfg.latent_factor)
        scale = cfg.writenet.glyph_scale
        glyphs = lines.glyphs[:, ::scale, ::scale] if scale > 1 else lines.glyphs
        preview = _glyph_preview(glyphs.astype(np.float32) / 255.0, polygons[:n])
        t = torch.from_numpy(np.ascontiguousarray(masked))
        return PreparedInputs(ti, img_prompt, text_prompt, texts, lines.used_polys, t.permute(2, 0, 1)[None],
                              preview, warnings, H, W, style_crops,
                              debug_images(preview, lines.positions, lines.font_hint, style_crops))

    def _render_lines(self, req: GenerationRequest, texts: list[str], polygons: list, masks: list, H: int, W: int,
                      no_text: bool, revise: bool, style_crops: dict, warnings: list[str]) -> "_Lines":
        """Every line's glyphs (one renderer: ``data.glyphs.draw_line``), line image, position, colour and font
        hint; ``revise``: the request's revise_position applies (generation, not editing)."""
        n = len(texts)
        glyph_font = self._font(req)
        fonts = list(req.fonts or [])
        colors = list(req.colors or [])
        if len(fonts) > n or len(colors) > n:
            warnings.append("more fonts/colours than lines: the extras are ignored")
        scale = self.model.cfg.writenet.glyph_scale
        out = _Lines(glyphs=np.zeros((n, H * scale, W * scale, 3), np.uint8), positions=np.zeros((n, H, W), np.float32),
                     gly_line=np.zeros((n, 80, 512), np.uint8), colors=np.full((n, 3), UNSPECIFIED_COLOR, np.float32),
                     font_hint=np.zeros((H, W), np.float32), used_polys=[])
        for i, text in enumerate(texts):
            poly = polygons[i] if i < len(polygons) else None
            out.used_polys.append(None if poly is None else np.asarray(poly).tolist())
            if i < len(colors) and colors[i] is not None:
                c = np.asarray(colors[i], dtype=np.float32).reshape(-1)
                if c.shape != (3,) or not np.isfinite(c).all():
                    raise InputError(f"colors[{i}]: expected (r, g, b), got {colors[i]!r}")
                out.colors[i] = c
            if poly is None or no_text:
                continue  # the original's "text-to-image without text": blank line conditioning
            missing = glyph_font.missing_chars(text)
            if missing:
                raise InputError(f"line {i} {text!r}: the glyph font {glyph_font.name} has no glyph for "
                                 f"{''.join(missing)!r}; pass a font that covers it (--font)")
            try:
                out.gly_line[i] = draw_line(out.glyphs[i], text, poly, glyph_font, tuple(out.colors[i]), scale)
            except DegeneratePolygonError as e:
                raise InputError(f"positions[{i}]: {e}") from None
            out.positions[i] = masks[i]
            if req.revise_position and revise:
                _revise(i, out.glyphs[i].astype(np.float32) / 255.0, out.positions, polygons, out.used_polys,
                        warnings)
            if i < len(fonts) and fonts[i] and i not in style_crops:
                spec = usable_font(fonts[i], f"fonts[{i}]")
                if spec.missing_chars(text):
                    raise InputError(f"fonts[{i}] {spec.name} has no glyph for {''.join(spec.missing_chars(text))!r} "
                                     f"of line {text!r}")
                out.font_hint += render_font_hint(text, poly, spec, H, W)
        out.font_hint = np.clip(out.font_hint, 0, 1)
        if req.hollow_font:
            out.font_hint = hollow_font_hint(out.font_hint)
        return out

    # ---- step 2: sampling ----------------------------------------------------------------------------------------

    def _masked_x(self, masked_img: torch.Tensor, generator: torch.Generator, blank: bool) -> torch.Tensor:
        """scale × posterior sample of the masked image; the all −1 image's posterior is computed once per size."""
        dev, dt = self.device, self.dtype
        key = (tuple(masked_img.shape), str(dev), str(dt))
        if blank and key in self._blank_posterior:
            mean, std = self._blank_posterior[key]
        else:
            mean, logvar = self.model.vae.encode(masked_img.to(dev, dt))
            std = torch.exp(0.5 * logvar)
            if blank:
                self._blank_posterior[key] = (mean, std)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(dev, dt)
        return self.model.scale_factor * (mean + std * noise)

    @torch.no_grad()
    def __call__(self, req: GenerationRequest, x_T: torch.Tensor | None = None, callback=None) -> GenerationResult:
        t0 = time.perf_counter()
        if req.cfg_scale is None:
            req = replace(req, cfg_scale=teacher_cfg(self.model.cfg))
        prep = self.prepare(req)
        t1 = time.perf_counter()
        dev, dt = self.device, self.dtype
        g = torch.Generator().manual_seed(int(req.seed))
        masked_x = self._masked_x(prep.masked_img, g, blank=req.edit_image is None)
        B = req.num_images
        ti = prep.text_info.to(dev, dt).with_masked_x(masked_x.expand(B, -1, -1, -1).contiguous())
        guided = req.cfg_scale != 1.0
        lines = self.model.line_embeddings(ti, style_crops=prep.style_crops) if prep.style_crops else None
        p = branch_prompts([prep.img_prompt] * B, [prep.text_prompt] * B, req.a_prompt, req.n_prompt, guided)
        branches = encode_branches(self.model, ti, p.img, p.text, p.neg_img, p.neg_text, lines=lines)
        denoiser = GuidedDenoiser(self.model, branches, req.cfg_scale, req.strength, req.attnx_scale, self.batch_cfg)
        t2 = time.perf_counter()
        sampler = request_sampler(req, NoiseSchedule(self.model.alphas_cumprod.float().cpu()))
        f = self.model.cfg.latent_factor
        h, w = prep.height // f, prep.width // f
        if x_T is None:
            x_T = torch.randn((B, self.model.cfg.unet.in_channels, h, w), generator=g, dtype=torch.float32)
        res = sample(denoiser, _DeviceSampler(sampler, g), req.steps, x_T.to(dev, dt), generator=g,
                     callback=callback)
        t3 = time.perf_counter()
        x = self.model.decode(res.latents)
        require_finite(x, "the decoded image")
        imgs = (x.float().permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        t4 = time.perf_counter()
        return GenerationResult(
            images=[imgs[i] for i in range(B)], latents=res.latents, texts=prep.texts, polygons=prep.polygons,
            glyph_preview=prep.glyph_preview,
            seconds={"prepare": t1 - t0, "conditioning": t2 - t1, "denoise": t3 - t2, "decode": t4 - t3,
                     "total": t4 - t0},
            warnings=prep.warnings, debug_images=prep.debug_images,
            prompts={"image": p.img[0], "text": prep.text_prompt,
                     "negative": req.n_prompt if guided else ""})


def request_sampler(req: GenerationRequest, schedule: NoiseSchedule):
    """The sampler of ``req`` on ``schedule``; options or a step count it refuses (PCM phases) are an InputError."""
    opts = dict(req.sampler_options)
    if req.sampler == "ddim":
        opts.setdefault("eta", req.eta)
    try:
        sampler = make_sampler(req.sampler, schedule, **opts)
        sampler.timesteps(req.steps)
    except (ValueError, TypeError) as e:
        raise InputError(f"sampler {req.sampler}: {e}") from None
    return sampler


class _ConfigOnly:
    """Stands in for a model where only its configuration is read (:func:`check_request`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def eval(self) -> "_ConfigOnly":
        return self


def check_request(req: GenerationRequest, cfg, glyph_font: str | None = None) -> None:
    """Every check of ``req`` that needs no weights, for a model of configuration ``cfg``, before the model is
    loaded: sizes, positions, the mask and edit image, fonts, colours and the sampler settings. Raises InputError as
    :class:`Generator` would (it runs the same rendering step)."""
    Generator(_ConfigOnly(cfg), glyph_font).prepare(req)
    request_sampler(req, NoiseSchedule.from_config(cfg.diffusion))


class _DeviceSampler:
    """Draws sampler noise on the CPU from the seeded generator, so results do not depend on the device."""

    def __init__(self, sampler, generator: torch.Generator):
        self.sampler = sampler
        self.generator = generator

    def timesteps(self, n: int) -> list[int]:
        return self.sampler.timesteps(n)

    def step(self, eps, t, t_next, x, generator=None):
        if x.device.type == "cpu":
            return self.sampler.step(eps, t, t_next, x, generator=self.generator)
        out = self.sampler.step(eps.cpu().float(), t, t_next, x.cpu().float(), generator=self.generator)
        return type(out)(out.prev_sample.to(x.device, x.dtype), out.denoised.to(x.device, x.dtype))


def _read_mask(mask, name: str) -> np.ndarray:
    """A mask from a path (its alpha channel when it has one, else its grey value) or an array, (H, W[, C])."""
    if not isinstance(mask, (str, Path)):
        return np.asarray(mask)
    from PIL import Image, UnidentifiedImageError

    p = Path(mask)
    if not p.is_file():
        raise FileNotFoundError(f"{name} {p} does not exist")
    try:
        with Image.open(p) as im:
            return np.asarray(im.getchannel("A") if "A" in im.getbands() else im.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{name} {p}: unreadable image ({e})") from None


def mimic_crops(req: GenerationRequest, n: int | None = None,
                warnings: list[str] | None = None) -> dict[int, torch.Tensor]:
    """Line index → font-OCR input (:func:`~anytext2_lcm.data.hints.mimic_font_crop`) of each line of the first
    ``n`` (None: all) whose font is mimicked (``req.mimic_fonts``). It reads the images: ``generate`` calls it before
    the model is loaded to check them.

    Raises:
        InputError / FileNotFoundError naming the line and the file.
    """
    items = list(req.mimic_fonts or [])
    if n is not None and any(x is not None for x in items[n:]) and warnings is not None:
        warnings.append("mimicked fonts given for lines the prompt does not have: ignored")
    out = {}
    for i, item in enumerate(items if n is None else items[:n]):
        if item is None:
            continue
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"mimic_fonts[{i}]: expected (image, mask), got {type(item).__name__}")
        if req.fonts and i < len(req.fonts) and req.fonts[i]:
            raise InputError(f"line {i}: a font file (fonts[{i}]) and a mimicked font (mimic_fonts[{i}]) were both "
                             "given; choose one")
        image = read_image(item[0], f"mimic_fonts[{i}] image")
        try:
            out[i] = mimic_font_crop(image, _read_mask(item[1], f"mimic_fonts[{i}] mask"))
        except ValueError as e:
            raise InputError(f"mimic_fonts[{i}]: {e}") from None
    return out



def _parse_texts(req: GenerationRequest, warnings: list[str]) -> tuple[str, str, list[str]]:
    """(image prompt with ``*`` for each quoted line, text prompt, the lines); ``[" "]`` when there is none."""
    img_prompt, prompt_texts = parse_prompt_lines(req.prompt, req.max_chars)
    if req.text_prompt is not None:
        text_prompt, texts = parse_prompt_lines(req.text_prompt, req.max_chars)
    else:
        texts = prompt_texts
        text_prompt = build_text_caption(len(texts), phrase="Text says ") if texts != [" "] else ""
    for t in re_quoted(req.prompt, req.text_prompt):
        if len(t) > req.max_chars:
            warnings.append(f'"{t}" is longer than {req.max_chars} characters and was cut')
    return img_prompt, text_prompt, texts


def _find_positions(req: GenerationRequest, H: int, W: int, n_texts: int, no_text: bool,
                    warnings: list[str]) -> tuple[list, list]:
    """The lines' polygons and (H, W) masks, from the request's mask image or its positions; one per line."""
    if req.mask is not None:
        mask = read_image(req.mask, "mask") if isinstance(req.mask, (str, Path)) else np.asarray(req.mask)
        if mask.shape[0] != H or mask.shape[1] != W:
            import cv2

            mask = cv2.resize(mask, (W, H), interpolation=cv2.INTER_NEAREST)
        found = positions_from_mask(mask, req.sort, return_masks=True)
        if not found and not no_text:
            raise InputError("mask: no position found (draw white regions of at least 20 pixels on black)")
        polygons, masks = [p for p, _ in found], [m for _, m in found]
    elif req.positions is not None:
        polygons = [as_polygon(p, f"positions[{i}]") for i, p in enumerate(req.positions)]
        for i, p in enumerate(polygons):
            if (p[:, 0].max() < 0 or p[:, 1].max() < 0 or p[:, 0].min() >= W or p[:, 1].min() >= H):
                raise InputError(f"positions[{i}]: polygon lies outside the {W}x{H} image")
        masks = [polygon_mask(p, H, W) for p in polygons]
        for i, m in enumerate(masks):
            if m.sum() == 0:
                raise InputError(f"positions[{i}]: polygon covers no pixel")
    else:
        polygons, masks = [], []
    if len(polygons) < n_texts and not no_text:
        raise InputError(f"{n_texts} quoted text lines but only {len(polygons)} positions: give one position per line")
    if len(polygons) > n_texts and not no_text:
        warnings.append(f"{len(polygons)} positions but {n_texts} lines: the extra positions are unused")
    return polygons, masks


@dataclass
class _Lines:
    """The rendered lines of a request (n lines): glyphs (n, gH, gW, 3) uint8, positions (n, H, W), line images
    (n, 80, 512) uint8, colours (n, 3) 0-255 (500: unspecified), the font-hint canvas (H, W) and the polygons used."""

    glyphs: np.ndarray
    positions: np.ndarray
    gly_line: np.ndarray
    colors: np.ndarray
    font_hint: np.ndarray
    used_polys: list

    def text_info(self, B: int, n: int, H: int, W: int, scale: int, z_channels: int, f: int) -> TextInfo:
        """The batch of ``B`` identical samples (glyphs as colour × coverage in [0, 1], as the original divides)."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        L = max(n, 1)
        glyphs = t(self.glyphs.astype(np.float32) / 255.0).permute(0, 3, 1, 2)[None]
        return TextInfo(
            glyphs=glyphs.expand(B, -1, -1, -1, -1).reshape(B, L, 3, H * scale, W * scale),
            positions=t(self.positions)[None, :, None].expand(B, -1, -1, -1, -1),
            gly_line=t(self.gly_line.astype(np.float32))[None, :, None].expand(B, -1, -1, -1, -1),
            colors=(t(self.colors) / 255.0)[None].expand(B, -1, -1),
            n_lines=torch.full((B,), n, dtype=torch.long),
            font_hint=t(self.font_hint)[None, None].expand(B, -1, -1, -1),
            masked_x=torch.zeros(B, z_channels, H // f, W // f))

def _revise(i: int, glyph: np.ndarray, positions: np.ndarray, polygons: list, used: list, warnings: list) -> None:
    """``revise_position`` of line ``i``, in place (positions (n, H, W), the polygons); a warning when the glyphs
    do not close into one region (the position is kept, as the original does)."""
    found = revise_position(glyph, positions.shape[1], positions.shape[2])
    if found is None:
        warnings.append(f"positions[{i}]: could not revise the position to the glyphs' rectangle (they do not close "
                        "into one region); kept as given")
        return
    positions[i], rect = found
    polygons[i] = rect
    used[i] = rect.tolist()


def re_quoted(*prompts: str | None) -> list[str]:
    import re

    out = []
    for p in prompts:
        if p:
            out += re.findall('"(.*?)"', p.replace("\u201c", '"').replace("\u201d", '"'))
    return out


def _glyph_preview(glyphs: np.ndarray, polygons: Sequence) -> np.ndarray:
    import cv2

    H, W = glyphs.shape[1:3] if len(glyphs) else (64, 64)
    img = (np.clip(glyphs.sum(0), 0, 1) * 255).astype(np.uint8) if len(glyphs) else np.zeros((H, W, 3), np.uint8)
    img = np.ascontiguousarray(img)
    for p in polygons:
        if p is not None:
            cv2.polylines(img, [np.rint(np.asarray(p)).astype(np.int32).reshape(-1, 1, 2)], True, (255, 255, 255), 1)
    return img


