"""Reliability: a table of bad inputs and faults, each handled with one line (exit 2 for inputs, 1 for a failed
write), no traceback, no data lost, and every bad input refused before a model is built.

The table covers generate / evaluate / bench / ui / convert / distill flags (NaN, Inf, out of range, unusable
files: pickles, foreign checkpoints, non-fonts, non-images, output paths), training configs, resume with damaged
checkpoints, data rows outside the data root, a first batch of skipped samples, writes that hit a file-size limit
(``RLIMIT_FSIZE``), and non-finite values at sampling. ``test_summary`` prints the counts the README quotes:

    pytest -q -s tests/test_reliability.py -k summary
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from distill_helpers import REPO, base_config, cli_env, make_config, metrics, tiny_dataset, write_yaml
from distill_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


@dataclass
class Outcome:
    """What one case did: handled cleanly (the expected exit and a one-line message), a traceback, data lost."""

    handled: bool
    traceback: bool = False
    lost: bool = False
    detail: str = ""


@dataclass
class Case:
    name: str
    area: str
    run: Callable[["Env"], Outcome]


@dataclass
class Env:
    """Files shared by the cases (made once) and a fresh folder per case."""

    d: Path
    tmp: Path
    built: list = field(default_factory=list)


OUTCOMES: dict[str, Outcome] = {}


# ---------------------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w x h pixels (no pixel data): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def make_bad_files(d: Path) -> None:
    from PIL import Image
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "box.json").write_text("[[4, 4, 60, 28]]")
    (d / "outside.json").write_text("[[500, 500, 600, 560]]")
    (d / "flat.json").write_text("[[4, 4, 60, 4]]")
    (d / "nanbox.json").write_text("[[NaN, 4, 60, 28]]")
    (d / "empty.json").write_text("[]")
    (d / "notjson.json").write_text("{ this is not json")
    (d / "latin1.json").write_bytes(b"[[4, 4, 60, 28]] \xff\xfe")
    (d / "text.txt").write_text("just text")
    (d / "bad.ttf").write_text("not a font")
    (d / "afile").write_text("a file, not a folder")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "black.png")
    _png_header(d / "bomb.png", 40000, 40000)
    (d / "folder.png").mkdir(exist_ok=True)
    (d / "g.glyphs.png").mkdir(exist_ok=True)
    (d / "junk.ckpt").write_bytes(b"hello world, not a checkpoint")
    (d / "zip.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    with open(d / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Evil(str(d / "pwned"))}, f)
    torch.save({"x": _Evil(str(d / "pwned"))}, d / "evil_zip.pt")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(d / "foreign.safetensors"))
    (d / "truncated.safetensors").write_bytes((d / "foreign.safetensors").read_bytes()[:-7])
    (d / "nomanifest").mkdir(exist_ok=True)
    (d / "nomanifest" / "unet.safetensors").write_bytes(b"")
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.full((4, 32), float("nan")), f"{key}.lora_B.weight": torch.zeros(32, 4)},
              str(d / "nan_lora.safetensors"))
    save_file({"decoder.layers.0.weight": torch.full((4, 4, 3, 3), float("inf"))}, str(d / "inf_decoder.safetensors"))
    (d / "data.json").write_text(json.dumps({"data_root": ".", "data_list": []}))
    write_yaml(base_config(d / "data.json", d / "run"), d / "cfg.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Running a command line in this process
# ---------------------------------------------------------------------------------------------------------------


def run_cli(env: Env, argv: list[str], code: int = 2, expect: str = "", capsys=None) -> Outcome:
    """``anytext2-lcm ARGV`` in-process: handled = exit ``code``, exactly one stderr line naming ``expect``, no
    model built, nothing written to ``out/``."""
    from anytext2_lcm.cli import main

    argv = [a.format(d=env.d, t=env.tmp) for a in argv]
    env.built.clear()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # an uncaught exception is a traceback for the user
        return Outcome(False, traceback=True, detail=f"{type(e).__name__}: {e}")
    err = env.capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not _is_log_line(ln)]
    ok = rc == code and len(lines) == 1 and expect in lines[0] and not env.built
    written = sorted(p.name for p in (env.tmp / "out").glob("*")) if (env.tmp / "out").exists() else []
    return Outcome(ok and not written, traceback="Traceback" in err, lost=bool(written),
                   detail=f"rc={rc} built={env.built} written={written} stderr={lines}")


def _is_log_line(line: str) -> bool:
    parts = line.split(" ", 2)
    return len(parts) > 2 and parts[0].count(":") == 2 and parts[1] in ("DEBUG", "INFO", "WARNING")


GEN = ["generate", "--model", "tiny", "--prompt", 'a sign that says "Hi"', "--out", "{t}/out/o.png"]


def gen(*extra: str, boxes: bool = True) -> list[str]:
    return GEN + (["--boxes", "{d}/box.json"] if boxes else []) + list(extra)


def cli(name: str, area: str, argv: list[str], expect: str, code: int = 2) -> Case:
    return Case(name, area, lambda env: run_cli(env, argv, code, expect))


INPUTS = [
    # generate: numbers, checked at parse time
    cli("generate --cfg nan", "generate", gen("--cfg", "nan"), "--cfg"),
    cli("generate --cfg inf", "generate", gen("--cfg", "inf"), "--cfg"),
    cli("generate --cfg -1", "generate", gen("--cfg", "-1"), "--cfg"),
    cli("generate --strength nan", "generate", gen("--strength", "nan"), "--strength"),
    cli("generate --strength inf", "generate", gen("--strength", "inf"), "--strength"),
    cli("generate --attnx-scale -inf", "generate", gen("--attnx-scale", "-inf"), "--attnx-scale"),
    cli("generate --eta 5", "generate", gen("--eta", "5"), "--eta"),
    cli("generate --gamma nan", "generate", gen("--sampler", "tcd", "--gamma", "nan"), "--gamma"),
    cli("generate --lora-scale inf", "generate", gen("--lora-scale", "inf"), "--lora-scale"),
    cli("generate --seed -1", "generate", gen("--seed", "-1"), "--seed"),
    cli("generate --seed 2**64", "generate", gen("--seed", str(2 ** 64)), "--seed"),
    cli("generate --seed 1.5", "generate", gen("--seed", "1.5"), "--seed"),
    cli("generate --steps 0", "generate", gen("--steps", "0"), "--steps"),
    cli("generate --steps 10**6", "generate", gen("--steps", "1000000"), "--steps"),
    cli("generate --num-images 0", "generate", gen("--num-images", "0"), "--num-images"),
    cli("generate --num-images 10**4", "generate", gen("--num-images", "10000"), "--num-images"),
    cli("generate --height 100000", "generate", gen("--height", "100000"), "height"),
    cli("generate --width -64", "generate", gen("--width", "-64"), "--width"),
    cli("generate --height 70", "generate", gen("--height", "70"), "height"),
    cli("generate --max-size 0", "generate", gen("--max-size", "0"), "--max-size"),
    cli("generate --gamma with ddim", "generate", gen("--gamma", "0.3"), "--gamma"),
    cli("generate pcm steps vs phases", "generate", gen("--sampler", "pcm", "--num-phases", "4", "--steps", "3"),
        "pcm"),
    # generate: output paths, checked before anything runs
    cli("generate --out folder", "generate", gen("--out", "{d}/folder.png"), "folder"),
    cli("generate --out unknown extension", "generate", gen("--out", "{t}/out/o.xyz"), "extension"),
    cli("generate --out no extension", "generate", gen("--out", "{t}/out/o"), "extension"),
    cli("generate --out below a file", "generate", gen("--out", "{d}/afile/o.png"), "afile"),
    cli("generate --save-glyphs to a folder", "generate", gen("--out", "{d}/g.png", "--save-glyphs"), "g.glyphs.png"),
    # generate: positions, masks, images, fonts, colours
    cli("generate --boxes missing", "generate", gen("--boxes", "{d}/none.json"), "none.json"),
    cli("generate --boxes not JSON", "generate", gen("--boxes", "{d}/notjson.json"), "notjson.json"),
    cli("generate --boxes not UTF-8", "generate", gen("--boxes", "{d}/latin1.json"), "latin1.json"),
    cli("generate --boxes empty", "generate", gen("--boxes", "{d}/empty.json"), "empty.json"),
    cli("generate --boxes NaN", "generate", gen("--boxes", "{d}/nanbox.json"), "non-finite"),
    cli("generate --boxes no area", "generate", gen("--boxes", "{d}/flat.json"), "no area"),
    cli("generate --boxes outside", "generate", gen("--boxes", "{d}/outside.json"), "outside"),
    cli("generate too few positions", "generate", gen("--prompt", 'a sign "A" and "B"'), "positions"),
    cli("generate --mask not an image", "generate", gen("--mask", "{d}/text.txt", boxes=False), "mask"),
    cli("generate --mask all black", "generate", gen("--mask", "{d}/black.png", boxes=False), "mask"),
    cli("generate --mask header bomb", "generate", gen("--mask", "{d}/bomb.png", boxes=False), "pixels"),
    cli("generate --edit-image not an image", "generate", gen("--edit-image", "{d}/text.txt"), "edit_image"),
    cli("generate --edit-image missing", "generate", gen("--edit-image", "{d}/none.png"), "none.png"),
    cli("generate --edit-image header bomb", "generate", gen("--edit-image", "{d}/bomb.png"), "pixels"),
    cli("generate --font not a font", "generate", gen("--font", "{d}/bad.ttf"), "bad.ttf"),
    cli("generate --font missing", "generate", gen("--font", "{d}/none.ttf"), "none.ttf"),
    cli("generate --fonts not a font", "generate", gen("--fonts", "{d}/bad.ttf"), "bad.ttf"),
    cli("generate --colors bad", "generate", gen("--colors", "300,0,0"), "--colors"),
    # generate / convert: model, adapter and decoder files, refused before any model is built
    cli("generate --model missing", "files", gen("--model", "{d}/none.ckpt"), "none.ckpt"),
    cli("generate --model junk", "files", gen("--model", "{d}/junk.ckpt"), "junk.ckpt"),
    cli("generate --model broken zip", "files", gen("--model", "{d}/zip.ckpt"), "zip.ckpt"),
    cli("generate --model pickle", "files", gen("--model", "{d}/evil.ckpt"), "refused"),
    cli("generate --model zip pickle", "files", gen("--model", "{d}/evil_zip.pt"), "refused"),
    cli("generate --model foreign keys", "files", gen("--model", "{d}/foreign.safetensors"), "AnyText2"),
    cli("generate --model truncated", "files", gen("--model", "{d}/truncated.safetensors"), "truncated"),
    cli("generate --model folder", "files", gen("--model", "{d}/nomanifest"), "nomanifest"),
    cli("generate --lora pickle", "files", gen("--lora", "{d}/evil.ckpt"), "refused"),
    cli("generate --lora junk", "files", gen("--lora", "{d}/junk.ckpt"), "junk.ckpt"),
    cli("generate --lora missing", "files", gen("--lora", "{d}/none.safetensors"), "none.safetensors"),
    cli("generate --lora NaN", "files", gen("--lora", "{d}/nan_lora.safetensors"), "NaN"),
    cli("generate --tiny-decoder pickle", "files", gen("--tiny-decoder", "{d}/evil.ckpt"), "evil.ckpt"),
    cli("generate --tiny-decoder Inf", "files", gen("--tiny-decoder", "{d}/inf_decoder.safetensors"), "NaN/Inf"),
    cli("convert junk", "files", ["convert", "{d}/junk.ckpt", "{t}/out/conv"], "junk.ckpt"),
    cli("convert pickle", "files", ["convert", "{d}/evil.ckpt", "{t}/out/conv"], "refused"),
    cli("convert foreign keys", "files", ["convert", "{d}/foreign.safetensors", "{t}/out/conv", "--preset", "tiny"],
        "AnyText2"),
    cli("convert OUT_DIR is a file", "files", ["convert", "{d}/foreign.safetensors", "{d}/afile"], "afile"),
    # evaluate / bench / ui
    cli("evaluate --seed -5", "evaluate", ["evaluate", "--data", "{d}/data.json", "--out", "{t}/out/e",
                                           "--seed", "-5"], "--seed"),
    cli("evaluate --teacher-cfg nan", "evaluate", ["evaluate", "--data", "{d}/data.json", "--out", "{t}/out/e",
                                                   "--teacher-cfg", "nan"], "--teacher-cfg"),
    cli("evaluate --student-steps 0", "evaluate", ["evaluate", "--data", "{d}/data.json", "--out", "{t}/out/e",
                                                   "--student-steps", "1,0"], "--student-steps"),
    cli("evaluate --out is a file", "evaluate", ["evaluate", "--model", "tiny", "--data", "{d}/data.json", "--out",
                                                 "{d}/afile"], "afile"),
    cli("evaluate --tiny-decoder pickle", "evaluate", ["evaluate", "--model", "tiny", "--data", "{d}/data.json",
                                                       "--out", "{t}/out/e", "--tiny-decoder", "{d}/evil.ckpt"],
        "evil.ckpt"),
    cli("bench --teacher-cfg inf", "bench", ["bench", "--teacher-cfg", "inf"], "--teacher-cfg"),
    cli("bench --repeats 0", "bench", ["bench", "--repeats", "0"], "--repeats"),
    cli("bench --size nan", "bench", ["bench", "--size", "nan"], "--size"),
    cli("ui --port 70000", "ui", ["ui", "--port", "70000"], "--port"),
    cli("ui --lora-scale nan", "ui", ["ui", "--lora-scale", "nan"], "--lora-scale"),
    # training configs (distill --dry-run: validation only)
    *[cli(f"distill {o}", "config", ["distill", "--config", "{d}/cfg.yaml", "--dry-run", o], o.split("=")[0])
      for o in ["optim.learning_rate=.inf", "optim.max_grad_norm=.inf", "distill.attnx_scale=.nan",
                "distill.huber_c=.inf", "distill.guidance_scale_range=[7, .inf]", "lora.alpha=.inf",
                "lora.dropout=.nan", "data.max_skip_rate=.nan", "data.wm_thresh=.nan", "data.max_aspect_ratio=.inf",
                "data.font_hint_area=[.nan, 1]", "pcm.empty_prompt_fraction=.nan", "debug.sleep_per_step=.inf",
                "train.seed=18446744073709551616", "validation.cfg_scale=.inf", "data.allow_absolute_paths=maybe"]],
    cli("distill output_dir is a file", "config", ["distill", "--config", "{d}/cfg.yaml", "--dry-run",
                                                   "output_dir={d}/afile"], "output_dir"),
    cli("distill output_dir below a file", "config", ["distill", "--config", "{d}/cfg.yaml", "--dry-run",
                                                      "output_dir={d}/afile/run"], "output_dir"),
    cli("distill --resume missing folder", "config", ["distill", "--config", "{d}/cfg.yaml", "--dry-run",
                                                      "--resume", "{d}/none"], "checkpoint.resume"),
]


# ---------------------------------------------------------------------------------------------------------------
# Faults: writes that fail part-way
# ---------------------------------------------------------------------------------------------------------------

WRITERS = ("save_image", "write_json", "write_text", "save_safetensors", "torch_save", "save_lora_folder",
           "save_converted", "checkpoint")

_WRITE_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
import numpy as np, torch
from anytext2_lcm import atomic
from anytext2_lcm.checkpoint import save_converted
from anytext2_lcm.distill.checkpoints import CheckpointManager
from anytext2_lcm.factory import random_model

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
root = Path(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
LIMIT = 4096

def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

def case(name, old, new):
    folder = root / name
    folder.mkdir(parents=True)
    old(folder)
    before = snapshot(folder)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        new(folder)
        raised = "nothing"
    except Exception as e:
        raised = f"{type(e).__name__}: {e}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = snapshot(folder)
    leftovers = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or
                       p.name.endswith((".tmp", ".old")) or ".trash" in p.name)
    return {"raised": raised, "same": before == after, "leftovers": leftovers}

big = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
small = np.zeros((8, 8, 3), np.uint8)
T = lambda n: {"w": torch.arange(n, dtype=torch.float32)}
res = {}
res["save_image"] = case("save_image", lambda f: atomic.save_image(f / "a.png", small),
                         lambda f: atomic.save_image(f / "a.png", big))
res["write_json"] = case("write_json", lambda f: atomic.write_json(f / "r.json", {"old": 1}),
                         lambda f: atomic.write_json(f / "r.json", {"new": list(range(5000))}))
res["write_text"] = case("write_text", lambda f: atomic.write_text(f / "r.md", "old"),
                         lambda f: atomic.write_text(f / "r.md", "new " * 5000))
res["save_safetensors"] = case("save_safetensors", lambda f: atomic.save_safetensors(f / "a.safetensors", T(4)),
                               lambda f: atomic.save_safetensors(f / "a.safetensors", T(100000)))
res["torch_save"] = case("torch_save", lambda f: atomic.torch_save(f / "a.pt", T(4)),
                         lambda f: atomic.torch_save(f / "a.pt", T(100000)))

def folder_writer(n):
    def write(f):
        with atomic.atomic_dir(f / "adapter") as tmp:
            atomic.save_safetensors(tmp / "adapter_model.safetensors", T(n))
            atomic.write_json(tmp / "adapter_config.json", {"n": n})
    return write
res["save_lora_folder"] = case("save_lora_folder", folder_writer(4), folder_writer(100000))
tiny = random_model("tiny")
res["save_converted"] = case("save_converted", lambda f: (f / "model").mkdir() or
                             atomic.write_json(f / "model" / "manifest.json", {"old": 1}),
                             lambda f: save_converted(tiny, f / "model"))

def ckpt(n):
    def write(f):
        CheckpointManager(f / "checkpoints", keep_last=1).save(n, 0, {"trainable.safetensors": T(4 if n == 1 else
                                                                      100000)}, {"data_rank0.json": {"n": n}})
    return write
res["checkpoint"] = case("checkpoint", ckpt(1), ckpt(2))
res["checkpoint"]["still_latest"] = str(CheckpointManager(root / "checkpoint" / "checkpoints").latest())
print(json.dumps(res))
"""

