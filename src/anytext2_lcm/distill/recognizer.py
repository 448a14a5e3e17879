"""The recogniser objective (``method: ocr``): a glyph OCR that reads, for a model trained from nothing.

AnyText2's ``text_predictor`` is PaddleOCR's pretrained PP-OCRv3 recogniser; its neck features become each line's
glyph token, and the original's OCR losses (``distill.ocr_loss``) read lines out of predicted images with it. A model
built from a preset (the ``testbed``) starts with a random recogniser. This method trains ``text_predictor`` with
PP-OCR's own objective, CTC over the 6,625 classes of ``ppocr_keys_v1`` (0 = blank, 1..6623 the dictionary, 6624 a
space, the layout of PaddleOCR's ``CTCLabelDecode``), on two views of every valid line of the data:

* the line cut out of the training image by its position (:func:`~anytext2_lcm.models.ocr.crop_by_mask`, the
  crop the OCR losses and the evaluation take), so that it reads images;
* the line rendered alone (``gly_line``, what the text-embedding module shows it).

Everything else stays frozen. The result is a converted model folder, the next stage's ``model.teacher``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import save_converted
from ..models.ocr import crop_by_mask, resize_norm, rotate_if_tall
from .batch import Method, StepOutput, train_modules, train_only


@lru_cache(maxsize=1)
def ppocr_keys() -> tuple[str, ...]:
    """The 6,623 characters of PaddleOCR's ``ppocr_keys_v1`` dictionary, in class order (class i + 1)."""
    text = resources.files("anytext2_lcm").joinpath("assets/ppocr_keys_v1.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


@lru_cache(maxsize=1)
def _class_of() -> dict[str, int]:
    keys = ppocr_keys()
    index = {ch: i + 1 for i, ch in enumerate(keys)}
    index[" "] = len(keys) + 1
    return index


def encode_label(text: str) -> list[int] | None:
    """Class ids of ``text`` (None if a character is outside the dictionary)."""
    index = _class_of()
    ids = [index.get(ch) for ch in text]
    return None if any(i is None for i in ids) or not ids else ids


def decode_label(ids: list[int]) -> str:
    """Class ids (no blanks) → text."""
    keys = ppocr_keys()
    return "".join(keys[i - 1] if i <= len(keys) else " " for i in ids)


class RecognizerNet(nn.Module):
    """``forward(x)`` → CTC logits (N, T, C) of the recogniser for inputs (N, 3, 48, 320) in [-1, 1]."""

    def __init__(self, recognizer: nn.Module):
        super().__init__()
        self.recognizer = recognizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recognizer(x)["ctc"]


@dataclass
class LineBatch:
    """Recogniser inputs and their labels.

    Attributes:
        inputs: (N, 3, H, W) in [-1, 1] (image crops, then rendered lines).
        labels: N class-id lists (no blank).
        weights: (N,) loss weights (0 for the stand-in row of a batch without a readable line).
    """

    inputs: torch.Tensor
    labels: list[list[int]]
    weights: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.labels)


def line_views(batch: dict, image_shape: tuple[int, int, int]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Recogniser inputs (3, H, W) in [-1, 1] and labels of every valid line of a collated batch: its crop out of
    the image by its position, and its rendered ``gly_line``. Lines with characters outside the dictionary are left
    out."""
    inputs, labels = [], []
    img = (batch["img"].float() + 1.0) * 127.5  # (B, 3, H, W) in 0..255
    for b, n in enumerate(batch["n_lines"].tolist()):
        for j in range(int(n)):
            ids = encode_label(batch["texts"][b][j])
            if ids is None:
                continue
            mask = (batch["positions"][b, j, 0] > 0.5).to(torch.uint8).numpy() * 255
            crop = crop_by_mask(img[b], mask)
            line = batch["gly_line"][b, j].float()
            line = (line.repeat(3, 1, 1) if line.shape[0] == 1 else line) * 255.0
            for view in (crop, line):
                inputs.append(resize_norm(rotate_if_tall(view), image_shape))
                labels.append(ids)
    return inputs, labels


def ctc_loss(logits: torch.Tensor, labels: list[list[int]], weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CTC loss (blank 0) of logits (N, T, C) against N label sequences, each divided by its length (PaddleOCR's
    CTCLoss with ``reduction="mean"``); per-sample ``weights`` (N,) scale the terms before the mean."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, N, C)
    targets = torch.tensor([c for seq in labels for c in seq], dtype=torch.long, device=logits.device)
    target_lengths = torch.tensor([len(seq) for seq in labels], dtype=torch.long, device=logits.device)
    input_lengths = torch.full((len(labels),), logits.shape[1], dtype=torch.long, device=logits.device)
    per = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="none",
                     zero_infinity=True) / target_lengths.clamp(min=1)
    if weights is not None:
        per = per * weights
    return per.mean()


class OCRMethod(Method):
    """Train the model's glyph recogniser (``text_predictor``) with CTC; see the module docstring."""

    name = "ocr"

    def configure_model(self, model: nn.Module) -> list[nn.Parameter]:
        return train_only(model, lambda name: name.startswith("text_predictor."))

    def set_train_mode(self, model: nn.Module) -> None:
        train_modules(model, model.text_predictor)

    def network(self, model: nn.Module) -> nn.Module:
        return RecognizerNet(model.text_predictor)

    def prepare(self, model: nn.Module, batch: dict, seed: int, epoch: int, device) -> LineBatch:
        inputs, labels = line_views(batch, model.cfg.ocr.image_shape)
        weights = torch.ones(len(labels))
        if not inputs:  # no readable line (e.g. images without text): one blank row that adds nothing
            inputs, labels, weights = [torch.zeros(model.cfg.ocr.image_shape)], [[len(ppocr_keys()) + 1]], \
                torch.zeros(1)
        return LineBatch(torch.stack(inputs).to(device), labels, weights.to(device))

    def step(self, net: nn.Module, model: nn.Module, tb: LineBatch) -> StepOutput:
        logits = net(tb.inputs)
        return StepOutput(ctc_loss(logits, tb.labels, tb.weights), {}, {"logits": logits.detach()})

    def save_results(self, model: nn.Module, output_dir: Path) -> list[Path]:
        return [save_converted(model, output_dir / "model",
                               extra={"trained_by": "anytext2-lcm train-teacher (method: ocr)"})]


__all__ = ["LineBatch", "OCRMethod", "RecognizerNet", "ctc_loss", "decode_label", "encode_label", "line_views",
           "ppocr_keys"]
