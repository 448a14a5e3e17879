"""WebDataset shards of AnyWord data (``anytext2-lcm make-shards``, ``data.shards``): written once, read as streams.

Layout of a shard folder::

    shards.json                  manifest: {"format", "version", "samples", "shards": [{"name", "samples", "bytes"}]}
    shard-000000.tar ...         WebDataset tars; sample ``s0000000042``: ``.json`` (its AnyWord row, plus
                                 ``__source__`` "file.json:row N" and ``__image__`` the image's original path) and
                                 the image file's bytes as they were (``.jpg``, ``.png``, ...; absent if missing)

Every row of the JSON files becomes a sample, in file order (sample id = its number), bad ones included: the reader
skips and counts them exactly as the JSON reader does (an absent image is ``image_missing``), and applies the
watermark filter of the run's configuration.

Reading (:class:`ShardStreams`): the data is dealt into **streams**, one per sample of an optimizer step (global batch
G = batch x accumulation x processes). In epoch e, the shards are permuted (seeded by (seed, e)) and stream j reads
shards ``order[j::G]`` one after the other, each through a shuffle buffer seeded by (seed, e, shard); then it goes on
to its shards of epoch e + 1 (a stream's epochs are its own; sample randomness is seeded by the sample's epoch and
id). A step takes the next sample of every stream: micro-step k of rank r takes streams ``r + W * (k * b + i)``,
i < b. Hence

* ranks read disjoint shards (stream j belongs to rank j mod W); the tars are read sequentially by the rank's main
  process (raw bytes), and DataLoader workers decode and render (the costly part);
* a step trains on the same G samples whatever the number of processes: a 2-process run equals a 1-process run of
  the same global batch, and a run resumed on another number of processes continues every stream where it was;
* the position is one cursor per stream (epoch, shard of the epoch, samples taken from it), checkpointed per rank;
  resuming replays the current shard of each stream without decoding up to its cursor.

Needs at least G shards (every stream reads one at a time).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..atomic import atomic_path, write_json
from ..config import ConfigError
from .anyword import AnyWordDataset, BadRow, DataConfig, LoadStats, parse_row, sample_rng
from .glyphs import cached_line_renderer
from .index import stream_annotation_file
from .skips import DataFileError, SampleError, SkipRecord

log = logging.getLogger(__name__)

SHARDS_FORMAT = "anytext2-lcm/shards"
SHARDS_VERSION = 1
MANIFEST = "shards.json"


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _image_member(raw, root: str) -> tuple[str | None, bytes | None]:
    """(extension, bytes) of a row's image file; (None, None) when there is none to read (the reader then skips the
    sample as the JSON reader would: ``image_missing`` or a malformed row)."""
    name = raw.get("img_name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name:
        return None, None
    path = os.path.join(root, name)
    ext = os.path.splitext(name)[1].lower().lstrip(".") or "img"
    if not ext.isalnum():
        ext = "img"
    try:
        with open(path, "rb") as f:
            return ext, f.read()
    except OSError:
        return None, None


def _write_tar(path: str, samples: list[dict]) -> int:
    """One shard, atomically (temporary name, then a rename); returns its size in bytes."""
    import webdataset as wds

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f)
        for s in samples:
            writer.write(s)
        writer.close()
    return os.path.getsize(path)


def write_shards(json_paths: list[str], out: str | os.PathLike, samples_per_shard: int = 1000) -> dict:
    """Write the rows of AnyWord JSON files (streamed) with their images as WebDataset shards in ``out``.

    Returns the manifest (also written to ``out/shards.json``, last). Memory: one shard's samples.
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    streams = [(os.fspath(p), *stream_annotation_file(p)) for p in json_paths]
    shards, pending, sid, missing = [], [], 0, 0

    def flush() -> None:
        name = f"shard-{len(shards):06d}.tar"
        size = _write_tar(os.path.join(out, name), pending)
        shards.append({"name": name, "samples": len(pending), "bytes": size})
        pending.clear()

    for path, root, rows in streams:
        base = os.path.basename(path)
        for k, raw in enumerate(rows):
            ext, data = _image_member(raw, root)
            missing += data is None
            meta = {"row": raw, "__source__": f"{base}:row {k}", "__root__": root}
            sample = {"__key__": f"s{sid:010d}", "json": json.dumps(meta, ensure_ascii=False).encode()}
            if data is not None:
                sample[ext] = data
            pending.append(sample)
            sid += 1
            if len(pending) == samples_per_shard:
                flush()
    if pending:
        flush()
    manifest = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "samples": sid, "shards": shards,
                "sources": [p for p, _, _ in streams], "images_missing": missing}
    write_json(os.path.join(out, MANIFEST), manifest, indent=1, ensure_ascii=False)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# The shard set
