"""Metric primitives: the AnyText benchmark's text metrics (Sen.ACC, NED) and image/latent fidelity (PSNR, SSIM,
latent MSE) between a student and the teacher at the same seed.

Text metrics follow AnyText's ``eval/eval_dgocr.py`` (also used for AnyText2):

* Sen.ACC: the fraction of lines whose OCR string equals the ground truth exactly (no case folding, no stripping).
* NED: the mean over lines of 1 − Levenshtein(pred, gt) / (max(len(pred), len(gt)) + 1e-5), on character sequences.
  The benchmark first maps each character to its index in the recogniser's dictionary, with every character outside
  it mapped to one shared "unknown" id; pass ``charset`` to do the same. The 1e-5 is the benchmark's (two empty
  strings score 1).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["latent_mse", "levenshtein", "line_ned", "normalized_edit_distance", "psnr", "sentence_accuracy", "ssim"]


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------


def _pairs(preds: Sequence[str], gts: Sequence[str]) -> None:
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth lines")
    if len(gts) == 0:
        raise ValueError("no lines to score")


def sentence_accuracy(preds: Sequence[str], gts: Sequence[str]) -> float:
    """Sen.ACC: fraction of exact string matches, in [0, 1]."""
    _pairs(preds, gts)
    return sum(p == g for p, g in zip(preds, gts)) / len(gts)


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences; O(len(a)·len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def _ids(text: str, char2id: dict[str, int] | None, unknown: int) -> list[Hashable]:
    if char2id is None:
        return list(text)
    return [char2id.get(ch, unknown) for ch in text]


def _char_index(charset: Iterable[str] | None) -> tuple[dict[str, int] | None, int]:
    if charset is None:
        return None, -1
    chars = list(charset)
    return {c: i for i, c in enumerate(chars)}, len(chars)


def _ned(p: Sequence[Hashable], g: Sequence[Hashable]) -> float:
    # The benchmark's get_ld: the 1e-5 keeps two empty strings at 1 instead of 0/0.
    return 1.0 - levenshtein(p, g) / (max(len(p), len(g)) + 1e-5)


def line_ned(pred: str, gt: str, charset: Iterable[str] | None = None) -> float:
    """1 − Levenshtein / (max length + 1e-5) for one line (module docstring)."""
    char2id, unknown = _char_index(charset)
    return _ned(_ids(pred, char2id, unknown), _ids(gt, char2id, unknown))


def normalized_edit_distance(preds: Sequence[str], gts: Sequence[str], charset: Iterable[str] | None = None) -> float:
    """NED averaged over lines, in [0, 1] (1 = all lines exact).

    Args:
        preds, gts: OCR strings and ground truths, one per line.
        charset: optional recogniser dictionary; characters outside it all count as one "unknown" symbol, as in the
            benchmark (None: compare raw characters).
    """
    _pairs(preds, gts)
    char2id, unknown = _char_index(charset)
    return sum(_ned(_ids(p, char2id, unknown), _ids(g, char2id, unknown)) for p, g in zip(preds, gts)) / len(gts)


# ---------------------------------------------------------------------------------------------------------------
# Images and latents
# ---------------------------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"{what}: expected (B, C, H, W) tensors, got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10·log10(data_range² / MSE), in dB.

    Args:
        a, b: (B, C, H, W) images in [0, data_range].

    Returns:
        (B,) float64; +inf for identical images.
    """
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13), Gaussian-weighted.

    The standard setting: an 11-tap Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, population (biased)
    statistics, the SSIM map computed where the window fits entirely inside the image ("valid"), averaged over the
    map and the channels. This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)``.

    Args:
        a, b: (B, C, H, W) images in [0, data_range], H and W ≥ ``win_size``.

    Returns:
        (B,) float64.
    """
    _check_pair(a, b, "ssim")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images of {tuple(a.shape[-2:])} are smaller than the {win_size}-pixel window")
    c = a.shape[1]
    g = _gaussian_window(win_size, sigma)
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(x):  # separable depthwise Gaussian, valid region only
        return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)

    x, y = a.double(), b.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample between two latents (B, ...) → (B,) float64 (student vs teacher at the
    same seed, before decoding)."""
    if a.shape != b.shape:
        raise ValueError(f"latent_mse: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)
