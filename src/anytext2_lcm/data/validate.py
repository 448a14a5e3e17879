"""Offline check of AnyWord annotation files with the reader's own rules, and the printed report.

Every row goes through the checks the training reader applies before it renders anything (structure and types,
image present and decodable, size, polygons, text present and renderable by the configured fonts); ``full=True``
also runs the whole per-sample processing. Nothing is skipped silently: each skip is counted by reason with
examples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from .anyword import AnyWordDataset, BadRow, DataConfig
from .fonts import FontLibrary
from .skips import DataFileError, SampleError, SkipRecord

log = logging.getLogger(__name__)


@dataclass
class FileReport:
    path: str
    rows: int = 0
    samples: int = 0
    skipped: int = 0
    error: str | None = None
    """Why the whole file is unusable (None if it was read)."""

    @property
    def usable(self) -> bool:
        return self.error is None and self.samples > self.skipped


@dataclass
class Report:
    files: list[FileReport] = field(default_factory=list)
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    filtered_watermark: int = 0
    lines_per_sample: Counter = field(default_factory=Counter)
    invalid_lines: int = 0
    long_texts: int = 0
    languages: Counter = field(default_factory=Counter)
    missing_chars: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)
    fonts: str = ""
    max_chars: int = 20

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def usable(self) -> int:
        return self.samples - self.n_skipped

    @property
    def ok(self) -> bool:
        """Every file was readable and has at least one usable sample."""
        return bool(self.files) and all(f.usable for f in self.files)


@dataclass
class _RowResult:
    skip: SkipRecord | None
    size: tuple[int, int] | None
    n_lines: int
    n_invalid: int
    languages: list[str]
    missing: list[str]
    long_texts: int
    parsed: bool = True
    """False for a row rejected at load (its lines are unknown)."""


def inspect_row(ds: AnyWordDataset, index: int, full: bool = False) -> _RowResult:
    """The reader's verdict on one row plus the statistics the report needs."""
    row = ds.rows[index]
    if isinstance(row, BadRow):
        return _RowResult(SkipRecord(index, row.reason, row.detail, row.source), None, 0, 0, [], [], 0, False)
    missing: list[str] = []
    for line in row.lines:
        cands = ds.font_candidates(line.language)
        if not any(f.covers(line.text) for f in cands):
            absent = set(cands[0].missing_chars(line.text))
            missing += [c for c in line.text if c in absent]  # every occurrence
    result = _RowResult(None, None, len(row.lines), len(row.invalid_polygons), [ln.language for ln in row.lines],
                        missing, sum(len(ln.text) > ds.cfg.max_chars for ln in row.lines))
    try:
        try:
            with Image.open(row.img_path) as im:
                result.size = im.size
        except (OSError, SyntaxError, ValueError):
            pass
        image = ds.load_image(row.img_path)
        ds.check_lines(row, image.shape[1], image.shape[0])
        if full:
            out = ds[index]
            if isinstance(out, SkipRecord):
                result.skip = out
    except SampleError as e:
        result.skip = SkipRecord(index, e.reason, e.detail, row.source)
    return result


_WORKER_DS: AnyWordDataset | None = None


def _init_worker(ds: AnyWordDataset) -> None:
    global _WORKER_DS
    _WORKER_DS = ds


def _inspect_chunk(args) -> list[_RowResult]:
    indices, full = args
    return [inspect_row(_WORKER_DS, i, full) for i in indices]


