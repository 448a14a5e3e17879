"""``anytext2-lcm demo``: the main job on a built-in tiny model, on the CPU, with no download."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole job on a built-in tiny model (CPU, no download)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    import time

    from PIL import Image

    from ..generation import GenerationRequest, Generator
    from .common import build_model

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("tiny").eval()
    req = GenerationRequest(prompt='a shop sign that says "Hello" and "世界"',
                            positions=[[64, 96, 448, 192], [[96, 300], [420, 280], [428, 380], [104, 400]]],
                            seed=args.seed, steps=20)
    res = Generator(model)(req)
    Image.fromarray(res.images[0]).save(out / "teacher_tiny.png")
    Image.fromarray(res.glyph_preview).save(out / "glyphs.png")
    summary = {"image": str(out / "teacher_tiny.png"), "glyphs": str(out / "glyphs.png"),
               "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {summary['image']} (20-step DDIM + CFG with the untrained tiny teacher) and {summary['glyphs']}")
    return 0
