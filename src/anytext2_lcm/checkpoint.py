"""Reading the official AnyText2 checkpoint, strict loading, and the fast converted folder.

* ``read_checkpoint(path)``: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` through ``torch.load(weights_only=True)``
  (a file that needs arbitrary unpickling is refused unless the caller explicitly trusts it). A Lightning-style
  top-level ``state_dict`` is unwrapped; CLIP's ``position_ids`` buffer is dropped if present.
* ``load_original(model, state_dict)``: strict — any missing, unexpected or misshaped key is an error listing them.
* The *original layout* (``model.diffusion_model.*``, ``first_stage_model.*`` in ldm names, ...) and the *native
  layout* (``first_stage_model.model.*`` in diffusers names; everything else identical) are converted by
  ``to_original`` / ``from_original``.
* ``save_converted(model, out_dir)`` / ``load_converted(out_dir)``: a folder with ``config.json``, one safetensors
  file per component (native layout) and ``manifest.json`` (sizes + sha256), written to a temporary folder and
  renamed into place only when complete. Loading checks the manifest (sizes always, sha256 with ``verify=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir, read_json, save_safetensors, write_json
from .config import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "anytext2-lcm/converted"
FORMAT_VERSION = 1
VAE_NATIVE = "first_stage_model.model."
VAE_ORIG = "first_stage_model."
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
COMPONENTS = OrderedDict([
    ("unet", "model.diffusion_model."),
    ("vae", "first_stage_model."),
    ("text_encoder", "cond_stage_model."),
    ("writenet", "control_model."),
    ("text_embedding", "embedding_manager."),
    ("ocr", "text_predictor."),
])


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: unreadable, truncated, unsafe, foreign or mismatched."""


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def safe_torch_load(path: str | Path, trust_pickle: bool = False):
    """``torch.load`` with ``weights_only=True``; refuses (without executing anything) what needs full unpickling.

    Args:
        trust_pickle: allow a full unpickle (executes code from the file). Only for files from a trusted source.
    Raises:
        CheckpointError: unreadable, truncated, or needs arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: not a weights-only torch file: it needs arbitrary unpickling, which could "
            f"execute code from the file, or it is not a checkpoint at all ({_unpickler_detail(e)}). Re-save it as "
            f"safetensors, or if you trust its source use 'anytext2-lcm convert --trust-pickle'.") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError, ... for files that are not checkpoints
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: "
                              f"{text[0][:200] if text else ''})") from None


def _unpickler_detail(e: Exception) -> str:
    """The reason line of torch's weights-only unpickler error (e.g. ``Unsupported global: GLOBAL builtins.open``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln and i + 1 < len(lines):
            return lines[i + 1][:200]
    return lines[0][:200] if lines else type(e).__name__


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` dict from ``.safetensors`` or a torch checkpoint (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    else:
        sd = safe_torch_load(path, trust_pickle=trust_pickle)
    return {k: v for k, v in tensor_dict(sd, path).items() if k not in IGNORED_KEYS}


def tensor_dict(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` inside a loaded file: the object itself or its ``state_dict`` entry (Lightning);
    anything else, or an entry that is not a tensor, is a CheckpointError naming ``path``."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entries are not tensors, e.g. {bad[:3]}")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Layout conversion
# ---------------------------------------------------------------------------------------------------------------


def to_original(native: dict[str, torch.Tensor], cfg: ModelConfig) -> "OrderedDict[str, torch.Tensor]":
    """Native state dict → original key layout, in the original ``state_dict()`` order."""
    from .models.vae import vae_to_ldm

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    vae = {k[len(VAE_NATIVE):]: v for k, v in native.items() if k.startswith(VAE_NATIVE)}
    emitted = False
    for k, v in native.items():
        if k.startswith(VAE_NATIVE):
            if not emitted:
                for lk, lv in vae_to_ldm(vae, cfg.vae).items():
                    out[VAE_ORIG + lk] = lv
                emitted = True
            continue
        out[k] = v
    return out


