"""RandAugment, moved from the loader worker to the training device, op for op as Pillow computes it.

Pillow's affine transform with a bicubic filter (RandAugment's Rotate, ShearX/Y and TranslateX/Y)
costs about 2 ms per 224 x 224 image on one core, as much as decoding and resizing the file together,
and with the release recipe (two ops of fifteen, each applied with probability 1/2) a third of the
training images need one; the other ops cost 0.1 to 0.9 ms each. Here the worker only draws each
op's parameters (every random number, in the reference's order, by the reference's own AugmentOp
objects) and records the op; ``RawBatch.to(device)`` applies the recorded ops there, before
normalising, computing what Pillow computes, to the bit (tests/test_device_augment.py):
:func:`pillow_affine_batch` for the geometric ops, lookup tables for Invert, Posterize, Solarize,
SolarizeAdd, AutoContrast and Equalize, single-precision blends for Color, Contrast, Brightness and
Sharpness, as ImageEnhance does them.

What the device cannot reproduce stays in the worker, with Pillow: an op whose function is not
timm's own (replaced by someone), a filter other than bicubic or bilinear, the right-angle rotations
Pillow does by transposing. Such an op first applies the ops recorded before it, there, with Pillow
(:class:`Staged`), so the order of the ops never changes.
"""
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

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


FLIP = 'FlipLeftRight'  # the random horizontal flip, left for the device with RandAugment's ops


@dataclass
class DeviceOp:
    """One op left for the device (the flip, or a RandAugment op: timm's op name and the arguments
    its ``aug_fn`` got, the filter already drawn; for the geometric ops, the Pillow transform)."""
    name: str
    args: Tuple = ()
    affine: Optional[Affine] = None


@dataclass
class Staged:
    """An 8-bit PIL image and the ops still to be applied to it, in order, each with the Pillow
    function that applies it in the worker."""
    image: Image.Image
    pending: List[Tuple[DeviceOp, Callable[[Image.Image], Image.Image]]] = field(default_factory=list)

    def materialise(self) -> Image.Image:
        """The image with its pending ops applied here, with Pillow (a file left for the device to
        decode, data.fast_transform.EncodedJpeg, is decoded here first)."""
        if not isinstance(self.image, Image.Image):
            self.image = self.image.decode()
        for _, apply in self.pending:
            self.image = apply(self.image)
        self.pending = []
        return self.image

    def add(self, op: DeviceOp, apply) -> 'Staged':
        return Staged(self.image, self.pending + [(op, apply)])


def _release_posterize():
    from .transforms import release_posterize  # here: data.transforms imports this module's users
    return release_posterize


def _device_reproduces(name: str, aug_fn) -> bool:
    """Whether ``aug_fn`` is the Pillow function the device version of ``name`` reproduces."""
    if name in _POSTERIZE:
        return aug_fn is _release_posterize()
    return aug_fn is auto_augment.NAME_TO_OP.get(name)


# The wrappers below are classes, not closures, so that the transform pickles (loader workers started
# with 'spawn' receive it pickled).
class _InWorker:
    """``aug_fn`` for a Staged image: the pending ops first, then ``aug_fn`` as timm calls it."""

    def __init__(self, aug_fn):
        self.aug_fn = aug_fn

    def __call__(self, staged: Staged, *args, **kwargs) -> Staged:
        return Staged(self.aug_fn(staged.materialise(), *args, **kwargs))


class _Apply:
    """``aug_fn(img, *args, **kwargs)``: a recorded op as the worker applies it, with Pillow."""

    def __init__(self, aug_fn, args, kwargs):
        self.aug_fn, self.args, self.kwargs = aug_fn, args, kwargs

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.aug_fn(img, *self.args, **self.kwargs)


class _OnDevice:
    """A colour op (lookup-table, histogram or enhance op) for a Staged image: recorded, to be
    applied on the device."""

    def __init__(self, name: str, aug_fn):
        self.name, self.aug_fn = name, aug_fn

    def __call__(self, staged: Staged, *args, **kwargs) -> Staged:
        if staged.image.mode != 'RGB':
            return Staged(self.aug_fn(staged.materialise(), *args, **kwargs))
        return staged.add(DeviceOp(self.name, tuple(args)), _Apply(self.aug_fn, args, kwargs))


