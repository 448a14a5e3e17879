"""Metric primitives against hand-computed values (and SSIM against scikit-image's independent implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from anytext2_lcm.evaluate.metrics import (latent_mse, levenshtein, line_ned, normalized_edit_distance, psnr,
                                           sentence_accuracy, ssim)


def test_sentence_accuracy_hand():
    assert sentence_accuracy(["Hello", "world", "你好"], ["Hello", "World", "你好"]) == pytest.approx(2 / 3)
    # exact match only: no case folding, no whitespace stripping
    assert sentence_accuracy(["abc "], ["abc"]) == 0.0
    with pytest.raises(ValueError):
        sentence_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        sentence_accuracy([], [])


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
                                   ("你好世界", "你好", 2), ("AnyText", "AnyText", 0), ("ab", "ba", 2)])
def test_levenshtein_hand(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_ned_hand():
    # kitten/sitting: 1 − 3/(7 + 1e-5); exact: 1 − 0; both empty: 1
    assert line_ned("kitten", "sitting") == pytest.approx(1 - 3 / 7.00001, abs=1e-12)
    assert line_ned("", "") == 1.0
    assert line_ned("abc", "") == pytest.approx(1 - 3 / 3.00001, abs=1e-12)
    ned = normalized_edit_distance(["kitten", "AnyText", "你好"], ["sitting", "AnyText", "你好世界"])
    assert ned == pytest.approx(((1 - 3 / 7.00001) + 1.0 + (1 - 2 / 4.00001)) / 3, abs=1e-12)


def test_ned_charset_unknowns_share_one_id():
    # as in eval_dgocr: characters outside the dictionary all map to the same id
    charset = list("abc")
    assert line_ned("aé", "aü", charset) == 1.0
    assert line_ned("aé", "aü") == pytest.approx(1 - 1 / 2.00001)
    assert normalized_edit_distance(["ab"], ["ac"], charset) == pytest.approx(1 - 1 / 2.00001)


def test_psnr_hand():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 → 20 dB
    b[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02 → 10·log10(50)
    out = psnr(a, b)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4)  # float32 inputs
    assert out[1].item() == pytest.approx(10 * math.log10(50), abs=1e-4)
    assert math.isinf(psnr(a, a)[0].item())
    assert psnr(a * 255, b * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_hand():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images: σ = 0 and cov = 0, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b = 0.3, 0.7
    c1 = (0.01) ** 2
    got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)  # float32 inputs
    # an inverted image is perfectly anti-correlated: the covariance term, hence SSIM, is negative
    pat = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert ssim(pat, 1 - pat).item() < 0
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 40, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 32, 40, generator=g)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = metrics.structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1.0, channel_axis=0,
                                            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(float(ref), abs=1e-6)


def test_latent_mse_hand():
    a = torch.zeros(2, 4, 2, 2)
    b = torch.zeros(2, 4, 2, 2)
    b[0] = 1.0
    b[1, 0] = 2.0  # 4 of 16 elements with error 4 → 1.0
    assert latent_mse(a, b).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        latent_mse(a, b[:1])
