"""AnyText2's text-embedding module (the original ``EmbeddingManager``): one token vector per text line.

For every real line (sample-major, line-minor, :meth:`TextInfo.lines`) the embedding is the sum, in this order,

    e = proj(flatten(glyph-OCR neck of gly_line))             glyph term      (frozen ``text_predictor``)
      + position_encoder(position mask)                       position term   (EncodeNet)
      + style_proj(flatten(font-OCR neck of the font crop))   font term       (trainable ``font_predictor``)
      + color_proj(rgb * 255)                                 colour term

where the font crop is :func:`~anytext2_lcm.models.ocr.crop_by_mask` of the font-hint canvas under the line's
position mask. With ``enable_flag`` False (AnyText2's setting) nothing is masked: a blank crop and the
"unspecified" colour (500, 500, 500) still contribute. With it True, the font term is zeroed for blank crops and
the colour term for colours whose mean lies outside [0, 1].

Unlike the original, this module holds no state between calls: :meth:`TextEmbedding.forward` returns the line
embeddings and the caller (the CLIP placeholder splice) decides where they go. The placeholder substitution and
its cursor live with the text encoder.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from anytext2_lcm.conditioning import TextInfo
from anytext2_lcm.config import OCRConfig, TextEmbeddingConfig
from anytext2_lcm.models.ocr import RecModel, crop_by_mask, output_length, recognize

__all__ = ["EncodeNet", "TextEmbedding", "split_by_sample"]


class EncodeNet(nn.Module):
    """Position-mask encoder. (N, C_in, H, W) -> (N, C_out).

    3x3 conv to 16 channels, four stride-2 3x3 convs doubling the width (16 -> 256), a 3x3 conv to C_out, SiLU
    after every conv, then a global average. Keys: ``conv1``, ``conv_list.{0..3}``, ``conv2``.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16, n_down: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv_list = nn.ModuleList(nn.Conv2d(width * 2 ** i, width * 2 ** (i + 1), 3, stride=2, padding=1)
                                       for i in range(n_down))
        self.conv2 = nn.Conv2d(width * 2 ** n_down, out_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv1(x))
        for conv in self.conv_list:
            x = self.act(conv(x))
        x = self.act(self.conv2(x))
        return self.avgpool(x).flatten(1)


def _proj(in_features: int, dim: int) -> nn.Sequential:
    # Linear + LayerNorm; the original zero-initialises the Linear so a fresh term starts as the LayerNorm bias.
    lin = nn.Linear(in_features, dim)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(lin, nn.LayerNorm(dim))


def split_by_sample(embeddings: Tensor, n_lines) -> list[Tensor]:
    """Split (N, D) line embeddings into a list of B tensors (n_lines[b], D), in sample order."""
    counts = [int(n) for n in (n_lines.tolist() if isinstance(n_lines, Tensor) else n_lines)]
    if sum(counts) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} line embeddings but n_lines={counts} sums to {sum(counts)}")
    return list(torch.split(embeddings, counts))


