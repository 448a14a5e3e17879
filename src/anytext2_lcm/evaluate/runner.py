"""Evaluation of a teacher and its few-step students on AnyWord-format prompts (``anytext2-lcm evaluate``).

Protocol (after the AnyText benchmark, ``eval/anytext2_singleGPU.py`` + ``eval/eval_dgocr.py``):

* one sample per AnyWord row with valid lines: image prompt = the row's caption with ``*`` removed (used verbatim:
  quotes in the caption are *not* turned into placeholders), lines = the valid annotations' texts in order (cut to
  ``max_chars``, at most ``max_lines``), positions = their polygons scaled to the generation size, colours as
  recorded (else unspecified), glyphs in the default glyph font, generation mode (masked image all −1), the text
  caption ``Text says * , * . `` built from the lines;
* seed of sample i = ``seed + i``; x_T is drawn from that seed *outside* the generator and passed to every run, so
  the teacher and each student start from the same noise (and the masked-image posterior sample is the same too,
  since it is drawn from the same seed);
* the teacher runs first (LoRA adapters disabled, DDIM with CFG), then the student at each step count (the same
  network with its LoRA, a few-step sampler, usually without CFG);
* every line of every image is cropped by its position (min-area rectangle, similarity warp, resized to 3×48×320)
  and read by the offline PP-OCRv4 recogniser (:class:`~anytext2_lcm.evaluate.ocr.TextReader`); Sen.ACC (exact
  match) and NED (over the recogniser's dictionary) per language and overall;
* fidelity of each student to the teacher at the same seed: PSNR and SSIM of the images ([0, 1]) and the MSE of
  the final latents;
* seconds per image of each run: the generator's wall time (rendering, conditioning, sampling, decoding; OCR not
  included), after one untimed warm-up call per run kind.

Images are written to ``OUT/images/<run>/``; :mod:`~anytext2_lcm.evaluate.report` writes the JSON, the Markdown
report and the grids.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..atomic import save_image
from ..defaults import STUDENT_STEPS, TEACHER_STEPS, teacher_cfg
from ..generation import GenerationRequest, InputError
from .metrics import latent_mse, normalized_edit_distance, psnr, sentence_accuracy, ssim
from .runtime import RuntimeOptions, ViewGenerator, apply_runtime_options

log = logging.getLogger(__name__)

EVAL_A_PROMPT = "best quality, extremely detailed"
"""The AnyText benchmark script's added prompt (the demo's is longer)."""
EVAL_N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                 "worst quality, low quality, watermark")
"""The AnyText benchmark script's negative prompt."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EvalConfig:
    """What ``evaluate`` generates and measures."""

    data: tuple[str, ...]
    """AnyWord-format annotation files (e.g. ``make-data``'s ``anyword_synth.json``, or the benchmark's
    ``test1k.json``)."""
    num: int | None = None
    """Evaluate the first ``num`` usable samples (None: all)."""
    size: int | None = None
    """Generation size (square, a multiple of the model's ``size_multiple``; None: the model's own size,
    ``cfg.image_size``); polygons are scaled from the source image's size."""
    images_per_prompt: int = 1
    """Images per sample (the benchmark uses 4)."""
    seed: int = 100
    """Seed of sample 0 (the benchmark's 100); sample i uses seed + i."""
    teacher_steps: int = TEACHER_STEPS
    teacher_cfg: float | None = None
    """The teacher's CFG scale; None: the model's own (``ModelConfig.guidance_scale``: 7.5, the testbed's 5)."""
    eta: float = 0.0
    student_steps: tuple[int, ...] = STUDENT_STEPS
    student_sampler: str = "lcm"
    """'lcm', 'tcd', 'pcm', or 'ddim' (the teacher itself at fewer steps)."""
    student_cfg: float = 1.0
    student_options: dict = field(default_factory=dict)
    """Sampler options of the student (e.g. TCD ``gamma``)."""
    max_lines: int = 20
    """Lines per sample (the benchmark's limit); further lines are dropped and counted."""
    max_chars: int = 20
    """Lines are cut to this many characters (as rendered); the cut text is the OCR ground truth."""
    source_size: int = 512
    """Assumed source image size when the image file is missing (the benchmark's images are 512²)."""
    a_prompt: str = EVAL_A_PROMPT
    n_prompt: str = EVAL_N_PROMPT
    glyph_font: str | None = None
    warmup: bool = True
    """One untimed call per run kind before timing (first-call allocations, the blank-image posterior)."""
    save_student_images: bool = True
    """Write every student image (teacher images are always written: fidelity is computed against them)."""
    reference: bool = True
    """Also read the dataset's own images (resized to ``size``) with the same OCR path: the "reference" run, what
    the protocol gives on real text at this size (needs the image files)."""
    reconstruction: bool = False
    """Also read the model's VAE reconstructions of those images (decode(encode(x)) of the posterior mean): the
    "reconstruction" run, the ceiling any image the model generates can reach (the autoencoder gate)."""

    def __post_init__(self) -> None:
        from ..config import ConfigError

        if isinstance(self.data, (str, os.PathLike)):
            self.data = (os.fspath(self.data),)
        self.data = tuple(os.fspath(p) for p in self.data)
        if not self.data:
            raise ConfigError("evaluate.data: give at least one AnyWord JSON file")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ConfigError(f"evaluate.size={self.size}: must be a positive integer (or None: the model's size)")
        if self.num is not None and self.num < 1:
            raise ConfigError(f"evaluate.num={self.num}: must be >= 1")
        if self.images_per_prompt < 1:
            raise ConfigError(f"evaluate.images_per_prompt={self.images_per_prompt}: must be >= 1")
        self.student_steps = tuple(int(s) for s in self.student_steps)
        if any(s < 1 for s in self.student_steps) or len(set(self.student_steps)) != len(self.student_steps):
            raise ConfigError(f"evaluate.student_steps={self.student_steps}: distinct positive step counts")
        if self.teacher_steps < 1:
            raise ConfigError(f"evaluate.teacher_steps={self.teacher_steps}: must be >= 1")
        if self.student_sampler not in ("lcm", "tcd", "pcm", "ddim"):
            raise ConfigError(f"evaluate.student_sampler={self.student_sampler!r}: lcm, tcd, pcm or ddim")
        if self.max_lines < 1 or self.max_chars < 1:
            raise ConfigError("evaluate.max_lines and max_chars must be >= 1")


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvalLine:
    text: str
    """The line as rendered (cut to max_chars): the OCR ground truth."""
    language: str
    polygon: list
    """(N, 2) points in generation pixels."""
    color: tuple[float, float, float] | None


