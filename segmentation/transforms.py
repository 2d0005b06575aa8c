"""The ADE20K training pipeline of mmsegmentation, on torchvision.transforms.v2.

An image (``tv_tensors.Image``, uint8) and its label map (``tv_tensors.Mask``) go through the same
geometric transforms. mmseg's steps, in order: random rescale (ratio 0.5-2.0 of a 2048 x 512 bound),
random 512 x 512 crop that avoids crops dominated by one class, horizontal flip, photometric
distortion, normalisation, padding to the crop size (image 0, labels ignored). Sizes follow mmcv's
rounding; resizing is bilinear without antialiasing, as OpenCV's, and nearest for labels.
"""
from typing import Any, Dict, List, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IGNORE_INDEX = 255
# ImageNet statistics on the 0-255 scale, as the official configs normalise.
MEAN = [255 * m for m in IMAGENET_DEFAULT_MEAN]
STD = [255 * s for s in IMAGENET_DEFAULT_STD]


def rescale_size(height: int, width: int, bound: Sequence[float]) -> Tuple[int, int]:
    """(height, width) scaled, keeping the aspect ratio, as large as fits ``bound`` = (long edge,
    short edge) in either orientation (mmcv's ``imrescale``)."""
    long_edge, short_edge = max(bound), min(bound)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _image_and_mask(flat_inputs: List[Any]):
    image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
    mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
    return image, mask


class RandomRescale(v2.Transform):
    """Rescale by a ratio drawn uniformly from ``ratio_range``, to fit ``scale`` x ratio (mmseg's
    ``Resize(img_scale, ratio_range)``: the bound is truncated to integers, then ``rescale_size``)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float]):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def _ratio(self) -> float:
        lo, hi = self.ratio_range
        return lo + (hi - lo) * torch.rand(()).item()

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        ratio = self._ratio()
        bound = [int(s * ratio) for s in self.scale]
        height, width = _image_and_mask(flat_inputs)[0].shape[-2:]
        return {'size': list(rescale_size(height, width, bound))}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        # Masks are resized with nearest neighbours whatever the interpolation asked for.
        return TF.resize(inpt, params['size'], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


class CatMaxRatioCrop(v2.Transform):
    """A random ``size`` x ``size`` crop (smaller where the image is) whose most frequent labelled class
    covers less than ``cat_max_ratio`` of its labelled pixels, and that holds at least two classes.
    Up to ten more crops are drawn to find one; the last is kept if none qualifies (mmseg's
    ``RandomCrop``). ``cat_max_ratio`` >= 1 takes the first crop."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index

    def _draw(self, height: int, width: int) -> Tuple[int, int]:
        top = int(torch.randint(0, max(height - self.size, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.size, 0) + 1, ()))
        return top, left

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        image, mask = _image_and_mask(flat_inputs)
        height, width = image.shape[-2:]
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top, left = self._draw(height, width)
        if mask is not None and self.cat_max_ratio < 1:
            mask = mask.as_subclass(torch.Tensor)  # plain tensor ops: no tv_tensor dispatch per slice
            for _ in range(10):
                labels = mask[..., top:top + crop_h, left:left + crop_w].flatten()
                counts = torch.bincount(labels[labels != self.ignore_index].long())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._draw(height, width)
        return {'top': top, 'left': left, 'height': crop_h, 'width': crop_w}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return TF.crop(inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's photometric distortion of a uint8 image; each step with probability 1/2, in order:
    brightness (add up to +-32), contrast (multiply by 0.5-1.5) either here or last, saturation
    (scale HSV saturation by 0.5-1.5), hue (shift by -18 to 17 of OpenCV's 180 steps, about 0.1 turn).
    Each step truncates to 8 bits, as the original computes on uint8 images. Labels pass through."""
    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(()).item()

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        d = self.brightness_delta
        return {
            'brightness': self._uniform(-d, d) if self._coin() else None,
            'contrast_first': self._coin(),
            'contrast': self._uniform(*self.contrast_range) if self._coin() else None,
            'saturation': self._uniform(*self.saturation_range) if self._coin() else None,
            # numpy's randint(-d, d), as mmseg draws it: the upper end is excluded
            'hue': int(torch.randint(-self.hue_delta, self.hue_delta, ())) if self._coin() else None,
        }

    @staticmethod
    def _to_uint8(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0, 255).to(torch.uint8)  # truncates, as numpy's astype(uint8)

    @staticmethod
    def _saturate(img: torch.Tensor, alpha: float) -> torch.Tensor:
        # Scaling S = (max - min) / max keeps the value (max) and the hue: every channel moves away
        # from the max by the same factor, limited so that S stays at most 1 (no channel below 0).
        x = img.float()
        value = x.amax(dim=-3, keepdim=True)
        spread = value - x.amin(dim=-3, keepdim=True)
        factor = torch.where(spread > 0, torch.clamp(value / spread.clamp(min=1e-6), max=alpha),
                             torch.ones_like(spread))
        return PhotoMetricDistortion._to_uint8(value - factor * (value - x))

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        img = inpt.as_subclass(torch.Tensor)
        if params['brightness'] is not None:
            img = self._to_uint8(img.float() + params['brightness'])
        if params['contrast_first'] and params['contrast'] is not None:
            img = self._to_uint8(img.float() * params['contrast'])
        if params['saturation'] is not None:
            img = self._saturate(img, params['saturation'])
        if params['hue'] is not None:
            img = TF.adjust_hue(img, params['hue'] / 180)
        if not params['contrast_first'] and params['contrast'] is not None:
            img = self._to_uint8(img.float() * params['contrast'])
        return tv_tensors.wrap(img, like=inpt)


class PadTo(v2.Transform):
    """Pad on the right and bottom to at least ``size`` x ``size``: images with 0 (in normalised units,
    as mmseg pads after normalising), labels with the ignore index."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.ignore_index = size, ignore_index

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = _image_and_mask(flat_inputs)[0].shape[-2:]
        return {'padding': [0, 0, max(self.size - width, 0), max(self.size - height, 0)]}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not any(params['padding']):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return TF.pad(inpt, params['padding'], fill=fill)


def build_train_transform(*, scale: Sequence[int], ratio_range: Sequence[float], crop_size: int,
                          cat_max_ratio: float, flip: float, photometric: bool) -> v2.Compose:
    """The training pipeline for (Image, Mask) pairs; returns a float image normalised with the
    ImageNet statistics and a uint8 label map, both ``crop_size`` square."""
    steps = [RandomRescale(scale, ratio_range), CatMaxRatioCrop(crop_size, cat_max_ratio)]
    if flip > 0:
        steps.append(v2.RandomHorizontalFlip(flip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=False),
              v2.Normalize(MEAN, STD), PadTo(crop_size)]
    return v2.Compose(steps)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) images (B, 3, H, W) to the network's input."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


__all__ = ['IGNORE_INDEX', 'MEAN', 'STD', 'rescale_size', 'RandomRescale', 'CatMaxRatioCrop',
           'PhotoMetricDistortion', 'PadTo', 'build_train_transform', 'normalize']
