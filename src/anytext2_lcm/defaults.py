"""Sampling defaults: how the teacher and each kind of student are sampled, and the prompts AnyText2 adds.

Every entry point (``generate``, ``evaluate``, ``bench``, the UI, validation during training, the recipes) takes
its defaults from here, so that "the teacher" means the same run everywhere: AnyText2's 20-step DDIM with the
model's classifier-free guidance scale (:func:`teacher_sampling`: ``ModelConfig.guidance_scale``, the original demo's
7.5 unless the model records another; the shipped testbed records 5.0), and a student means the sampling its adapter
records (:func:`student_sampling`; ``lora.adapters`` writes it into the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHER_SAMPLER = "ddim"
TEACHER_STEPS = 20
TEACHER_CFG = 7.5
"""The teacher: DDIM, 20 steps, CFG 7.5 (AnyText2's demo; its benchmark uses 9): the guidance of a model that records
none (``ModelConfig.guidance_scale``'s default)."""

STUDENT_STEPS = (1, 2, 4, 8)
"""Step counts a student is evaluated and compared at."""
STUDENT_DEFAULT_STEPS = 4

DEFAULT_A_PROMPT = ("best quality, extremely detailed,4k, HD, supper legible text,  clear text edges,  clear strokes, "
                    "neat writing, no watermarks")
"""The original demo's added prompt (appended to the image prompt as ``prompt + ', ' + a_prompt``)."""
DEFAULT_N_PROMPT = ("low-res, bad anatomy, extra digit, fewer digits, cropped, worst quality, low quality, watermark, "
                    "unreadable text, messy words, distorted text, disorganized writing, advertising picture")
"""The original demo's negative prompt."""


@dataclass(frozen=True)
class Sampling:
    """How a model is sampled by default.

    Attributes:
        sampler: ddim, lcm, tcd or pcm.
        steps: step count.
        cfg: classifier-free guidance scale (1: no unconditional branch).
        options: sampler options (``samplers.make_sampler`` keyword arguments).
    """

    sampler: str
    steps: int
    cfg: float
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "cfg": self.cfg, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "Sampling":
        return cls(sampler=str(d["sampler"]), steps=int(d["steps"]), cfg=float(d["cfg"]),
                   options=dict(d.get("options") or {}))


TEACHER = Sampling(TEACHER_SAMPLER, TEACHER_STEPS, TEACHER_CFG)
"""AnyText2's teacher run; a given model's is :func:`teacher_sampling`."""


def teacher_cfg(model_cfg=None) -> float:
    """The teacher's CFG scale for a model: its ``ModelConfig.guidance_scale`` (``TEACHER_CFG`` without a model)."""
    return float(model_cfg.guidance_scale) if model_cfg is not None else TEACHER_CFG


def teacher_sampling(model_cfg=None) -> Sampling:
    """The teacher run of a model (``ModelConfig``): 20-step DDIM with the model's guidance scale."""
    return Sampling(TEACHER_SAMPLER, TEACHER_STEPS, teacher_cfg(model_cfg))


def student_sampling(method: str, num_phases: int = 4, convention: str = "inference", original_steps: int = 50,
                     with_cfg: bool = False, cfg: float = TEACHER_CFG, spacing: str = "trailing") -> Sampling:
    """The recommended sampling of a student distilled with ``method``.

    * ``lcm``: the LCM multistep sampler, 4 steps, no CFG (the teacher's guidance is distilled in);
    * ``pcm``: the deterministic phased sampler over the student's own phase edges, ``num_phases`` steps; no CFG
      when the guidance was distilled in, real CFG ``cfg`` (with the negative prompt) when ``with_cfg``: a student of
      a CFG-free teacher (``cfg`` = the teacher's own scale, :func:`teacher_cfg`) or a guided student
      (``pcm.guided_student``; ``cfg`` = :func:`trained_cfg`).

    The options name the student's grid: ``original_steps`` and, for a student of the leading grid
    (``distill.timestep_spacing``), ``timestep_spacing: leading`` (absent = trailing, as adapters before it).
    """
    grid = {"original_steps": original_steps} | ({} if spacing == "trailing" else {"timestep_spacing": spacing})
    if method == "lcm":
        return Sampling("lcm", STUDENT_DEFAULT_STEPS, 1.0, grid)
    if method == "pcm":
        return Sampling("pcm", num_phases, float(cfg) if with_cfg else 1.0,
                        {"num_phases": num_phases, "convention": convention} | grid)
    raise ValueError(f"no student sampling for method {method!r} (lcm or pcm)")


def trained_cfg(scale_range: tuple[float, float], teacher_scale: float) -> float:
    """The CFG scale to sample a student with that was trained through CFG at scales drawn from ``scale_range``
    (Imagen form, ``distill.guidance_scale_range``): the teacher's own scale when the range holds it, else the
    range's midpoint (a student is only trained for scales inside its range)."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    return float(teacher_scale) if lo <= teacher_scale <= hi else (lo + hi) / 2


__all__ = ["DEFAULT_A_PROMPT", "DEFAULT_N_PROMPT", "STUDENT_DEFAULT_STEPS", "STUDENT_STEPS", "Sampling", "TEACHER",
           "TEACHER_CFG", "TEACHER_SAMPLER", "TEACHER_STEPS", "student_sampling", "teacher_cfg", "teacher_sampling",
           "trained_cfg"]
