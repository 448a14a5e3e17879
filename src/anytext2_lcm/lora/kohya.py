"""Kohya-style LoRA files (the format AnyText2's ms_wrapper merges) and the one export entry point."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError
from ..config import ConfigError
from .adapters import lora_layers
from ..atomic import save_safetensors
from .files import _KOHYA_KEY, export_merged, save_lora
from .inventory import _TRUNK_PARTS, NETWORKS, ModuleInfo, module_table

log = logging.getLogger(__name__)


# ---- kohya-style names -----------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _unet_diffusers_names(unet_cfg_json: str) -> dict[str, str]:
    """ldm UNet module path → diffusers UNet2DConditionModel path, through diffusers' own ldm converter (each
    ldm key is fed in as a unique marker and found where the converter puts it, so names cannot drift)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ..config import UNetConfig
    from ..models.unet import UNet

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
    save_safetensors(path, tensors, {"format": "pt", "ss_network_module": "networks.lora",
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
