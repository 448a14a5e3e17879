"""Recipes: validation before anything is built, the cached stage runner, and the testbed build end to end on a tiny
budget (every stage through the project's trainer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anytext2_lcm.config import ConfigError
from anytext2_lcm.recipes.spec import load_recipe

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "configs" / "testbed.yaml"

TINY_BUDGET = [
    "datasets.train.num=6", "datasets.heldout.num=2",
    "stages.vae.config.train.max_steps=2", "stages.vae.config.train.batch_size=2",
    "stages.vae.config.vae_training.calibration_samples=4", "stages.vae.config.train.num_workers=0",
    "stages.ocr.config.train.max_steps=2", "stages.ocr.config.train.batch_size=2",
    "stages.ocr.config.train.num_workers=0",
    "stages.teacher.config.train.max_steps=2", "stages.teacher.config.train.batch_size=2",
    "stages.teacher.config.train.num_workers=0", "stages.teacher.config.validation.every_n_steps=0",
    "stages.vae.config.optim.lr_warmup_steps=1", "stages.ocr.config.optim.lr_warmup_steps=1",
    "stages.teacher.config.optim.lr_warmup_steps=1", "gate.vae_min_sen_acc=0.0", "threads=1",
    "datasets.train_large.num=6", "stages.teacher_large.config.train.max_steps=2",
    "stages.teacher_large.config.train.batch_size=2", "stages.teacher_large.config.train.num_workers=0",
    "stages.teacher_large.config.optim.lr_warmup_steps=1",
    "stages.teacher_large.config.checkpoint.every_n_steps=1", "ship.average_checkpoints=[1, 2]",
]


@pytest.mark.parametrize("override, field", [
    (["stages.teacher.from=nowhere"], "stages.teacher.from"),
    (["stages.teacher.config.train.batch_size=0"], "stages.teacher.config: train.batch_size"),
    (["stages.teacher.data=missing"], "stages.teacher.data"),
    (["datasets.train.text_size=[0.5, 0.1]"], "datasets.train"),
    (["datasets.train.no_such=1"], "datasets.train.no_such"),
    (["stages.vae.config.method=flow"], "stages.vae.config: method"),
    (["threads=0"], "threads"),
])
def test_invalid_recipe_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_recipe(TESTBED, override)
    assert str(e.value).startswith(field), str(e.value)


def test_the_testbeds_last_stage_must_be_a_teacher():
    from anytext2_lcm.recipes.testbed import check_sections

    assert check_sections(load_recipe(TESTBED)) == (0.95, "fp16")
    with pytest.raises(ConfigError, match=r"^stages.teacher_large.config.method='ocr': the last stage is the shipped"):
        check_sections(load_recipe(TESTBED, ["stages.teacher_large.config.method=ocr"]))


@pytest.mark.parametrize("steps, says", [
    ("[600, 1201]", "step 1201 is not a checkpoint"),
    ("[450]", "step 450 is not a checkpoint"),  # not a multiple of every_n_steps=300
    ("[900, 900]", "listed twice"),
    ("1200", "must be a list"),
])
def test_averaged_checkpoints_must_be_ones_the_last_stage_keeps(steps, says):
    from anytext2_lcm.recipes.testbed import check_sections

    with pytest.raises(ConfigError, match=rf"^ship.average_checkpoints.*{says}"):
        check_sections(load_recipe(TESTBED, [f"ship.average_checkpoints={steps}"]))


def test_averaged_checkpoints_are_sorted_and_follow_rotation():
    from anytext2_lcm.recipes.testbed import averaged_steps, check_sections

    assert averaged_steps(load_recipe(TESTBED, ["ship.average_checkpoints=[1200, 300]"])) == [300, 1200]
    # rotation: with keep_last=2 only 900 and 1200 survive
    with pytest.raises(ConfigError, match=r"step 600 .*keeps \[900, 1200\]"):
        check_sections(load_recipe(TESTBED, ["stages.teacher_large.config.checkpoint.keep_last=2"]))


def test_shipped_recipes_load():
    for name in ("testbed", "demo", "text_quality"):
        r = load_recipe(REPO / "configs" / f"{name}.yaml")
        assert r.stages and r.datasets


def test_quality_students_learn_the_prompts_they_are_evaluated_with():
    """Every student of the quality benchmark is distilled with the evaluation's a_prompt and negative prompt (the
    guided teachers' uncond branch), and a CFG-free student empties its prompts to that negative prompt, so the uncond
    branch it learns is the one CFG samples it with. The prompts must be those of AnyText's benchmark script."""
    from anytext2_lcm.distill.config import DistillSection, PCMSection
    from anytext2_lcm.evaluate.runner import EVAL_A_PROMPT, EVAL_N_PROMPT

    r = load_recipe(REPO / "configs" / "text_quality.yaml")
    ev = r.sections["eval"]
    assert (ev["a_prompt"], ev["n_prompt"]) == (EVAL_A_PROMPT, EVAL_N_PROMPT)
    for st in r.stages:
        d = DistillSection(**st.config["distill"])
        assert (d.a_prompt, d.n_prompt) == (EVAL_A_PROMPT, EVAL_N_PROMPT), st.name
        p = PCMSection(**st.config.get("pcm", {}))
        if p.cfg_free_teacher:
            assert p.empty_image_prompt == EVAL_N_PROMPT, st.name


