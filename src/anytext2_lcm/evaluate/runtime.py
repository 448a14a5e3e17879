"""Inference speed and memory options that leave the model's code and weights alone.

A :class:`RuntimeOptions` is applied to a built ``AnyText2`` with :func:`apply_runtime_options`, which returns a
:class:`ModelView` (the model with some steps swapped) and a :class:`~anytext2_lcm.generation.Generator` for it.
Every option is opt-in; the ones that change numerics say so, and ``anytext2-lcm bench --variants`` measures
their effect on the outputs (PSNR against the fp32 baseline at the same seed).

================  =======================  ===================================================================
option            numerics                 what it does
================  =======================  ===================================================================
channels_last     same math (rounding)     UNet, WriteNet and VAE weights in NHWC; oneDNN/cuDNN convolutions
                                           then run in NHWC without layout conversions
vae_dtype         changes (bf16/fp16)      only the VAE in a lower precision; inputs are cast in and the
                                           output cast back, so the UNet keeps its precision
writenet_dtype    changes (bf16/fp16)      only the WriteNet (run once per image) in a lower precision, the
                                           same way; its residuals are cast back before the UNet uses them
tiny_decoder      different network        decode with diffusers' ``AutoencoderTiny`` (the TAESD design,
                                           1.2 M decoder parameters) instead of the SD VAE decoder; needs
                                           a light decoder trained for the model (``anytext2-lcm
                                           train-decoder``, :mod:`~anytext2_lcm.light_decoder`) or TAESD
                                           weights (a local folder); "random" is for timing only
compile           same math (rounding)     ``nn.Module.compile()`` (TorchInductor) on the UNet, the WriteNet
                                           and the VAE decoder, in place (state-dict keys unchanged)
offload           none                     GPU memory: only the component in use (OCR, CLIP, WriteNet, UNet,
                                           VAE) sits on the device; the others wait on the CPU
================  =======================  ===================================================================

The model dtype itself (``--dtype fp32|bf16|fp16``) is chosen when the model is built
(:func:`anytext2_lcm.commands.common.model_from_args`); bf16 on a CPU with AMX and fp16/bf16 on a GPU are the
fast settings. Attention always goes through ``F.scaled_dot_product_attention`` (the model's blocks and diffusers'
VAE), so attention slicing is not needed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..generation import Generator

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

COMPONENTS: dict[str, tuple[str, ...]] = {
    "ocr": ("embedding_manager", "text_predictor"),
    "clip": ("cond_stage_model",),
    "writenet": ("control_model",),
    "unet": ("model",),
    "vae": ("first_stage_model",),
}
"""Offload groups: the ``AnyText2`` children each pipeline step uses."""


@dataclass(kw_only=True)
class RuntimeOptions:
    """Speed / memory options (all off by default)."""

    channels_last: bool = False
    """Convolution weights in channels-last (NHWC) memory format."""
    vae_dtype: str | None = None
    """Run only the VAE in this precision ('bf16', 'fp16', 'fp32'); None: the model's dtype."""
    writenet_dtype: str | None = None
    """Run only the WriteNet in this precision (it runs once per image, not per step); None: the model's dtype."""
    tiny_decoder: str | None = None
    """Decode with an ``AutoencoderTiny``: a local diffusers folder / file with TAESD weights, or 'random'
    (untrained weights, for timing)."""
    compile: bool = False
    """``torch.compile`` the UNet, WriteNet and VAE decoder (first calls are slow while it compiles)."""
    offload: bool = False
    """Keep idle components on the CPU and move each to the execution device only while it runs."""
    separate_cfg: bool = False
    """Run CFG's cond and uncond branches as two UNet passes (as the original's sampler does) instead of one batch
    of two: lower peak activation memory, usually slower; the same outputs up to rounding."""

    def __post_init__(self) -> None:
        from ..config import ConfigError

        for name in ("vae_dtype", "writenet_dtype"):
            v = getattr(self, name)
            if v is not None and v not in DTYPES:
                raise ConfigError(f"runtime.{name}={v!r}: one of {sorted(DTYPES)} or None")

    @property
    def changes_numerics(self) -> bool:
        """True when outputs are expected to differ beyond rounding from the plain model's."""
        return self.vae_dtype is not None or self.writenet_dtype is not None or self.tiny_decoder is not None

    def label(self) -> str:
        parts = []
        if self.channels_last:
            parts.append("channels_last")
        if self.vae_dtype:
            parts.append(f"vae_{self.vae_dtype}")
        if self.writenet_dtype:
            parts.append(f"writenet_{self.writenet_dtype}")
        if self.tiny_decoder:
            parts.append("tiny_decoder" if self.tiny_decoder != "random" else "tiny_decoder(random)")
        if self.compile:
            parts.append("compile")
        if self.offload:
            parts.append("offload")
        if self.separate_cfg:
            parts.append("separate_cfg")
        return "+".join(parts) or "none"


