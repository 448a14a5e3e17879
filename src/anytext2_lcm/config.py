"""Typed model configuration: dataclasses, validation, named presets and the original yaml reader.

Every field carries its meaning in the docstring below it; validation happens in ``__post_init__`` and
raises :class:`ConfigError` naming the field, the value and the rule. Presets:

* ``sd15`` -- the real AnyText2 architecture (``models_yaml/anytext2_sd15.yaml``), 1.5 B parameters.
* ``tiny`` -- the architecture of the tiny parity fixtures (a few MB); used by tests, the demo and benchmarks.

``from_original_yaml(path)`` reads the original's yaml (``target:``/``params:`` structure), including the
``tiny_overrides`` section the parity fixtures add for values the original hard-codes in Python.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field and the rule."""


MAX_SEED = 2**63 - 1
"""Every seed (generation, evaluation, training, data) is an integer in 0..MAX_SEED. Torch generators take up to
2**64 - 1; the margin leaves room for the offsets added to a seed (per rank, per evaluated sample)."""


def is_seed(v: Any) -> bool:
    """An int (not a bool) in 0..:data:`MAX_SEED`."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {rule}")


def _check_finite(section: Any, name: str) -> None:
    """Every float field of a config section is finite (NaN / Inf pass many ``>`` / ``<`` rules unnoticed)."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        _check(not isinstance(v, float) or math.isfinite(v), f"{name}.{f.name}", v, "must be finite")


def _tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrunkConfig:
    """The encoder trunk the UNet and the WriteNet share (the WriteNet's must equal the UNet's, see
    :class:`ModelConfig`)."""

    in_channels: int = 4
    """Latent channels in (the WriteNet's input is a zero latent; ``masked_x`` has as many channels)."""
    model_channels: int = 320
    """Base width; level ``i`` has ``model_channels * channel_mult[i]`` channels."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multiplier per resolution level."""
    num_res_blocks: int = 2
    """ResBlocks per level in the encoder (the UNet's decoder has one more)."""
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    """Downsampling factors (1, 2, 4, ...) at which a SpatialTransformer follows each ResBlock."""
    num_heads: int = 8
    """Attention heads (``legacy=False``: head width = channels / heads)."""
    transformer_depth: int = 1
    """BasicTransformerBlocks per SpatialTransformer."""
    context_dim: int = 768
    """Width of the cross-attention context (CLIP hidden size)."""

    def _trunk_post_init(self, prefix: str) -> None:
        self.channel_mult = _tuple(self.channel_mult)
        self.attention_resolutions = _tuple(self.attention_resolutions)
        _validate_trunk(self, prefix)


@dataclass(kw_only=True)
class UNetConfig(TrunkConfig):
    """The denoising UNet (ldm ``UNetModel`` layout) with AnyText2's AttnX layers."""

    out_channels: int = 4
    """Channels out (epsilon prediction)."""
    input_attnx: bool = False
    """AttnX in the encoder (input) blocks. False in AnyText2."""
    mid_attnx: bool = True
    """AttnX in the middle block."""
    output_attnx: bool = True
    """AttnX in the decoder (output) blocks whose level is in ``output_attnx_level``."""
    output_attnx_level: tuple[int, ...] = (2, 1)
    """Resolution levels of the decoder that carry AttnX."""

    def __post_init__(self) -> None:
        self._trunk_post_init("unet")
        self.output_attnx_level = _tuple(self.output_attnx_level)
        for lv in self.output_attnx_level:
            _check(0 <= lv < len(self.channel_mult), "unet.output_attnx_level", self.output_attnx_level,
                   f"levels must lie in [0, {len(self.channel_mult) - 1}]")