def test_testbed_recipe_end_to_end_and_cache(tmp_path):
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.generation import GenerationRequest, Generator
    from anytext2_lcm.recipes.testbed import build_testbed

    recipe = load_recipe(TESTBED, TINY_BUDGET)
    said: list[str] = []
    doc = build_testbed(recipe, tmp_path / "out", report=said.append)
    assert set(doc["stages"]) == {"vae", "ocr", "teacher", "teacher_large"}
    for name in ("vae", "ocr", "teacher", "teacher_large"):
        assert doc["stages"][name]["steps"] == 2
    # the gate and the teacher were measured on the held-out lines, with the dataset's own images as reference
    assert doc["reference"]["all"]["lines"] >= 2 and doc["teacher"]["all"]["lines"] == doc["reference"]["all"]["lines"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reconstruction"]["all"]["lines"] == report["reference"]["all"]["lines"]
    # shipped precision: fp16 components, fp32 schedule
    from safetensors.torch import load_file

    unet = load_file(str(tmp_path / "out" / "model" / "unet.safetensors"))
    assert {t.dtype for t in unet.values()} == {torch.float16}
    # the shipped model is the last stage's (the large-glyph fine-tune), not the first teacher's: the mean of its
    # checkpoints at steps 1 and 2 (ship.average_checkpoints), which differs from its final weights (step 2)
    def stage_unet(name):
        f = Path(doc["stages"][name]["path"]) / "model" / "unet.safetensors"
        return {k: v.half() for k, v in load_file(str(f)).items()}
    ck = Path(doc["stages"]["teacher_large"]["path"]) / "checkpoints"
    one, two = (load_file(str(ck / f"checkpoint-00000{k}" / "trainable.safetensors")) for k in (1, 2))
    p = "model.diffusion_model."
    mean = {k[len(p):]: ((one[k].double() + two[k].double()) / 2).float().half() for k in one if k.startswith(p)}
    assert mean and all(torch.equal(unet[k], mean[k]) for k in mean)
    last, first = stage_unet("teacher_large"), stage_unet("teacher")
    assert any(not torch.equal(unet[k], last[k]) for k in mean)
    assert all(torch.equal(unet[k], last[k]) for k in unet if k not in mean)
    assert any(not torch.equal(unet[k], first[k]) for k in unet)
    assert doc["averaged_checkpoints"] == [1, 2]
    model = build_model(str(tmp_path / "out" / "model")).eval()
    assert model.cfg.name == "testbed" and model.cfg.image_size == 128
    img = Generator(model)(GenerationRequest(prompt='a sign that says "harbor"', positions=[[10, 40, 118, 80]],
                                             steps=2, seed=0)).images[0]
    assert img.shape == (128, 128, 3)
    # a second run reuses every stage
    said.clear()
    build_testbed(recipe, tmp_path / "out", report=said.append)
    assert said and not any("building" in m for m in said)


def test_a_converted_teachers_config_is_part_of_its_students_stage_key(tmp_path):
    """Two converted folders with the same weights but a different recorded guidance scale start different stages
    (a CFG-free student records its teacher's scale, so a cached one must not be reused); the same folder twice
    gives the same identity."""
    import shutil

    from anytext2_lcm.checkpoint import save_converted
    from anytext2_lcm.config import tiny
    from anytext2_lcm.models.anytext2 import AnyText2
    from anytext2_lcm.recipes.spec import StageSpec
    from anytext2_lcm.recipes.stages import RecipeRun, _stage_start

    model = AnyText2(tiny())
    save_converted(model, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "config.json").read_text())
    doc["model"]["guidance_scale"] = 4.0
    (tmp_path / "b" / "config.json").write_text(json.dumps(doc))
    run = RecipeRun(root=tmp_path)
    ident = {name: _stage_start(run, StageSpec(name="s", start=str(tmp_path / name), data="d", config={}))[1]
             for name in ("a", "b")}
    assert ident["a"] != ident["b"]
    assert ident["a"].split(":config-")[0] == ident["b"].split(":config-")[0]  # the weights are the same
    again = _stage_start(run, StageSpec(name="s", start=str(tmp_path / "a"), data="d", config={}))[1]
    assert again == ident["a"]
    # the light decoder's generated-latent bank (sampled at the teacher's own scale) follows the configuration too
    from types import SimpleNamespace as NS

    from anytext2_lcm.distill.config import ModelSection
    from anytext2_lcm.distill.decoder import _bank_settings

    def bank(name):
        cfg = NS(decoder_training=NS(generated=8, generated_by=["teacher"], generated_lora=None),
                 data=NS(json_paths=["d.json"], image_size=64), model=ModelSection(teacher=str(tmp_path / name)),
                 train=NS(seed=0))
        return _bank_settings(cfg, 0, 1)

    assert bank("a") != bank("b") and bank("a") == bank("a")
