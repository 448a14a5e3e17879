"""How small a line can the testbed write? Held-out words at several font sizes, read by the offline OCR.

    python benchmarks/testbed_line_size.py [--model testbed] [--num 24] [--sizes 0.08,0.1,0.12,0.14,0.18,0.22]

For each font size (a fraction of the 128 px side) the testbed's held-out data recipe (``configs/testbed.yaml``: words
never in training, plain/gradient/paper backgrounds) is drawn with that size only, and the teacher generates every
sample (20-step DDIM + the model's CFG) into the recorded line boxes. Printed: the median line-box height in pixels, the
OCR of the dataset's own images (the ceiling at that size) and of the teacher's images (Sen.ACC / NED, Latin and
Chinese). Prints a Markdown table and writes OUT/line_size.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--config", default=str(REPO / "configs" / "testbed.yaml"), help="the data recipe")
    p.add_argument("--num", type=int, default=24, help="samples per size")
    p.add_argument("--sizes", default="0.08,0.1,0.12,0.14,0.18,0.22", help="font sizes, fraction of the side")
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--out", default="outputs/line_size")
    args = p.parse_args(argv)
    import numpy as np

    from anytext2_lcm.data.synthetic import write_dataset
    from anytext2_lcm.evaluate.runner import EvalConfig, evaluate, run_specs
    from anytext2_lcm.factory import build_model
    from anytext2_lcm.recipes.spec import load_recipe, synth_config

    held = dict(load_recipe(args.config).datasets["heldout"])
    model = build_model(args.model).eval()
    out = Path(args.out)
    rows = []
    for f in (float(v) for v in args.sizes.split(",")):
        data = out / f"data_{f:g}"
        cfg_s = synth_config({**held, "num": args.num, "seed": args.seed, "text_size": [f, f]}, "heldout")
        json_path = write_dataset(cfg_s, data)[0]
        heights = [float(np.ptp(np.asarray(a["polygon"])[:, 1]))
                   for r in json.loads(json_path.read_text())["data_list"] for a in r["annotations"]]
        cfg = EvalConfig(data=(str(json_path),), num=args.num)
        res = evaluate(model, cfg, out / f"eval_{f:g}", runs=run_specs(cfg)[:1], progress=False)
        runs = {r["name"]: r["ocr"] for r in res["runs"]}
        rows.append({"font_fraction": f, "font_px": round(f * cfg_s.size), "box_height_median": statistics.median(heights),
                     "reference": runs["reference"], "teacher": runs["teacher"]})
        print(_line(rows[-1]), flush=True)
    (out / "line_size.json").write_text(json.dumps(rows, indent=1))
    print("\n| font px | line box height (median px) | reference Latin Sen.ACC | teacher Latin Sen.ACC / NED | "
          "teacher Chinese Sen.ACC / NED |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(_line(r))
    return 0


def _line(r: dict) -> str:
    def acc(d, lang):
        x = d.get(lang)
        return f"{x['sen_acc']:.2f} / {x['ned']:.2f} ({x['lines']})" if x else "–"

    ref = r["reference"].get("Latin")
    return (f"| {r['font_px']} | {r['box_height_median']:.0f} | {ref['sen_acc']:.2f} | {acc(r['teacher'], 'Latin')} | "
            f"{acc(r['teacher'], 'Chinese')} |" if ref else f"| {r['font_px']} | – |")


if __name__ == "__main__":
    sys.exit(main())
