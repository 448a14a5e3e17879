"""Adapters through PEFT: inject, freeze, disable for the teacher pass, scale, merge / unmerge."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn

from ..config import ConfigError
from .inventory import ModuleInfo, _base_of
from .targets import parse_preset_expression, resolve_targets

log = logging.getLogger(__name__)


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
        for name in ("alpha", "dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"lora.{name}={v!r}: must be a finite number")
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
             sum(1 for m in lora_layers(model).values() if spec.adapter_name in m.lora_A), n)
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


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str):
    """Run with one of several loaded adapters active (the others bypassed), e.g. several students of one teacher
    in one model. The previous active adapters and the ``requires_grad`` flags come back on exit.

    Raises:
        KeyError: the model has no adapter ``adapter_name``. RuntimeError: a LoRA is merged.
    """
    layers = list(lora_layers(model).values())
    if adapter_name not in adapter_names(model):
        raise KeyError(f"the model has no LoRA adapter {adapter_name!r} (has {adapter_names(model)})")
    if any(layer.merged for layer in layers):
        raise RuntimeError("use_adapter: a LoRA is merged into the weights; unmerge_lora(model) first")
    flags = [(p, p.requires_grad) for layer in layers for name in layer.adapter_layer_names
             for p in getattr(layer, name).parameters()]
    before = [list(layer.active_adapters) for layer in layers]
    for layer in layers:
        layer.set_adapter([adapter_name] if adapter_name in layer.lora_A else [])
    try:
        yield model
    finally:
        for layer, names in zip(layers, before):
            layer.set_adapter(names)
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
