"""The shipped testbed teacher writes text that the offline PP-OCR recogniser reads.

Held-out English and Chinese words (``data.words``: lists the training lines never contain), drawn here from a seed of this test,
each generated exactly as ``anytext2-lcm generate --model testbed --prompt 'a sign that says "WORD"' --boxes b.json``
does it (the default model and its defaults: 128 px, 20-step DDIM + its own CFG, 5), in the box the README documents,
and read back through the same OCR path as ``evaluate``. Thresholds sit well below the held-out figures the README
reports for this teacher, so that the test guards against a broken model or pipeline, not against one unlucky word.
"""

from __future__ import annotations

import numpy as np
import pytest

from anytext2_lcm.data.glyphs import polygon_mask
from anytext2_lcm.data.words import heldout_string, is_heldout
from anytext2_lcm.evaluate.metrics import normalized_edit_distance

BOX = (12, 40, 116, 84)  # the README's first-image box on the 128 px canvas
POLY = [[BOX[0], BOX[1]], [BOX[2], BOX[1]], [BOX[2], BOX[3]], [BOX[0], BOX[3]]]
N_WORDS = 8


@pytest.fixture(scope="module")
def generator():
    import torch

    from anytext2_lcm.cli import build_parser
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.generation import Generator

    torch.set_num_threads(1)
    default = build_parser().parse_args(["generate", "--prompt", "x", "--out", "x.png"]).model
    assert default == "testbed"  # the model a new user's first image comes from
    model = build_model(default).eval()
    assert model.cfg.image_size == 128
    return Generator(model)


@pytest.fixture(scope="module")
def written(generator):
    """{chinese: (words, results)}: N_WORDS held-out words of each script, each generated in BOX."""
    from anytext2_lcm.generation import GenerationRequest

    out = {}
    for chinese in (False, True):
        rng = np.random.default_rng(20261206)
        words = [heldout_string(rng, chinese=chinese) for _ in range(N_WORDS)]
        assert all(is_heldout(w) for w in words)
        out[chinese] = (words, [generator(GenerationRequest(prompt=f'a sign that says "{word}"', positions=[POLY],
                                                             seed=i)) for i, word in enumerate(words)])
    return out


def _read(images, words):
    from anytext2_lcm.evaluate.ocr import read_lines

    reads = [read_lines(img, [polygon_mask(POLY, *img.shape[:2])])[0] for img in images]
    return reads, sum(r == w for r, w in zip(reads, words)), normalized_edit_distance(reads, words)


@pytest.mark.parametrize("chinese, exact_min, ned_min", [(False, 5, 0.85), (True, 4, 0.7)], ids=["latin", "chinese"])
def test_testbed_teacher_writes_heldout_words(written, chinese, exact_min, ned_min):
    words, results = written[chinese]
    assert all(r.images[0].shape[:2] == (128, 128) for r in results)
    reads, exact, ned = _read([r.images[0] for r in results], words)
    print(f"testbed teacher, {N_WORDS} held-out {'Chinese' if chinese else 'Latin'} words: {exact} read exactly, mean NED {ned:.3f}",
          list(zip(words, reads)))
    assert exact >= exact_min and ned >= ned_min, list(zip(words, reads))


def test_the_shipped_light_decoder_keeps_the_words(generator, written):
    """``--fast`` finds the testbed's light decoder beside its weights; decoding the same latents with it, the OCR
    reads the held-out words as well as through the full decoder, give or take one word per script."""
    import torch

    from anytext2_lcm.evaluate.runtime import RuntimeOptions, apply_runtime_options, light_decoder_beside

    path = light_decoder_beside("testbed")
    assert path is not None and path.endswith("light_decoder.safetensors")
    view, _ = apply_runtime_options(generator.model, RuntimeOptions(tiny_decoder=path))
    assert view.decoder is not None
    for chinese, (words, results) in written.items():
        with torch.no_grad():
            x = torch.cat([view.decode(r.latents) for r in results])
        light = list((x.float().permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).numpy())
        full_reads, full_exact, _ = _read([r.images[0] for r in results], words)
        reads, exact, ned = _read(light, words)
        print(f"light decoder, {'Chinese' if chinese else 'Latin'}: {exact} exact (full decoder {full_exact}),",
              list(zip(words, reads)))
        assert exact >= full_exact - 1 and ned >= (0.7 if chinese else 0.85), list(zip(words, reads, full_reads))