_WRITE_RESULTS: dict = {}


def write_results(tmp: Path) -> dict:
    if not _WRITE_RESULTS:
        out = subprocess.run([sys.executable, "-c", _WRITE_SCRIPT, str(tmp / "writes")], capture_output=True,
                             text=True, env=cli_env(), cwd=str(REPO), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        _WRITE_RESULTS.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return _WRITE_RESULTS


def write_case(name: str) -> Case:
    def run(env: Env) -> Outcome:
        r = write_results(env.d)[name]
        refused = "WriteError" in r["raised"] or "CheckpointError" in r["raised"]
        lost = not r["same"] or bool(r["leftovers"])
        if name == "checkpoint":
            lost = lost or not r["still_latest"].endswith("checkpoint-000001")
        return Outcome(refused and not lost, traceback=not refused, lost=lost, detail=json.dumps(r))
    return Case(f"file-size limit during {name}", "writes", run)


def generate_under_size_limit(env: Env) -> Outcome:
    """The whole ``generate`` command with RLIMIT_FSIZE below any JPEG's size (its headers alone are larger): exit 1,
    one line, the old file kept, nothing else left."""
    out = env.tmp / "out.jpg"
    old = b"old bytes that must survive"
    out.write_bytes(old)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY)); "
            "from anytext2_lcm.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [a.format(d=env.d, t=env.tmp) for a in gen("--out", str(out), "--height", "64", "--width", "64",
                                                       "--steps", "2")]
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=cli_env(),
                       cwd=str(REPO), timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not _is_log_line(ln)]
    left = sorted(x.name for x in env.tmp.iterdir() if x.name != "out.jpg")
    lost = out.read_bytes() != old or bool(left)
    ok = p.returncode == 1 and len(lines) == 1 and "out.jpg" in lines[0] and not lost
    return Outcome(ok, traceback="Traceback" in p.stderr, lost=lost, detail=f"rc={p.returncode} {lines} {left}")


