"""Offline text reading for evaluation: the PP-OCRv4 recogniser that ships inside ``rapidocr_onnxruntime``.

Recognition only (no detection): the AnyText benchmark knows where every line is (its position mask), so each line
is cropped by its mask and read. The protocol follows AnyText's ``eval/eval_dgocr.py``:

1. crop the min-area rectangle of the line's mask out of the image with a similarity warp
   (:func:`anytext2_lcm.models.ocr.crop_by_mask`, the original's ``crop_image``);
2. rotate crops taller than 1.2 × their width by 90° counter-clockwise (vertical text);
3. resize to height 48 keeping the aspect ratio (bilinear, align_corners), width ≤ 320, right-pad to 3×48×320.

The benchmark's own recogniser (ModelScope DuGuang ConvNeXt-Tiny) is not reachable offline; PP-OCRv4 uses the same
6,623-character dictionary as AnyText (``ppocr_keys_v1``) and reads clean rendered text well. Its preprocessing is
PaddleOCR's: BGR input, values normalised to [−1, 1], zero padding after normalisation; greedy CTC decoding with
class 0 = blank, then the dictionary (from the ONNX metadata ``character``), then a space, as rapidocr builds it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models.ocr import crop_by_mask, resize_norm, rotate_if_tall

__all__ = ["OCRModelNotFound", "TextReader", "default_reader", "find_rec_model", "read_lines"]

REC_MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
MODEL_ENV = "ANYTEXT2_OCR_REC_MODEL"
INSTALL_HINT = ("install the PP-OCR models with `pip install --no-deps rapidocr-onnxruntime==1.4.4` "
                "and the runtime with `pip install onnxruntime` (or `make setup`)")


class OCRModelNotFound(FileNotFoundError):
    """The recogniser model file (or the package that ships it) is missing."""


def find_rec_model(path: str | os.PathLike | None = None) -> Path:
    """Locate the PP-OCRv4 recogniser ONNX file.

    Order: ``path``; ``$ANYTEXT2_OCR_REC_MODEL``; ``models/ch_PP-OCRv4_rec_infer.onnx`` inside the installed
    ``rapidocr_onnxruntime`` package (found without importing it: its ``__init__`` pulls detection-only
    dependencies we do not need).

    Raises:
        OCRModelNotFound: naming what to install.
    """
    if path is None:
        path = os.environ.get(MODEL_ENV) or None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise OCRModelNotFound(f"OCR recogniser model {p} does not exist; {INSTALL_HINT}")
        return p
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise OCRModelNotFound(f"the package rapidocr_onnxruntime is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        p = Path(root) / "models" / REC_MODEL_FILE
        if p.is_file():
            return p
    raise OCRModelNotFound(f"{REC_MODEL_FILE} not found in the rapidocr_onnxruntime package "
                           f"({list(spec.submodule_search_locations)}); {INSTALL_HINT}")


def _as_chw(image: np.ndarray | torch.Tensor, channels: str) -> torch.Tensor:
    """HWC uint8/float (0..255) image → (3, H, W) float32 tensor in BGR order (what PaddleOCR models expect)."""
    if channels not in ("RGB", "BGR"):
        raise ValueError(f"channels={channels!r} must be 'RGB' or 'BGR'")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if channels == "RGB":
        arr = arr[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)


def _as_mask(mask: np.ndarray | torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """A position mask → (H, W) uint8 in 0..255, as the benchmark builds it ((positions · 255).astype(uint8))."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0] if m.shape[-1] == 1 else m[0] if m.shape[0] == 1 else m
    if m.ndim != 2 or m.shape != hw:
        raise ValueError(f"position mask of shape {m.shape} does not match the image's (H, W) = {hw}")
    if m.dtype == bool or (m.size and float(m.max()) <= 1.0):
        m = m.astype(np.float32) * 255.0
    return m.astype(np.uint8)


