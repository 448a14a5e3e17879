"""Text quality of few-step students against their teacher, with the controls that make it meaningful.

One :func:`~.runner.evaluate` call generates, from the same seeds and x_T:

* ``teacher`` — 20-step DDIM + CFG 7.5 (AnyText2's setting): the reference;
* ``<student>@k`` — each student (an adapter loaded under its label) at each step count k with its own sampling;
* ``ddim@k`` — the teacher's own DDIM + CFG at k steps: what k steps give without distillation;
* ``undistilled@k`` — the teacher's weights (adapters bypassed) with a student's sampler at k steps: what the
  sampler alone gives.

:func:`quality_table` turns the results into the figures the goals are stated in: Sen.ACC / NED and their retention
(run ÷ teacher), the latent MSE to the teacher's output and its ratio to the teacher's own k-step DDIM
(``ddim@k``), seconds per image and the speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..defaults import TEACHER, Sampling
from .runner import RunSpec


@dataclass(frozen=True)
class Student:
    """A student in a quality run: its label in the table, its sampling, and the loaded adapter it runs
    (``load_lora(..., adapter_name=...)``; None: the label). Two students may share an adapter with different
    samplers (LCM sampled with LCM and with TCD)."""

    label: str
    sampling: Sampling
    adapter: str | None = None


def quality_runs(students: Sequence[Student], steps: Sequence[int], controls: bool = True,
                 teacher: Sampling = TEACHER) -> list[RunSpec]:
    """The run list: teacher, every student at every k, and (``controls``) ``ddim@k`` and ``undistilled@k`` (with
    the first student's sampler)."""
    runs = [RunSpec("teacher", teacher.sampler, teacher.steps, teacher.cfg, tuple(sorted(teacher.options.items())))]
    for s in students:
        opts = tuple(sorted(s.sampling.options.items()))
        runs += [RunSpec(f"{s.label}@{k}", s.sampling.sampler, k, s.sampling.cfg, opts,
                         lora=True, adapter=s.adapter or s.label) for k in steps]
    if controls:
        runs += [RunSpec(f"ddim@{k}", "ddim", k, teacher.cfg) for k in steps]
        if students:
            s = students[0].sampling
            runs += [RunSpec(f"undistilled@{k}", s.sampler, k, s.cfg, tuple(sorted(s.options.items())))
                     for k in steps]
    return runs


def _row(res: dict, name: str) -> dict | None:
    return next((r for r in res["runs"] if r["name"] == name), None)


def quality_table(res: dict, labels: Sequence[str], steps: Sequence[int], language: str = "Latin") -> list[dict]:
    """One row per (run, k): sen_acc, ned, their retention vs the teacher, latent_mse, latent_mse_ratio (÷ the
    ``ddim@k`` control's), seconds per image and the speed-up, for ``language`` (or "all")."""
    teacher = _row(res, "teacher")
    t_ocr = teacher["ocr"].get(language) or {}
    rows = []
    for label in list(labels) + ["ddim", "undistilled"]:
        for k in steps:
            r = _row(res, f"{label}@{k}")
            if r is None:
                continue
            ocr = r["ocr"].get(language) or {}
            ctrl = _row(res, f"ddim@{k}")
            mse = (r["fidelity_to_teacher"] or {}).get("latent_mse")
            c_mse = (ctrl["fidelity_to_teacher"] or {}).get("latent_mse") if ctrl else None
            rows.append({
                "run": label, "steps": k, "lines": ocr.get("lines"), "sen_acc": ocr.get("sen_acc"),
                "ned": ocr.get("ned"),
                "sen_acc_retention": _div(ocr.get("sen_acc"), t_ocr.get("sen_acc")),
                "ned_retention": _div(ocr.get("ned"), t_ocr.get("ned")),
                "latent_mse": mse, "latent_mse_ratio": _div(mse, c_mse),
                "seconds_per_image": r["seconds_per_image"]["mean"], "speedup": r["speedup_vs_teacher"]})
    return rows


def _div(a, b):
    return a / b if a is not None and b else None


def format_table(res: dict, rows: list[dict], language: str = "Latin") -> str:
    """Markdown: the teacher's line, then one line per (run, k)."""
    t = _row(res, "teacher")
    t_ocr = t["ocr"].get(language) or {}
    f = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    out = [f"OCR of the {language} lines ({t_ocr.get('lines', 0)}) and fidelity to the teacher (latent MSE; ratio "
           "to the teacher's own DDIM at the same step count):", "",
           "| run | steps | Sen.ACC | NED | Sen.ACC ÷ teacher | NED ÷ teacher | latent MSE | ÷ DDIM@k | s/image | "
           "speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
           f"| teacher (DDIM + CFG {t['cfg']:g}) | {t['steps']} | {f(t_ocr.get('sen_acc'))} | {f(t_ocr.get('ned'))} "
           f"| 1 | 1 | 0 | | {f(t['seconds_per_image']['mean'], 2)} | 1 |"]
    for r in rows:
        out.append(f"| {r['run']} | {r['steps']} | {f(r['sen_acc'])} | {f(r['ned'])} | {f(r['sen_acc_retention'])} "
                   f"| {f(r['ned_retention'])} | {f(r['latent_mse'])} | {f(r['latent_mse_ratio'], 2)} | "
                   f"{f(r['seconds_per_image'], 2)} | {f(r['speedup'], 1)} |")
    return "\n".join(out) + "\n"


__all__ = ["Student", "format_table", "quality_runs", "quality_table"]
