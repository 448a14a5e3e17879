"""Running a recipe's datasets and stages, each cached in a folder ``ROOT/<name>-<key>/``.

The key (:func:`stage_key`) hashes what the stage's output depends on: its settings, the keys of its inputs (the
dataset, the stage or shipped model it starts from), the torch version and the package code that produces it
(:data:`STAGE_CODE`). A rerun with the same recipe and code reuses the folder; any change rebuilds exactly the
stages it affects. Evaluation and report code are not part of any key: re-evaluating never retrains.

A folder is complete when its ``done.json`` exists: it is built under a temporary name and renamed into place, so an
interrupted run never leaves a folder that looks complete (and the trainer inside resumes from its own
checkpoints when the same stage is built again: ``checkpoint.resume: latest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import commit_dir, write_json
from .spec import TEACHER_IMAGES, Recipe, StageSpec, stage_train_config, synth_config

log = logging.getLogger(__name__)

DONE = "done.json"
STAGE_CODE = {
    "data": ("data/",),
    "teacher_images": ("distill/teacher_data.py", "evaluate/runner.py", "generation.py", "pipeline.py", "models/",
                       "samplers/", "conditioning.py", "data/", "defaults.py", "factory.py", "checkpoint.py"),
    "train": ("distill/", "models/", "data/", "lora/", "samplers/", "pipeline.py", "conditioning.py", "config.py",
              "checkpoint.py", "factory.py", "defaults.py"),
}
"""Package sources (relative to ``anytext2_lcm/``) whose code produces a dataset / a trained stage."""


def code_version(kind: str) -> str:
    """sha256 (16 hex) of the torch version and the ``.py`` sources of :data:`STAGE_CODE` ``[kind]``."""
    import torch

    import anytext2_lcm

    root = Path(anytext2_lcm.__file__).resolve().parent
    h = hashlib.sha256(torch.__version__.split("+")[0].encode())
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(rel == q or (q.endswith("/") and rel.startswith(q)) for q in STAGE_CODE[kind]):
            h.update(rel.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def stage_key(name: str, settings: dict, inputs: tuple[str, ...], kind: str) -> str:
    """``<name>-<12 hex>``: the hash of the settings, the input keys and the code version."""
    doc = {"settings": settings, "inputs": list(inputs), "code": code_version(kind)}
    return f"{name}-{hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]}"


@dataclass
class StageInfo:
    """A built (or reused) folder and what its build reported (``done.json``)."""

    name: str
    path: Path
    cached: bool
    seconds: float
    """Wall time of this run's build (0 when taken from the cache; ``info["build_seconds"]`` keeps the original)."""
    info: dict = field(default_factory=dict)


@dataclass
class RecipeRun:
    """The folders of a recipe's datasets and stages."""

    root: Path
    datasets: dict[str, StageInfo] = field(default_factory=dict)
    stages: dict[str, StageInfo] = field(default_factory=dict)

    def json(self, dataset: str) -> Path:
        """The annotation file of a dataset (its build's first file: ``anyword_synth.json`` for a synthetic one,
        ``anyword_teacher.json`` for the teacher's images)."""
        info = self.datasets[dataset]
        return info.path / info.info["files"][0]

    def model(self, stage: str) -> Path:
        """The converted model folder of a teacher-side stage (vae, ocr, teacher)."""
        return self.stages[stage].path / "model"

    def adapter(self, stage: str) -> Path:
        """The adapter folder of a distillation stage (lcm, pcm)."""
        return self.stages[stage].path / "adapter"


def cached_stage(root: Path, name: str, key: str, fresh: bool, build: Callable[[Path], dict],
                 report: Callable[[str], None]) -> StageInfo:
    """The folder ``root/key``: reused when its ``done.json`` exists, else built by ``build(partial)`` in
    ``root/.key.partial`` (kept between attempts, so a trainer inside resumes) and renamed into place."""
    final = root / key
    if not fresh and (final / DONE).is_file():
        info = json.loads((final / DONE).read_text())
        report(f"{name}: cached {final}")
        return StageInfo(name, final, True, 0.0, info)
    partial = root / f".{key}.partial"
    if fresh and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    report(f"{name}: building {final}")
    t0 = time.perf_counter()
    info = build(partial) or {}
    seconds = time.perf_counter() - t0
    info["build_seconds"] = seconds
    write_json(partial / DONE, info, indent=1)  # inside the partial folder: the rename commits it
    commit_dir(partial, final)  # a stale stage of this key is replaced only now: a failed build keeps it
    return StageInfo(name, final, False, seconds, info)


