"""benchmarks/compare_methods.py on a micro budget: the three students are trained by the trainer with the same
budget, every row is measured by evaluate's runner, and one table goes to stdout, JSON and Markdown."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

REPO = Path(__file__).resolve().parents[1]
MICRO = ["data.train_num=8", "data.eval_num=1", "vae.steps=3", "vae.batch_size=2", "teacher.steps=3",
         "teacher.batch_size=2", "distill.steps=3", "distill.batch_size=2", "distill.warmup_steps=1",
         "eval.teacher_steps=4"]  # a 4-step reference: the route, not the figures


def _bench():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    args = ["--recipe", str(REPO / "configs" / "demo_default.yaml"), "--cache", str(root / "cache"),
            "--out", str(root / "out"), "--eval-num", "1", "--threads", "1"]
    for s in MICRO:
        args += ["--set", s]
    assert _bench().main(args) == 0
    return root, json.loads((root / "out" / "compare_methods.json").read_text())


def test_one_table_with_every_row_and_step(run):
    root, doc = run
    names = [r["row"]["name"] for r in doc["rows"]]
    assert names == ["teacher_ddim", "teacher_pcm", "teacher_pcm_cfg", "lcm", "lcm_tcd0", "lcm_tcd03", "pcm",
                     "pcm_cfgfree", "pcm_cfgfree_cfg"]
    rows = {r["row"]["name"]: r for r in doc["rows"]}
    for r in doc["rows"]:
        assert sorted(int(k) for k in r["cells"]) == [1, 2, 4, 8]
        for c in r["cells"].values():
            assert c["latent_mse"] >= 0 and math.isfinite(c["latent_mse"]) and c["seconds_per_image"] > 0
            assert c["failed"] == 0
    # How each row is sampled: TCD gammas, PCM phases on the students' grid, real CFG (2 UNet passes per step)
    # only for the teacher reference rows and the CFG-free PCM student.
    assert rows["lcm_tcd0"]["row"]["options"]["gamma"] == 0.0 and rows["lcm_tcd03"]["row"]["options"]["gamma"] == 0.3
    assert rows["pcm"]["row"]["options"] == {"num_phases": 4, "convention": "inference", "original_steps": 50}
    assert rows["pcm_cfgfree_cfg"]["row"]["cfg"] == 7.5 and rows["pcm_cfgfree_cfg"]["cells"]["4"][
        "unet_evals_per_image"] == 8
    assert rows["pcm"]["cells"]["4"]["unet_evals_per_image"] == 4
    # Same budget for every student, each trained by the trainer and cached.
    assert set(doc["students"]) == {"lcm", "pcm", "pcm_cfgfree"}
    for s in doc["students"].values():
        assert s["steps"] == 3 and (Path(s["path"]) / "adapter.safetensors").is_file()
    cfg_free = (Path(doc["students"]["pcm_cfgfree"]["path"]) / "config.yaml").read_text()
    assert "method: pcm" in cfg_free and "cfg_free_teacher: true" in cfg_free
    md = (root / "out" / "compare_methods.md").read_text()
    assert md.count("| LCM + TCD γ=0.3 |") == 1 and "| PCM, CFG-free teacher + CFG 7.5, negative prompt |" in md
    assert "| method | 1 step: MSE |" in md and doc["table_markdown"] in md


def test_helpers():
    mod = _bench()
    rows = {r.name: r for r in mod.rows_for(50, 4, "inference", 7.5)}
    assert mod.allowed_steps(rows["pcm"], (1, 2, 3, 4, 8)) == (1, 2, 4, 8)
    assert mod.allowed_steps(rows["lcm"], (1, 2, 3)) == (1, 2, 3)


def test_cache_reuses_a_finished_stage(tmp_path):
    """The stage cache the benchmark builds its students with (``demo.stages.cached_stage``)."""
    from anytext2_lcm.demo.stages import cached_stage

    built = []

    def build(out):
        built.append(out)
        (out / "w.txt").write_text("x")
        return {"steps": 1}

    s1 = cached_stage(tmp_path, "pcm", "pcm-abc", False, build, lambda m: None)
    s2 = cached_stage(tmp_path, "pcm", "pcm-abc", False, build, lambda m: None)
    p1, cached1 = s1.path, s1.cached
    p2, info2, cached2 = s2.path, s2.info, s2.cached
    assert (cached1, cached2) == (False, True) and len(built) == 1 and p1 == p2 and (p2 / "w.txt").is_file()
    assert info2["steps"] == 1 and not (tmp_path / ".pcm-abc.partial").exists()
