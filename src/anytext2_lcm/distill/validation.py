"""Validation images during training: the model as it is now, rendered at the sampler's exact inference timesteps.

The student is sampled with ``validation.sampler`` (lcm 4 steps → timesteps [999, 759, 499, 259]) through the same
:class:`~anytext2_lcm.generation.Generator` users call, from a fixed seed, so images of different steps are
comparable. Files: ``OUTPUT/validation/step-NNNNNN/{k}_{sampler}{steps}.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def default_prompts(size: int) -> list[dict]:
    """Two prompts with one and two lines, boxes scaled to a size × size image."""
    def box(x0, y0, x1, y1):
        return [round(x0 * size), round(y0 * size), round(x1 * size), round(y1 * size)]

    return [{"prompt": 'a shop sign that says "OPEN"', "positions": [box(0.15, 0.35, 0.85, 0.6)]},
            {"prompt": 'a poster with the words "Hello" and "World"',
             "positions": [box(0.1, 0.15, 0.9, 0.4), box(0.1, 0.6, 0.9, 0.85)]}]


def render_validation(model, cfg, out_dir: Path, step: int) -> dict[str, np.ndarray]:
    """Render every (prompt, step count) pair; returns name → (H, W, 3) uint8 and writes PNGs."""
    import torch

    from ..atomic import save_image
    from ..generation import GenerationRequest, Generator
    from ..pipeline import NonFiniteError

    v = cfg.validation
    prompts = [{"prompt": p.prompt, "positions": p.positions} for p in v.prompts] or default_prompts(v.image_size)
    folder = Path(out_dir) / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    gen = Generator(model)
    options = {}
    if v.sampler == "pcm" and cfg.method == "pcm":  # visit exactly the student's phase edges
        options = {"num_phases": cfg.pcm.num_phases, "convention": cfg.pcm.convention}
    if v.sampler in ("lcm", "tcd", "pcm"):  # a student sampler visits the student's own grid
        options.update(original_steps=cfg.distill.num_ddim_timesteps, timestep_spacing=cfg.distill.timestep_spacing)
    images = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for n in v.steps:
                req = GenerationRequest(prompt=p["prompt"], positions=p["positions"] or None, height=v.image_size,
                                        width=v.image_size, seed=v.seed, steps=n, sampler=v.sampler,
                                        sampler_options=options, cfg_scale=v.cfg_scale, a_prompt=cfg.distill.a_prompt,
                                        n_prompt=cfg.distill.n_prompt)
                name = f"{i}_{v.sampler}{n}"
                try:
                    img = gen(req).images[0]
                except NonFiniteError as e:  # a diverged student: reported, the training goes on
                    log.warning("validation image %s at step %d not written: %s", name, step, e)
                    continue
                save_image(folder / f"{name}.png", img)
                images[name] = img
    log.info("validation: %d images in %s", len(images), folder)
    return images