# ---------------------------------------------------------------------------------------------------------------


class ShardSet:
    """The manifest of a shard folder: shard files, their sample counts and the id of each shard's first sample."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.shards={self.folder!r}: no {MANIFEST} (write shards with "
                                    f"`anytext2-lcm make-shards`)")
        try:
            m = json.loads(open(path, encoding="utf-8").read())
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != SHARDS_FORMAT or m.get("version") != SHARDS_VERSION:
            raise DataFileError(f"{path}: not a shard manifest of this version (format {SHARDS_FORMAT} "
                                f"v{SHARDS_VERSION})")
        self.names = [s["name"] for s in m["shards"]]
        self.counts = np.array([int(s["samples"]) for s in m["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.starts[-1])
        absent = [n for n in self.names if not os.path.isfile(os.path.join(self.folder, n))]
        if absent:
            raise FileNotFoundError(f"data.shards={self.folder!r}: {len(absent)} shard files are missing, e.g. "
                                    f"{absent[:3]}")

    def __len__(self) -> int:
        return len(self.names)

    def samples(self, shard: int) -> Iterator[tuple[int, dict]]:
        """(sample id, raw WebDataset sample: ``json`` bytes and the image bytes) of one shard, in file order."""
        from webdataset.tariterators import tarfile_samples

        path = os.path.join(self.folder, self.names[shard])
        with open(path, "rb") as f:
            for k, s in enumerate(tarfile_samples([{"url": path, "stream": f}])):
                yield int(self.starts[shard]) + k, s


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of ``size`` items (WebDataset's scheme), deterministic given ``rng``; size 1 keeps order."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = x
    for i in rng.permutation(len(buf)):
        yield buf[int(i)]


@dataclass
class Cursor:
    """Where a stream is: ``epoch``, the index of its current shard in its list of that epoch, samples taken."""

    epoch: int = 0
    shard: int = 0
    taken: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.shard, self.taken]


# ---------------------------------------------------------------------------------------------------------------
# Streams (the sampler of one rank)
# ---------------------------------------------------------------------------------------------------------------


class ShardStreams:
    """The items of one rank, micro-batch by micro-batch (a DataLoader ``sampler`` with ``batch_size`` = b).

    Yields ``(epoch, sample id, raw sample)``; records, in order, the cursor of its stream after each item
    (:attr:`pending`), which the loader applies when the batch holding the item is consumed. Rows the run's
    watermark filter drops are passed over here (they take no place in a batch, as with the JSON reader).
    """

    def __init__(self, shards: ShardSet, cfg: DataConfig, streams: int, rank: int, world: int, batch: int,
                 accumulation: int):
        if len(shards) < streams:
            raise ConfigError(f"data.shards={shards.folder!r}: {len(shards)} shards for {streams} streams (one per "
                              f"sample of an optimizer step: batch x accumulation x processes); write at least "
                              f"{streams} shards (make-shards --samples-per-shard smaller)")
        self.shards, self.cfg, self.n = shards, cfg, streams
        self.rank, self.world, self.batch, self.accumulation = rank, world, batch, accumulation
        self.mine = list(range(rank, streams, world))
        self.cursors = {j: Cursor() for j in self.mine}
        self.micro = 0
        self.pending: deque = deque()

    def shard_list(self, stream: int, epoch: int) -> np.ndarray:
        """The shards stream ``stream`` reads in ``epoch``."""
        order = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, epoch, 0x5A4D])).permutation(
            len(self.shards))
        return order[stream::self.n]

    def _stream(self, j: int, start: Cursor) -> Iterator[tuple[int, int, dict, Cursor]]:
        """(epoch, sample id, raw, cursor after it) of stream ``j`` from ``start`` on, forever."""
        c = Cursor(start.epoch, start.shard, start.taken)
        while True:
            todo = self.shard_list(j, c.epoch)
            while c.shard < len(todo):
                shard = int(todo[c.shard])
                rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, c.epoch, shard, 0x5348]))
                items = shuffled(self.shards.samples(shard), self.cfg.shuffle_buffer, rng)
                for k, (sid, raw) in enumerate(items):
                    if k < c.taken:
                        continue  # already trained on (resume): passed over without decoding
                    c = Cursor(c.epoch, c.shard, k + 1)
                    yield c.epoch, sid, raw, c
                c = Cursor(c.epoch, c.shard + 1, 0)
            c = Cursor(c.epoch + 1, 0, 0)

    def _kept(self, raw: dict) -> bool:
        """False when the run's watermark filter drops the row (as the JSON reader does at load)."""
        try:
            row = json.loads(raw["json"])["row"]
        except (KeyError, ValueError, TypeError):
            return True  # a broken sample is the dataset's to skip and count
        return parse_row(row, "", "", self.cfg, LoadStats()) is not None

    def __iter__(self):
        its = {j: self._stream(j, self.cursors[j]) for j in self.mine}
        m = self.micro
        per = self.batch * self.accumulation
        while True:
            k = m % self.accumulation
            for t in range(k * self.batch, (k + 1) * self.batch):
                j = self.mine[t % per]
                while True:
                    epoch, sid, raw, cur = next(its[j])
                    if self._kept(raw):
                        break
                self.pending.append((j, cur))
                yield (epoch, sid, raw)
            m += 1


