"""The pieces the trainer assembles: the teacher and its fingerprint, gradient checkpointing, the trainable state,
the optimizer, and signal handling. Each is usable (and tested) on its own."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, is_converted, read_converted_config
from ..factory import build_model, resolve_path

log = logging.getLogger(__name__)


def teacher_fingerprint(path: str | None, model_section) -> str:
    """Identity of the frozen starting weights: a converted folder's manifest hashes, a file's sha256, or the
    random-initialisation recipe."""
    p = resolve_path(path) if path is not None else None
    if p is None:
        m = model_section
        name = path or m.preset
        return f"random:{name}:{m.init}:{m.init_seed}:torch-{torch.__version__.split('+')[0]}"
    h = hashlib.sha256()
    if is_converted(p):
        files = json.loads((p / "manifest.json").read_text())["files"]
        h.update(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
    else:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def teacher_identity(path: str | None, model_section) -> str:
    """Identity of a teacher for caches of what it generates (recipe stages, generated-latent banks, light decoders):
    :func:`teacher_fingerprint` plus, for a converted folder, a hash of its model configuration. Settings such as
    ``guidance_scale`` live only in ``config.json`` and change what the teacher generates and what a student records,
    while a resumed training run only needs the same weights (:func:`teacher_fingerprint`)."""
    ident = teacher_fingerprint(path, model_section)
    p = resolve_path(path) if path is not None else None
    if p is not None and is_converted(p):
        doc = json.dumps(read_converted_config(p).to_dict(), sort_keys=True)
        ident += ":config-" + hashlib.sha256(doc.encode()).hexdigest()[:16]
    return ident


def build_teacher(section) -> nn.Module:
    """The teacher ``AnyText2`` (CPU, fp32) as ``model`` describes it (see ``ModelSection``):
    :func:`anytext2_lcm.factory.build_model` of ``teacher``, or of a random ``preset`` when it is null."""
    return build_model(section.teacher, preset=section.preset, init=section.init, seed=section.init_seed)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each UNet / WriteNet block in the backward pass (the networks' ``gradient_checkpointing`` flag:
    ``torch.utils.checkpoint``, non-reentrant, which works with frozen base weights, unlike ldm's helper — DESIGN
    trap 11). Module names (hence LoRA keys) do not change. Returns the number of checkpointed blocks."""
    model.unet.gradient_checkpointing = True
    model.control_model.gradient_checkpointing = True
    return (len(model.unet.input_blocks) + 1 + len(model.unet.output_blocks)
            + len(model.control_model.input_blocks) + 1)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that require grad, and the buffers of modules in training mode (BatchNorm
    statistics of a teacher run's font OCR), by model name, detached on the CPU."""
    out = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in model.named_modules():
        if m.training:
            for bname, b in m.named_buffers(prefix=mname, recurse=False):
                out[bname] = b.detach().cpu()
    return out


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpointed trainable tensors into ``model``; every trainable tensor must be there, nothing else."""
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: trainable tensors do not match this run (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    with torch.no_grad():
        for k, v in tensors.items():
            t = named[k]
            if t.shape != v.shape:
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model {tuple(t.shape)}")
            t.copy_(v.to(device=t.device, dtype=t.dtype))


def make_optimizer(params: list[nn.Parameter], o) -> torch.optim.Optimizer:
    kwargs = dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                  weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class StopSignals:
    """SIGTERM/SIGINT handlers that only set a flag; a second signal exits immediately (128 + signal).

    Installed only in the main thread (signal handlers cannot be set elsewhere); the previous handlers come back on
    exit from the ``with`` block.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # second signal: leave now; the last complete checkpoint is untouched
        self.signum = signum
        log.warning("received %s: finishing the current micro-step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict → {"a.b.c": value} (for TensorBoard's hparams)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
