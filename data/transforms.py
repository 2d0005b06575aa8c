"""Training and evaluation transforms (timm's ImageNet training pipeline, centre-crop evaluation)."""
import math
from typing import Optional

import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from errors import UserError

from .fast_transform import fast_train_transform

# Images this small (CIFAR-like) get a padded random crop: a random *resized* crop would throw away
# most of their few pixels.
SMALL_IMAGE = 32


# timm's augmentation ops that posterize; see release_posterize.
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def release_posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every channel of an L or RGB image; 0 (or fewer) keeps
    none, which gives a black image.

    The release recipe's RandAugment (``rand-m9-mstd0.5-inc1``) samples magnitudes from N(9, 0.5)
    clipped to [0, 10]; at 10, timm's PosterizeIncreasing asks for 0 bits (AutoAugment's ``v0``
    policy does so at magnitude 2). The Pillow of the releases returned a black image (checked with
    9.5, 11.3 and 12.0); Pillow 13 raises ValueError instead, for about one training image in 660
    (one batch of 128 in six), so a run stopped within its first steps. This is the old Pillow's
    lookup table, written out so that it gives the same image on every Pillow. We replace the
    operation rather than cap Pillow below 13: a cap would hold back fixes to the library that
    decodes every training image, and would not help anyone who already has Pillow 13 installed.
    """
    if bits_to_keep >= 8:
        return img
    if img.mode not in ('L', 'RGB'):
        raise ValueError(f'posterize needs an L or RGB image, got mode {img.mode}')
    mask = 0xFF ^ ((1 << (8 - max(bits_to_keep, 0))) - 1)  # e.g. 4 bits: 0xF0; 0 bits: 0
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _use_release_posterize(transform: T.Compose) -> None:
    """Make every posterize op of timm's RandAugment, AutoAugment or AugMix in ``transform`` use
    :func:`release_posterize`. Only this transform changes; timm's tables stay as they are."""
    for step in transform.transforms:
        ops = list(getattr(step, 'ops', ()))           # RandAugment, AugMixAugment
        for sub_policy in getattr(step, 'policy', ()):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.name in POSTERIZE_OPS:
                op.aug_fn = release_posterize


# Reach of Pillow's resampling filters, in source pixels when enlarging (times the scale when shrinking).
_FILTER_SUPPORT = {T.InterpolationMode.NEAREST: 0.5, T.InterpolationMode.BOX: 0.5,
                   T.InterpolationMode.BILINEAR: 1.0, T.InterpolationMode.HAMMING: 1.0,
                   T.InterpolationMode.BICUBIC: 2.0, T.InterpolationMode.LANCZOS: 3.0}


class ResizeCenterCrop:
    """``T.Resize(resize)`` (the shorter side to ``resize``) then ``T.CenterCrop(crop)`` of a PIL
    image, without building a huge image for a very long and thin one.

    ``T.Resize(256)`` of a legal 1 x 10000 image builds a 256 x 2,560,000 image (2 GB) before the
    crop keeps 224 x 224 of it. Images up to ``max_aspect``:1 (all ordinary photos) take exactly that
    path, so evaluation matches the releases' pixel for pixel. Longer ones are first cut down to the
    pixels the kept box's filter can reach, then resampled into the box (horizontally, then
    vertically, as Pillow's resize does) with the scale and pixel centres of the full resize: the
    same image to within a few grey levels (Pillow holds the box in single precision), at a cost
    that no longer grows with the aspect ratio.
    """

    def __init__(self, resize: int, crop: int, interpolation: T.InterpolationMode, max_aspect: float = 16):
        if crop > resize:
            raise ValueError(f'the centre crop ({crop}) must not exceed the resized shorter side ({resize})')
        self.resize, self.crop, self.interpolation, self.max_aspect = resize, crop, interpolation, max_aspect

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        # The resized size and the crop's corner, as torchvision computes them.
        new_long = int(self.resize * max(w, h) / min(w, h))
        if new_long <= self.max_aspect * self.resize or self.interpolation not in _FILTER_SUPPORT:
            return TF.center_crop(TF.resize(img, [self.resize], self.interpolation), [self.crop])
        new_w, new_h = (self.resize, new_long) if w <= h else (new_long, self.resize)
        left, top = int(round((new_w - self.crop) / 2.0)), int(round((new_h - self.crop) / 2.0))
        sx, sy = w / new_w, h / new_h
        x0, x1, y0, y1 = left * sx, (left + self.crop) * sx, top * sy, (top + self.crop) * sy
        # The source pixels any output pixel's filter reaches, with a pixel to spare.
        support = _FILTER_SUPPORT[self.interpolation]
        cx0 = max(0, math.floor(x0 - support * max(sx, 1.0)) - 1)
        cx1 = min(w, math.ceil(x1 + support * max(sx, 1.0)) + 1)
        cy0 = max(0, math.floor(y0 - support * max(sy, 1.0)) - 1)
        cy1 = min(h, math.ceil(y1 + support * max(sy, 1.0)) + 1)
        resample = TF.pil_modes_mapping[self.interpolation]
        img = img.crop((cx0, cy0, cx1, cy1))
        img = img.resize((self.crop, cy1 - cy0), resample, box=(x0 - cx0, 0, x1 - cx0, cy1 - cy0))
        return img.resize((self.crop, self.crop), resample, box=(0, y0 - cy0, self.crop, y1 - cy0))

    def __repr__(self):
        return (f'{type(self).__name__}(resize={self.resize}, crop={self.crop}, '
                f'interpolation={self.interpolation.value})')


