"""The text-aware loss terms (distill.ocr_loss) against hand computations with the same recogniser."""

from __future__ import annotations

import pytest
import torch

from anytext2_lcm import config as model_configs
from anytext2_lcm.distill.ocr_loss import collect_lines, recognizer_inputs, text_loss_terms
from anytext2_lcm.distill.recognizer import ctc_loss, encode_label
from anytext2_lcm.models.ocr import RecModel


@pytest.fixture(scope="module")
def recognizer():
    torch.manual_seed(0)
    return RecModel(model_configs.testbed().ocr).eval()


def _batch():
    B, L, S = 2, 2, 64
    pos = torch.zeros(B, L, 1, S, S)
    pos[0, 0, 0, 10:22, 4:60] = 1
    pos[0, 1, 0, 40:52, 8:40] = 1
    pos[1, 0, 0, 20:34, 6:58] = 1
    n = torch.tensor([2, 1])
    texts = [["Hello", "世界"], ["abc", " "]]
    langs = [["Latin", "Chinese"], ["Latin", " "]]
    return pos, n, texts, langs


def test_lines_weights_and_labels():
    pos, n, texts, langs = _batch()
    lines = collect_lines(pos, n, texts, langs, torch.tensor([0.5, 0.25]), latin_weight=2.0)
    assert lines.index == [(0, 0), (0, 1), (1, 0)]
    assert lines.weights.tolist() == [1.0, 0.5, 0.5]  # ᾱ_t × (2 for Latin lines)
    assert lines.labels[0] == encode_label("Hello") and lines.labels[1] == encode_label("世界")


def test_terms_match_hand_computation(recognizer):
    pos, n, texts, langs = _batch()
    lines = collect_lines(pos, n, texts, langs, torch.tensor([0.5, 0.25]), latin_weight=2.0)
    g = torch.Generator().manual_seed(1)
    pred = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1).requires_grad_(True)
    ref = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    terms = text_loss_terms(recognizer, (3, 48, 320), pred, ref, lines)
    xp = recognizer_inputs(pred, lines, (3, 48, 320))
    xr = recognizer_inputs(ref, lines, (3, 48, 320))
    op, orf = recognizer(xp), recognizer(xr)
    w = lines.weights
    per = ((op["ctc_neck"] - orf["ctc_neck"]) ** 2).mean(dim=(1, 2))
    assert torch.allclose(terms["perceptual"], (per * w).sum() / w.sum(), rtol=1e-5)
    # CTC: the weighted mean of the per-line losses (each divided by its label length)
    per_ctc = torch.stack([ctc_loss(op["ctc"][i:i + 1], [lines.labels[i]]) for i in range(3)])
    assert torch.allclose(terms["ctc"], (per_ctc * w).sum() / w.sum(), rtol=1e-4)
    (terms["perceptual"] + terms["ctc"]).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0  # the crops are differentiable in the image


def test_same_image_has_no_perceptual_loss(recognizer):
    pos, n, texts, langs = _batch()
    lines = collect_lines(pos, n, texts, langs, None, 1.0)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    terms = text_loss_terms(recognizer, (3, 48, 320), img, img.clone(), lines)
    assert float(terms["perceptual"].detach()) == 0.0 and float(terms["ctc"].detach()) > 0
