"""AnyWord-3M annotations read as AnyText2's ``T3DataSet`` reads them, with bad samples skipped and counted.

File format (one JSON document per file; several files are concatenated)::

    {"data_root": "images",              # absolute, or relative to the JSON file's folder
     "data_list": [{"img_name": "0001.jpg", "caption": "...", "wm_score": 0.1,          # wm_score optional
                    "annotations": [{"polygon": [[x, y], ...], "text": "...", "language": "Latin",
                                     "valid": true, "color": [r, g, b]}]}]}             # valid, color optional

Per sample, as the original (DESIGN: "read as the original reads it"): the image is resized to ``image_size``; the
caption gets " with/no watermarks " (when a ``wm_score`` exists), loses its ``*``, and is truncated to
``trunc_cap`` words; rows with ``wm_score > wm_thresh`` are dropped at load. Up to ``max_lines`` valid lines are
drawn at random (the others and the ``valid: false`` ones are loss-masked through ``inv_mask``), texts are cut to
``max_chars``, the text caption is a random phrase + ``" , ".join(["*"] * n) + " . "``. Each line gets its glyph
image in its polygon (in its colour), its 80 x 512 line image, its position with random morphology and, with
``font_hint_prob``, a font hint cut from the image. With ``mask_img_prob`` the sample is in editing mode
(``masked_img`` = the image with the text regions set to -1, no loss mask); otherwise ``masked_img`` is all -1.
An image without valid lines gets one ``' '`` line in the box (10, 10)-(100, 100). Lines are padded to
``max_lines`` (zero images, text ``' '``, colour 500).

Deliberate differences from the original, each a fix: polygons are scaled with the image when it is not already
at the training size (the original assumed 512 x 512 files); the caption is not modified in place (the original
appended ". " to the stored caption on every visit); with random fonts, only fonts that have glyphs for the whole
line are drawn from.

As the original: a "Chinese" line is labelled "Chinese_tra" when OpenCC's traditional-to-simplified conversion
changes its text, else "Chinese_sim" (:func:`~.fonts.font_language`); the label picks its fonts and is the sample's
``language``. A polygon partly outside the image is kept and drawn as the original draws it (positions, glyphs and
the loss mask are cut at the image edge; the font hint clips its points to the image); the row is skipped only when
the part inside the image is degenerate (``polygon_outside``) or the polygon reaches absurdly far out
(``polygon_tolerance``).

Randomness: every draw of sample ``index`` in epoch ``epoch`` comes from ``numpy.random.default_rng(SeedSequence(
[seed, epoch, index]))``, in the original's order, so a sample does not depend on the worker that makes it or on
what was made before (mid-epoch resume reproduces it exactly).

Bad samples are never fatal and never silent: ``__getitem__`` returns a :class:`~.skips.SkipRecord` with a reason
(:data:`~.skips.SKIP_REASONS`) instead of a sample; the collate function drops and counts them. A file that is not
valid JSON or lacks ``data_list`` raises :class:`~.skips.DataFileError` naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import MAX_SEED, ConfigError, check_image_size, is_seed
from .augment import random_position_mask, training_font_hint
from .fonts import FontLibrary, FontSpec, font_language
from .glyphs import (DegeneratePolygonError, UNSPECIFIED_COLOR, cached_line_renderer, draw_line,
                     polygon_points)
from .prompts import build_text_caption, truncate_caption, watermark_caption
from .skips import DataFileError, SampleError, SkipRecord

log = logging.getLogger(__name__)

EMPTY_IMAGE_BOX = ((10, 10), (100, 10), (100, 100), (10, 100))
"""Where the original puts the single ' ' line of an image without text (training pixels)."""


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"data.{name}={value!r}: {rule}")


@dataclass(kw_only=True)
class DataConfig:
    """How AnyWord-format data is read and turned into training samples."""

    json_paths: tuple[str, ...] = ()
    """AnyWord annotation files; their rows are concatenated in the given order."""
    index: str | None = None
    """Instead of json_paths: an annotation index written by ``anytext2-lcm index-data`` (the same rows in a
    memory-mapped Arrow file: opens in seconds and is shared by every process of a machine; ``data.index``)."""
    shards: str | None = None
    """Instead of json_paths: a folder of WebDataset shards written by ``anytext2-lcm make-shards`` (images and
    annotations together; read as streams, see ``data.shards``)."""
    shuffle_buffer: int = 256
    """With shards: samples of a shard held in a shuffle buffer per stream (1: shard order only)."""
    image_size: int = 512
    """Training size: images become image_size x image_size (a multiple of 64)."""
    max_lines: int = 5
    """Line slots per sample; images with more valid lines get a random subset, the rest loss-masked."""
    max_chars: int = 20
    """Texts are cut to this many characters."""
    glyph_scale: int = 1
    """Glyph images are rendered at image_size * glyph_scale (the WriteNet's glyph_scale; 1 in AnyText2)."""
    mask_img_prob: float = 0.5
    """Probability of editing mode (masked image shows everything but the text). The original class default is 0.5;
    the released train.py used 0 (generation only)."""
    mask_pos_prob: float = 1.0
    """Probability that a line's position mask is drawn at all (the original: 1.0)."""
    font_hint_prob: float = 0.8
    """Probability that a line contributes a font hint cut from the image (train.py: 0.8; 0 disables)."""
    font_hint_area: tuple[float, float] = (0.7, 1.0)
    """Range of the fraction of each line the font hint keeps (train.py: [0.7, 1])."""
    font_hint_randaug: bool = True
    """Randomly rotate / shift / zoom the font-hint crop (train.py: True)."""
    color_prob: float = 1.0
    """Probability that a line keeps its colour (else 500 = unspecified; the original: 1.0)."""
    wm_thresh: float = 1.0
    """Rows with wm_score above this are dropped at load (1.0: none)."""
    cap_watermark: bool = True
    """Append " with watermarks " / " no watermarks " to captions of rows that have a wm_score."""
    trunc_cap: int = 128
    """Captions longer than this many words are truncated (0: never)."""
    font: str | None = None
    """Font file (``path`` or ``path#index``) for every line; default: a CJK-capable system font by file."""
    font_dir: str | None = None
    """Folder of per-language fonts (``fonts.json`` or one sub-folder per language), for rand_font."""
    rand_font: bool = False
    """Draw each line in a random font of its language from font_dir (train.py: True with its own fonts)."""
    seed: int = 0
    """Base seed; sample (epoch, index) uses SeedSequence([seed, epoch, index])."""
    max_skip_rate: float = 0.05
    """The run stops when more than this fraction of the samples seen so far were skipped."""
    min_items_for_skip_rate: int = 100
    """Judge the skip rate only after this many samples (or the whole dataset, if smaller)."""
    polygon_tolerance: float = 1.0
    """A valid line's polygon may reach this fraction of the image's longer side beyond its edge (it is clipped
    there, as the original draws it); further out the coordinates count as corrupt (``polygon_outside``). A polygon
    whose part inside the image is degenerate is skipped whatever this says."""
    min_image_side: int = 16
    """Images with a side below this many pixels are skipped (image_size)."""
    max_image_side: int = 8192
    """Images with a side above this many pixels are skipped (image_size); also guards against decompression
    bombs."""
    max_aspect_ratio: float = 8.0
    """Images more elongated than this are skipped (image_size)."""
    line_cache_size: int = 4096
    """Per-process LRU cache of 80 x 512 line images by (text, font); 0 disables."""
    allow_absolute_paths: bool = False
    """Read rows whose ``img_name`` is an absolute path (images outside ``data_root``). By default such a row, and
    one whose ``img_name`` leaves ``data_root`` through ``..`` (always), is a counted skip (``path_outside_root``)."""

    def __post_init__(self) -> None:
        if isinstance(self.json_paths, (str, os.PathLike)):
            self.json_paths = (os.fspath(self.json_paths),)
        self.json_paths = tuple(os.fspath(p) for p in self.json_paths)
        sources = [n for n in ("json_paths", "index", "shards") if getattr(self, n)]
        _check(len(sources) <= 1, sources[-1] if sources else "index", getattr(self, sources[-1]) if sources else None,
               f"give one data source: json_paths, index or shards (got {', '.join(sources)})")
        _check(isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 1, "shuffle_buffer",
               self.shuffle_buffer, "must be an integer >= 1")
        _check(isinstance(self.font_hint_area, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.font_hint_area), "font_hint_area",
               self.font_hint_area, "must be [low, high] numbers")
        self.font_hint_area = tuple(float(v) for v in self.font_hint_area)
        for f in dataclasses.fields(self):  # NaN / Inf pass every `>=` / `<=` test below in some direction
            v = getattr(self, f.name)
            ok = math.isfinite if f.name != "wm_thresh" else (lambda x: not math.isnan(x))  # inf: no row dropped
            _check(all(ok(x) for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, float)),
                   f.name, v, "must be finite" if f.name != "wm_thresh" else "must be a number (inf: keep every row)")
        _check(isinstance(self.allow_absolute_paths, bool), "allow_absolute_paths", self.allow_absolute_paths,
               "must be true or false")
        check_image_size(self.image_size, "data.image_size")
        _check(isinstance(self.max_lines, int) and self.max_lines >= 1, "max_lines", self.max_lines, "must be >= 1")
        _check(isinstance(self.max_chars, int) and self.max_chars >= 1, "max_chars", self.max_chars, "must be >= 1")
        _check(self.glyph_scale in (1, 2), "glyph_scale", self.glyph_scale, "must be 1 or 2")
        for name in ("mask_img_prob", "mask_pos_prob", "font_hint_prob", "color_prob", "max_skip_rate"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, name, v, "must lie in [0, 1]")
        area = self.font_hint_area
        _check(len(area) == 2 and 0.0 <= area[0] <= area[1] <= 1.0, "font_hint_area", area,
               "must be [low, high] with 0 <= low <= high <= 1")
        _check(isinstance(self.trunc_cap, int) and self.trunc_cap >= 0, "trunc_cap", self.trunc_cap, "must be >= 0")
        _check(is_seed(self.seed), "seed", self.seed, f"must be an integer in 0..{MAX_SEED}")
        _check(not self.rand_font or bool(self.font_dir), "rand_font", self.rand_font,
               "needs font_dir (a folder of per-language fonts)")
        _check(self.min_items_for_skip_rate >= 1, "min_items_for_skip_rate", self.min_items_for_skip_rate,
               "must be >= 1")
        _check(self.polygon_tolerance >= 0, "polygon_tolerance", self.polygon_tolerance, "must be >= 0")
        _check(1 <= self.min_image_side <= self.max_image_side, "min_image_side", self.min_image_side,
               f"must lie in [1, max_image_side={self.max_image_side}]")
        _check(self.max_aspect_ratio >= 1, "max_aspect_ratio", self.max_aspect_ratio, "must be >= 1")
        _check(self.line_cache_size >= 0, "line_cache_size", self.line_cache_size, "must be >= 0")

    def font_library(self) -> FontLibrary:
        """The fonts this configuration asks for (system default font if none given)."""
        if self.font_dir:
            return FontLibrary.from_dir(self.font_dir, default=self.font)
        return FontLibrary.single(self.font)


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Line:
    """A valid text line as annotated (original image pixels)."""

    polygon: np.ndarray
    """(N, 2) float64 x, y."""
    text: str
    language: str
    color: tuple[float, float, float] | None
    """RGB 0-255, or None (unspecified = 500)."""