# ---------------------------------------------------------------------------------------------------------------
# Faults: resume, rotation, data
# ---------------------------------------------------------------------------------------------------------------

_RUN: dict = {}


def trained_run(env: Env) -> Path:
    """A 2-step tiny run with a checkpoint after each step (made once)."""
    if "path" not in _RUN:
        data = tiny_dataset(env.d / "data")
        from anytext2_lcm.distill.trainer import train

        out = env.d / "trained"
        train(make_config(data, out, "train.max_steps=2", "checkpoint.every_n_steps=1"))
        _RUN.update(path=out, data=data)
    return _RUN["path"]


def _damage(ck: Path, how: str) -> None:
    f = ck / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(bytes(data[:-3]))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_all_damaged(env: Env) -> Outcome:
    out = env.tmp / "run"
    shutil.copytree(trained_run(env), out)
    cks = sorted((out / "checkpoints").glob("checkpoint-*"))
    for ck, how in zip(cks, ("flip", "truncate")):
        _damage(ck, how)
    before = _tree(out / "checkpoints")
    cfg = write_yaml(base_config(_RUN["data"], out), env.tmp / "c.yaml")
    o = run_cli(env, ["distill", "--config", str(cfg), "--resume", "latest", "train.max_steps=4",
                      "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"], 2, "none of the 2 checkpoint(s)")
    err_names = all(ck.name in o.detail for ck in cks)
    lost = _tree(out / "checkpoints") != before
    return Outcome(o.handled and err_names and not lost, o.traceback, lost, o.detail)


