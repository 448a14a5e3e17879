"""``anytext2-lcm generate``: text-to-image with rendered text lines, and text editing."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..generation import MAX_IMAGES, MAX_SIDE
from .common import CFG, POSITIVE, SEED, STEPS, add_community_args, add_model_args, command, number

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "generate", _generate)
    add_model_args(p)
    add_community_args(p)
    g = p.add_argument_group("text and layout")
    g.add_argument("--prompt", required=True, help='image prompt, e.g. \'a shop sign that says "Hello" and "世界"\'')
    g.add_argument("--text-prompt", help='separate text prompt with "quoted" lines (default: from --prompt)')
    pos = g.add_mutually_exclusive_group()
    pos.add_argument("--boxes", help="JSON file: a list of boxes [x0,y0,x1,y1] or polygons [[x,y],...], one per line")
    pos.add_argument("--mask", help="position mask image: white regions on black, one per line")
    g.add_argument("--sort", default="vertical", choices=["vertical", "horizontal"], help="order of mask regions")
    g.add_argument("--fonts", help="comma-separated font files per line for the font hint ('' = none), e.g. a.ttf,,b.otf")
    g.add_argument("--colors", help="per-line colours, ';'-separated: '255,0,0;none;#00ff00'")
    g.add_argument("--font", dest="glyph_font", help="glyph font file (default: a CJK-capable system font)")
    g.add_argument("--edit-image", help="editing mode: the image whose text regions are rewritten")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", default=None, choices=["ddim", "lcm", "tcd", "pcm"],
                   help="default: ddim without --lora, the adapter's recorded sampler with it")
    s.add_argument("--steps", type=STEPS, default=None,
                   help="default: 20 for the teacher, the adapter's recorded steps (4) for a student")
    s.add_argument("--cfg", type=CFG, default=None,
                   help="CFG scale (default: the model's for the teacher: 7.5, the testbed's 5; the adapter's recorded "
                        "scale (1: off) for a student)")
    s.add_argument("--gamma", type=number(0, 1), default=None, help="TCD gamma (0 = deterministic)")
    s.add_argument("--num-phases", type=STEPS, default=None,
                   help="PCM: the student's phases (steps must divide it or be a multiple of it)")
    s.add_argument("--phase-convention", default=None, choices=["inference", "official"],
                   help="PCM: where the student's phase edges are (default: inference)")
    s.add_argument("--original-steps", type=STEPS, default=None,
                   help="lcm/tcd/pcm: points of the student's distillation grid (distill.num_ddim_timesteps; "
                        "default 50)")
    s.add_argument("--timestep-spacing", default=None, choices=["trailing", "leading"],
                   help="lcm/tcd/pcm: where the grid's points are (distill.timestep_spacing; default: the adapter's "
                        "recorded one, else trailing)")
    s.add_argument("--eta", type=number(0, 1), default=0.0, help="DDIM eta")
    s.add_argument("--strength", type=number(0, 10), default=1.0, help="WriteNet control strength")
    s.add_argument("--attnx-scale", type=number(-10, 10), default=1.0)
    s.add_argument("--a-prompt", default=None, help="added prompt (default: the original demo's)")
    s.add_argument("--n-prompt", default=None, help="negative prompt (default: the original demo's)")
    s.add_argument("--seed", type=SEED, default=0, help="an integer in 0..2**63-1")
    s.add_argument("--num-images", type=number(1, MAX_IMAGES, integer=True), default=1)
    s.add_argument("--height", type=POSITIVE, default=None,
                   help="default: the model's own size (testbed 128, sd15 512)")
    s.add_argument("--width", type=POSITIVE, default=None, help="default: the model's own size")
    s.add_argument("--max-size", type=POSITIVE, default=MAX_SIDE,
                   help="largest --height/--width accepted (a memory guard; raise it on a large GPU)")
    p.add_argument("--out", required=True, help="output PNG (several images: OUT_0.png, OUT_1.png, ...)")
    p.add_argument("--save-glyphs", action="store_true", help="also write OUT.glyphs.png (rendered glyphs + positions)")
    from ..evaluate.runtime import add_runtime_args

    add_runtime_args(p)
    _add_demo_args(p)


def parse_colors(text: str | None) -> list | None:
    from PIL import ImageColor

    from ..cli import UsageError

    if not text:
        return None
    out = []
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if part.lower() in ("", "none", "-"):
            out.append(None)
            continue
        try:
            rgb = ImageColor.getrgb(part) if part.startswith("#") or part.isalpha() else \
                tuple(int(v) for v in part.split(","))
        except ValueError:
            raise UsageError(f"--colors entry {i} {part!r}: expected r,g,b or #rrggbb") from None
        if len(rgb) < 3 or any(not 0 <= v <= 255 for v in rgb[:3]):
            raise UsageError(f"--colors entry {i} {part!r}: three values in 0..255")
        out.append(tuple(rgb[:3]))
    return out


def image_paths(out: str | Path, n: int) -> list[Path]:
    """The files of ``n`` images for ``--out OUT``: OUT itself, or OUT_0.ext, OUT_1.ext, ..."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def check_inputs(args):
    """The file checks of a ``generate`` command line, run first, before any model is loaded; the one place to
    extend for new file flags. Numbers were range-checked by argparse; here: the output files (not a folder, a known
    image extension, a writable folder), the model (a checkpoint file's header and keys; a pickle is refused), the
    adapter (safe, LoRA weights, finite), the tiny decoder and the glyph font. Returns the model's configuration,
    against which ``generation.check_request`` then checks the request (sizes, positions, mask, edit image, fonts,
    colours, sampler). Raises UsageError / CheckpointError / FileNotFoundError: one line, exit 2."""
    from .common import check_model_inputs, check_output_file

    for path in image_paths(args.out, args.num_images) + ([Path(args.out).with_suffix(".glyphs.png")]
                                                           if args.save_glyphs else []):
        check_output_file(path, image=True)
    return check_model_inputs(args)


