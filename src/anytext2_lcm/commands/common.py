"""Options shared by the commands that run a model: which model, device, precision, LoRA adapter."""

from __future__ import annotations

import argparse
import logging
import math

from ..config import MAX_SEED
from ..factory import build_model, pick_device, pick_dtype

log = logging.getLogger(__name__)

MAX_STEPS = 1000
"""Sampler steps and step counts: at most the 1000 training timesteps."""
MAX_CFG = 100.0
"""Largest CFG scale accepted (AnyText2 samples at 7.5-9)."""


def number(lo: float | None = None, hi: float | None = None, *, integer: bool = False, lo_open: bool = False):
    """An argparse ``type``: a finite number (an int with ``integer``) in [lo, hi] (``(lo, hi]`` with ``lo_open``).
    NaN, ±Inf, text and values out of range are refused at parse time with a one-line error (exit 2)."""
    what = "an integer" if integer else "a number"
    fmt = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
    span = f"{'(' if lo_open else '['}{'-inf' if lo is None else fmt(lo)}, {'inf' if hi is None else fmt(hi)}]"

    def parse(text: str):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what} in {span}")
        return v

    return parse


def number_list(lo: int, hi: int):
    """An argparse ``type``: comma-separated integers in [lo, hi] → a non-empty tuple."""
    one = number(lo, hi, integer=True)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")
        return values

    return parse


def _writable_parent(p, flag: str, folder: bool = False) -> None:
    import os

    from ..cli import UsageError

    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: {parent} is not writable")


def check_output_file(path, flag: str = "--out", image: bool = False):
    """Before any work: ``path`` can be written as a file (not a folder, its folder creatable and writable) and,
    with ``image``, has an extension Pillow writes. Returns it as a Path; UsageError otherwise."""
    from pathlib import Path

    from ..atomic import image_format
    from ..cli import UsageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a folder; give a file name")
    if image:
        try:
            image_format(p)
        except ValueError as e:
            raise UsageError(f"{flag} {e}") from None
    _writable_parent(p, flag)
    return p


def check_output_dir(path, flag: str = "--out"):
    """Before any work: ``path`` is a folder or can be created as one (not an existing file, writable)."""
    from pathlib import Path

    from ..cli import UsageError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p}: is an existing file, not a folder")
    _writable_parent(p, flag, folder=True)
    return p


def check_model_inputs(args):
    """The model, adapter, tiny decoder and glyph font of a command line, checked without loading any weights (a
    checkpoint file's header and keys, the adapter's tensors, the decoder file, the font file); returns the model's
    configuration. One-line errors (UsageError / CheckpointError / FileNotFoundError), before anything is built."""
    from ..cli import UsageError
    from ..evaluate.runtime import check_tiny_decoder
    from ..factory import model_config
    from ..generation import InputError, usable_font
    from ..lora.files import check_adapter_file

    cfg = model_config(args.model, config_path=getattr(args, "config", None),
                       trust_pickle=getattr(args, "trust_pickle", False))
    if getattr(args, "lora", None):
        check_adapter_file(args.lora)
    check_tiny_decoder(getattr(args, "tiny_decoder", None))
    if getattr(args, "glyph_font", None):
        try:
            usable_font(args.glyph_font, "--font")
        except InputError as e:
            raise UsageError(str(e)) from None
    return cfg


SEED = number(0, MAX_SEED, integer=True)
"""``--seed``: an integer in 0..``config.MAX_SEED``."""
STEPS = number(1, MAX_STEPS, integer=True)
CFG = number(0, MAX_CFG, lo_open=True)
POSITIVE = number(1, None, integer=True)

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
        g.add_argument("--lora-scale", type=number(-10, 10), default=1.0, help="LoRA strength")
        if merge:
            g.add_argument("--merge-lora", action="store_true",
                           help="merge the LoRA into the weights (faster sampling)")


def add_community_args(p: argparse.ArgumentParser) -> None:
    """``--base-model`` and ``--style-lora``: community SD-1.5 weights under AnyText2's own parts."""
    g = p.add_argument_group("your own models and styles")
    g.add_argument("--base-model", metavar="FILE",
                   help="community SD-1.5 model whose UNet and CLIP text weights replace the model's (AttnX, WriteNet, "
                        "text embedding and OCR stay): an ldm-layout .safetensors/.ckpt or a diffusers folder")
    g.add_argument("--style-lora", metavar="FILE:RATIO", action="append", default=[],
                   help="kohya/sd-scripts SD-1.5 LoRA (LoRA or LoCon) merged at RATIO, e.g. style.safetensors:0.8; "
                        "repeatable; the student --lora applies on top")


