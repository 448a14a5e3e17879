"""The demo (`anytext2-lcm demo`): a PCM student (from the CFG-free teacher) distilled from the shipped testbed
teacher with the trainer, and the report of teacher vs student vs the controls, on a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUICK = ["datasets.train.num=8", "datasets.heldout.num=2", "eval.num=2", "eval.steps=[1,4]", "eval.grid_rows=2",
         "stages.student.config.train.max_steps=2", "stages.student.config.train.batch_size=2",
         "stages.student.config.optim.lr_warmup_steps=1", "threads=1"]


def test_demo_recipe_is_validated_before_anything_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "demo", "--config", str(REPO / "configs" / "demo.yaml"),
                        "--out", str(tmp_path / "o"), "--set", "eval.grid_steps=3"], capture_output=True, text=True)
    assert r.returncode == 2 and "eval.grid_steps=3" in r.stderr and not (tmp_path / "o").exists()


def test_quick_demo_end_to_end(tmp_path):
    from anytext2_lcm.factory import SHIPPED_MODELS, shipped_weights

    assert "testbed" in SHIPPED_MODELS
    shipped_weights("testbed")  # the package carries the trained teacher: a missing one fails here, not skips
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "anytext2_lcm.cli", "demo", "--config", str(REPO / "configs" / "demo.yaml"),
           "--out", str(out)] + [a for s in QUICK for a in ("--set", s)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    names = set(doc["runs"])
    assert {"teacher", "student@1", "student@4", "ddim@1", "ddim@4", "undistilled@1", "undistilled@4"} <= names
    # the student samples as its recipe recorded: the PCM sampler with real CFG (the teacher was unguided)
    assert doc["stages"]["student"]["steps"] == 2 and doc["sampling"]["sampler"] == "pcm"
    assert doc["sampling"]["cfg"] > 1
    for row in doc["table"]:
        assert row["lines"] and 0 <= row["sen_acc"] <= 1 and 0 <= row["ned"] <= 1
    # the adapter records how it is sampled, and the grid has one row per sample and five columns
    info = json.loads((out / "work").glob("student-*/adapter/anytext2_student.json").__next__().read_text())
    assert info["method"] == "pcm" and info["sampling"]["steps"] == 4
    with Image.open(out / "grid.png") as im:
        assert im.width > 5 * 128 and im.height > 2 * 128
    assert (out / "loss.png").is_file() and "| student |" in (out / "report.md").read_text()


@pytest.mark.parametrize("adapter_flags", [[], ["--sampler", "lcm", "--steps", "4", "--cfg", "1"]])
def test_generate_with_an_adapter_needs_no_sampler_flags(tmp_path, adapter_flags):
    """An adapter made by the trainer records its sampling; generate uses it when no flag says otherwise."""
    from anytext2_lcm import lora as L
    from anytext2_lcm.defaults import student_sampling
    from anytext2_lcm.factory import build_model

    m = build_model("tiny")
    L.apply_lora(m, L.LoraSpec(rank=2, alpha=2))
    meta = {"method": "lcm", "sampling": json.dumps(student_sampling("lcm", original_steps=20).to_dict())}
    L.save_lora(m, tmp_path / "adapter", metadata=meta)
    boxes = tmp_path / "b.json"
    boxes.write_text(json.dumps([[4, 8, 60, 30]]))
    r = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "generate", "--model", "tiny", "--lora",
                        str(tmp_path / "adapter"), "--prompt", 'a sign that says "Hi"', "--boxes", str(boxes),
                        "--out", str(tmp_path / "x.png")] + adapter_flags, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["sampler"] == "lcm" and info["steps"] == 4 and info["cfg"] == 1.0
