"""The teacher's own images as a dataset to distil on (distill.teacher_data) and its recipe form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anytext2_lcm.config import ConfigError
from distill_helpers import tiny_dataset


@pytest.fixture(scope="module")
def tiny():
    from anytext2_lcm.factory import build_model

    return build_model("tiny").eval()


def test_teacher_dataset_is_the_evaluations_teacher_run(tiny, tmp_path):
    """Each image is the evaluation's teacher run of the same row (same seed rule, prompts, sampling), its
    annotation is the row's lines as rendered, at generation pixels, and the file reads back through the training
    reader; a rerun keeps the images already written."""
    from anytext2_lcm.data.anyword import BadRow, DataConfig, LoadStats, load_annotation_file, parse_row
    from anytext2_lcm.distill.teacher_data import write_teacher_dataset
    from anytext2_lcm.evaluate.runner import EvalConfig, RunSpec, evaluate, load_eval_samples

    src = tiny_dataset(tmp_path, num=3, size=128)
    size = tiny.cfg.image_size
    path = write_teacher_dataset(tiny, [str(src)], tmp_path / "t", num=2, seed=7, a_prompt="sharp", n_prompt="blur")
    doc = json.loads(path.read_text())
    assert len(doc["data_list"]) == 2 and doc["generated_by"]["steps"] == 20
    assert doc["generated_by"]["cfg"] == tiny.cfg.guidance_scale

    ev = evaluate(tiny, EvalConfig(data=(str(src),), num=2, seed=7, a_prompt="sharp", n_prompt="blur",
                                   reference=False, warmup=False), tmp_path / "ev",
                  runs=[RunSpec("teacher", "ddim", 20, None, (("eta", 0.0),))], progress=False)
    assert ev["runs"][-1]["name"] == "teacher"
    for i in range(2):
        ours = np.asarray(Image.open(tmp_path / "t" / "images" / f"{i:06d}.png"))
        theirs = np.asarray(Image.open(tmp_path / "ev" / "images" / "teacher" / f"{i:05d}_0.png"))
        assert ours.shape == (size, size, 3) and np.array_equal(ours, theirs)

    src_rows = json.loads(Path(src).read_text())["data_list"]
    root, rows = load_annotation_file(path)
    for raw, source in zip(rows, src_rows):
        row = parse_row(raw, root, "t", DataConfig(), LoadStats())
        assert not isinstance(row, BadRow) and Path(row.img_path).is_file()
        assert raw["caption"] == source["caption"]
        assert [a["text"] for a in raw["annotations"]] == [a["text"] for a in source["annotations"]]
        scale = size / 128  # the source images are 128 px
        for a, b in zip(raw["annotations"], source["annotations"]):
            np.testing.assert_allclose(a["polygon"], np.asarray(b["polygon"]) * scale, atol=0.01)

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t" / "images").iterdir()}
    path.unlink()
    write_teacher_dataset(tiny, [str(src)], tmp_path / "t", num=2, seed=7, a_prompt="sharp", n_prompt="blur")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t" / "images").iterdir()} == before
    assert json.loads(path.read_text()) == doc
    # other settings into the same folder would mix two runs' images: refused
    with pytest.raises(ValueError, match="other settings"):
        write_teacher_dataset(tiny, [str(src)], tmp_path / "t", num=2, seed=8, a_prompt="sharp", n_prompt="blur")


def _recipe(**teacher):
    synth = {"num": 2, "size": 128}
    return {"datasets": {"train": synth, "train_teacher": {"teacher_images": {"data": "train", "model": "tiny",
                                                                              **teacher}}},
            "stages": {}}


@pytest.mark.parametrize("teacher, field", [
    ({"data": "nowhere"}, "datasets.train_teacher.teacher_images.data='nowhere'"),
    ({"model": "gpt"}, "datasets.train_teacher.teacher_images.model='gpt'"),
    ({"steps": 4}, "datasets.train_teacher.teacher_images.steps"),
    ({"num": "many"}, "datasets.train_teacher.teacher_images.num='many'"),
    ({"num": 0}, "datasets.train_teacher.teacher_images"),
])
def test_teacher_images_dataset_is_validated(teacher, field):
    from anytext2_lcm.recipes.spec import recipe_from_dict

    recipe_from_dict(_recipe(num=4))
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(_recipe(**teacher))
    assert str(e.value).startswith(field), str(e.value)


def test_a_recipe_builds_and_caches_a_teacher_images_dataset(tmp_path):
    from anytext2_lcm.recipes.spec import recipe_from_dict
    from anytext2_lcm.recipes.stages import run_recipe

    recipe = recipe_from_dict(_recipe(num=2, seed=3))
    said: list[str] = []
    run = run_recipe(recipe, tmp_path, report=said.append)
    path = run.json("train_teacher")
    assert path.name == "anyword_teacher.json" and len(json.loads(path.read_text())["data_list"]) == 2
    assert run.json("train").name == "anyword_synth.json"
    said.clear()
    again = run_recipe(recipe, tmp_path, report=said.append)
    assert again.json("train_teacher") == path and not any("building" in m for m in said)


def test_teacher_data_command(tmp_path, capsys):
    from anytext2_lcm.cli import main

    src = tiny_dataset(tmp_path, num=3, size=128)
    assert main(["teacher-data", str(tmp_path / "none.json"), "--out", str(tmp_path / "x"), "--model", "tiny"]) == 2
    assert "none.json: no such annotation file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any model is built or file written
    assert main(["teacher-data", str(src), "--out", str(tmp_path / "t"), "--model", "tiny", "--num", "1",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 1 and Path(out["dataset"]).name == "anyword_teacher.json"
    assert (tmp_path / "t" / "images" / "000000.png").is_file()