def resume_junk_only(env: Env) -> Outcome:
    out = env.tmp / "run"
    junk = out / "checkpoints" / "checkpoint-000007"
    junk.mkdir(parents=True)
    (junk / "notes.txt").write_text("not a checkpoint")
    cfg = write_yaml(base_config(tiny_dataset(env.d / "data"), out), env.tmp / "c.yaml")
    o = run_cli(env, ["distill", "--config", str(cfg), "--resume", "latest"], 2, "checkpoint-000007")
    return Outcome(o.handled and junk.is_dir(), o.traceback, not (junk / "notes.txt").is_file(), o.detail)


def no_resume_with_checkpoints(env: Env) -> Outcome:
    out = env.tmp / "run"
    shutil.copytree(trained_run(env), out)
    before = _tree(out / "checkpoints")
    cfg = write_yaml(base_config(_RUN["data"], out), env.tmp / "c.yaml")
    o = run_cli(env, ["distill", "--config", str(cfg)], 2, "checkpoint.resume=fresh")
    return Outcome(o.handled, o.traceback, _tree(out / "checkpoints") != before, o.detail)


def fresh_keeps_old_checkpoints(env: Env) -> Outcome:
    from anytext2_lcm.distill.trainer import train

    out = env.tmp / "run"
    shutil.copytree(trained_run(env), out)
    _damage(sorted((out / "checkpoints").glob("checkpoint-*"))[-1], "flip")
    before = _tree(out / "checkpoints")
    r = train(make_config(_RUN["data"], out, "train.max_steps=1", "checkpoint.resume=fresh",
                          "checkpoint.keep_last=1"))
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("previous-")]
    kept = len(aside) == 1 and _tree(aside[0]) == {k: v for k, v in before.items()}
    fresh = (out / "checkpoints" / "checkpoint-000001" / "COMPLETE").is_file() and r.state.global_step == 1
    return Outcome(fresh and kept, lost=not kept, detail=f"aside={aside} fresh={fresh}")


