"""Pieces shared by the detectors written with mmdetection's parameter names (ATSS, Cascade Mask R-CNN,
Sparse R-CNN): the conv-norm-activation unit, the FPN neck, anchors, the delta box coder, and the
resize-normalise-pad step with its way back to the image's pixels.

Names follow mmdetection (``conv``/``gn``/``bn`` inside a unit, ``lateral_convs``/``fpn_convs`` in
the neck), so a released checkpoint's tensors land on modules of the same names.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.ops import nms

# mmdetection clamps the predicted log-scale of a box's width and height to +-log(1000 / 16).
MAX_LOG_RATIO = abs(math.log(16 / 1000))


class ConvNormAct(nn.Module):
    """Convolution, optional norm (``gn``: GroupNorm of 32 groups, ``bn``: BatchNorm), optional ReLU;
    the convolution has a bias only without a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: Optional[str] = None, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              bias=norm is None)
        self.norm_name = norm
        if norm == 'gn':
            self.gn = nn.GroupNorm(32, out_channels)
        elif norm == 'bn':
            self.bn = nn.BatchNorm2d(out_channels)
        elif norm is not None:
            raise ValueError(f'unknown norm {norm!r}; expected "gn", "bn" or None')
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return self.act(x)


class FPN(nn.Module):
    """mmdetection's FPN: 1x1 laterals, nearest top-down upsampling to the finer map's size, 3x3
    outputs, then extra levels up to ``num_outs``: stride-2 3x3 convolutions on the previous output
    (``extra='on_output'``, no ReLU between them) or a stride-2 max pool of 1 (``extra='pool'``)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, extra: str):
        super().__init__()
        if extra not in ('on_output', 'pool'):
            raise ValueError(f'unknown FPN extra levels {extra!r}; expected "on_output" or "pool"')
        self.extra, self.num_outs = extra, num_outs
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, out_channels, 1, act=False) for c in in_channels)
        convs = [ConvNormAct(out_channels, out_channels, 3, act=False) for _ in in_channels]
        if extra == 'on_output':
            convs += [ConvNormAct(out_channels, out_channels, 3, stride=2, act=False)
                      for _ in range(num_outs - len(in_channels))]
        self.fpn_convs = nn.ModuleList(convs)
        self.out_channels = out_channels
        for m in self.modules():  # mmdetection's FPN init: Xavier-uniform weights, zero biases
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode='nearest')
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            if self.extra == 'pool':
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                outs.append(self.fpn_convs[len(outs)](outs[-1]))
        return outs


# ---- boxes ---------------------------------------------------------------------------------------

def grid_anchors(base: torch.Tensor, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """(H * W * A, 4) anchors of one level, row-major over the grid then the A base anchors: the
    base anchors (centred on 0) shifted to every (x * stride, y * stride), as mmdetection places them."""
    H, W = size
    xs = torch.arange(W, dtype=torch.float32, device=base.device) * stride
    ys = torch.arange(H, dtype=torch.float32, device=base.device) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing='ij')
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=1)
    return (base[None] + shifts[:, None]).reshape(-1, 4)


def square_anchor(size: float, device=None) -> torch.Tensor:
    """One square base anchor of side ``size`` centred on 0, (1, 4)."""
    h = 0.5 * size
    return torch.tensor([[-h, -h, h, h]], dtype=torch.float32, device=device)


def valid_flags(size: Tuple[int, int], stride: int, pad_shape: Tuple[int, int], per_cell: int = 1
                ) -> torch.Tensor:
    """Which of a level's anchors lie on the image's own (padded) area rather than on the padding
    that batching with larger images added: cells with x < ceil(pad_w / stride), y likewise."""
    H, W = size
    valid_h, valid_w = min(math.ceil(pad_shape[0] / stride), H), min(math.ceil(pad_shape[1] / stride), W)
    flags = torch.zeros(H, W, dtype=torch.bool)
    flags[:valid_h, :valid_w] = True
    return flags.reshape(-1, 1).expand(-1, per_cell).reshape(-1)


def decode_deltas(rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float],
                  max_shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """mmdetection's DeltaXYWHBBoxCoder.decode (means 0): centre shifts by the box size, log-scale
    width and height clamped to +-log(1000 / 16), then clipped to (height, width) ``max_shape``."""
    deltas = deltas * deltas.new_tensor(stds)
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    gxy = pxy + pwh * deltas[..., :2]
    gwh = pwh * deltas[..., 2:].clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[..., 0::2] = boxes[..., 0::2].clamp(min=0, max=max_shape[1])
        boxes[..., 1::2] = boxes[..., 1::2].clamp(min=0, max=max_shape[0])
    return boxes


def encode_deltas(rois: torch.Tensor, gts: torch.Tensor, stds: Sequence[float]) -> torch.Tensor:
    """The inverse of ``decode_deltas`` (mmdetection's bbox2delta, means 0)."""
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    gxy = (gts[..., :2] + gts[..., 2:]) * 0.5
    gwh = gts[..., 2:] - gts[..., :2]
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float, split_thr: int = 10000) -> torch.Tensor:
    """Per-class NMS as mmcv runs it: below ``split_thr`` boxes, every class's boxes shifted apart by
    the largest coordinate + 1 and one NMS over all; from it on, one NMS per class. The kept indices,
    highest score first."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if len(boxes) < split_thr:
        return nms(shifted, scores, iou_threshold)
    kept = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for label in torch.unique(labels):
        members = (labels == label).nonzero().view(-1)
        kept[members[nms(shifted[members], scores[members], iou_threshold)]] = True
    keep = kept.nonzero().view(-1)
    return keep[scores[keep].sort(descending=True)[1]]


# ---- images in, boxes out ------------------------------------------------------------------------

@dataclass
class Batch:
    """Images resized, normalised and zero-padded into one tensor, with what the heads need to know
    of each image: its resized size, its own padded size, its scale factors (x, y) and its original
    size; and in training the targets in resized pixels (labels 0..K-1)."""
    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    pad_shapes: List[Tuple[int, int]]
    scale_factors: List[Tuple[float, float]]
    original_sizes: List[Tuple[int, int]]
    boxes: List[torch.Tensor] = field(default_factory=list)
    labels: List[torch.Tensor] = field(default_factory=list)
    masks: List[torch.Tensor] = field(default_factory=list)   # (N, H, W) uint8, resized size


def _ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class ResizeNormalizePad:
    """mmdetection's test/training resize (keep ratio: scale = min(max_size / long side, size / short
    side); new side = int(side * scale + 0.5)), ImageNet normalisation, zero padding to a multiple of
    ``divisor``. Training draws the short-side size from ``train_sizes``. Images are (3, H, W) in [0, 1].

    The resampling is PyTorch's bilinear on floats; mmdetection's is OpenCV's on uint8, which differs
    by rounding (the comparison tests therefore start from mmdetection's resized image)."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int, divisor: int = 32):
        self.train_sizes, self.test_size, self.max_size = list(train_sizes), int(test_size), int(max_size)
        self.divisor = divisor
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def new_size(self, height: int, width: int, short: int) -> Tuple[int, int]:
        scale = min(self.max_size / max(height, width), short / min(height, width))
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def __call__(self, images: Sequence[torch.Tensor], targets: Optional[Sequence[dict]] = None,
                 training: bool = False, with_masks: bool = False) -> Batch:
        resized, sizes, scales, originals = [], [], [], []
        boxes, labels, masks = [], [], []
        for i, image in enumerate(images):
            H, W = image.shape[-2:]
            short = (self.train_sizes[int(torch.randint(len(self.train_sizes), ()))] if training
                     else self.test_size)
            h, w = self.new_size(H, W, short)
            x = F.interpolate(image[None].float(), size=(h, w), mode='bilinear', align_corners=False)[0]
            resized.append((x - self.mean.to(x)) / self.std.to(x))
            sx, sy = w / W, h / H
            sizes.append((h, w)), scales.append((sx, sy)), originals.append((H, W))
            if targets is not None:
                t = targets[i]
                b = t['boxes'].float() * torch.tensor([sx, sy, sx, sy], device=image.device)
                b[:, 0::2] = b[:, 0::2].clamp(0, w)
                b[:, 1::2] = b[:, 1::2].clamp(0, h)
                boxes.append(b)
                labels.append(t['labels'] - 1)  # ours are 1..K, the heads' 0..K-1
                if with_masks:
                    m = t['masks'][:, None].float()
                    masks.append((F.interpolate(m, size=(h, w), mode='nearest')[:, 0] if len(m)
                                  else m.new_zeros(0, h, w)).to(torch.uint8))
        Hp = _ceil_to(max(s[0] for s in sizes), self.divisor)
        Wp = _ceil_to(max(s[1] for s in sizes), self.divisor)
        tensor = resized[0].new_zeros(len(resized), 3, Hp, Wp)
        for i, x in enumerate(resized):
            tensor[i, :, :x.shape[1], :x.shape[2]] = x
        pads = [(_ceil_to(h, self.divisor), _ceil_to(w, self.divisor)) for h, w in sizes]
        return Batch(tensor, sizes, pads, scales, originals, boxes, labels, masks)


def to_original(boxes: torch.Tensor, scale: Tuple[float, float]) -> torch.Tensor:
    """Boxes from resized pixels back to the image's (mmdetection multiplies by the reciprocals)."""
    sx, sy = scale
    return boxes * boxes.new_tensor([1 / sx, 1 / sy, 1 / sx, 1 / sy])


class BatchDetector(nn.Module):
    """torchvision's detector call on the detectors written here: images (and targets in training)
    become one padded ``Batch`` through ``self.transform``; training returns ``loss_batch``'s losses,
    evaluation ``predict_batch``'s detections. ``with_masks`` says whether training batches carry
    instance masks."""
    with_masks = False

    def forward(self, images: List[torch.Tensor], targets: Optional[List[dict]] = None):
        batch = self.transform(images, targets, training=self.training,
                               with_masks=self.with_masks and self.training)
        if self.training:
            return self.loss_batch(batch)
        return self.predict_batch(batch)
