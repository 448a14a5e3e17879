"""``make-data``, ``validate-data``, ``index-data``, ``make-shards`` and ``teacher-data``: data in the AnyWord-3M
format."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def MAKE_DATA_FLAGS(PROB) -> dict[str, dict]:
    """The ``SynthConfig`` fields make-data exposes, with their parse types (defaults and help: the dataclass)."""
    from .common import POSITIVE, SEED, number

    return {"num": {"type": POSITIVE, "default": 200}, "size": {"type": number(64, 16384, integer=True)},
            "vary_size": {}, "min_lines": {"type": POSITIVE}, "max_lines": {"type": POSITIVE},
            "chinese_prob": {"type": PROB}, "vertical_prob": {"type": PROB}, "seed": {"type": SEED},
            "font_dir": {}, "font": {}, "backgrounds": {"choices": ("mixed", "simple")}, "vocabulary": {},
            "text_size": {"type": _pair, "metavar": "LOW,HIGH"}, "max_angle": {"type": number(0, 90)},
            "invalid_prob": {"type": PROB}, "no_color_prob": {"type": PROB}, "shard_size": {"type": POSITIVE}}


def _pair(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` → two floats."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.04,0.12), got {text!r}") from None
    return lo, hi


def register(subparsers) -> None:
    from ..data.synthetic import SynthConfig
    from .common import POSITIVE, command, dataclass_flag, number

    PROB = number(0, 1)
    p = command(subparsers, "make-data", make_data)
    p.add_argument("--out", required=True, help="output folder (images/ and anyword_synth*.json are written there)")
    for name, kw in MAKE_DATA_FLAGS(PROB).items():
        dataclass_flag(p, SynthConfig, name, **kw)
    p.add_argument("--workers", type=number(1, 1024, integer=True), default=1, help="processes")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")

    v = command(subparsers, "validate-data", validate_data)
    v.add_argument("json", nargs="+", help="annotation files")
    v.add_argument("--image-size", type=number(64, 16384, integer=True), default=512,
                   help="training size the polygons are checked at")
    v.add_argument("--max-chars", type=POSITIVE, default=20, help="characters per line the reader keeps")
    v.add_argument("--font", default=None, help="font file (FILE or FILE#INDEX) used for every line")
    v.add_argument("--font-dir", default=None, help="per-language fonts (checked with --rand-font)")
    v.add_argument("--rand-font", action="store_true", help="lines may use any font of their language")
    v.add_argument("--wm-thresh", type=number(), default=1.0, help="rows with wm_score above this are dropped")
    v.add_argument("--full", action="store_true", help="also run the whole per-sample processing")
    v.add_argument("--workers", type=number(1, 1024, integer=True), default=1, help="processes")
    v.add_argument("--max-skip-rate", type=PROB, default=None, help="fail when more samples are skipped")
    v.add_argument("--examples", type=number(0, 10**6, integer=True), default=3, help="examples shown per skip reason")

    ix = command(subparsers, "index-data", index_data)
    ix.add_argument("json", nargs="+", help="AnyWord annotation files, in the order their rows are concatenated")
    ix.add_argument("--out", required=True, help="index file to write (e.g. anyword.arrow)")
    ix.add_argument("--overwrite", action="store_true", help="replace an existing index")

    from .common import SEED, add_model_args

    td = command(subparsers, "teacher-data", teacher_data)
    td.add_argument("json", nargs="+", help="AnyWord annotation files whose captions and lines are sampled")
    td.add_argument("--out", required=True, help="dataset folder (images/ and anyword_teacher.json are written there)")
    td.add_argument("--num", type=POSITIVE, default=None, help="rows to sample (default: every usable row)")
    td.add_argument("--seed", type=SEED, default=0, help="row i is sampled from seed + i")
    td.add_argument("--a-prompt", default=None,
                    help="added prompt (default: the evaluation's; give the one the student is distilled with)")
    td.add_argument("--n-prompt", default=None, help="negative prompt (default: the evaluation's)")
    add_model_args(td, lora=False)

    sh = command(subparsers, "make-shards", make_shards)
    sh.add_argument("json", nargs="+", help="AnyWord annotation files")
    sh.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and shards.json")
    sh.add_argument("--samples-per-shard", type=int, default=1000,
                    help="samples per tar (a run needs at least as many shards as its global batch)")
    sh.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def make_data(args) -> int:
    """write a synthetic dataset in the AnyWord-3M format (images + JSON)

    Render Latin and Chinese text lines onto photographs from scikit-image and procedural backgrounds, and write
    the images with an AnyWord-3M annotation file that the training reader and validate-data accept.
    """
    from ..cli import UsageError
    from ..data.synthetic import SynthConfig, write_dataset
    from .common import dataclass_values

    out = Path(args.out)
    if out.exists() and any(out.glob("anyword_synth*.json")) and not args.overwrite:
        raise UsageError(f"{out} already holds a dataset (anyword_synth*.json); pass --overwrite or another --out")
    cfg = SynthConfig(**dataclass_values(args, SynthConfig, MAKE_DATA_FLAGS(None)))
    previous = set(out.glob("anyword_synth*.json")) if args.overwrite else set()
    paths = write_dataset(cfg, out, workers=max(args.workers, 1))
    for old in previous - set(paths):  # only once the new dataset is written: a failure keeps the old one
        old.unlink()
    print(f"wrote {cfg.num} images to {out / 'images'} and {', '.join(str(p) for p in paths)}")
    return 0


def validate_data(args) -> int:
    """check AnyWord annotation files with the training reader's rules and print a report

    Reads every row as training would (structure, image, size, polygons, text and fonts) and prints samples,
    lines per sample, languages, characters outside the font, skips by reason and image sizes. Exit status 1
    when a file is unusable (not JSON, wrong structure, or no usable sample) or the skip rate exceeds --max-
    skip-rate.
    """
    from ..data.anyword import DataConfig
    from ..data.validate import format_report, validate_files

    cfg = DataConfig(image_size=args.image_size, max_chars=args.max_chars, font=args.font, font_dir=args.font_dir,
                     rand_font=args.rand_font, wm_thresh=args.wm_thresh)
    rep = validate_files(args.json, cfg, full=args.full, workers=max(args.workers, 1), examples=args.examples)
    print(format_report(rep))
    status = 0 if rep.ok else 1
    if args.max_skip_rate is not None and rep.samples and rep.n_skipped > args.max_skip_rate * rep.samples:
        print(f"skip rate {rep.n_skipped / rep.samples:.1%} exceeds --max-skip-rate {args.max_skip_rate:.1%}")
        status = 1
    return status


def index_data(args) -> int:
    """convert AnyWord JSON files into one memory-mapped annotation index (data.index)

    Streams the annotation files (one row at a time: AnyWord-3M's files of hundreds of MB never sit in memory)
    into an Arrow file that training opens in seconds and every rank and worker of a machine shares through the
    page cache. Train on it with `data.index: FILE` instead of data.json_paths; the samples, skips and counts
    are those of the JSON files.
    """
    import time

    from ..cli import UsageError
    from ..data.index import write_index
    from ..data.skips import DataFileError

    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    if not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {Path(args.out).resolve().parent} does not exist")
    t0 = time.perf_counter()
    try:
        summary = write_index(args.json, args.out)
    except DataFileError as e:
        raise UsageError(str(e)) from None
    bad = ", ".join(f"{k} {v}" for k, v in sorted(summary["bad"].items())) or "none"
    print(f"wrote {args.out}: {summary['rows']} rows from {len(summary['files'])} file(s) in "
          f"{time.perf_counter() - t0:.1f} s; rows the reader will skip as malformed: {bad}")
    return 0


def make_shards(args) -> int:
    """write WebDataset tar shards (image + AnyWord annotation per sample) for data.shards

    Streams the annotation files and packs every row with its image file into tar shards (WebDataset layout)
    plus a shards.json manifest. Train on them with `data.shards: DIR`: ranks read disjoint shards sequentially,
    shuffled, with exact mid-epoch and elastic resume. Bad rows are kept and skipped (and counted) by the
    reader, as with the JSON files.
    """
    from ..cli import UsageError
    from ..data.shards import MANIFEST, write_shards
    from ..data.skips import DataFileError

    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise UsageError(f"{out} already holds shards ({MANIFEST}); pass --overwrite or another --out")
    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard {args.samples_per_shard}: must be >= 1")
    try:
        m = write_shards(args.json, out, args.samples_per_shard)
    except DataFileError as e:
        raise UsageError(str(e)) from None
    size = sum(s["bytes"] for s in m["shards"])
    print(f"wrote {m['samples']} samples in {len(m['shards'])} shards ({size / 2**20:.1f} MiB) to {out}; "
          f"rows without a readable image (skipped when read): {m['images_missing']}")
    return 0


def teacher_data(args) -> int:
    """sample the teacher on a dataset's annotations: its own images, as a dataset to distil on

    Every usable row is sampled as the evaluation samples its teacher run (the caption, the lines at their
    positions and colours, 20-step DDIM with the model's CFG scale) and written with its lines as rendered, so that a
    student can be distilled at states nearer to those it is sampled at (on the testbed it did not help: see
    ``docs/methods.md``). A run that stops resumes with the same settings: images already written are kept.
    """
    import json

    from ..cli import UsageError
    from ..distill.teacher_data import write_teacher_dataset
    from .common import model_from_args

    for f in args.json:
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such annotation file")
    model, _, _ = model_from_args(args)
    path = write_teacher_dataset(model, args.json, args.out, args.num, args.seed, args.a_prompt, args.n_prompt)
    print(json.dumps({"dataset": str(path), "images": len(json.loads(path.read_text())["data_list"])}))
    return 0
