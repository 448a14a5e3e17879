"""Community style LoRAs: kohya / sd-scripts SD-1.5 files merged into the weights at a ratio, as the original
``ms_wrapper.merge_loras`` does.

A file holds ``<name>.lora_down.weight`` (A: (r, in) for a Linear, (r, in, k, k) for a Conv2d, LoCon's 3x3 down
included), ``<name>.lora_up.weight`` (B: (out, r) or (out, r, 1, 1)) and optionally ``<name>.alpha`` (default r)
for module names ``lora_unet_<diffusers UNet path>`` and ``lora_te_<transformers CLIP path>`` with ``_`` for ``.``.
The names are mapped by :func:`~anytext2_lcm.lora.kohya.kohya_names` (diffusers' own UNet converter, so AttnX,
the WriteNet and the other AnyText2 parts are never touched by a community file).

Merging: W ← W + ratio · (alpha / r) · ΔW with ΔW = B A for a Linear and a 1x1 conv, and for a k x k conv the
composition ``conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)``: kohya's rule, which is also PEFT's
``get_delta_weight``. The few lines are written here rather than loading the file as a PEFT adapter and merging
it: PEFT keeps a merged adapter in its layers' bookkeeping, which would then mark the student adapter's layers as
merged too (and block ``disable_adapters`` and ``set_lora_scale`` for the student). The merge goes into the base
weight of a layer whether or not a PEFT student wraps it, so a style LoRA and the student combine in any order;
the CLI and the UI merge the styles first, then load the student on top.

Every community file is read through :func:`~anytext2_lcm.checkpoint.read_checkpoint` (safetensors, or
``torch.load(weights_only=True)``: a pickle that needs code is refused).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, read_checkpoint, require_finite
from ..config import ConfigError
from .kohya import KOHYA_KEY, kohya_names

log = logging.getLogger(__name__)

STYLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_KOHYA_OTHER = re.compile(r"^lora_[A-Za-z0-9_]+\.(?P<part>.+)$")
_UNSUPPORTED = {"lora_mid": "LoCon with Tucker decomposition (lora_mid)", "hada_": "LyCORIS LoHa",
                "lokr_": "LyCORIS LoKr", "dora_scale": "DoRA", "diff": "LyCORIS full-difference",
                "oft_": "OFT", "on_input": "IA3"}


@dataclass(frozen=True)
class StyleLora:
    """One ``--style-lora FILE:RATIO``."""

    path: str
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not math.isfinite(self.ratio):
            raise ConfigError(f"style LoRA {self.path}: ratio {self.ratio!r} must be a finite number")

    @classmethod
    def parse(cls, text: str) -> "StyleLora":
        """``FILE:RATIO`` (the ratio after the last ``:``), e.g. ``watercolor.safetensors:0.8``."""
        path, sep, ratio = str(text).rpartition(":")
        try:
            value = float(ratio)
        except ValueError:
            value = None
        if not sep or not path or value is None:
            raise ConfigError(f"--style-lora {text!r}: expected FILE:RATIO, e.g. style.safetensors:0.8")
        return cls(path, value)

    def check(self) -> None:
        """The file exists and has a LoRA file's extension (before anything is read)."""
        p = Path(self.path)
        if not p.is_file():
            raise FileNotFoundError(f"style LoRA {p} does not exist")
        if p.suffix not in STYLE_SUFFIXES:
            raise ConfigError(f"style LoRA {p}: expected a kohya LoRA file ({', '.join(STYLE_SUFFIXES)})")


