"""Moving a run: resuming on another number of processes (elastic), and starting a run from an existing adapter.

**The global batch rule.** A checkpoint records batch b, accumulation a and the number of processes W; its global
batch G = b x a x W is what the optimizer state and the learning-rate schedule were made for, so a resume keeps G:

* this run's b x a x W' = G: resumed as configured;
* else, with W' != W: the per-process batch stays b and the accumulation becomes a' = G / (b x W') when that is an
  integer (logged); when it is not, the resume stops (exit 2) and says exactly what to set: a process count that
  divides G, or ``train.batch_size`` / ``train.gradient_accumulation_steps`` whose product with W' is G;
* a change of b or a on the same W that changes G is refused as before (a structural setting).

A moved resume needs a checkpoint at an optimizer-step boundary (``checkpoint-N``): one written inside an
accumulation window (``checkpoint-N-mK``, a preemption) holds partial gradients of the old processes, which are
resumed on those processes only.

**The data position** carries over without repeating or dropping a sample: with ``data.json_paths`` / ``data.index``
the ranks deal an epoch's order from a global position (``data.collate.EpochSampler``), and the new ranks continue
from the global position the old ones reached together; with ``data.shards`` the data is G streams whatever the
number of processes and every stream continues at its cursor. In both, a step after the move trains on the samples
the original run would have trained on (the shard streams exactly; the index order up to the wrap-around padding at
the end of an epoch, which depends on the number of processes). Global random states (``rng_rank{r}.pt``) of ranks
that existed are restored; new ranks keep their seeded states (they feed nothing per-sample: per-sample noise comes
from (seed, epoch, index)). Skip counters: the run's totals continue on rank 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import CheckpointError

log = logging.getLogger(__name__)

BATCH_KEYS = ("train.batch_size", "train.gradient_accumulation_steps", "world_size")
"""Structure entries that may change between a checkpoint and its resume as long as the global batch stays."""


def global_batch(structure: dict, world: int = 1) -> int:
    """b x a x W of a saved (or this run's) structure."""
    return (int(structure["train.batch_size"]) * int(structure["train.gradient_accumulation_steps"])
            * int(structure.get("world_size", world)))


def structure_diff(saved: dict, mine: dict) -> list[str]:
    """The structural settings that differ, the batch geometry excepted (see :func:`resume_accumulation`)."""
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in mine.items()
            if k not in BATCH_KEYS and saved.get(k) != v]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resume_accumulation(path, saved: dict, batch: int, accumulation: int, world: int, micro_in_window: int) -> int:
    """The gradient accumulation this run resumes with (see the module docstring), or CheckpointError saying what
    to set. ``saved`` is the checkpoint's structure; ``micro_in_window`` its micro-steps inside the open window."""
    g = global_batch(saved)
    b0, a0, w0 = (int(saved.get(k, world)) for k in BATCH_KEYS)
    if (batch, accumulation, world) == (b0, a0, w0):
        return accumulation
    if micro_in_window:
        raise CheckpointError(
            f"cannot resume {path} with another batch geometry: it was written inside an accumulation window "
            f"({micro_in_window} of {a0} micro-steps, a preemption) and its partial gradients belong to its {w0} "
            f"process(es); resume it with {w0} process(es), train.batch_size={b0}, "
            f"train.gradient_accumulation_steps={a0}, or resume an earlier step-boundary checkpoint "
            f"(checkpoint.resume=<folder checkpoint-NNNNNN>)")
    if batch * accumulation * world == g:
        return accumulation
    if world == w0:
        raise CheckpointError(
            f"cannot resume from {path}: train.batch_size x train.gradient_accumulation_steps x processes = "
            f"{batch} x {accumulation} x {world} = {batch * accumulation * world}, the checkpoint's global batch is "
            f"{b0} x {a0} x {w0} = {g}; keep the global batch (e.g. train.batch_size={b0} "
            f"train.gradient_accumulation_steps={a0}) or use a new output_dir")
    if g % (batch * world) == 0:
        return g // (batch * world)
    if g % world:
        counts = ", ".join(str(d) for d in _divisors(g) if d <= 4 * max(world, w0))
        raise CheckpointError(
            f"cannot resume from {path} on {world} processes: its global batch {b0} x {a0} x {w0} = {g} is not "
            f"divisible by {world}; use a number of processes that divides {g} ({counts}, ...), or start a new run "
            f"from its adapter (--init-adapter)")
    per = g // world
    b = max(d for d in _divisors(per) if d <= batch)
    raise CheckpointError(
        f"cannot resume from {path} on {world} processes with train.batch_size={batch}: the global batch {g} needs "
        f"{per} samples per process and step; set train.batch_size={b} train.gradient_accumulation_steps={per // b} "
        f"({b} x {per // b} x {world} = {g})")


