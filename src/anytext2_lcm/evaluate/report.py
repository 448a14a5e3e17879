"""Writing an evaluation: ``results.json`` (every number and the config), ``report.md`` (tables + grids) and
``grids/grid_NNN.png`` (rows = samples; columns = glyphs | teacher | student@k ..., each tile captioned with what
the OCR read, green when every line is exact).

JSON numbers are plain floats; an infinite PSNR (a student image identical to the teacher's) is written as the
string ``"inf"`` so that the file stays strict JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


from ..atomic import save_image, write_json, write_text

GRID_ROWS = 8
"""Samples per grid image."""
MAX_GRIDS = 4
"""Grid images written at most (the first GRID_ROWS·MAX_GRIDS samples)."""


def _strict(x: Any) -> Any:
    """Replace non-finite floats with strings ("inf", "-inf", "nan") for strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_report(results: dict, out: str | os.PathLike, grid_rows: int = GRID_ROWS, max_grids: int = MAX_GRIDS,
                 tile: int = 256, train_run: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the grids, ``results.json`` and ``report.md`` into ``out``; returns their paths.

    ``train_run``: the student's distillation run folder; its ``metrics.jsonl`` becomes ``loss.png`` (the loss per
    optimizer step and its moving average), embedded in the report with the first / last losses.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grids = make_grids(results, out, grid_rows=grid_rows, max_grids=max_grids, tile=tile)
    results = dict(results, grids=[str(g.relative_to(out)) for g in grids])
    extra = {}
    if train_run is not None:
        training = training_summary(train_run)
        if training is not None:
            from .figures import loss_curve

            loss_curve(training.pop("series"), out / "loss.png",
                       title=f"distillation loss, {Path(training['run']).name}")
            results = dict(results, training=dict(training, loss_curve="loss.png"))
            extra["loss_curve"] = out / "loss.png"
    jpath = write_json(out / "results.json", _strict(results), indent=1, ensure_ascii=False, allow_nan=False)
    mpath = write_text(out / "report.md", markdown(results))
    return {"json": jpath, "markdown": mpath, **{f"grid{i}": g for i, g in enumerate(grids)}, **extra}