FAST_CHANNELS_LAST = False
"""Whether ``--fast`` also converts to channels-last. Measured on a 2-core AVX512-BF16 CPU (sd15 architecture,
256 px, one thread): the 4-step student took 21.0 CPU-seconds with and without it (``bench --goal``), and a bf16
UNet pass was within 6 % (noise) of the plain one, so it stays off."""


def fast_dtype(device: torch.device) -> str:
    """The model precision of ``--fast``: fp16 on a GPU, bf16 on a CPU with native bf16 arithmetic
    (:func:`anytext2_lcm.factory.cpu_bf16_flags`), else fp32."""
    from ..factory import cpu_bf16_flags

    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_flags() else "fp32"


def fast_tokens(device: torch.device) -> tuple[str, ...]:
    """``--fast`` on ``device`` as ``bench`` variant tokens (its precision when not fp32, the light decoder, and
    channels-last when :data:`FAST_CHANNELS_LAST`)."""
    dt = fast_dtype(device)
    return ((dt,) if dt != "fp32" else ()) + ("tiny_decoder",) + (("channels_last",) if FAST_CHANNELS_LAST else ())


def light_decoder_beside(model_spec: str | None):
    """``light_decoder.safetensors`` inside the model's folder (a shipped model or a converted folder), or None."""
    from pathlib import Path

    from ..factory import resolve_path
    from ..light_decoder import FILE_NAME

    try:
        folder = resolve_path(model_spec) if model_spec else None
    except Exception:  # a shipped model whose weights are missing: the model build reports it
        return None
    if folder is None or not Path(folder).is_dir():
        return None
    path = Path(folder) / FILE_NAME
    return str(path) if path.is_file() else None


def resolve_runtime_args(args, device: torch.device, fallback_decoder: str | None = None) -> None:
    """Before any model is built: apply ``--fast`` and check ``--tiny-decoder``.

    ``--fast`` sets ``args.dtype`` (when "auto") to :func:`fast_dtype` and ``args.tiny_decoder`` (when not given) to
    the model's own light decoder (:func:`light_decoder_beside`), else ``fallback_decoder``; without either the full
    decoder stays, with a warning. The decoder is then checked (:func:`check_tiny_decoder`; its fit to the model is
    checked when it is loaded).

    Raises:
        FileNotFoundError, CheckpointError: a one-line error for the command line (exit 2).
    """
    _apply_fast(args, device, fallback_decoder)
    check_tiny_decoder(getattr(args, "tiny_decoder", None))


def _apply_fast(args, device: torch.device, fallback_decoder: str | None) -> None:
    if not getattr(args, "fast", False):
        return
    if args.dtype == "auto":
        args.dtype = fast_dtype(device)
    if FAST_CHANNELS_LAST:
        args.channels_last = True
    if args.tiny_decoder is None:
        args.tiny_decoder = light_decoder_beside(getattr(args, "model", None)) or fallback_decoder
        if args.tiny_decoder is None:
            log.warning("--fast: no light decoder for this model (pass --tiny-decoder FILE, or put the file that "
                        "`anytext2-lcm train-decoder` writes into the model's folder); decoding with the full VAE")