def validate_files(paths: list[str], cfg: DataConfig | None = None, fonts: FontLibrary | None = None,
                   full: bool = False, workers: int = 1, examples: int = 3) -> Report:
    """Check each annotation file with the reader's rules (``cfg`` minus its json_paths) and gather the report."""
    cfg = cfg or DataConfig()
    fonts = fonts or cfg.font_library()
    rep = Report(fonts=", ".join(sorted({f.name for f in fonts.all_fonts()})), max_chars=cfg.max_chars)
    for path in paths:
        fr = FileReport(os.fspath(path))
        rep.files.append(fr)
        try:
            ds = AnyWordDataset(dataclasses.replace(cfg, json_paths=(os.fspath(path),)), fonts)
        except (DataFileError, FileNotFoundError) as e:
            fr.error = str(e)
            continue
        fr.rows = ds.load_stats.rows
        fr.samples = len(ds)
        rep.filtered_watermark += ds.load_stats.filtered_watermark
        indices = list(range(len(ds)))
        if workers > 1 and len(ds) > 64:
            chunks = [(indices[i:i + 64], full) for i in range(0, len(indices), 64)]
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ds,)) as ex:
                results = [r for part in ex.map(_inspect_chunk, chunks) for r in part]
        else:
            results = [inspect_row(ds, i, full) for i in indices]
        for r in results:
            rep.samples += 1
            if r.size is not None:
                rep.image_sizes[r.size] += 1
            if r.parsed:
                rep.lines_per_sample[r.n_lines] += 1
            rep.invalid_lines += r.n_invalid
            rep.long_texts += r.long_texts
            rep.languages.update(r.languages)
            rep.missing_chars.update(r.missing)
            if r.skip is not None:
                fr.skipped += 1
                rep.skipped[r.skip.reason] += 1
                shown = rep.examples.setdefault(r.skip.reason, [])
                if len(shown) < examples:
                    shown.append(str(r.skip))
    return rep


def _bar(n: int, total: int, width: int = 30) -> str:
    return "#" * max(1 if n else 0, round(width * n / max(total, 1)))


def format_report(rep: Report) -> str:
    """The human-readable report ``validate-data`` prints."""
    out = ["AnyWord data report", "files:"]
    for f in rep.files:
        if f.error:
            out.append(f"  UNUSABLE  {f.path}: {f.error}")
        else:
            status = "ok" if f.usable else "UNUSABLE (no usable sample)"
            out.append(f"  {status:<9} {f.path}: {f.rows} rows, {f.samples} samples, {f.skipped} skipped")
    pct = f" ({rep.n_skipped / rep.samples:.1%})" if rep.samples else ""
    out.append(f"samples: {rep.samples}  usable: {rep.usable}  skipped: {rep.n_skipped}{pct}"
               f"  dropped at load for wm_score: {rep.filtered_watermark}")
    total_lines = sum(k * v for k, v in rep.lines_per_sample.items())
    if rep.samples:
        parsed = sum(rep.lines_per_sample.values())
        hist = "  ".join(f"{k}: {v}" for k, v in sorted(rep.lines_per_sample.items()))
        out.append(f"lines per sample (valid lines, {parsed} readable rows): {hist}  | total {total_lines}, mean "
                   f"{total_lines / max(parsed, 1):.2f}, max {max(rep.lines_per_sample, default=0)}")
        out.append(f"invalid (loss-masked) lines: {rep.invalid_lines}; lines longer than max_chars={rep.max_chars} "
                   f"(cut): {rep.long_texts}")
    if rep.languages:
        n = sum(rep.languages.values())
        out.append("languages: " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in rep.languages.most_common()))
    if rep.missing_chars:
        chars = ", ".join(f"{c!r} (U+{ord(c):04X}) x{v}" for c, v in rep.missing_chars.most_common(20))
        more = f" ... {len(rep.missing_chars) - 20} more" if len(rep.missing_chars) > 20 else ""
        out.append(f"characters outside the font ({rep.fonts}): {chars}{more}")
    else:
        out.append(f"characters outside the font ({rep.fonts}): none")
    if rep.skipped:
        out.append("skipped by reason:")
        for reason, v in rep.skipped.most_common():
            out.append(f"  {reason:<20} {v}")
            for e in rep.examples.get(reason, []):
                out.append(f"      e.g. {e}")
    else:
        out.append("skipped by reason: none")
    if rep.image_sizes:
        out.append("image sizes (w x h):")
        n = sum(rep.image_sizes.values())
        if len(rep.image_sizes) <= 12:
            rows = [(f"{w} x {h}", v) for (w, h), v in sorted(rep.image_sizes.items())]
        else:  # bucket by the longer side
            edges = (256, 512, 768, 1024, 2048, 4096)
            buckets: Counter = Counter()
            for (w, h), v in rep.image_sizes.items():
                side = max(w, h)
                label = next((f"longer side <= {e}" for e in edges if side <= e), f"longer side > {edges[-1]}")
                buckets[(next((e for e in edges if side <= e), 10 ** 9), label)] += v
            rows = [(label, v) for (_, label), v in sorted(buckets.items())]
        for label, v in rows:
            out.append(f"  {label:<22} {v:>7}  {_bar(v, n)}")
    return "\n".join(out)
