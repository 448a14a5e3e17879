"""The whole AnyText2 model: its networks and the pure functions a sampler or trainer composes.

Children carry the original attribute names so that the official checkpoint maps onto them:
``model.diffusion_model`` (UNet + AttnX), ``first_stage_model`` (VAE), ``cond_stage_model`` (CLIP),
``control_model`` (WriteNet), ``embedding_manager`` (text-embedding module), ``text_predictor`` (frozen glyph OCR),
plus the 13 schedule buffers at the top level.

Data flow (all methods are pure: no caches, no toggles):

1. ``line_embeddings(text_info)`` → one vector per real text line (glyph OCR + position + font OCR + colour).
2. ``encode_conditions(img_prompts, text_prompts, lines)`` → (image context for the UNet, text context with the
   line embeddings spliced in, for the WriteNet).
3. ``control(text_context, text_info)`` → the WriteNet residuals; independent of x_t and t, so compute once per
   sample and branch (cond / uncond) and reuse at every step.
4. ``denoise(x_t, t, image_context, control, strength, attnx_scale)`` → ε.
5. ``decode(z)`` → image; ``encode_masked(masked_img)`` → masked_x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..conditioning import TextInfo
from ..config import ModelConfig
from ..samplers.schedule import schedule_buffers
from .ocr import RecModel
from .text_embedding import TextEmbedding
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE
from .writenet import WriteNet


class _DiffusionWrapper(nn.Module):
    """Holds the UNet under ``diffusion_model`` (the original ``DiffusionWrapper``)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.diffusion_model = unet


@dataclass
class Conditions:
    """Encoded prompts of one branch (cond or uncond).

    Attributes:
        image_context: (B, 77·k, D) CLIP context of the image prompts (UNet / AttnX cross-attention).
        text_context: (B, 77, D) CLIP context of the text prompts with line embeddings (WriteNet).
    """

    image_context: torch.Tensor
    text_context: torch.Tensor


class AnyText2(nn.Module):
    """AnyText2 (``cldm.ControlLDM``) as pure modules."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        for name, buf in schedule_buffers(cfg.diffusion).items():
            self.register_buffer(name, buf)
        self.model = _DiffusionWrapper(UNet(cfg.unet))
        self.first_stage_model = VAE(cfg.vae)
        self.cond_stage_model = TextEncoder(cfg.clip)
        self.control_model = WriteNet(cfg.writenet)
        self.embedding_manager = TextEmbedding(cfg.embedding, cfg.font_ocr)
        self.text_predictor = RecModel(cfg.ocr)
        self.text_predictor.requires_grad_(False)
        self.first_stage_model.requires_grad_(False)
        self.cond_stage_model.requires_grad_(False)

    # ---- convenience views ----------------------------------------------------------------------------------

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def writenet(self) -> WriteNet:
        return self.control_model

    @property
    def vae(self) -> VAE:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def scale_factor(self) -> float:
        return self.cfg.diffusion.scale_factor

    # ---- conditioning ---------------------------------------------------------------------------------------

    def line_embeddings(self, text_info: TextInfo, return_parts: bool = False,
                        style_crops: dict[int, torch.Tensor] | None = None):
        """Per-sample line embeddings: a list over the batch of (n_b, D) tensors (and the parts if asked).
        ``style_crops``: font-OCR inputs that replace the font-hint crops of some lines (see ``TextEmbedding``)."""
        out = self.embedding_manager(text_info, self.text_predictor, self.cfg.ocr, return_parts=return_parts,
                                     style_crops=style_crops)
        emb, parts = out if return_parts else (out, None)
        lines = list(torch.split(emb, [int(n) for n in text_info.n_lines.tolist()]))
        return (lines, parts) if return_parts else lines

    def encode_conditions(self, img_prompts: list[str], text_prompts: list[str],
                          lines: list[torch.Tensor] | None) -> Conditions:
        """Encode one branch's prompts.

        The line cursor runs through the image-prompt chunks (a placeholder there takes a line, as in the
        original) and restarts at 0 for the text prompt.
        """
        if len(img_prompts) != len(text_prompts):
            raise ValueError(f"{len(img_prompts)} image prompts but {len(text_prompts)} text prompts")
        image_context, _ = self.text_encoder.encode_image_prompts(img_prompts, lines)
        text_context = self.text_encoder.encode_text_prompts(text_prompts, lines)
        return Conditions(image_context, text_context)

    def control(self, text_context: torch.Tensor, text_info: TextInfo) -> list[torch.Tensor]:
        """WriteNet residuals (unscaled) for a text context and the text conditioning."""
        return self.control_model(text_context, text_info.glyphs, text_info.positions, text_info.masked_x)

    # ---- denoising ------------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, t: torch.Tensor, image_context: torch.Tensor,
                control: list[torch.Tensor] | None, strength: float | list[float] = 1.0,
                attnx_scale: float = 1.0, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ε prediction.

        Args:
            x: (B, 4, h, w) noisy latent.
            t: (B,) or scalar integer timestep(s).
            image_context: (B, 77·k, D).
            control: WriteNet residuals or None (no text control).
            strength: control scale (one value, or one per residual as the original's ``control_scales``).
            attnx_scale: AttnX strength.
            context_mask: (B, 77·k) bool valid-token mask of a padded ``image_context`` (None: no padding).
        """
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if control is not None:
            scales = strength if isinstance(strength, (list, tuple)) else [strength] * len(control)
            if len(scales) < len(control):
                raise ValueError(f"strength: {len(scales)} scales for {len(control)} residuals")
            control = [c * s for c, s in zip(control, scales)]
        return self.unet(x, t, image_context, control, attnx_scale, context_mask)

    # ---- latents ----------------------------------------------------------------------------------------------

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) → image (B, 3, 8h, 8w), nominally in [-1, 1] (``decode_first_stage``)."""
        return self.vae.decode(z / self.scale_factor)

    def encode_masked(self, image: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] → scale_factor × posterior sample (or mean if ``sample`` is False)."""
        mean, logvar = self.vae.encode(image)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * mean
