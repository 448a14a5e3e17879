"""``anytext2-lcm distill``, ``anytext2-lcm train-teacher`` and ``anytext2-lcm train-decoder``.

Both read a YAML config (``configs/distill_tiny.yaml``, ``configs/distill_sd15.yaml``) with optional overrides::

    anytext2-lcm distill --config configs/distill_sd15.yaml --resume latest train.max_steps=2000 \
        --set optim.learning_rate=5e-5
    accelerate launch --multi_gpu --num_processes 8 -m anytext2_lcm.cli distill --config ... --resume latest
    anytext2-lcm train-teacher --config configs/teacher_tiny.yaml
    anytext2-lcm train-decoder --config configs/decoder_sd15.yaml     # a light decoder for --tiny-decoder / --fast

Exit status: 0 finished; 2 invalid config / flags / checkpoint (before anything is built where possible); 1 the run
stopped on an error it reports (too many skipped samples, too many non-finite steps); 128 + signal after a
SIGTERM/SIGINT checkpoint (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from .common import command

log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.max_steps=100 (repeatable; values are YAML)")
    p.add_argument("--resume", default=None, metavar="latest|fresh|PATH",
                   help="latest: continue from the newest checkpoint of output_dir that verifies (exit 2 naming each "
                        "checkpoint when there are some but none verifies); fresh: start over, moving the existing "
                        "checkpoints to checkpoints/previous-TIME/; PATH: a checkpoint folder")
    p.add_argument("--init-adapter", default=None, metavar="PATH",
                   help="start a new run from this LoRA adapter (shortcut for --set checkpoint.init_adapter=PATH)")
    p.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=DIR")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for --set train.max_steps=N")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, as --set")


def register(subparsers) -> None:
    for name, func in (("distill", _distill), ("train-teacher", _train_teacher), ("train-decoder", _train_decoder)):
        _add_common(command(subparsers, name, func))


def _distill(args) -> int:
    """distil the AnyText2 teacher into a few-step LoRA student (LCM or PCM)

    LCM-LoRA or PCM-LoRA (method: pcm) distillation of AnyText2 on AnyWord-format data, on one or many GPUs (run
    under `accelerate launch`), with exact resume, atomic checkpoints and TensorBoard logging.
    """
    return run_command(args, None)


def _train_teacher(args) -> int:
    """train AnyText2 itself (WriteNet, text embedding, AttnX; a model from nothing: also its UNet, VAE, recogniser)

    AnyText2's own objective (method: teacher): ε-MSE outside inv_mask, training the WriteNet, the text-embedding
    module and AttnX (and the UNet, for a model trained from nothing); or the autoencoder (method: vae) and the glyph
    recogniser (method: ocr) such a model needs first. Writes a converted model folder usable as the next stage's
    model.teacher or as a distillation teacher.
    """
    from ..distill.config import TEACHER_METHODS

    return run_command(args, TEACHER_METHODS)


def _train_decoder(args) -> int:
    """distil the model's VAE decoder into a light decoder (--tiny-decoder)

    method: decoder. Distils the model's own VAE decoder into a small AutoencoderTiny-shaped decoder on
    AnyWord-format images, the error weighted inside the text lines; writes OUTPUT/light_decoder.safetensors (load it
    with --tiny-decoder FILE in generate, evaluate and bench, or --fast) and OUTPUT/light_decoder.json (parameters,
    decode seconds beside the full decoder, PSNR to it). Works for any model: the latent channels and factor come
    from its config.
    """
    from ..distill.config import DECODER_METHOD

    return run_command(args, DECODER_METHOD)


def build_config(args, method: str | tuple[str, ...] | None):
    """The validated config of a command line (no model is built)."""
    from ..config import ConfigError
    from ..distill.config import DECODER_METHOD, TEACHER_METHODS, load_config

    overrides = list(args.sets) + list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "init_adapter", None) is not None:
        overrides.append(f"checkpoint.init_adapter={args.init_adapter}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides, method=method)
    if method is None and cfg.method in TEACHER_METHODS:
        raise ConfigError(f"method={cfg.method!r}: use `anytext2-lcm train-teacher` for the teacher's own objectives")
    if method is None and cfg.method == DECODER_METHOD:
        raise ConfigError(f"method={cfg.method!r}: use `anytext2-lcm train-decoder` for the light decoder")
    return cfg


def run_command(args, method: str | tuple[str, ...] | None) -> int:
    from ..data.skips import TooManySkipsError
    from ..distill.config import dump_yaml

    cfg = build_config(args, method)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from ..distill.trainer import NonFiniteTrainingError, train

    finished = False
    try:
        result = train(cfg)
        finished = True
    except (TooManySkipsError, NonFiniteTrainingError) as e:
        print(f"anytext2-lcm {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        _close_process_group(finished)
    if result.exit_code:
        log.warning("stopped by a signal after step %d; resume with --resume latest", result.state.global_step)
    return result.exit_code


def _close_process_group(synchronise: bool) -> None:
    """Leave the process group together: a gloo/NCCL group torn down by the interpreter at exit while a peer has
    already gone can abort the process (SIGABRT) after a clean run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()
