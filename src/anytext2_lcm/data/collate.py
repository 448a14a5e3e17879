"""Batches for the model, the DataLoader recipe, and the skip-rate monitor.

:class:`AnyWordCollate` turns samples of :class:`~.anyword.AnyWordDataset` into the batch of
:mod:`anytext2_lcm.conditioning` (same names, shapes and ranges), drops the :class:`~.skips.SkipRecord` items and
counts them. :func:`make_dataloader` wires dataset, sampler, workers and the :class:`SkipMonitor` that stops a run
whose skip rate passes ``max_skip_rate``.

Batch (B = kept samples, L = max_lines, S = image_size, G = S * glyph_scale):

=================  ========================  =========================================
key                shape / type              values
=================  ========================  =========================================
``img``            (B, 3, S, S) float32      [-1, 1]
``masked_img``     (B, 3, S, S) float32      [-1, 1]; -1 everywhere (generation) or in the text regions (editing)
``glyphs``         (B, L, 3, G, G) float32   [0, 1], line colour x coverage
``positions``      (B, L, 1, S, S) float32   {0, 1}
``gly_line``       (B, L, 1, 80, 512) float  {0, 1}
``colors``         (B, L, 3) float32         RGB / 255; 500 / 255 = unspecified (also the padding)
``n_lines``        (B,) int64                1..L
``font_hint``      (B, 1, S, S) float32      {0, 1}
``inv_mask``       (B, 1, S, S) float32      {0, 1}, 1 = no loss
``hint``           (B, 1, S, S) float32      {0, 1}, union of the positions
``img_caption``    list of B str
``text_caption``   list of B str             with one " * " placeholder per real line
``texts``          list of B lists of L str  padding ' '
``language``       list of B lists of L str  padding ' '
``skipped``        dict reason -> count      items of this batch that were skipped
``skip_records``   list of SkipRecord
=================  ========================  =========================================

By default (:func:`make_dataloader` ``compact=True``) workers hand over the image-sized tensors as uint8 and the
main process expands them (:func:`expand_batch`) on the training device: a quarter of the bytes through shared
memory and over PCIe, and no page-faulting of 30 MB of fresh shared memory per sample in the workers.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from .anyword import AnyWordDataset
from .fonts import clear_font_cache
from .skips import SKIP_REASONS, SkipRecord, TooManySkipsError

log = logging.getLogger(__name__)


def _new_tensor(shape: tuple, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker, in shared memory, so that handing the batch to the
    main process does not copy it (what ``default_collate`` does too)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty((0,), dtype=dtype).set_(storage, 0, shape)


_U8_KEYS = ("img", "edit_mask", "glyphs", "positions", "gly_line", "font_hint", "inv_mask", "hint")


class AnyWordCollate:
    """Collate function: kept samples -> a batch; skipped items -> counts.

    ``compact=False`` gives the model's batch (see the module docstring). ``compact=True`` gives the same keys with
    the image-sized tensors still uint8 (``img`` 0-255, ``glyphs`` 0-255, masks 0/1) and ``edit_mask`` (B, 1, S, S)
    instead of ``masked_img``: a quarter of the bytes to hand from a worker to the main process or to copy to a GPU.
    :func:`expand_batch` turns it into the model's batch, exactly.
    """

    def __init__(self, image_size: int, max_lines: int, glyph_scale: int = 1, compact: bool = False):
        self.s, self.l, self.g, self.compact = image_size, max_lines, image_size * glyph_scale, compact

    @classmethod
    def for_dataset(cls, dataset: AnyWordDataset, compact: bool = False) -> "AnyWordCollate":
        c = dataset.cfg
        return cls(c.image_size, c.max_lines, c.glyph_scale, compact)

    def __call__(self, items: list) -> dict:
        skips = [x for x in items if isinstance(x, SkipRecord)]
        samples = [x for x in items if not isinstance(x, SkipRecord)]
        b, s, n_slots, g = len(samples), self.s, self.l, self.g
        u8 = torch.uint8
        out = {
            "img": _new_tensor((b, 3, s, s), u8),
            "edit_mask": _new_tensor((b, 1, s, s), u8),
            "glyphs": _new_tensor((b, n_slots, 3, g, g), u8),
            "positions": _new_tensor((b, n_slots, 1, s, s), u8),
            "gly_line": _new_tensor((b, n_slots, 1, 80, 512), u8),
            "colors": _new_tensor((b, n_slots, 3)),
            "n_lines": torch.tensor([x["n_lines"] for x in samples], dtype=torch.long),
            "font_hint": _new_tensor((b, 1, s, s), u8),
            "inv_mask": _new_tensor((b, 1, s, s), u8),
            "hint": _new_tensor((b, 1, s, s), u8),
        }
        for i, x in enumerate(samples):
            out["img"][i].copy_(torch.from_numpy(x["img"]).permute(2, 0, 1))
            out["glyphs"][i].copy_(torch.from_numpy(x["glyphs"]))
            out["positions"][i, :, 0].copy_(torch.from_numpy(x["positions"]))
            out["gly_line"][i, :, 0].copy_(torch.from_numpy(x["gly_line"]))
            torch.div(torch.from_numpy(x["colors"]), 255.0, out=out["colors"][i])
            for key in ("edit_mask", "font_hint", "inv_mask", "hint"):
                out[key][i, 0].copy_(torch.from_numpy(x[key]))
        out.update({
            "img_caption": [x["img_caption"] for x in samples],
            "text_caption": [x["text_caption"] for x in samples],
            "texts": [list(x["texts"]) for x in samples],
            "language": [list(x["language"]) for x in samples],
            "skipped": dict(Counter(r.reason for r in skips)),
            "skip_records": skips,
            "compact": True,
        })
        return out if self.compact else expand_batch(out, shared=True)


def expand_batch(batch: dict, device=None, shared: bool = False, non_blocking: bool = False) -> dict:
    """A compact batch (uint8 images and masks) -> the model's batch (float32, see the module docstring).

    Args:
        device: where the float tensors are made (e.g. the GPU: copy uint8, expand there). Default: where they are.
        shared: allocate on the CPU in shared memory when inside a DataLoader worker.
        non_blocking: passed to the device copy (with pinned memory).
    A batch that is already expanded is only moved to ``device``.
    """
    out = {k: v for k, v in batch.items() if k not in _U8_KEYS and k != "compact"}
    move = (lambda t: t.to(device, non_blocking=non_blocking)) if device is not None else (lambda t: t)
    out["colors"], out["n_lines"] = move(batch["colors"]), move(batch["n_lines"])
    if not batch.get("compact", False):
        for k in ("img", "masked_img", "glyphs", "positions", "gly_line", "font_hint", "inv_mask", "hint"):
            out[k] = move(batch[k])
        return out

    def new(t: torch.Tensor) -> torch.Tensor:
        if shared and device is None:
            return _new_tensor(tuple(t.shape))
        return torch.empty(t.shape, dtype=torch.float32, device=t.device)

    img8 = move(batch["img"])
    img = torch.div(img8, 127.5, out=new(img8)).sub_(1.0)  # the original: float32(x) / 127.5 - 1
    out["img"] = img
    out["masked_img"] = new(img).copy_(img).masked_fill_(move(batch["edit_mask"]).bool(), -1.0)
    glyphs = move(batch["glyphs"])
    out["glyphs"] = torch.div(glyphs, 255.0, out=new(glyphs))
    for k in ("positions", "gly_line", "font_hint", "inv_mask", "hint"):
        t = move(batch[k])
        out[k] = new(t).copy_(t)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` so that each sample's randomness is fixed by (seed, epoch, index).

    The order of an epoch is a permutation seeded by (seed, epoch) (or 0..n-1 without shuffle). The ranks deal it
    out from global position ``offset`` (0 at an epoch's start): rank ``r`` takes positions ``offset + r``,
    ``offset + r + world_size``, ... (as ``DistributedSampler``), the rest padded by wrapping to the epoch's start so
    that every rank gets as many. A step of global batch G therefore takes the same G positions whatever the number
    of processes, and a run resumed on another number of processes continues at the global position where the
    checkpoint was (``offset``) without repeating or dropping a sample of the epoch. ``start`` skips the first
    positions of this rank's share once (mid-epoch resume on the same processes); the next :meth:`set_epoch` starts
    from 0 unless told otherwise.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, start: int = 0, offset: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch, self.start, self.offset = int(epoch), int(start), int(offset)

    def set_epoch(self, epoch: int, start: int = 0, offset: int = 0) -> None:
        self.epoch, self.start, self.offset = int(epoch), int(start), int(offset)

    def order(self) -> list[int]:
        """This rank's indices for the current epoch (before ``start``)."""
        if self.shuffle:
            idx = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch])).permutation(self.n)
        else:
            idx = np.arange(self.n)
        tail = idx[self.offset:]
        pad = -len(tail) % self.world_size if len(tail) else 0
        if pad:
            tail = np.concatenate([tail, np.resize(idx, pad)])
        return tail[self.rank::self.world_size].tolist()

    def __iter__(self):
        epoch = self.epoch
        for i in self.order()[self.start:]:
            yield (epoch, i)

    def __len__(self) -> int:
        return max(len(self.order()) - self.start, 0)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one thread per worker, the worker's own font handles, seeded global RNGs.

    No sample uses the global RNGs (each has its own generator); they are seeded only so that third-party code
    that does is reproducible too.
    """
    clear_font_cache()
    # torch re-creates its pool safely after fork. OpenCV's cv2.setNumThreads() must NOT be called here: in a forked
    # child of a process that already used OpenCV's thread pool it waits forever for threads that were not copied.
    torch.set_num_threads(1)
    info = get_worker_info()
    seed = (info.seed if info is not None else worker_id) % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Skip monitoring
# ---------------------------------------------------------------------------------------------------------------


class SkipMonitor:
    """Counts skipped samples by reason, logs examples, and stops the run past ``max_skip_rate``.

    The rate is skipped / seen over the whole run (restored on resume), judged once ``min_items`` samples were seen.
    """

    def __init__(self, max_skip_rate: float = 0.05, min_items: int = 100, examples_per_reason: int = 3):
        self.max_skip_rate, self.min_items, self.examples = max_skip_rate, max(int(min_items), 1), examples_per_reason
        self.seen = 0
        self.counts: Counter = Counter()
        self.first: dict[str, list[str]] = {}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def update(self, batch: dict) -> None:
        """Account for one batch (kept + skipped items); raises :class:`TooManySkipsError` past the rate."""
        records = batch.get("skip_records", [])
        self.seen += len(batch["texts"]) + len(records)
        for r in records:
            self.counts[r.reason] += 1
            shown = self.first.setdefault(r.reason, [])
            if len(shown) < self.examples:
                shown.append(str(r))
                log.warning("skipped sample %s", r)
        self.check()

    def check(self) -> None:
        if self.seen >= self.min_items and self.skipped > self.max_skip_rate * self.seen:
            raise TooManySkipsError(self.message())

    def message(self) -> str:
        rate = self.skipped / max(self.seen, 1)
        reasons = ", ".join(f"{k} {v}" for k, v in self.counts.most_common())
        examples = "; ".join(e for v in self.first.values() for e in v[:1])
        return (f"data: {self.skipped} of {self.seen} samples skipped ({rate:.1%} > max_skip_rate "
                f"{self.max_skip_rate:.1%}): {reasons}. First of each: {examples}. Fix the data (run "
                f"`anytext2-lcm validate-data` on the annotation files for a full report) or raise max_skip_rate.")

    def summary(self) -> str:
        if not self.counts:
            return f"{self.seen} samples, none skipped"
        return f"{self.seen} samples, {self.skipped} skipped: " + ", ".join(
            f"{k} {v}" for k, v in self.counts.most_common())

    def state_dict(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.counts = Counter({k: int(v) for k, v in state["counts"].items() if k in SKIP_REASONS})


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


def merge_skips(states: list[dict]) -> dict:
    """The skip counters of several ranks' loader states, summed (a :meth:`SkipMonitor.state_dict`)."""
    counts: Counter = Counter()
    for st in states:
        counts.update({k: int(v) for k, v in st["skips"]["counts"].items()})
    return {"seen": sum(int(st["skips"]["seen"]) for st in states), "counts": dict(counts)}