@dataclass
class EvalSample:
    index: int
    name: str
    """The row's ``img_name``."""
    caption: str
    """Image prompt: the caption, ``*`` removed."""
    lines: list[EvalLine]
    seed: int
    source: str
    image_path: str | None = None
    """The row's image when it exists (read as the "reference" run)."""


@dataclass
class LoadReport:
    files: list[str]
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    """reason → samples skipped."""
    dropped_lines: Counter = field(default_factory=Counter)
    """reason → lines dropped from samples that were kept."""
    assumed_size: int = 0
    """Samples whose image was missing (polygons taken as ``source_size`` pixels)."""


def _image_size(path: str) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (OSError, UnidentifiedImageError):
        return None


def load_eval_samples(cfg: EvalConfig) -> tuple[list[EvalSample], LoadReport]:
    """Read the annotation files into :class:`EvalSample`\\ s (raw polygons, texts and captions; no augmentation).

    Rows go through the training reader's structural checks (:func:`~anytext2_lcm.data.anyword.parse_row`):
    rows it rejects, rows without a valid line and rows filtered by their watermark score are skipped and counted.
    """
    from ..data.anyword import BadRow, DataConfig, LoadStats, load_annotation_file, parse_row

    dcfg = DataConfig(cap_watermark=False, wm_thresh=math.inf, max_chars=cfg.max_chars)
    rep = LoadReport(files=list(cfg.data))
    stats = LoadStats()
    samples: list[EvalSample] = []
    for path in cfg.data:
        root, rows = load_annotation_file(path)
        for j, raw in enumerate(rows):
            if cfg.num is not None and len(samples) >= cfg.num:
                break
            rep.rows += 1
            row = parse_row(raw, root, f"{path}:{j}", dcfg, stats)
            if row is None:
                rep.skipped["watermark_filtered"] += 1
                continue
            if isinstance(row, BadRow):
                rep.skipped[row.reason] += 1
                log.warning("skipping %s: %s (%s)", row.source, row.reason, row.detail)
                continue
            wh = _image_size(row.img_path)
            img_path = row.img_path if wh is not None else None
            if wh is None:
                wh = (cfg.source_size, cfg.source_size)
                rep.assumed_size += 1
            sx, sy = cfg.size / wh[0], cfg.size / wh[1]
            lines = []
            for ln in row.lines:
                text = ln.text[:cfg.max_chars]
                if not text.strip():
                    rep.dropped_lines["empty_text"] += 1
                    continue
                if any(q in text for q in ('"', "\u201c", "\u201d")):
                    # the request's text prompt delimits lines with quotes
                    rep.dropped_lines["quote_in_text"] += 1
                    continue
                if len(lines) >= cfg.max_lines:
                    rep.dropped_lines["over_max_lines"] += 1
                    continue
                if len(ln.text) > cfg.max_chars:
                    rep.dropped_lines["cut_to_max_chars (kept)"] += 1
                poly = (np.asarray(ln.polygon, dtype=np.float64) * [sx, sy]).tolist()
                lines.append(EvalLine(text, ln.language, poly, ln.color))
            if not lines:
                rep.skipped["no_valid_line"] += 1
                continue
            idx = len(samples)
            samples.append(EvalSample(idx, str(raw.get("img_name", idx)), row.caption.strip(), lines,
                                      cfg.seed + idx, row.source, img_path))
        if cfg.num is not None and len(samples) >= cfg.num:
            break
    return samples, rep


