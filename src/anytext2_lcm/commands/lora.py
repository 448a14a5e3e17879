"""``inspect`` and ``export``: LoRA targets of the model, and LoRA format conversion / merging.

* ``anytext2-lcm inspect --preset sd15`` prints every Linear/Conv2d group by role and network (built on the
  ``meta`` device: no weights, a few seconds even for the real architecture); ``--list`` adds one line per module;
  ``--preset-targets lcm --zero-convs --out targets.json`` writes a PEFT target list.
* ``anytext2-lcm export ADAPTER --format merged --checkpoint BASE --out student.safetensors`` writes the full
  model with the LoRA merged in the original key layout; ``--format peft|safetensors|kohya`` converts the
  adapter alone (no base weights needed).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(sub: argparse._SubParsersAction) -> None:
    from ..lora import EXPORT_FORMATS, TARGET_PRESETS
    from .common import command, number

    p = command(sub, "inspect", _user_errors(_inspect))
    p.epilog = "target presets (combine with '+'): " + "; ".join(f"{n}: {t.help.rstrip('.')}"
                                                                   for n, t in TARGET_PRESETS.items())
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=["sd15", "tiny"], help="architecture preset (default sd15)")
    src.add_argument("--config", help="the original model yaml (models_yaml/anytext2_sd15.yaml layout)")
    p.add_argument("--checkpoint",
                   help="a converted folder (its config is used), or an original-layout .ckpt/.safetensors whose "
                        "keys and shapes are checked against the architecture (--preset/--config, default sd15)")
    p.add_argument("--list", action="store_true", help="also print every module with its role")
    p.add_argument("--rank", type=number(1, 4096, integer=True), default=64,
                   help="LoRA rank for the parameter counts and the targets file")
    p.add_argument("--alpha", type=number(0, None, lo_open=True), default=None,
                   help="LoRA alpha for the targets file (default: = rank)")
    p.add_argument("--preset-targets", metavar="EXPR",
                   help="write the targets of this preset expression (e.g. lcm, attn+writenet-attn) to --out")
    p.add_argument("--zero-convs", action="store_true", help="add the 13 WriteNet zero-convs to --preset-targets")
    p.add_argument("--out", help="targets JSON to write (with --preset-targets)")

    p = command(sub, "export", _user_errors(_export))
    p.add_argument("adapter", help="LoRA adapter: PEFT folder or file")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt", help="output format")
    p.add_argument("--out", required=True, help="output folder (peft) or file")
    p.add_argument("--checkpoint", help="base model: converted folder or original-layout .ckpt/.safetensors "
                                        "(required for --format merged; otherwise only its config is used)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=["sd15", "tiny"], help="architecture preset (default sd15)")
    src.add_argument("--config", help="the original model yaml")
    p.add_argument("--scale", type=number(-10, 10), default=1.0, help="LoRA strength baked into the output")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="dtype of the written weights")


def _user_errors(handler):
    """A checkpoint or adapter that does not fit the model is the user's input, not a crash: report it in one
    line (exit 2) like the other usage errors."""
    import functools

    @functools.wraps(handler)
    def run(args) -> int:
        from ..checkpoint import CheckpointError
        from ..cli import UsageError

        try:
            return handler(args)
        except CheckpointError as e:
            raise UsageError(str(e)) from None

    return run


def _config(args):
    from .. import config as C

    if getattr(args, "config", None):
        return C.from_original_yaml(args.config)
    return C.preset(args.preset or "sd15")


def _meta_model(cfg):
    import torch

    from ..models.anytext2 import AnyText2

    with torch.device("meta"):
        return AnyText2(cfg)


def _inspect(args) -> int:
    """list the model's Linear/Conv2d modules by role and write LoRA target lists

    Count every Linear/Conv2d of AnyText2 by role (attention, AttnX, feed-forward, proj_in/out, ResBlock convs,
    zero-convs, hint encoders, ...) and network, with parameter counts, the seed's LoRA categories and the target
    presets. The model is built on the meta device (no weights).
    """
    from .. import lora
    from ..checkpoint import (check_keys, checkpoint_shapes, is_converted, original_shapes, read_converted_config,
                              verify_converted)
    from ..cli import UsageError

    if args.rank < 1:
        raise UsageError(f"--rank={args.rank}: must be >= 1")
    if args.out and not args.preset_targets:
        raise UsageError("--out needs --preset-targets")
    if args.preset_targets and not args.out:
        raise UsageError("--preset-targets needs --out")
    if args.zero_convs and not args.preset_targets:
        raise UsageError("--zero-convs needs --preset-targets")
    if args.preset_targets:
        lora.parse_preset_expression(args.preset_targets)  # reject a bad name before building anything
    t0 = time.time()
    note = ""
    if args.checkpoint and is_converted(args.checkpoint):
        if args.preset or args.config:
            raise UsageError("a converted folder carries its own config: drop --preset/--config")
        verify_converted(args.checkpoint)
        cfg = read_converted_config(args.checkpoint)
        model = _meta_model(cfg)
        note = f"converted folder {args.checkpoint}"
    else:
        cfg = _config(args)
        model = _meta_model(cfg)
        if args.checkpoint:
            path = Path(args.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            check_keys(original_shapes(model), checkpoint_shapes(path), str(path))
            note = f"{path}: keys and shapes match"
    table = lora.module_table(model)
    n_params = sum(p.numel() for p in model.parameters())
    title = (f"AnyText2 '{cfg.name}': {len(table)} Linear/Conv2d modules, {n_params:,} parameters"
             + (f" ({note})" if note else "") + f"  [{time.time() - t0:.1f} s]")
    print(lora.format_inventory(table, rank=args.rank, list_modules=args.list, title=title))
    if args.preset_targets:
        doc = lora.targets_document(model, args.preset_targets, args.zero_convs, rank=args.rank,
                                    alpha=float(args.alpha if args.alpha is not None else args.rank))
        out = lora.write_targets(args.out, doc)
        nets = ", ".join(f"{k} {v}" for k, v in doc["by_network"].items())
        print(f"\nwrote {out}: {doc['count']} target modules ({nets}); {doc['lora_params']:,} LoRA parameters at "
              f"rank {args.rank}")
    return 0


def _export(args) -> int:
    """convert a LoRA adapter (PEFT folder / safetensors / kohya) or merge it into a checkpoint

    Read ADAPTER (PEFT folder, .safetensors, kohya .safetensors, or .bin/.pt through weights_only loading) and write
    it as --format: 'peft' folder, single 'safetensors' file, 'kohya' safetensors (lora_down/lora_up/alpha, as
    AnyText2's ms_wrapper merges), or 'merged': the full model with the LoRA merged, in the ORIGINAL key layout
    (.safetensors or .ckpt), which needs the base weights (--checkpoint).
    """
    import torch

    from .. import lora
    from ..checkpoint import is_converted, load_model, read_converted_config
    from ..cli import UsageError

    dtype = getattr(torch, _DTYPES[args.dtype])
    if args.fmt == "merged" and not args.checkpoint:
        raise UsageError("--format merged needs the base weights: --checkpoint BASE")
    if args.checkpoint and is_converted(args.checkpoint) and (args.preset or args.config):
        raise UsageError("a converted folder carries its own config: drop --preset/--config")
    t0 = time.time()
    if args.fmt == "merged":
        cfg = None if is_converted(args.checkpoint) else _config(args)
        model = load_model(args.checkpoint, cfg)
    else:
        # The adapter alone: the architecture on the meta device is enough to check and rename it.
        cfg = read_converted_config(args.checkpoint) if args.checkpoint and is_converted(args.checkpoint) \
            else _config(args)
        model = _meta_model(cfg)
    config = lora.load_lora(model, args.adapter)
    out = lora.export(model, args.out, args.fmt, scale=args.scale, dtype=None if args.dtype == "fp32" else dtype)
    print(f"exported {args.adapter} ({len(lora.lora_layers(model))} LoRA modules, r={config.r}, "
          f"alpha={config.lora_alpha:g}, scale {args.scale:g}) as {args.fmt} to {out} in {time.time() - t0:.1f} s")
    return 0
