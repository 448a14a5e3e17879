"""Text quality of few-step students against their teacher, with the controls that make it meaningful.

One :func:`~.runner.evaluate` call generates, from the same seeds and x_T:

* ``teacher`` — 20-step DDIM + the model's CFG (``defaults.teacher_sampling``; 5 for the testbed): the reference;
* ``<student>@k`` — each student (an adapter loaded under its label) at each step count k with its own sampling;
* ``ddim@k`` — the teacher's own DDIM + CFG at k steps: what k steps give without distillation;
* ``undistilled@k`` — the teacher's weights (adapters bypassed) with a student's sampling (sampler, CFG, options)
  at k steps: what the sampler alone gives. Each student is compared with the control under its own sampling
  (:func:`control_names`): students that share a sampling share one control.

:func:`quality_table` turns the results into the figures the goals are stated in: Sen.ACC / NED and their retention
(run ÷ teacher), the latent MSE to the teacher's output and its ratio to the teacher's own k-step DDIM
(``ddim@k``) and to the student's undistilled control, seconds per image and the speed-up.
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


def _control_options(sampling: Sampling) -> tuple:
    """The sampler options of a student's undistilled control: the student's, without ``num_phases``. The phase count
    only checks which step counts a student accepts (``samplers.PCMSampler``; the visited timesteps do not depend on
    it), and the undistilled weights were trained with no phases, so their run accepts every k."""
    return tuple(sorted((k, v) for k, v in sampling.options.items() if k != "num_phases"))


def control_names(students: Sequence[Student]) -> dict[str, str]:
    """Label → run name (without ``@k``) of that student's undistilled control: the teacher's weights under the
    student's sampling. The first sampling's control is ``undistilled``; a student whose sampling differs from every
    earlier one gets ``undistilled-<its label>``; a student sharing an earlier student's sampling shares its
    control (LCM and LCM + OCR term, both LCM-sampled without CFG). ``num_phases`` is not part of a sampling's
    identity here (:func:`_control_options`), so PCM students trained with 4 and 8 phases share one control."""
    names: dict[str, str] = {}
    by_sampling: dict[tuple, str] = {}
    for s in students:
        key = (s.sampling.sampler, float(s.sampling.cfg), _control_options(s.sampling))
        if key not in by_sampling:
            by_sampling[key] = "undistilled" if not by_sampling else f"undistilled-{s.label}"
        names[s.label] = by_sampling[key]
    return names


def quality_runs(students: Sequence[Student], steps: Sequence[int], controls: bool = True,
                 teacher: Sampling | None = None) -> list[RunSpec]:
    """The run list: teacher, every student at every k, and (``controls``) ``ddim@k`` and each distinct sampling's
    undistilled control at every k (:func:`control_names`). ``teacher``: the reference run (None: 20-step DDIM with
    the evaluated model's own guidance scale, which ``evaluate`` fills in)."""
    t_cfg = teacher.cfg if teacher is not None else None
    teacher = teacher or TEACHER
    runs = [RunSpec("teacher", teacher.sampler, teacher.steps, t_cfg, tuple(sorted(teacher.options.items())))]
    for s in students:
        opts = tuple(sorted(s.sampling.options.items()))
        runs += [RunSpec(f"{s.label}@{k}", s.sampling.sampler, k, s.sampling.cfg, opts,
                         lora=True, adapter=s.adapter or s.label) for k in steps]
    if controls:
        runs += [RunSpec(f"ddim@{k}", "ddim", k, t_cfg) for k in steps]
        names, done = control_names(students), set()
        for s in students:
            if names[s.label] not in done:
                done.add(names[s.label])
                runs += [RunSpec(f"{names[s.label]}@{k}", s.sampling.sampler, k, s.sampling.cfg,
                                 _control_options(s.sampling)) for k in steps]
    return runs


def _row(res: dict, name: str) -> dict | None:
    return next((r for r in res["runs"] if r["name"] == name), None)


def quality_table(res: dict, labels: Sequence[str], steps: Sequence[int], language: str = "Latin",
                  controls: dict[str, str] | None = None) -> list[dict]:
    """One row per (run, k): sen_acc, ned, their retention vs the teacher, latent_mse, latent_mse_ratio (÷ the
    ``ddim@k`` control's), seconds per image and the speed-up, for ``language`` (or "all"); then the ``ddim`` rows
    and the undistilled controls' rows. A student's row also has ``control`` (its control's run name, from
    ``controls`` = :func:`control_names`; None: ``undistilled`` for every student) and ``mse_vs_undistilled``
    (its latent MSE ÷ that control's at the same k: below 1 = closer to the teacher than the sampler alone)."""
    controls = controls if controls is not None else {label: "undistilled" for label in labels}
    teacher = _row(res, "teacher")
    t_ocr = teacher["ocr"].get(language) or {}
    rows = []
    control_runs = list(dict.fromkeys(controls[label] for label in labels)) or ["undistilled"]
    for label in list(labels) + ["ddim"] + control_runs:
        for k in steps:
            r = _row(res, f"{label}@{k}")
            if r is None:
                continue
            ocr = r["ocr"].get(language) or {}
            mse = _mse(r)
            ctrl = _row(res, f"ddim@{k}")
            own = _row(res, f"{controls[label]}@{k}") if label in controls else None
            rows.append({
                "run": label, "steps": k, "lines": ocr.get("lines"), "sen_acc": ocr.get("sen_acc"),
                "ned": ocr.get("ned"),
                "sen_acc_retention": _div(ocr.get("sen_acc"), t_ocr.get("sen_acc")),
                "ned_retention": _div(ocr.get("ned"), t_ocr.get("ned")),
                "latent_mse": mse, "latent_mse_ratio": _div(mse, _mse(ctrl)),
                "control": controls.get(label), "mse_vs_undistilled": _div(mse, _mse(own)),
                "seconds_per_image": r["seconds_per_image"]["mean"], "speedup": r["speedup_vs_teacher"]})
    return rows


def _mse(run: dict | None) -> float | None:
    return (run["fidelity_to_teacher"] or {}).get("latent_mse") if run else None


def _div(a, b):
    return a / b if a is not None and b else None


def format_table(res: dict, rows: list[dict], language: str = "Latin") -> str:
    """Markdown: the teacher's line, then one line per (run, k)."""
    t = _row(res, "teacher")
    t_ocr = t["ocr"].get(language) or {}
    f = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    out = [f"OCR of the {language} lines ({t_ocr.get('lines', 0)}) and fidelity to the teacher (latent MSE; ratio "
           "to the teacher's own DDIM at the same step count, and to the student's undistilled control: the "
           "teacher's weights under the student's sampling):", "",
           "| run | steps | Sen.ACC | NED | Sen.ACC ÷ teacher | NED ÷ teacher | latent MSE | ÷ DDIM@k | "
           "÷ undistilled@k | s/image | speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
           f"| teacher (DDIM + CFG {t['cfg']:g}) | {t['steps']} | {f(t_ocr.get('sen_acc'))} | {f(t_ocr.get('ned'))} "
           f"| 1 | 1 | 0 | | | {f(t['seconds_per_image']['mean'], 2)} | 1 |"]
    for r in rows:
        vs = r.get("mse_vs_undistilled")
        out.append(f"| {r['run']} | {r['steps']} | {f(r['sen_acc'])} | {f(r['ned'])} | {f(r['sen_acc_retention'])} "
                   f"| {f(r['ned_retention'])} | {f(r['latent_mse'])} | {f(r['latent_mse_ratio'], 2)} | "
                   f"{'' if vs is None else f(vs, 2)} | {f(r['seconds_per_image'], 2)} | {f(r['speedup'], 1)} |")
    return "\n".join(out) + "\n"


__all__ = ["Student", "control_names", "format_table", "quality_runs", "quality_table"]
