"""Options shared by the commands that run a model: which model, device, precision, LoRA adapter."""

from __future__ import annotations

import argparse
import logging

from ..factory import build_model, pick_device, pick_dtype

log = logging.getLogger(__name__)

MODEL_HELP = ("'testbed' (the built-in trained 128 px model: writes legible text on CPU), 'tiny' (random tiny model, "
              "tests), 'sd15' (random weights, for speed tests), a converted folder, or an official checkpoint "
              "(.ckpt / .safetensors)")


def add_model_args(p: argparse.ArgumentParser, lora: bool = True, default: str = "testbed", merge: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help=MODEL_HELP)
    g.add_argument("--config", help="original model yaml for a checkpoint file (default: the sd15 architecture)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights/compute precision (auto: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--trust-pickle", action="store_true", help="allow a full unpickle of a .ckpt (trusted files only)")
    if lora:
        g.add_argument("--lora", help="student LoRA: a PEFT adapter folder or a single .safetensors file")
        g.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength")
        if merge:
            g.add_argument("--merge-lora", action="store_true",
                           help="merge the LoRA into the weights (faster sampling)")


def model_from_args(args):
    """(model on its device/dtype, device, dtype) from the ``add_model_args`` options; applies ``--lora``."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build_model(args.model, config_path=args.config, trust_pickle=args.trust_pickle)
    if getattr(args, "lora", None):
        from .. import lora as L

        L.load_lora(model, args.lora)
        if args.lora_scale != 1.0:
            L.set_lora_scale(model, args.lora_scale)
        if getattr(args, "merge_lora", False):
            L.merge_lora(model)
    return model.to(device=device, dtype=dtype).eval(), device, dtype


def sampler_options(args, sampler: str, flag: str = "--sampler") -> dict:
    """The sampler options of ``--gamma``, ``--num-phases``, ``--phase-convention`` and ``--original-steps``, each
    refused (UsageError) for a sampler it does not apply to; ``flag`` names the sampler option in the message."""
    from ..cli import UsageError

    opts = {}
    if args.gamma is not None:
        if sampler != "tcd":
            raise UsageError(f"--gamma applies to {flag} tcd")
        opts["gamma"] = args.gamma
    for name, key in (("num_phases", "num_phases"), ("phase_convention", "convention")):
        if getattr(args, name) is not None:
            if sampler != "pcm":
                raise UsageError(f"--{name.replace('_', '-')} applies to {flag} pcm")
            opts[key] = getattr(args, name)
    if args.original_steps is not None:
        if sampler == "ddim":
            raise UsageError("--original-steps applies to the student samplers (lcm, tcd, pcm)")
        opts["original_steps"] = args.original_steps
    return opts


def default_sampling(lora: str | None, sampler: str | None = None):
    """The sampling a model is run with when the flags do not say: the teacher's (``defaults.TEACHER``) without an
    adapter or with ``--sampler ddim``; with one, what the adapter records (``lora.adapter_info``), else the LCM
    default with a warning (an adapter made elsewhere)."""
    from ..defaults import TEACHER, Sampling, student_sampling
    from ..lora import adapter_info

    if not lora or sampler == "ddim":
        return TEACHER
    info = adapter_info(lora).get("sampling")
    if info:
        return Sampling.from_dict(info)
    if sampler is None:
        log.warning("%s records no sampling; using the LCM sampler, 4 steps, no CFG (pass --sampler/--steps/--cfg)",
                    lora)
    return student_sampling("lcm")
