"""Adapter files: PEFT folders, single safetensors files, loading with checks, the merged original-layout export."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_dir, read_json, save_safetensors, torch_save, write_json
from ..checkpoint import CheckpointError, require_finite, safe_torch_load, tensor_dict, to_original
from ..config import ConfigError
from .adapters import _freeze_to_lora, _is_meta, adapter_names, lora_layers, set_lora_scale
from .inventory import ModuleInfo, _base_of, module_table
from .kohya import KOHYA_KEY, export_kohya, from_kohya

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "anytext2-lcm/lora"
PEFT_PREFIX = "base_model.model."
"""Key prefix of ``PeftModel.save_pretrained`` folders (the model sits at ``PeftModel.base_model.model``)."""
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
STUDENT_INFO = "anytext2_student.json"
"""A student adapter folder's record of how it was made and is sampled (``{"method", "sampling", ...}``); in a
single ``.safetensors`` file the same entries are metadata keys (``sampling`` as JSON)."""


# ---------------------------------------------------------------------------------------------------------------
# 4. Files
# ---------------------------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")


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


def save_lora(model: nn.Module, path: str | Path, adapter_name: str = "default", scale: float = 1.0,
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save the adapter: a PEFT folder, or one file when ``path`` ends in ``.safetensors``.

    Folder: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` as
    ``PeftModel.save_pretrained`` writes) + ``adapter_config.json`` (+ ``metadata`` as :data:`STUDENT_INFO`).
    File: root-relative keys, and the metadata holds ``format``, the ``peft_config`` JSON and ``metadata``. ``scale`` ≠ 1 is baked into lora_B (ΔW is
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
        save_safetensors(path, sd, meta)
        return path
    with atomic_dir(path) as tmp:
        save_safetensors(tmp / ADAPTER_WEIGHTS[0], {PEFT_PREFIX + k: v for k, v in sd.items()}, {"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, _config_json(config), indent=2, sort_keys=True)
        if metadata:
            write_json(tmp / STUDENT_INFO, _decode_info(metadata), indent=2, sort_keys=True)
    return path


def _decode_info(metadata: dict[str, str]) -> dict:
    """String metadata → values (entries that are JSON are decoded: ``sampling`` is an object)."""
    out = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def adapter_info(path: str | Path) -> dict:
    """What a student adapter records about itself (``method``, ``sampling`` = ``defaults.Sampling`` as a dict,
    ...): :data:`STUDENT_INFO` of a folder, the metadata of a ``.safetensors`` file; ``{}`` when it records
    nothing (an adapter from elsewhere)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        f = path / STUDENT_INFO
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: corrupt ({e})") from None
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own types for bad headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    for k in ("format", "version", "peft_config"):
        meta.pop(k, None)
    return _decode_info(meta)


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
        config = read_json(cfg_file, CheckpointError, "adapter config")
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
        sd = safe_torch_load(path)
    return tensor_dict(sd, path), config


def check_adapter_file(path: str | Path) -> None:
    """Check an adapter without a model, before one is loaded: readable, safe (a pickle that needs code is refused,
    not run), LoRA A/B (or kohya) weights, all finite. Whether it fits the model is checked by :func:`load_lora`.

    Raises:
        FileNotFoundError / CheckpointError: the message names the file and what is wrong.
    """
    raw, _ = _read_adapter(Path(path))
    if not raw:
        raise CheckpointError(f"{path}: holds no LoRA weights")
    require_finite(raw, str(path))
    if not any(KOHYA_KEY.match(k) for k in raw):
        _group_peft_keys(raw, str(path))


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
    from peft import inject_adapter_in_model

    path = Path(path)
    source = str(path)
    if adapter_name in adapter_names(model):
        raise CheckpointError(f"{source}: the model already has an adapter named {adapter_name!r}")
    raw, config_dict = _read_adapter(path)
    require_finite(raw, source)
    table = module_table(model)
    by_name = {m.name: m for m in table}
    if any(KOHYA_KEY.match(k) for k in raw):
        groups, alphas = from_kohya(raw, model, table, source)
    else:
        groups, alphas = _group_peft_keys(raw, source), {}
    if not groups:
        raise CheckpointError(f"{source}: holds no LoRA weights")

    missing = [n for n in groups if n not in by_name]
    if missing:
        raise CheckpointError(
            f"{source}: the adapter targets {len(missing)} modules this model lacks, e.g. {missing[:3]} "
            f"(an adapter for another architecture or preset?)")

    config = _adapter_config(config_dict, groups, alphas, source)
    _check_shapes(groups, by_name, config, source)

    # Inject exactly the modules the weights name (a config's suffix list could match more).
    config.target_modules = list(groups)
    config.exclude_modules = None
    config.inference_mode = True
    meta = _is_meta(model)
    inject_adapter_in_model(config, model, adapter_name=adapter_name, low_cpu_mem_usage=meta)
    _place_weights(model, groups, adapter_name, meta, source)
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


def _adapter_config(config_dict: dict | None, groups: dict, alphas: dict, source: str):
    """The adapter's ``LoraConfig``: from its recorded config, else from the weights (r from the shapes, the most
    common rank and alpha as defaults and the others as patterns; alpha = r where the file records none)."""
    from peft import LoraConfig

    ranks = {n: int(g["A"].shape[0]) for n, g in groups.items()}
    if config_dict is not None:
        if str(config_dict.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"{source}: a {config_dict.get('peft_type')} adapter, not LoRA")
        config = LoraConfig.from_peft_type(**{k: v for k, v in config_dict.items() if k != "peft_type"})
        if config.use_dora:
            raise CheckpointError(f"{source}: DoRA adapters are not supported")
        return config
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r0)
    if not alphas:
        log.warning("%s: no adapter config; using r=%d from the weights and alpha=r (scale 1)", source, r0)
    return LoraConfig(r=r0, lora_alpha=alpha0,
                      rank_pattern={n: r for n, r in ranks.items() if r != r0},
                      alpha_pattern={n: a for n, a in alphas.items() if a != alpha0})


def _check_shapes(groups: dict, by_name: dict, config, source: str) -> None:
    """Every lora_A / lora_B shape against both the model's module and the config's rank (rank_pattern included)."""
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


def _place_weights(model: nn.Module, groups: dict, adapter_name: str, meta: bool, source: str) -> None:
    """Put the checked weights into the injected PEFT layers (through PEFT, or directly on a meta-device model)."""
    from peft import set_peft_model_state_dict

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
        save_safetensors(path, sd, {"format": "pt", "layout": "anytext2-original", "model": str(model.cfg.name)})
    else:
        torch_save(path, {"state_dict": sd})
    return path


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