def train_stage(cfg, name: str, report: Callable[[str], None]) -> dict:
    """Run the Trainer on ``cfg`` → the stage's ``done.json`` numbers (steps, first/last-10 mean loss, outputs
    relative to the run folder). A run that does not finish is an error."""
    from ..distill.trainer import train

    t0 = time.perf_counter()
    result = train(cfg)
    if result.exit_code:
        raise RuntimeError(f"{name}: training stopped with exit code {result.exit_code}")
    losses = [loss for _, loss in result.losses]
    report(f"{name}: {len(losses)} steps in {time.perf_counter() - t0:.0f} s, loss "
           f"{_mean(losses[:10]):.4f} (first 10) -> {_mean(losses[-10:]):.4f} (last 10)")
    out = Path(cfg.output_dir)
    return {"steps": result.state.global_step, "loss_first_10": _mean(losses[:10]),
            "loss_last_10": _mean(losses[-10:]), "outputs": [str(Path(p).relative_to(out)) for p in result.outputs]}


def _stage_start(run: RecipeRun, stage: StageSpec) -> tuple[str | None, str]:
    """(model.teacher value, its identity for the cache key): an earlier stage's folder name, or a shipped or
    converted teacher's weights and model configuration (``distill.components.teacher_identity``)."""
    from ..distill.components import teacher_identity
    from ..distill.config import ModelSection

    if stage.start is None:
        return None, "random"
    if stage.start in run.stages:
        return str(run.model(stage.start)), run.stages[stage.start].path.name
    return stage.start, teacher_identity(stage.start, ModelSection())


def run_recipe(recipe: Recipe, root: str | Path, fresh: bool = False, only: tuple[str, ...] | None = None,
               report: Callable[[str], None] = print) -> RecipeRun:
    """Build (or reuse) the datasets and then the stages of ``recipe`` under ``root``.

    Args:
        only: build these stages (and what they need) and stop; None: all.
        fresh: rebuild everything (no cache).
    """
    import torch

    from ..data.synthetic import write_dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    run = RecipeRun(root)
    synthetic = {n: v for n, v in recipe.datasets.items() if TEACHER_IMAGES not in v}
    for ds_name, values in synthetic.items():
        key = stage_key(f"data_{ds_name}", values, (), "data")

        def build(out: Path, values=values, ds_name=ds_name) -> dict:
            paths = write_dataset(synth_config(values, f"datasets.{ds_name}"), out)
            return {"files": [p.name for p in paths]}

        run.datasets[ds_name] = cached_stage(root, f"dataset {ds_name}", key, fresh, build, report)
    for ds_name, values in recipe.datasets.items():
        if TEACHER_IMAGES in values:
            run.datasets[ds_name] = _teacher_images(run, ds_name, values[TEACHER_IMAGES], fresh, report)
    for stage in recipe.stages:
        teacher, start_id = _stage_start(run, stage)
        data_key = run.datasets[stage.data].path.name
        key = stage_key(stage.name, {"config": stage.config, "threads": recipe.threads}, (start_id, data_key),
                        "train")

        def build(out: Path, stage=stage, teacher=teacher) -> dict:
            cfg = stage_train_config(stage, str(out), [str(run.json(stage.data))], teacher)
            cfg.checkpoint.resume = "latest"  # a stage interrupted before resumes from its own checkpoints
            return train_stage(cfg, stage.name, report)

        run.stages[stage.name] = cached_stage(root, f"stage {stage.name}", key, fresh, build, report)
        if only is not None and set(only) <= set(run.stages):
            break
    return run


def _teacher_images(run: RecipeRun, name: str, t: dict, fresh: bool, report: Callable[[str], None]) -> StageInfo:
    """A dataset of the teacher's own images of another dataset's annotations (``distill.teacher_data``)."""
    from ..distill.components import teacher_identity
    from ..distill.config import ModelSection

    source = run.datasets[t["data"]]
    key = stage_key(f"data_{name}", t, (source.path.name, teacher_identity(t["model"], ModelSection())),
                    TEACHER_IMAGES)

    def build(out: Path) -> dict:
        from ..distill.teacher_data import write_teacher_dataset
        from ..factory import build_model

        model = build_model(t["model"]).eval()
        path = write_teacher_dataset(model, [str(run.json(t["data"]))], out, t.get("num"), t.get("seed", 0),
                                     t.get("a_prompt"), t.get("n_prompt"))
        return {"files": [path.name]}

    return cached_stage(run.root, f"dataset {name}", key, fresh, build, report)


def _mean(v) -> float:
    v = list(v)
    return float(sum(v) / len(v)) if v else float("nan")


__all__ = ["DONE", "RecipeRun", "STAGE_CODE", "StageInfo", "cached_stage", "code_version", "run_recipe", "stage_key",
           "train_stage"]
