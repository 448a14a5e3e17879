"""The training DataLoader: the data module's reader, sampler, collate and skip monitor, plus sample indices.

Built from the public pieces of :mod:`anytext2_lcm.data.collate` (the same recipe as ``make_dataloader``) with three
additions the trainer needs:

* each batch carries ``index`` (the dataset indices of its kept samples): the trainer seeds each sample's
  randomness from (seed, epoch, index);
* the DataLoader gets its own ``torch.Generator``: creating an epoch's iterator then does not draw from the global
  torch generator (which is checkpointed; an extra draw at a mid-epoch resume would shift it);
* workers ignore SIGINT and SIGTERM: a preemption signal is the main process's to handle (it finishes the step and
  saves); workers stop with it.
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader

from ..data.index import anyword_dataset
from ..data.collate import AnyWordCollate, AnyWordLoader, EpochSampler, SkipMonitor, expand_batch, worker_init
from ..data.skips import SkipRecord, TooManySkipsError

STAND_IN_SEARCH = 4096
"""Rows :func:`stand_in_batch` tries before it gives up."""


class IndexedCollate:
    """``AnyWordCollate`` plus ``batch["index"]``: the dataset indices of the kept samples, in batch order."""

    def __init__(self, base: AnyWordCollate):
        self.base = base

    def __call__(self, items: list) -> dict:
        out = self.base(items)
        out["index"] = [int(x["index"]) for x in items if not isinstance(x, SkipRecord)]
        return out


def training_worker_init(worker_id: int) -> None:
    worker_init(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _data_loader(cfg, dataset, sampler) -> DataLoader:
    workers = cfg.train.num_workers
    kwargs = {"worker_init_fn": training_worker_init} if workers > 0 else {}
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=IndexedCollate(AnyWordCollate.for_dataset(dataset)),
                      generator=torch.Generator().manual_seed(cfg.train.seed), **kwargs)


def build_loader(cfg, rank: int = 0, world_size: int = 1) -> AnyWordLoader:
    """The loader of a :class:`~.config.TrainConfig` for one rank (shuffled, epoch-seeded by ``data.seed``); with
    ``data.shards``, the rank's shard streams (:mod:`anytext2_lcm.data.shards`)."""
    if cfg.data.shards:
        return build_shard_loader(cfg, rank, world_size)
    dataset = anyword_dataset(cfg.data)
    sampler = EpochSampler(len(dataset), cfg.data.seed, True, rank, world_size)
    loader = _data_loader(cfg, dataset, sampler)
    monitor = SkipMonitor(cfg.data.max_skip_rate, min(cfg.data.min_items_for_skip_rate, max(len(dataset), 1)))
    return AnyWordLoader(dataset, loader, sampler, monitor)


def build_shard_loader(cfg, rank: int = 0, world_size: int = 1):
    """One rank's :class:`~anytext2_lcm.data.shards.ShardLoader`: G = batch x accumulation x processes streams."""
    from ..data.shards import ShardDataset, ShardLoader, ShardSet, ShardStreams

    t = cfg.train
    shards = ShardSet(cfg.data.shards)
    streams = ShardStreams(shards, cfg.data, t.batch_size * t.gradient_accumulation_steps * world_size, rank,
                           world_size, t.batch_size, t.gradient_accumulation_steps)
    dataset = ShardDataset(cfg.data, shards)
    monitor = SkipMonitor(cfg.data.max_skip_rate, min(cfg.data.min_items_for_skip_rate, max(len(dataset), 1)))
    return ShardLoader(dataset, _data_loader(cfg, dataset, streams), streams, monitor)


def stand_in_batch(loader: AnyWordLoader, epoch: int) -> dict:
    """A one-sample batch of the first usable row of the data, read outside the loader's order (its position and
    skip counts do not move). The trainer runs it with weight 0 when a rank's micro-batch had no usable sample and
    none came before it: the rank still joins DDP's collectives and adds nothing to the gradients.

    Raises:
        TooManySkipsError: none of the first :data:`STAND_IN_SEARCH` rows is usable.
    """
    ds = loader.dataset
    for i in range(min(len(ds), STAND_IN_SEARCH)):
        item = ds[(epoch, i)]
        if not isinstance(item, SkipRecord):
            batch = loader.loader.collate_fn([item])
            if batch.get("compact") or loader.device is not None:
                batch = expand_batch(batch, loader.device)
            return batch
    raise TooManySkipsError(f"data: none of the first {min(len(ds), STAND_IN_SEARCH)} rows is usable (every one was "
                            f"skipped); run `anytext2-lcm validate-data` on the annotation files")