class AnyWordLoader:
    """A DataLoader over an AnyWord dataset that counts skips and can resume mid-epoch exactly.

    Iterate it for one epoch of batches; ``set_epoch`` before each epoch; ``state_dict`` / ``load_state_dict``
    carry the epoch, the position inside it and the skip counts.
    """

    def __init__(self, dataset: AnyWordDataset, loader: DataLoader, sampler: EpochSampler, monitor: SkipMonitor,
                 device=None):
        self.dataset, self.loader, self.sampler, self.monitor = dataset, loader, sampler, monitor
        self.position = sampler.start
        self.device = device

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start: int = 0, offset: int = 0) -> None:
        self.sampler.set_epoch(epoch, start, offset)
        self.position = start

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.position += len(batch["texts"]) + len(batch["skip_records"])
            self.monitor.update(batch)
            if batch.get("compact") or self.device is not None:
                batch = expand_batch(batch, self.device, non_blocking=self.loader.pin_memory)
            yield batch
        log.info("data epoch %d done: %s", self.epoch, self.monitor.summary())

    def state_dict(self) -> dict:
        """This rank's place: the epoch, its items drawn in it, where the epoch's dealing started (``offset``) and
        the number of ranks it is dealt to, and the skip counters."""
        s = self.sampler
        return {"epoch": self.epoch, "position": self.position, "offset": s.offset, "world": s.world_size,
                "skips": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where :meth:`state_dict` was taken, on the same number of ranks."""
        self.set_epoch(int(state["epoch"]), int(state["position"]), int(state.get("offset", 0)))
        self.monitor.load_state_dict(state["skips"])

    def load_moved_state(self, states: list[dict]) -> None:
        """Continue from the states of every rank of a run with another number of ranks (elastic resume): at the
        epoch's global position they reached together (``offset + world * position``); this rank's skip counters
        start from the run's totals on rank 0 and from 0 elsewhere (the rate is judged per rank)."""
        epochs = {int(st["epoch"]) for st in states}
        consumed = {int(st.get("offset", 0)) + int(st.get("world", len(states))) * int(st["position"])
                    for st in states}
        if len(epochs) != 1 or len(consumed) != 1:
            raise ValueError(f"the ranks of the checkpoint are at different data positions: epochs {sorted(epochs)}, "
                             f"global positions {sorted(consumed)}")
        self.set_epoch(epochs.pop(), 0, consumed.pop())
        self.monitor.load_state_dict(merge_skips(states) if self.sampler.rank == 0 else {"seen": 0, "counts": {}})


def make_dataloader(dataset: AnyWordDataset, batch_size: int, *, num_workers: int = 2, shuffle: bool = True,
                    drop_last: bool = False, persistent_workers: bool = False, pin_memory: bool = False,
                    prefetch_factor: int | None = None, rank: int = 0, world_size: int = 1, epoch: int = 0,
                    start: int = 0, device=None, compact: bool = True, multiprocessing_context=None
                    ) -> AnyWordLoader:
    """The DataLoader recipe for AnyWord data; iterating it yields the model's batches (module docstring).

    Workers run :func:`worker_init` (one torch thread each; fonts opened per worker and cached there, never per
    sample); the sampler passes (epoch, index) so samples do not depend on worker assignment; the collate drops
    skipped items; the monitor stops the run past ``dataset.cfg.max_skip_rate``.

    Args:
        batch_size: items drawn per batch (a batch holds fewer samples when some were skipped).
        rank, world_size: data-parallel shard (each rank sees a disjoint part of every epoch).
        epoch, start: where to begin (resume: the values of ``AnyWordLoader.state_dict()``).
        device: where the yielded float tensors live (e.g. ``"cuda"``); default CPU.
        compact: workers hand over uint8 batches and the float expansion happens in the main process on
            ``device`` (4x fewer bytes through shared memory and to the GPU: faster on every machine measured,
            see ``benchmarks/data_speed.py``). False: workers build the float batch themselves.
        pin_memory: pin the compact batch for an asynchronous copy to a CUDA ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = dataset.cfg
    sampler = EpochSampler(len(dataset), cfg.seed, shuffle, rank, world_size, epoch, start)
    kwargs = {}
    if num_workers > 0:
        kwargs.update(worker_init_fn=worker_init, persistent_workers=persistent_workers,
                      multiprocessing_context=multiprocessing_context)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=AnyWordCollate.for_dataset(dataset, compact=compact), drop_last=drop_last,
                        pin_memory=pin_memory, **kwargs)
    monitor = SkipMonitor(cfg.max_skip_rate, min(cfg.min_items_for_skip_rate, max(len(dataset), 1)))
    return AnyWordLoader(dataset, loader, sampler, monitor, device)