def load_moved(trainer, reader, saved: dict) -> None:
    """Restore the data position, counters and random states of a checkpoint written by another batch geometry
    (at a step boundary; the accumulation was already set by :func:`resume_accumulation`)."""
    w0 = int(saved["structure"].get("world_size", trainer.world))
    states = [reader.json(f"data_rank{r}.json")["loader"] for r in range(w0)]
    trainer.loader.load_moved_state(states)
    s = trainer.state
    s.micro_step = s.global_step * trainer.cfg.train.gradient_accumulation_steps
    if trainer.rank < w0:
        from .state import restore_rng

        restore_rng(reader.obj(f"rng_rank{trainer.rank}.pt"))
    trainer.window = type(trainer.window)()
    log.info("resumed from %s at step %d (micro-step %d, epoch %d)", reader.path,
             s.global_step, s.micro_step, s.epoch)
    log.warning("resumed a run of %d process(es) (batch %s x accumulation %s) on %d (batch %d x accumulation %d): "
                "global batch %d kept; data continues at the position the old processes reached", w0,
                saved["structure"]["train.batch_size"], saved["structure"]["train.gradient_accumulation_steps"],
                trainer.world, trainer.cfg.train.batch_size, trainer.cfg.train.gradient_accumulation_steps,
                global_batch(saved["structure"]))


def load_init_adapter(model: torch.nn.Module, path: str | Path, adapter_name: str = "default",
                      alpha: float | None = None) -> int:
    """Copy an adapter's LoRA weights into the run's (already injected) LoRA layers; returns the modules set.

    Raises:
        CheckpointError: the adapter's modules or ranks are not this run's (it names the first differences).
    """
    from ..lora.files import _group_peft_keys, _read_adapter

    raw, config = _read_adapter(Path(path))
    if alpha is not None and config and "lora_alpha" in config and float(config["lora_alpha"]) != float(alpha):
        raise CheckpointError(f"{path}: lora_alpha {config['lora_alpha']}, this run's lora.alpha {alpha} (the scale "
                              f"of its update would change)")
    groups = _group_peft_keys(raw, str(path))
    params = dict(model.named_parameters())
    mine = {n.rsplit(".lora_A.", 1)[0] for n in params if f".lora_A.{adapter_name}." in n}
    if set(groups) != mine:
        extra, missing = sorted(set(groups) - mine), sorted(mine - set(groups))
        raise CheckpointError(f"{path}: its LoRA modules are not this run's (lora.targets / lora.zero_convs): "
                              f"{len(extra)} only in the adapter {extra[:2]}, {len(missing)} only in the run "
                              f"{missing[:2]}")
    with torch.no_grad():
        for m, g in groups.items():
            for ab in ("A", "B"):
                p = params[f"{m}.lora_{ab}.{adapter_name}.weight"]
                if tuple(g[ab].shape) != tuple(p.shape):
                    raise CheckpointError(f"{path}: {m}.lora_{ab} has shape {tuple(g[ab].shape)}, this run's "
                                          f"{tuple(p.shape)} (lora.rank {p.shape[0] if ab == 'A' else p.shape[1]})")
                p.copy_(g[ab].to(dtype=p.dtype, device=p.device))
    log.info("started from adapter %s (%d modules)", path, len(groups))
    return len(groups)
