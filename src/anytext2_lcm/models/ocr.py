"""The PP-OCRv3 text recogniser of AnyText2, its input preprocessing, and the min-area-rectangle crop.

AnyText2 carries two copies of the same recogniser: the frozen glyph recogniser (``text_predictor.*``) and the
trainable font recogniser (``embedding_manager.font_predictor.*``). Both are

    MobileNetV1Enhance backbone -> SVTR sequence encoder ("neck") -> CTC head

and return ``{"ctc": (N, T, num_classes) logits, "ctc_neck": (N, T, neck_dims) features}`` for a
(N, 3, 48, 320) input in [-1, 1] (T = 40). The CTC head returns raw logits also in eval mode (no softmax): the
parity fixture's ``ocr_text_predictor_ctc_batch0`` has negative entries and rows that do not sum to one.

Module and attribute names follow the original classes so that the checkpoint loads without key surgery: the
backbone's conv+BN units use ``_conv``/``_batch_norm``, the neck's use ``conv``/``norm``.

Preprocessing (:func:`recognize`, the original ``TextRecognizer.pred_imglist`` + ``resize_norm_img``): each CHW
image in 0..255 is rotated 90 degrees counter-clockwise when it is taller than 1.2 x its width, resized
(bilinear, ``align_corners=True``) to height 48 keeping its aspect ratio (width ``ceil``-ed, at most 320), mapped
to [-1, 1] and zero-padded on the right to 320. Images are processed in batches of ``cfg.batch_size`` after
sorting by their width/height ratio measured before the rotation; results come back in input order.

:func:`crop_by_mask` is the original ``crop_image``: the largest external contour of a mask, its
``cv2.minAreaRect``, and a similarity warp (Umeyama 1991) that maps the rectangle upright to the top-left corner.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytext2_lcm.config import OCRConfig

logger = logging.getLogger(__name__)

__all__ = [
    "RecModel",
    "OCRBatch",
    "recognize",
    "resize_norm",
    "rotate_if_tall",
    "crop_by_mask",
    "min_area_box",
    "umeyama",
    "ctc_greedy_decode",
    "output_length",
]


# ---------------------------------------------------------------------------------------------------------------
# Activations (written out rather than F.hardswish / F.silu so that the arithmetic order equals the original's)
# ---------------------------------------------------------------------------------------------------------------


def _hard_swish(x: Tensor) -> Tensor:
    return x * F.relu6(x + 3.0) / 6.0


def _hard_sigmoid(x: Tensor) -> Tensor:
    # The torch port's SE gate uses relu6(x + 3) / 6 (not Paddle's slope-0.2 variant).
    return F.relu6(x + 3.0) / 6.0


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


# ---------------------------------------------------------------------------------------------------------------
# Backbone: MobileNetV1Enhance
# ---------------------------------------------------------------------------------------------------------------


class _ConvBNHardSwish(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> hard-swish. Keys ``_conv.*``, ``_batch_norm.*``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride, padding: int, groups: int = 1) -> None:
        super().__init__()
        self._conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=False)
        self._batch_norm = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return _hard_swish(self._batch_norm(self._conv(x)))


class _SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 conv (C -> C/4) -> ReLU -> 1x1 conv -> hard-sigmoid, times the input."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(x, 1))))
        return x * _hard_sigmoid(gate)


class _DepthwiseSeparable(nn.Module):
    """Depthwise conv+BN+hswish, optional SE, pointwise conv+BN+hswish (registration order = key order)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride, kernel: int = 3, use_se: bool = False) -> None:
        super().__init__()
        self.use_se = use_se
        self._depthwise_conv = _ConvBNHardSwish(c_in, c_mid, kernel, stride, kernel // 2, groups=c_mid)
        if use_se:
            self._se = _SqueezeExcite(c_mid)
        self._pointwise_conv = _ConvBNHardSwish(c_mid, c_out, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self._depthwise_conv(x)
        if self.use_se:
            x = self._se(x)
        return self._pointwise_conv(x)


# (width of the depthwise stage, width out, stride, kernel, SE) at scale 1; the input width is the previous output.
_MOBILENET_BLOCKS: tuple[tuple[int, int, object, int, bool], ...] = (
    (32, 64, 1, 3, False),
    (64, 128, 1, 3, False),
    (128, 128, 1, 3, False),
    (128, 256, (2, 1), 3, False),
    (256, 256, 1, 3, False),
    (256, 512, (2, 1), 3, False),
    *((512, 512, 1, 5, False),) * 5,
    (512, 1024, (2, 1), 5, True),
    (1024, 1024, "last", 5, True),
)


class MobileNetV1Enhance(nn.Module):
    """PP-OCRv3 backbone. (N, 3, 48, W) -> (N, int(1024 * scale), 1, W / 8) for the AnyText2 settings.

    Height is reduced 48 -> 24 (stem) -> 12 -> 6 -> 3 (three (2, 1) strides) -> 1 (2x2 pool); width W -> W/2
    (stem) -> W/4 (``last_conv_stride`` (1, 2)) -> W/8 (pool).
    """

    def __init__(self, in_channels: int, scale: float, last_conv_stride: tuple[int, int], last_pool_type: str) -> None:
        super().__init__()
        self.conv1 = _ConvBNHardSwish(in_channels, int(32 * scale), 3, 2, 1)
        blocks = []
        c_in = int(32 * scale)
        for mid, out, stride, kernel, se in _MOBILENET_BLOCKS:
            stride = tuple(last_conv_stride) if stride == "last" else stride
            blocks.append(_DepthwiseSeparable(c_in, int(mid * scale), int(out * scale), stride, kernel, se))
            c_in = int(out * scale)
        self.block_list = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(2, 2) if last_pool_type == "avg" else nn.MaxPool2d(2, 2)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.block_list(self.conv1(x)))


# ---------------------------------------------------------------------------------------------------------------
# Neck: SVTR sequence encoder (PP-OCRv3 "EncoderWithSVTR", Global mixer, post-norm=False blocks)
# ---------------------------------------------------------------------------------------------------------------


class _ConvBNSwish(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> swish. Keys ``conv.*``, ``norm.*`` (the neck's naming)."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return _swish(self.norm(self.conv(x)))


class _GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens (SVTR "Global" mixer). Keys ``qkv``, ``proj``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        # qkv features are laid out as (3, heads, head_dim), as in the original's reshape.
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(_swish(self.fc1(x)))))


class _SVTRBlock(nn.Module):
    """x += attn(norm1 x); x += mlp(norm2 x). LayerNorm eps 1e-5; dropout 0.1 (active only in train mode)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float = 0.1, attn_drop: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mixer = _GlobalAttention(dim, num_heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EncoderWithSVTR(nn.Module):
    """(N, C, H, W) backbone features -> (N, dims, H, W).

    conv1 (3x3, C -> C/8) -> conv2 (1x1 -> hidden) -> SVTR blocks over the H*W tokens -> LayerNorm (eps 1e-6)
    -> conv3 (1x1 -> C) -> concat with the input (shortcut) -> conv4 (3x3, 2C -> C/8) -> conv1x1 (-> dims).

    ``use_guide``: PP-OCRv3 (Paddle) stops the gradient into the backbone here. The torch port AnyText2 uses sets
    a ``stop_gradient`` attribute on a torch tensor, which does nothing, so gradients DO reach the backbone there;
    we reproduce that (AnyText2 trains its font recogniser end to end). The flag is stored for information.
    """

    def __init__(self, in_channels: int, dims: int, depth: int, hidden_dims: int, use_guide: bool,
                 num_heads: int = 8, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.use_guide = use_guide
        self.conv1 = _ConvBNSwish(in_channels, in_channels // 8, 3)
        self.conv2 = _ConvBNSwish(in_channels // 8, hidden_dims, 1)
        self.svtr_block = nn.ModuleList(_SVTRBlock(hidden_dims, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dims, eps=1e-6)
        self.conv3 = _ConvBNSwish(hidden_dims, in_channels, 1)
        self.conv4 = _ConvBNSwish(2 * in_channels, in_channels // 8, 3)
        self.conv1x1 = _ConvBNSwish(in_channels // 8, dims, 1)
        self.out_channels = dims
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The original's initialisation (only matters for a recogniser that is not loaded from a checkpoint).
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        z = self.conv2(self.conv1(x))
        n, c, h, w = z.shape
        z = z.flatten(2).transpose(1, 2)  # (N, H*W, hidden)
        for blk in self.svtr_block:
            z = blk(z)
        z = self.norm(z).reshape(n, h, w, c).permute(0, 3, 1, 2)
        z = self.conv3(z)
        return self.conv1x1(self.conv4(torch.cat((shortcut, z), dim=1)))


class SequenceEncoder(nn.Module):
    """The "svtr" sequence encoder followed by the image-to-sequence reshape: (N, C, H, W) -> (N, H*W, dims)."""

    def __init__(self, in_channels: int, dims: int, depth: int, hidden_dims: int, use_guide: bool) -> None:
        super().__init__()
        self.encoder = EncoderWithSVTR(in_channels, dims, depth, hidden_dims, use_guide)
        self.out_channels = dims

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).flatten(2).transpose(1, 2)


class CTCHead(nn.Module):
    """Linear classifier per time step. Returns logits (no softmax, in any mode) and its input features."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"ctc": self.fc(x), "ctc_neck": x}


class RecModel(nn.Module):
    """PP-OCRv3 recogniser: ``forward(x (N, 3, 48, 320) in [-1, 1]) -> {"ctc": (N, T, C), "ctc_neck": (N, T, D)}``.

    T = 40 for 48 x 320 inputs (see :func:`output_length`), C = ``cfg.num_classes`` logits, D = ``cfg.neck_dims``.
    State-dict keys: ``backbone.*``, ``neck.encoder.*``, ``head.fc.*`` (with BatchNorm buffers), as the original.
    """

    def __init__(self, cfg: OCRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MobileNetV1Enhance(cfg.image_shape[0], cfg.backbone_scale, cfg.last_conv_stride,
                                           cfg.last_pool_type)
        self.neck = SequenceEncoder(self.backbone.out_channels, cfg.neck_dims, cfg.neck_depth, cfg.neck_hidden_dims,
                                    cfg.neck_use_guide)
        self.head = CTCHead(cfg.neck_dims, cfg.num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # The original casts the input to float32; we cast to the weights' dtype (identical in fp32).
        x = x.to(self.backbone.conv1._conv.weight.dtype)
        return self.head(self.neck(self.backbone(x)))


def output_length(cfg: OCRConfig) -> int:
    """Number of CTC time steps T for ``cfg.image_shape`` (40 for 48 x 320), from the conv arithmetic."""

    def conv(n: int, k: int, s: int, p: int) -> int:
        return (n + 2 * p - k) // s + 1

    _, h, w = cfg.image_shape
    h, w = conv(h, 3, 2, 1), conv(w, 3, 2, 1)
    for _, _, stride, kernel, _ in _MOBILENET_BLOCKS:
        stride = tuple(cfg.last_conv_stride) if stride == "last" else stride
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        h, w = conv(h, kernel, sh, kernel // 2), conv(w, kernel, sw, kernel // 2)
    return (h // 2) * (w // 2)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and batched recognition (TextRecognizer.pred_imglist)
# ---------------------------------------------------------------------------------------------------------------


def rotate_if_tall(img: Tensor) -> Tensor:
    """Rotate a CHW image 90 degrees counter-clockwise when its height exceeds 1.2 x its width (vertical text)."""
    _, h, w = img.shape
    return img.transpose(1, 2).flip(1) if h > w * 1.2 else img


def resize_norm(img: Tensor, image_shape: Sequence[int]) -> Tensor:
    """One recogniser input. ``img``: (C, h, w) in 0..255 -> (C, H, W) in [-1, 1], right-padded with zeros.

    Bilinear ``align_corners=True`` resize to height H keeping the aspect ratio (width ``ceil(H * w / h)``, at
    most W). The padding value is 0 *after* normalisation (the original pads the normalised image).
    """
    c, target_h, target_w = image_shape
    if img.shape[0] != c:
        raise ValueError(f"recogniser input has {img.shape[0]} channels, expected {c}")
    # The original derives the padded width as int(H * (W / H)); keep that expression (it is W for 48 x 320).
    pad_w = int(target_h * (target_w / target_h))
    h, w = img.shape[1:]
    want = math.ceil(target_h * (w / float(h)))
    new_w = pad_w if want > pad_w else int(want)
    x = F.interpolate(img[None].float(), size=(target_h, new_w), mode="bilinear", align_corners=True)
    x = (x / 255.0 - 0.5) / 0.5
    return F.pad(x[0], (0, pad_w - new_w))


@dataclass
class OCRBatch:
    """One recogniser batch as it was run: inputs and outputs in batch (sorted) order."""

    indices: list[int]
    """Input-list index of each batch row."""
    input: Tensor
    """(n, 3, H, W) normalised input in [-1, 1]."""
    ctc: Tensor
    """(n, T, C) logits."""
    neck: Tensor
    """(n, T, D) neck features."""


def recognize(model: nn.Module, images: Sequence[Tensor], cfg: OCRConfig, return_batches: bool = False):
    """Run a recogniser on a list of CHW images in 0..255 (any sizes), as the original ``pred_imglist``.

    Images are sorted by width/height ratio (measured before the tall-image rotation; NumPy's default argsort,
    so batch membership equals the original's), processed ``cfg.batch_size`` at a time, and the results are
    returned in input order. The inputs are not modified.

    Args:
        model: a :class:`RecModel` (its train/eval mode and grad mode are the caller's business).
        images: N >= 1 tensors (3, h, w), values 0..255.
        cfg: supplies ``image_shape`` and ``batch_size``.
        return_batches: also return the list of :class:`OCRBatch` that were run.

    Returns:
        ``(ctc (N, T, C), neck (N, T, D))``, plus the batch list when ``return_batches``.
    """
    n = len(images)
    if n == 0:
        raise ValueError("recognize() needs at least one image")
    ratios = np.array([im.shape[2] / float(im.shape[1]) for im in images])
    order = np.argsort(ratios).tolist()
    ctc: list[Tensor | None] = [None] * n
    neck: list[Tensor | None] = [None] * n
    batches: list[OCRBatch] = []
    for beg in range(0, n, cfg.batch_size):
        idx = order[beg:beg + cfg.batch_size]
        x = torch.stack([resize_norm(rotate_if_tall(images[i]), cfg.image_shape) for i in idx])
        out = model(x)
        for row, i in enumerate(idx):
            ctc[i] = out["ctc"][row]
            neck[i] = out["ctc_neck"][row]
        if return_batches:
            batches.append(OCRBatch(indices=idx, input=x, ctc=out["ctc"], neck=out["ctc_neck"]))
    result = (torch.stack(ctc), torch.stack(neck))
    return (*result, batches) if return_batches else result


def ctc_greedy_decode(logits: Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per step, merge repeats, drop blanks. (N, T, C) or (T, C) -> class ids."""
    if logits.dim() == 2:
        logits = logits[None]
    best = logits.argmax(-1).cpu()
    out = []
    for seq in best:
        keep = torch.ones_like(seq, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != blank
        out.append(seq[keep].tolist())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Min-area-rectangle crop (the original crop_image / min_bounding_rect / adjust_image)
# ---------------------------------------------------------------------------------------------------------------

_FALLBACK_BOX = np.array([[0, 0], [100, 0], [100, 100], [0, 100]])


def min_area_box(mask: np.ndarray) -> np.ndarray:
    """Corners (tl, tr, br, bl) as int (4, 2) x, y of the min-area rectangle of the mask's largest region.

    ``mask``: (H, W) or (H, W, 1) uint8, 0..255; thresholded at > 127. Corners are truncated toward zero and
    ordered as the original does: the two leftmost (by x, stable) are the left side, each side ordered by y.
    An empty mask gives the original's fixed box (0, 0)-(100, 100), with a warning.
    """
    mask = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).reshape(mask.shape[0], mask.shape[1]))
    _, binary = cv2.threshold(mask, 127, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 0:
        logger.warning("crop_by_mask: empty mask, using the original's fallback box (0,0)-(100,100)")
        return _FALLBACK_BOX.copy()
    largest = max(contours, key=cv2.contourArea)  # first of equal areas, like the original
    box = cv2.boxPoints(cv2.minAreaRect(largest)).astype(np.intp)  # truncation toward zero (np.int0)
    by_x = sorted(box, key=lambda p: p[0])
    tl, bl = sorted(by_x[:2], key=lambda p: p[1])
    tr, br = sorted(by_x[2:], key=lambda p: p[1])
    return np.array([tl, tr, br, bl])


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` (Umeyama, PAMI 1991).

    Args:
        src, dst: (M, d) point sets. Arithmetic stays in their dtype (float32 corners in :func:`crop_by_mask`,
            as in the original) and the result is float64.

    Returns:
        (d+1, d+1) homogeneous matrix ``T`` with ``dst ~ T @ [src, 1]``; NaN if the points are all equal.
    """
    m, d = src.shape
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    cov = dst_c.T @ src_c / m  # eq. (38): covariance of dst and src
    sign = np.ones(d, dtype=np.float64)  # eq. (39): reflection correction
    if np.linalg.det(cov) < 0:
        sign[-1] = -1.0
    out = np.eye(d + 1, dtype=np.float64)
    u, s, vt = np.linalg.svd(cov)
    rank = int(np.count_nonzero(s > s.max() * max(cov.shape) * np.finfo(float).eps))
    if rank == 0:
        return out * np.nan
    if rank == d - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:  # eq. (43): degenerate but proper rotation
        out[:d, :d] = u @ vt
    elif rank == d - 1:
        flipped = sign.copy()
        flipped[-1] = -1.0
        out[:d, :d] = u @ np.diag(flipped) @ vt
    else:  # eq. (40)
        out[:d, :d] = u @ np.diag(sign) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ sign) if estimate_scale else 1.0  # eq. (42)
    out[:d, d] = mu_dst - scale * (out[:d, :d] @ mu_src.T)  # eq. (41)
    out[:d, :d] *= scale
    return out


def _bbox_crop(image: Tensor, mask: np.ndarray) -> Tensor:
    """(C, h, w) axis-aligned crop of ``image`` at the box of the mask's non-zero pixels (the whole image when the
    mask is empty), clamped to 0..255."""
    m = np.asarray(mask).reshape(mask.shape[0], mask.shape[1])
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return image.float().clamp(0, 255)
    return image[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1].float().clamp(0, 255)


def crop_by_mask(image: Tensor, mask: np.ndarray) -> Tensor:
    """Crop the mask's min-area rectangle out of ``image``, rotated upright.

    Args:
        image: (C, H, W) float tensor, values 0..255 (differentiable w.r.t. the image).
        mask: (H, W) or (H, W, 1) uint8 array in 0..255 (a line's position mask x 255).

    Returns:
        (C, h, w) tensor in 0..255, ``h`` / ``w`` = the rectangle's longer side lengths (truncated). Pixels warped
        from outside the image are 0. The warp is bilinear (``affine_grid``/``grid_sample``, align_corners=True).
    """
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    corners = min_area_box(mask).astype(np.float32)
    width = max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3]))
    height = max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))
    target = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    c, h, w = image.shape
    if int(width) < 1 or int(height) < 1:
        # The original crashes here (empty crop); keep the pipeline alive with a 1-pixel-wide side instead.
        # debug, not warning: tiny training images hit this often and the crop is still well defined
        logger.debug("crop_by_mask: degenerate rectangle %.2f x %.2f px, cropping at least 1 px", width, height)
    sim = umeyama(corners, target, estimate_scale=True)
    if not np.isfinite(sim).all():
        # All four corners equal (a one-pixel region): Umeyama's scale divides by the points' variance (0 → NaN),
        # which would put NaN into the line's embedding. Take the axis-aligned box of the mask's pixels instead.
        logger.debug("crop_by_mask: no finite transform for corners %s, axis-aligned crop", corners.tolist())
        return _bbox_crop(image, mask)
    # affine_grid works in normalised [-1, 1] coordinates and maps output -> input, hence the conjugation
    # by the pixel->normalised map and the inverse.
    to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
    theta = np.linalg.inv(to_norm @ sim @ np.linalg.inv(to_norm))
    theta_t = torch.from_numpy(theta[:2]).to(device=image.device, dtype=torch.float32)[None]
    grid = F.affine_grid(theta_t, [1, c, h, w], align_corners=True)
    warped = F.grid_sample(image[None].float(), grid, align_corners=True)[0].clamp(0, 255)
    return warped[:, :max(1, int(height)), :max(1, int(width))]
