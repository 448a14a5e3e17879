"""``convert``, ``parity`` and ``config-docs``: the teacher's checkpoint tools and the configuration reference."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from .common import command, number

    p = command(sub, "convert", _convert)
    p.add_argument("checkpoint", help="anytext_v2.0.ckpt, a .safetensors file in the same layout, or a converted folder")
    p.add_argument("out_dir", nargs="?", help="output folder (not needed with --check)")
    p.add_argument("--config", help="the original model yaml (default: the sd15 preset = models_yaml/anytext2_sd15.yaml)")
    p.add_argument("--preset", choices=["sd15", "tiny"], help="architecture preset instead of --config")
    p.add_argument("--check", action="store_true", help="only verify: strict load, shapes, finite values")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a full unpickle of a .ckpt that weights_only refuses (executes code from the file: only "
                        "for files from a source you trust)")

    p = command(sub, "config-docs", _config_docs)
    p.add_argument("--out", default="docs/config.md", help="output Markdown file")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")

    p = command(sub, "parity", _parity)
    p.add_argument("fixture_dir", help="folder with config.yaml, state_dict/inputs/outputs .safetensors, meta.json")
    p.add_argument("--threads", type=number(1, 4096, integer=True), default=None, help="torch CPU threads")


def _model_config(args):
    from .. import config as C
    from ..cli import UsageError

    if args.config and args.preset:
        raise UsageError("give --config or --preset, not both")
    if args.config:
        return C.from_original_yaml(args.config)
    return C.preset(args.preset or "sd15")


def _convert(args) -> int:
    """convert an official AnyText2 checkpoint into a fast-loading folder

    Load CKPT (.ckpt/.pt/.pth through torch.load(weights_only=True), or .safetensors) strictly and write OUT_DIR:
    one safetensors file per component, config.json and a manifest with sha256 sums. With --check, only verify that
    CKPT loads strictly.
    """
    from ..checkpoint import is_converted, load_converted, load_model, save_converted, verify_converted
    from ..cli import UsageError

    from .common import check_output_dir

    if not args.check:  # before the (large) model is read: where it goes
        if not args.out_dir:
            raise UsageError("OUT_DIR is required unless --check is given")
        check_output_dir(args.out_dir, "OUT_DIR")
    t0 = time.time()
    if is_converted(args.checkpoint):
        verify_converted(args.checkpoint, full=True)
        model = load_converted(args.checkpoint)
    else:
        model = load_model(args.checkpoint, _model_config(args), trust_pickle=args.trust_pickle)
    n = sum(v.numel() for v in model.state_dict().values())
    print(f"loaded {args.checkpoint}: strict match, {len(model.state_dict())} tensors, {n:,} elements, "
          f"{time.time() - t0:.1f} s")
    if args.check:
        return 0
    t1 = time.time()
    out = save_converted(model, Path(args.out_dir), extra={"source": Path(args.checkpoint).name})
    print(f"wrote {out} in {time.time() - t1:.1f} s")
    return 0


def _parity(args) -> int:
    """replay a fixture made with the original AnyText2 code and compare outputs"""
    from ..parity import format_rows, run_parity

    rows = run_parity(args.fixture_dir, threads=args.threads)
    print(format_rows(rows))
    return 0 if rows and all(r.ok for r in rows) else 1


def _config_docs(args) -> int:
    """write docs/config.md from the config dataclasses (--check: verify it)"""
    from ..config_docs import render, undocumented

    text = render()
    out = Path(args.out)
    missing = undocumented()
    if missing:
        print(f"warning: fields without a docstring: {', '.join(missing)}")
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date: run 'anytext2-lcm config-docs --out {out}'")
            return 1
        print(f"{out} is up to date")
        return 0
    from ..atomic import write_text

    write_text(out, text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0