def add_runtime_args(p) -> None:
    """The :class:`RuntimeOptions` flags (used by ``generate``, ``evaluate`` and ``bench``)."""
    g = p.add_argument_group("speed and memory (opt-in)")
    g.add_argument("--fast", action="store_true",
                   help="the measured fast settings: bf16 on a CPU with native bf16 (fp16 on a GPU) unless --dtype "
                        "says otherwise, and the model's light decoder (--tiny-decoder, or light_decoder.safetensors "
                        "in the model's folder)")
    g.add_argument("--channels-last", action="store_true", help="convolution weights in NHWC memory format")
    g.add_argument("--vae-dtype", choices=sorted(DTYPES), default=None,
                   help="run only the VAE in this precision (changes outputs slightly; e.g. bf16 on AMX CPUs)")
    g.add_argument("--writenet-dtype", choices=sorted(DTYPES), default=None,
                   help="run only the WriteNet (once per image) in this precision (changes outputs slightly)")
    g.add_argument("--tiny-decoder", default=None, metavar="PATH|random",
                   help="decode with diffusers' AutoencoderTiny (TAESD weights from a local folder; 'random' for "
                        "timing only): a different, much cheaper decoder")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet, WriteNet and VAE decoder")
    g.add_argument("--offload", action="store_true",
                   help="GPU memory: keep idle components on the CPU, move each to the device while it runs")
    g.add_argument("--separate-cfg", action="store_true",
                   help="run CFG's cond and uncond branches as two UNet passes (as the original does) instead of "
                        "one batch of two: less activation memory, usually slower")


def check_tiny_decoder(spec: str | None) -> None:
    """Check a ``--tiny-decoder`` before any model is loaded: a missing path, a pickle (refused, never unpickled),
    a file without ``decoder.*`` tensors or with NaN/Inf weights is a one-line CheckpointError / FileNotFoundError.
    'random' and None pass."""
    from pathlib import Path

    from ..checkpoint import CheckpointError, require_finite

    if spec is None or spec == "random":
        return
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"--tiny-decoder {p} does not exist (a light-decoder file, a diffusers "
                                "AutoencoderTiny folder, or 'random')")
    if p.is_dir():
        p = p / "diffusion_pytorch_model.safetensors"
        if not p.is_file() or not (p.parent / "config.json").is_file():
            raise CheckpointError(f"--tiny-decoder {p.parent}: a diffusers folder needs config.json and "
                                  "diffusion_pytorch_model.safetensors (pickled .bin weights are refused)")
    from ..light_decoder import LightDecoderError, read_light_decoder

    try:
        state = read_light_decoder(p)[0]
    except LightDecoderError as e:
        raise CheckpointError(f"--tiny-decoder {e}") from None
    if not any(k.startswith("decoder.") for k in state):
        raise CheckpointError(f"--tiny-decoder {p}: no decoder.* tensors: not an AutoencoderTiny / light decoder")
    require_finite(state, f"--tiny-decoder {p}")


def runtime_from_args(args) -> RuntimeOptions:
    """The options of the command line; the tiny decoder is checked here, before any model is loaded."""
    check_tiny_decoder(args.tiny_decoder)
    return RuntimeOptions(channels_last=args.channels_last, vae_dtype=args.vae_dtype,
                          writenet_dtype=args.writenet_dtype, tiny_decoder=args.tiny_decoder, compile=args.compile,
                          offload=args.offload, separate_cfg=args.separate_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast_tree(v, dtype) for v in x)
    return x


def run_in_dtype(module: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype) -> list:
    """Convert ``module`` to ``dtype`` and cast its floating inputs to ``dtype`` and outputs to ``out_dtype``.

    Uses forward (pre-)hooks, so the module's code and state-dict keys stay as they are. Returns the hook handles
    (``handle.remove()`` undoes the casts, not the conversion).
    """
    module.to(dtype)

    def pre(_m, args, kwargs):
        return _cast_tree(args, dtype), {k: _cast_tree(v, dtype) for k, v in kwargs.items()}

    def post(_m, _args, out):
        return _cast_tree(out, out_dtype)

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]