class TextReader:
    """Batched PP-OCRv4 text-line recogniser (onnxruntime, CPU).

    Args:
        model_path: the ONNX file (default: :func:`find_rec_model`).
        batch_size: crops per forward pass (PaddleOCR's default 6).
        image_height: recogniser input height (48).
        max_width: padded input width (320, the benchmark's 3×48×320); longer lines are squeezed to it.
        num_threads: onnxruntime intra-op threads (None: its default).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, batch_size: int = 6, image_height: int = 48,
                 max_width: int = 320, num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"onnxruntime is needed for OCR evaluation; {INSTALL_HINT}") from e
        if batch_size < 1 or image_height < 1 or max_width < image_height:
            raise ValueError(f"invalid reader sizes: batch_size={batch_size}, image_height={image_height}, "
                             f"max_width={max_width}")
        self.model_path = find_rec_model(model_path)
        opts = ort.SessionOptions()
        # No busy-waiting between runs: spinning onnxruntime threads starve the torch preprocessing (and the
        # diffusion model) that runs between two recogniser calls in the same process.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads is not None:
            opts.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ValueError(f"{self.model_path} has no 'character' metadata: not a PP-OCR recogniser export")
        # Class ids: 0 = CTC blank, 1..n = the dictionary, n+1 = space (rapidocr's CTCLabelDecode layout).
        self.keys: list[str] = ["<blank>"] + meta["character"].splitlines() + [" "]
        self.batch_size = batch_size
        self.image_shape = (3, image_height, max_width)

    @property
    def charset(self) -> list[str]:
        """The readable characters (dictionary + space), e.g. for ``metrics.normalized_edit_distance(charset=)``."""
        return self.keys[1:]

    def prepare(self, crops: Sequence[np.ndarray | torch.Tensor], channels: str = "RGB") -> torch.Tensor:
        """Crops (HWC, 0..255) → recogniser input (N, 3, 48, max_width) in [−1, 1]; tall crops are rotated."""
        return torch.stack([resize_norm(rotate_if_tall(_as_chw(c, channels)), self.image_shape) for c in crops])

    def _run(self, x: torch.Tensor) -> np.ndarray:
        probs = self.session.run(None, {self.input_name: x.numpy().astype(np.float32, copy=False)})[0]
        if probs.shape[-1] != len(self.keys):
            raise ValueError(f"recogniser outputs {probs.shape[-1]} classes but its dictionary has {len(self.keys)}")
        return probs

    def _decode(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """Greedy CTC: best class per column, merge repeats, drop blanks; score = mean probability of the kept ones."""
        best = probs.argmax(-1)
        best_p = probs.max(-1)
        out = []
        for ids, ps in zip(best, best_p):
            keep = np.ones(len(ids), dtype=bool)
            keep[1:] = ids[1:] != ids[:-1]
            keep &= ids != 0
            text = "".join(self.keys[i] for i in ids[keep])
            out.append((text, float(ps[keep].mean()) if keep.any() else 0.0))
        return out

    def recognize(self, crops: Sequence[np.ndarray | torch.Tensor], channels: str = "RGB",
                  return_scores: bool = False, strip: bool = True) -> list[str] | list[tuple[str, float]]:
        """Read text-line crops.

        Args:
            crops: N images (h, w, 3), uint8 or float in 0..255, each holding one line.
            channels: "RGB" (default) or "BGR".
            return_scores: also return the mean character confidence.
            strip: remove leading/trailing spaces. PP-OCRv4 sometimes emits a space class at the crop edge
                (" Station" for a clean rendering of "Station"); the benchmark's exact-match Sen.ACC would count
                that as an error of the generator, so it is stripped unless ``strip=False``.

        Returns:
            N strings (or (string, score) pairs), in input order.
        """
        if len(crops) == 0:
            return []
        # Sorting by aspect ratio groups similar crops, as PaddleOCR does; results are put back in input order.
        ratios = [c.shape[1] / float(c.shape[0]) for c in crops]
        order = np.argsort(np.array(ratios), kind="stable").tolist()
        results: list[tuple[str, float] | None] = [None] * len(crops)
        for beg in range(0, len(order), self.batch_size):
            idx = order[beg:beg + self.batch_size]
            decoded = self._decode(self._run(self.prepare([crops[i] for i in idx], channels)))
            for i, (text, score) in zip(idx, decoded):
                results[i] = (text.strip(" ") if strip else text, score)
        return list(results) if return_scores else [r[0] for r in results]

    def crop_lines(self, image: np.ndarray | torch.Tensor, positions: Sequence[np.ndarray | torch.Tensor]
                   ) -> list[np.ndarray]:
        """Crop every line by its position mask (min-area rectangle, similarity warp), as the benchmark does.

        Args:
            image: (H, W, 3) uint8 (or float 0..255).
            positions: per line an (H, W) mask (0/1, bool or 0..255; (H, W, 1) accepted).

        Returns:
            Crops (h, w, 3) float32 in 0..255, channel order unchanged, not yet rotated.
        """
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if arr.ndim != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
        chw = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3], dtype=np.float32)).permute(2, 0, 1)
        hw = (arr.shape[0], arr.shape[1])
        return [crop_by_mask(chw, _as_mask(m, hw)).permute(1, 2, 0).numpy() for m in positions]

    def read_lines(self, image: np.ndarray | torch.Tensor, positions: Sequence[np.ndarray | torch.Tensor],
                   channels: str = "RGB", strip: bool = True) -> list[str]:
        """Read each line of ``image`` given its position mask (benchmark protocol, module docstring).

        Args:
            image: (H, W, 3) uint8, RGB unless ``channels="BGR"``.
            positions: per line an (H, W) mask.
            strip: see :meth:`recognize`.

        Returns:
            One string per mask, in order.
        """
        return self.recognize(self.crop_lines(image, positions), channels=channels, strip=strip)


@functools.lru_cache(maxsize=1)
def default_reader() -> TextReader:
    """A process-wide :class:`TextReader` with the default model and settings (created on first use)."""
    return TextReader()


def read_lines(image: np.ndarray | torch.Tensor, positions: Sequence[np.ndarray | torch.Tensor],
               reader: TextReader | None = None, channels: str = "RGB", strip: bool = True) -> list[str]:
    """Read every line of ``image`` by its position mask; see :meth:`TextReader.read_lines`."""
    return (reader or default_reader()).read_lines(image, positions, channels=channels, strip=strip)
