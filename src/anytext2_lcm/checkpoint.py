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
import os
import pickle
import shutil
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

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
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it needs arbitrary unpickling, which could execute code from the file "
            f"({str(e).splitlines()[0][:200]}). Re-save it as safetensors, or if you trust its source use "
            f"'anytext2-lcm convert --trust-pickle'.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


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
    """Raise CheckpointError listing missing, unexpected and misshaped keys (original layout)."""
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


def load_original(model: torch.nn.Module, original: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load an original-layout state dict into ``model`` (an ``AnyText2``)."""
    check_keys(original_shapes(model), original, source)
    native = from_original(original, model.cfg)
    model.load_state_dict(native, strict=True)
    _check_finite(model, source)


def _check_finite(model: torch.nn.Module, source: str) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensors hold NaN/Inf values, e.g. {bad[:3]}")


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
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
    files = {}
    for name, tensors in groups.items():
        fn = tmp / f"{name}.safetensors"
        save_file(tensors, str(fn), metadata={"component": name})
        files[fn.name] = {"bytes": fn.stat().st_size, "sha256": sha256_file(fn), "tensors": len(tensors)}
    (tmp / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), **(extra or {})}, indent=1))
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
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
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: corrupt manifest ({e})") from None
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
    model = AnyText2(cfg)
    if path is not None:
        sd = read_checkpoint(path, trust_pickle=trust_pickle)
        load_original(model, sd, source=str(path))
    return model.to(device)