def rotation_ignores_invalid(env: Env) -> Outcome:
    """Damaged newer checkpoints never count toward keep_last: the new checkpoint survives rotation, and the damaged
    ones are left in place."""
    from anytext2_lcm.distill.checkpoints import CheckpointManager

    root = env.tmp / "checkpoints"
    mgr = CheckpointManager(root, keep_last=1)
    for step in (5, 6):
        ck = mgr.save(step, 0, {"trainable.safetensors": {"w": torch.full((64,), float(step))}}, {})
        _damage(ck, "flip")
    before = {p.name: _tree(p) for p in root.iterdir()}
    first = mgr.save(1, 0, {"trainable.safetensors": {"w": torch.ones(64)}}, {})
    second = mgr.save(2, 0, {"trainable.safetensors": {"w": torch.ones(64) * 2}}, {})
    names = sorted(p.name for p in root.iterdir())
    ok = names == ["checkpoint-000002", "checkpoint-000005", "checkpoint-000006"] and second.is_dir()
    lost = any(_tree(root / n) != t for n, t in before.items() if (root / n).exists()) or not second.is_dir()
    return Outcome(ok and not first.exists() and not lost, lost=lost, detail=str(names))


def data_outside_root(env: Env) -> Outcome:
    """Rows whose img_name is absolute or climbs out with '..' are counted skips; with allow_absolute_paths the
    absolute one is read."""
    from PIL import Image

    from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
    from anytext2_lcm.data.skips import SkipRecord

    root = env.tmp / "data"
    (root / "images" / "sub").mkdir(parents=True)
    outside = env.tmp / "outside.jpg"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(outside)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "images" / "ok.jpg")
    names = ["../outside.jpg", str(outside), "sub/../../outside.jpg", "sub/../ok.jpg", "ok.jpg"]
    rows = [{"img_name": n, "caption": "c", "annotations": []} for n in names]
    (root / "a.json").write_text(json.dumps({"data_root": "images", "data_list": rows}))
    ds = AnyWordDataset(DataConfig(json_paths=(str(root / "a.json"),), image_size=64))
    reasons = [x.reason if isinstance(x, SkipRecord) else "ok" for x in (ds[i] for i in range(len(ds)))]
    ds2 = AnyWordDataset(DataConfig(json_paths=(str(root / "a.json"),), image_size=64, allow_absolute_paths=True))
    second = [x.reason if isinstance(x, SkipRecord) else "ok" for x in (ds2[i] for i in range(len(ds2)))]
    ok = (reasons == ["path_outside_root"] * 3 + ["ok", "ok"]
          and second == ["path_outside_root", "ok", "path_outside_root", "ok", "ok"]
          and ds.load_stats.malformed["path_outside_root"] == 3)
    return Outcome(ok, detail=f"{reasons} {second}")