def from_original(original: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Original key layout → native state dict (VAE keys through diffusers' converter)."""
    from .models.vae import vae_from_ldm

    out = {k: v for k, v in original.items() if not k.startswith(VAE_ORIG)}
    vae = {k[len(VAE_ORIG):]: v for k, v in original.items() if k.startswith(VAE_ORIG)}
    if vae:
        for k, v in vae_from_ldm(vae, cfg.vae).items():
            out[VAE_NATIVE + k] = v
    return out


def original_shapes(model: torch.nn.Module) -> "OrderedDict[str, tuple[int, ...]]":
    """Key → shape of a model in the original layout (works on the ``meta`` device)."""
    return OrderedDict((k, tuple(v.shape)) for k, v in to_original(model.state_dict(), model.cfg).items())


def _summarise(keys: list[str], n: int = 12) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_keys(expected: dict[str, tuple], got: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and misshaped keys (original layout); ``got`` maps keys to
    tensors (real or meta)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {expected[k]}" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_summarise(shapes, 6)}")
        hint = ""
        if missing and not any(k.startswith("control_model.") for k in got):
            hint = " (this does not look like an AnyText2 checkpoint: it has no control_model.* keys)"
        raise CheckpointError(f"{source} does not match the model{hint}: " + "; ".join(parts))


def checkpoint_shapes(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Key → tensor of a checkpoint file without loading its weights where the format allows: meta tensors from a
    safetensors header, memory-mapped tensors from a zip torch file (``weights_only``; a pickle is refused)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder without manifest.json is not a converted model (nor a checkpoint "
                              f"file)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        return read_checkpoint(path, trust_pickle=trust_pickle)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    return {k: v for k, v in shapes.items() if k not in IGNORED_KEYS}


def expected_shapes(cfg: ModelConfig) -> "OrderedDict[str, tuple[int, ...]]":
    """Key → shape of the architecture ``cfg`` in the original layout (built on the meta device: no memory)."""
    from .models.anytext2 import AnyText2

    with torch.device("meta"):
        return original_shapes(AnyText2(cfg))


def check_checkpoint_file(path: str | Path, cfg: ModelConfig, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Check, before any model is built, that ``path`` is a readable checkpoint with exactly the keys and shapes of
    ``cfg``'s architecture (a pickle needing code, a foreign or truncated file is a CheckpointError). A file none of
    whose keys belongs to an AnyText2 component is refused from its key names alone; otherwise the keys and shapes
    are compared with the architecture built on the meta device. Returns :func:`checkpoint_shapes`."""
    got = checkpoint_shapes(path, trust_pickle)
    if not any(k.startswith(tuple(COMPONENTS.values())) for k in got):
        raise CheckpointError(f"{path}: not an AnyText2 checkpoint: none of its {len(got)} keys belongs to a "
                              f"component ({', '.join(p + '*' for p in COMPONENTS.values())})"
                              + (f", e.g. {', '.join(list(got)[:3])}" if got else ""))
    check_keys(expected_shapes(cfg), got, str(path))
    return got


def load_original(model: torch.nn.Module, original: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load an original-layout state dict into ``model`` (an ``AnyText2``)."""
    check_keys(original_shapes(model), original, source)
    native = from_original(original, model.cfg)
    model.load_state_dict(native, strict=True)
    _check_finite(model, source)


def require_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming ``source`` when a floating tensor of ``tensors`` holds NaN or Inf (weights that
    would turn every output black)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and v.device.type != "meta"
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensors hold NaN/Inf values, e.g. {bad[:3]}")


def _check_finite(model: torch.nn.Module, source: str) -> None:
    require_finite(model.state_dict(), source)


# ---------------------------------------------------------------------------------------------------------------
# Converted folders
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_converted(model: torch.nn.Module, out_dir: str | Path, extra: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a converted folder (atomic: temporary folder, manifest last, then rename).

    ``dtype``: store the components' floating-point tensors in this precision (e.g. fp16 for a model that ships
    inside the package; loading casts them back to the model's dtype). The noise schedule stays fp32."""
    out_dir = Path(out_dir)
    sd = model.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {"schedule": {}}
    for name in COMPONENTS:
        groups[name] = {}
    for k, v in sd.items():
        for name, prefix in COMPONENTS.items():
            if k.startswith(prefix):
                t = v.detach().cpu()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                groups[name][k[len(prefix):]] = t.contiguous()
                break
        else:
            groups["schedule"][k] = v.detach().contiguous().cpu()
    with atomic_dir(out_dir) as tmp:
        files = {}
        for name, tensors in groups.items():
            fn = save_safetensors(tmp / f"{name}.safetensors", tensors, metadata={"component": name})
            files[fn.name] = {"bytes": fn.stat().st_size, "sha256": sha256_file(fn), "tensors": len(tensors)}
        write_json(tmp / "config.json", {"model": model.cfg.to_dict(), **(extra or {})})
        write_json(tmp / "manifest.json", {"format": FORMAT, "version": FORMAT_VERSION,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files})
    return out_dir


def is_converted(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def read_converted_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())["model"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/config.json: unreadable ({e})") from None
    return ModelConfig.from_dict(cfg)


def verify_converted(path: str | Path, full: bool = False) -> dict:
    """Check a converted folder's manifest: every file present with the recorded size (and sha256 if ``full``)."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"{path}: no manifest.json: not a converted folder or an incomplete write")
    manifest = read_json(mf, CheckpointError, "converted-folder manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: unknown format {manifest.get('format')!r}")
    for name, info in manifest["files"].items():
        fn = path / name
        if not fn.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if fn.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{fn}: size {fn.stat().st_size} != recorded {info['bytes']} (truncated or altered)")
        if full and sha256_file(fn) != info["sha256"]:
            raise CheckpointError(f"{fn}: sha256 differs from the manifest (corrupt or altered)")
    return manifest


def load_converted(path: str | Path, verify: bool = False, device: str | torch.device = "cpu"):
    """Build and load an ``AnyText2`` from a converted folder."""
    from safetensors.torch import load_file

    from .models.anytext2 import AnyText2

    path = Path(path)
    manifest = verify_converted(path, full=verify)
    cfg = read_converted_config(path)
    model = AnyText2(cfg)
    sd: dict[str, torch.Tensor] = {}
    prefixes = dict(COMPONENTS, schedule="")
    for name in manifest["files"]:
        comp = name.removesuffix(".safetensors")
        if comp not in prefixes:
            raise CheckpointError(f"{path}: unexpected component file {name}")
        try:
            tensors = load_file(str(path / name), device=str(device))
        except Exception as e:
            raise CheckpointError(f"{path / name}: unreadable ({e})") from None
        sd.update({prefixes[comp] + k: v for k, v in tensors.items()})
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    _check_finite(model, str(path))
    return model.to(device)


def load_model(path: str | Path | None = None, config: ModelConfig | None = None, *, preset: str | None = None,
               trust_pickle: bool = False, verify: bool = False, device: str | torch.device = "cpu"):
    """Load an ``AnyText2``: a converted folder, an official checkpoint file, or a preset with random weights.

    Args:
        path: converted folder, or ``.ckpt``/``.safetensors`` in the original layout; None = random init.
        config: architecture for a checkpoint file (default: the ``sd15`` preset) or for random init.
        preset: preset name when ``config`` is not given.
    """
    from . import config as C
    from .models.anytext2 import AnyText2

    if path is not None and is_converted(path):
        return load_converted(path, verify=verify, device=device)
    cfg = config or C.preset(preset or ("sd15" if path is not None else "tiny"))
    if path is not None:  # an unusable file is refused before the (large) model is built
        sd = check_checkpoint_file(path, cfg, trust_pickle)  # a safetensors header, or the mmapped torch file
        if any(v.device.type == "meta" for v in sd.values()):
            sd = read_checkpoint(path, trust_pickle=trust_pickle)
    model = AnyText2(cfg)
    if path is not None:
        load_original(model, sd, source=str(path))
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Community SD-1.5 base models: the UNet and CLIP text weights of another checkpoint
# ---------------------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
DIFFUSERS_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
"""Weight files of a diffusers model folder, in the order they are looked for (``.bin`` through ``weights_only``)."""
BASE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class BaseWeights:
    """The UNet and CLIP text weights of a community SD-1.5 model, read and checked, not yet applied.

    Attributes:
        unet: UNet tensors, named as in ldm without ``model.diffusion_model.`` (``layout`` "ldm") or as in diffusers'
            ``UNet2DConditionModel`` ("diffusers").
        clip: CLIP text tensors in transformers' ``CLIPTextModel`` names (``text_model.*``).
        layout: "ldm" (one ``.ckpt``/``.safetensors`` file) or "diffusers" (a folder with ``unet/`` and
            ``text_encoder/``).
        ignored: tensors of the other parts the file holds (VAE, EMA copies, ...), not used (as the original).
        source: the path, for messages.
    """

    unet: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    layout: str
    ignored: int
    source: str


@dataclass
class BaseModelReport:
    """What :func:`load_base_model` changed."""

    source: str
    layout: str
    replaced: int
    """Tensors taken from the file (UNet and CLIP)."""
    kept: int
    """AnyText2-only UNet tensors (AttnX), kept from the AnyText2 model."""
    missing: list[str]
    """SD-1.5 UNet / CLIP keys the file lacks: those weights stay the AnyText2 model's."""
    unexpected: list[str]
    """Keys of the file's UNet / CLIP parts that this model does not have: not used."""
    ignored: int
    """Tensors of other parts of the file (VAE, EMA, ...): not used."""

    def summary(self) -> str:
        return (f"base model {self.source} ({self.layout} layout): {self.replaced} UNet/CLIP tensors replaced, "
                f"{self.kept} AttnX tensors kept, {len(self.missing)} missing (kept), {len(self.unexpected)} "
                f"unexpected and {self.ignored} other tensors not used")


def read_base_model(path: str | Path, trust_pickle: bool = False) -> BaseWeights:
    """Read the UNet and CLIP text weights of a community SD-1.5 model, with every check that needs no model.

    ``path``: an ldm-layout ``.safetensors`` / ``.ckpt`` (``model.diffusion_model.*``,
    ``cond_stage_model.transformer.text_model.*``; a Lightning ``state_dict`` is unwrapped) or a diffusers folder
    (``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``). Torch files are read with
    ``weights_only=True`` (a pickle that needs code is refused unless ``trust_pickle``).

    Raises:
        FileNotFoundError: no such path. CheckpointError: unreadable or unsafe file, another layout (a LoRA, a bare
            diffusers UNet file, a file without UNet or CLIP keys), NaN/Inf values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base model {path} does not exist")
    if path.is_dir():
        unet, clip = _read_diffusers_folder(path, trust_pickle)
        ignored, layout = 0, "diffusers"
    else:
        if path.suffix not in BASE_SUFFIXES:
            raise CheckpointError(f"base model {path}: expected an SD-1.5 checkpoint ({', '.join(BASE_SUFFIXES)}) "
                                  "in the ldm layout or a diffusers model folder")
        unet, clip, ignored = _split_ldm(read_checkpoint(path, trust_pickle=trust_pickle), path)
        layout = "ldm"
    require_finite(unet, f"base model {path} (UNet)")
    require_finite(clip, f"base model {path} (text encoder)")
    return BaseWeights(unet, clip, layout, ignored, str(path))


def _clip_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel`` names; keys of the layout before transformers 4.x (no ``text_model.``) are prefixed,
    the ``position_ids`` buffer is dropped."""
    out = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in tensors.items()}
    return {k: v for k, v in out.items() if not k.endswith("embeddings.position_ids")}


def _split_ldm(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict, int]:
    """(UNet without prefix, CLIP in HF names through diffusers' ``convert_ldm_clip_checkpoint``, other count)."""
    from diffusers.loaders.single_file_utils import LDM_CLIP_PREFIX_TO_REMOVE, convert_ldm_clip_checkpoint

    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    clip_keys = sum(1 for k in sd if k.startswith(tuple(LDM_CLIP_PREFIX_TO_REMOVE)))
    clip = _clip_names(convert_ldm_clip_checkpoint(sd))
    if not unet and not clip:
        raise CheckpointError(f"base model {path}: {_layout_hint(sd)}")
    return unet, clip, len(sd) - len(unet) - clip_keys


def _layout_hint(sd: dict[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "a kohya LoRA, not a base model: pass it as --style-lora FILE:RATIO"
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        return "a bare diffusers UNet file: pass the diffusers model folder (with unet/ and text_encoder/)"
    return (f"no model.diffusion_model.* or cond_stage_model.transformer.* keys: not an SD-1.5 checkpoint in the "
            f"ldm layout (its keys look like {keys[:3]})")


def _read_diffusers_folder(path: Path, trust_pickle: bool) -> tuple[dict, dict]:
    parts = {}
    for sub, names in DIFFUSERS_WEIGHTS.items():
        d = path / sub
        f = next((d / n for n in names if (d / n).is_file()), None)
        if f is None and d.is_dir() and any(d.glob("*.index.json")):
            raise CheckpointError(f"base model {d}: sharded weights are not supported; save the model with one "
                                  "file per part (diffusers save_pretrained(max_shard_size='20GB'))")
        parts[sub] = read_checkpoint(f, trust_pickle=trust_pickle) if f is not None else {}
    if not parts["unet"] and not parts["text_encoder"]:
        hint = " (a converted AnyText2 folder is a --model, not a base model)" if is_converted(path) else ""
        raise CheckpointError(f"base model {path}: not a diffusers model folder: no unet/{DIFFUSERS_WEIGHTS['unet'][0]} "
                              f"or text_encoder/{DIFFUSERS_WEIGHTS['text_encoder'][0]}{hint}")
    return parts["unet"], _clip_names(parts["text_encoder"])


def _is_attnx(key: str) -> bool:
    return ".attn1x." in key or ".attn2x." in key


def load_base_model(model: torch.nn.Module, base: BaseWeights | str | Path,
                    trust_pickle: bool = False) -> BaseModelReport:
    """Replace the SD-1.5 UNet and CLIP text weights of an ``AnyText2`` with a community model's (as the original
    ``ms_wrapper.load_base_model``); AttnX, the WriteNet, the text-embedding module, the OCR and the VAE stay.

    Strict about shapes (any mismatch is an error listing them); keys the file lacks keep the AnyText2 weights and
    keys the model lacks are not used, both reported (``BaseModelReport``, and a warning). Diffusers UNet names are
    mapped through :func:`~anytext2_lcm.models.unet.diffusers_key_map` (diffusers' own converter). Call it before
    any LoRA is applied.
    """
    from .models.unet import diffusers_key_map

    if getattr(model, "peft_config", None):
        raise RuntimeError("load_base_model: apply the base model before any LoRA adapter")
    base = base if isinstance(base, BaseWeights) else read_base_model(base, trust_pickle)
    unet, unexpected = base.unet, []
    if base.layout == "diffusers":
        inverse = {d: k for k, d in diffusers_key_map(model.cfg.unet).items()}
        unexpected = ["unet/" + k for k in unet if k not in inverse]
        unet = {inverse[k]: v for k, v in unet.items() if k in inverse}
    targets = {UNET_PREFIX: (model.unet, unet), CLIP_PREFIX: (model.cond_stage_model.transformer, base.clip)}
    loads, missing, shapes, kept = {}, [], [], 0
    for prefix, (module, tensors) in targets.items():
        own = {k: v for k, v in module.state_dict().items() if not _is_attnx(k)}
        kept += len(module.state_dict()) - len(own)
        unexpected += [prefix + k for k in tensors if k not in own]
        missing += [prefix + k for k in own if k not in tensors]
        shapes += [f"{prefix}{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                   if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
        loads[prefix] = {k: tensors[k] for k in own if k in tensors}
    if shapes:
        raise CheckpointError(f"base model {base.source} does not fit this model (an SD-2 / SDXL checkpoint, or "
                              f"another architecture?): {len(shapes)} shape mismatches: {_summarise(shapes, 4)}")
    if not any(loads.values()):
        raise CheckpointError(f"base model {base.source}: none of its {len(unexpected)} UNet/CLIP keys is a key of "
                              f"this model, e.g. {unexpected[:3]}")
    for prefix, (module, _) in targets.items():
        module.load_state_dict(loads[prefix], strict=False)  # copy_ casts to the model's dtype
    report = BaseModelReport(base.source, base.layout, sum(len(v) for v in loads.values()), kept, missing,
                             unexpected, base.ignored)
    log.info("%s", report.summary())
    if missing:
        log.warning("base model %s lacks %d UNet/CLIP keys (the AnyText2 weights stay): %s", base.source,
                    len(missing), _summarise(missing, 6))
    if unexpected:
        log.warning("base model %s: %d UNet/CLIP keys this model does not have were not used: %s", base.source,
                    len(unexpected), _summarise(unexpected, 6))
    return report