# DATA.INTERPOLATION values; 'random' (bilinear or bicubic per image) is timm's, for training only.
INTERPOLATIONS = ('bicubic', 'bilinear', 'lanczos', 'hamming', 'box', 'nearest', 'random')


def _interpolation(name: str) -> T.InterpolationMode:
    # Evaluation is deterministic: 'random' evaluates with bilinear.
    return T.InterpolationMode.BILINEAR if name == 'random' else T.InterpolationMode(name)


def build_train_transform(config, device_augment: Optional[bool] = None):
    """The training transform: data.fast_transform's when DATA.FAST_PIPELINE and the recipe has the
    shape it handles (a random resized crop of image files larger than SMALL_IMAGE), timm's otherwise.
    ``device_augment``: leave the flip and RandAugment's ops to the training
    device (data.device_augment); by default (DATA.AUGMENT_ON 'auto') when a GPU is there to train on."""
    reference = build_transform(True, config)
    where = config.DATA.AUGMENT_ON  # 'auto' or 'worker' (engine/config_checks.py)
    if device_augment is None:
        device_augment = where == 'auto' and torch.cuda.is_available()
    gpu_decode = config.DATA.GPU_DECODE
    if gpu_decode and not torch.cuda.is_available():
        raise UserError('DATA.GPU_DECODE True needs a CUDA GPU to decode on; this machine has none')
    if gpu_decode and where == 'worker':
        raise UserError("DATA.GPU_DECODE True leaves the ops to the GPU; it cannot go with DATA.AUGMENT_ON "
                        "'worker'")
    # The synthetic data set makes PIL images, not files.
    if config.DATA.FAST_PIPELINE and config.DATA.IMG_SIZE > SMALL_IMAGE and config.DATA.DATASET != 'fake':
        fast = fast_train_transform(reference, device_augment=device_augment, gpu_decode=gpu_decode)
        if fast is not None:
            return fast
    return reference


def build_transform(is_train: bool, config) -> T.Compose:
    size = config.DATA.IMG_SIZE
    if config.DATA.INTERPOLATION not in INTERPOLATIONS:
        raise UserError(f'DATA.INTERPOLATION must be one of {", ".join(INTERPOLATIONS)}; '
                        f'got {config.DATA.INTERPOLATION!r}')
    if is_train:
        aug = config.AUG
        transform = create_transform(
            input_size=size,
            is_training=True,
            hflip=aug.HFLIP,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none') else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
        _use_release_posterize(transform)
        if size <= SMALL_IMAGE:
            transform.transforms[0] = T.Compose([
                T.Resize((size, size), interpolation=_interpolation(config.DATA.INTERPOLATION)),
                T.RandomCrop(size, padding=4),
            ])
        return transform

    interpolation = _interpolation(config.DATA.INTERPOLATION)
    if size <= SMALL_IMAGE:
        resize = [T.Resize((size, size), interpolation=interpolation)]
    elif config.TEST.CROP:
        # Resize the shorter side to size * 256 / 224, as at 224 px, then take the centre.
        resize = [ResizeCenterCrop(int(256 / 224 * size), size, interpolation)]
    else:
        resize = [T.Resize((size, size), interpolation=interpolation)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
