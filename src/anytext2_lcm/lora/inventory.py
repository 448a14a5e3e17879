"""Inventory: every Linear/Conv2d of an AnyText2 with its network, part and role (see the package docstring)."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..config import ModelConfig

log = logging.getLogger(__name__)


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
    from ..models.vae import _key_maps

    with torch.device("cpu"):  # the key map feeds CPU marker tensors through diffusers; not under a meta context
        to_ldm, _ = _key_maps(cfg_key)
    return {"first_stage_model.model." + k[:-len(".weight")]: "first_stage_model." + v[:-len(".weight")]
            for k, v in to_ldm.items() if k.endswith(".weight") and v.endswith(".weight")}


def module_table(model: nn.Module) -> list[ModuleInfo]:
    """Every Linear/Conv2d of an ``AnyText2`` (any device, ``meta`` included), in ``named_modules`` order."""
    vae_names: dict[str, str] = {}
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        from ..models.vae import _cfg_key

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