def first_batch_skipped(env: Env) -> Outcome:
    """Batch 1, the first sample of the epoch unusable, max_skip_rate 0.5: the run trains; the all-skipped step is
    logged as skipped (empty_steps, loss NaN), not as a non-finite step."""
    from anytext2_lcm.data.collate import EpochSampler
    from anytext2_lcm.distill.trainer import train

    data = tiny_dataset(env.d / "data")
    doc = json.loads(data.read_text())
    sampler = EpochSampler(len(doc["data_list"]), 0, True, 0, 1)
    sampler.set_epoch(0)
    first = next(iter(sampler))
    first = first[1] if isinstance(first, tuple) else first
    doc["data_list"][first]["img_name"] = "../../../../etc/passwd"
    doc["data_root"] = str(data.parent / doc["data_root"])
    bad = env.tmp / "bad.json"
    bad.write_text(json.dumps(doc))
    out = env.tmp / "run"
    r = train(make_config(bad, out, "train.max_steps=3", "data.max_skip_rate=0.5"))
    m = {x["step"]: x for x in metrics(out)}
    ok = (r.exit_code == 0 and r.state.global_step == 3 and r.state.skipped_samples == 1 and r.state.empty_steps == 1
          and r.state.nonfinite_steps == 0 and r.state.optimizer_steps == 2 and math.isnan(m[1]["loss"])
          and m[1]["empty_steps"] == 1 and m[3]["nonfinite_steps"] == 0 and math.isfinite(m[2]["loss"]))
    return Outcome(ok, detail=f"{r.state} {m}")


