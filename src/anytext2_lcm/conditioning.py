"""The per-sample text conditioning that AnyText2 consumes: :class:`TextInfo`.

This is the one interface between data (``data/``), the pipeline (``pipeline.py``), the trainers and the model.
Everything is a stacked tensor with a fixed number of line slots ``L`` (``max_lines``); unused slots are zero and
are ignored because ``n_lines[b]`` says how many lines sample ``b`` really has.

Shapes (B = batch, L = line slots, H x W = image size, h x w = latent size = H/8 x W/8):

================  =====================  ==========================================================================
field             shape                  meaning
================  =====================  ==========================================================================
``glyphs``        (B, L, C, gH, gW)      line j rendered in its polygon, C = 3 (coloured) or 1, values in [0, 1],
                  float                  at g = ``glyph_scale`` times the image size (g = 1 in AnyText2); the WriteNet
                                         only uses ``sum != 0`` over lines and channels
``positions``     (B, L, 1, H, W) float  filled polygon of line j, {0, 1}
``gly_line``      (B, L, 1, 80, 512)     line j rendered centred on an 80 x 512 canvas, {0, 1} (glyph-OCR input)
``colors``        (B, L, 3) float        RGB / 255 of line j; (500, 500, 500) / 255 means "colour not specified"
``n_lines``       (B,) long              real lines of each sample (<= L)
``font_hint``     (B, 1|3, H, W) float   font-hint canvas in [0, 1] (sum of all lines' hints)
``masked_x``      (B, 4, h, w) float     scale_factor x VAE posterior sample of the masked image (editing), or of
                                         an all -1 image (generation)
================  =====================  ==========================================================================

Data batches (``data.collate``) carry these under the same names plus ``img`` (B, 3, H, W) in [-1, 1],
``masked_img`` (B, 3, H, W) in [-1, 1], ``inv_mask`` (B, 1, H, W), ``hint`` (B, 1, H, W), ``img_caption`` and
``text_caption`` (lists of str), ``texts`` / ``language`` (lists of lists of str), and the data loader's
``skipped`` (reason → count) and ``skip_records``. ``masked_x`` is computed from
``masked_img`` by the model's VAE (see :func:`anytext2_lcm.models.anytext2.AnyText2.encode_masked`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

UNSPECIFIED_COLOR = 500.0
"""The original's "no colour chosen" RGB value (per channel, before division by 255)."""


@dataclass
class TextInfo:
    """Text-line conditioning of a batch. See the module docstring for shapes."""

    glyphs: torch.Tensor
    positions: torch.Tensor
    gly_line: torch.Tensor
    colors: torch.Tensor
    n_lines: torch.Tensor
    font_hint: torch.Tensor
    masked_x: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.n_lines, torch.Tensor):
            self.n_lines = torch.as_tensor(list(self.n_lines), dtype=torch.long)
        B = self.glyphs.shape[0]
        L = self.glyphs.shape[1]
        checks = {
            "glyphs": (self.glyphs, 5), "positions": (self.positions, 5), "gly_line": (self.gly_line, 5),
            "colors": (self.colors, 3), "font_hint": (self.font_hint, 4), "masked_x": (self.masked_x, 4),
        }
        for name, (t, nd) in checks.items():
            if t.dim() != nd:
                raise ValueError(f"TextInfo.{name}: expected {nd} dims, got shape {tuple(t.shape)}")
            if t.shape[0] != B:
                raise ValueError(f"TextInfo.{name}: batch {t.shape[0]} != glyphs batch {B}")
        for name in ("positions", "gly_line", "colors"):
            if getattr(self, name).shape[1] != L:
                raise ValueError(f"TextInfo.{name}: {getattr(self, name).shape[1]} line slots != glyphs' {L}")
        if self.n_lines.shape != (B,):
            raise ValueError(f"TextInfo.n_lines: expected shape ({B},), got {tuple(self.n_lines.shape)}")
        if self.n_lines.numel() and (int(self.n_lines.max()) > L or int(self.n_lines.min()) < 0):
            raise ValueError(f"TextInfo.n_lines={self.n_lines.tolist()}: must lie in [0, {L}]")

    @property
    def batch_size(self) -> int:
        return self.glyphs.shape[0]

    @property
    def max_lines(self) -> int:
        return self.glyphs.shape[1]

    def lines(self) -> list[tuple[int, int]]:
        """(sample, line) index pairs of the real lines, sample-major, line-minor (the embedding order)."""
        return [(b, j) for b in range(self.batch_size) for j in range(int(self.n_lines[b]))]

    def to(self, device=None, dtype=None) -> "TextInfo":
        """Move to a device; floating tensors are cast to ``dtype`` if given (``n_lines`` stays long)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if f.name == "n_lines":
                out[f.name] = t.to(device)
            else:
                out[f.name] = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
        return TextInfo(**out)

    def index(self, idx) -> "TextInfo":
        """Select samples (an index, slice or index tensor along the batch)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return TextInfo(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def with_masked_x(self, masked_x: torch.Tensor) -> "TextInfo":
        return replace(self, masked_x=masked_x)

    @staticmethod
    def cat(items: list["TextInfo"]) -> "TextInfo":
        """Concatenate along the batch (all must have the same line slots and sizes)."""
        return TextInfo(**{f.name: torch.cat([getattr(t, f.name) for t in items]) for f in fields(TextInfo)})

    @classmethod
    def from_batch(cls, batch: dict, masked_x: torch.Tensor) -> "TextInfo":
        """Build from a data batch (see the module docstring) and its encoded masked image."""
        return cls(glyphs=batch["glyphs"], positions=batch["positions"], gly_line=batch["gly_line"],
                   colors=batch["colors"], n_lines=batch["n_lines"], font_hint=batch["font_hint"],
                   masked_x=masked_x)
