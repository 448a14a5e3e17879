"""``anytext2-lcm demo --quick`` end to end (data → VAE → teacher → distillation → grid, loss curve, report), the
demo recipe file, and the Pillow figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from anytext2_lcm.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_demo_writes_everything(quick_demo, capsys):
    out = quick_demo
    for name in ("grid.png", "loss.png", "report.md", "report.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "report.json").read_text())
    for key, path in doc["files"].items():
        assert Path(path).exists(), key
    md = (out / "report.md").read_text()
    assert "![teacher vs student](grid.png)" in md and "![loss](loss.png)" in md
    assert "faster" in md and "| steps |" in md
    with Image.open(out / "grid.png") as g:
        assert g.width > 5 * 64 * 3 and g.height > 2 * 64 * 3  # 5 columns, 2 prompts, pixels enlarged 3x
        arr = np.asarray(g.convert("RGB"))
    assert arr.std() > 5  # not a blank canvas
    with Image.open(out / "loss.png") as lp:
        assert lp.size == (720, 400)


def test_quick_demo_numbers_are_sane(quick_demo):
    doc = json.loads((quick_demo / "report.json").read_text())
    sp = doc["speed"]
    assert sp["teacher_seconds_per_image"] > 0 and sp["student_seconds_per_image"] > 0
    assert sp["ratio"] == pytest.approx(sp["teacher_seconds_per_image"] / sp["student_seconds_per_image"])
    assert sp["unet_evaluations"] == {"teacher": 40, "student": 4}
    fk = doc["fidelity_at_k"]
    assert fk["steps"] == 4
    assert math.isfinite(fk["student_mse"]) and fk["student_mse"] >= 0
    assert math.isfinite(fk["teacher_mse"]) and fk["teacher_mse"] > 0
    assert fk["ratio"] == pytest.approx(fk["student_mse"] / fk["teacher_mse"])
    assert fk["goal_met"] == (fk["ratio"] <= 0.5)
    assert doc["student"]["steps"] == doc["recipe"]["distill"]["steps"]
    assert math.isfinite(doc["student"]["loss_last_10"])
    assert doc["vae"]["psnr_after_db"] > doc["vae"]["psnr_before_db"]  # the tune improves reconstruction
    assert doc["teacher"]["loss_last_10"] < doc["teacher"]["loss_first_10"]
    te = doc["teacher"]["text_effect"]
    assert te["samples"] >= 1 and te["inside"] >= 0 and te["outside"] >= 0
    steps = [json.loads(ln)["step"] for ln in Path(doc["files"]["metrics"]).read_text().splitlines()]
    assert steps == list(range(1, doc["recipe"]["distill"]["steps"] + 1))
    assert all(not st["cached"] for st in doc["stages"].values())


def test_demo_recipe_file_is_the_builtin_default():
    from anytext2_lcm.demo.recipe import Recipe, load_recipe

    assert load_recipe(REPO / "configs" / "demo_default.yaml").to_dict() == Recipe().to_dict()


def test_recipe_rejects_unknown_fields():
    from anytext2_lcm.config import ConfigError
    from anytext2_lcm.demo.recipe import load_recipe

    with pytest.raises(ConfigError, match="distill.stepz"):
        load_recipe(None, ["distill.stepz=3"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_recipe(None, ["data.image_size=96"])


def test_loss_curve_and_grid(tmp_path):
    from anytext2_lcm.demo.figures import image_grid, loss_curve, moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    img = loss_curve([(1, 0.5), (2, float("nan")), (3, 0.25), (4, 0.2)], tmp_path / "l.png", title="t")
    assert (tmp_path / "l.png").is_file() and img.size == (720, 400)
    a = np.asarray(img)
    assert (a[..., 2] > a[..., 0] + 60).any()  # the blue smoothed line is drawn
    loss_curve([], tmp_path / "empty.png")  # no values: still a figure, no error
    green = np.array([10, 200, 30], np.uint8)
    tiles = [[np.zeros((8, 8, 3), np.uint8), np.broadcast_to(green, (8, 8, 3))] for _ in range(3)]
    g = image_grid(tiles, ["a", "b\nc"], ["r1", "r2", "r3"], scale=2)
    arr = np.asarray(g)
    assert g.width >= 2 * 16 and g.height >= 3 * 16
    assert (arr == green).all(-1).sum() == 3 * 16 * 16  # each green tile enlarged 2x, nearest
