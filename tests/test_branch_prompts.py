"""Sampling and distillation condition the model on the same prompt strings (pipeline.branch_prompts is the one place
they are built): a student is trained on the prompts it is sampled with."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from anytext2_lcm.distill.batch import TrainBatch


class _Stop(Exception):
    pass


def _recorder(calls):
    def fake(model, text_info, img, text, neg_img=None, neg_text=None, lines=None):
        calls.append((list(img), list(text), neg_img and list(neg_img), neg_text and list(neg_text)))
        raise _Stop
    return fake


@pytest.mark.parametrize("a_prompt", ["best quality", ""])
def test_generation_and_distillation_build_the_same_prompts(monkeypatch, a_prompt):
    import anytext2_lcm.distill.lcm as lcm
    import anytext2_lcm.generation as generation
    from anytext2_lcm.factory import build_model

    model = build_model("tiny").eval()
    gen_calls, dist_calls = [], []
    monkeypatch.setattr(generation, "encode_branches", _recorder(gen_calls))
    monkeypatch.setattr(lcm, "encode_branches", _recorder(dist_calls))
    req = generation.GenerationRequest(prompt='a shop sign that says "Hello"', positions=[[8, 8, 56, 30]],
                                       steps=1, a_prompt=a_prompt, n_prompt="ugly, blurry")
    gen = generation.Generator(model)
    with pytest.raises(_Stop):
        gen(req)
    prep = gen.prepare(req)
    ti = prep.text_info
    tb = TrainBatch(latents=torch.zeros(1, 4, 8, 8), text_info=ti, img_captions=[prep.img_prompt],
                    text_captions=[prep.text_prompt], inv_mask=torch.zeros(1, 1, 64, 64),
                    hint=torch.zeros(1, 1, 64, 64), gens=[torch.Generator()], indices=[0], epoch=0)
    with pytest.raises(_Stop):
        lcm.distill_conditions(model, replace(tb), a_prompt, "ugly, blurry", writenet_lora=False)
    assert gen_calls == dist_calls
    img, text, neg_img, neg_text = gen_calls[0]
    # the original's rule, also with an empty added prompt: "caption, " + a_prompt
    assert img == [prep.img_prompt + ", " + a_prompt] and neg_img == ["ugly, blurry"] and neg_text == [""]
    assert text == [prep.text_prompt] and "*" in text[0]
