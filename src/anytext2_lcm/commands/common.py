"""Options shared by the commands that run a model: which model, device, precision, LoRA adapter."""

from __future__ import annotations

import argparse
import logging

import torch

log = logging.getLogger(__name__)

PRESET_NAMES = ("tiny", "sd15")


def add_model_args(p: argparse.ArgumentParser, lora: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="'tiny' (built-in tiny model, no download), 'sd15' (random weights, for speed tests), a "
                        "converted folder, or an official checkpoint (.ckpt / .safetensors)")
    g.add_argument("--config", help="original model yaml for a checkpoint file (default: the sd15 architecture)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights/compute precision (auto: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--trust-pickle", action="store_true", help="allow a full unpickle of a .ckpt (trusted files only)")
    if lora:
        g.add_argument("--lora", help="student LoRA: a PEFT adapter folder or a single .safetensors file")
        g.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength")
        g.add_argument("--merge-lora", action="store_true", help="merge the LoRA into the weights (faster sampling)")


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if dt == torch.float16 and device.type == "cpu":
        log.warning("fp16 on the CPU is very slow or unsupported: using fp32 instead")
        return torch.float32
    return dt


def build_model(spec: str, config_path: str | None = None, trust_pickle: bool = False):
    """An ``AnyText2`` from a preset name, a converted folder or a checkpoint file (fp32, CPU)."""
    from .. import config as C
    from ..checkpoint import load_model
    from ..models.anytext2 import AnyText2
    from ..models.init import initialize

    if spec in PRESET_NAMES:
        if config_path:
            from ..cli import UsageError

            raise UsageError("--config only applies to a checkpoint file")
        if spec == "sd15":
            log.warning("--model sd15 builds the real architecture with RANDOM weights (for speed/shape tests); "
                        "pass the official checkpoint or a converted folder for real images")
        return initialize(AnyText2(C.preset(spec)), seed=0)
    cfg = C.from_original_yaml(config_path) if config_path else None
    return load_model(spec, cfg, trust_pickle=trust_pickle)


def model_from_args(args):
    """(model on its device/dtype, device, dtype) from the ``add_model_args`` options; applies ``--lora``."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build_model(args.model, args.config, args.trust_pickle)
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