# ---------------------------------------------------------------------------------------------------------------
# Samples (the dataset the DataLoader workers run)
# ---------------------------------------------------------------------------------------------------------------


class ShardDataset(AnyWordDataset):
    """Turns a raw shard sample ``(epoch, sample id, raw)`` into a training sample (or a :class:`SkipRecord`), with
    the JSON reader's processing and rules; the sample's ``index`` is ``epoch * len(self) + id`` (the trainer seeds
    the sample's noise by it: distinct per epoch and sample)."""

    def __init__(self, cfg: DataConfig, shards: ShardSet, fonts=None):  # no rows in memory: they come with samples
        self.cfg, self.shard_set, self.epoch = cfg, shards, 0
        self.fonts = fonts if fonts is not None else cfg.font_library()
        self.load_stats = LoadStats(rows=shards.total)
        self.rows = []
        self._images: dict[str, bytes] = {}
        self._seq = None
        self._render_line = cached_line_renderer(cfg.line_cache_size)

    def __len__(self) -> int:
        return self.shard_set.total

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_seq"] = None
        return state

    def __getitem__(self, key) -> dict | SkipRecord:
        if len(key) == 2:  # (epoch, id): sample id read in shard order (for a stand-in batch)
            epoch, sid = key
            return self.process(int(epoch), *self._by_id(int(sid)))
        return self.process(*key)

    def _by_id(self, sid: int) -> tuple[int, dict]:
        if self._seq is None or self._seq[0] > sid:
            self._seq = (-1, (s for k in range(len(self.shard_set)) for s in self.shard_set.samples(k)))
        last, it = self._seq
        for got, raw in it:
            self._seq = (got, it)
            if got == sid:
                return got, raw
        raise IndexError(f"sample {sid} not in {self.shard_set.folder}")

    def process(self, epoch: int, sid: int, raw: dict) -> dict | SkipRecord:
        index = epoch * len(self) + sid
        try:
            meta = json.loads(raw["json"])
            source, root = str(meta["__source__"]), str(meta["__root__"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            return SkipRecord(index, "malformed_row", f"shard sample {raw.get('__key__')}: {e!r}", "")
        row = parse_row(meta.get("row"), root, source, self.cfg, LoadStats())
        if row is None:  # dropped by the watermark filter (the streams pass these over; a direct read gets here)
            return SkipRecord(index, "processing_error", "dropped by data.wm_thresh", source)
        if isinstance(row, BadRow):
            return SkipRecord(index, row.reason, row.detail, row.source)
        data = next((v for k, v in raw.items() if not k.startswith("__") and k != "json"), None)
        self._images = {row.img_path: data} if data is not None else {}
        try:
            sample = self._process(row, index, sample_rng(self.cfg.seed, epoch, sid))
        except SampleError as e:
            return SkipRecord(index, e.reason, e.detail, row.source)
        except Exception as e:  # never crash training on one sample (as the JSON reader)
            log.warning("unexpected error in %s", row.source, exc_info=True)
            return SkipRecord(index, "processing_error", f"{type(e).__name__}: {e}", row.source)
        finally:
            self._images = {}
        return sample

    def open_image(self, path: str):
        data = self._images.get(path)
        if data is None:
            raise SampleError("image_missing", path)
        return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------------


class ShardLoader:
    """A DataLoader over :class:`ShardStreams` with the interface of :class:`~.collate.AnyWordLoader`: iterate it
    for batches (it never ends: every stream goes on into its next epoch), ``state_dict`` / ``load_state_dict`` /
    ``load_moved_state`` carry the stream cursors and the skip counters."""

    def __init__(self, dataset: ShardDataset, loader, streams: ShardStreams, monitor):
        self.dataset, self.loader, self.sampler, self.monitor = dataset, loader, streams, monitor
        self.device = None

    @property
    def epoch(self) -> int:
        """The oldest epoch among this rank's streams."""
        return min(c.epoch for c in self.sampler.cursors.values())

    def set_epoch(self, epoch: int, start: int = 0, offset: int = 0) -> None:
        """A fresh start (epoch 0); streams move through their epochs by themselves."""
        if epoch == 0 and not start:
            self.sampler.cursors = {j: Cursor() for j in self.sampler.mine}
            self.sampler.micro = 0

    def __iter__(self):
        sampler = self.sampler
        sampler.pending.clear()
        for batch in self.loader:
            n = len(batch["texts"]) + len(batch["skip_records"])
            for _ in range(n):
                j, cur = sampler.pending.popleft()
                sampler.cursors[j] = cur
            sampler.micro += 1
            self.monitor.update(batch)
            yield batch

    def state_dict(self) -> dict:
        s = self.sampler
        return {"kind": "shards", "streams": s.n, "micro": s.micro,
                "cursors": {str(j): c.to_list() for j, c in s.cursors.items()}, "skips": self.monitor.state_dict()}

    def _check(self, state: dict) -> None:
        if state.get("kind") != "shards" or int(state["streams"]) != self.sampler.n:
            raise ValueError(f"the checkpoint's data position is not one of {self.sampler.n} shard streams "
                             f"({state.get('kind', 'an index order')}, {state.get('streams')} streams)")

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        s = self.sampler
        s.cursors = {int(j): Cursor(*c) for j, c in state["cursors"].items()}
        s.micro = int(state["micro"])
        self.monitor.load_state_dict(state["skips"])

    def load_moved_state(self, states: list[dict]) -> None:
        """Continue every stream this rank now owns where the rank that owned it left it (elastic resume)."""
        from .collate import merge_skips

        cursors = {}
        for st in states:
            self._check(st)
            cursors.update({int(j): Cursor(*c) for j, c in st["cursors"].items()})
        s = self.sampler
        s.cursors = {j: cursors[j] for j in s.mine}
        s.micro = 0
        self.monitor.load_state_dict(merge_skips(states) if s.rank == 0 else {"seen": 0, "counts": {}})
