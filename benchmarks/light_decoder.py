"""What the light decoder and bf16 cost in text: OCR of the same images through the full and the light decoder, in
fp32 and bf16, on the testbed's held-out lines. One command:

    python benchmarks/light_decoder.py --model testbed --lora ADAPTER            # the student, 1/2/4 steps
    python benchmarks/light_decoder.py --model testbed                           # the teacher's weights only
    python benchmarks/light_decoder.py --model MODEL_DIR --reconstruction-only   # a VAE stage: reconstructions
    python benchmarks/light_decoder.py --model models/anytext2_v2.0 --decoder FILE --heldout test.json \
        --reconstruction-only                                                    # the official model's decoder

1. **Data** (cached under ``--cache``): the testbed recipe's training images (``datasets.train`` of ``--recipe``,
   ``--train-num`` of them) and held-out images (``datasets.heldout``: words the training vocabulary never produces).
2. **The light decoder**: ``--decoder FILE``, else trained here by the trainer (``method: decoder``, the
   ``train-decoder`` command's route) on the training images, ``--train-steps`` steps (cached).
3. **Reconstructions**: every held-out image encoded by the model's VAE and decoded by the full decoder and by the
   light one, in fp32 and in bf16, each read by the offline PP-OCR recogniser: Sen.ACC / NED beside the dataset's
   own images. This needs only the autoencoder (no UNet), so it measures the decoder alone.
4. **Generation** (unless ``--reconstruction-only``): ``evaluate``'s runner on the held-out samples, the teacher
   (20-step DDIM + CFG) and the student at ``--steps`` (with ``--lora``; without one the teacher's weights with the
   LCM sampler) under four settings: fp32 + full decoder (the reference), fp32 + light decoder, bf16 + full decoder,
   and ``--fast`` (bf16 + light decoder). Same seeds and initial noise in every setting, so the rows differ only by
   the setting. The check: the 4-step student's Sen.ACC within 2 points of the fp32 full-decoder student.

Writes ``--out``/light_decoder.json and light_decoder.md (and evaluate's images under ``--out``/eval/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_DROP = 0.02
"""The text cost allowed for a fast setting: Sen.ACC at most 2 points below the fp32 full-decoder student."""


def make_data(recipe: Path, cache: Path, train_num: int, heldout_num: int,
              train_set: str | None = None) -> dict[str, Path]:
    """The recipe's train / held-out datasets (``datasets`` of a testbed recipe) written once into ``cache``.

    ``train_set`` names the recipe dataset the decoder learns from; by default the one the recipe's last stage (the
    shipped model) was trained on, so that its glyph sizes and layouts are the ones the model draws.
    """
    from anytext2_lcm.data.synthetic import write_dataset
    from anytext2_lcm.recipes.spec import load_recipe, synth_config

    if not recipe.is_file():
        raise FileNotFoundError(f"--recipe {recipe}: not found (the testbed recipe, configs/testbed.yaml)")
    r = load_recipe(recipe)
    train_set = train_set or (r.stages[-1].data if r.stages else "train")
    if train_set not in r.datasets:
        raise ValueError(f"--train-set {train_set!r}: not a dataset of {recipe} (has {', '.join(r.datasets)})")
    out = {}
    for name, source, num in (("train", train_set, train_num), ("heldout", "heldout", heldout_num)):
        fields = {**r.datasets[source], "num": num}
        folder = cache / f"{name}_{num}-{_digest(fields)}"  # a changed recipe makes new data
        done = folder / "anyword_synth.json"
        if not done.is_file():
            write_dataset(synth_config(fields, f"datasets.{source}"), folder)
        out[name] = done
    return out


def _digest(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def model_tag(spec: str) -> str:
    """A short fingerprint of a model's weights and configuration, so that cached decoders and generated latents
    follow the model (its guidance scale included), not the name."""
    from anytext2_lcm.distill.components import teacher_identity
    from anytext2_lcm.distill.config import ModelSection

    return _digest(teacher_identity(spec, ModelSection()))


def train_decoder(model_spec: str, data: Path, size: int, args, folder: Path) -> Path:
    """A light decoder for the model, trained by the trainer (``method: decoder``); reused when already there."""
    from anytext2_lcm.distill.config import load_config
    from anytext2_lcm.distill.trainer import train
    from anytext2_lcm.light_decoder import FILE_NAME

    if (folder / FILE_NAME).is_file():
        return folder / FILE_NAME
    cfg = load_config(None, base={
        "method": "decoder", "output_dir": str(folder), "model": {"teacher": model_spec},
        "data": {"json_paths": [str(data)], "image_size": size, "max_lines": 2, "mask_img_prob": 0.0},
        "decoder_training": {"channels": args.channels, "crop": args.crop, "text_loss_weight": 4.0,
                             "generated": args.generated, "generated_by": args.generated_by,
                             "generated_lora": args.lora if any(r != "teacher" for r in args.generated_by) else None,
                             "generated_fraction": args.generated_fraction},
        "optim": {"learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": min(100, args.train_steps)},
        "train": {"max_steps": args.train_steps, "batch_size": 8, "num_workers": 1},
        "checkpoint": {"every_n_steps": 500, "keep_last": 1, "resume": "latest"},
        "validation": {"every_n_steps": 0}, "logging": {"tensorboard": False, "progress_bar": False}})
    t0 = time.perf_counter()
    train(cfg)
    print(f"[light_decoder] trained the light decoder in {time.perf_counter() - t0:.0f} s ({args.train_steps} "
          f"steps)", flush=True)
    return folder / FILE_NAME


class LightVAE:
    """The model's VAE with its decoder swapped for the light one: ``encode`` as the VAE's, ``decode(z)`` = the light
    decoder of ``scale_factor`` · z (what ``evaluate.runner.reconstruct`` calls)."""

    def __init__(self, model, tiny):
        self.model, self.tiny = model, tiny

    def parameters(self):
        return self.model.vae.parameters()

    def encode(self, x):
        return self.model.vae.encode(x)

    def decode(self, z):
        p = next(self.tiny.parameters())
        return self.tiny.decode((self.model.scale_factor * z).to(p.dtype)).sample


class _WithVAE:
    """A model seen with another ``vae`` (for :func:`read_dataset`)."""

    def __init__(self, model, vae):
        self.cfg, self.vae = model.cfg, vae


def reconstructions(models: dict, tiny: dict, data: Path, num: int, out: Path, reader) -> list[dict]:
    """OCR of the held-out images and of their reconstructions through each decoder, in each precision."""
    from anytext2_lcm.evaluate.runner import EvalConfig, read_dataset

    rows = []
    for dt, model in models.items():
        for dec in ("full", "light"):
            m = model if dec == "full" else _WithVAE(model, LightVAE(model, tiny[dt]))
            cfg = EvalConfig(data=(str(data),), num=num, reconstruction=True, reference=not rows)
            for r in read_dataset(m, cfg, out / f"recon_{dt}_{dec}", reader)["runs"]:
                rows.append({"setting": "dataset images" if r["name"] == "reference" else f"{dt}, {dec} decoder",
                             **_ocr(r)})
    return rows


def _ocr(run: dict) -> dict:
    a = run["ocr"].get("all", {})
    return {"lines": a.get("lines"), "sen_acc": a.get("sen_acc"), "ned": a.get("ned"),
            "latin_sen_acc": run["ocr"].get("Latin", {}).get("sen_acc"),
            "chinese_sen_acc": run["ocr"].get("Chinese", {}).get("sen_acc")}


SETTINGS = (("fp32, full decoder", "fp32", False), ("fp32, light decoder", "fp32", True),
            ("bf16, full decoder", "bf16", False), ("--fast: bf16 + light decoder", "bf16", True))


def generations(models: dict, decoder: Path, args, out: Path, reader) -> list[dict]:
    """evaluate's runner under each of :data:`SETTINGS`; one row per setting and run (teacher, student@k)."""
    from anytext2_lcm.evaluate.runner import EvalConfig, evaluate
    from anytext2_lcm.evaluate.runtime import RuntimeOptions

    from anytext2_lcm.commands.common import default_sampling
    from anytext2_lcm.defaults import student_sampling

    s = default_sampling(args.lora) if args.lora else student_sampling("lcm")
    rows = []
    cfg = EvalConfig(data=(str(args.heldout),), num=args.num, student_steps=args.steps, reference=False,
                     save_student_images=False, student_sampler=s.sampler, student_cfg=s.cfg,
                     student_options=dict(s.options))
    for name, dt, light in SETTINGS:
        rt = RuntimeOptions(tiny_decoder=str(decoder) if light else None)
        res = evaluate(models[dt], cfg, out / "eval" / name.split(":")[0].replace(", ", "_").replace(" ", "_"),
                       reader=reader, runtime=rt, progress=False)
        for r in res["runs"]:
            rows.append({"setting": name, "run": r["name"], **_ocr(r),
                         "s_per_image": r["seconds_per_image"]["median"]})
        print(f"[light_decoder] {name}: " + ", ".join(f"{r['name']} {_ocr(r)['sen_acc']:.3f}" for r in res["runs"]),
              flush=True)
    return rows


