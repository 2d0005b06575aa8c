"""RandAugment's trailing geometric op, moved from the loader worker to the training device.

Pillow's affine transform with a bicubic filter (RandAugment's Rotate, ShearX/Y and TranslateX/Y)
costs about 2 ms per 224 x 224 image on one core, as much as decoding and resizing the file together:
with the release recipe (two ops of fifteen, each applied with probability 1/2) a third of the training
images need one. When the geometric op is the last thing done to the 8-bit image, nothing in the
worker depends on its pixels, so the worker only draws its parameters (every random number, in the
reference's order) and records the transform; ``RawBatch.to(device)`` applies it there, before
normalising, with :func:`pillow_affine`, which computes what Pillow computes (same source positions,
filter, edge handling, truncation and fill; the same pixels, tests/test_fast_transform.py).

A geometric op followed by another op that fires is applied in the worker, with Pillow, as before:
:class:`Staged` carries the pending transform through the RandAugment ops and any later op that
fires applies it first.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from PIL import Image
from timm.data import auto_augment

# timm's geometric ops and the Pillow AFFINE matrix each one applies, from its argument and the
# image size (the matrix maps output pixel centres to source positions, as Image.transform's data).
_MATRICES = {
    'ShearX': lambda v, w, h: (1, v, 0, 0, 1, 0),
    'ShearY': lambda v, w, h: (1, 0, 0, v, 1, 0),
    'TranslateX': lambda v, w, h: (1, 0, v, 0, 1, 0),
    'TranslateY': lambda v, w, h: (1, 0, 0, 0, 1, v),
    'TranslateXRel': lambda v, w, h: (1, 0, v * w, 0, 1, 0),
    'TranslateYRel': lambda v, w, h: (1, 0, 0, 0, 1, v * h),
    'Rotate': lambda v, w, h: _rotation(v, w, h),
}


@dataclass
class Affine:
    """A pending Pillow ``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)``."""
    matrix: Tuple[float, ...]
    bicubic: bool  # else bilinear
    fill: Tuple[int, ...]


def _rotation(degrees: float, w: int, h: int) -> Optional[Tuple[float, ...]]:
    """Pillow's matrix for ``Image.rotate(degrees)`` about the centre, or None for the angles Pillow
    does by transposing instead (0, 90, 180, 270), which stay in the worker."""
    angle = degrees % 360.0
    if angle in (0, 90, 180, 270):
        return None
    angle = -math.radians(angle)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = w / 2, h / 2
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def _apply_pillow(img: Image.Image, affine: Affine) -> Image.Image:
    resample = Image.Resampling.BICUBIC if affine.bicubic else Image.Resampling.BILINEAR
    return img.transform(img.size, Image.Transform.AFFINE, affine.matrix, resample, fillcolor=affine.fill)


class Staged:
    """An 8-bit PIL image and the geometric op still to be applied to it (None: none)."""
    __slots__ = ('image', 'affine')

    def __init__(self, image: Image.Image, affine: Optional[Affine] = None):
        self.image, self.affine = image, affine

    def materialise(self) -> Image.Image:
        """The image with its pending op applied here, with Pillow."""
        if self.affine is not None:
            self.image, self.affine = _apply_pillow(self.image, self.affine), None
        return self.image


def _after_pending(aug_fn):
    """``aug_fn`` for a Staged image: the pending op first, then ``aug_fn`` as timm calls it."""
    def op(staged: Staged, *args, **kwargs) -> Staged:
        return Staged(aug_fn(staged.materialise(), *args, **kwargs))
    return op


def _deferring(name: str, aug_fn):
    """timm's geometric ``aug_fn`` for a Staged image, recording the transform instead of applying
    it where the device can apply it exactly (RGB, bicubic or bilinear)."""
    def op(staged: Staged, value: float, **kwargs) -> Staged:
        img = staged.materialise()
        # timm's own draw of the filter (random.choice when it is a list), in its place.
        resample = auto_augment._interpolation(dict(kwargs))
        matrix = _MATRICES[name](value, *img.size)
        fill = kwargs.get('fillcolor')
        if (matrix is None or img.mode != 'RGB' or not isinstance(fill, tuple) or len(fill) != 3
                or resample not in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR)):
            return Staged(aug_fn(img, value, **{**kwargs, 'resample': resample}))  # as timm does
        return Staged(img, Affine(tuple(float(m) for m in matrix), resample == Image.Resampling.BICUBIC,
                                  tuple(int(f) for f in fill)))
    return op


class StagedRandAugment:
    """timm's RandAugment ``reference`` (a copy; the original is unchanged), returning a
    :class:`Staged` image whose trailing geometric op, if any, is left for the device. Random
    numbers are drawn exactly as the reference draws them."""

    def __init__(self, reference: auto_augment.RandAugment):
        self.randaugment = copy.deepcopy(reference)
        for op in self.randaugment.ops:
            if op.name in _MATRICES:
                op.aug_fn = _deferring(op.name, op.aug_fn)
            else:
                op.aug_fn = _after_pending(op.aug_fn)

    def __call__(self, img: Image.Image) -> Staged:
        return self.randaugment(Staged(img))

    def __repr__(self):
        return f'{type(self).__name__}({self.randaugment!r})'


def pillow_affine(pixels: torch.Tensor, affine: Affine) -> torch.Tensor:
    """``affine`` applied to an H x W x C uint8 image on any device, as Pillow's Image.transform
    computes it (libImaging/Geometry.c): each output pixel centre (x + 0.5, y + 0.5) maps to a
    source position; outside the image it takes the fill colour; inside, the 4 x 4 (bicubic, the
    cubic with a = -1) or 2 x 2 (bilinear) source pixels around it, indices clamped to the edge, are
    interpolated along rows and then down the column, in double precision and in Pillow's order,
    then clamped to 0..255 and truncated."""
    h, w, c = pixels.shape
    device = pixels.device
    a0, a1, a2, a3, a4, a5 = affine.matrix
    ys = torch.arange(h, device=device, dtype=torch.float64).add_(0.5).view(h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float64).add_(0.5).view(1, w)
    xin = a0 * xs + a1 * ys + a2
    yin = a3 * xs + a4 * ys + a5
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(-1), (yin - y0).unsqueeze(-1)
    taps, first = (4, -1) if affine.bicubic else (2, 0)
    cols = [(x0 + (first + i)).clamp_(0, w - 1).long() for i in range(taps)]
    rows = [(y0 + (first + j)).clamp_(0, h - 1).long() * w for j in range(taps)]
    source = pixels.reshape(h * w, c).to(torch.float64)
    interpolate = _cubic if affine.bicubic else _linear
    values = interpolate([interpolate([source[row + col] for col in cols], dx) for row in rows], dy)
    values = values.clamp_(0, 255).floor_().to(torch.uint8)
    fill = torch.tensor(affine.fill, dtype=torch.uint8, device=device)
    return torch.where(inside.unsqueeze(-1), values, fill)


def _cubic(v, d):
    # Pillow's BICUBIC macro: the cubic through v[1], v[2] with a = -1, evaluated as it does.
    p2 = v[2] - v[0]
    p3 = 2 * (v[0] - v[1]) + v[2] - v[3]
    p4 = -v[0] + v[1] - v[2] + v[3]
    return v[1] + d * (p2 + d * (p3 + d * p4))


def _linear(v, d):
    return v[0] + (v[1] - v[0]) * d
