"""Training-data throughput: samples/s at 512 px in one process and with 2 DataLoader workers, line cache on/off.

    python benchmarks/data_speed.py                      # makes a temporary synthetic dataset (64 images)
    python benchmarks/data_speed.py --data my.json --samples 400

What is timed is everything a training step waits for on the CPU: image decode and resize, glyph / line / position /
font-hint rendering, the collate, and the expansion into the model's float32 batch (in the main process after a
uint8 hand-over through shared memory by default; "float32 hand-over" builds the float batch in the workers). The
first batch (worker start-up) is excluded from the timing. Other load on the machine shows in the load average
printed first; the CPU time per sample (all processes: main and workers) does not depend on it and says what an
idle machine would do: samples/s <= 1000 x cores / (CPU ms per sample).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _loader_rate(ds, batch_size: int, workers: int, samples: int, compact: bool = True) -> tuple[float, float | None]:
    """(samples/s, CPU ms per sample over all processes involved)."""
    from anytext2_lcm.data.collate import make_dataloader

    loader = make_dataloader(ds, batch_size, num_workers=workers, persistent_workers=workers > 0, compact=compact)
    seen, epoch, t0, cpu0, pids = 0, 0, None, None, []

    def cpu() -> float | None:
        main = os.times()
        total = main.user + main.system
        for pid in pids:
            c = _proc_cpu(pid)
            if c is None:
                return None
            total += c
        return total

    while seen < samples:
        loader.set_epoch(epoch)
        for batch in loader:
            if t0 is None:  # start the clock after the first batch: worker start-up is not throughput
                if workers:  # private API, only to read the workers' CPU time
                    pids = [w.pid for w in getattr(loader.loader._iterator, "_workers", [])]
                t0, cpu0 = time.perf_counter(), cpu()
                continue
            seen += len(batch["texts"])
            if seen >= samples:
                break
        epoch += 1
    wall = time.perf_counter() - t0
    cpu1 = cpu()
    return seen / wall, (None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / seen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", help="AnyWord JSON files (default: a temporary synthetic dataset)")
    ap.add_argument("--num", type=int, default=64, help="images in the temporary dataset")
    ap.add_argument("--size", type=int, default=512, help="training size")
    ap.add_argument("--samples", type=int, default=160, help="samples timed per configuration")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    import cv2
    import torch

    from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig

    # One thread per process: "1 process" means one core. Set before any worker is forked (see collate.worker_init).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    tmp = None
    paths = args.data
    if not paths:
        from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

        tmp = tempfile.TemporaryDirectory()
        paths = [str(p) for p in write_dataset(SynthConfig(num=args.num, size=args.size, seed=0), tmp.name)]
    probe = AnyWordDataset(DataConfig(json_paths=tuple(paths), image_size=args.size))
    lines = [probe[i]["n_lines"] for i in range(min(len(probe), 64)) if isinstance(probe[i], dict)]
    print(f"data loading at {args.size} px: {len(probe)} images, {sum(lines) / max(len(lines), 1):.2f} lines/sample, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<44}{'line cache':<12}{'samples/s':>10}{'CPU ms/sample':>16}")
    runs = [(0, 4096, True), (0, 0, True), (args.workers, 4096, True), (args.workers, 0, True),
            (args.workers, 4096, False)]
    for workers, cache, compact in runs:
        ds = AnyWordDataset(DataConfig(json_paths=tuple(paths), image_size=args.size, line_cache_size=cache))
        rate, cpu_ms = _loader_rate(ds, args.batch_size, workers, args.samples, compact)
        mode = "1 process (1 thread)" if workers == 0 else (
            f"{workers} workers, uint8 hand-over (default)" if compact else f"{workers} workers, float32 hand-over")
        cpu_txt = f"{cpu_ms:.1f}" if cpu_ms is not None else "-"
        print(f"{mode:<44}{'on' if cache else 'off':<12}{rate:>10.1f}{cpu_txt:>16}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
