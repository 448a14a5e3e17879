"""The model behind the UI: one network in memory, three ways to run it.

* ``teacher``: the base weights. With a student LoRA loaded, the adapter is bypassed
  (:func:`anytext2_lcm.lora.disable_adapters`), so the teacher and the student share one copy of the network.
* ``teacher + student LoRA``: the adapter is active (unmerged: the LoRA branch runs beside each layer).
* ``merged student``: the adapter is folded into the weights (:func:`~anytext2_lcm.lora.merge_lora`, faster per
  step); it stays merged until a teacher or unmerged-student run needs the base weights back.

Runs are serialised by a lock (the UI's events may arrive concurrently; the merge state and the network are
shared).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..generation import GenerationRequest, GenerationResult, Generator, InputError
from .inputs import MODE_MERGED, MODE_STUDENT, MODE_TEACHER, ComparePlan

log = logging.getLogger(__name__)


@dataclass
class CompareCell:
    label: str
    mode: str
    result: GenerationResult


class Engine:
    """Generation for the UI with a teacher and, optionally, its student LoRA.

    Args:
        model: an ``AnyText2`` on its device and dtype, with or without a (unmerged) LoRA adapter loaded.
        model_name: shown in the UI (``tiny``, a path, ...).
        lora_name: the adapter's path or name, shown in the UI (None: no student).
        glyph_font: font for glyphs and line images (None: a CJK-capable system font).
    """

    def __init__(self, model, model_name: str = "model", lora_name: str | None = None,
                 glyph_font: str | None = None):
        from .. import lora as L

        self.model = model.eval()
        self.model_name = model_name
        self.has_lora = bool(L.lora_layers(model))
        self.lora_name = lora_name if self.has_lora else None
        self.glyph_font = glyph_font
        self.generator = Generator(self.model, glyph_font)
        self._merged = self.has_lora and any(layer.merged for layer in L.lora_layers(model).values())
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str = "tiny", lora: str | None = None, lora_scale: float = 1.0, device: str | None = None,
             dtype: str = "auto", config: str | None = None, trust_pickle: bool = False,
             glyph_font: str | None = None) -> "Engine":
        """Build the model (``tiny``, ``sd15``, a converted folder or a checkpoint), load the adapter, move it to
        the device (a GPU when present) in the precision ``dtype`` picks."""
        from ..factory import build_model, pick_device, pick_dtype

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        m = build_model(model, config_path=config, trust_pickle=trust_pickle)
        if lora:
            from .. import lora as L

            L.load_lora(m, lora)
            if lora_scale != 1.0:
                L.set_lora_scale(m, lora_scale)
        m = m.to(device=dev, dtype=dt).eval()
        return cls(m, model_name=model, lora_name=lora, glyph_font=glyph_font)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.dtype

    @property
    def modes(self) -> list[str]:
        """The model choices this engine can run."""
        return [MODE_TEACHER, MODE_STUDENT, MODE_MERGED] if self.has_lora else [MODE_TEACHER]

    @property
    def merged(self) -> bool:
        return self._merged

    def describe(self) -> str:
        student = f"student LoRA `{self.lora_name}`" if self.has_lora else "no student LoRA (start with --lora)"
        return (f"model `{self.model_name}` · {student} · {self.device.type} · "
                f"{str(self.dtype).removeprefix('torch.')}")

    def _set_merged(self, merged: bool) -> None:
        from .. import lora as L

        if merged and not self._merged:
            L.merge_lora(self.model)
        elif not merged and self._merged:
            L.unmerge_lora(self.model)
        self._merged = merged

    def _check_mode(self, mode: str) -> None:
        if mode not in (MODE_TEACHER, MODE_STUDENT, MODE_MERGED):
            raise InputError(f"unknown model choice {mode!r}")
        if mode != MODE_TEACHER and not self.has_lora:
            raise InputError(f"'{mode}' needs a student LoRA: start the UI with --lora ADAPTER "
                             "(a PEFT adapter folder or an adapter .safetensors file)")

    def _run_locked(self, req: GenerationRequest, mode: str, callback=None) -> GenerationResult:
        from .. import lora as L

        if mode == MODE_TEACHER:
            if not self.has_lora:
                return self.generator(req, callback=callback)
            self._set_merged(False)
            with L.disable_adapters(self.model):
                return self.generator(req, callback=callback)
        self._set_merged(mode == MODE_MERGED)
        return self.generator(req, callback=callback)

    def run(self, req: GenerationRequest, mode: str = MODE_TEACHER, callback=None) -> GenerationResult:
        """One generation with the chosen model. Raises ``InputError`` for inputs a person can fix."""
        self._check_mode(mode)
        with self._lock:
            return self._run_locked(req, mode, callback)

    def compare(self, plans: Sequence[ComparePlan],
                progress: Callable[[int, int, str], None] | None = None) -> list[CompareCell]:
        """Run every cell of a compare plan (same seed and inputs), in order."""
        for p in plans:
            self._check_mode(p.mode)
        out = []
        with self._lock:
            for i, p in enumerate(plans):
                if progress is not None:
                    progress(i, len(plans), p.label)
                out.append(CompareCell(p.label, p.mode, self._run_locked(p.request, p.mode)))
        return out

    def warmup(self, size: int = 64) -> float:
        """One small text-free step per branch, so that the first click does not pay for lazy initialisation
        (tokenizer, kernels). Returns the seconds it took."""
        t0 = time.perf_counter()
        req = GenerationRequest(prompt='warm-up "A"', positions=[[8, 8, size - 8, size // 2]], height=size,
                                width=size, steps=1, seed=0)
        with self._lock:
            try:
                self._run_locked(req, MODE_TEACHER)
            except InputError as e:  # no usable glyph font: warm up without text (the first click will say why)
                log.debug("warm-up without text: %s", e)
                self._run_locked(GenerationRequest(prompt="warm-up", height=size, width=size, steps=1), MODE_TEACHER)
        return time.perf_counter() - t0