def check(rows: list[dict], steps: int = 4) -> list[dict]:
    """Each setting's ``student@steps`` Sen.ACC against the fp32 full-decoder one (allowed drop: :data:`MAX_DROP`)."""
    lab = f"student@{steps}"
    ref = next((r for r in rows if r["setting"] == SETTINGS[0][0] and r["run"] == lab), None)
    if ref is None:
        return []
    return [{"setting": r["setting"], "sen_acc": r["sen_acc"], "reference": ref["sen_acc"],
             "drop": ref["sen_acc"] - r["sen_acc"], "pass": ref["sen_acc"] - r["sen_acc"] <= MAX_DROP + 1e-12}
            for r in rows if r["run"] == lab and r["setting"] != SETTINGS[0][0]]


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def to_markdown(doc: dict) -> str:
    L = [f"# Light decoder and bf16: text cost ({doc['model']}, {doc['heldout_images']} held-out images)", "",
         f"Light decoder: {doc['decoder']} ({doc.get('decoder_params', '?')} parameters).", "",
         "## Reconstructions (VAE encode, then each decoder)", "",
         "| images | lines | Sen.ACC | NED | Latin Sen.ACC | Chinese Sen.ACC |", "|---|---|---|---|---|---|"]
    L += [f"| {r['setting']} | {r['lines']} | {_f(r['sen_acc'])} | {_f(r['ned'])} | {_f(r['latin_sen_acc'])} | "
          f"{_f(r['chinese_sen_acc'])} |" for r in doc["reconstructions"]]
    if doc.get("generations"):
        L += ["", "## Generated images (same seeds and noise in every setting)", "",
              "| setting | run | lines | Sen.ACC | NED | Latin Sen.ACC | s/image |", "|---|---|---|---|---|---|---|"]
        L += [f"| {r['setting']} | {r['run']} | {r['lines']} | {_f(r['sen_acc'])} | {_f(r['ned'])} | "
              f"{_f(r['latin_sen_acc'])} | {_f(r['s_per_image'], '.3f')} |" for r in doc["generations"]]
        L += ["", f"Check (4-step student, Sen.ACC within {MAX_DROP * 100:.0f} points of fp32 + full decoder):"]
        L += [f"- {c['setting']}: {c['sen_acc']:.3f} vs {c['reference']:.3f} ({'PASS' if c['pass'] else 'FAIL'})"
              for c in doc["check"]]
    return "\n".join(L) + "\n"


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed", help="'testbed' or a converted model folder")
    ap.add_argument("--lora", default=None, help="the student adapter (its recorded sampling is used)")
    ap.add_argument("--decoder", default=None, help="a light decoder file (default: train one here)")
    ap.add_argument("--recipe", default=str(REPO / "configs" / "testbed.yaml"), help="testbed recipe (datasets)")
    ap.add_argument("--heldout", default=None,
                    help="an AnyWord JSON file to measure on instead of the recipe's held-out set (e.g. AnyWord-3M "
                         "images for the official model); with --decoder no training data is made")
    ap.add_argument("--cache", default=str(REPO / "outputs" / "light_decoder_cache"))
    ap.add_argument("--out", default=str(REPO / "outputs" / "light_decoder"))
    ap.add_argument("--num", type=int, default=128, help="held-out images")
    ap.add_argument("--train-num", type=int, default=2000, help="training images of the light decoder")
    ap.add_argument("--train-set", default=None,
                    help="the recipe dataset it learns from (default: the data of the recipe's last stage)")
    ap.add_argument("--train-steps", type=int, default=1000, help="training steps of the light decoder")
    ap.add_argument("--channels", type=int, default=24,
                    help="width of the light decoder (24 on the testbed: its own VAE decoder is narrow, 2.5 G "
                         "multiply-accumulates at 128 px; 24 channels cost 0.61 G, 64 would cost 4.3 G)")
    ap.add_argument("--crop", type=int, default=64, help="training crop side (0: whole images)")
    ap.add_argument("--steps", default="1,2,4", help="student step counts")
    ap.add_argument("--generated", type=int, default=0,
                    help="latents the model samples itself from training prompts for the light decoder's training "
                         "(decoder_training.generated; 0: encoded images only)")
    ap.add_argument("--generated-by", default="teacher,student@1,student@2,student@4",
                    help="who samples them, cycled (teacher, student@K: the --lora student)")
    ap.add_argument("--generated-fraction", type=float, default=0.5, help="share of each batch taken from them")
    ap.add_argument("--reconstruction-only", action="store_true", help="no generation (a VAE-only model)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    args.steps = tuple(int(s) for s in args.steps.split(","))
    args.generated_by = [r for r in args.generated_by.split(",") if r]
    if not args.lora:
        args.generated_by = [r for r in args.generated_by if r == "teacher"] or ["teacher"]
    return args


def _models(spec: str, lora: str | None) -> dict:
    import torch

    from anytext2_lcm import lora as L
    from anytext2_lcm.evaluate.goal import converted_copy
    from anytext2_lcm.factory import build_model

    m = build_model(spec).eval()
    if lora:
        L.load_lora(m, lora)
    return {"fp32": m, "bf16": converted_copy(m, torch.bfloat16)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from anytext2_lcm.atomic import write_json, write_text
    from anytext2_lcm.evaluate.ocr import TextReader
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.light_decoder import load_light_decoder, parameter_count

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache, out = Path(args.cache), Path(args.out)
    size = build_model(args.model).cfg.image_size
    if args.heldout and args.decoder:
        data = {"heldout": Path(args.heldout)}
    else:
        data = make_data(Path(args.recipe), cache / "data", args.train_num, args.num, args.train_set)
        data["heldout"] = Path(args.heldout) if args.heldout else data["heldout"]
    args.heldout = data["heldout"]
    gen = (f"_g{args.generated}-{'+'.join(args.generated_by).replace('@', '')}-{args.generated_fraction:g}-"
           f"{model_tag(args.model)}-{_digest(str(Path(args.lora).resolve())) if args.lora else 'teacher'}"
           if args.generated else "")
    decoder = Path(args.decoder) if args.decoder else train_decoder(
        args.model, data["train"], size, args,
        cache / f"decoder_{Path(args.model).name}_c{args.channels}_{args.crop}_{args.train_steps}{gen}"
                f"-{data['train'].parent.name}")
    models = _models(args.model, args.lora)
    tiny = {dt: load_light_decoder(decoder, m.cfg).to(dtype=next(m.unet.parameters()).dtype).eval()
            for dt, m in models.items()}
    reader = TextReader()
    with torch.no_grad():
        doc = {"model": args.model, "lora": args.lora, "decoder": str(decoder), "heldout_images": args.num,
               "decoder_params": parameter_count(tiny["fp32"]),
               "reconstructions": reconstructions(models, tiny, data["heldout"], args.num, out, reader)}
    if not args.reconstruction_only:
        doc["generations"] = generations(models, decoder, args, out, reader)
        doc["check"] = check(doc["generations"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "light_decoder.json", doc)
    md = to_markdown(doc)
    write_text(out / "light_decoder.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
