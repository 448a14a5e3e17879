"""A model records the guidance scale its teacher is sampled with (``ModelConfig.guidance_scale``): AnyText2's 7.5
unless the model says otherwise (the shipped testbed: 5). Every default that means "the teacher" reads it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from anytext2_lcm.config import ConfigError, ModelConfig, preset, tiny
from anytext2_lcm.defaults import Sampling, teacher_cfg, teacher_sampling
from anytext2_lcm.evaluate.quality import Student, quality_runs
from anytext2_lcm.generation import GenerationRequest, Generator, InputError
from model_helpers import trained_like_tiny


def test_presets_and_the_shipped_testbed_record_their_guidance():
    from anytext2_lcm.checkpoint import read_converted_config
    from anytext2_lcm.factory import shipped_weights

    assert preset("sd15").guidance_scale == 7.5 and preset("tiny").guidance_scale == 7.5
    assert preset("testbed").guidance_scale == 5.0
    assert read_converted_config(shipped_weights("testbed")).guidance_scale == 5.0
    assert teacher_sampling(preset("testbed")) == Sampling("ddim", 20, 5.0)
    assert teacher_sampling(None) == Sampling("ddim", 20, 7.5) and teacher_cfg(None) == 7.5


@pytest.mark.parametrize("value", [0, -1.0, 101, float("nan"), "5", True, None])
def test_a_bad_guidance_scale_is_a_one_line_error_naming_the_field(value):
    d = tiny().to_dict()
    d["guidance_scale"] = value
    with pytest.raises(ConfigError, match=r"^model\.guidance_scale="):
        ModelConfig.from_dict(d)


def test_a_config_round_trips_its_guidance_and_unknown_fields_name_it():
    d = tiny().to_dict()
    d["guidance_scale"] = 3
    assert ModelConfig.from_dict(d).guidance_scale == 3
    del d["guidance_scale"]
    assert ModelConfig.from_dict(d).guidance_scale == 7.5  # a folder written before the field: AnyText2's scale
    d["guidance"] = 3
    with pytest.raises(ConfigError, match="guidance_scale"):
        ModelConfig.from_dict(d)


@pytest.fixture(scope="module")
def model():
    m = trained_like_tiny()
    m.cfg = dataclasses.replace(m.cfg, guidance_scale=3.0)
    return m


def test_a_request_without_cfg_runs_at_the_models_scale(model):
    gen = Generator(model)
    base = dict(prompt='a sign that says "Hi"', positions=[[8, 8, 56, 40]], height=64, width=64, steps=2, seed=1)
    own, three, anytext = (gen(GenerationRequest(**base, cfg_scale=c)).images[0] for c in (None, 3.0, 7.5))
    assert np.array_equal(own, three)
    assert not np.array_equal(own, anytext)
    with pytest.raises(InputError, match="cfg_scale"):
        GenerationRequest(**base, cfg_scale=0)


def test_quality_runs_leave_the_teachers_scale_to_the_model_unless_given():
    lcm = Student("lcm", Sampling("lcm", 4, 1.0, {"original_steps": 20}))
    runs = {r.name: r for r in quality_runs([lcm], [2])}
    assert runs["teacher"].cfg is None and runs["ddim@2"].cfg is None  # evaluate fills in the model's scale
    assert runs["lcm@2"].cfg == 1.0 and runs["undistilled@2"].cfg == 1.0
    given = {r.name: r for r in quality_runs([lcm], [2], teacher=Sampling("ddim", 20, 6.0))}
    assert given["teacher"].cfg == 6.0 and given["ddim@2"].cfg == 6.0


def test_the_ui_starts_the_teacher_at_the_models_scale():
    from anytext2_lcm.ui import inputs as I

    assert I.mode_defaults(I.MODE_TEACHER, 5.0) == ("ddim", 20, 5.0)
    req = GenerationRequest(prompt='"a"', positions=[[0, 0, 32, 32]], height=64, width=64)
    plan = I.compare_plan(req, student_steps=(2,), teacher_cfg=5.0)
    assert plan[0].request.cfg_scale == 5.0 and plan[1].request.cfg_scale == 1.0