@dataclass(kw_only=True)
class WriteNetConfig(TrunkConfig):
    """The WriteNet (AnyText2's text ControlNet): a copy of the UNet encoder plus glyph/position encoders; its
    context is the text prompt's."""

    glyph_channels: int = 1
    """Channels of the glyph input (the binarised union of all lines: 1)."""
    position_channels: int = 1
    """Channels of the position input (sum of all lines' masks: 1)."""
    glyph_scale: int = 1
    """1: glyph images at image resolution (3 stride-2 convs); 2: at twice the resolution (4)."""
    latent_factor: int = 8
    """Image pixels per latent pixel (the VAE's downsampling): the glyph and position encoders reduce their inputs
    by this factor, with log2(factor) stride-2 convolutions (SD: 8, three; the other strides become 1, the weights
    keep their shapes and names)."""
    fast_control: bool = True
    """The WriteNet sees a zero latent at timestep 0 (AnyText2). False is not supported."""

    def __post_init__(self) -> None:
        self._trunk_post_init("writenet")
        _check(self.glyph_scale in (1, 2), "writenet.glyph_scale", self.glyph_scale, "must be 1 or 2")
        _check(self.latent_factor in (1, 2, 4, 8), "writenet.latent_factor", self.latent_factor,
               "must be 1, 2, 4 or 8")
        _check(self.fast_control, "writenet.fast_control", self.fast_control,
               "only fast_control=True (AnyText2's released setting) is supported")
        _check(self.glyph_channels >= 1, "writenet.glyph_channels", self.glyph_channels, "must be >= 1")
        _check(self.position_channels >= 1, "writenet.position_channels", self.position_channels, "must be >= 1")

    @property
    def num_residuals(self) -> int:
        """Number of control residuals: one per encoder block plus the middle block."""
        return 1 + len(self.channel_mult) * self.num_res_blocks + (len(self.channel_mult) - 1) + 1


def _validate_trunk(cfg: Any, prefix: str) -> None:
    _check(cfg.model_channels > 0 and cfg.model_channels % 32 == 0, f"{prefix}.model_channels",
           cfg.model_channels, "must be a positive multiple of 32 (GroupNorm with 32 groups)")
    _check(len(cfg.channel_mult) >= 1 and all(m > 0 for m in cfg.channel_mult), f"{prefix}.channel_mult",
           cfg.channel_mult, "must be a non-empty list of positive integers")
    _check(cfg.num_res_blocks >= 1, f"{prefix}.num_res_blocks", cfg.num_res_blocks, "must be >= 1")
    _check(cfg.num_heads >= 1, f"{prefix}.num_heads", cfg.num_heads, "must be >= 1")
    _check(cfg.transformer_depth >= 1, f"{prefix}.transformer_depth", cfg.transformer_depth, "must be >= 1")
    _check(cfg.context_dim >= 1, f"{prefix}.context_dim", cfg.context_dim, "must be >= 1")
    for ds in cfg.attention_resolutions:
        _check(ds >= 1 and (ds & (ds - 1)) == 0, f"{prefix}.attention_resolutions", cfg.attention_resolutions,
               "entries must be powers of two (1, 2, 4, ...)")
    for m in cfg.channel_mult:
        ch = cfg.model_channels * m
        _check(ch % cfg.num_heads == 0, f"{prefix}.num_heads", cfg.num_heads,
               f"must divide every level's width ({ch})")


@dataclass(kw_only=True)
class VAEConfig:
    """The SD autoencoder (ldm ``ddconfig``), run as diffusers' ``AutoencoderKL``."""

    in_channels: int = 3
    """Image channels."""
    out_ch: int = 3
    """Decoded image channels."""
    ch: int = 128
    """Base width."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multiplier per level; the image is downsampled ``2 ** (len - 1)`` times."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (decoder: one more)."""
    z_channels: int = 4
    """Latent channels."""
    embed_dim: int = 4
    """Channels after ``quant_conv`` (equals ``z_channels`` in SD)."""
    resolution: int = 256
    """Nominal training resolution (informational)."""
    double_z: bool = True
    """The encoder outputs mean and log-variance."""
    attn_resolutions: tuple[int, ...] = ()
    """Extra attention resolutions (SD: none; only the mid-block attention exists)."""
    dropout: float = 0.0
    """Dropout (0 in SD)."""
    norm_groups: int = 32
    """GroupNorm groups (SD: 32). A narrower VAE needs fewer: with 32 channels and 32 groups every channel is
    normalised on its own, which removes each image's per-channel mean, i.e. its overall colour."""

    def __post_init__(self) -> None:
        _check_finite(self, "vae")
        self.ch_mult = _tuple(self.ch_mult)
        self.attn_resolutions = _tuple(self.attn_resolutions) if self.attn_resolutions else ()
        _check(self.norm_groups >= 1, "vae.norm_groups", self.norm_groups, "must be >= 1")
        _check(self.ch > 0 and self.ch % self.norm_groups == 0, "vae.ch", self.ch,
               f"must be a positive multiple of vae.norm_groups ({self.norm_groups})")
        _check(len(self.ch_mult) >= 1, "vae.ch_mult", self.ch_mult, "must not be empty")
        _check(not self.attn_resolutions, "vae.attn_resolutions", self.attn_resolutions,
               "must be empty (SD's VAE has attention only in the middle block)")
        _check(self.double_z, "vae.double_z", self.double_z, "must be true (KL autoencoder)")
        _check(self.z_channels == self.embed_dim, "vae.embed_dim", self.embed_dim, "must equal z_channels")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(kw_only=True)
