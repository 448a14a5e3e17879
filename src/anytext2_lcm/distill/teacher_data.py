"""The teacher's own images of a dataset's annotations, written as an AnyWord dataset for a student to distil on.

Why: consistency distillation trains the student at forward-noised states q(x_t | x_0) of the *training images*,
but the student is sampled along the *teacher's* trajectories, whose images are the teacher's renderings of the
lines, not the dataset's. Distilling on x_0 = the teacher's own sampled images puts the training states nearer to
where sampling goes. Measured on the testbed (``docs/methods.md``, fourth run), 1024 such images did not help a
guided 8-phase PCM student on the leading grid: as good at 1–4 steps, worse at 8 than the same student on the real
training images. The option stays for larger teacher sets and other teachers; measure before relying on it.

Each usable row of the source files (the evaluation's reader, :func:`~..evaluate.runner.load_eval_samples`: lines
cut to ``max_chars``, polygons scaled to the generation size) is sampled exactly as the evaluation samples its
teacher run — the caption, the lines at their polygons and colours, the teacher's 20-step DDIM with the model's own
CFG scale, the given prompts, x_T from the row's seed — and written as ``images/NNNNNN.png`` with its annotation
(the lines as rendered, in generation pixels) in ``anyword_teacher.json``. The model's generator is used as is
(there is no dataset writer for generated images in the libraries this project builds on). Images are written
atomically and an interrupted run resumes: an image already on disk is kept, the JSON is written last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic import save_image, write_json
from ..defaults import teacher_sampling

log = logging.getLogger(__name__)

__all__ = ["TEACHER_DATA_FILE", "write_teacher_dataset"]

TEACHER_DATA_FILE = "anyword_teacher.json"


@torch.no_grad()
def write_teacher_dataset(model, json_paths: list[str], out: str | Path, num: int | None = None, seed: int = 0,
                          a_prompt: str | None = None, n_prompt: str | None = None,
                          size: int | None = None) -> Path:
    """Sample the teacher on the first ``num`` usable rows of ``json_paths`` and write them as a dataset.

    Args:
        model: the teacher (``AnyText2``, without adapters or with them to be bypassed: adapters are disabled).
        json_paths: AnyWord annotation files (their images need not exist: only captions and lines are used).
        out: the dataset folder (``images/`` and ``anyword_teacher.json``).
        num: rows to sample (None: all usable rows).
        seed: row i's x_T is drawn from seed + i (the evaluation's rule).
        a_prompt, n_prompt: the prompts of the sampling (None: the evaluation's defaults); give those the student
            will be distilled and sampled with.
        size: the generation size (None: the model's own).

    Returns:
        The path of the written annotation file.
    """
    from .. import lora as L
    from ..evaluate.runner import EvalConfig, EvalGenerator, RunSpec, initial_noise, load_eval_samples, sample_request
    from ..evaluate.runtime import RuntimeOptions, apply_runtime_options

    out = Path(out)
    cfg = EvalConfig(data=tuple(map(str, json_paths)), num=num, seed=seed, size=size or model.cfg.image_size,
                     reference=False, warmup=False)
    if a_prompt is not None:
        cfg = replace(cfg, a_prompt=a_prompt)
    if n_prompt is not None:
        cfg = replace(cfg, n_prompt=n_prompt)
    samples, rep = load_eval_samples(cfg)
    if not samples:
        raise ValueError(f"teacher data: no usable row in {list(cfg.data)} (skipped: {dict(rep.skipped)})")
    t = teacher_sampling(model.cfg)
    spec = RunSpec("teacher", t.sampler, t.steps, t.cfg, (("eta", 0.0),))
    _, gen = apply_runtime_options(model, RuntimeOptions(), generator_cls=EvalGenerator, glyph_font=cfg.glyph_font)
    side = cfg.size // model.cfg.latent_factor
    settings = {"sampler": t.sampler, "steps": t.steps, "cfg": t.cfg, "seed": seed, "a_prompt": cfg.a_prompt,
                "n_prompt": cfg.n_prompt, "size": cfg.size, "sources": list(cfg.data)}
    # A resumed run keeps the images on disk, so it must be the same run: refuse a folder made with other settings.
    marker = out / "teacher_data_settings.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != settings:
            raise ValueError(f"{out}: holds teacher images made with other settings ({marker}); use a new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(marker, settings)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, t0, made = [], time.perf_counter(), 0
    with L.disable_adapters(model) if L.lora_layers(model) else contextlib.nullcontext():
        for s in samples:
            name = f"{s.index:06d}.png"
            if not (images / name).exists():
                x_T = initial_noise(s.seed, 1, model.cfg.unet.in_channels, side, side)
                res = gen(sample_request(s, spec, cfg), x_T=x_T)
                save_image(images / name, res.images[0])
                made += 1
                if made % 100 == 0:
                    log.info("teacher data: %d/%d images (%.2f s/image)", s.index + 1, len(samples),
                             (time.perf_counter() - t0) / made)
            rows.append({"img_name": name, "caption": s.caption,
                         "annotations": [{"polygon": [[round(x, 2), round(y, 2)] for x, y in ln.polygon],
                                          "text": ln.text, "language": ln.language, "valid": True,
                                          **({"color": list(ln.color)} if ln.color is not None else {})}
                                         for ln in s.lines]})
    path = out / TEACHER_DATA_FILE
    write_json(path, {"data_root": "images", "data_list": rows,
                      "generated_by": settings})
    log.info("teacher data: %d images in %s (%d sampled now, %.0f s)", len(rows), out, made,
             time.perf_counter() - t0)
    return path