class _GeometricOnDevice:
    """A geometric op for a Staged image: recorded where the device can apply it as Pillow does
    (RGB, bicubic or bilinear; not the right-angle rotations Pillow does by transposing)."""

    def __init__(self, name: str, aug_fn):
        self.name, self.aug_fn = name, aug_fn

    def __call__(self, staged: Staged, value: float, **kwargs) -> Staged:
        # timm's own draw of the filter (random.choice when it is a list), in its place.
        resample = auto_augment._interpolation(dict(kwargs))
        kwargs = {**kwargs, 'resample': resample}
        matrix = _MATRICES[self.name](value, *staged.image.size)
        fill = kwargs.get('fillcolor')
        if (matrix is None or staged.image.mode != 'RGB' or not isinstance(fill, tuple) or len(fill) != 3
                or resample not in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR)):
            return Staged(self.aug_fn(staged.materialise(), value, **kwargs))  # as timm does
        affine = Affine(tuple(float(m) for m in matrix), resample == Image.Resampling.BICUBIC,
                        tuple(int(f) for f in fill))
        return staged.add(DeviceOp(self.name, (value,), affine), _Apply(self.aug_fn, (value,), kwargs))


class StagedRandAugment:
    """timm's RandAugment ``reference`` (a copy; the original is unchanged), returning a
    :class:`Staged` image whose ops (after the last one the device cannot do) are left for the
    device. Random numbers are
    drawn exactly as the reference draws them."""

    def __init__(self, reference: auto_augment.RandAugment):
        self.randaugment = copy.deepcopy(reference)
        for op in self.randaugment.ops:
            if op.name in _MATRICES:
                op.aug_fn = _GeometricOnDevice(op.name, op.aug_fn)
            elif op.name in _LUTS and _device_reproduces(op.name, op.aug_fn):
                op.aug_fn = _OnDevice(op.name, op.aug_fn)
            else:
                op.aug_fn = _InWorker(op.aug_fn)

    def __call__(self, img) -> Staged:
        return self.randaugment(img if isinstance(img, Staged) else Staged(img))

    def __repr__(self):
        return f'{type(self).__name__}({self.randaugment!r})'


