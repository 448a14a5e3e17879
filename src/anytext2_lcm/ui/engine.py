"""The model behind the UI: one network in memory, three ways to run it.

* ``teacher``: the base weights. With a student LoRA loaded, the adapter is bypassed
  (:func:`anytext2_lcm.lora.disable_adapters`), so the teacher and the student share one copy of the network.
* ``teacher + student LoRA``: the adapter is active (unmerged: the LoRA branch runs beside each layer).
* ``merged student``: the adapter is folded into the weights (:func:`~anytext2_lcm.lora.merge_lora`, faster per
  step); it stays merged until a teacher or unmerged-student run needs the base weights back.

A community base model and style LoRAs (the page's "your own models and styles") are applied by rebuilding the
network (:meth:`Engine.set_community`: the model, then the base model's UNet/CLIP weights, then the style LoRAs
merged, then the student LoRA on top), as the original demo reloads its weights when they change; an engine made
from a bare model (no ``rebuild``) cannot change them.

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
                 glyph_font: str | None = None, rebuild: Callable | None = None, community: tuple = (None, ())):
        from .. import lora as L

        self._rebuild = rebuild
        self.community = community
        """(base model path or None, style LoRAs) the network has now."""
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
             glyph_font: str | None = None, base_model: str | None = None, style_loras: Sequence = ()) -> "Engine":
        """Build the model (``tiny``, ``sd15``, a converted folder or a checkpoint), apply a community base model and
        style LoRAs (``FILE:RATIO`` or ``StyleLora``), load the adapter, move it to the device (a GPU when present)
        in the precision ``dtype`` picks."""
        from ..factory import apply_community, build_model, pick_device, pick_dtype, read_community

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)

        def rebuild(community):
            m = build_model(model, config_path=config, trust_pickle=trust_pickle)
            apply_community(m, community)
            if lora:
                from .. import lora as L

                L.load_lora(m, lora)
                if lora_scale != 1.0:
                    L.set_lora_scale(m, lora_scale)
            return m.to(device=dev, dtype=dt).eval()

        community = read_community(base_model, style_loras, trust_pickle) if base_model or style_loras else None
        engine = cls(rebuild(community), model_name=model, lora_name=lora, glyph_font=glyph_font, rebuild=rebuild)
        engine.community = _community_key(community)
        return engine

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
        base, styles = self.community
        own = (f" · base model `{base}`" if base else "") + "".join(f" · style `{s.path}` {s.ratio:g}" for s in styles)
        return (f"model `{self.model_name}`{own} · {student} · {self.device.type} · "
                f"{str(self.dtype).removeprefix('torch.')}")

    def set_community(self, base_model: str | None = None, style_loras: Sequence = ()) -> bool:
        """Give the network this base model and these style LoRAs (``StyleLora`` each), rebuilding it when they
        differ from the current ones. Returns whether it was rebuilt. Call under the lock (``run`` does).

        Raises:
            InputError: a file that cannot be used (one line), or an engine without ``rebuild``.
        """
        from ..checkpoint import CheckpointError
        from ..config import ConfigError
        from ..factory import read_community

        key = (base_model or None, tuple(style_loras))
        if key == self.community:
            return False
        if self._rebuild is None:
            raise InputError("this UI was started with a fixed model: base models and style LoRAs cannot be changed")
        try:
            model = self._rebuild(read_community(key[0], key[1], False))
        except (CheckpointError, ConfigError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        self.model, self.generator, self._merged, self.community = model, Generator(model, self.glyph_font), False, key
        return True

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

    def run(self, req: GenerationRequest, mode: str = MODE_TEACHER, callback=None,
            community: tuple | None = None) -> GenerationResult:
        """One generation with the chosen model (and, if given, ``community`` = (base model, style LoRAs), see
        :meth:`set_community`). Raises ``InputError`` for inputs a person can fix."""
        self._check_mode(mode)
        with self._lock:
            if community is not None:
                self.set_community(*community)
            return self._run_locked(req, mode, callback)

    def compare(self, plans: Sequence[ComparePlan], progress: Callable[[int, int, str], None] | None = None,
                community: tuple | None = None) -> list[CompareCell]:
        """Run every cell of a compare plan (same seed and inputs), in order."""
        for p in plans:
            self._check_mode(p.mode)
        out = []
        with self._lock:
            if community is not None:
                self.set_community(*community)
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


def _community_key(community) -> tuple:
    """(base model path or None, StyleLora tuple) of a ``CommunityWeights`` (the engine's record of what it holds)."""
    from ..lora.style import StyleLora

    if community is None:
        return (None, ())
    return (community.base.source if community.base else None,
            tuple(StyleLora(w.source, r) for w, r in community.styles))

