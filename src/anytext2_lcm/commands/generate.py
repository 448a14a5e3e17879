"""``anytext2-lcm generate``: text-to-image with rendered text lines, and text editing."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import add_model_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate (or edit) an image with text lines, teacher or student",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='The prompt\'s "quoted" texts become the text lines, one per position (boxes/polygons in a JSON '
                    "file, or a white-on-black mask image). With --edit-image the positions of that image are "
                    "rewritten. Without --lora: the teacher (DDIM, 20 steps, CFG 7.5). With --lora ADAPTER: the student "
                    "as its adapter records it (e.g. LCM, 4 steps, no CFG); --sampler/--steps/--cfg override.")
    add_model_args(p)
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
    s.add_argument("--steps", type=int, default=None,
                   help="default: 20 for the teacher, the adapter's recorded steps (4) for a student")
    s.add_argument("--cfg", type=float, default=None,
                   help="CFG scale (default: 7.5 for the teacher, the adapter's recorded scale (1: off) for a student)")
    s.add_argument("--gamma", type=float, default=None, help="TCD gamma (0 = deterministic)")
    s.add_argument("--num-phases", type=int, default=None,
                   help="PCM: the student's phases (steps must divide it or be a multiple of it)")
    s.add_argument("--phase-convention", default=None, choices=["inference", "official"],
                   help="PCM: where the student's phase edges are (default: inference)")
    s.add_argument("--original-steps", type=int, default=None,
                   help="lcm/tcd/pcm: points of the student's distillation grid (distill.num_ddim_timesteps; "
                        "default 50)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--strength", type=float, default=1.0, help="WriteNet control strength")
    s.add_argument("--attnx-scale", type=float, default=1.0)
    s.add_argument("--a-prompt", default=None, help="added prompt (default: the original demo's)")
    s.add_argument("--n-prompt", default=None, help="negative prompt (default: the original demo's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument("--height", type=int, default=None, help="default: the model's own size (testbed 128, sd15 512)")
    s.add_argument("--width", type=int, default=None, help="default: the model's own size")
    p.add_argument("--out", required=True, help="output PNG (several images: OUT_0.png, OUT_1.png, ...)")
    p.add_argument("--save-glyphs", action="store_true", help="also write OUT.glyphs.png (rendered glyphs + positions)")
    from ..evaluate.runtime import add_runtime_args

    add_runtime_args(p)
    p.set_defaults(func=_generate)


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


def _generate(args) -> int:
    from PIL import Image

    from ..generation import GenerationRequest, InputError, load_positions
    from ..defaults import DEFAULT_A_PROMPT, DEFAULT_N_PROMPT
    from ..samplers import sampler_options as known_options
    from .common import default_sampling, model_from_args, sampler_options
    from ..cli import UsageError

    sampling = default_sampling(args.lora, args.sampler)
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
            n_prompt=DEFAULT_N_PROMPT if args.n_prompt is None else args.n_prompt, glyph_font=args.glyph_font)
    except InputError as e:
        raise UsageError(str(e)) from None
    from ..evaluate.runtime import apply_runtime_options, resolve_runtime_args, runtime_from_args
    from ..factory import pick_device

    resolve_runtime_args(args, pick_device(args.device))
    model, device, dtype = model_from_args(args)
    _, gen = apply_runtime_options(model, runtime_from_args(args), device)
    try:
        res = gen(req)
    except InputError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(res.images):
        path = out if len(res.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        Image.fromarray(img).save(path)
        paths.append(path)
    if args.save_glyphs:
        Image.fromarray(res.glyph_preview).save(out.with_suffix(".glyphs.png"))
    for w in res.warnings:
        log.warning(w)
    info = {"images": [str(p) for p in paths], "texts": res.texts, "sampler": sampler, "steps": steps,
            "cfg": cfg, "seed": args.seed, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "decoder": args.tiny_decoder or "full", "seconds": {k: round(v, 3) for k, v in res.seconds.items()}}
    print(json.dumps(info, ensure_ascii=False))
    return 0
