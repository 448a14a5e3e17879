"""What a training run is at a point in time besides its tensors: counters (:class:`TrainState`) and random states.

Counting. A *micro-step* consumes one micro-batch per rank; ``gradient_accumulation_steps`` micro-steps make one
*step* (an optimizer-step boundary). ``global_step`` counts boundaries passed, including steps skipped because a
loss or gradient was not finite (they consumed data); ``optimizer_steps`` counts updates actually applied. A
checkpoint can be taken between two micro-steps of one window (preemption); then it also holds the partially
accumulated gradients (``distill.checkpoints``).

Random states. Per-sample randomness (timesteps, guidance, noise, VAE samples) is derived from (seed, epoch, sample
index) — see :func:`sample_generators` — so it needs no saved state and does not depend on which rank processes a
sample. Everything else that may draw from a global generator (LoRA dropout, third-party code) is covered by
:func:`capture_rng` / :func:`restore_rng`: Python ``random``, NumPy's global generator, torch's CPU generator and every
CUDA device's generator, per rank. States are stored as tensors and primitives so that they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

RNG_FORMAT = 1


@dataclass
class TrainState:
    """Counters of a run (JSON in ``train_state.json``)."""

    global_step: int = 0
    """Optimizer-step boundaries passed (skipped non-finite steps included)."""
    micro_step: int = 0
    """Micro-batches consumed by each rank since the start of the run."""
    epoch: int = 0
    """Current data epoch."""
    optimizer_steps: int = 0
    """Updates actually applied."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss or the gradients were not finite (total)."""
    consecutive_nonfinite: int = 0
    """Such steps in a row, up to now."""
    empty_steps: int = 0
    """Steps skipped because none of their samples was usable on any rank (all skipped by the data reader)."""
    overflow_steps: int = 0
    """fp16 steps the gradient scaler skipped (overflow; expected occasionally, the scale backs off)."""
    samples_seen: int = 0
    """Samples trained on, all ranks together (kept samples only)."""
    skipped_samples: int = 0
    """Samples the data reader skipped, all ranks together."""
    extra: dict = field(default_factory=dict)
    """Method-specific counters."""

    def micro_in_window(self, accumulation: int) -> int:
        """Micro-steps already taken in the current accumulation window (0 at a step boundary)."""
        return self.micro_step - self.global_step * accumulation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class WindowState:
    """This rank's part of the current accumulation window (per-rank JSON in the checkpoint).

    The accumulated gradients themselves are saved as tensors beside it when a checkpoint falls inside a window.
    """

    loss_sum: float = 0.0
    """Sum of this rank's finite micro-step losses in the window (for the logged step loss)."""
    loss_count: int = 0
    """Micro-steps counted in ``loss_sum``."""
    nonfinite: bool = False
    """A micro-step of the window had a non-finite loss on this rank."""
    samples: int = 0
    """Samples this rank trained on in the window."""
    skipped: int = 0
    """Samples the reader skipped on this rank in the window."""
    extras: dict = dataclasses.field(default_factory=dict)
    """Sums, over the finite micro-steps, of the method's extra scalars (``StepOutput.logs``: t, w, the OCR loss
    terms, ...); logged as this rank's means."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WindowState":
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# Global random states
# ---------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's global random states as tensors and primitives (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured. Any missing or malformed part is an error (never a log line):
    a silently skipped RNG restore makes a resume inexact without anyone noticing."""
    if state.get("format") != RNG_FORMAT:
        raise ValueError(f"random state format {state.get('format')!r} is not {RNG_FORMAT}")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise ValueError("the checkpoint holds CUDA random states but CUDA is not available")
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Per-sample generators
# ---------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, sample index)."""
    s = np.random.SeedSequence([int(seed), int(epoch), int(index), 0x7D15])  # the tag separates it from data seeds
    return int(s.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(seed: int, epoch: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample of a batch, seeded by :func:`sample_seed`.

    Draws are made on the CPU and moved to the device: a sample's numbers are then the same on every device, rank
    and batch composition.
    """
    return [torch.Generator().manual_seed(sample_seed(seed, epoch, i)) for i in indices]


def randn_per_sample(gens: list[torch.Generator], shape: tuple[int, ...], device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal, row b drawn from ``gens[b]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)