def training_summary(run_dir: str | os.PathLike) -> dict | None:
    """The loss history of a distillation run folder (``metrics.jsonl``), or None when it has none.

    Returns ``{"run", "steps", "loss_first", "loss_last", "window", "series"}``: loss_first / loss_last are the means
    of the first / last ``window`` logged steps (a tenth of the run, at least 1); series = [(step, loss)].
    """
    from .figures import read_losses

    series = read_losses(Path(run_dir))
    finite = [v for _, v in series if math.isfinite(v)]
    if not finite:
        return None
    k = max(1, len(finite) // 10)
    return {"run": str(run_dir), "steps": series[-1][0], "loss_first": sum(finite[:k]) / k,
            "loss_last": sum(finite[-k:]) / k, "window": k, "series": series}


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _x(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def results_table(results: dict) -> str:
    """The main table: one row per run."""
    head = ("| run | sampler | steps | CFG | UNet evals / image | Sen.ACC | NED | PSNR vs teacher (dB) | SSIM | "
            "latent MSE | s / image | speed-up (measured) | eval-count ratio |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results["runs"]:
        o = r["ocr"].get("all", {})
        fid = r["fidelity_to_teacher"] or {}
        ps = fid.get("psnr_db")
        if isinstance(ps, float) and math.isinf(ps) and fid.get("psnr_db_finite_mean") is not None:
            ps_s = f"∞ ({fid['identical_images']} identical; rest {fid['psnr_db_finite_mean']:.2f})"
        else:
            ps_s = _f(ps, 2)
        rows.append(
            f"| {r['name']} | {r['sampler']} | {r['steps'] or '–'} | {_f(r['cfg'] or None, 1)} | "
            f"{r['unet_evals_per_image'] or '–'} | "
            f"{_f(o.get('sen_acc'))} | {_f(o.get('ned'))} | {ps_s} | {_f(fid.get('ssim'))} | "
            f"{_f(fid.get('latent_mse'), 4)} | {_f(r['seconds_per_image']['mean'], 2)} | "
            f"{_x(r['speedup_vs_teacher'], 2)} | {_x(r['eval_count_ratio_vs_teacher'], 1)} |")
    return "\n".join(rows)


def language_table(results: dict) -> str:
    langs = sorted({k for r in results["runs"] for k in r["ocr"] if k != "all"})
    if not langs:
        return ""
    head = "| run | " + " | ".join(f"{l} Sen.ACC | {l} NED" for l in langs) + " |"
    rows = [head, "|" + "|".join(["---"] * (1 + 2 * len(langs))) + "|"]
    for r in results["runs"]:
        cells = []
        for l in langs:
            o = r["ocr"].get(l, {})
            cells += [_f(o.get("sen_acc")), _f(o.get("ned"))]
        rows.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    n = {l: max(r["ocr"].get(l, {}).get("lines", 0) for r in results["runs"]) for l in langs}
    return "\n".join(rows) + "\n\nLines per image set: " + ", ".join(f"{l} {v}" for l, v in n.items())


def markdown(results: dict) -> str:
    c, d = results["config"], results["dataset"]
    lines = [
        "# AnyText2 teacher vs few-step students",
        "",
        f"Model `{c['model']}` on {c['device']} ({c['dtype']}, {c['threads']} threads), LoRA: "
        f"{'yes' if c['lora'] else 'no (the student is the teacher weights with the student sampler)'}, "
        f"runtime options: {c['runtime']}. Size {c['size']}², {c['images_per_prompt']} image(s) per prompt, "
        f"seed {c['seed']} + sample index, teacher DDIM {c['teacher_steps']} steps CFG {c['teacher_cfg']}, "
        f"students `{c['student_sampler']}` CFG {c['student_cfg']}.",
        "",
        f"Data: {', '.join(f'`{f}`' for f in d['files'])}: {d['samples']} samples, {d['lines']} lines "
        f"({', '.join(f'{k} {v}' for k, v in d['languages'].items())}); skipped samples "
        f"{d['skipped_samples'] or 'none'}, dropped lines {d['dropped_lines'] or 'none'}.",
        "",
        "## Results",
        "",
        results_table(results),
        "",
        "## OCR accuracy per language",
        "",
        language_table(results),
        "",
        "Sen.ACC = exact match, NED = 1 − edit distance / max length (AnyText's `eval_dgocr.py` definitions); lines "
        "cropped by their position (min-area rectangle → 3×48×320) and read by the offline PP-OCRv4 recogniser "
        f"(`{Path(c['ocr_model']).name}`), not the benchmark's DuGuang OCR. Fidelity: student vs teacher images at "
        "the same seed and x_T (PSNR/SSIM on [0, 1] images, MSE on final latents). Seconds per image: generator "
        "wall time (rendering, conditioning, sampling, decoding; OCR excluded), mean over samples after an untimed "
        "warm-up; speed-up = teacher's mean / run's mean, measured in this run. Eval-count ratio = the teacher's "
        "UNet evaluations / the run's (what the step count alone would give). The `reference` row reads the "
        "dataset's own images, resized to the evaluation size, through the same crop and OCR: what the protocol "
        "gives on real text at this size.",
        "",
    ]
    tr = results.get("training")
    if tr:
        lines += ["## Distillation run", "",
                  f"`{tr['run']}`: {tr['steps']} optimizer steps; loss {tr['loss_first']:.4g} (mean of the first "
                  f"{tr['window']} logged steps) → {tr['loss_last']:.4g} (mean of the last {tr['window']}).", "",
                  f"![distillation loss]({tr['loss_curve']})", ""]
    if results.get("grids"):
        lines += ["## Grids", "",
                  "Columns: glyphs + positions | reference (the dataset image) | teacher | students; under each "
                  "image the OCR reading per line "
                  "(green: every line exact).", ""]
        lines += [f"![grid {i}]({g})" for i, g in enumerate(results["grids"])]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------------------


def _label_font(size: int):
    from PIL import ImageFont

    from ..data.fonts import FontNotFoundError, find_default_font

    try:
        return find_default_font().load(size)
    except (FontNotFoundError, OSError):
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_grids(results: dict, out: Path, grid_rows: int = GRID_ROWS, max_grids: int = MAX_GRIDS,
               tile: int = 256) -> list[Path]:
    """PNG grids from the saved images (first image of each sample): rows = samples, columns = glyphs, teacher,
    students; a header row of column names and, under each generated tile, the OCR readings."""
    from PIL import Image, ImageDraw

    runs = [r["name"] for r in results["runs"]]
    folders = {r["name"]: r["name"].replace("@", "_") for r in results["runs"]}
    samples = results["samples"][:grid_rows * max_grids]
    size = results["config"]["size"]
    # small images are shown enlarged so that the captions fit under them
    t = max(min(tile, size), 160)
    font = _label_font(max(10, t // 16))
    line_h = max(12, t // 14)
    cap_h = line_h * 2 + 4
    head_h = line_h + 8
    cols = ["glyphs"] + runs
    paths = []
    gdir = out / "grids"
    gdir.mkdir(parents=True, exist_ok=True)
    for g in range(0, len(samples), grid_rows):
        chunk = samples[g:g + grid_rows]
        W = len(cols) * t
        H = head_h + len(chunk) * (t + cap_h)
        canvas = Image.new("RGB", (W, H), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for j, name in enumerate(cols):
            draw.text((j * t + 4, 4), _fit_text(draw, name, font, t - 8), fill=(0, 0, 0), font=font)
        for i, s in enumerate(chunk):
            y = head_h + i * (t + cap_h)
            for j, name in enumerate(cols):
                path = (out / "images" / "glyphs" / f"{s['index']:05d}.png" if name == "glyphs"
                        else out / "images" / folders[name] / f"{s['index']:05d}_0.png")
                if path.is_file():
                    with Image.open(path) as im:
                        resample = Image.NEAREST if t > size else Image.BILINEAR
                        canvas.paste(im.convert("RGB").resize((t, t), resample), (j * t, y))
                else:
                    draw.text((j * t + 4, y + t // 2), "(not generated)", fill=(160, 0, 0), font=font)
                if name == "glyphs":
                    cap = f"#{s['index']} " + " | ".join(s["texts"])
                    draw.text((j * t + 4, y + t + 2), _fit_text(draw, cap, font, t - 8), fill=(0, 0, 0), font=font)
                    continue
                reads = s["reads"].get(name)
                if reads is None:
                    continue
                ok = reads[0] == s["texts"]
                cap = " | ".join(reads[0]) or "(nothing read)"
                draw.text((j * t + 4, y + t + 2), _fit_text(draw, cap, font, t - 8),
                          fill=(0, 140, 0) if ok else (200, 0, 0), font=font)
                ps = s["psnr"].get(name)
                if ps:
                    v = ps[0]
                    draw.text((j * t + 4, y + t + 2 + line_h), f"PSNR {'∞' if v == math.inf else f'{v:.1f}'} dB",
                              fill=(90, 90, 90), font=font)
        path = save_image(gdir / f"grid_{g // grid_rows:03d}.png", canvas)
        paths.append(path)
    return paths