def _generate(args) -> int:
    """generate (or edit) an image with text lines, teacher or student

    The prompt's "quoted" texts become the text lines, one per position (boxes/polygons in a JSON file, or a
    white-on-black mask image). With --edit-image the positions of that image are rewritten. Without --lora: the
    teacher (DDIM, 20 steps, the model's CFG: 7.5, the testbed's 5). With --lora ADAPTER: the student as its adapter
    records it (e.g. LCM, 4 steps, no CFG); --sampler/--steps/--cfg override.
    """
    from ..atomic import save_image
    from ..generation import GenerationRequest, InputError, check_request, load_positions
    from ..defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT
    from ..samplers import sampler_options as known_options
    from .common import default_sampling, model_from_args, sampler_options
    from ..cli import UsageError

    model_cfg = check_inputs(args)  # files first; the request below is checked against it: all before the model
    sampling = default_sampling(args.lora, args.sampler, model_cfg)
    sampler = args.sampler or sampling.sampler
    steps = args.steps if args.steps is not None else sampling.steps
    cfg = args.cfg if args.cfg is not None else sampling.cfg
    # the recorded options the chosen sampler takes (a TCD run of an LCM student keeps its original_steps)
    recorded = {k: v for k, v in sampling.options.items() if k in known_options(sampler)}
    opts = {**recorded, **sampler_options(args, sampler)}
    try:
        req = GenerationRequest(
            prompt=args.prompt, text_prompt=args.text_prompt,
            positions=load_positions(args.boxes) if args.boxes else None, mask=args.mask, sort=args.sort,
            fonts=[f or None for f in args.fonts.split(",")] if args.fonts else None, colors=parse_colors(args.colors),
            edit_image=args.edit_image, height=args.height, width=args.width, num_images=args.num_images,
            seed=args.seed, steps=steps, sampler=sampler, sampler_options=opts, cfg_scale=cfg,
            strength=args.strength, attnx_scale=args.attnx_scale, eta=args.eta,
            a_prompt=DEFAULT_A_PROMPT if args.a_prompt is None else args.a_prompt,
            n_prompt=DEFAULT_N_PROMPT if args.n_prompt is None else args.n_prompt, glyph_font=args.glyph_font,
            max_side=args.max_size, **_demo_fields(args))
        check_request(req, model_cfg)
    except InputError as e:
        raise UsageError(str(e)) from None
    community = _check_demo_inputs(args, req)
    from ..evaluate.runtime import apply_runtime_options, resolve_runtime_args, runtime_from_args
    from ..factory import pick_device

    resolve_runtime_args(args, pick_device(args.device))
    model, device, dtype = model_from_args(args, community)
    _, gen = apply_runtime_options(model, runtime_from_args(args), device)
    try:
        res = gen(req)
    except InputError as e:
        raise UsageError(str(e)) from None
    paths = image_paths(args.out, len(res.images))
    for path, img in zip(paths, res.images):
        save_image(path, img)  # atomic: a failed write keeps the file that was there
    if args.save_glyphs:
        save_image(Path(args.out).with_suffix(".glyphs.png"), res.glyph_preview)
    debug = _write_debug_images(args, res)
    for w in res.warnings:
        log.warning(w)
    info = {"images": [str(p) for p in paths], "texts": res.texts, "sampler": sampler, "steps": steps,
            "cfg": cfg, "seed": args.seed, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "decoder": args.tiny_decoder or "full", "seconds": {k: round(v, 3) for k, v in res.seconds.items()},
            **(community.describe() if community else {}), **({"debug_images": debug} if debug else {})}
    print(json.dumps(info, ensure_ascii=False))
    return 0


