"""The text-aware loss terms of AnyText's trainer: an OCR perceptual loss and a CTC loss on the lines of a predicted
image, read by the model's frozen glyph recogniser (``text_predictor``).

For every valid line j of sample b (its position mask from the batch):

* the predicted image (the decoded x̂0 of the network being trained, with gradient through the frozen VAE decoder)
  and a reference image (the decoded target x0, without gradient) are cut by the line's min-area rectangle
  (:func:`~anytext2_lcm.models.ocr.crop_by_mask`, differentiable in the image) and prepared as the recogniser's
  input (``resize_norm``: height 48, right-padded to 320, [-1, 1]);
* perceptual term: mean over the neck features (T × D) of (neck(pred) − neck(reference))²;
* CTC term: PP-OCR's CTC loss of the prediction's logits against the line's text (``distill.recognizer.ctc_loss``),
  lines with characters outside the recogniser's dictionary (``ppocr_keys_v1``, 6,625 classes) left out;
* each line is weighted by ᾱ_t of its sample's timestep (``step_weight``: a noisy-step x̂0 is a blur, its text says
  little) and by ``latin_weight`` if it is a Latin line; each term is the weighted mean over lines.

``loss = alpha · perceptual + beta · ctc`` (AnyText's ``loss_alpha`` / ``loss_beta``; its released setting is
alpha 0.003). Used by ``method: teacher`` (the decoded x̂0 against the training image's latent) and by the
distillations (the student's x̂0 against the consistency target or the teacher's x̂0): ``ocr_loss`` section.
Written here because no library reads text inside a diffusion loss; the recogniser and its CTC are the project's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.ocr import crop_by_mask, resize_norm, rotate_if_tall
from .recognizer import ctc_loss, encode_label


@dataclass
class LineSet:
    """The lines of a batch the terms read: (sample, slot) pairs, their masks (uint8, 0/255), texts and weights."""

    index: list[tuple[int, int]]
    masks: list[np.ndarray]
    labels: list[list[int] | None]
    weights: torch.Tensor
    """(N,) ᾱ_t (or 1) × latin_weight (or 1)."""


def collect_lines(positions: torch.Tensor, n_lines: torch.Tensor, texts: list[list[str]], languages: list[list[str]],
                  step_weight: torch.Tensor | None, latin_weight: float) -> LineSet:
    """Every real line of a batch. ``positions``: (B, L, 1, H, W) {0, 1}; ``step_weight``: (B,) or None."""
    index, masks, labels, weights = [], [], [], []
    pos = positions[:, :, 0].detach().cpu()
    for b, n in enumerate(n_lines.tolist()):
        for j in range(int(n)):
            m = (pos[b, j] > 0.5).numpy().astype(np.uint8) * 255
            if not m.any():
                continue
            index.append((b, j))
            masks.append(m)
            labels.append(encode_label(texts[b][j]) if texts and texts[b][j].strip() else None)
            w = float(step_weight[b]) if step_weight is not None else 1.0
            lang = languages[b][j] if languages else ""
            weights.append(w * (latin_weight if lang in ("Latin", "en", "English") else 1.0))
    return LineSet(index, masks, labels, torch.tensor(weights, dtype=torch.float32))


def recognizer_inputs(images: torch.Tensor, lines: LineSet, image_shape) -> torch.Tensor:
    """(N, 3, 48, 320) recogniser inputs of the lines of ``images`` (B, 3, H, W) in [-1, 1]; differentiable."""
    x255 = (images.float() + 1.0) * 127.5
    return torch.stack([resize_norm(rotate_if_tall(crop_by_mask(x255[b], m)), image_shape)
                        for (b, _), m in zip(lines.index, lines.masks)])


def text_loss_terms(recognizer: torch.nn.Module, image_shape, pred_images: torch.Tensor,
                    reference_images: torch.Tensor, lines: LineSet) -> dict[str, torch.Tensor]:
    """{"perceptual", "ctc"}: the two weighted means (0 when no line applies); ``recognizer`` frozen in eval mode."""
    zero = pred_images.sum() * 0.0
    if not lines.index:
        return {"perceptual": zero, "ctc": zero}
    w = lines.weights.to(pred_images.device)
    out = recognizer(recognizer_inputs(pred_images, lines, image_shape))
    with torch.no_grad():
        ref = recognizer(recognizer_inputs(reference_images, lines, image_shape))
    per_line = ((out["ctc_neck"].float() - ref["ctc_neck"].float()) ** 2).mean(dim=(1, 2))
    perceptual = (per_line * w).sum() / w.sum().clamp(min=1e-8)
    n_classes = out["ctc"].shape[-1]  # a recogniser with a smaller dictionary (the tiny model) reads no text
    keep = [i for i, lab in enumerate(lines.labels) if lab is not None and max(lab) < n_classes]
    if keep:
        wk = w[keep]
        ctc = ctc_loss(out["ctc"][keep], [lines.labels[i] for i in keep], wk) * len(keep) / wk.sum().clamp(min=1e-8)
    else:
        ctc = zero
    return {"perceptual": perceptual, "ctc": ctc}


def ocr_text_loss(model: torch.nn.Module, pred_x0: torch.Tensor, reference_x0: torch.Tensor, text_info,
                  texts: list[list[str]], languages: list[list[str]], t: torch.Tensor, section
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """``alpha · perceptual + beta · ctc`` of the decoded latents (B, 4, h, w) and the logged parts.

    Args:
        model: the AnyText2 (its VAE decodes, its frozen ``text_predictor`` reads).
        pred_x0: the trained network's x̂0 (with gradient); reference_x0: the target x0 (no gradient needed).
        t: (B,) timesteps, for ᾱ_t when ``section.step_weight``.
        section: an ``OCRLossSection`` (alpha, beta, latin_weight, step_weight).
    """
    step_w = model.alphas_cumprod[t.long()].float() if section.step_weight else None
    lines = collect_lines(text_info.positions, text_info.n_lines, texts, languages, step_w, section.latin_weight)
    with torch.autocast(device_type=pred_x0.device.type, enabled=False):
        pred = model.decode(pred_x0.float()).clamp(-1, 1)
        with torch.no_grad():
            ref = model.decode(reference_x0.float()).clamp(-1, 1)
        terms = text_loss_terms(model.text_predictor, model.cfg.ocr.image_shape, pred, ref, lines)
    loss = section.alpha * terms["perceptual"] + section.beta * terms["ctc"]
    return loss, {"ocr_perceptual": float(terms["perceptual"].detach()), "ocr_ctc": float(terms["ctc"].detach())}


__all__ = ["LineSet", "collect_lines", "ocr_text_loss", "recognizer_inputs", "text_loss_terms"]