class CLIPConfig:
    """The CLIP text encoder (transformers ``CLIPTextModel``) and its tokenizer."""

    vocab_size: int = 49408
    """Token vocabulary (CLIP BPE: 49408)."""
    hidden_size: int = 768
    """Width; the context dimension of the UNet and WriteNet."""
    intermediate_size: int = 3072
    """MLP width."""
    num_hidden_layers: int = 12
    """Transformer layers."""
    num_attention_heads: int = 12
    """Attention heads."""
    max_position_embeddings: int = 77
    """Tokens per chunk (77 = BOS + 75 + EOS)."""
    hidden_act: str = "quick_gelu"
    """MLP activation."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    tokenizer_path: str | None = None
    """Folder with ``vocab.json`` + ``merges.txt`` (e.g. a local clip-vit-large-patch14); None uses the BPE
    vocabulary that ships inside this package (the same tokenizer)."""
    placeholder: str = "*"
    """The placeholder string whose single token marks a text line."""

    def __post_init__(self) -> None:
        _check_finite(self, "clip")
        _check(self.max_position_embeddings >= 3, "clip.max_position_embeddings", self.max_position_embeddings,
               "must be >= 3")
        _check(self.hidden_size % self.num_attention_heads == 0, "clip.num_attention_heads",
               self.num_attention_heads, f"must divide hidden_size ({self.hidden_size})")


@dataclass(kw_only=True)
class OCRConfig:
    """A PP-OCRv3 recogniser (MobileNetV1Enhance + SVTR neck + CTC head) and its input preprocessing."""

    backbone_scale: float = 0.5
    """MobileNetV1Enhance width scale."""
    last_conv_stride: tuple[int, int] = (1, 2)
    """Stride of the last depthwise-separable block."""
    last_pool_type: str = "avg"
    """Final 2x2 pooling: 'avg' or 'max'."""
    neck_dims: int = 64
    """SVTR output width; the embedding projection flattens 40 x neck_dims features."""
    neck_depth: int = 2
    """SVTR blocks."""
    neck_hidden_dims: int = 120
    """SVTR block width."""
    neck_use_guide: bool = True
    """PP-OCRv3 'use_guide' flag. Informational: the original torch port's detach is a no-op, so the backbone
    still receives gradients (reproduced as is)."""
    num_classes: int = 6625
    """CTC classes (ppocr_keys_v1: 6623 characters + blank + space)."""
    image_shape: tuple[int, int, int] = (3, 48, 320)
    """Recogniser input (C, H, W)."""
    batch_size: int = 6
    """Crops per recogniser batch (the original's rec_batch_num)."""

    def __post_init__(self) -> None:
        _check_finite(self, "ocr")
        self.last_conv_stride = _tuple(self.last_conv_stride)
        self.image_shape = _tuple(self.image_shape)
        _check(self.last_pool_type in ("avg", "max"), "ocr.last_pool_type", self.last_pool_type,
               "must be 'avg' or 'max'")
        _check(len(self.image_shape) == 3 and self.image_shape[0] == 3, "ocr.image_shape", self.image_shape,
               "must be (3, H, W)")
        _check(self.batch_size >= 1, "ocr.batch_size", self.batch_size, "must be >= 1")
        _check(self.num_classes >= 2, "ocr.num_classes", self.num_classes, "must be >= 2")


@dataclass(kw_only=True)
class TextEmbeddingConfig:
    """AnyText2's text-embedding module ("embedding manager"): one token vector per text line."""

    token_dim: int = 768
    """Width of a line embedding (= CLIP hidden size; the original hard-codes 768)."""
    add_pos: bool = True
    """Add the position-mask encoder."""
    add_style_ocr: bool = True
    """Add the font (style) embedding from a trainable OCR recogniser on the font-hint crop."""
    add_color: bool = True
    """Add the colour projection."""
    enable_flag: bool = False
    """Zero the font/colour terms of lines without a font hint / with unspecified colour (False in AnyText2)."""
    placeholder: str = "*"
    """Placeholder string replaced by line embeddings."""

    def __post_init__(self) -> None:
        _check(self.token_dim >= 1, "embedding.token_dim", self.token_dim, "must be >= 1")


@dataclass(kw_only=True)
class DiffusionConfig:
    """The noise schedule and latent scaling (ldm ``DDPM`` / ``LatentDiffusion``)."""

    linear_start: float = 0.00085
    """First beta (the schedule is linear in sqrt(beta))."""
    linear_end: float = 0.012
    """Last beta."""
    timesteps: int = 1000
    """Training timesteps."""
    scale_factor: float = 0.18215
    """Latent scale: z = scale_factor * VAE posterior sample."""
    parameterization: str = "eps"
    """What the UNet predicts. Only 'eps' (AnyText2) is supported."""

    def __post_init__(self) -> None:
        _check_finite(self, "diffusion")
        _check(0 < self.linear_start < self.linear_end < 1, "diffusion.linear_start", self.linear_start,
               "need 0 < linear_start < linear_end < 1")
        _check(self.timesteps >= 2, "diffusion.timesteps", self.timesteps, "must be >= 2")
        _check(self.parameterization == "eps", "diffusion.parameterization", self.parameterization,
               "only 'eps' is supported")
        _check(self.scale_factor > 0, "diffusion.scale_factor", self.scale_factor, "must be > 0")


@dataclass(kw_only=True)
class ModelConfig:
    """The whole AnyText2 model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    """The denoising UNet with AttnX (``model.diffusion_model``)."""
    writenet: WriteNetConfig = field(default_factory=WriteNetConfig)
    """The WriteNet text ControlNet (``control_model``)."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    """The autoencoder (``first_stage_model``)."""
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    """The CLIP text encoder (``cond_stage_model``)."""
    ocr: OCRConfig = field(default_factory=OCRConfig)
    """The frozen glyph recogniser (``text_predictor``)."""
    font_ocr: OCRConfig = field(default_factory=OCRConfig)
    """The trainable font recogniser (``embedding_manager.font_predictor``)."""
    embedding: TextEmbeddingConfig = field(default_factory=TextEmbeddingConfig)
    """The text-embedding module (``embedding_manager``)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The noise schedule and latent scale."""
    name: str = "custom"
    """Preset name (informational)."""
    image_size: int = 512
    """The size the model was trained at: the default generation size (sd15 512, testbed 128, tiny 64)."""
    guidance_scale: float = 7.5
    """The classifier-free guidance scale the teacher is sampled with by default (its 20-step DDIM run everywhere:
    generate, the UI, evaluate, bench, the benchmarks). AnyText2's demo uses 7.5; the shipped testbed's 5.0 was
    chosen on a validation set of training-vocabulary lines (``defaults.teacher_sampling``)."""

    def __post_init__(self) -> None:
        u, w = self.unet, self.writenet
        for f in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions"):
            _check(getattr(u, f) == getattr(w, f), f"writenet.{f}", getattr(w, f),
                   f"must equal unet.{f} ({getattr(u, f)}): the residuals feed the UNet's skips")
        _check(u.context_dim == self.clip.hidden_size, "unet.context_dim", u.context_dim,
               f"must equal clip.hidden_size ({self.clip.hidden_size})")
        _check(w.context_dim == self.clip.hidden_size, "writenet.context_dim", w.context_dim,
               f"must equal clip.hidden_size ({self.clip.hidden_size})")
        _check(self.embedding.token_dim == self.clip.hidden_size, "embedding.token_dim", self.embedding.token_dim,
               f"must equal clip.hidden_size ({self.clip.hidden_size})")
        _check(w.latent_factor == self.vae.downsample_factor, "writenet.latent_factor", w.latent_factor,
               f"must equal the VAE's downsampling ({self.vae.downsample_factor} = 2 ** (len(vae.ch_mult) - 1))")
        _check(self.image_size > 0 and self.image_size % self.size_multiple == 0, "model.image_size", self.image_size,
               f"must be a positive multiple of {self.size_multiple}")
        g = self.guidance_scale
        _check(isinstance(g, (int, float)) and not isinstance(g, bool) and 0 < g <= 100, "model.guidance_scale", g,
               "must be a number in (0, 100]")
        _check(w.in_channels == self.vae.z_channels, "writenet.in_channels", w.in_channels,
               f"must equal vae.z_channels ({self.vae.z_channels})")
        _check(u.in_channels == self.vae.z_channels, "unet.in_channels", u.in_channels,
               f"must equal vae.z_channels ({self.vae.z_channels})")

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (latent factor x UNet downsampling)."""
        return self.latent_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        subs = {"unet": UNetConfig, "writenet": WriteNetConfig, "vae": VAEConfig, "clip": CLIPConfig,
                "ocr": OCRConfig, "font_ocr": OCRConfig, "embedding": TextEmbeddingConfig,
                "diffusion": DiffusionConfig}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in subs:
                kwargs[k] = build_dataclass(subs[k], v, k)
            elif k in ("name", "image_size", "guidance_scale"):
                kwargs[k] = v
            else:
                raise ConfigError(f"model.{k}: unknown field (known: "
                                  f"{sorted(subs) + ['guidance_scale', 'image_size', 'name']})")
        return cls(**kwargs)


def _wants_float(hint: Any) -> bool:
    return hint is float or any(a is float for a in typing.get_args(hint))


def _coerce(hint: Any, value: Any) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string; a float field takes it as the number it means."""
    if isinstance(value, str) and _wants_float(hint):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list) and typing.get_origin(hint) is tuple and _wants_float(hint):
        return [_coerce(float, v) for v in value]
    return value


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate the config dataclass ``cls`` from a mapping (a parsed YAML section), recursing into
    dataclass-typed fields; float fields take YAML's ``1e-4`` strings. The one builder of every config tree (model,
    training, recipes). Raises :class:`ConfigError` naming ``prefix.field`` for an unknown field or a bad value."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of fields, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown field (known in {prefix or 'the top level'}: "
                          f"{', '.join(sorted(names))})".lstrip("."))
    kwargs = {}
    for k, v in values.items():
        t = hints.get(k)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            kwargs[k] = build_dataclass(t, v, f"{prefix}.{k}".lstrip("."))
        else:
            kwargs[k] = _coerce(t, v)
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a required field missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def sd15() -> ModelConfig:
    """The real AnyText2 (``models_yaml/anytext2_sd15.yaml``)."""
    return ModelConfig(name="sd15")


def tiny() -> ModelConfig:
    """The architecture of the tiny parity fixtures (``reference/tiny/config.yaml``)."""
    trunk = dict(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                 num_heads=2, transformer_depth=1, context_dim=16)
    small_ocr = dict(backbone_scale=0.125, neck_depth=1, neck_hidden_dims=16, num_classes=97)
    return ModelConfig(
        name="tiny", image_size=64,
        unet=UNetConfig(**trunk, output_attnx_level=(1,)),
        writenet=WriteNetConfig(**trunk),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=64),
        clip=CLIPConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
        ocr=OCRConfig(**small_ocr),
        font_ocr=OCRConfig(**small_ocr),
        embedding=TextEmbeddingConfig(token_dim=16),
    )


def testbed() -> ModelConfig:
    """A CPU-scale AnyText2 that learns to write legible text: 128 px images, a VAE that downsamples by 4 (32 x 32
    latents), a 3-level UNet/WriteNet of width 64, a 2-layer CLIP of width 32 and small PP-OCR recognisers with the
    full 6,625-class dictionary. 11.5 M parameters; the trained weights ship inside the package in fp16
    (``anytext2-lcm generate --model testbed``) and ``configs/testbed.yaml`` retrains them from nothing."""
    trunk = dict(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                 num_heads=4, transformer_depth=1, context_dim=32)
    small_ocr = dict(backbone_scale=0.125, neck_dims=32, neck_depth=1, neck_hidden_dims=32)
    # guidance 5.0: on a validation set of training-vocabulary lines (512 images, never the held-out words) the
    # shipped weights read Latin 0.708 / 0.888 (Sen.ACC / NED) at CFG 5 against 0.678 / 0.861 at 7.5
    return ModelConfig(
        name="testbed", image_size=128, guidance_scale=5.0,
        unet=UNetConfig(**trunk, output_attnx_level=(2, 1)),
        writenet=WriteNetConfig(**trunk, latent_factor=4),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=128, norm_groups=8),
        clip=CLIPConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        ocr=OCRConfig(**small_ocr),
        font_ocr=OCRConfig(**small_ocr),
        embedding=TextEmbeddingConfig(token_dim=32),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"sd15": sd15, "tiny": tiny, "testbed": testbed}


def preset(name: str) -> ModelConfig:
    """A named preset (``sd15`` or ``tiny``)."""
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown (known: {sorted(PRESETS)})")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------------------------
# The original yaml
# ---------------------------------------------------------------------------------------------------------------

_UNSUPPORTED_EM = {"emb_type": "ocr", "big_linear": False, "add_style_conv": False, "color_big_linear": False,
                   "color_fourier_encode": False, "style_ocr_trainable": True}


def from_original_yaml(path: str | Path) -> ModelConfig:
    """Read an AnyText2 model yaml (``models_yaml/anytext2_sd15.yaml`` or a fixture's ``config.yaml``).

    Values the original hard-codes in Python (the CLIP size, the embedding width 768, the PP-OCRv3 recogniser)
    come from the optional ``tiny_overrides`` section, else from the real model's values.

    Raises:
        ConfigError: a section is missing, or it asks for a variant this package does not implement.
        FileNotFoundError: the file does not exist.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    try:
        p = doc["model"]["params"]
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: expected a 'model: params:' section (an AnyText2 model yaml)") from None
    over = doc.get("tiny_overrides") or {}

    def sect(key: str) -> dict:
        try:
            return dict(p[key]["params"])
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: model.params.{key}.params is missing") from None

    u, c, fs, em = sect("unet_config"), sect("control_stage_config"), sect("first_stage_config"), \
        sect("embedding_manager_config")
    for k, want in _UNSUPPORTED_EM.items():
        if k in em and em[k] != want:
            raise ConfigError(f"{path}: embedding_manager_config.{k}={em[k]!r} is not supported (AnyText2 uses {want!r})")

    def trunk(d: dict, name: str) -> dict:
        return _yaml_trunk(d, name, path)

    unet = UNetConfig(in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4), **trunk(u, "unet_config"),
                      input_attnx=bool(u.get("input_attnx", False)), mid_attnx=bool(u.get("mid_attnx", False)),
                      output_attnx=bool(u.get("output_attnx", False)),
                      output_attnx_level=tuple(u.get("output_attnx_level", ())))
    writenet = WriteNetConfig(in_channels=c.get("in_channels", 4), **trunk(c, "control_stage_config"),
                              glyph_channels=c.get("glyph_channels", 1), position_channels=c.get("position_channels", 1),
                              glyph_scale=c.get("glyph_scale", 1), fast_control=bool(c.get("fast_control", True)))
    dd = fs.get("ddconfig") or {}
    vae = VAEConfig(in_channels=dd.get("in_channels", 3), out_ch=dd.get("out_ch", 3), ch=dd["ch"],
                    ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"], z_channels=dd["z_channels"],
                    embed_dim=fs.get("embed_dim", dd["z_channels"]), resolution=dd.get("resolution", 256),
                    double_z=bool(dd.get("double_z", True)), attn_resolutions=tuple(dd.get("attn_resolutions", ())),
                    dropout=float(dd.get("dropout", 0.0)))
    clip_over = dict(over.get("clip_text_config") or {})
    clip = CLIPConfig(**{k: clip_over[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "max_position_embeddings", "hidden_act", "layer_norm_eps")
                         if k in clip_over})
    ocr_kwargs = _yaml_ocr_overrides(over)
    token_dim = int(over.get("embedding_manager_token_dim", 768))
    embedding = TextEmbeddingConfig(token_dim=token_dim, add_pos=bool(em.get("add_pos", False)),
                                    add_style_ocr=bool(em.get("add_style_ocr", False)),
                                    add_color=bool(em.get("add_color", False)),
                                    enable_flag=bool(em.get("enable_flag", True)),
                                    placeholder=str(em.get("placeholder_string", "*")))
    diffusion = DiffusionConfig(linear_start=float(p.get("linear_start", 0.00085)),
                                linear_end=float(p.get("linear_end", 0.012)), timesteps=int(p.get("timesteps", 1000)),
                                scale_factor=float(p.get("scale_factor", 0.18215)),
                                parameterization=str(p.get("parameterization", "eps")))
    # model.params.image_size is the latent side (SD: 64 → 512 px images)
    image_size = int(p.get("image_size", 64)) * vae.downsample_factor
    return ModelConfig(name=path.stem, unet=unet, writenet=writenet, vae=vae, clip=clip, ocr=OCRConfig(**ocr_kwargs),
                       font_ocr=OCRConfig(**ocr_kwargs), embedding=embedding, diffusion=diffusion, image_size=image_size)


def _yaml_trunk(d: dict, name: str, path: Path) -> dict:
    """The UNet/WriteNet trunk fields of an original yaml section, refusing the variants not implemented here."""
    if d.get("legacy", False):
        raise ConfigError(f"{path}: {name}.legacy=True is not supported (AnyText2 uses legacy: False)")
    if d.get("num_head_channels", -1) not in (-1, None):
        raise ConfigError(f"{path}: {name}.num_head_channels is not supported; use num_heads")
    if d.get("use_linear_in_transformer", False):
        raise ConfigError(f"{path}: {name}.use_linear_in_transformer=True is not supported")
    return dict(model_channels=d["model_channels"], channel_mult=tuple(d["channel_mult"]),
                num_res_blocks=d["num_res_blocks"], attention_resolutions=tuple(d["attention_resolutions"]),
                num_heads=d["num_heads"], transformer_depth=d.get("transformer_depth", 1),
                context_dim=d["context_dim"])


def _yaml_ocr_overrides(over: dict) -> dict:
    """``OCRConfig`` fields from a fixture yaml's ``tiny_overrides`` (the recogniser the original hard-codes)."""
    rec = over.get("ocr_recognizer_RecModel")
    out: dict[str, Any] = {}
    if rec:
        bb, nk, hd = rec.get("backbone", {}), rec.get("neck", {}), rec.get("head", {})
        out = dict(backbone_scale=bb.get("scale", 0.5), last_conv_stride=tuple(bb.get("last_conv_stride", (1, 2))),
                   last_pool_type=bb.get("last_pool_type", "avg"), neck_dims=nk.get("dims", 64),
                   neck_depth=nk.get("depth", 2), neck_hidden_dims=nk.get("hidden_dims", 120),
                   neck_use_guide=bool(nk.get("use_guide", True)), num_classes=hd.get("out_channels", 6625))
    if "rec_image_shape" in over:
        out["image_shape"] = tuple(int(v) for v in str(over["rec_image_shape"]).split(","))
    if "rec_batch_num" in over:
        out["batch_size"] = int(over["rec_batch_num"])
    return out


SIZE_MULTIPLE = 64
"""Image sides a setting may name before a model is known: multiples of 64 suit every preset (sd15 needs 64, tiny
32, testbed 16; ``ModelConfig.size_multiple``). With a model at hand, its own multiple is the rule."""


def check_image_size(value: Any, name: str, multiple: int = SIZE_MULTIPLE) -> None:
    """Reject an image side the networks cannot take: not a positive integer multiple of ``multiple``
    (:class:`ConfigError` naming ``name``)."""
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % multiple == 0, name,
           value, f"must be a positive multiple of {multiple}")


