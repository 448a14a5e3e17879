"""benchmarks/gpu_check.py in its CPU smoke mode: every section runs and reports what the GPU run would report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_cpu_smoke(tmp_path, capsys):
    assert _script().main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "cpu smoke"
    s = {k: v["result"] for k, v in doc["sections"].items()}
    assert set(s) == {"parity", "drift", "speed", "distill", "loader"}
    # parity: the recorded fixture, every output within the project's tolerance
    assert s["parity"]["pass"] and s["parity"]["within_tolerance"] == s["parity"]["outputs"] > 50
    # drift: bf16 differs from fp32, but little (relative MSE of eps well below 1 %)
    bf = s["drift"]["bf16"]
    assert 0 < bf["eps_rel_mse"] < 1e-2 and bf["image_psnr_db"] > 30
    # speed: every run timed; the students are faster than the 20-step CFG teacher
    eager = s["speed"]["eager"]
    assert set(eager["s_per_image"]) == {"teacher@20", "student@1", "student@2", "student@4"}
    assert all(v > 1 for v in eager["speedup_vs_teacher"].values())
    assert "not run" in s["speed"]["compile"]
    # distillation with and without gradient checkpointing ran its steps
    for k in ("checkpointing_off", "checkpointing_on"):
        assert s["distill"][k]["steps"] == 3 and s["distill"][k]["exit_code"] == 0
        assert s["distill"][k]["s_per_step"] > 0
    assert s["loader"]["samples_per_s"] > 0 and s["loader"]["workers"] == 2
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## parity", "## drift", "## speed", "## distill", "## loader"):
        assert heading in md
    assert md in capsys.readouterr().out
