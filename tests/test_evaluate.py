"""``anytext2-lcm evaluate`` on a tiny make-data set with the tiny model and a LoRA adapter: outputs, sane values,
determinism, the teacher against itself, and the sample reader."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anytext2_lcm import lora as L
from anytext2_lcm.checkpoint import save_converted
from anytext2_lcm.cli import main
from anytext2_lcm.config import tiny
from anytext2_lcm.evaluate.runner import EvalConfig, load_eval_samples, text_prompt_for
from anytext2_lcm.models.anytext2 import AnyText2
from anytext2_lcm.models.init import initialize

SIZE = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 3-sample make-data set (128 px, scaled to 64 px by evaluate), a perturbed tiny model folder, a LoRA."""
    root = tmp_path_factory.mktemp("evaluate")
    assert main(["make-data", "--out", str(root / "data"), "--num", "3", "--size", "128", "--max-lines", "3",
                 "--seed", "3"]) == 0
    m = initialize(AnyText2(tiny()), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # non-zero "trained-like" weights so that every input matters
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_converted(m, root / "model")
    L.apply_lora(m, L.LoraSpec(rank=4, alpha=4))
    with torch.no_grad():
        for n, p in m.named_parameters():  # a "trained" student: non-zero lora_B
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    L.save_lora(m, root / "lora")
    return root


def _run(assets, out, *extra):
    args = ["evaluate", "--model", str(assets / "model"), "--data", str(assets / "data" / "anyword_synth.json"),
            "--size", str(SIZE), "--teacher-steps", "2", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _numbers(doc):
    """Everything but wall-clock times and paths."""
    runs = [{k: v for k, v in r.items() if k not in ("seconds_per_image", "speedup_vs_teacher", "ocr_seconds_total")}
            for r in doc["runs"]]
    return runs, doc["samples"]


def test_evaluate_writes_json_markdown_grids_and_is_deterministic(assets, tmp_path):
    a = _run(assets, tmp_path / "a", "--lora", str(assets / "lora"), "--student-steps", "1,2")
    # JSON: config, dataset, one run per setting, per-sample records
    assert set(a) >= {"config", "dataset", "runs", "samples", "grids"}
    assert [r["name"] for r in a["runs"]] == ["reference", "teacher", "student@1", "student@2"]
    assert a["dataset"]["samples"] == 3 and a["dataset"]["lines"] == sum(len(s["texts"]) for s in a["samples"])
    assert a["config"]["lora"] is True and a["config"]["size"] == SIZE
    for r in a["runs"]:
        o = r["ocr"]["all"]
        if r["name"] == "reference":
            assert o["lines"] == a["dataset"]["lines"] and 0.0 <= o["sen_acc"] <= 1.0
            continue
        assert o["lines"] == a["dataset"]["lines"]
        assert 0.0 <= o["sen_acc"] <= 1.0 and 0.0 <= o["ned"] <= 1.0
        assert set(r["ocr"]) - {"all"} == set(a["dataset"]["languages"])
        assert r["seconds_per_image"]["mean"] > 0 and r["seconds_per_image"]["images"] == 3
        assert r["failed_samples"] == 0
    ref, t, s1, s2 = a["runs"]
    assert ref["fidelity_to_teacher"] is None and ref["seconds_per_image"]["images"] == 0
    assert t["unet_evals_per_image"] == 4 and s1["unet_evals_per_image"] == 1 and s2["eval_count_ratio_vs_teacher"] == 2
    assert t["fidelity_to_teacher"] is None
    for r in (s1, s2):  # a perturbed LoRA: close to the teacher but not identical
        f = r["fidelity_to_teacher"]
        assert f["images"] == 3 and f["identical_images"] == 0
        assert 5.0 < f["psnr_db"] < 80.0 and -1.0 <= f["ssim"] <= 1.0 and f["latent_mse"] > 0
    for smp in a["samples"]:
        assert set(smp["reads"]) == {"reference", "teacher", "student@1", "student@2"}
        assert all(len(img) == len(smp["texts"]) for reads in smp["reads"].values() for img in reads)
    # files
    out = tmp_path / "a"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| teacher | ddim | 2 |" in md and "student@2" in md and "![grid 0](grids/grid_000.png)" in md
    grid = out / a["grids"][0]
    with Image.open(grid) as im:
        w, h = im.size  # columns: glyphs | reference | teacher | student@1 | student@2; rows: 3 samples + captions
        assert w % 5 == 0 and w >= 5 * SIZE and h > 3 * (w // 5)
    for run in ("reference", "teacher", "student_1", "student_2"):
        assert len(list((out / "images" / run).glob("*.png"))) == 3
    # a rerun gives the same numbers (only wall-clock times may differ)
    b = _run(assets, tmp_path / "b", "--lora", str(assets / "lora"), "--student-steps", "1,2")
    assert _numbers(a) == _numbers(b)


def test_teacher_against_itself_is_identical(assets, tmp_path):
    doc = _run(assets, tmp_path / "self", "--student-sampler", "ddim", "--student-cfg", "7.5", "--student-steps",
               "2", "--no-student-images", "--no-reference")
    t, s = doc["runs"]
    f = s["fidelity_to_teacher"]
    assert f["psnr_db"] == "inf" and f["identical_images"] == 3 and f["ssim"] == pytest.approx(1.0)
    assert f["latent_mse"] == 0.0
    assert t["ocr"] == s["ocr"]
    assert list((tmp_path / "self" / "images" / "student_2").glob("*.png")) == []


def test_samples_keep_raw_texts_scale_polygons_and_count_skips(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((256, 128, 3), np.uint8)).save(img)
    rows = [
        {"img_name": "a.png", "caption": 'a sign * that says "OPEN"', "wm_score": 0.9,
         "annotations": [{"polygon": [[0, 0], [64, 0], [64, 32], [0, 32]], "text": "OPEN", "language": "Latin",
                          "color": [255, 0, 0]},
                         {"polygon": [[0, 40], [64, 40], [64, 60], [0, 60]], "text": 'say "hi"', "language": "Latin"},
                         {"polygon": [[0, 70], [64, 70], [64, 90], [0, 90]], "text": "x" * 30, "language": "Latin"},
                         {"polygon": [[0, 90], [9, 90], [9, 99]], "text": "bad", "language": "Latin",
                          "valid": False}]},
        {"img_name": "missing.png", "caption": "no text", "annotations": []},
        {"img_name": 5, "caption": "broken"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data_root": ".", "data_list": rows}), encoding="utf-8")
    samples, rep = load_eval_samples(EvalConfig(data=str(path), size=64, seed=7))
    assert len(samples) == 1
    s = samples[0]
    # caption verbatim apart from '*' (no watermark suffix: the benchmark does not add one)
    assert s.caption == 'a sign   that says "OPEN"'
    assert [ln.text for ln in s.lines] == ["OPEN", "x" * 20]
    assert s.lines[0].color == (255.0, 0.0, 0.0) and s.lines[1].color is None
    assert np.allclose(s.lines[0].polygon, [[0, 0], [32, 0], [32, 8], [0, 8]])  # 128x256 → 64x64
    assert s.seed == 7
    assert rep.skipped["no_valid_line"] == 1 and rep.skipped["bad_field_type"] == 1
    assert rep.dropped_lines["quote_in_text"] == 1 and rep.dropped_lines["cut_to_max_chars (kept)"] == 1
    assert text_prompt_for(s.lines) == f'Text says "OPEN" , "{"x" * 20}" . '


def test_ocr_path_reads_rendered_lines_with_known_content(tmp_path):
    """The evaluation's own OCR path (polygon → mask → min-area-rectangle crop → PP-OCRv4) on make-data images,
    whose lines are rendered text with known content: at least 9 of 10 lines read exactly."""
    from anytext2_lcm.evaluate.ocr import default_reader
    from anytext2_lcm.evaluate.runner import _read_reference

    assert main(["make-data", "--out", str(tmp_path / "d"), "--num", "10", "--size", "512", "--seed", "5"]) == 0
    cfg = EvalConfig(data=str(tmp_path / "d" / "anyword_synth.json"), size=512)
    samples, _ = load_eval_samples(cfg)
    per_sample = [{"reads": {}} for _ in samples]
    rec = _read_reference(samples, per_sample, cfg, default_reader(), tmp_path / "out")
    exact = sum(p == g for p, g in zip(rec.preds, rec.gts))
    assert len(rec.gts) >= 20 and exact >= 0.9 * len(rec.gts), list(zip(rec.gts, rec.preds))
    assert {"Latin", "Chinese"} <= set(rec.langs)


def test_psnr_inf_is_written_as_strict_json(tmp_path):
    from anytext2_lcm.evaluate.report import _strict

    doc = _strict({"a": math.inf, "b": [1.0, -math.inf, math.nan], "c": {"d": 2}})
    assert doc == {"a": "inf", "b": [1.0, "-inf", "nan"], "c": {"d": 2}}
    json.dumps(doc, allow_nan=False)


def test_report_embeds_the_distillation_loss_curve(assets, tmp_path):
    """An adapter inside a distill output folder: the report draws its metrics.jsonl (torn line skipped)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(assets / "lora", run / "adapter")
    losses = [0.5 / (1 + 0.1 * s) for s in range(1, 41)]
    lines = [json.dumps({"step": s, "loss": v, "lr": 1e-4}) for s, v in zip(range(1, 41), losses)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 41, \"lo", encoding="utf-8")
    doc = _run(assets, tmp_path / "out", "--lora", str(run / "adapter"), "--student-steps", "1")
    tr = doc["training"]
    assert tr["steps"] == 40 and tr["window"] == 4 and tr["loss_curve"] == "loss.png"
    assert tr["loss_first"] == pytest.approx(sum(losses[:4]) / 4) and tr["loss_last"] == pytest.approx(
        sum(losses[-4:]) / 4)
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Distillation run" in md and "![distillation loss](loss.png)" in md
    with Image.open(tmp_path / "out" / "loss.png") as im:
        px = np.asarray(im.convert("RGB"))
        assert im.size == (720, 400) and (px < 200).any()  # something drawn on the white canvas
    # an explicit folder without metrics is a usage error, before anything is generated
    assert main(["evaluate", "--model", str(assets / "model"), "--data", str(assets / "data" / "anyword_synth.json"),
                 "--out", str(tmp_path / "x"), "--train-run", str(tmp_path)]) == 2
    assert not (tmp_path / "x").exists()