@dataclass(slots=True)
class Row:
    """One usable-looking row of ``data_list`` (content checks happen when it is read)."""

    img_path: str
    caption: str
    lines: list[Line]
    invalid_polygons: list[np.ndarray]
    source: str


@dataclass(slots=True)
class BadRow:
    """A row rejected at load: returned as a skip every time it is asked for."""

    reason: str
    detail: str
    source: str


@dataclass
class LoadStats:
    """What loading the annotation files found (logged; ``AnyWordDataset.load_stats``)."""

    rows: int = 0
    filtered_watermark: int = 0
    malformed: Counter = field(default_factory=Counter)
    """reason -> rows rejected at load (they stay in the dataset as skips)."""
    empty_polygon_annotations: int = 0
    """Annotations with an empty polygon (ignored, as the original does)."""
    captions_with_placeholder: int = 0
    per_file: dict = field(default_factory=dict)
    """file -> rows kept."""


def load_annotation_file(path: str | os.PathLike) -> tuple[str, list]:
    """(data_root resolved to a folder, data_list) of one AnyWord JSON file.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFileError: not valid JSON (with line and column), or not ``{"data_list": [...]}``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(content, dict) or not isinstance(content.get("data_list"), list):
        raise DataFileError(f'{path}: expected an object with a "data_list" list (the AnyWord-3M format)')
    root = content.get("data_root", "")
    if not isinstance(root, str):
        raise DataFileError(f'{path}: "data_root" must be a string, got {type(root).__name__}')
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)
    return root, content["data_list"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_polygon(raw, what: str) -> np.ndarray:
    if not isinstance(raw, (list, tuple)):
        raise SampleError("bad_field_type", f"{what}: polygon must be a list of [x, y], got {type(raw).__name__}")
    for k, pt in enumerate(raw):
        if not isinstance(pt, (list, tuple)) or len(pt) != 2 or not all(_is_number(v) for v in pt):
            raise SampleError("bad_field_type", f"{what}: polygon point {k} is not [x, y] numbers: {pt!r}")
    return np.asarray(raw, dtype=np.float64).reshape(-1, 2)


def confined_path(data_root: str, name: str, allow_absolute: bool = False) -> str:
    """The image path of ``img_name`` under ``data_root``. An absolute name (unless ``allow_absolute``) or one that
    leaves the root through ``..`` is a SampleError ``path_outside_root`` (the check is on the path's text: links
    inside the root are followed as the data's owner made them)."""
    if os.path.isabs(name):
        if not allow_absolute:
            raise SampleError("path_outside_root", f"img_name {name!r} is an absolute path (set "
                                                   f"data.allow_absolute_paths to read images outside data_root)")
        return name
    root = os.path.normpath(os.path.abspath(data_root))
    if os.path.commonpath([root, os.path.normpath(os.path.join(root, name))]) != root:
        raise SampleError("path_outside_root", f"img_name {name!r} leaves data_root {data_root}")
    return os.path.join(data_root, name)


def parse_row(raw, data_root: str, source: str, cfg: DataConfig, stats: LoadStats) -> Row | BadRow | None:
    """Check the structure and types of one ``data_list`` entry; None if filtered by its watermark score."""
    try:
        if not isinstance(raw, dict):
            raise SampleError("malformed_row", f"row is a {type(raw).__name__}, not an object")
        if "img_name" not in raw:
            raise SampleError("malformed_row", "missing img_name")
        name = raw["img_name"]
        if not isinstance(name, str):
            raise SampleError("bad_field_type", f"img_name is a {type(name).__name__}, not a string")
        if not name:
            raise SampleError("malformed_row", "img_name is empty")
        img_path = confined_path(data_root, name, cfg.allow_absolute_paths)
        wm = raw.get("wm_score")
        if wm is not None and not _is_number(wm):
            raise SampleError("bad_field_type", f"wm_score is a {type(wm).__name__}, not a number")
        if wm is not None and wm > cfg.wm_thresh:
            stats.filtered_watermark += 1
            return None
        caption = raw.get("caption", "")
        if not isinstance(caption, str):
            raise SampleError("bad_field_type", f"caption is a {type(caption).__name__}, not a string")
        if "*" in caption:
            stats.captions_with_placeholder += 1
        caption = watermark_caption(caption, wm, cfg.cap_watermark)
        annotations = raw.get("annotations", [])
        if not isinstance(annotations, list):
            raise SampleError("bad_field_type", f"annotations is a {type(annotations).__name__}, not a list")
        lines, invalid = [], []
        for j, ann in enumerate(annotations):
            what = f"annotation {j}"
            if not isinstance(ann, dict):
                raise SampleError("malformed_row", f"{what} is a {type(ann).__name__}, not an object")
            if "polygon" not in ann:
                raise SampleError("malformed_row", f"{what} has no polygon")
            if isinstance(ann["polygon"], list) and len(ann["polygon"]) == 0:
                stats.empty_polygon_annotations += 1  # the original ignores these
                continue
            poly = _parse_polygon(ann["polygon"], what)
            valid = ann.get("valid", True)
            if not isinstance(valid, bool):
                raise SampleError("bad_field_type", f"{what}: valid is a {type(valid).__name__}, not true/false")
            if not valid:
                invalid.append(poly)
                continue
            for key in ("text", "language"):
                if key not in ann:
                    raise SampleError("malformed_row", f"{what} has no {key}")
                if not isinstance(ann[key], str):
                    raise SampleError("bad_field_type", f"{what}: {key} is a {type(ann[key]).__name__}, not a string")
            color = ann.get("color")
            if color is not None:
                if not isinstance(color, (list, tuple)) or len(color) != 3 or not all(_is_number(c) for c in color):
                    raise SampleError("bad_field_type", f"{what}: color must be [r, g, b] numbers, got {color!r}")
                color = tuple(float(c) for c in color)
            lines.append(Line(poly, ann["text"], ann["language"], color))
        return Row(img_path, caption, lines, invalid, source)
    except SampleError as e:
        stats.malformed[e.reason] += 1
        return BadRow(e.reason, e.detail, source)


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random draw for sample ``index`` in ``epoch``."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


class AnyWordDataset:
    """AnyWord-format rows -> training samples (numpy, uint8 where exact) or :class:`SkipRecord`.

    ``dataset[i]`` uses the current epoch (:meth:`set_epoch`); ``dataset[(epoch, i)]`` names it explicitly (the
    sampler of :func:`~.collate.make_dataloader` does this, so persistent workers need no epoch broadcast).

    A sample is a dict::

        img          (S, S, 3) uint8 RGB            -> img in [-1, 1]
        edit_mask    (S, S) uint8 {0,1}             -> masked_img = -1 where 1, else img (all 1 in generation mode)
        glyphs       (L, 3, S*g, S*g) uint8         -> glyphs / 255 (colour x coverage)
        positions    (L, S, S) uint8 {0,1}
        gly_line     (L, 80, 512) uint8 {0,1}
        colors       (L, 3) float32 RGB 0-255 (500 = unspecified)
        n_lines      int (1..L)
        inv_mask, hint, font_hint   (S, S) uint8 {0,1}
        img_caption, text_caption   str
        texts, language             list of L str (padding: ' ')
        index        int
    """

    def __init__(self, cfg: DataConfig, fonts: FontLibrary | None = None, rows=None, load_stats: LoadStats | None = None):
        """``rows``/``load_stats``: rows read elsewhere, e.g. the memory-mapped index of ``data.index``
        (``data.index.IndexedRows``, which the loader passes); the JSON files of ``data.json_paths`` follow them."""
        if not cfg.json_paths and rows is None:
            raise ConfigError("data.json_paths=(): give at least one AnyWord annotation file (or data.index)")
        self.cfg = cfg
        self.fonts = fonts if fonts is not None else cfg.font_library()
        self.epoch = 0
        self.load_stats = load_stats or LoadStats()
        self.rows: list[Row | BadRow] = rows if rows is not None else []
        for path in cfg.json_paths:
            root, data_list = load_annotation_file(path)
            kept = 0
            for k, raw in enumerate(data_list):
                row = parse_row(raw, root, f"{os.path.basename(path)}:row {k}", cfg, self.load_stats)
                if row is not None:
                    self.rows.append(row)
                    kept += 1
            self.load_stats.rows += len(data_list)
            self.load_stats.per_file[os.fspath(path)] = kept
            log.info("%s: %d rows, %d kept", path, len(data_list), kept)
        st = self.load_stats
        if st.filtered_watermark:
            log.info("dropped %d rows with wm_score > %s", st.filtered_watermark, cfg.wm_thresh)
        if st.malformed:
            log.warning("%d malformed rows will be skipped: %s", sum(st.malformed.values()), dict(st.malformed))
        if st.empty_polygon_annotations:
            log.info("ignored %d annotations with an empty polygon", st.empty_polygon_annotations)
        if st.captions_with_placeholder:
            log.info("%d captions contained '*', replaced by ' '", st.captions_with_placeholder)
        self._render_line = cached_line_renderer(cfg.line_cache_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # the line cache is per process (and not picklable): workers build their own
        state = dict(self.__dict__)
        del state["_render_line"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._render_line = cached_line_renderer(self.cfg.line_cache_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key) -> dict | SkipRecord:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        row = self.rows[index]
        if isinstance(row, BadRow):
            return SkipRecord(index, row.reason, row.detail, row.source)
        try:
            return self._process(row, index, sample_rng(self.cfg.seed, int(epoch), index))
        except SampleError as e:
            return SkipRecord(index, e.reason, e.detail, row.source)
        except DegeneratePolygonError as e:
            return SkipRecord(index, "polygon_degenerate", str(e), row.source)
        except Exception as e:  # never crash training on one sample; counted and logged with its traceback
            log.warning("unexpected error in %s (%s)", row.source, row.img_path, exc_info=True)
            return SkipRecord(index, "processing_error", f"{type(e).__name__}: {e}", row.source)

    # ---- checks shared with validation --------------------------------------------------------------------

    def load_image(self, path: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the file's own size. Raises SampleError (image_missing/unreadable/size)."""
        cfg = self.cfg
        source = self.open_image(path)
        try:
            with Image.open(source) as im:
                w, h = im.size
                if min(w, h) < cfg.min_image_side or max(w, h) > cfg.max_image_side \
                        or max(w, h) > cfg.max_aspect_ratio * min(w, h):
                    raise SampleError("image_size", f"{path}: {w} x {h} px (allowed sides {cfg.min_image_side}-"
                                                    f"{cfg.max_image_side}, aspect <= {cfg.max_aspect_ratio})")
                return np.array(im.convert("RGB"))  # writable: torch.from_numpy wants that
        except SampleError:
            raise
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise SampleError("image_unreadable", f"{path}: {type(e).__name__}: {e}") from e

    def open_image(self, path: str):
        """What ``Image.open`` reads for ``path`` (here the file; a shard reader hands over the bytes it holds)."""
        if not os.path.isfile(path):
            raise SampleError("image_missing", path)
        return path

    def check_lines(self, row: Row, width: int, height: int) -> list[np.ndarray]:
        """Geometry and text checks of the valid lines; returns their polygons in training pixels."""
        cfg = self.cfg
        s = cfg.image_size
        tol = cfg.polygon_tolerance * max(width, height)
        scale = np.array([s / width, s / height])
        scaled = []
        for j, line in enumerate(row.lines):
            p = line.polygon
            if len(p) < 3 or not np.all(np.isfinite(p)):
                raise SampleError("polygon_degenerate", f"line {j}: {len(p)} points (need >= 3 finite)")
            spans = (f"line {j}: polygon spans x {p[:, 0].min():g}..{p[:, 0].max():g}, y {p[:, 1].min():g}.."
                     f"{p[:, 1].max():g} on a {width} x {height} image")
            lo, hi = p.min(axis=0), p.max(axis=0)
            if lo.min() < -tol or hi[0] > width + tol or hi[1] > height + tol:
                raise SampleError("polygon_outside", f"{spans} (beyond polygon_tolerance)")
            # The part inside the image (the original clips the points so for its font hint; drawing cuts the rest).
            inside = np.stack([np.clip(p[:, 0], 0, width - 1), np.clip(p[:, 1], 0, height - 1)], axis=1) * scale
            short = min(cv2.minAreaRect(inside.astype(np.float32))[1])
            if short < 2.0:
                if lo.min() < 0 or hi[0] > width - 1 or hi[1] > height - 1:
                    raise SampleError("polygon_outside", f"{spans}: the part inside is {short:.2f} px thick at "
                                                         f"{s} px (need >= 2)")
                raise SampleError("polygon_degenerate", f"line {j}: {short:.2f} px thick at {s} px (need >= 2)")
            text = line.text[:cfg.max_chars]
            if not text.strip():
                raise SampleError("empty_text", f"line {j}: text {line.text!r}")
            language = font_language(line.language, line.text)
            if not any(f.covers(text) for f in self.font_candidates(language)):
                missing = self.font_candidates(language)[0].missing_chars(text)
                chars = ", ".join(f"U+{ord(c):04X} {c!r}" for c in missing)
                raise SampleError("unrenderable_text", f"line {j} ({language}): {text!r} has characters no "
                                                       f"available font renders: {chars}")
            scaled.append(p * scale)
        return scaled

    def font_candidates(self, language: str) -> list[FontSpec]:
        """The fonts a line of ``language`` may be drawn in (all of its language with rand_font, else the default)."""
        return self.fonts.candidates(language) if self.cfg.rand_font else [self.fonts.default]

    # ---- the original's per-item processing ------------------------------------------------------------------

    def _process(self, row: Row, index: int, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        s, n_slots, g = cfg.image_size, cfg.max_lines, cfg.image_size * cfg.glyph_scale
        editing = rng.random() < cfg.mask_img_prob

        image = self.load_image(row.img_path)
        h0, w0 = image.shape[:2]
        polygons = self.check_lines(row, w0, h0)
        if (h0, w0) != (s, s):
            image = cv2.resize(image, (s, s), interpolation=cv2.INTER_LINEAR)
        scale = np.array([s / w0, s / h0])
        caption = truncate_caption(row.caption + ". ", cfg.trunc_cap, rng) if cfg.trunc_cap > 0 else row.caption

        if row.lines:
            texts = [ln.text for ln in row.lines]
            langs = [font_language(ln.language, ln.text) for ln in row.lines]
            colors = [ln.color if ln.color is not None else UNSPECIFIED_COLOR for ln in row.lines]
        else:  # the original's padding line, so that every sample has one
            texts, langs, colors = [" "], ["Latin"], [UNSPECIFIED_COLOR]
            polygons = [np.asarray(EMPTY_IMAGE_BOX, dtype=np.float64)]
        n_all = len(texts)
        if n_all > n_slots:
            sel = [int(i) for i in rng.permutation(n_all)[:n_slots]]  # random.sample: random subset, random order
        else:
            sel = list(range(n_all))
        unsel = [i for i in range(n_all) if i not in sel]
        colors = [colors[i] for i in sel]
        if cfg.color_prob < 1.0:
            colors = [UNSPECIFIED_COLOR if rng.random() < 1 - cfg.color_prob else c for c in colors]
        text_caption = build_text_caption(len(sel), rng)
        texts = [texts[i][:cfg.max_chars] for i in sel]
        langs = [langs[i] for i in sel]
        polys = [polygons[i] for i in sel]
        n = len(sel)

        glyphs = np.zeros((n_slots, 3, g, g), dtype=np.uint8)  # channel-first: the batch layout, no transpose later
        gly_line = np.zeros((n_slots, 80, 512), dtype=np.uint8)
        for j, (text, lang) in enumerate(zip(texts, langs)):
            font = self.fonts.choose(lang, text, rng if cfg.rand_font else None)
            if font is None:  # checked above; only a font folder changing under us gets here
                raise SampleError("unrenderable_text", f"no font renders {text!r} ({lang})")
            gly_line[j] = draw_line(glyphs[j].transpose(1, 2, 0), text, polys[j], font, colors[j], cfg.glyph_scale,
                                    self._render_line)

        positions = np.zeros((n_slots, s, s), dtype=np.uint8)
        hints = []
        for j, poly in enumerate(polys):
            positions[j] = random_position_mask(poly, s, s, rng, cfg.mask_pos_prob, ref_size=s)
            if cfg.font_hint_prob > 0:
                hints.append(training_font_hint(image, poly, rng, cfg.font_hint_prob, cfg.font_hint_area,
                                                cfg.font_hint_randaug))
        hint = np.clip(positions[:n].sum(axis=0), 0, 1).astype(np.uint8)
        font_hint = np.clip(np.sum(hints, axis=0), 0, 1).astype(np.uint8) if hints \
            else np.zeros((s, s), dtype=np.uint8)

        inv_polys = [p * scale for p in row.invalid_polygons] + [polygons[i] for i in unsel]
        if editing:
            inv_polys = []  # the original clears the loss mask in editing mode
            edit_mask = hint
        else:
            edit_mask = np.ones((s, s), dtype=np.uint8)
        inv_mask = np.zeros((s, s), dtype=np.uint8)
        for p in inv_polys:  # one call per polygon: a multi-contour fillPoly would leave overlaps unfilled
            cv2.fillPoly(inv_mask, [polygon_points(p)], 1)

        pad = n_slots - n
        color_arr = np.asarray(list(colors) + [UNSPECIFIED_COLOR] * pad, dtype=np.float32)
        return {
            "img": image, "edit_mask": edit_mask, "glyphs": glyphs, "positions": positions, "gly_line": gly_line,
            "colors": color_arr, "n_lines": n, "inv_mask": inv_mask, "hint": hint, "font_hint": font_hint,
            "img_caption": caption, "text_caption": text_caption,
            "texts": texts + [" "] * pad, "language": langs + [" "] * pad, "index": index,
        }

