"""LoRA students of AnyText2 through PEFT: target inspection, injection, scale / merge, save / load and export.

Four concerns, one section each:

1. **Inventory** (``module_table``): every ``nn.Linear`` / ``nn.Conv2d`` of an ``AnyText2`` with its network, part
   and role, using the same role vocabulary as ``reference/anytext2_sd15_linear_conv_modules.json`` (731 modules on
   ``sd15``). Works on a model built on the ``meta`` device, so the real architecture costs nothing to inspect.
2. **Target presets** (``TARGET_PRESETS``): named module selections, combinable with ``+`` (``"lcm+zero-convs"``),
   resolved to full module names relative to the ``AnyText2`` root. Those names are exactly what PEFT's
   ``LoraConfig(target_modules=[...])`` matches, so a targets file written by ``anytext2-lcm inspect`` is a PEFT
   config.
3. **Adapters** (``LoraSpec``, ``apply_lora``, ``disable_adapters``, ``set_lora_scale``, ``merge_lora``,
   ``unmerge_lora``, ``unload_lora``): PEFT's ``inject_adapter_in_model`` on the whole ``AnyText2`` — no
   ``PeftModel`` wrapper, so the model keeps its own methods (``denoise``, ``control``, ...) and there is one network
   in memory: the teacher is the same model inside ``with disable_adapters(model):``. No LoRA layer is written here;
   PEFT's ``lora.Linear`` / ``lora.Conv2d`` do the work.
4. **Files** (``save_lora``, ``load_lora``, ``export_merged``, ``export_kohya``, ``export``):

   * a PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``; keys as
     ``PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained(AnyText2(cfg), folder)`` also reads
     it). The weights are PEFT's own ``get_peft_model_state_dict`` — never diffusers'
     ``convert_state_dict_to_diffusers``, which silently loses attention LoRAs on reload (ecosystem.md §3.1);
   * one ``.safetensors`` file (root-relative PEFT keys, the ``LoraConfig`` in the metadata);
   * a full merged checkpoint in the ORIGINAL key layout (``model.diffusion_model.*``, ``control_model.*``,
     ``first_stage_model.*`` in ldm names, ...) as ``.safetensors`` or a ``{"state_dict": ...}`` ``.ckpt``, which
     the teacher loader and AnyText2's own code read;
   * a kohya-style ``.safetensors`` (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``), the format
     AnyText2's ``ms_wrapper.merge_loras`` merges. That code maps names through a plain diffusers SD-1.5 UNet, so it
     merges the SD-1.5 part of the UNet LoRA but skips AttnX and WriteNet modules (``export_kohya`` reports them);
     prefer the merged checkpoint for AnyText2's tools.

   Loading accepts all four forms; pickled files (``.bin``/``.pt``) go through ``safe_torch_load``
   (``weights_only=True``) and anything needing arbitrary unpickling is refused without being executed.

Trap 10 of DESIGN.md: the original ``ControlledUnetModel`` ran its input blocks under ``no_grad`` (input_attnx
False), so a LoRA placed there silently got no gradient. Our UNet has no such switch: LoRA in the input blocks
trains (``tests/test_lora.py`` checks it), and what is frozen is decided here, by ``apply_lora``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, safe_torch_load, to_original
from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

TARGETS_FORMAT = "anytext2-lcm/lora-targets"
ADAPTER_FORMAT = "anytext2-lcm/lora"
PEFT_PREFIX = "base_model.model."
"""Key prefix of ``PeftModel.save_pretrained`` folders (the model sits at ``PeftModel.base_model.model``)."""
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"

# ---------------------------------------------------------------------------------------------------------------
# 1. Inventory
# ---------------------------------------------------------------------------------------------------------------

NETWORKS: "OrderedDict[str, str]" = OrderedDict([
    ("unet", "model.diffusion_model."),
    ("writenet", "control_model."),
    ("vae", "first_stage_model."),
    ("clip", "cond_stage_model."),
    ("embedding_manager", "embedding_manager."),
    ("text_predictor", "text_predictor."),
])
"""Network name → attribute prefix in ``AnyText2`` (display order)."""

ROLES: "OrderedDict[str, str]" = OrderedDict([
    ("attn_proj", "attention q/k/v/out"),
    ("attnx_proj", "AttnX q/k/v/out"),
    ("ff", "feed-forward"),
    ("transformer_proj_in_out", "proj_in / proj_out 1x1"),
    ("resblock_conv", "ResBlock conv 3x3"),
    ("resblock_skip", "ResBlock skip 1x1"),
    ("resblock_time_emb_proj", "ResBlock emb_layers.1"),
    ("downsample_conv", "Downsample op"),
    ("upsample_conv", "Upsample conv"),
    ("conv_in", "conv_in (input_blocks.0.0)"),
    ("conv_out", "conv_out (out.2)"),
    ("time_embed", "time_embed.0 / .2"),
    ("zero_conv", "zero-convs"),
    ("hint_encoder", "glyph/position/fuse convs"),
    ("other", "VAE/CLIP/emb/OCR layers"),
])
"""Role tag → description. The tags are those of ``reference/anytext2_sd15_linear_conv_modules.json``."""

_ATTN = re.compile(r"\.transformer_blocks\.\d+\.(attn1x|attn2x|attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$")
_FF = re.compile(r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
_TRUNK_PARTS = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class ModuleInfo:
    """One ``nn.Linear`` / ``nn.Conv2d`` of the model.

    Attributes:
        name: full module name relative to the ``AnyText2`` root (native layout; what PEFT targets).
        original_name: the name in the original layout (differs from ``name`` only inside the VAE, whose native
            modules are diffusers' ``AutoencoderKL``).
        type: "Linear" or "Conv2d".
        in_features / out_features: input / output features (channels for a conv).
        kernel: (kh, kw) of a conv, None for a Linear.
        bias: whether the module has a bias.
        params: parameters of the module (weight + bias).
        net: a key of ``NETWORKS``.
        part: first name component inside the UNet / WriteNet (``input_blocks``, ``zero_convs``, ...), else None.
        role: a key of ``ROLES``.
        detail: a finer tag (``attn2x.to_k``, ``ff.net.2``, ...; the sub-module for the other networks).
    """

    name: str
    original_name: str
    type: str
    in_features: int
    out_features: int
    kernel: tuple[int, int] | None
    bias: bool
    params: int
    net: str
    part: str | None
    role: str
    detail: str

    def lora_params(self, rank: int) -> int:
        """Parameters of a rank-``rank`` PEFT LoRA on this module: A (r, in[, kh, kw]) + B (out, r[, 1, 1])."""
        k = self.kernel[0] * self.kernel[1] if self.kernel else 1
        return rank * (self.in_features * k + self.out_features)


def classify(name: str) -> tuple[str, str | None, str, str]:
    """(net, part, role, detail) of a Linear/Conv2d from its full name (ldm naming in the UNet and WriteNet)."""
    for net, prefix in NETWORKS.items():
        if name.startswith(prefix):
            break
    else:
        return "other", None, "other", name.split(".")[0]
    rel = name[len(prefix):]
    if net not in ("unet", "writenet"):
        return net, None, "other", rel.rsplit(".", 1)[-1]
    part = rel.split(".")[0]
    leaf = rel.rsplit(".", 1)[-1]
    if part == "time_embed":
        return net, part, "time_embed", rel
    if rel == "input_blocks.0.0":
        return net, part, "conv_in", "conv_in"
    if part == "out":
        return net, part, "conv_out", "conv_out"
    if part in ("zero_convs", "middle_block_out"):
        return net, part, "zero_conv", rel
    if part in ("glyph_block", "position_block", "fuse_block_za"):
        return net, part, "hint_encoder", rel
    m = _ATTN.search(rel)
    if m:
        return net, part, ("attnx_proj" if m.group(1).endswith("x") else "attn_proj"), f"{m.group(1)}.{m.group(2)}"
    m = _FF.search(rel)
    if m:
        return net, part, "ff", f"ff.net.{m.group(1)}"
    if leaf in ("proj_in", "proj_out"):
        return net, part, "transformer_proj_in_out", leaf
    if rel.endswith((".in_layers.2", ".out_layers.3")):
        return net, part, "resblock_conv", ".".join(rel.split(".")[-2:])
    if rel.endswith(".emb_layers.1"):
        return net, part, "resblock_time_emb_proj", "emb_layers.1"
    if leaf == "skip_connection":
        return net, part, "resblock_skip", leaf
    if leaf == "op":
        return net, part, "downsample_conv", leaf
    if leaf == "conv" and part == "output_blocks":
        return net, part, "upsample_conv", leaf
    return net, part, "other", rel


def _base_of(module: nn.Module) -> nn.Module:
    """The wrapped base layer of a PEFT LoRA layer, else the module itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _linear_conv_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv2d in ``named_modules`` order; a PEFT-wrapped layer counts once, under
    its own name (so the inventory is the same before and after ``apply_lora``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped: list[str] = []
    for name, mod in model.named_modules():
        if wrapped and name.startswith(wrapped[-1] + "."):
            continue  # base_layer / lora_A / lora_B inside a wrapper
        if isinstance(mod, BaseTunerLayer):
            wrapped.append(name)
            base = mod.get_base_layer()
            if isinstance(base, (nn.Linear, nn.Conv2d)):
                yield name, base
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            yield name, mod


@lru_cache(maxsize=8)
def _vae_original_names(cfg_key: tuple) -> dict[str, str]:
    """Native VAE module name → original (ldm) name, from the VAE key map (which is diffusers' own converter)."""
    from .models.vae import _key_maps

    with torch.device("cpu"):  # the key map feeds CPU marker tensors through diffusers; not under a meta context
        to_ldm, _ = _key_maps(cfg_key)
    return {"first_stage_model.model." + k[:-len(".weight")]: "first_stage_model." + v[:-len(".weight")]
            for k, v in to_ldm.items() if k.endswith(".weight") and v.endswith(".weight")}


def module_table(model: nn.Module) -> list[ModuleInfo]:
    """Every Linear/Conv2d of an ``AnyText2`` (any device, ``meta`` included), in ``named_modules`` order."""
    vae_names: dict[str, str] = {}
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        from .models.vae import _cfg_key

        vae_names = _vae_original_names(_cfg_key(cfg.vae))
    out = []
    for name, mod in _linear_conv_modules(model):
        net, part, role, detail = classify(name)
        if isinstance(mod, nn.Linear):
            kind, fin, fout, kernel = "Linear", mod.in_features, mod.out_features, None
        else:
            kind, fin, fout, kernel = "Conv2d", mod.in_channels, mod.out_channels, tuple(mod.kernel_size)
        n = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
        out.append(ModuleInfo(name=name, original_name=vae_names.get(name, name), type=kind, in_features=fin,
                              out_features=fout, kernel=kernel, bias=mod.bias is not None, params=n, net=net,
                              part=part, role=role, detail=detail))
    return out


# Columns of the inspect table: (header, predicate on ModuleInfo).
_COLUMNS: list[tuple[str, Callable[[ModuleInfo], bool]]] = [
    ("U.in", lambda m: m.net == "unet" and m.part == "input_blocks"),
    ("U.mid", lambda m: m.net == "unet" and m.part == "middle_block"),
    ("U.out", lambda m: m.net == "unet" and m.part == "output_blocks"),
    ("U.all", lambda m: m.net == "unet"),
    ("W.in", lambda m: m.net == "writenet" and m.part == "input_blocks"),
    ("W.mid", lambda m: m.net == "writenet" and m.part == "middle_block"),
    ("W.all", lambda m: m.net == "writenet"),
    ("VAE", lambda m: m.net == "vae"),
    ("CLIP", lambda m: m.net == "clip"),
    ("emb", lambda m: m.net == "embedding_manager"),
    ("OCR", lambda m: m.net == "text_predictor"),
    ("all", lambda m: True),
]


def seed_categories(table: list[ModuleInfo]) -> "OrderedDict[str, int]":
    """The categories of the seed's "517 targets" claim with their true counts (DESIGN.md §3 trap 12).

    sd15: zero-convs 13, WriteNet attention 56, UNet input attention 48, middle 16 (incl. AttnX), output 120
    (incl. AttnX) → 253.
    """
    attn = ("attn_proj", "attnx_proj")
    cats = OrderedDict([
        ("WriteNet zero-convs", sum(m.net == "writenet" and m.role == "zero_conv" for m in table)),
        ("WriteNet attention q/k/v/out", sum(m.net == "writenet" and m.role in attn for m in table)),
        ("UNet input-block attention", sum(m.net == "unet" and m.part == "input_blocks" and m.role in attn
                                           for m in table)),
        ("UNet middle-block attention + AttnX", sum(m.net == "unet" and m.part == "middle_block" and m.role in attn
                                                    for m in table)),
        ("UNet output-block attention + AttnX", sum(m.net == "unet" and m.part == "output_blocks" and m.role in attn
                                                    for m in table)),
    ])
    cats["total"] = sum(cats.values())
    return cats


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_inventory(table: list[ModuleInfo], rank: int = 64, list_modules: bool = False,
                     title: str = "") -> str:
    """The ``inspect`` report: roles × networks (module counts, parameters), seed categories, target presets."""
    lines = []
    if title:
        lines.append(title)
    lines.append("Linear/Conv2d modules by role and network (U = UNet, W = WriteNet; emb = text-embedding module):")
    head = f"{'role':<27}{'tag':<24}" + "".join(f"{h:>8}" for h, _ in _COLUMNS) + f"{'params':>10}"
    lines.append(head)
    lines.append("-" * len(head))
    totals = [0] * len(_COLUMNS)
    for role, label in ROLES.items():
        rows = [m for m in table if m.role == role]
        if not rows:
            continue
        counts = [sum(pred(m) for m in rows) for _, pred in _COLUMNS]
        totals = [a + b for a, b in zip(totals, counts)]
        lines.append(f"{label:<27}{role:<24}" + "".join(f"{c or '-':>8}" for c in counts)
                     + f"{_human(sum(m.params for m in rows)):>10}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<51}" + "".join(f"{c:>8}" for c in totals) + f"{_human(sum(m.params for m in table)):>10}")

    lines.append("")
    lines.append("The seed's LoRA categories, counted (its '517' assumed a transformer with AttnX in every block):")
    for k, v in seed_categories(table).items():
        lines.append(f"  {k:<40}{v:>6}")

    lines.append("")
    lines.append(f"Target presets (combine with '+', e.g. lcm+zero-convs); LoRA parameters at rank {rank}:")
    lines.append(f"  {'preset':<16}{'UNet':>6}{'AttnX':>7}{'WriteNet':>10}{'total':>7}{'LoRA params':>13}")
    for name in TARGET_PRESETS:
        sel = [m for m in table if TARGET_PRESETS[name].select(m)]
        lines.append(f"  {name:<16}{sum(m.net == 'unet' for m in sel):>6}"
                     f"{sum(m.role == 'attnx_proj' for m in sel):>7}{sum(m.net == 'writenet' for m in sel):>10}"
                     f"{len(sel):>7}{_human(sum(m.lora_params(rank) for m in sel)):>13}")
    for name, p in TARGET_PRESETS.items():
        lines.append(f"  {name}: {p.help}")

    if list_modules:
        lines.append("")
        lines.append(f"{'name':<78}{'type':<7}{'in':>6}{'out':>6}{'k':>4}{'params':>11}  {'net':<10}{'role':<24}detail")
        for m in table:
            k = f"{m.kernel[0]}" if m.kernel else "-"
            extra = f"  (original: {m.original_name})" if m.original_name != m.name else ""
            lines.append(f"{m.name:<78}{m.type:<7}{m.in_features:>6}{m.out_features:>6}{k:>4}{m.params:>11}  "
                         f"{m.net:<10}{m.role:<24}{m.detail}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# 2. Target presets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetPreset:
    """A named selection of LoRA target modules.

    Attributes:
        help: what it selects and its size on ``sd15``.
        select: predicate on a ``ModuleInfo``.
    """

    help: str
    select: Callable[[ModuleInfo], bool]


def _lcm_rule(net: str) -> Callable[[ModuleInfo], bool]:
    # diffusers' LCM-LoRA list (to_q/k/v/out.0, proj_in/out, ff.net.0.proj, ff.net.2, conv1, conv2, conv_shortcut,
    # down/upsamplers conv, time_emb_proj) covers, in ldm names, every Linear/Conv2d of the trunk blocks except the
    # first conv (input_blocks.0.0 = diffusers' conv_in); time_embed and out.2 are outside the blocks.
    return lambda m: m.net == net and m.part in _TRUNK_PARTS and m.role != "conv_in"


def _union(*names: str) -> Callable[[ModuleInfo], bool]:
    return lambda m: any(TARGET_PRESETS[n].select(m) for n in names)


TARGET_PRESETS: "OrderedDict[str, TargetPreset]" = OrderedDict([
    ("attn", TargetPreset(
        "UNet attention to_q/to_k/to_v/to_out.0 of attn1, attn2 and AttnX (attn1x, attn2x). "
        "sd15: 184 = 48 input + 16 middle + 120 output (56 AttnX).",
        lambda m: m.net == "unet" and m.role in ("attn_proj", "attnx_proj"))),
    ("attnx", TargetPreset(
        "UNet AttnX projections only (what the original AnyText2 training updated in the UNet). sd15: 56.",
        lambda m: m.net == "unet" and m.role == "attnx_proj")),
    ("attn-ff", TargetPreset(
        "UNet attention (incl. AttnX) + feed-forward + transformer proj_in/proj_out. sd15: 248.",
        lambda m: m.net == "unet" and m.role in ("attn_proj", "attnx_proj", "ff", "transformer_proj_in_out"))),
    ("lcm", TargetPreset(
        "diffusers' LCM-LoRA default list mapped to ldm names: every Linear/Conv2d of the UNet input_blocks "
        "(except input_blocks.0.0), middle_block and output_blocks. sd15: 334 = SD-1.5's 278 + 56 AttnX.",
        _lcm_rule("unet"))),
    ("writenet-attn", TargetPreset(
        "WriteNet attention to_q/to_k/to_v/to_out.0 (attn1, attn2; no AttnX there). sd15: 56.",
        lambda m: m.net == "writenet" and m.role == "attn_proj")),
    ("writenet-lcm", TargetPreset(
        "The lcm rule on the WriteNet (input_blocks except .0.0, middle_block; no zero-convs). sd15: 119.",
        _lcm_rule("writenet"))),
    ("zero-convs", TargetPreset(
        "WriteNet zero-convs (zero_convs.N.0 and middle_block_out.0) as 1x1 Conv2d LoRA. sd15: 13. An ablation: "
        "with fast control the WriteNet output does not depend on t.",
        lambda m: m.net == "writenet" and m.role == "zero_conv")),
    ("seed", TargetPreset(
        "The seed spec's categories with their true sizes: attn + writenet-attn + zero-convs. sd15: 253.",
        _union("attn", "writenet-attn", "zero-convs"))),
])
"""Target presets by name; an expression joins names with ``+``."""


def parse_preset_expression(expr: str) -> list[str]:
    """``"lcm+zero-convs"`` → ["lcm", "zero-convs"]; unknown names raise ConfigError."""
    names = [p.strip() for p in expr.split("+") if p.strip()]
    unknown = [n for n in names if n not in TARGET_PRESETS]
    if not names or unknown:
        raise ConfigError(f"lora.targets={expr!r}: unknown target preset(s) {unknown or [expr]} "
                          f"(known: {', '.join(TARGET_PRESETS)}; combine with '+')")
    return names


def resolve_targets(model: nn.Module | list[ModuleInfo], targets: str | os.PathLike | Sequence[str],
                    zero_convs: bool = False) -> list[str]:
    """Full names (in model order) of the modules ``targets`` selects.

    Args:
        model: an ``AnyText2`` (any device) or its ``module_table``.
        targets: a preset expression (``"lcm"``, ``"attn+zero-convs"``); a targets ``.json`` written by
            ``write_targets``; ``"re:<regex>"`` (full match on module names, PEFT's rule for a string); or a list of
            module names or name suffixes (PEFT's rule for a list: ``name == t or name.endswith("." + t)``).
        zero_convs: add the WriteNet zero-convs.
    Raises:
        ConfigError: unknown preset, a regex / list entry that matches no Linear/Conv2d, or an empty selection.
    """
    table = model if isinstance(model, list) else module_table(model)
    by_name = {m.name: m for m in table}
    chosen: set[str] = set()
    if isinstance(targets, (str, os.PathLike)):
        s = os.fspath(targets)
        if s.endswith(".json") or Path(s).is_file():
            names = read_targets(s)
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ConfigError(f"lora.targets={s!r}: {len(missing)} modules are not Linear/Conv2d modules of "
                                  f"this model, e.g. {missing[:3]} (written for another architecture?)")
            chosen.update(names)
        elif s.startswith("re:"):
            try:
                rx = re.compile(s[3:])
            except re.error as e:
                raise ConfigError(f"lora.targets={s!r}: invalid regex ({e})") from None
            chosen.update(m.name for m in table if rx.fullmatch(m.name))
            if not chosen:
                raise ConfigError(f"lora.targets={s!r}: the regex matches no Linear/Conv2d module")
        else:
            for p in parse_preset_expression(s):
                chosen.update(m.name for m in table if TARGET_PRESETS[p].select(m))
    else:
        for t in targets:
            hit = [m.name for m in table if m.name == t or m.name.endswith("." + t)]
            if not hit:
                raise ConfigError(f"lora.targets: {t!r} matches no Linear/Conv2d module of the model")
            chosen.update(hit)
    if zero_convs:
        chosen.update(m.name for m in table if TARGET_PRESETS["zero-convs"].select(m))
    if not chosen:
        raise ConfigError(f"lora.targets={targets!r}: selects no module of this model")
    return [m.name for m in table if m.name in chosen]


def targets_document(model: nn.Module, targets: str | Sequence[str] = "lcm", zero_convs: bool = False,
                     rank: int = 64, alpha: float = 64.0, dropout: float = 0.0) -> dict:
    """The JSON document ``inspect --preset-targets`` writes.

    ``peft`` holds ``LoraConfig`` keyword arguments (``LoraConfig(**doc["peft"])`` works as is);
    ``modules`` lists each target with its role; counts are per network and role.
    """
    table = module_table(model)
    names = resolve_targets(table, targets, zero_convs)
    by_name = {m.name: m for m in table}
    sel = [by_name[n] for n in names]
    cfg = getattr(model, "cfg", None)
    return {
        "format": TARGETS_FORMAT,
        "version": 1,
        "targets": targets if isinstance(targets, str) else "explicit",
        "zero_convs": bool(zero_convs),
        "model": getattr(cfg, "name", None),
        "count": len(sel),
        "by_network": dict(Counter(m.net for m in sel)),
        "by_role": dict(Counter(m.role for m in sel)),
        "lora_params": sum(m.lora_params(rank) for m in sel),
        "modules": [{"name": m.name, "type": m.type, "role": m.role} for m in sel],
        "peft": {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names},
    }


def write_targets(path: str | Path, doc: dict) -> Path:
    """Write a targets document (see ``targets_document``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def read_targets(path: str | Path) -> list[str]:
    """Module names from a targets file (``write_targets``) or a bare JSON list of names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"targets file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON targets file ({e})") from None
    if isinstance(doc, list):
        names = doc
    elif isinstance(doc, dict) and isinstance(doc.get("peft", {}).get("target_modules"), list):
        names = doc["peft"]["target_modules"]
    else:
        raise ConfigError(f"{path}: expected a list of module names or a '{TARGETS_FORMAT}' document")
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: the target list is empty or holds non-strings")
    return list(names)


# ---------------------------------------------------------------------------------------------------------------
# 3. Adapters
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LoraSpec:
    """How to put a LoRA on an ``AnyText2`` (LCM-LoRA defaults: rank 64, alpha 64, dropout 0)."""

    rank: int = 64
    """LoRA rank r (PEFT ``r``)."""
    alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    targets: str | list[str] = "lcm"
    """Target modules: a preset expression (see ``TARGET_PRESETS``; e.g. "lcm", "attn+zero-convs"), a targets
    .json file written by ``anytext2-lcm inspect``, "re:<regex>", or a list of module names / name suffixes."""
    zero_convs: bool = False
    """Also put Conv2d LoRA on the WriteNet zero-convs (an ablation; the WriteNet's own weights stay frozen)."""
    train_embedding_manager: bool = False
    """Train the text-embedding module's full weights beside the LoRA. Frozen by default."""
    init_lora_weights: bool | str = True
    """PEFT initialisation: True = Kaiming-uniform A and zero B (the model is unchanged at init), or a PEFT
    scheme name ("gaussian", ...)."""
    adapter_name: str = "default"
    """PEFT adapter name."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank!r}: must be a positive integer")
        if not float(self.alpha) > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: must lie in [0, 1)")
        if isinstance(self.targets, str):
            t = self.targets
            if not (t.endswith(".json") or t.startswith("re:") or Path(t).is_file()):
                parse_preset_expression(t)
        elif not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"lora.targets={self.targets!r}: a preset, a file, 're:<regex>' or a non-empty "
                              f"list of module names")
        if not self.adapter_name or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.adapter_name):
            raise ConfigError(f"lora.adapter_name={self.adapter_name!r}: letters, digits, '_' and '-' only")

    def peft_config(self, model: nn.Module | list[ModuleInfo]):
        """The ``peft.LoraConfig`` for ``model`` (targets resolved to exact full names)."""
        from peft import LoraConfig

        names = resolve_targets(model, self.targets, self.zero_convs)
        return LoraConfig(r=self.rank, lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                          target_modules=names, init_lora_weights=self.init_lora_weights, bias="none")

    def to_dict(self) -> dict:
        return asdict(self)


def lora_layers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Name → PEFT LoRA layer (``peft.tuners.lora.LoraLayer``) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def adapter_names(model: nn.Module) -> list[str]:
    """Adapters injected into ``model`` (PEFT keeps their configs in ``model.peft_config``)."""
    return list(getattr(model, "peft_config", {}) or {})


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _freeze_to_lora(model: nn.Module, adapter_name: str) -> None:
    # PEFT already freezes every non-LoRA parameter of the model it injects into; doing it here too keeps the
    # rule ("only the LoRA trains, the WriteNet and the embedding manager are frozen") independent of PEFT
    # internals.
    tag = f".{adapter_name}."
    for n, p in model.named_parameters():
        p.requires_grad_(("lora_" in n) and tag in n)


def apply_lora(model: nn.Module, spec: LoraSpec | None = None) -> int:
    """Inject a LoRA into ``model`` in place (PEFT ``inject_adapter_in_model``) and freeze the rest.

    Everything except the LoRA weights is frozen: the UNet, the WriteNet (zero-conv LoRA only with
    ``spec.zero_convs``), the VAE, CLIP, the OCR; the embedding manager too unless ``spec.train_embedding_manager``.
    Works on the ``meta`` device (LoRA weights are then created on ``meta``).

    Returns:
        The number of trainable parameters.
    Raises:
        ConfigError: bad targets, or an adapter of that name is already present.
    """
    from peft import inject_adapter_in_model

    spec = spec or LoraSpec()
    if spec.adapter_name in adapter_names(model):
        raise ConfigError(f"lora.adapter_name={spec.adapter_name!r}: the model already has this adapter")
    config = spec.peft_config(model)
    inject_adapter_in_model(config, model, adapter_name=spec.adapter_name, low_cpu_mem_usage=_is_meta(model))
    _freeze_to_lora(model, spec.adapter_name)
    if spec.train_embedding_manager:
        model.embedding_manager.requires_grad_(True)
    n = trainable_parameters(model)
    log.info("LoRA r=%d alpha=%g on %d modules: %d trainable parameters", spec.rank, spec.alpha,
             len(config.target_modules), n)
    return n


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model (the teacher) inside the block: every LoRA is bypassed, exactly.

    One network in memory: the distillation teacher is the student with its adapters disabled. The LoRA weights'
    ``requires_grad`` flags are restored on exit (PEFT's toggle would otherwise change them).

    Raises:
        RuntimeError: the LoRA is merged (PEFT would silently unmerge it on the next forward).
    """
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_adapters: the LoRA is merged into the weights; unmerge_lora(model) first")
    flags = [(p, p.requires_grad) for layer in layers for name in layer.adapter_layer_names
             for p in getattr(layer, name).parameters()]
    states = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, states):
            layer.enable_adapters(not was_disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> int:
    """Scale every LoRA update: ΔW = scale · (alpha / r) · B A (scale 1 = as trained). Returns the layer count.

    Raises:
        RuntimeError: the LoRA is merged (unmerging later would subtract the wrong amount).
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("set_lora_scale: the model has no LoRA")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("set_lora_scale: the LoRA is merged; unmerge_lora(model) first")
    names = [adapter_name] if adapter_name else adapter_names(model)
    for layer in layers.values():
        for a in names:
            layer.set_scale(a, float(scale))
    return len(layers)


def merge_lora(model: nn.Module, safe: bool = False) -> int:
    """Fold the active LoRA updates into the base weights (W ← W + ΔW); forward then skips the LoRA branch.

    ``safe`` checks the merged weights for NaN/Inf first (PEFT ``safe_merge``). Returns the merged layer count.
    """
    n = 0
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.merge(safe_merge=safe)
            n += 1
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora`` (W ← W − ΔW; equal to the original within fp32 rounding). Returns the layer count."""
    n = 0
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
            n += 1
    return n


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the PEFT layers, leaving plain Linear/Conv2d (merged first if ``merge``): the model is then a
    plain ``AnyText2`` again (its ``state_dict`` has the original keys). Returns ``model``."""
    if merge:
        merge_lora(model)
    for name in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _base_of(getattr(parent, child)))
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


# ---------------------------------------------------------------------------------------------------------------
# 4. Files
# ---------------------------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> "OrderedDict[str, torch.Tensor]":
    """PEFT's own adapter state dict (``get_peft_model_state_dict``): root-relative keys
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, adapter name removed."""
    from peft import get_peft_model_state_dict

    if adapter_name not in adapter_names(model):
        raise RuntimeError(f"the model has no LoRA adapter {adapter_name!r} (has {adapter_names(model)})")
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return OrderedDict((k, v.detach()) for k, v in sd.items())


def _config_json(config) -> dict:
    d = config.to_dict()
    for k, v in d.items():
        if isinstance(v, set):
            d[k] = sorted(v)
    return json.loads(json.dumps(d, default=str))


def _atomic_dir(out: Path) -> Path:
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_lora(model: nn.Module, path: str | Path, adapter_name: str = "default", scale: float = 1.0,
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save the adapter: a PEFT folder, or one file when ``path`` ends in ``.safetensors``.

    Folder: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` as
    ``PeftModel.save_pretrained`` writes) + ``adapter_config.json``. File: root-relative keys, and the metadata
    holds ``format``, the ``peft_config`` JSON and ``metadata``. ``scale`` ≠ 1 is baked into lora_B (ΔW is
    linear in B); ``dtype`` casts the weights. Writes are atomic (temporary name, then rename).
    A strength set with ``set_lora_scale`` is not part of the adapter (as in PEFT): pass it as ``scale``.
    """
    path = Path(path)
    sd = lora_state_dict(model, adapter_name)
    if scale != 1.0:
        sd = OrderedDict((k, v * scale if ".lora_B." in k else v) for k, v in sd.items())
    if dtype is not None:
        sd = OrderedDict((k, v.to(dtype)) for k, v in sd.items())
    config = model.peft_config[adapter_name]
    if path.suffix == ".safetensors":
        meta = {"format": ADAPTER_FORMAT, "version": "1", "peft_config": json.dumps(_config_json(config))}
        meta.update(metadata or {})
        _save_safetensors(sd, path, meta)
        return path
    tmp = _atomic_dir(path)
    _save_safetensors({PEFT_PREFIX + k: v for k, v in sd.items()}, tmp / ADAPTER_WEIGHTS[0], {"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(_config_json(config), indent=2, sort_keys=True))
    _commit_dir(tmp, path)
    return path


def _read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, LoraConfig dict or None) from a PEFT folder, a safetensors file or a torch file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist")
    config = None
    if path.is_dir():
        cfg_file = path / ADAPTER_CONFIG
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: corrupt ({e})") from None
        weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)}")
        path = weights
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for bad headers / truncation
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        if config is None and "peft_config" in meta:
            try:
                config = json.loads(meta["peft_config"])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: corrupt peft_config metadata ({e})") from None
    else:
        # .bin / .pt / .pth: weights_only unpickling; a file that needs arbitrary code is refused, not run.
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entries are not tensors, e.g. {bad[:3]}")
    return sd, config


def _expected_shapes(m: ModuleInfo, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if m.kernel is None:
        return (r, m.in_features), (m.out_features, r)
    return (r, m.in_features, *m.kernel), (m.out_features, r, 1, 1)


def _group_peft_keys(sd: dict[str, torch.Tensor], source: str) -> "OrderedDict[str, dict[str, torch.Tensor]]":
    """module → {"A": tensor, "B": tensor} from PEFT keys (with or without the PeftModel prefix / adapter name)."""
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    other = []
    for k, v in sd.items():
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        m = _LORA_KEY.match(key)
        if not m:
            other.append(k)
            continue
        groups.setdefault(m.group("module"), {})[m.group("ab")] = v
    if other:
        raise CheckpointError(f"{source}: {len(other)} keys are not plain LoRA A/B weights (DoRA, biases or another "
                              f"format are not supported), e.g. {other[:3]}")
    incomplete = [n for n, g in groups.items() if set(g) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{source}: lora_A or lora_B missing for {len(incomplete)} modules, "
                              f"e.g. {incomplete[:3]}")
    return groups


def load_lora(model: nn.Module, path: str | Path, adapter_name: str = "default",
              scale: float | None = None, trainable: bool = False):
    """Load an adapter into ``model`` (injecting the PEFT layers it needs); returns its ``LoraConfig``.

    Accepts a PEFT folder, a ``.safetensors`` file (ours, with the config in its metadata; or bare PEFT keys, then
    r comes from the shapes and alpha = r), a kohya-style ``.safetensors`` (``lora_down``/``lora_up``/``alpha``),
    or a ``.bin``/``.pt`` read with ``weights_only=True``. The adapter is frozen after loading (inference) unless
    ``trainable``, which, as ``apply_lora``, leaves only this adapter's weights trainable.

    Raises:
        CheckpointError: unsafe or unreadable file; the adapter targets modules the model lacks; a rank or shape
            that does not fit the model or the adapter's own config.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    path = Path(path)
    source = str(path)
    if adapter_name in adapter_names(model):
        raise CheckpointError(f"{source}: the model already has an adapter named {adapter_name!r}")
    raw, config_dict = _read_adapter(path)
    table = module_table(model)
    by_name = {m.name: m for m in table}
    if any(_KOHYA_KEY.match(k) for k in raw):
        groups, alphas = _from_kohya(raw, model, table, source)
    else:
        groups, alphas = _group_peft_keys(raw, source), {}
    if not groups:
        raise CheckpointError(f"{source}: holds no LoRA weights")

    missing = [n for n in groups if n not in by_name]
    if missing:
        raise CheckpointError(
            f"{source}: the adapter targets {len(missing)} modules this model lacks, e.g. {missing[:3]} "
            f"(an adapter for another architecture or preset?)")

    ranks = {n: int(g["A"].shape[0]) for n, g in groups.items()}
    if config_dict is not None:
        if str(config_dict.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"{source}: a {config_dict.get('peft_type')} adapter, not LoRA")
        config = LoraConfig.from_peft_type(**{k: v for k, v in config_dict.items() if k != "peft_type"})
        if config.use_dora:
            raise CheckpointError(f"{source}: DoRA adapters are not supported")
    else:
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        alpha0 = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r0)
        if not alphas:
            log.warning("%s: no adapter config; using r=%d from the weights and alpha=r (scale 1)", source, r0)
        config = LoraConfig(r=r0, lora_alpha=alpha0,
                            rank_pattern={n: r for n, r in ranks.items() if r != r0},
                            alpha_pattern={n: a for n, a in alphas.items() if a != alpha0})
    # Shapes against both the model and the config's rank (rank_pattern included).
    errors = []
    for n, g in groups.items():
        r = _pattern_value(config.rank_pattern, n, config.r)
        want_a, want_b = _expected_shapes(by_name[n], r)
        got_a, got_b = tuple(g["A"].shape), tuple(g["B"].shape)
        if (got_a, got_b) != (want_a, want_b):
            errors.append(f"{n} ({by_name[n].type} {by_name[n].in_features}->{by_name[n].out_features}): lora_A "
                          f"{got_a} / lora_B {got_b}, expected {want_a} / {want_b} for rank {r}")
    if errors:
        raise CheckpointError(f"{source}: {len(errors)} LoRA weights do not fit the model or the adapter's rank: "
                              + "; ".join(errors[:4]) + (" ..." if len(errors) > 4 else ""))

    # Inject exactly the modules the weights name (a config's suffix list could match more).
    config.target_modules = list(groups)
    config.exclude_modules = None
    config.inference_mode = True
    meta = _is_meta(model)
    inject_adapter_in_model(config, model, adapter_name=adapter_name, low_cpu_mem_usage=meta)
    layers = lora_layers(model)
    if meta:
        # A model on the meta device (format conversion without the base weights): PEFT would move loaded
        # adapter weights to the base layer's device, i.e. back to meta, so the real tensors are set directly.
        for n, g in groups.items():
            layers[n].lora_A[adapter_name].weight = nn.Parameter(g["A"].float(), requires_grad=False)
            layers[n].lora_B[adapter_name].weight = nn.Parameter(g["B"].float(), requires_grad=False)
    else:
        state = {}
        for n, g in groups.items():
            base = _base_of(layers[n]).weight
            # PEFT keeps adapters in fp32 under an fp16/bf16 base (autocast_adapter_dtype); else the base dtype.
            dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
            state[f"{n}.lora_A.weight"] = g["A"].to(device=base.device, dtype=dtype)
            state[f"{n}.lora_B.weight"] = g["B"].to(device=base.device, dtype=dtype)
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        not_loaded = [k for k in (getattr(result, "missing_keys", []) or [])
                      if "lora_" in k and f".{adapter_name}." in k]
        if unexpected or not_loaded:
            raise CheckpointError(f"{source}: PEFT did not take every weight (unexpected {unexpected[:3]}, "
                                  f"not loaded {not_loaded[:3]})")
    if trainable:
        _freeze_to_lora(model, adapter_name)
    else:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
    if scale is not None:
        set_lora_scale(model, scale, adapter_name)
    log.info("loaded LoRA %s: %d modules, r=%d, alpha=%g", source, len(groups), config.r, config.lora_alpha)
    return config


def _pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: an exact key, else a key the name ends with."""
    if not pattern:
        return default
    if name in pattern:
        return pattern[name]
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> "OrderedDict[str, torch.Tensor]":
    """The model's native-layout state dict with the active LoRA folded into each base weight and no PEFT keys.

    Does not modify the model: merged layers already hold W + ΔW; for unmerged layers ΔW (PEFT
    ``get_delta_weight``, current scale included) is added to a copy. Disabled adapters contribute nothing.
    ``dtype`` casts floating tensors (integer buffers keep their type).
    """
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        if layer.merged or layer.disable_adapters:
            continue
        delta = None
        for a in layer.active_adapters:
            if a in layer.lora_A:
                d = layer.get_delta_weight(a)
                delta = d if delta is None else delta + d
        if delta is not None:
            deltas[f"{name}.weight"] = delta
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        v = v.detach()
        if k in deltas:
            v = v + deltas[k].to(v.dtype)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def export_merged(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the full model with the LoRA merged, in the ORIGINAL key layout, in the original order.

    ``.safetensors``: a flat file; ``.ckpt`` / ``.pt`` / ``.pth``: ``torch.save({"state_dict": ...})`` (plain
    tensors only, so it loads with ``weights_only=True``). Both load with ``checkpoint.load_model(path)`` and
    with AnyText2's own ``load_state_dict``. Atomic write.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise ConfigError(f"export path {path}: use .safetensors or .ckpt")
    sd = to_original(merged_state_dict(model, dtype), model.cfg)
    sd = OrderedDict((k, v.contiguous().cpu()) for k, v in sd.items())
    if path.suffix == ".safetensors":
        _save_safetensors(sd, path, {"format": "pt", "layout": "anytext2-original", "model": str(model.cfg.name)})
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        torch.save({"state_dict": sd}, tmp)
        os.replace(tmp, path)
    return path


# ---- kohya-style names -----------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _unet_diffusers_names(unet_cfg_json: str) -> dict[str, str]:
    """ldm UNet module path → diffusers UNet2DConditionModel path, through diffusers' own ldm converter (each
    ldm key is fed in as a unique marker and found where the converter puts it, so names cannot drift)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from .config import UNetConfig
    from .models.unet import UNet

    cfg = UNetConfig(**json.loads(unet_cfg_json))
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    with torch.device("cpu"):  # markers must hold real values even under an ambient meta-device context
        markers = {"model.diffusion_model." + k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
        converted = convert_ldm_unet_checkpoint(markers, {"layers_per_block": cfg.num_res_blocks})
    out = {}
    for dk, v in converted.items():
        lk = keys[int(v.item())]
        if lk.endswith(".weight") and dk.endswith(".weight"):
            out[lk[:-len(".weight")]] = dk[:-len(".weight")]
    return out


def kohya_names(model: nn.Module, table: list[ModuleInfo] | None = None) -> "OrderedDict[str, str]":
    """Module name → kohya LoRA name for the UNet, the WriteNet and CLIP.

    * UNet: ``lora_unet_`` + the diffusers path with ``_`` (kohya's SD-1.5 naming, which AnyText2's
      ``ms_wrapper.merge_loras`` looks up in a diffusers UNet). AttnX gets the same rule
      (``..._attn1x_to_q``); ms_wrapper's plain SD-1.5 UNet has no such module and skips it.
    * CLIP: ``lora_te_`` + the HF ``CLIPTextModel`` path (kohya's text-encoder naming).
    * WriteNet: ``lora_control_model_`` + the ldm path (this package's convention; no kohya tool knows it).
    """
    table = table if table is not None else module_table(model)
    unet_map = _unet_diffusers_names(json.dumps(asdict(model.cfg.unet), sort_keys=True))
    out: OrderedDict[str, str] = OrderedDict()
    for m in table:
        if m.net == "unet":
            rel = m.name[len(NETWORKS["unet"]):]
            out[m.name] = "lora_unet_" + unet_map.get(rel, rel).replace(".", "_")
        elif m.net == "clip":
            out[m.name] = "lora_te_" + m.name[len("cond_stage_model.transformer."):].replace(".", "_")
        elif m.net == "writenet":
            out[m.name] = "lora_" + m.name.replace(".", "_")
    if len(set(out.values())) != len(out):
        raise RuntimeError("kohya names collide for this architecture")
    return out


def _ms_wrapper_mergeable(m: ModuleInfo) -> bool:
    """Whether AnyText2's ms_wrapper.merge_loras finds the module (SD-1.5 UNet transformer/resnet/sampler convs
    and attention, without AttnX)."""
    return m.net == "unet" and m.part in _TRUNK_PARTS and m.role not in ("attnx_proj", "conv_in")


def export_kohya(model: nn.Module, path: str | Path, adapter_name: str = "default", scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Write a kohya-style LoRA ``.safetensors``: ``<name>.lora_down.weight`` (= A), ``<name>.lora_up.weight``
    (= B) and ``<name>.alpha`` (0-dim tensor) with alpha / rank = PEFT's current scaling × ``scale``.

    Returns counts: ``modules``, ``ms_wrapper_mergeable`` (what AnyText2's ms_wrapper would merge: SD-1.5 UNet
    block modules and CLIP) and ``skipped_by_ms_wrapper`` (AttnX, WriteNet and other modules its plain SD-1.5
    UNet lacks; a warning is logged).
    Raises ConfigError for LoRA on networks without a kohya name (VAE, embedding manager, OCR).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"kohya export path {path}: must end in .safetensors")
    table = module_table(model)
    by_name = {m.name: m for m in table}
    names = kohya_names(model, table)
    tensors: dict[str, torch.Tensor] = {}
    mergeable = skipped = 0
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        if name not in names:
            raise ConfigError(f"kohya export: no kohya name for a LoRA on {name} ({by_name[name].net})")
        k = names[name]
        a = layer.lora_A[adapter_name].weight.detach()
        b = layer.lora_B[adapter_name].weight.detach()
        r = a.shape[0]
        tensors[f"{k}.lora_down.weight"] = a.to(dtype)
        tensors[f"{k}.lora_up.weight"] = b.to(dtype)
        tensors[f"{k}.alpha"] = torch.tensor(float(layer.scaling[adapter_name]) * scale * r, dtype=dtype)
        if _ms_wrapper_mergeable(by_name[name]) or by_name[name].net == "clip":
            mergeable += 1
        else:
            skipped += 1
    if not tensors:
        raise RuntimeError(f"kohya export: the model has no LoRA adapter {adapter_name!r}")
    if skipped:
        log.warning("kohya export: %d of %d LoRA modules (AttnX / WriteNet) have no counterpart in AnyText2's "
                    "ms_wrapper merge (a plain SD-1.5 UNet); it would skip them. Use the merged checkpoint export "
                    "for AnyText2's tools.", skipped, mergeable + skipped)
    _save_safetensors(tensors, path, {"format": "pt", "ss_network_module": "networks.lora",
                                      "anytext2_lcm_format": "kohya"})
    return {"modules": mergeable + skipped, "ms_wrapper_mergeable": mergeable, "skipped_by_ms_wrapper": skipped}


def _from_kohya(raw: dict[str, torch.Tensor], model: nn.Module, table: list[ModuleInfo],
                source: str) -> tuple["OrderedDict[str, dict[str, torch.Tensor]]", dict[str, float]]:
    """kohya keys → (module → {"A", "B"}, module → alpha)."""
    inverse = {v: k for k, v in kohya_names(model, table).items()}
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    alphas: dict[str, float] = {}
    unknown = []
    for k, v in raw.items():
        m = _KOHYA_KEY.match(k)
        if not m or m.group("module") not in inverse:
            unknown.append(k)
            continue
        name = inverse[m.group("module")]
        part = m.group("part")
        if part == "alpha":
            alphas[name] = float(v.item())
        else:
            groups.setdefault(name, {})["A" if part.startswith("lora_down") else "B"] = v
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} kohya keys name modules this model lacks, "
                              f"e.g. {unknown[:3]}")
    incomplete = [n for n, g in groups.items() if set(g) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{source}: lora_down or lora_up missing for {incomplete[:3]}")
    for n, g in groups.items():
        alphas.setdefault(n, float(g["A"].shape[0]))  # kohya's default: alpha = rank
    return groups, alphas


# ---- one entry point -------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("peft", "safetensors", "merged", "kohya")


def export(model: nn.Module, out: str | Path, fmt: str, adapter_name: str = "default", scale: float = 1.0,
           dtype: torch.dtype | None = None) -> Path:
    """Export the LoRA of ``model`` as ``fmt``:

    * ``peft``: a PEFT adapter folder;
    * ``safetensors``: one adapter file (config in the metadata);
    * ``merged``: the full model with the LoRA merged, original key layout (``.safetensors`` or ``.ckpt``);
    * ``kohya``: kohya-style ``lora_down``/``lora_up``/``alpha`` safetensors.

    ``scale`` multiplies the LoRA update (baked into the exported weights; the model's own scale is restored).
    """
    out = Path(out)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r}: one of {EXPORT_FORMATS}")
    if fmt == "peft":
        return save_lora(model, out, adapter_name, scale=scale, dtype=dtype)
    if fmt == "safetensors":
        if out.suffix != ".safetensors":
            raise ConfigError(f"export path {out}: a single-file adapter must end in .safetensors")
        return save_lora(model, out, adapter_name, scale=scale, dtype=dtype)
    if fmt == "kohya":
        export_kohya(model, out, adapter_name, scale=scale, dtype=dtype or torch.float32)
        return out
    if scale == 1.0:
        return export_merged(model, out, dtype)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("export merged with scale != 1: unmerge_lora(model) first")
    layers = lora_layers(model)
    saved = [(layer, dict(layer.scaling)) for layer in layers.values()]
    try:
        for layer in layers.values():
            for a in layer.scaling:
                layer.scaling[a] *= scale
        return export_merged(model, out, dtype)
    finally:
        for layer, scaling in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)