@dataclass
class StyleWeights:
    """A kohya LoRA file read and checked: kohya module name → (down, up, alpha)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    source: str


@dataclass
class StyleReport:
    """What :func:`merge_style_lora` merged."""

    source: str
    ratio: float
    modules: int
    unet: int
    text_encoder: int
    ranks: list[int] = field(default_factory=list)

    def summary(self) -> str:
        ranks = sorted(set(self.ranks))
        return (f"style LoRA {self.source} merged at {self.ratio:g}: {self.modules} modules ({self.unet} UNet, "
                f"{self.text_encoder} text encoder), rank {'/'.join(map(str, ranks))}")


def _unsupported(part: str) -> str | None:
    for marker, what in _UNSUPPORTED.items():
        if part.startswith(marker):
            return what
    return None


def _group_keys(raw: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    foreign, unsupported = [], []
    for k, v in raw.items():
        m = KOHYA_KEY.match(k)
        if m:
            groups.setdefault(m.group("module"), {})[m.group("part").split(".")[0]] = v
            continue
        other = _KOHYA_OTHER.match(k)
        (unsupported if other else foreign).append((k, _unsupported(other.group("part")) if other else None))
    if foreign:
        raise CheckpointError(f"style LoRA {source}: not a kohya LoRA file ({len(foreign)} keys outside the "
                              f"lora_unet_*/lora_te_* .lora_down/.lora_up/.alpha layout, e.g. "
                              f"{[k for k, _ in foreign[:3]]})")
    if unsupported:
        kinds = sorted({what or "unknown parts" for _, what in unsupported})
        raise CheckpointError(f"style LoRA {source}: {', '.join(kinds)} is not supported, only plain LoRA / LoCon "
                              f"(lora_down, lora_up, alpha); e.g. {unsupported[0][0]}")
    if not groups:
        raise CheckpointError(f"style LoRA {source}: holds no LoRA weights")
    return groups


def read_style_lora(path: str | Path) -> StyleWeights:
    """Read and check a kohya LoRA file without a model: the layout (plain LoRA / LoCon keys only), complete pairs,
    ranks that agree between down and up, 2-d or 4-d weights, finite values.

    Raises:
        FileNotFoundError / CheckpointError (one line naming the file and what is wrong).
    """
    path = Path(path)
    raw = read_checkpoint(path)
    source = str(path)
    groups = _group_keys(raw, source)
    require_finite(raw, f"style LoRA {source}")
    out, bad = {}, []
    for name, g in groups.items():
        if "lora_down" not in g or "lora_up" not in g:
            bad.append(f"{name}: lora_down or lora_up missing")
            continue
        down, up = g["lora_down"], g["lora_up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or down.shape[0] != up.shape[1] \
                or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            bad.append(f"{name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not form a LoRA")
            continue
        alpha = g.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            bad.append(f"{name}: alpha of shape {tuple(alpha.shape)} is not one number")
            continue
        out[name] = (down, up, float(alpha.item()) if alpha is not None else float(down.shape[0]))
    if bad:
        raise CheckpointError(f"style LoRA {source}: {len(bad)} malformed modules: " + "; ".join(bad[:3]))
    return StyleWeights(out, source)


def lora_delta(down: torch.Tensor, up: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """ΔW = up ∘ down for a weight of ``weight_shape`` (kohya's merge rule, in fp32): (out, in) for a Linear,
    (out, in, k, k) for a Conv2d (1x1: a matrix product; k x k LoCon: the composition of the two convolutions)."""
    down, up = down.float(), up.float()
    if len(weight_shape) == 2:
        return up @ down
    if tuple(down.shape[2:]) == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def _check_shapes(name: str, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> str | None:
    out_f, in_f = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    want_down = (down.shape[0], in_f, *kernel)
    ok_down = tuple(down.shape) == want_down or (kernel == (1, 1) and tuple(down.shape) == want_down[:2] + (1, 1))
    want_up = (out_f, down.shape[0], *((1, 1) if kernel else ()))
    if ok_down and tuple(up.shape) == want_up:
        return None
    return (f"{name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit the weight "
            f"{tuple(weight.shape)}")


def merge_style_lora(model: nn.Module, style: StyleWeights | str | Path, ratio: float = 1.0) -> StyleReport:
    """Merge a kohya LoRA into the UNet / CLIP weights of an ``AnyText2`` at ``ratio`` (see the module docstring).

    Raises:
        CheckpointError: the file names modules this model lacks (an SDXL or SD-2 LoRA?), or a weight does not fit
            its module's shape; nothing is changed then.
    """
    from .inventory import _base_of

    if not math.isfinite(float(ratio)):
        raise ConfigError(f"style LoRA ratio {ratio!r}: must be a finite number")
    style = style if isinstance(style, StyleWeights) else read_style_lora(style)
    inverse = {v: k for k, v in kohya_names(model).items() if not v.startswith("lora_control_model")}
    unknown = [n for n in style.modules if n not in inverse]
    if unknown:
        raise CheckpointError(f"style LoRA {style.source}: {len(unknown)} of {len(style.modules)} modules are not "
                              f"SD-1.5 UNet / text-encoder modules of this model (an SDXL or SD-2 LoRA?), e.g. "
                              f"{unknown[:3]}")
    weights = {n: _base_of(model.get_submodule(inverse[n])).weight for n in style.modules}
    bad = [e for n, (down, up, _) in style.modules.items() if (e := _check_shapes(n, weights[n], down, up))]
    if bad:
        raise CheckpointError(f"style LoRA {style.source} does not fit this model: {len(bad)} shape mismatches: "
                              + "; ".join(bad[:3]))
    with torch.no_grad():
        for n, (down, up, alpha) in style.modules.items():
            w = weights[n]
            delta = lora_delta(down, up, w.shape) * (float(ratio) * alpha / down.shape[0])
            w.add_(delta.to(device=w.device, dtype=w.dtype))
    unet = sum(1 for n in style.modules if n.startswith("lora_unet_"))
    report = StyleReport(style.source, float(ratio), len(style.modules), unet, len(style.modules) - unet,
                         [int(d.shape[0]) for d, _, _ in style.modules.values()])
    log.info("%s", report.summary())
    return report


def merge_style_loras(model: nn.Module, loras: Sequence[StyleLora]) -> list[StyleReport]:
    """Merge several style LoRAs, each at its ratio, in order (the result does not depend on the order)."""
    return [merge_style_lora(model, lora.path, lora.ratio) for lora in loras]


__all__ = ["STYLE_SUFFIXES", "StyleLora", "StyleReport", "StyleWeights", "lora_delta", "merge_style_lora",
           "merge_style_loras", "read_style_lora"]
