"""A recipe as typed, validated data: synthetic datasets, training stages, and sections its command reads.

YAML form (``configs/testbed.yaml`` and ``configs/demo.yaml`` are complete examples)::

    name: testbed
    threads: 2                       # torch threads of the whole job
    datasets:                        # name -> make-data settings (data.synthetic.SynthConfig fields)
      train:   {num: 20000, size: 128, vocabulary: testbed-train, seed: 0, ...}
      heldout: {num: 256, size: 128, vocabulary: testbed-heldout, seed: 1000, ...}
      train_teacher:                 # or the teacher's own images of another dataset (teacher_images_settings)
        teacher_images: {data: train, model: testbed, num: 1024, seed: 5000}
    stages:                          # run in this order; name -> stage
      vae:
        from: null                   # null: a random model.preset; a stage above; or a model name (testbed)
        data: train                  # the dataset its data.json_paths reads
        config: {method: vae, ...}   # a TrainConfig without output_dir, data.json_paths and model.teacher
      teacher: {from: vae, data: train, config: {method: teacher, ...}}
    eval: {...}                      # any other section belongs to the command that runs the recipe

``key.sub=value`` overrides address the same tree (``stages.teacher.config.train.max_steps=100``). Everything is
validated when the recipe is loaded, before any data or model is built: each dataset by ``SynthConfig``, each
stage's config by ``distill.config.load_config``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(kw_only=True)
class StageSpec:
    """One training stage of a recipe.

    Attributes:
        name: the stage's name (its folder and cache key start with it).
        start: where its model comes from: None (a random ``config.model.preset``), the name of an earlier stage
            (that stage's result model), or a model name of ``factory.MODEL_NAMES`` (e.g. the shipped ``testbed``).
        data: the dataset its ``data.json_paths`` reads.
        config: the stage's ``TrainConfig`` as plain data (without ``output_dir``, ``data.json_paths`` and
            ``model.teacher``, which the recipe fills in).
    """

    name: str
    start: str | None
    data: str
    config: dict


@dataclass(kw_only=True)
class Recipe:
    """A whole job; see the module docstring."""

    name: str
    threads: int = 1
    datasets: dict[str, dict] = field(default_factory=dict)
    stages: list[StageSpec] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    """The other top-level sections (``eval``, ``gate``, ``ship``, ...), for the command that runs the recipe."""

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return json.loads(json.dumps({
            "name": self.name, "threads": self.threads, "datasets": self.datasets,
            "stages": {s.name: {"from": s.start, "data": s.data, "config": s.config} for s in self.stages},
            **self.sections}))


def synth_config(values: dict, where: str):
    """A validated ``SynthConfig`` from a dataset's settings (``where`` names it in errors)."""
    import dataclasses

    from ..data.synthetic import SynthConfig

    names = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown make-data field (known: {', '.join(sorted(names))})")
    try:
        return SynthConfig(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


TEACHER_IMAGES = "teacher_images"
TEACHER_IMAGES_FIELDS = {"data": str, "model": str, "num": int, "seed": int, "a_prompt": str, "n_prompt": str}


def teacher_images_settings(values: dict, where: str, synthetic: list[str]) -> dict:
    """The validated settings of a dataset of the teacher's own images (``distill.teacher_data``)::

        train_teacher:
          teacher_images: {data: train, model: testbed, num: 1024, seed: 5000, a_prompt: ..., n_prompt: ...}

    ``data``: a synthetic dataset of the recipe whose annotations are sampled; ``model``: the teacher (a model name
    of ``factory.MODEL_NAMES``); ``num``: rows (default all); ``seed``: row i's x_T seed is seed + i (default 0);
    ``a_prompt`` / ``n_prompt``: the sampling's prompts (default the evaluation's).
    """
    from ..factory import MODEL_NAMES

    unknown = sorted(set(values) - {TEACHER_IMAGES})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: a teacher_images dataset has no other field")
    t = values[TEACHER_IMAGES]
    if not isinstance(t, dict):
        raise ConfigError(f"{where}.{TEACHER_IMAGES}: expected a mapping ({', '.join(TEACHER_IMAGES_FIELDS)})")
    for k, v in t.items():
        typ = TEACHER_IMAGES_FIELDS.get(k)
        if typ is None:
            raise ConfigError(f"{where}.{TEACHER_IMAGES}.{k}: unknown field (known: {', '.join(TEACHER_IMAGES_FIELDS)})")
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ConfigError(f"{where}.{TEACHER_IMAGES}.{k}={v!r}: must be a {typ.__name__}")
    if t.get("data") not in synthetic:
        raise ConfigError(f"{where}.{TEACHER_IMAGES}.data={t.get('data')!r}: not a synthetic dataset of the recipe "
                          f"({', '.join(synthetic) or 'none'})")
    if t.get("model") not in MODEL_NAMES:
        raise ConfigError(f"{where}.{TEACHER_IMAGES}.model={t.get('model')!r}: not a model name "
                          f"({', '.join(MODEL_NAMES)})")
    if t.get("num", 1) < 1 or t.get("seed", 0) < 0:
        raise ConfigError(f"{where}.{TEACHER_IMAGES}: num must be >= 1 and seed >= 0")
    return t


def stage_train_config(stage: StageSpec, output_dir: str, json_paths: list[str], teacher: str | None,
                       check_files: bool = True):
    """The stage's validated ``TrainConfig`` with the recipe's parts filled in."""
    from ..distill.config import load_config

    d = copy.deepcopy(stage.config)
    d["output_dir"] = output_dir
    d.setdefault("data", {})["json_paths"] = list(json_paths)
    d.setdefault("model", {})["teacher"] = teacher
    try:
        return load_config(None, [], base=d, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"stages.{stage.name}.config: {e}") from None


def recipe_from_dict(d: dict) -> Recipe:
    """Build and validate a recipe from plain data; unknown stage keys and bad values are errors naming the field."""
    from ..factory import MODEL_NAMES

    d = copy.deepcopy(d or {})
    name = d.pop("name", "recipe")
    threads = d.pop("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads={threads!r}: must be an integer >= 1")
    datasets = d.pop("datasets", None) or {}
    if not isinstance(datasets, dict):
        raise ConfigError("datasets: expected a mapping of name -> make-data settings")
    for ds_name, values in datasets.items():
        if not isinstance(values, dict):
            raise ConfigError(f"datasets.{ds_name}: expected a mapping of make-data settings")
        if TEACHER_IMAGES in values:
            teacher_images_settings(values, f"datasets.{ds_name}", [n for n in datasets if n != ds_name and
                                                                   TEACHER_IMAGES not in datasets[n]])
        else:
            synth_config(values, f"datasets.{ds_name}")
    stages_doc = d.pop("stages", None) or {}
    if not isinstance(stages_doc, dict):
        raise ConfigError("stages: expected a mapping of name -> stage (run in the order given)")
    stages: list[StageSpec] = []
    for s_name, s in stages_doc.items():
        where = f"stages.{s_name}"
        if not set(str(s_name)) <= NAME_CHARS:
            raise ConfigError(f"{where}: stage names use a-z, 0-9, '_' and '-'")
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: expected a mapping with from, data, config")
        unknown = sorted(set(s) - {"from", "data", "config"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: config, data, from)")
        start = s.get("from")
        earlier = [x.name for x in stages]
        if start is not None and start not in earlier and start not in MODEL_NAMES:
            raise ConfigError(f"{where}.from={start!r}: not an earlier stage ({', '.join(earlier) or 'none'}), a "
                              f"model name ({', '.join(MODEL_NAMES)}) or null")
        data = s.get("data", "train")
        if data not in datasets:
            raise ConfigError(f"{where}.data={data!r}: no such dataset (known: {', '.join(datasets) or 'none'})")
        config = s.get("config") or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{where}.config: expected a mapping of TrainConfig sections")
        spec = StageSpec(name=str(s_name), start=start, data=data, config=config)
        stage_train_config(spec, "unused", ["unused.json"], None if start is None else "tiny", check_files=False)
        stages.append(spec)
    return Recipe(name=str(name), threads=threads, datasets=datasets, stages=stages, sections=d)


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Recipe:
    """A recipe from a YAML file (or ``base``) with ``key.sub=value`` overrides (values are YAML)."""
    from ..distill.config import apply_overrides, read_yaml

    d = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    apply_overrides(d, list(overrides or []))
    return recipe_from_dict(d)


__all__ = ["Recipe", "StageSpec", "TEACHER_IMAGES", "load_recipe", "recipe_from_dict", "stage_train_config",
           "synth_config", "teacher_images_settings"]