class TextEmbedding(nn.Module):
    """The embedding manager's weights and its line-embedding computation.

    Children, in the original's registration order (so the state-dict keys equal ``embedding_manager.*``):
    ``position_encoder`` (EncodeNet 1 -> D), ``font_predictor`` (a full :class:`RecModel`), ``style_proj``
    [Linear T*neck_dims -> D, LayerNorm], ``color_proj`` [Linear 3 -> D, LayerNorm], ``proj`` [Linear
    T*neck_dims -> D, LayerNorm], with T = 40 sequence steps and D = ``cfg.token_dim``.

    Args:
        cfg: the module's switches and width.
        font_ocr: architecture of the font recogniser. Its feature size (T x neck_dims) also sizes ``proj``: the
            original hard-codes 40 x 64 for both, and the glyph recogniser must produce the same size.
    """

    def __init__(self, cfg: TextEmbeddingConfig, font_ocr: OCRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.font_ocr = font_ocr
        dim = cfg.token_dim
        feat = output_length(font_ocr) * font_ocr.neck_dims
        if cfg.add_pos:
            self.position_encoder = EncodeNet(1, dim)
        if cfg.add_style_ocr:
            self.font_predictor = RecModel(font_ocr)
            self.style_proj = _proj(feat, dim)
        if cfg.add_color:
            self.color_proj = _proj(3, dim)
        self.proj = _proj(feat, dim)

    # -----------------------------------------------------------------------------------------------------------

    def forward(self, text_info: TextInfo, glyph_recognizer: RecModel, glyph_ocr_cfg: OCRConfig,
                return_parts: bool = False, style_crops: dict[int, Tensor] | None = None):
        """Line embeddings of the real lines of a batch.

        Args:
            text_info: the batch's lines (see :mod:`anytext2_lcm.conditioning`); ``gly_line`` and ``positions``
                in {0, 1}, ``font_hint`` in [0, 1], ``colors`` = RGB / 255.
            glyph_recognizer: the frozen ``text_predictor``. It is run in eval mode without gradients (the
                original forces eval); its own mode is restored afterwards.
            glyph_ocr_cfg: its preprocessing settings (input shape, batch size).
            return_parts: also return the intermediates (see below).
            style_crops: line index j → (3, h, w) font-OCR input in 0..255 used for line j of every sample instead
                of the crop of the font-hint canvas (the original's ``font_hint_mimic_imgs``: a font mimicked from
                an image region, :func:`~anytext2_lcm.data.hints.mimic_font_crop`).

        Returns:
            (N, D) embeddings, N = ``sum(n_lines)``, ordered as ``text_info.lines()``; with ``return_parts`` a
            tuple (embeddings, parts) where parts maps ``ocr_glyph_neck`` (N, T, neck), ``glyph_proj`` (N, D),
            ``pos_enc`` (N, D), ``style_neck`` (N, T, neck), ``style_proj`` (N, D; after enable_flag masking),
            ``color_input_rgb`` (N, 3) in 0..255 (500 = unspecified), ``color_proj`` (N, D; after masking),
            ``text_predictor_{input,ctc,neck}_batch0`` and ``font_predictor_input_batch0`` (the first recogniser
            batch, in its sorted order) to tensors. Terms that are switched off are absent. Zero lines give an
            empty (0, D) tensor and empty parts.
        """
        lines = text_info.lines()
        ref = self.proj[0].weight
        if not lines:
            empty = torch.zeros(0, self.cfg.token_dim, device=ref.device, dtype=ref.dtype)
            return (empty, {}) if return_parts else empty
        parts: dict[str, Tensor] = {}

        # Glyph term: the frozen recogniser on each line's 80x512 rendering.
        gly_imgs = [self._to_ocr_image(text_info.gly_line[b, j]) for b, j in lines]
        was_training = glyph_recognizer.training
        glyph_recognizer.eval()
        try:
            with torch.no_grad():
                _, glyph_neck, gly_batches = recognize(glyph_recognizer, gly_imgs, glyph_ocr_cfg, return_batches=True)
        finally:
            glyph_recognizer.train(was_training)
        self._check_features(glyph_neck, "glyph recogniser")
        emb = self.proj(glyph_neck.reshape(len(lines), -1).to(ref.dtype))
        parts.update(ocr_glyph_neck=glyph_neck, glyph_proj=emb, text_predictor_input_batch0=gly_batches[0].input,
                     text_predictor_ctc_batch0=gly_batches[0].ctc, text_predictor_neck_batch0=gly_batches[0].neck)

        if self.cfg.add_pos:
            pos = self.position_encoder(torch.stack([text_info.positions[b, j] for b, j in lines]).to(ref.dtype))
            parts["pos_enc"] = pos
            emb = emb + pos

        if self.cfg.add_style_ocr:
            style = self._style_term(text_info, lines, parts, style_crops or {})
            emb = emb + style

        if self.cfg.add_color:
            colors = torch.stack([text_info.colors[b, j] for b, j in lines])  # (N, 3), RGB / 255
            rgb = colors.to(ref.dtype) * 255.0
            color = self.color_proj(rgb)
            if self.cfg.enable_flag:
                mean = colors.mean(dim=1)
                specified = (mean >= 0) & (mean <= 1)  # 500/255 ("unspecified") falls outside
                color = torch.where(specified[:, None], color, torch.zeros_like(color))
            parts.update(color_input_rgb=rgb, color_proj=color)
            emb = emb + color

        return (emb, parts) if return_parts else emb

    # -----------------------------------------------------------------------------------------------------------

    def _style_term(self, text_info: TextInfo, lines: list[tuple[int, int]], parts: dict,
                    style_crops: dict[int, Tensor]) -> Tensor:
        """style_proj of the font recogniser's features of each line's font-hint crop (gradients allowed)."""
        crops, nonblank = [], []
        for b, j in lines:
            if j in style_crops:
                crop = style_crops[j].to(device=text_info.font_hint.device, dtype=torch.float32)
                nonblank.append(bool(crop.mean() != 0))
                crops.append(crop)
                continue
            # The original builds the crop mask as uint8(position) * 255, i.e. positions are truncated to {0, 1}.
            mask = text_info.positions[b, j].detach().float().permute(1, 2, 0).cpu().numpy().astype(np.uint8) * 255
            canvas = text_info.font_hint[b] * 255.0
            if canvas.shape[0] == 1:
                canvas = canvas.repeat(3, 1, 1)
            # /255 then *255 as in the original (crop -> [0, 1] line image -> recogniser input x 255): the
            # round trip is not exactly the identity in float32, and parity wants the same bits.
            crop = crop_by_mask(canvas, mask) / 255.0
            nonblank.append(bool(crop.mean() != 0))
            crops.append(crop * 255.0)
        # The font recogniser runs in this module's mode, with gradients (teacher training trains it).
        _, style_neck, font_batches = recognize(self.font_predictor, crops, self.font_ocr, return_batches=True)
        self._check_features(style_neck, "font recogniser")
        ref = self.style_proj[0].weight
        style = self.style_proj(style_neck.reshape(len(lines), -1).to(ref.dtype))
        if self.cfg.enable_flag:
            keep = torch.tensor(nonblank, device=style.device)
            style = torch.where(keep[:, None], style, torch.zeros_like(style))
        parts.update(style_neck=style_neck, style_proj=style, font_predictor_input_batch0=font_batches[0].input)
        return style

    @staticmethod
    def _to_ocr_image(line: Tensor) -> Tensor:
        """(1|3, h, w) image in [0, 1] -> (3, h, w) in 0..255, the recogniser's input convention."""
        return (line.repeat(3, 1, 1) if line.shape[0] == 1 else line) * 255.0

    def _check_features(self, neck: Tensor, who: str) -> None:
        want = self.proj[0].in_features
        got = neck.shape[1] * neck.shape[2]
        if got != want:
            raise ValueError(f"{who} gives {neck.shape[1]} x {neck.shape[2]} = {got} features per line, but the "
                             f"embedding projections expect {want} (check the OCR image_shape / neck_dims)")