def text_prompt_for(lines: Sequence[EvalLine]) -> str:
    """The request's text prompt: ``Text says "A" , "B" . `` → the caption ``Text says * , * . `` + lines A, B."""
    return "Text says " + " , ".join(f'"{ln.text}"' for ln in lines) + " . "


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One generation setting: the teacher or the student at one step count."""

    name: str
    """'teacher' or 'student@K'."""
    sampler: str
    steps: int
    cfg: float | None
    """CFG scale; None: the model's own guidance scale (resolved by :func:`evaluate`)."""
    options: tuple = ()
    lora: bool = False
    """Whether the LoRA is active (students) or bypassed (the teacher and the undistilled controls)."""
    adapter: str | None = None
    """With several adapters loaded (several students of one teacher): the one active in this run."""

    @property
    def unet_evals(self) -> int:
        """UNet evaluations per image (CFG doubles them; they run as one batch of 2)."""
        return self.steps * (2 if self.cfg != 1.0 else 1)

    @property
    def folder(self) -> str:
        return self.name.replace("@", "_")


def run_specs(cfg: EvalConfig) -> list[RunSpec]:
    opts = tuple(sorted(cfg.student_options.items()))
    specs = [RunSpec("teacher", "ddim", cfg.teacher_steps, cfg.teacher_cfg, (("eta", cfg.eta),))]
    for k in cfg.student_steps:
        specs.append(RunSpec(f"student@{k}", cfg.student_sampler, k, cfg.student_cfg, opts, lora=True))
    return specs


class EvalGenerator(ViewGenerator):
    """The generator with the benchmark's image prompt: the caption verbatim (``GenerationRequest.prompt``'s quotes
    would otherwise become line placeholders; the lines come from the text prompt)."""

    def prepare(self, req: GenerationRequest):
        prep = super().prepare(req)
        prep.img_prompt = req.prompt
        return prep


def sample_request(sample: EvalSample, spec: RunSpec, cfg: EvalConfig) -> GenerationRequest:
    """The request of one sample under one run (the caption, its lines at their polygons and colours, the sample's
    seed, the run's sampling, the evaluation's prompts); run it with :class:`EvalGenerator` and
    ``x_T = initial_noise(sample.seed, …)``, as :func:`evaluate` does."""
    return GenerationRequest(
        prompt=sample.caption, text_prompt=text_prompt_for(sample.lines),
        positions=[ln.polygon for ln in sample.lines], colors=[ln.color for ln in sample.lines],
        height=cfg.size, width=cfg.size, num_images=cfg.images_per_prompt, seed=sample.seed, steps=spec.steps,
        sampler=spec.sampler, sampler_options=dict(spec.options) if spec.sampler != "ddim" else {},
        eta=dict(spec.options).get("eta", 0.0) if spec.sampler == "ddim" else 0.0,
        cfg_scale=spec.cfg, a_prompt=cfg.a_prompt, n_prompt=cfg.n_prompt, max_chars=cfg.max_chars,
        glyph_font=cfg.glyph_font)