def _flip_left_right(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class StagedFlip:
    """torchvision's RandomHorizontalFlip(p) (the same draw), the flip left for the device."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img) -> Staged:
        staged = img if isinstance(img, Staged) else Staged(img)
        if torch.rand(1) < self.p:
            return staged.add(DeviceOp(FLIP), _flip_left_right)
        return staged


def to_device(values, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A small tensor of host values on ``device``, copied without waiting for the device: made
    on the host, then copied asynchronously (``torch.tensor(values, device='cuda')`` would wait for
    every kernel already queued, stalling the training step)."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == 'cpu' else host.to(device, non_blocking=True)


def apply_to_batch(pixels: torch.Tensor, ops: Sequence[List[DeviceOp]]) -> torch.Tensor:
    """``ops[i]`` applied in order to image i of an N x H x W x 3 uint8 batch, in place, on its
    device: the k-th ops of all images in turn, the images of a turn grouped by op, each group in
    one batched call (a few kernels per group, not per image). Nothing here waits for the device:
    the arguments go there asynchronously and no result is read back, so on a GPU the work queues
    behind the training step's kernels."""
    # The flip comes first when there is one (the recipe flips, then RandAugment): all flips at once,
    # then the k-th op after it, so a flipped image's ops fall in the same turns as the others'.
    flipped = [i for i, o in enumerate(ops) if o and o[0].name == FLIP]
    if flipped:
        index = to_device(flipped, pixels.device)
        pixels[index] = pixels[index].flip(2)
        ops = [o[1:] if o and o[0].name == FLIP else o for o in ops]
    for k in range(max((len(o) for o in ops), default=0)):
        groups = {}
        for i, o in enumerate(ops):
            if len(o) > k:
                key = 'affine' if o[k].affine is not None else o[k].name
                groups.setdefault(key, []).append((i, o[k]))
        for key, members in groups.items():
            index = to_device([i for i, _ in members], pixels.device)
            chosen = [op for _, op in members]
            if key == 'affine':
                pixels[index] = pillow_affine_batch(pixels[index], [op.affine for op in chosen])
            else:
                pixels[index] = _BATCH_OPS[key](pixels[index], [op.args for op in chosen])
    return pixels


def apply_on_device(pixels: torch.Tensor, ops: List[DeviceOp]) -> torch.Tensor:
    """``ops`` applied in order to an H x W x 3 uint8 image, on its device."""
    return apply_to_batch(pixels[None].clone(), [ops])[0]


def pillow_affine(pixels: torch.Tensor, affine: Affine) -> torch.Tensor:
    """``affine`` applied to an H x W x C uint8 image on any device, as Pillow's Image.transform
    computes it; see :func:`pillow_affine_batch`."""
    return pillow_affine_batch(pixels[None], [affine])[0]


def pillow_affine_batch(pixels: torch.Tensor, affines: Sequence[Affine]) -> torch.Tensor:
    """Each of ``affines`` applied to its image of an N x H x W x C uint8 batch on any device, as
    Pillow's Image.transform computes it (libImaging/Geometry.c): each output pixel centre
    (x + 0.5, y + 0.5) maps to a source position; outside the image it takes the fill colour;
    inside, the 4 x 4 (bicubic, the cubic with a = -1) or 2 x 2 (bilinear) source pixels around it,
    indices clamped to the edge, are interpolated along rows and then down the column, in double
    precision and in Pillow's order, then clamped to 0..255 and truncated. One set of kernels for
    the batch; bicubic and bilinear images are done as two groups."""
    n, h, w, c = pixels.shape
    if len({a.bicubic for a in affines}) > 1:
        out = torch.empty_like(pixels)
        for bicubic in (True, False):
            chosen = [i for i, a in enumerate(affines) if a.bicubic == bicubic]
            index = to_device(chosen, pixels.device)
            out[index] = pillow_affine_batch(pixels[index], [affines[i] for i in chosen])
        return out
    device = pixels.device
    bicubic = affines[0].bicubic
    m = to_device([a.matrix for a in affines], device, torch.float64).view(n, 6, 1, 1).unbind(1)
    ys = torch.arange(h, device=device, dtype=torch.float64).add_(0.5).view(1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float64).add_(0.5).view(1, 1, w)
    xin = m[0] * xs + m[1] * ys + m[2]
    yin = m[3] * xs + m[4] * ys + m[5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin.sub_(0.5), yin.sub_(0.5)
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(-1), (yin - y0).unsqueeze(-1)
    first, taps = (-1, 4) if bicubic else (0, 2)
    offsets = torch.arange(first, first + taps, device=device, dtype=torch.float64)
    cols = (x0.unsqueeze(-1) + offsets).clamp_(0, w - 1).long()
    rows = (y0.unsqueeze(-1) + offsets).clamp_(0, h - 1).long().mul_(w)
    rows += (torch.arange(n, device=device) * (h * w)).view(n, 1, 1, 1)
    # Every tap of every output pixel in one gather (N x H x W x row tap x column tap x C, 8-bit),
    # then along the rows one source row at a time (double precision for a row's taps only).
    gathered = pixels.reshape(n * h * w, c)[rows.unsqueeze(-1) + cols.unsqueeze(-2)]
    interpolate = _cubic if bicubic else _linear
    values = interpolate([interpolate(gathered[..., j, :, :].to(torch.float64).unbind(-2), dx)
                          for j in range(taps)], dy)
    values = values.clamp_(0, 255).floor_().to(torch.uint8)
    fill = to_device([a.fill for a in affines], device, torch.uint8).view(n, 1, 1, c)
    return torch.where(inside.unsqueeze(-1), values, fill)


def _cubic(v, d):
    # Pillow's BICUBIC macro: the cubic through v[1], v[2] with a = -1, evaluated as it does.
    p2 = v[2] - v[0]
    p3 = 2 * (v[0] - v[1]) + v[2] - v[3]
    p4 = -v[0] + v[1] - v[2] + v[3]
    return v[1] + d * (p2 + d * (p3 + d * p4))


def _linear(v, d):
    return v[0] + (v[1] - v[0]) * d


# The colour ops on an N x H x W x C batch, each image with its own arguments (``args[n]``, the
# arguments timm's op function got). Lookup-table ops as Pillow's ImageOps (and
# data.transforms.release_posterize) compute their tables.
def _column(values, device, dtype) -> torch.Tensor:
    """One value per image, shaped to broadcast over N x H x W x C."""
    return to_device(values, device, dtype).view(-1, 1, 1, 1)


def _apply_luts(pixels: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-image tables (N x 256, or N x C x 256 one per channel) applied to a uint8 batch."""
    n, c = pixels.shape[0], pixels.shape[-1]
    lut = lut.to(torch.uint8)
    if lut.dim() == 2:
        lut = lut[:, None, :].expand(n, c, 256)
    base = (torch.arange(n * c, device=pixels.device) * 256).view(n, 1, 1, c)
    return lut.reshape(-1)[pixels.long() + base]


def _levels(pixels: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=pixels.device).view(1, 256)


def _invert(pixels, args):
    return 255 - pixels


def _posterize(pixels, args):
    masks = [0xFF if bits >= 8 else 0xFF ^ ((1 << (8 - max(int(bits), 0))) - 1) for bits, *_ in args]
    return pixels & _column(masks, pixels.device, torch.uint8)


def _solarize(pixels, args):
    levels = _levels(pixels)
    threshold = to_device([a[0] for a in args], pixels.device).view(-1, 1)
    return _apply_luts(pixels, torch.where(levels < threshold, levels, 255 - levels))


def _solarize_add(pixels, args):
    levels = _levels(pixels)
    add = to_device([a[0] for a in args], pixels.device).view(-1, 1)
    threshold = to_device([a[1] if len(a) > 1 else 128 for a in args], pixels.device).view(-1, 1)
    return _apply_luts(pixels, torch.where(levels < threshold, (levels + add).clamp(max=255), levels))


def _count(bins: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of 0..size-1 occurs in ``bins`` (as torch.bincount, which on a GPU first
    reads the largest value back to the host, waiting for the device)."""
    counts = torch.zeros(size, dtype=torch.int64, device=bins.device)
    bins = bins.reshape(-1)
    return counts.index_add_(0, bins, torch.ones((), dtype=torch.int64, device=bins.device).expand_as(bins))


def _histograms(pixels: torch.Tensor) -> torch.Tensor:
    """N x C x 256 counts."""
    n, c = pixels.shape[0], pixels.shape[-1]
    base = (torch.arange(n * c, device=pixels.device) * 256).view(n, 1, 1, c)
    return _count(pixels.long() + base, 256 * n * c).view(n, c, 256)


def _autocontrast(pixels, args):
    # ImageOps.autocontrast(img): per channel, levels lo..hi stretched to 0..255 (int() truncates).
    hist = _histograms(pixels)
    levels = torch.arange(256, device=pixels.device, dtype=torch.float64)
    present = hist > 0
    lo = present.to(torch.uint8).argmax(-1).to(torch.float64)
    hi = 255 - present.flip(-1).to(torch.uint8).argmax(-1).to(torch.float64)
    # A true division (255.0 / tensor would multiply by a rounded reciprocal: a level off at times).
    scale = torch.full_like(lo, 255.0).div_((hi - lo).clamp(min=1))
    lut = (levels * scale[..., None] + (-lo * scale)[..., None]).trunc().clamp(0, 255)
    return _apply_luts(pixels, torch.where((hi > lo)[..., None], lut, levels))


def _equalize(pixels, args):
    # ImageOps.equalize(img): per channel, step = (pixels - count of the last level present) // 255;
    # level i maps to (step // 2 + pixels below i) // step; channels with one level, or step 0, stay.
    hist = _histograms(pixels)
    present = hist > 0
    last = 255 - present.flip(-1).to(torch.uint8).argmax(-1)
    step = (hist.sum(-1) - hist.gather(-1, last[..., None])[..., 0]) // 255
    below = torch.cumsum(hist, -1) - hist
    lut = (step[..., None] // 2 + below) // step.clamp(min=1)[..., None]
    keep = (present.sum(-1) <= 1) | (step == 0)
    levels = torch.arange(256, device=pixels.device)
    return _apply_luts(pixels, torch.where(keep[..., None], levels, lut.clamp(0, 255)))


# The enhance ops, as Pillow's ImageEnhance computes them: Image.blend(degenerate, image, factor),
# which computes in1 + alpha * (in2 - in1) in single precision (alpha a C float), clamps to 0..255
# and truncates; the degenerate image is the grey image (Color), its mean grey level (Contrast),
# black (Brightness) or the image smoothed by the 3 x 3 kernel (1 1 1, 1 5 1, 1 1 1) / 13 with the
# border kept (Sharpness).
def _blend(degenerate: torch.Tensor, pixels: torch.Tensor, args) -> torch.Tensor:
    alpha = _column([a[0] for a in args], pixels.device, torch.float32)
    degenerate = degenerate.float()
    values = degenerate + (pixels.float() - degenerate) * alpha
    return values.clamp_(0, 255).to(torch.uint8)


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    # Pillow's RGB to L: ITU-R 601-2 luma in 16-bit fixed point, rounded.
    p = pixels.to(torch.int32)
    return (p[..., 0] * 19595 + p[..., 1] * 38470 + p[..., 2] * 7471 + 0x8000) >> 16


def _color(pixels, args):
    return _blend(_grey(pixels).unsqueeze(-1).expand_as(pixels), pixels, args)


def _contrast(pixels, args):
    # ImageStat's mean of the grey image, rounded as int(mean + 0.5).
    n = pixels.shape[0]
    grey = _grey(pixels).long() + (torch.arange(n, device=pixels.device) * 256).view(n, 1, 1)
    hist = _count(grey, 256 * n).view(n, 256).to(torch.float64)
    levels = torch.arange(256, device=pixels.device, dtype=torch.float64)
    mean = (hist * levels).sum(-1) / hist.sum(-1)
    return _blend((mean + 0.5).floor().view(n, 1, 1, 1).expand_as(pixels), pixels, args)


def _brightness(pixels, args):
    return _blend(torch.zeros_like(pixels), pixels, args)


def _sharpness(pixels, args):
    # ImageFilter.SMOOTH as Pillow's 3 x 3 filter sums it: the row below, the row, the row above,
    # each as (left + centre) + right, in single precision, then rounded; the border is copied.
    h, w = pixels.shape[1:3]
    f = pixels.float()
    # The kernel's weights as single-precision scalars (made on the device: no copy to wait for).
    edge = torch.full((), 1 / 13, dtype=torch.float32, device=pixels.device)
    centre = torch.full((), 5 / 13, dtype=torch.float32, device=pixels.device)

    def row(rows, middle):
        return (f[:, rows, :w - 2] * edge + f[:, rows, 1:w - 1] * (centre if middle else edge)) + f[:, rows, 2:] * edge
    total = row(slice(2, h), False)
    total = total + row(slice(1, h - 1), True)
    total = total + row(slice(0, h - 2), False)
    smooth = pixels.clone()
    smooth[:, 1:h - 1, 1:w - 1] = (total + 0.5).clamp_(0, 255).to(torch.uint8)
    return _blend(smooth, pixels, args)


def _flip(pixels, args):
    return pixels.flip(2)


_POSTERIZE = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')
# RandAugment op names (timm's) the device applies; see _device_reproduces.
_LUTS = {'Invert': _invert, 'Solarize': _solarize, 'SolarizeIncreasing': _solarize,
         'SolarizeAdd': _solarize_add, 'AutoContrast': _autocontrast, 'Equalize': _equalize,
         **{name: _posterize for name in _POSTERIZE},
         **{name + suffix: fn for name, fn in (('Color', _color), ('Contrast', _contrast),
                                              ('Brightness', _brightness), ('Sharpness', _sharpness))
            for suffix in ('', 'Increasing')}}
_BATCH_OPS = {**_LUTS, FLIP: _flip}