def build_tiny_decoder(spec: str, device: torch.device, dtype: torch.dtype, model_cfg=None) -> nn.Module:
    """An ``AutoencoderTiny`` decoder: ``spec`` = a light-decoder file (``anytext2-lcm train-decoder``; any safetensors
    file of an ``AutoencoderTiny`` state dict), a local diffusers folder (``from_pretrained``, offline), or 'random'
    (seeded untrained weights of the light decoder sized for ``model_cfg``, for timing).

    It reads the *scaled* diffusion latent (x_0 as the sampler returns it) and returns an image in [-1, 1]. A file
    made for another latent space (channels, latent factor) is refused (:class:`~anytext2_lcm.light_decoder.
    LightDecoderError`) when ``model_cfg`` is given.
    """
    from pathlib import Path

    from diffusers import AutoencoderTiny

    from ..light_decoder import build_light_decoder, light_decoder_config, load_light_decoder, moved

    if spec == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tiny = build_light_decoder(light_decoder_config(model_cfg) if model_cfg is not None else {})
    else:
        p = Path(spec)
        if p.is_dir():
            tiny = AutoencoderTiny.from_pretrained(str(p), local_files_only=True)
        elif p.is_file():
            tiny = load_light_decoder(p, model_cfg)
        else:
            raise FileNotFoundError(f"tiny decoder {p} does not exist (a light-decoder file from train-decoder, a "
                                    "diffusers AutoencoderTiny folder, or 'random')")
    tiny.encoder = None  # only the decoder is used; frees its memory
    from ..checkpoint import require_finite

    require_finite(tiny.state_dict(), f"tiny decoder {spec}")
    return moved(tiny, device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The model view
# ---------------------------------------------------------------------------------------------------------------


class _VAEView:
    """``model.vae`` as the generator sees it: ``encode`` runs with the VAE resident (offload)."""

    def __init__(self, view: "ModelView"):
        self._view = view

    def encode(self, image: torch.Tensor):
        with self._view.using("vae"):
            return self._view.model.vae.encode(image)

    def __getattr__(self, name):
        return getattr(self._view.model.vae, name)


class ModelView:
    """An ``AnyText2`` seen through runtime options: the same methods, with a swapped decoder and/or offloading.

    Everything not overridden is delegated to the wrapped model, so a ``Generator`` or ``pipeline`` function takes
    a view where it takes a model.

    Args:
        model: the ``AnyText2`` (its weights stay where they are unless ``offload_device`` is set).
        decoder: replaces ``decode``: scaled latent (B, C, h, w) → image (B, 3, f·h, f·w) in [-1, 1] (f: the
            model's latent factor).
        offload_device: when set, components live on the CPU and each is moved to this device only while it runs.
    """

    def __init__(self, model: nn.Module, decoder: nn.Module | None = None,
                 offload_device: torch.device | None = None):
        # ``trace``: the last components used, in order (for tests and debugging; bounded for long runs)
        self.__dict__.update(model=model, decoder=decoder, offload_device=offload_device, active=None,
                             trace=collections.deque(maxlen=4096))

    def __getattr__(self, name):  # only called for attributes the view does not define
        return getattr(self.__dict__["model"], name)

    def eval(self) -> "ModelView":
        self.model.eval()
        return self

    # ---- offloading -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, component: str) -> Iterator[None]:
        """Make ``component`` (a :data:`COMPONENTS` key or 'tiny_decoder') resident on the execution device.

        Offloading swaps whole components, as diffusers' model offload does: the previous one goes back to the
        CPU when the next one is needed (not after each call, which would move the UNet at every step).
        """
        self.trace.append(component)
        if self.offload_device is None or self.active == component:
            yield
            return
        if self.active is not None:
            for m in self._modules_of(self.active):
                m.to("cpu")
        for m in self._modules_of(component):
            m.to(self.offload_device)
        self.__dict__["active"] = component
        yield

    def _modules_of(self, component: str) -> list[nn.Module]:
        if component == "tiny_decoder":
            return [self.decoder]
        return [getattr(self.model, n) for n in COMPONENTS[component]]

    def offload_all(self) -> None:
        """Move every component to the CPU (the start state of an offloaded model)."""
        for name in COMPONENTS:
            for m in self._modules_of(name):
                m.to("cpu")
        if self.decoder is not None:
            self.decoder.to("cpu")
        self.__dict__["active"] = None

    # ---- the model's steps ---------------------------------------------------------------------------------------

    @property
    def vae(self) -> _VAEView:
        return _VAEView(self)

    def line_embeddings(self, text_info, return_parts: bool = False, style_crops=None):
        with self.using("ocr"):
            return self.model.line_embeddings(text_info, return_parts=return_parts, style_crops=style_crops)

    def encode_conditions(self, img_prompts, text_prompts, lines):
        with self.using("clip"):
            return self.model.encode_conditions(img_prompts, text_prompts, lines)

    def control(self, text_context, text_info):
        with self.using("writenet"):
            return self.model.control(text_context, text_info)

    def denoise(self, *args, **kwargs):
        with self.using("unet"):
            return self.model.denoise(*args, **kwargs)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) → image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        if self.decoder is None:
            with self.using("vae"):
                return self.model.decode(z)
        with self.using("tiny_decoder"):
            p = next(self.decoder.parameters())
            out = self.decoder.decode(z.to(p.device, p.dtype)).sample
        return out.to(z.dtype)