def nonfinite_sampling(env: Env) -> Outcome:
    """A non-finite latent during sampling stops with NonFiniteError instead of returning a black image."""
    from anytext2_lcm.factory import random_model
    from anytext2_lcm.generation import GenerationRequest, Generator
    from anytext2_lcm.pipeline import NonFiniteError

    model = random_model("tiny", init="default").eval()
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    try:
        Generator(model)(GenerationRequest(prompt='a sign "Hi"', positions=[[4, 4, 60, 28]], steps=2, cfg_scale=1.0))
    except NonFiniteError as e:
        return Outcome("step 1" in str(e), detail=str(e))
    return Outcome(False, detail="no error")


FAULTS = [
    *[write_case(w) for w in WRITERS],
    Case("generate under a file-size limit keeps the old image", "writes", generate_under_size_limit),
    Case("resume latest: every checkpoint damaged", "resume", resume_all_damaged),
    Case("resume latest: only junk checkpoint folders", "resume", resume_junk_only),
    Case("no resume flag with existing checkpoints", "resume", no_resume_with_checkpoints),
    Case("resume fresh moves old checkpoints aside", "resume", fresh_keeps_old_checkpoints),
    Case("rotation: damaged checkpoints do not count", "resume", rotation_ignores_invalid),
    Case("data rows outside the data root", "data", data_outside_root),
    Case("first micro-batch all skipped (batch 1)", "data", first_batch_skipped),
    Case("NaN weights during sampling", "sampling", nonfinite_sampling),
]

