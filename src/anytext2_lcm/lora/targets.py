"""Target presets: named module selections resolved to the full names PEFT matches."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch.nn as nn

from ..atomic import read_json
from ..config import ConfigError
from .inventory import _COLUMNS, _TRUNK_PARTS, ROLES, ModuleInfo, module_table, seed_categories

log = logging.getLogger(__name__)

TARGETS_FORMAT = "anytext2-lcm/lora-targets"


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
    from ..atomic import write_json

    return write_json(path, doc, indent=1)


def read_targets(path: str | Path) -> list[str]:
    """Module names from a targets file (``write_targets``) or a bare JSON list of names."""
    doc = read_json(path, ConfigError, "targets file")
    if isinstance(doc, list):
        names = doc
    elif isinstance(doc, dict) and isinstance(doc.get("peft", {}).get("target_modules"), list):
        names = doc["peft"]["target_modules"]
    else:
        raise ConfigError(f"{path}: expected a list of module names or a '{TARGETS_FORMAT}' document")
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: the target list is empty or holds non-strings")
    return list(names)


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