class ViewGenerator(Generator):
    """A ``Generator`` over a :class:`ModelView` with a fixed execution device and dtype (an offloaded UNet may sit
    on the CPU between steps, so the device cannot be read from its weights)."""

    def __init__(self, model: ModelView, device: torch.device, dtype: torch.dtype, glyph_font: str | None = None,
                 batch_cfg: bool = True):
        super().__init__(model, glyph_font, batch_cfg)
        self._device = torch.device(device)
        self._dtype = dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype


def apply_runtime_options(model: nn.Module, opts: RuntimeOptions, device: torch.device | None = None,
                          generator_cls: type[ViewGenerator] = ViewGenerator, glyph_font: str | None = None
                          ) -> tuple[ModelView, ViewGenerator]:
    """Apply ``opts`` to ``model`` (in place where an option converts weights) → (view, generator).

    Args:
        model: an ``AnyText2`` on its device and dtype (with a LoRA applied or merged if any).
        device: the execution device (default: where the UNet is).
        generator_cls: a :class:`ViewGenerator` subclass to build.
    """
    p = next(model.unet.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = p.dtype
    if opts.channels_last:
        for m in (model.unet, model.control_model, model.vae):
            m.to(memory_format=torch.channels_last)
    if opts.vae_dtype is not None and DTYPES[opts.vae_dtype] != dtype:
        vdt = DTYPES[opts.vae_dtype]
        am = model.vae.model
        for sub in (am.encoder, am.quant_conv, am.post_quant_conv, am.decoder):
            run_in_dtype(sub, vdt, dtype)
        if opts.channels_last:
            model.vae.to(memory_format=torch.channels_last)
    if opts.writenet_dtype is not None and DTYPES[opts.writenet_dtype] != dtype:
        run_in_dtype(model.control_model, DTYPES[opts.writenet_dtype], dtype)
        if opts.channels_last:
            model.control_model.to(memory_format=torch.channels_last)
    decoder = None
    if opts.tiny_decoder is not None:
        ddt = DTYPES[opts.vae_dtype] if opts.vae_dtype else dtype
        decoder = build_tiny_decoder(opts.tiny_decoder, device, ddt, model.cfg)
        if opts.channels_last:
            decoder.to(memory_format=torch.channels_last)
    if opts.compile:
        for m in (model.unet, model.control_model, model.vae.model.decoder):
            m.compile()
        if decoder is not None:
            decoder.decoder.compile()
    view = ModelView(model, decoder, device if opts.offload else None)
    if opts.offload:
        view.offload_all()
    return view, generator_cls(view, device, dtype, glyph_font, batch_cfg=not opts.separate_cfg)
