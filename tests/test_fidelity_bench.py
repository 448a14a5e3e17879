"""The fidelity benchmark (benchmarks/distill_fidelity.py) on a micro budget: its table and JSON, the stage cache
(a rerun reuses every stage and gives the same numbers) and determinism (a second cache built from the same recipe
holds byte-identical weights)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MICRO = ["data.train_num=8", "data.eval_num=2", "vae.steps=3", "vae.batch_size=2", "teacher.steps=3",
         "teacher.batch_size=2", "distill.steps=3", "distill.batch_size=2", "distill.warmup_steps=1", "eval.num=2"]


def _bench():
    spec = importlib.util.spec_from_file_location("distill_fidelity", REPO / "benchmarks" / "distill_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(cache: Path, out: Path) -> list[str]:
    args = ["--recipe", str(REPO / "configs" / "demo_default.yaml"), "--cache", str(cache), "--json", str(out)]
    for s in MICRO:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    out = root / "first.json"
    assert _bench().main(_args(root / "cache", out)) == 0
    return root, json.loads(out.read_text())


def test_table_and_json(first_run, capsys):
    root, doc = first_run
    res = doc["result"]
    assert [r["steps"] for r in res["table"]] == [1, 2, 4, 8]
    labels = list(res["table"][0]["students"])
    assert labels == ["tcd(gamma=0)", "lcm", "undistilled tcd(gamma=0)"]
    for r in res["table"]:
        assert r["teacher_mse"] > 0 and math.isfinite(r["teacher_mse"])
        for st in r["students"].values():
            assert st["mse"] >= 0 and math.isfinite(st["mse"])
            assert st["ratio"] == pytest.approx(st["mse"] / r["teacher_mse"])
            assert 0 <= st["better_samples"] <= res["samples"]
            assert st["seconds"] > 0
        assert r["ratio"] == r["students"]["tcd(gamma=0)"]["ratio"]
    sps = res["seconds_per_image"]
    assert sps["reference"] > 0 and sps["tcd(gamma=0)@4"] > 0
    assert doc["goal"]["steps"] == 4 and doc["goal"]["met"] == (doc["goal"]["ratio"] <= 0.5)
    assert set(doc["stages"]) == {"data", "vae", "teacher", "student"}
    for st in doc["stages"].values():
        assert Path(st["path"]).is_dir() and not st["cached"]
    student = Path(doc["stages"]["student"]["path"])
    assert (student / "adapter.safetensors").is_file() and (student / "metrics.jsonl").is_file()
    assert "| steps |" in doc["table_markdown"] and "**" in doc["table_markdown"]


def test_rerun_uses_the_cache_and_repeats_the_numbers(first_run, capsys):
    root, doc = first_run
    out = root / "second.json"
    assert _bench().main(_args(root / "cache", out)) == 0
    printed = capsys.readouterr().out
    assert "4-step ratio student/teacher" in printed and "| steps |" in printed
    again = json.loads(out.read_text())
    assert all(st["cached"] for st in again["stages"].values())
    assert again["stages"]["student"]["path"] == doc["stages"]["student"]["path"]
    for a, b in zip(again["result"]["table"], doc["result"]["table"]):
        assert a["teacher_mse"] == b["teacher_mse"]
        assert {k: v["mse"] for k, v in a["students"].items()} == {k: v["mse"] for k, v in b["students"].items()}


def test_same_recipe_same_weights(first_run):
    """A second cache built from scratch with the same recipe holds the same bytes (deterministic given the seed)."""
    import torch
    from safetensors.torch import load_file

    from anytext2_lcm.demo.recipe import load_recipe
    from anytext2_lcm.demo.stages import run_stages

    root, doc = first_run
    recipe = load_recipe(REPO / "configs" / "demo_default.yaml", MICRO)
    run = run_stages(recipe, root / "cache2", report=lambda m: None)
    first = {k: Path(v["path"]) for k, v in doc["stages"].items()}
    assert run.vae.read_bytes() == (first["vae"] / "vae.safetensors").read_bytes()
    for part in ("unet", "writenet", "text_embedding"):  # text_embedding: its font OCR has dropout (seeded)
        assert (run.teacher / f"{part}.safetensors").read_bytes() == \
            (first["teacher"] / "model" / f"{part}.safetensors").read_bytes(), part
    # the adapter file's header carries run metadata; the weights must be equal bit for bit
    a = load_file(run.student_run / "adapter.safetensors")
    b = load_file(first["student"] / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
