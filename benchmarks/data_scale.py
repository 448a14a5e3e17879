"""Annotations at AnyWord-3M scale: start-up time and resident memory of one rank's reader, index vs JSON.

    python benchmarks/data_scale.py                                  # 3,000,000 rows in 6 files + 200,000 side by side
    python benchmarks/data_scale.py --rows 300000 --parts 3 --compare-rows 50000 --work /tmp/scale   # smaller

Generates AnyWord-format annotation files (the published layout: captions, rotated int polygons, Latin and Chinese
lines, colours, watermark scores; ~620 bytes a row, as AnyWord's 200 k-row file of 124 MB), whose rows cycle over a
few real images (annotations are what is measured; images may repeat). The files are written a row at a time, so
generating 3 M rows needs no more memory than one row. Then, each in a fresh Python process (``/proc`` VmHWM = peak
resident memory; "annotations" = the peak minus the resident memory after the imports):

1. ``anytext2-lcm index-data`` over all parts: conversion time and its peak memory (streaming: bounded);
2. one rank's start-up on the index: open it, build the shuffled epoch order, make the first sample;
3. side by side at ``--compare-rows`` rows (run in turns, index and JSON, ``--rounds`` times): the same on the JSON
   file (``json.load`` + the row objects of every row) and on its index.

Goal (the issue): at 3 M rows, start-up <= 60 s and <= 1 GiB resident per rank for the annotations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = r"""
import json, os, sys, time
def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key + ":"):
            return int(ln.split()[1]) * 1024
import torch  # what a rank has imported before it reads data
from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.collate import EpochSampler
base = status("VmRSS")
t0 = time.perf_counter()
kind, path = sys.argv[1], sys.argv[2]
cfg = DataConfig(index=path, image_size=256) if kind == "index" else DataConfig(json_paths=(path,), image_size=256)
ds = AnyWordDataset(cfg)
order = EpochSampler(len(ds), seed=0, shuffle=True).order()
first = ds[order[0]]
t1 = time.perf_counter()
print(json.dumps({"rows": len(ds), "seconds": t1 - t0, "peak": status("VmHWM"), "rss": status("VmRSS"),
                  "base": base, "first": type(first).__name__}))
"""


def _row(i: int, images: list[dict]) -> dict:
    """Row ``i``: one of the real rows (its image and polygons), with its own caption, texts and watermark score."""
    src = images[i % len(images)]
    words = ["open", "sale", "coffee", "hotel", "北京", "欢迎光临", "體育館", "exit", "menu", "garden"]
    anns = []
    for j, a in enumerate(src["annotations"]):
        b = dict(a)
        b["text"] = words[(i + j) % len(words)] + (str(i % 97) if b.get("language") == "Latin" else "")
        anns.append(b)
    cap = (f"photo {i} of a storefront on a busy street at dusk, with a large illuminated sign above the door; "
           f"it shows the shop's name in two languages")
    return {"img_name": src["img_name"], "caption": cap, "wm_score": round((i * 7919 % 1000) / 1000, 3),
            "annotations": anns}


def write_part(path: Path, start: int, count: int, root: str, images: list[dict]) -> None:
    """A JSON file of rows start .. start+count-1, written a row at a time."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"data_root": ' + json.dumps(root) + ', "data_list": [\n')
        for i in range(start, start + count):
            f.write(("" if i == start else ",\n") + json.dumps(_row(i, images), ensure_ascii=False))
        f.write("\n]}\n")
    os.replace(tmp, path)


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a child process (``wait4``: that child's own peak)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it here, with its own resource usage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss * 1024, out.read()


def probe(kind: str, path: Path) -> dict:
    _, _, out = run_measured([sys.executable, "-c", PROBE, kind, str(path)])
    return json.loads(out.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_000_000, help="rows of the large annotation set")
    ap.add_argument("--parts", type=int, default=6, help="JSON files the large set is written as")
    ap.add_argument("--compare-rows", type=int, default=200_000, help="rows of the JSON-vs-index side by side")
    ap.add_argument("--rounds", type=int, default=2, help="turns of the side by side (index, JSON, index, ...)")
    ap.add_argument("--work", default=None, help="folder for the generated files (kept; reused when present)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

    if not (work / "images" / "anyword_synth.json").is_file():
        write_dataset(SynthConfig(num=16, size=256, seed=0, max_lines=5), work / "images")
    images = [r for r in json.loads((work / "images" / "anyword_synth.json").read_text())["data_list"]]
    root = str(work / "images" / "images")
    cli = [sys.executable, "-m", "anytext2_lcm.cli"]

    # The large set: parts of rows, then one index over all of them.
    per = -(-args.rows // args.parts)
    parts = []
    t0 = time.perf_counter()
    for k in range(args.parts):
        n = min(per, args.rows - k * per)
        p = work / f"part{k}_{k * per}_{n}.json"
        if not p.is_file():
            write_part(p, k * per, n, root, images)
        parts.append(p)
    size = sum(p.stat().st_size for p in parts)
    print(f"annotations: {args.rows:,} rows in {len(parts)} JSON files, {size / 2**20:,.0f} MiB "
          f"({size / args.rows:.0f} bytes/row); generated or found in {time.perf_counter() - t0:.0f} s")
    big = work / f"all_{args.rows}.arrow"
    if not big.is_file():
        wall, peak, _ = run_measured([*cli, "index-data", *map(str, parts), "--out", str(big)])
        print(f"index-data: {wall:.0f} s ({args.rows / wall:,.0f} rows/s), peak resident {gib(peak)}, "
              f"index {big.stat().st_size / 2**20:,.0f} MiB")
    r = probe("index", big)
    ok = r["seconds"] <= 60 and r["peak"] - r["base"] <= 2**30
    print(f"start-up of one rank on the index of {r['rows']:,} rows: {r['seconds']:.2f} s; peak resident "
          f"{gib(r['peak'])} ({gib(r['peak'] - r['base'])} above the imports); first item: {r['first']}  "
          f"[goal <= 60 s and <= 1 GiB: {'met' if ok else 'NOT met'}]")

    # Side by side on the same rows.
    small = work / f"compare_{args.compare_rows}.json"
    if not small.is_file():
        write_part(small, 0, args.compare_rows, root, images)
    small_ix = work / f"compare_{args.compare_rows}.arrow"
    if not small_ix.is_file():
        run_measured([*cli, "index-data", str(small), "--out", str(small_ix)])
    res: dict[str, list] = {"index": [], "json": []}
    for _ in range(args.rounds):
        for kind, path in (("index", small_ix), ("json", small)):
            res[kind].append(probe(kind, path))
    print(f"\nside by side, {args.compare_rows:,} rows ({small.stat().st_size / 2**20:.0f} MiB of JSON), "
          f"{args.rounds} turn(s) each, medians:")
    print("| reader | start-up (s) | peak resident | above the imports |\n|---|---:|---:|---:|")
    med = {}
    for kind in ("json", "index"):
        rs = sorted(res[kind], key=lambda x: x["seconds"])
        m = rs[len(rs) // 2]
        peak = sorted(x["peak"] - x["base"] for x in res[kind])[len(rs) // 2]
        med[kind] = (m["seconds"], peak)
        print(f"| {kind} | {m['seconds']:.2f} | {gib(sorted(x['peak'] for x in res[kind])[len(rs) // 2])} | "
              f"{gib(peak)} |")
    print(f"JSON / index: start-up {med['json'][0] / med['index'][0]:.0f}x, memory above the imports "
          f"{med['json'][1] / max(med['index'][1], 1):.0f}x")
    print(f"\nfiles kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