# ---- the original demo's extras: mimic font, revise position, hollow font, debug images ---------------------------

def _add_demo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("font hints and positions (the original demo's options)")
    g.add_argument("--mimic-font", metavar="IMAGE:MASK", action="append", default=[],
                   help="per line, in order (repeat the flag; '-' skips a line): take the line's font hint from the "
                        "text under the white (or opaque) region of MASK in IMAGE instead of a font file")
    g.add_argument("--revise-position", action="store_true",
                   help="replace each position by the minimum-area rectangle of its rendered glyphs (not in editing)")
    g.add_argument("--hollow-font", action="store_true",
                   help="hollow font hints on a noise background (the original demo's default)")
    p.add_argument("--debug-images", metavar="DIR",
                   help="also write the glyph, position and font-hint images (and mimicked crops) into DIR")


def parse_mimic_fonts(values: list[str]) -> list | None:
    """``--mimic-font`` values → one (image, mask) pair or None per line."""
    from ..cli import UsageError

    out = []
    for i, text in enumerate(values):
        if text.strip() in ("", "-", "none"):
            out.append(None)
            continue
        image, sep, mask = text.rpartition(":")
        if not sep or not image or not mask:
            raise UsageError(f"--mimic-font entry {i} {text!r}: expected IMAGE:MASK (or '-' for no mimic)")
        out.append((image, mask))
    return out or None


def _demo_fields(args) -> dict:
    return {"mimic_fonts": parse_mimic_fonts(args.mimic_font), "revise_position": args.revise_position,
            "hollow_font": args.hollow_font}


def _check_demo_inputs(args, req):
    """Everything the demo options read, checked before the model is loaded: the mimic images and masks, the base
    model and the style LoRAs (one-line errors, exit 2). Returns the community weights (or None)."""
    from ..cli import UsageError
    from ..generation import InputError, mimic_crops
    from .common import community_from_args

    try:
        mimic_crops(req)
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.debug_images and Path(args.debug_images).is_file():
        raise UsageError(f"--debug-images {args.debug_images}: a file is in the way (give a folder)")
    return community_from_args(args)


def _write_debug_images(args, res) -> list[str]:
    from ..data.hints import write_debug_images

    if not args.debug_images:
        return []
    return [str(p) for p in write_debug_images(res.debug_images, args.debug_images)]

