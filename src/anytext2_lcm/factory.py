"""The one place that makes an ``AnyText2``: a built-in model, a converted folder, an official checkpoint, or a
randomly initialised preset. Every entry point (CLI, UI, evaluate, bench, the trainer, the recipes) calls
:func:`build_model`.

Model names (``--model NAME``, a training config's ``model.teacher: NAME``):

* ``testbed`` — the trained CPU-scale AnyText2 that ships inside the package (128 px, writes legible text;
  ``configs/testbed.yaml`` retrains it with ``anytext2-lcm testbed``);
* ``tiny`` — the parity fixtures' architecture with AnyText2's initialisation (random, a few MB; tests);
* ``sd15`` — the real architecture with random weights (speed and shape tests);
* anything else is a path: a converted folder (``anytext2-lcm convert``) or an official ``.ckpt``/``.safetensors``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from . import config as C

if TYPE_CHECKING:
    from .checkpoint import BaseWeights
from .checkpoint import (CheckpointError, check_checkpoint_file, is_converted, load_converted, load_model,
                         read_converted_config, verify_converted)

log = logging.getLogger(__name__)

SHIPPED_MODELS = ("testbed",)
"""Models whose trained weights ship inside the package (``anytext2_lcm/weights/NAME``)."""
RANDOM_MODELS = ("tiny", "sd15")
"""Presets a model name builds with random weights."""
MODEL_NAMES = SHIPPED_MODELS + RANDOM_MODELS
INITS = ("original", "default")
"""Random initialisations: "original" (AnyText2's: zero-initialised control and output layers, AttnX copied from
attention; ``models.init``) and "default" (PyTorch's, every layer non-zero: a useful random teacher)."""


def pick_device(name: str | None) -> torch.device:
    """``name`` (cpu, cuda, cuda:1, ...), else a GPU when there is one."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features with native bf16 arithmetic (oneDNN runs bf16 convolutions and matrix products on them)."""


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The :data:`CPU_BF16_FLAGS` this CPU has: from ``torch.cpu.get_capabilities()`` (cpuinfo, any OS), else from the
    ``flags`` lines of ``/proc/cpuinfo`` (Linux; ``cpuinfo`` replaces the file's text, for tests)."""
    if cpuinfo is None:
        caps = getattr(torch.cpu, "get_capabilities", None)
        if caps is not None:
            try:
                found = caps()
                return tuple(f for f in CPU_BF16_FLAGS if found.get(f))
            except RuntimeError:
                pass
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weights/compute precision: "auto" (fp16 on a GPU, fp32 on a CPU), "fp32", "fp16" (fp32 on a CPU, where fp16
    is very slow or unsupported) or "bf16".

    "auto" stays fp32 on a CPU even where it has native bf16 (:func:`cpu_bf16_flags`), where bf16 halves the time of
    a UNet pass (sd15 at 256 px: 10.3 vs 21.0 CPU-seconds for a 4-step student, ``bench --goal``) and moves its
    latents little (relative MSE 3e-5, image PSNR 52 dB to fp32): what bf16 costs in *text* has not been measured
    on a model that writes (``benchmarks/light_decoder.py`` on the testbed student measures it). Until then bf16 is
    one flag away: ``--dtype bf16``, or ``--fast`` (bf16 where the CPU has it, plus the light decoder)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if dt == torch.float16 and device.type == "cpu":
        log.warning("fp16 on the CPU is very slow or unsupported: using fp32 instead")
        return torch.float32
    return dt


def shipped_weights(name: str) -> Path:
    """The converted folder of a shipped model (:data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"{name!r} is not a shipped model (known: {', '.join(SHIPPED_MODELS)})")
    folder = Path(str(resources.files("anytext2_lcm").joinpath("weights", name)))
    if not is_converted(folder):
        raise CheckpointError(f"the {name} weights are not in this installation ({folder}); build them with "
                              f"`anytext2-lcm {name}` (see configs/{name}.yaml)")
    return folder


def random_model(preset: str, init: str = "original", seed: int = 0) -> torch.nn.Module:
    """A preset (``config.PRESETS``) with random weights from ``seed`` (fp32, CPU; the caller's RNG is untouched)."""
    from .models.anytext2 import AnyText2
    from .models.init import initialize

    if init not in INITS:
        raise C.ConfigError(f"init={init!r}: must be one of {INITS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AnyText2(C.preset(preset))
    return initialize(model, seed) if init == "original" else model


def resolve_path(spec: str) -> Path | None:
    """The file or folder a model spec loads (a shipped model's folder, or the path itself); None for a random
    preset."""
    if spec in SHIPPED_MODELS:
        return shipped_weights(spec)
    if spec in RANDOM_MODELS:
        return None
    return Path(spec)


def build_model(spec: str | None, *, preset: str | None = None, config_path: str | None = None,
                trust_pickle: bool = False, init: str = "original", seed: int = 0,
                verify: bool = False) -> torch.nn.Module:
    """An ``AnyText2`` (fp32, CPU) from a model name or path (see the module docstring).

    Args:
        spec: a name of :data:`MODEL_NAMES` or a path; None: a random ``preset``.
        preset: the architecture of a random model (``spec`` None) or of a checkpoint file (default sd15).
        config_path: the original's model yaml for a checkpoint file (instead of ``preset``).
        trust_pickle: allow a full unpickle of a ``.ckpt`` (trusted files only).
        init, seed: the random initialisation of ``tiny``/``sd15``/``spec=None`` (:func:`random_model`).
        verify: check a converted folder's sha256 sums, not only its sizes.
    Raises:
        ConfigError: ``config_path`` given for something that is not a checkpoint file, or an unknown preset.
        CheckpointError / FileNotFoundError: the weights cannot be loaded.
    """
    if spec is None or spec in RANDOM_MODELS:
        if config_path:
            raise C.ConfigError("--config only applies to a checkpoint file")
        name = spec or preset or "tiny"
        if name == "sd15" and spec is not None:
            log.warning("--model sd15 builds the real architecture with RANDOM weights (for speed/shape tests); "
                        "pass the official checkpoint or a converted folder for real images")
        return random_model(name, init, seed)
    path = resolve_path(spec)
    cfg = model_config(spec, preset=preset, config_path=config_path, trust_pickle=trust_pickle)
    if is_converted(path):
        return load_converted(path, verify=verify or spec in SHIPPED_MODELS)
    return load_model(path, cfg, trust_pickle=trust_pickle)


def model_config(spec: str | None, *, preset: str | None = None, config_path: str | None = None,
                 trust_pickle: bool = False) -> C.ModelConfig:
    """The architecture ``spec`` (as :func:`build_model` takes it) would build, found without loading any weights.

    For a checkpoint file its header and keys are checked against that architecture (a safetensors header, or a
    zip torch file through ``weights_only`` memory mapping): a pickle that needs code, a truncated, foreign or
    mismatched file is refused here, before the model is built. A converted folder's manifest is checked (sizes).

    Raises:
        ConfigError: ``config_path`` for something that is not a checkpoint file, an unknown preset.
        CheckpointError / FileNotFoundError: the weights would not load.
    """
    if spec is None or spec in RANDOM_MODELS:
        if config_path:
            raise C.ConfigError("--config only applies to a checkpoint file")
        return C.preset(spec or preset or "tiny")
    path = resolve_path(spec)
    if is_converted(path):
        if config_path:
            raise C.ConfigError("--config only applies to a checkpoint file")
        verify_converted(path)
        return read_converted_config(path)
    if not path.exists():
        raise FileNotFoundError(f"model {spec}: no such file or folder (known names: {', '.join(MODEL_NAMES)})")
    if path.is_dir():
        raise CheckpointError(f"model {spec}: a folder without manifest.json is not a converted model (convert a "
                              f"checkpoint with `anytext2-lcm convert`)")
    cfg = C.from_original_yaml(config_path) if config_path else C.preset(preset or "sd15")
    check_checkpoint_file(path, cfg, trust_pickle)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Community weights on top of a built model: an SD-1.5 base model, style LoRAs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CommunityWeights:
    """A community SD-1.5 base model and kohya style LoRAs, read and checked before any model is built
    (:func:`read_community`), applied to a built model by :func:`apply_community`."""

    base: "BaseWeights | None" = None
    styles: list = field(default_factory=list)
    """(``StyleWeights``, ratio) pairs, merged in this order."""

    def describe(self) -> dict:
        return {"base_model": self.base.source if self.base else None,
                "style_loras": [{"path": w.source, "ratio": r} for w, r in self.styles]}


def read_community(base_model: str | None = None, style_loras: Sequence = (),
                   trust_pickle: bool = False) -> CommunityWeights:
    """Read and check ``base_model`` (an ldm-layout file or a diffusers folder, :func:`~anytext2_lcm.checkpoint.
    read_base_model`) and ``style_loras`` (``StyleLora`` or ``"FILE:RATIO"`` each, :func:`~anytext2_lcm.lora.style.
    read_style_lora`): layouts, safe reading, finite values. Nothing here needs the model.

    Raises:
        ConfigError / FileNotFoundError / CheckpointError: one line naming the file and what is wrong.
    """
    from .checkpoint import read_base_model
    from .lora.style import StyleLora, read_style_lora

    loras = [x if isinstance(x, StyleLora) else StyleLora.parse(x) for x in style_loras]
    for lora in loras:
        lora.check()
    base = read_base_model(base_model, trust_pickle=trust_pickle) if base_model else None
    return CommunityWeights(base, [(read_style_lora(x.path), x.ratio) for x in loras])


def apply_community(model: torch.nn.Module, community: CommunityWeights | None) -> list[str]:
    """Replace the UNet / CLIP weights with the base model's, then merge the style LoRAs (before any student LoRA is
    loaded: the student then applies on top). Returns one summary line per step (also logged).

    Raises:
        CheckpointError: shapes or module names that do not fit the model (nothing of that file is applied).
    """
    from .checkpoint import load_base_model
    from .lora.style import merge_style_lora

    if community is None:
        return []
    out = []
    if community.base is not None:
        out.append(load_base_model(model, community.base).summary())
    for weights, ratio in community.styles:
        out.append(merge_style_lora(model, weights, ratio).summary())
    return out


__all__ = ["CommunityWeights", "INITS", "MODEL_NAMES", "apply_community", "read_community", "RANDOM_MODELS", "SHIPPED_MODELS", "build_model", "model_config", "pick_device",
           "pick_dtype", "random_model", "resolve_path", "shipped_weights"]