def community_from_args(args):
    """The ``add_community_args`` files read and checked (before any model is built): a ``CommunityWeights`` or
    None when neither flag is given."""
    from ..factory import read_community

    if not getattr(args, "base_model", None) and not getattr(args, "style_lora", None):
        return None
    return read_community(args.base_model, args.style_lora, trust_pickle=getattr(args, "trust_pickle", False))


def model_from_args(args, community=None):
    """(model on its device/dtype, device, dtype) from the ``add_model_args`` options; applies ``community``
    (:func:`community_from_args`: a base model, style LoRAs), then ``--lora`` on top."""
    from ..factory import apply_community

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build_model(args.model, config_path=args.config, trust_pickle=args.trust_pickle)
    apply_community(model, community)
    if getattr(args, "lora", None):
        from .. import lora as L

        L.load_lora(model, args.lora)
        if args.lora_scale != 1.0:
            L.set_lora_scale(model, args.lora_scale)
        if getattr(args, "merge_lora", False):
            L.merge_lora(model)
    return model.to(device=device, dtype=dtype).eval(), device, dtype


def sampler_options(args, sampler: str, flag: str = "--sampler") -> dict:
    """The sampler options of ``--gamma``, ``--num-phases``, ``--phase-convention``, ``--original-steps`` and
    ``--timestep-spacing``, each
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
    for name in ("original_steps", "timestep_spacing"):
        if getattr(args, name, None) is not None:
            if sampler == "ddim":
                raise UsageError(f"--{name.replace('_', '-')} applies to the student samplers (lcm, tcd, pcm)")
            opts[name] = getattr(args, name)
    return opts


def default_sampling(lora: str | None, sampler: str | None = None, model_cfg=None):
    """The sampling a model is run with when the flags do not say: the teacher's (``defaults.teacher_sampling``: 20-step
    DDIM with ``model_cfg``'s guidance scale) without an adapter or with ``--sampler ddim``; with one, what the adapter
    records (``lora.adapter_info``), else the LCM default with a warning (an adapter made elsewhere)."""
    from ..defaults import Sampling, student_sampling, teacher_sampling
    from ..lora import adapter_info

    if not lora or sampler == "ddim":
        return teacher_sampling(model_cfg)
    info = adapter_info(lora).get("sampling")
    if info:
        return Sampling.from_dict(info)
    if sampler is None:
        log.warning("%s records no sampling; using the LCM sampler, 4 steps, no CFG (pass --sampler/--steps/--cfg)",
                    lora)
    return student_sampling("lcm")


def dataclass_flag(p, cls: type, name: str, **kwargs) -> None:
    """Add ``--name`` for the field ``name`` of the config dataclass ``cls``: its default and its help (the first
    sentence of the field's docstring) come from the dataclass, so the flag cannot drift from the config it fills;
    ``kwargs`` (type, choices, metavar, a default for a required field) go to ``add_argument``."""
    import dataclasses

    from ..config_docs import field_docs

    f = next(x for x in dataclasses.fields(cls) if x.name == name)
    if "default" not in kwargs:
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kwargs["default"] = f.default_factory()  # type: ignore[misc]
    doc = field_docs(cls).get(name, "")
    kwargs.setdefault("help", doc.split(". ")[0].rstrip(".").replace("%", "%%"))
    if kwargs.get("type") is None and isinstance(kwargs.get("default"), bool):
        kwargs.pop("type", None)
        kwargs["action"] = "store_false" if kwargs["default"] else "store_true"
    p.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def dataclass_values(args, cls: type, names) -> dict:
    """``{name: args.name}`` for the fields ``names`` of ``cls`` (the flags :func:`dataclass_flag` added)."""
    return {n: getattr(args, n) for n in names}


def command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` run by ``func``: its one-line help is the first paragraph of the handler's
    docstring and its description the rest, so a command's text has one home (the function that runs it)."""
    import inspect

    from ..cli import HelpFormatter

    first, _, rest = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
    kwargs.setdefault("formatter_class", HelpFormatter)
    p = sub.add_parser(name, help=" ".join(first.split()), description=" ".join(rest.split()) or None, **kwargs)
    p.set_defaults(func=func)
    return p


def add_recipe_args(p: argparse.ArgumentParser, config: str, out: str) -> None:
    """The flags of a command that runs a recipe (``recipes/``): the recipe file, the output and cache folders,
    ``--fresh`` and ``--set`` overrides."""
    p.add_argument("--config", default=config, help="the recipe")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--cache", default=None, help="stage folders (default: OUT/work); a rerun reuses them")
    p.add_argument("--fresh", action="store_true", help="rebuild every stage")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.NAME.config.train.max_steps=100 (repeatable)")