def initial_noise(seed: int, batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    """x_T (batch, channels, h, w) ~ N(0, I) from its own CPU generator: identical for every run of a sample."""
    return torch.randn((batch, channels, h, w), generator=torch.Generator().manual_seed(int(seed) + 7919))


def _lora_context(model, spec: RunSpec):
    """Adapters on (a student: ``spec.adapter``, or the model's active one) or bypassed (the teacher, controls); a
    no-op for a model without a LoRA."""
    import contextlib

    from .. import lora as L

    if not L.lora_layers(model):
        return contextlib.nullcontext()
    if not spec.lora:
        return L.disable_adapters(model)
    return L.use_adapter(model, spec.adapter) if spec.adapter else contextlib.nullcontext()


def _masks(polygons: Sequence, size: int) -> list[np.ndarray]:
    from ..data.glyphs import polygon_mask

    return [polygon_mask(np.asarray(p), size, size) for p in polygons]


@dataclass
class _RunRecord:
    spec: RunSpec
    seconds: list[float] = field(default_factory=list)
    """Per call: total seconds / images."""
    phases: dict = field(default_factory=lambda: defaultdict(list))
    ocr_seconds: float = 0.0
    preds: list[str] = field(default_factory=list)
    gts: list[str] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    latent_mse: list[float] = field(default_factory=list)
    failed: int = 0


def evaluate(model, cfg: EvalConfig, out: str | os.PathLike, reader=None, runtime: RuntimeOptions | None = None,
             merge_lora_for_students: bool = False, progress: bool = True,
             runs: Sequence[RunSpec] | None = None) -> dict:
    """Generate with the teacher and every student, read the lines, score; write the images under ``out``.

    Args:
        model: an ``AnyText2`` on its device/dtype, with the student LoRA loaded (unmerged) or without a LoRA (the
            student is then the teacher's weights with the student sampler).
        cfg: the evaluation settings.
        out: output folder (``images/<run>/`` is written here).
        reader: a :class:`~anytext2_lcm.evaluate.ocr.TextReader` (default: the process-wide one).
        runtime: speed options (:mod:`~anytext2_lcm.evaluate.runtime`), applied to ``model`` in place.
        merge_lora_for_students: merge the LoRA into the weights after the teacher runs (faster student sampling;
            the teacher needs the adapters bypassed, which a merged LoRA cannot do).
        runs: the runs instead of ``run_specs(cfg)`` (the first must be the teacher, the fidelity reference); e.g.
            several students (``adapter``), the teacher's own DDIM at few steps, undistilled controls.

    Returns:
        The results document (see :func:`anytext2_lcm.evaluate.report.write_report`): config, dataset, runs,
        samples.
    """
    from .. import lora as L
    from .ocr import default_reader

    out = Path(out)
    reader = reader or default_reader()
    runtime = runtime or RuntimeOptions()
    if cfg.size is None:
        cfg = replace(cfg, size=model.cfg.image_size)
    if cfg.teacher_cfg is None:
        cfg = replace(cfg, teacher_cfg=teacher_cfg(model.cfg))
    if cfg.size % model.cfg.size_multiple:
        raise InputError(f"evaluate.size={cfg.size}: must be a multiple of {model.cfg.size_multiple} for this model")
    samples, load_rep = load_eval_samples(cfg)
    if not samples:
        raise InputError(f"no usable sample in {list(cfg.data)} (skipped: {dict(load_rep.skipped)})")
    has_lora = bool(L.lora_layers(model))
    view, gen = apply_runtime_options(model, runtime, generator_cls=EvalGenerator, glyph_font=cfg.glyph_font)
    specs = [replace(s, cfg=cfg.teacher_cfg) if s.cfg is None else s
             for s in (list(runs) if runs is not None else run_specs(cfg))]
    if specs[0].name != "teacher":
        raise ValueError("evaluate: the first run must be the teacher (the fidelity reference)")
    records = {s.name: _RunRecord(s) for s in specs}
    per_sample = [{"index": s.index, "name": s.name, "seed": s.seed, "caption": s.caption,
                   "texts": [ln.text for ln in s.lines], "languages": [ln.language for ln in s.lines],
                   "reads": {}, "psnr": {}, "ssim": {}, "latent_mse": {}, "failed": {}} for s in samples]
    ctx = _Context(gen, cfg, out, reader, model.cfg.unet.in_channels, cfg.size // model.cfg.latent_factor)
    merged = False
    for spec in specs:
        if spec.lora and has_lora and merge_lora_for_students and not merged and spec.adapter is None:
            L.merge_lora(model)
            merged = True
        with _lora_context(model, spec):
            _run_spec(ctx, spec, records[spec.name], samples, per_sample, progress)
    if merged:
        L.unmerge_lora(model)

    summaries = [_summarise(records[s.name], reader.charset, records["teacher"]) for s in specs]
    summaries = dataset_reads(model, cfg, samples, per_sample, reader, out) + summaries
    return {
        "config": _config_doc(cfg, model, runtime, has_lora, merge_lora_for_students, reader),
        "dataset": {"files": load_rep.files, "rows_read": load_rep.rows, "samples": len(samples),
                    "lines": sum(len(s.lines) for s in samples),
                    "languages": dict(Counter(ln.language for s in samples for ln in s.lines)),
                    "skipped_samples": dict(load_rep.skipped), "dropped_lines": dict(load_rep.dropped_lines),
                    "images_missing_size_assumed": load_rep.assumed_size},
        "runs": summaries,
        "samples": per_sample,
    }


@dataclass
class _Context:
    """What every run of one evaluation shares: the generator, settings, output folder, OCR reader, the latent
    shape of x_T and the teacher's latents (the fidelity reference), filled by the teacher's run."""

    gen: object
    cfg: EvalConfig
    out: Path
    reader: object
    channels: int
    side: int
    teacher_latents: dict = field(default_factory=dict)

    def noise(self, sample: EvalSample) -> torch.Tensor:
        return initial_noise(sample.seed, self.cfg.images_per_prompt, self.channels, self.side, self.side)


def _run_spec(ctx: _Context, spec: RunSpec, rec: _RunRecord, samples: list[EvalSample], per_sample: list[dict],
              progress: bool) -> None:
    """Generate, save, score and read every sample with one run setting (after an untimed warm-up)."""
    if ctx.cfg.warmup:
        # untimed, one step at the same shapes: first-call allocations, the blank-image posterior
        warm = sample_request(samples[0], spec, ctx.cfg)
        warm.steps = 1
        try:
            ctx.gen(warm, x_T=ctx.noise(samples[0]))
        except InputError:
            pass  # the sample itself reports the error below
    for s, rec_s in zip(samples, per_sample):
        try:
            res = ctx.gen(sample_request(s, spec, ctx.cfg), x_T=ctx.noise(s))
        except InputError as e:
            rec.failed += 1
            rec_s["failed"][spec.name] = str(e)
            log.warning("%s, sample %s: %s", spec.name, s.name, e)
            continue
        _record_sample(ctx, spec, rec, s, rec_s, res)
        if progress:
            log.info("%s sample %d/%d (%s): %.2f s/image, read %s", spec.name, s.index + 1, len(samples), s.name,
                     rec.seconds[-1], rec_s["reads"][spec.name][0])


def _record_sample(ctx: _Context, spec: RunSpec, rec: _RunRecord, s: EvalSample, rec_s: dict, res) -> None:
    """Times, images, fidelity to the teacher and OCR reads of one generated sample."""
    n_img = len(res.images)
    rec.seconds.append(res.seconds["total"] / n_img)
    for k, v in res.seconds.items():
        rec.phases[k].append(v / n_img)
    img_dir = ctx.out / "images" / spec.folder
    if spec.name == "teacher" or ctx.cfg.save_student_images:
        img_dir.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(res.images):
            save_image(img_dir / f"{s.index:05d}_{k}.png", img)
    if spec.name == "teacher":
        gdir = ctx.out / "images" / "glyphs"
        gdir.mkdir(parents=True, exist_ok=True)
        # glyphs are drawn in the line colours (black text is nearly invisible): show them white
        prev = np.where(res.glyph_preview.max(-1, keepdims=True) > 0, 255, 0).astype(np.uint8)
        save_image(gdir / f"{s.index:05d}.png", np.repeat(prev, 3, axis=2))
        ctx.teacher_latents[s.index] = res.latents.float().cpu()
    else:
        _fidelity(rec, rec_s, spec, res, ctx.out / "images" / "teacher", s.index, ctx.teacher_latents.get(s.index))
    t0 = time.perf_counter()
    masks = _masks([ln.polygon for ln in s.lines], ctx.cfg.size)
    reads = [ctx.reader.read_lines(img, masks) for img in res.images]
    rec.ocr_seconds += time.perf_counter() - t0
    rec_s["reads"][spec.name] = reads
    for r in reads:
        rec.preds += r
        rec.gts += [ln.text for ln in s.lines]
        rec.langs += [ln.language for ln in s.lines]


def _fidelity(rec: _RunRecord, rec_s: dict, spec: RunSpec, res, teacher_dir: Path, index: int,
              t_lat: torch.Tensor | None) -> None:
    """PSNR / SSIM against the teacher's saved images (lossless PNG of the same uint8 bytes), latent MSE."""
    from PIL import Image

    ps, ss = [], []
    for k, img in enumerate(res.images):
        p = teacher_dir / f"{index:05d}_{k}.png"
        if not p.is_file():
            return  # the teacher failed on this sample
        with Image.open(p) as im:
            t = np.array(im.convert("RGB"))
        a = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
        b = torch.from_numpy(t).permute(2, 0, 1)[None].double() / 255.0
        ps.append(float(psnr(a, b)[0]))
        ss.append(float(ssim(a, b)[0]))
    rec.psnr += ps
    rec.ssim += ss
    rec_s["psnr"][spec.name] = ps
    rec_s["ssim"][spec.name] = ss
    if t_lat is not None:
        m = latent_mse(res.latents.float().cpu(), t_lat).tolist()
        rec.latent_mse += m
        rec_s["latent_mse"][spec.name] = m


def _mean(v: Sequence[float]) -> float | None:
    return float(sum(v) / len(v)) if v else None


def dataset_reads(model, cfg: EvalConfig, samples: list[EvalSample], per_sample: list[dict], reader, out: Path
                  ) -> list[dict]:
    """The summaries of the "reference" (the dataset's images) and "reconstruction" (the model's VAE round trip of
    them) rows, as ``cfg.reference`` / ``cfg.reconstruction`` ask; rows without readable images are left out."""
    rows = []
    for name, on in (("reference", cfg.reference), ("reconstruction", cfg.reconstruction)):
        if on:
            rec = _read_reference(samples, per_sample, cfg, reader, out, model if name == "reconstruction" else None)
            if rec.gts:
                rows.append(_summarise(rec, reader.charset, None))
    return rows


def read_dataset(model, cfg: EvalConfig, out: str | os.PathLike, reader=None) -> dict:
    """Only the dataset rows (reference, reconstruction) of :func:`evaluate`, nothing generated: e.g. the
    autoencoder gate of a model trained from nothing. Returns ``{"runs": [...], "samples": [...]}``."""
    from .ocr import default_reader

    reader = reader or default_reader()
    if cfg.size is None:
        cfg = replace(cfg, size=model.cfg.image_size)
    samples, _ = load_eval_samples(cfg)
    per_sample = [{"index": s.index, "name": s.name, "texts": [ln.text for ln in s.lines], "reads": {}}
                  for s in samples]
    return {"runs": dataset_reads(model, cfg, samples, per_sample, reader, Path(out)), "samples": per_sample}


def _read_reference(samples: list[EvalSample], per_sample: list[dict], cfg: EvalConfig, reader, out: Path,
                    model=None) -> _RunRecord:
    """Read the lines of the dataset's own images at the evaluation size (the OCR path's reference figure), or,
    with ``model``, of its VAE's reconstructions of them (the "reconstruction" run)."""
    from PIL import Image

    name = "reference" if model is None else "reconstruction"
    rec = _RunRecord(RunSpec(name, "-", 0, 0.0))
    img_dir = out / "images" / name
    for s, rec_s in zip(samples, per_sample):
        if s.image_path is None:
            continue
        with Image.open(s.image_path) as im:
            img = np.array(im.convert("RGB").resize((cfg.size, cfg.size), Image.BICUBIC))
        if model is not None:
            img = reconstruct(model, img)
        img_dir.mkdir(parents=True, exist_ok=True)
        save_image(img_dir / f"{s.index:05d}_0.png", img)
        reads = reader.read_lines(img, _masks([ln.polygon for ln in s.lines], cfg.size))
        rec_s["reads"][name] = [reads]
        rec.preds += reads
        rec.gts += [ln.text for ln in s.lines]
        rec.langs += [ln.language for ln in s.lines]
    return rec


@torch.no_grad()
def reconstruct(model, img: np.ndarray) -> np.ndarray:
    """decode(encode(x).mean) of an (H, W, 3) uint8 image with the model's VAE → (H, W, 3) uint8."""
    p = next(model.vae.parameters())
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(device=p.device, dtype=p.dtype) / 127.5 - 1.0
    y = model.vae.decode(model.vae.encode(x)[0]).float().clamp(-1, 1)
    return ((y[0].permute(1, 2, 0) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()


def _summarise(rec: _RunRecord, charset, teacher: _RunRecord | None) -> dict:
    ocr = {}
    if rec.gts:
        ocr["all"] = {"lines": len(rec.gts), "sen_acc": sentence_accuracy(rec.preds, rec.gts),
                      "ned": normalized_edit_distance(rec.preds, rec.gts, charset)}
        for lang in sorted(set(rec.langs)):
            idx = [i for i, l in enumerate(rec.langs) if l == lang]
            p, g = [rec.preds[i] for i in idx], [rec.gts[i] for i in idx]
            ocr[lang] = {"lines": len(g), "sen_acc": sentence_accuracy(p, g),
                         "ned": normalized_edit_distance(p, g, charset)}
    spi = {"mean": _mean(rec.seconds), "median": statistics.median(rec.seconds) if rec.seconds else None,
           "images": len(rec.seconds), "phases_mean": {k: _mean(v) for k, v in rec.phases.items()}}
    fid = None
    if rec.spec.name not in ("teacher", "reference", "reconstruction"):
        finite = [p for p in rec.psnr if math.isfinite(p)]
        fid = {"psnr_db": _mean(rec.psnr) if rec.psnr else None,
               "psnr_db_finite_mean": _mean(finite),
               "identical_images": sum(1 for p in rec.psnr if p == math.inf),
               "ssim": _mean(rec.ssim), "latent_mse": _mean(rec.latent_mse), "images": len(rec.psnr)}
    speed = None
    if teacher is not None and rec.seconds and teacher.seconds:
        speed = _mean(teacher.seconds) / _mean(rec.seconds)
    return {"name": rec.spec.name, "sampler": rec.spec.sampler, "steps": rec.spec.steps, "cfg": rec.spec.cfg,
            "sampler_options": dict(rec.spec.options), "lora": rec.spec.lora,
            "unet_evals_per_image": rec.spec.unet_evals, "ocr": ocr, "fidelity_to_teacher": fid,
            "seconds_per_image": spi, "speedup_vs_teacher": speed,
            "eval_count_ratio_vs_teacher": (teacher.spec.unet_evals / rec.spec.unet_evals
                                            if teacher is not None and rec.spec.unet_evals else None),
            "ocr_seconds_total": rec.ocr_seconds, "failed_samples": rec.failed}


def _config_doc(cfg: EvalConfig, model, runtime: RuntimeOptions, has_lora: bool, merged: bool, reader) -> dict:
    import platform

    import anytext2_lcm

    p = next(model.unet.parameters())
    doc = asdict(cfg)
    doc.update({"model": model.cfg.name, "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                "lora": has_lora, "merge_lora_for_students": merged, "runtime": runtime.label(),
                "ocr_model": str(reader.model_path), "torch": torch.__version__,
                "package": getattr(anytext2_lcm, "__version__", "?"), "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine()})
    return doc