TABLE = INPUTS + FAULTS


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    make_bad_files(d)
    return d


@pytest.fixture()
def env(shared, tmp_path, capsys, monkeypatch) -> Env:
    """A case's folders, and a watch on model construction: any AnyText2 built off the meta device is recorded."""
    import anytext2_lcm.models.anytext2 as m

    e = Env(shared, tmp_path)
    e.root, e.capsys = tmp_path, capsys
    original = m.AnyText2.__init__

    def watched(self, *a, **k):
        original(self, *a, **k)
        if any(p.device.type != "meta" for p in self.parameters()):
            e.built.append(type(self).__name__)

    monkeypatch.setattr(m.AnyText2, "__init__", watched)
    return e


def _run(case: Case, env: Env) -> Outcome:
    env.tmp = env.root / f"case{TABLE.index(case):03d}"  # a fresh folder per case
    env.tmp.mkdir()
    try:
        outcome = case.run(env)
    except Exception as e:  # noqa: BLE001 (a case that raises is a traceback the user would see)
        outcome = Outcome(False, traceback=True, detail=f"{type(e).__name__}: {e}")
    OUTCOMES[case.name] = outcome
    return outcome


@pytest.mark.parametrize("case", TABLE, ids=[c.name for c in TABLE])
def test_bad_input_or_fault_is_handled(case, env):
    o = _run(case, env)
    assert not (env.d / "pwned").exists(), "a pickle ran code"
    assert o.handled and not o.traceback and not o.lost, o.detail


def test_the_checks_pass_good_inputs(env):
    """The control: a valid command line gets through every check, builds a model (the watch sees it) and writes
    the image (so the cases above fail for their inputs, not for the command)."""
    from anytext2_lcm.cli import main

    rc = main([a.format(d=env.d, t=env.tmp) for a in gen("--steps", "1", "--height", "64", "--width", "64")])
    assert rc == 0 and env.built and (env.tmp / "out" / "o.png").is_file()


def test_table_covers_every_area():
    areas = {c.area for c in TABLE}
    assert areas >= {"generate", "files", "evaluate", "bench", "ui", "config", "writes", "resume", "data", "sampling"}
    assert len(TABLE) >= 100


def test_seeds_in_the_documented_range_parse():
    from anytext2_lcm.cli import build_parser
    from anytext2_lcm.config import MAX_SEED

    for seed in (0, MAX_SEED):
        args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "o.png", "--seed", str(seed)])
        assert args.seed == seed


def test_summary(env):
    """The README's figures: every case of the table (those not run yet by the tests above are run here)."""
    for case in TABLE:
        if case.name not in OUTCOMES:
            _run(case, env)
    outs = [OUTCOMES[c.name] for c in TABLE]
    n = len(outs)
    handled = sum(o.handled and not o.traceback and not o.lost for o in outs)
    tracebacks = sum(o.traceback for o in outs)
    lost = sum(o.lost for o in outs)
    print(f"\nreliability: {n} bad inputs and faults tried ({len(INPUTS)} inputs, {len(FAULTS)} faults), "
          f"{handled} handled (every bad input with one line, exit 2, before any model is built), "
          f"{tracebacks} tracebacks, {lost} data lost")
    assert (handled, tracebacks, lost) == (n, 0, 0), [c.name for c, o in zip(TABLE, outs) if not o.handled]
