"""Fonts for glyph rendering: finding them by file, loading them per process, and checking glyph coverage.

A font is named by a :class:`FontSpec` (file + face index), never by a family name: fontconfig aliases are unreliable
(``fc-match "Arial Unicode MS"`` resolves to DejaVu Sans, which has no CJK glyphs). The default font is searched by
*file name* in the standard font folders and in ``fc-list``'s file list, in this order of preference: the user's
Arial Unicode (the original's font), Noto Sans CJK SC (``NotoSansCJK-Regular.ttc``, face 2), Source Han Sans SC,
WenQuanYi Micro Hei, WenQuanYi Zen Hei. ``$ANYTEXT2_FONT`` (``path`` or ``path#index``) overrides the search.

Loaded ``PIL.ImageFont.FreeTypeFont`` objects are cached per process and per (file, index, size) in a bounded LRU
(:func:`load_font`). FreeType maps a font file into memory and closes its descriptor, so the cache holds no file
handles; DataLoader workers start with an empty cache (:func:`clear_font_cache` in their ``worker_init_fn``).

Glyph coverage (:func:`FontSpec.missing_chars`) reads the font's ``cmap`` table (formats 4, 6, 10, 12, 13) directly
from the file, because fontTools is not a dependency and Pillow renders a missing character as the ``.notdef`` box
(a non-empty mask), so mask emptiness cannot tell. If the table cannot be read, a character counts as missing when
its rendered mask equals the ``.notdef`` mask.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ImageFont

log = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

# Preferred default fonts by file name (case-insensitive), best first. Faces of collections are chosen by
# :func:`preferred_face_index` (the Simplified-Chinese face of a CJK collection).
DEFAULT_FONT_FILES = (
    "arial_unicode.ttf", "arial unicode.ttf", "arialuni.ttf", "arial unicode ms.ttf",
    "notosanscjk-regular.ttc", "notosanscjksc-regular.otf", "notosanssc-regular.otf", "notosanssc-regular.ttf",
    "sourcehansanssc-regular.otf", "sourcehansanscn-regular.otf", "sourcehansans-regular.ttc",
    "wqy-microhei.ttc", "wqy-zenhei.ttc",
)

# Language labels of AnyWord-3M / the original's font dictionary, and the labels whose fonts may stand in.
LANGUAGE_ALIASES = {
    "en": "Latin", "ch_sim_char": "Chinese_sim", "ch_tra_char": "Chinese_tra", "hi": "Hindi", "ar": "Arabic",
    "ja": "Japanese", "ko": "Korean", "bn": "Bangla",
}
LANGUAGE_FALLBACKS = {
    "Chinese": ("Chinese", "Chinese_sim", "Chinese_tra"),
    "Chinese_sim": ("Chinese_sim", "Chinese", "Chinese_tra"),
    "Chinese_tra": ("Chinese_tra", "Chinese", "Chinese_sim"),
}


class FontNotFoundError(FileNotFoundError):
    """No usable font: the message says what to install or pass."""


def standard_font_dirs() -> list[Path]:
    """Font folders of Linux, macOS and Windows that exist on this machine (user folders first)."""
    home = Path.home()
    cands = [home / ".local/share/fonts", home / ".fonts", Path("/usr/local/share/fonts"), Path("/usr/share/fonts"),
             home / "Library/Fonts", Path("/Library/Fonts"), Path("/System/Library/Fonts"),
             Path(os.environ.get("WINDIR", "C:/Windows")) / "Fonts"]
    return [d for d in cands if d.is_dir()]


@functools.lru_cache(maxsize=1)
def system_font_files() -> tuple[str, ...]:
    """Every font file in the standard folders plus those ``fc-list`` knows, sorted (deterministic order)."""
    files: set[str] = set()
    for d in standard_font_dirs():
        for root, _, names in os.walk(d):
            files.update(os.path.join(root, n) for n in names if n.lower().endswith(FONT_SUFFIXES))
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=20)
            files.update(p.strip() for p in out.stdout.splitlines()
                         if p.strip().lower().endswith(FONT_SUFFIXES) and os.path.isfile(p.strip()))
        except (OSError, subprocess.SubprocessError) as e:  # fc-list is only a second source
            log.debug("fc-list failed: %s", e)
    return tuple(sorted(files))


@functools.lru_cache(maxsize=256)
def preferred_face_index(path: str) -> int:
    """Face to use in a font file: for a collection, the first face whose family ends in " SC"; else 0."""
    if not path.lower().endswith((".ttc", ".otc")):
        return 0
    for i in range(64):
        try:
            family = ImageFont.truetype(path, 10, index=i).getname()[0] or ""
        except OSError:
            break
        if family.endswith(" SC"):
            return i
    return 0


@dataclass(frozen=True, order=True)
class FontSpec:
    """A font face: a file path and the face index inside it (collections such as ``.ttc`` hold several)."""

    path: str
    index: int = 0

    @classmethod
    def parse(cls, text: str | os.PathLike, index: int | None = None) -> "FontSpec":
        """``"file"`` or ``"file#index"``; without an index a collection's preferred face is used."""
        s = os.fspath(text)
        if index is None and "#" in s and s.rsplit("#", 1)[1].isdigit():
            s, idx = s.rsplit("#", 1)
            index = int(idx)
        if not os.path.isfile(s):
            raise FontNotFoundError(f"font file not found: {s}")
        return cls(os.path.abspath(s), preferred_face_index(os.path.abspath(s)) if index is None else int(index))

    @property
    def name(self) -> str:
        """Short readable name: ``file.ttc#2``."""
        base = os.path.basename(self.path)
        return f"{base}#{self.index}" if self.index else base

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at ``size`` pixels (cached per process)."""
        return load_font(self, int(size))

    def missing_chars(self, text: str) -> list[str]:
        """Characters of ``text`` this face has no glyph for, in order of first appearance (whitespace is fine)."""
        cov = coverage(self)
        out: list[str] = []
        for ch in dict.fromkeys(text):
            if not ch.isspace() and not cov.has(ord(ch)):
                out.append(ch)
        return out

    def covers(self, text: str) -> bool:
        return not self.missing_chars(text)


@functools.lru_cache(maxsize=128)
def load_font(spec: FontSpec, size: int) -> ImageFont.FreeTypeFont:
    """Open ``spec`` at ``size`` px. Cached per process; bounded so that a long run keeps a fixed footprint."""
    if size <= 0:
        raise ValueError(f"font size must be > 0, got {size}")
    return ImageFont.truetype(spec.path, size=size, index=spec.index)


def clear_font_cache() -> None:
    """Forget loaded faces (call in a DataLoader worker so that each worker opens its own)."""
    load_font.cache_clear()


def as_font_spec(font) -> FontSpec:
    """Accept a :class:`FontSpec`, a path (``file`` / ``file#index``) or a path-based ``FreeTypeFont``."""
    if isinstance(font, FontSpec):
        return font
    if isinstance(font, ImageFont.FreeTypeFont):
        if not isinstance(font.path, (str, os.PathLike)):
            raise TypeError("a FreeTypeFont loaded from bytes has no file; pass a FontSpec or a path")
        return FontSpec(os.path.abspath(os.fspath(font.path)), int(font.index))
    if isinstance(font, (str, os.PathLike)):
        return FontSpec.parse(font)
    raise TypeError(f"not a font: {font!r}")


# ---------------------------------------------------------------------------------------------------------------
# Default font discovery
# ---------------------------------------------------------------------------------------------------------------


def find_default_font(user_font: str | os.PathLike | None = None) -> FontSpec:
    """The font for all lines when no per-language fonts are given.

    Order: ``user_font``; ``$ANYTEXT2_FONT``; the first of :data:`DEFAULT_FONT_FILES` found on the system.
    Raises :class:`FontNotFoundError` naming what to install.
    """
    if user_font:
        return FontSpec.parse(user_font)
    env = os.environ.get("ANYTEXT2_FONT")
    if env:
        return FontSpec.parse(env)
    by_name: dict[str, str] = {}
    for p in system_font_files():
        by_name.setdefault(os.path.basename(p).lower(), p)
    for name in DEFAULT_FONT_FILES:
        if name in by_name:
            spec = FontSpec.parse(by_name[name])
            log.debug("default font: %s", spec)
            return spec
    raise FontNotFoundError(
        "no CJK-capable font found (looked for Arial Unicode, Noto Sans CJK SC, Source Han Sans SC, WenQuanYi in "
        f"{[str(d) for d in standard_font_dirs()]} and fc-list): install fonts-noto-cjk or fonts-wqy-microhei "
        "(`make fonts`), set ANYTEXT2_FONT=FILE[#INDEX], or pass a font file")


# ---------------------------------------------------------------------------------------------------------------
# Per-language font library
# ---------------------------------------------------------------------------------------------------------------


def normalize_language(lang: str) -> str:
    return LANGUAGE_ALIASES.get(lang, lang)


@functools.lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


def font_language(language: str, text: str) -> str:
    """The original's font label of a line: "Chinese" becomes "Chinese_tra" when OpenCC's traditional-to-simplified
    conversion changes ``text`` (it holds traditional characters), else "Chinese_sim"; other labels are unchanged.

    The original (``t3_dataset.tra_chinese``) labels lines so at load, so that random fonts are drawn from the fonts
    of the right script; OpenCC (the ``opencc`` package) is the library it uses.
    """
    if language != "Chinese":
        return language
    return "Chinese_tra" if _t2s().convert(text) != text else "Chinese_sim"


class FontLibrary:
    """``language -> [FontSpec]`` plus a default face for everything else.

    Build it with :meth:`single` (one font for all lines, the original's ``rand_font=False``) or :meth:`from_dir`:
    either a folder holding ``fonts.json`` (``{"Latin": ["a.ttf", "b.ttc#2"], "Chinese_sim": [...]}``, paths
    relative to the folder) or a folder with one sub-folder of font files per language (``Latin/``, ``Chinese/``,
    ...). Font files directly in the folder serve every language.
    """

    def __init__(self, default: FontSpec, by_language: dict[str, list[FontSpec]] | None = None,
                 shared: list[FontSpec] | None = None):
        self.default = default
        self.by_language = {normalize_language(k): list(v) for k, v in (by_language or {}).items() if v}
        self.shared = list(shared or [])

    @classmethod
    def single(cls, font: str | os.PathLike | FontSpec | None = None) -> "FontLibrary":
        return cls(font if isinstance(font, FontSpec) else find_default_font(font))

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, default: str | os.PathLike | FontSpec | None = None
                 ) -> "FontLibrary":
        folder = Path(folder)
        if not folder.is_dir():
            raise FontNotFoundError(f"font folder not found: {folder}")
        by_lang: dict[str, list[FontSpec]] = {}
        shared: list[FontSpec] = []
        manifest = folder / "fonts.json"
        if manifest.is_file():
            try:
                spec = json.loads(manifest.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
            if not isinstance(spec, dict):
                raise ValueError(f"{manifest}: expected an object mapping language -> list of font files")
            for lang, files in spec.items():
                if not isinstance(files, list):
                    raise ValueError(f"{manifest}: {lang!r} must map to a list of font files")
                by_lang[lang] = [FontSpec.parse(folder / f) if not os.path.isabs(f) else FontSpec.parse(f)
                                 for f in files]
        else:
            for entry in sorted(folder.iterdir()):
                if entry.is_dir():
                    files = sorted(p for p in entry.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
                    if files:
                        by_lang[entry.name] = [FontSpec.parse(p) for p in files]
                elif entry.suffix.lower() in FONT_SUFFIXES:
                    shared.append(FontSpec.parse(entry))
        if not by_lang and not shared:
            raise FontNotFoundError(f"no font files (.ttf/.otf/.ttc) in {folder} or its language sub-folders")
        if isinstance(default, FontSpec):
            dflt = default
        else:
            try:
                dflt = find_default_font(default)
            except FontNotFoundError:
                dflt = (shared or next(iter(by_lang.values())))[0]
        return cls(dflt, by_lang, shared)

    def candidates(self, language: str) -> list[FontSpec]:
        """Fonts for ``language`` (its own, then related labels, then the shared ones); never empty."""
        lang = normalize_language(language)
        out: list[FontSpec] = []
        for key in LANGUAGE_FALLBACKS.get(lang, (lang,)):
            out += self.by_language.get(key, [])
        out += self.shared
        return out or [self.default]

    def choose(self, language: str, text: str, rng: np.random.Generator | None) -> FontSpec | None:
        """A font for one line: uniformly among the candidates that cover ``text`` (``rng=None``: the default).

        Returns None when no candidate can render the text (the caller skips the sample as unrenderable).
        """
        if rng is None:
            return self.default if self.default.covers(text) else None
        ok = [f for f in self.candidates(language) if f.covers(text)]
        if not ok:
            return None
        return ok[int(rng.integers(len(ok)))]

    def all_fonts(self) -> list[FontSpec]:
        seen = dict.fromkeys([self.default] + self.shared + [f for v in self.by_language.values() for f in v])
        return list(seen)

    def __repr__(self) -> str:
        langs = {k: [f.name for f in v] for k, v in self.by_language.items()}
        return f"FontLibrary(default={self.default.name}, languages={langs}, shared={[f.name for f in self.shared]})"


# ---------------------------------------------------------------------------------------------------------------
# Glyph coverage from the cmap table
# ---------------------------------------------------------------------------------------------------------------


class Coverage:
    """The code points a face maps to a glyph, as sorted disjoint ranges (or a rendering fallback)."""

    def __init__(self, starts: np.ndarray | None, ends: np.ndarray | None, spec: FontSpec):
        self._starts = None if starts is None else starts.tolist()
        self._ends = None if ends is None else ends.tolist()
        self._spec = spec
        self._notdef: bytes | None = None
        self._memo: dict[int, bool] = {}

    @property
    def from_cmap(self) -> bool:
        return self._starts is not None

    def __len__(self) -> int:
        if self._starts is None:
            raise TypeError("coverage of this font is only known per character (no readable cmap)")
        return int(sum(e - s + 1 for s, e in zip(self._starts, self._ends)))

    def has(self, cp: int) -> bool:
        if self._starts is not None:
            i = bisect.bisect_right(self._starts, cp) - 1
            return i >= 0 and cp <= self._ends[i]
        hit = self._memo.get(cp)
        if hit is None:
            hit = self._memo[cp] = self._render_check(cp)
        return hit

    def _render_check(self, cp: int) -> bool:
        # Pillow draws an unmapped character as glyph 0 (.notdef): compare the masks.
        font = load_font(self._spec, 48)
        if self._notdef is None:
            self._notdef = _mask_bytes(font, chr(0x10FFFD))
        return _mask_bytes(font, chr(cp)) != self._notdef


def _mask_bytes(font: ImageFont.FreeTypeFont, ch: str) -> bytes:
    m = font.getmask(ch)
    return bytes(m.size) + bytes(np.asarray(m).tobytes())


@functools.lru_cache(maxsize=64)
def coverage(spec: FontSpec) -> Coverage:
    """The code points ``spec`` can render (cached per process)."""
    try:
        starts, ends = read_cmap_ranges(spec.path, spec.index)
        return Coverage(starts, ends, spec)
    except (OSError, ValueError, struct.error) as e:
        log.warning("cannot read the cmap of %s (%s); checking coverage by rendering", spec.name, e)
        return Coverage(None, None, spec)


def read_cmap_ranges(path: str, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mapped code points of face ``index`` of a TrueType/OpenType file (or collection) as merged inclusive ranges.

    Uses the best Unicode subtable: (3,10)/(0,4+) format 12 or 13 when present, else (3,1)/(0,x) format 4/6/10.
    Code points that map to glyph 0 (.notdef) are excluded.
    """
    with open(path, "rb") as f:
        data = f.read()
    base = 0
    if data[:4] == b"ttcf":
        n = struct.unpack_from(">I", data, 8)[0]
        if not 0 <= index < n:
            raise ValueError(f"face index {index} out of range (collection has {n})")
        base = struct.unpack_from(">I", data, 12 + 4 * index)[0]
    num_tables = struct.unpack_from(">H", data, base + 4)[0]
    cmap = None
    for i in range(num_tables):
        tag, _, off, _ = struct.unpack_from(">4sIII", data, base + 12 + 16 * i)
        if tag == b"cmap":
            cmap = off
    if cmap is None:
        raise ValueError("no cmap table")
    n_sub = struct.unpack_from(">H", data, cmap + 2)[0]
    subs = []
    for i in range(n_sub):
        pid, eid, off = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        fmt = struct.unpack_from(">H", data, cmap + off)[0]
        unicode_sub = pid == 0 or (pid == 3 and eid in (1, 10))
        if unicode_sub and fmt in (4, 6, 10, 12, 13):
            subs.append(((fmt in (12, 13, 10), fmt != 13), cmap + off, fmt))
    if not subs:
        raise ValueError("no Unicode cmap subtable in a supported format")
    subs.sort(key=lambda s: s[0], reverse=True)
    _, off, fmt = subs[0]
    pairs = _CMAP_READERS[fmt](data, off)
    return _merge(pairs)


def _cmap4(data: bytes, off: int) -> list[tuple[int, int]]:
    seg2 = struct.unpack_from(">H", data, off + 6)[0]
    n = seg2 // 2
    ends = np.frombuffer(data, ">u2", n, off + 14).astype(np.int64)
    starts = np.frombuffer(data, ">u2", n, off + 16 + seg2).astype(np.int64)
    deltas = np.frombuffer(data, ">i2", n, off + 16 + 2 * seg2).astype(np.int64)
    ro_pos = off + 16 + 3 * seg2
    ranges_off = np.frombuffer(data, ">u2", n, ro_pos).astype(np.int64)
    out = []
    for i in range(n):
        s, e = int(starts[i]), int(ends[i])
        if s > e or s == 0xFFFF:
            continue
        if ranges_off[i] == 0:
            gids = (np.arange(s, e + 1) + deltas[i]) % 65536
        else:
            addr = ro_pos + 2 * i + int(ranges_off[i]) + 2 * (np.arange(s, e + 1) - s)
            raw = np.array([struct.unpack_from(">H", data, int(a))[0] for a in addr], dtype=np.int64)
            gids = np.where(raw != 0, (raw + deltas[i]) % 65536, 0)
        out += _runs(np.arange(s, e + 1)[gids != 0])
    return out


def _cmap6(data: bytes, off: int) -> list[tuple[int, int]]:
    first, count = struct.unpack_from(">HH", data, off + 6)
    gids = np.frombuffer(data, ">u2", count, off + 10)
    return _runs(np.arange(first, first + count)[gids != 0])


def _cmap10(data: bytes, off: int) -> list[tuple[int, int]]:
    first, count = struct.unpack_from(">II", data, off + 12)
    gids = np.frombuffer(data, ">u2", count, off + 20)
    return _runs(np.arange(first, first + count)[gids != 0])


def _cmap12(data: bytes, off: int, constant: bool = False) -> list[tuple[int, int]]:
    n = struct.unpack_from(">I", data, off + 12)[0]
    g = np.frombuffer(data, ">u4", 3 * n, off + 16).reshape(n, 3).astype(np.int64)
    out = []
    for s, e, gid in g.tolist():
        if constant:
            if gid:
                out.append((s, e))
        elif gid:
            out.append((s, e))
        elif e > s:  # only the first code of the group maps to .notdef
            out.append((s + 1, e))
    return out


_CMAP_READERS = {4: _cmap4, 6: _cmap6, 10: _cmap10, 12: _cmap12, 13: functools.partial(_cmap12, constant=True)}


def _runs(cps: np.ndarray) -> list[tuple[int, int]]:
    if cps.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(cps) != 1)
    starts = np.concatenate([[cps[0]], cps[breaks + 1]])
    ends = np.concatenate([cps[breaks], [cps[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _merge(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted(pairs)
    starts: list[int] = []
    ends: list[int] = []
    for s, e in pairs:
        if starts and s <= ends[-1] + 1:
            ends[-1] = max(ends[-1], e)
        else:
            starts.append(s)
            ends.append(e)
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
