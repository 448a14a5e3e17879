"""Kohya-style LoRA files (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``, ``lora_up``, ``alpha``; the format
AnyText2's ms_wrapper merges and community SD-1.5 LoRAs use): the names, reading them, writing them. This module
builds on ``adapters`` and ``inventory``; ``files`` (``load_lora``, the ``export`` entry point) and ``style`` build
on it."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import save_safetensors
from ..checkpoint import CheckpointError
from ..config import ConfigError
from .adapters import lora_layers
from .inventory import _TRUNK_PARTS, NETWORKS, ModuleInfo, module_table

log = logging.getLogger(__name__)

KOHYA_KEY = re.compile(r"^(?P<module>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
"""A key of a kohya LoRA file: ``<kohya module name>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``."""


# ---- kohya-style names -----------------------------------------------------------------------------------------

def _unet_diffusers_names(model: nn.Module) -> dict[str, str]:
    """ldm UNet module path → diffusers UNet2DConditionModel path: the weights of
    :func:`~anytext2_lcm.models.unet.diffusers_key_map` (diffusers' own converter, so names cannot drift)."""
    from ..models.unet import diffusers_key_map

    return {lk[:-len(".weight")]: dk[:-len(".weight")] for lk, dk in diffusers_key_map(model.cfg.unet).items()
            if lk.endswith(".weight") and dk.endswith(".weight")}


def kohya_names(model: nn.Module, table: list[ModuleInfo] | None = None) -> "OrderedDict[str, str]":
    """Module name → kohya LoRA name for the UNet, the WriteNet and CLIP.

    * UNet: ``lora_unet_`` + the diffusers path with ``_`` (kohya's SD-1.5 naming, which AnyText2's
      ``ms_wrapper.merge_loras`` looks up in a diffusers UNet). AttnX gets the same rule
      (``..._attn1x_to_q``); ms_wrapper's plain SD-1.5 UNet has no such module and skips it.
    * CLIP: ``lora_te_`` + the HF ``CLIPTextModel`` path (kohya's text-encoder naming).
    * WriteNet: ``lora_control_model_`` + the ldm path (this package's convention; no kohya tool knows it).
    """
    table = table if table is not None else module_table(model)
    unet_map = _unet_diffusers_names(model)
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
    save_safetensors(path, tensors, {"format": "pt", "ss_network_module": "networks.lora",
                                     "anytext2_lcm_format": "kohya"})
    return {"modules": mergeable + skipped, "ms_wrapper_mergeable": mergeable, "skipped_by_ms_wrapper": skipped}


def from_kohya(raw: dict[str, torch.Tensor], model: nn.Module, table: list[ModuleInfo],
               source: str) -> tuple["OrderedDict[str, dict[str, torch.Tensor]]", dict[str, float]]:
    """kohya keys → (module → {"A", "B"}, module → alpha)."""
    inverse = {v: k for k, v in kohya_names(model, table).items()}
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    alphas: dict[str, float] = {}
    unknown = []
    for k, v in raw.items():
        m = KOHYA_KEY.match(k)
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
