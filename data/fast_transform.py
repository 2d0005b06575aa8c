"""The training transform, reorganised for speed: the same random draws as timm's, less work per image.

timm's training transform (data.transforms.build_transform) decodes the whole file into a PIL image,
crops and resizes it with Pillow, applies RandAugment, converts it to a float tensor, normalises it
and maybe erases a box, all in the loader worker. :class:`FastTrainTransform` takes the file's bytes
instead and:

- reads the header only, draws the crop box (timm's own ``get_params``, on the upright size) and the
  interpolation, then decodes:
    * a crop at least twice the output size on both sides: with Pillow at the largest reduced
      DCT scale (1/2, 1/4, 1/8; ``Image.draft``) that keeps the crop at least the output size, and
      resizes the crop's exact (fractional) box in that smaller image;
    * an ordinary 8-bit colour JPEG otherwise: with ``torchvision.io.decode_jpeg`` (libjpeg-turbo,
      about twice Pillow's speed here) and resizes the crop, a view of the decoded tensor, with
      torch's antialiased resize for uint8 images (Pillow's filters, SIMD code);
    * anything else (PNG, greyscale, CMYK, EXIF-rotated, 16-bit, ...): exactly as the reference
      path does (data.robust.decode_image, then Pillow's crop and resize), so these images come
      out identical to it;
- applies the reference's own flip and RandAugment objects to the 8-bit image; when training on a
  GPU, the flip and RandAugment's ops are only drawn in the worker and applied on the device, as
  Pillow computes them (data.device_augment), and with DATA.GPU_DECODE plain JPEGs are decoded
  there too;
- returns the 8-bit image and the random-erasing boxes drawn for it (:class:`RawImage`), not a
  normalised float tensor. The batch (:class:`RawBatch`, four times smaller) is normalised and
  erased in ``RawBatch.to(device)``, on the training device, as timm's prefetcher does.

Every random number is drawn from the same generator, in the same order, as the reference path, so
for the same seed the crop box, interpolation, flip, RandAugment ops and magnitudes and the erased
boxes are the same (tests/test_fast_transform.py). The pixels differ only by resampling (the JPEG
decoder's DCT scaling, torch's resize); the erasing noise is the same on the CPU and drawn from a
generator of the device's own otherwise.
"""
import io
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, ToNumpy
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .device_augment import DeviceOp, Staged, StagedFlip, StagedRandAugment, apply_to_batch, to_device
from .images import _orientation
from .robust import CorruptImageError, decode_image

try:
    from torchvision.io import decode_jpeg
except ImportError:  # a torchvision without image decoding: Pillow decodes every file
    decode_jpeg = None

# Reduced DCT scales libjpeg can decode at.
_REDUCTIONS = (8, 4, 2)
# EXIF orientations that swap the stored width and height.
_TRANSPOSED = (5, 6, 7, 8)
# Pillow resampling filters by name (timm's crop stores Pillow's constants).
# Filters torch's antialiased uint8 resize has (its code follows Pillow's).
_TORCH_FILTERS = (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR)

# (top, left, height, width) of one erased box.
Box = Tuple[int, int, int, int]


@dataclass
class Erasures:
    """The random-erasing boxes drawn for one image, and the state of the torch generator the
    reference path would have drawn their noise from."""
    boxes: List[Box]
    torch_state: torch.Tensor


@dataclass
class Finish:
    """What is left of the reference transform after the 8-bit image: normalisation, then erasing."""
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    erase_mode: str  # 'pixel', 'rand' or 'const' (timm's RandomErasing modes)


@dataclass
class RawImage:
    """An augmented 8-bit image (H x W x 3, uint8), its erasures (None: not erased) and what is left
    to do to it: RandAugment ops left for the device (data.device_augment), normalisation, erasing."""
    pixels: Optional[torch.Tensor]  # None: ``encoded`` is decoded on the device
    erasures: Optional[Erasures]
    finish: Finish
    ops: List[DeviceOp] = field(default_factory=list)
    encoded: Optional['EncodedJpeg'] = None


class RawBatch:
    """A collated batch of :class:`RawImage`; ``.to(device)`` finishes it there (a float tensor,
    N x 3 x H x W, normalised and erased exactly as the reference's ToTensor, Normalize and
    RandomErasing do, after the RandAugment ops the worker left). Behaves like the tensor the
    training loop expected from the loader."""

    def __init__(self, pixels: torch.Tensor, erasures: Sequence[Optional[Erasures]], finish: Finish,
                 ops: Optional[Sequence[List[DeviceOp]]] = None,
                 encoded: Optional[Sequence[Optional['EncodedJpeg']]] = None):
        self.pixels, self.erasures, self.finish = pixels, list(erasures), finish
        self.ops = list(ops) if ops is not None else [[] for _ in range(len(pixels))]
        self.encoded = list(encoded) if encoded is not None else [None] * len(pixels)

    @classmethod
    def collate(cls, images: Sequence[RawImage]) -> 'RawBatch':
        # Files left for the device to decode hold a place (zeros) in the batch.
        pixels = [img.pixels if img.pixels is not None else torch.zeros(img.encoded.size + (3,), dtype=torch.uint8)
                  for img in images]
        return cls(torch.stack(pixels), [img.erasures for img in images], images[0].finish,
                   [img.ops for img in images], [img.encoded for img in images])

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> torch.Size:
        n, h, w, c = self.pixels.shape
        return torch.Size((n, c, h, w))

    def pin_memory(self) -> 'RawBatch':  # called by the DataLoader's pinning thread
        encoded = [e if e is None else e.pin_memory() for e in self.encoded]
        return RawBatch(self.pixels.pin_memory(), self.erasures, self.finish, self.ops, encoded)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        pixels = self.pixels.to(device, non_blocking=non_blocking)
        if any(self.ops) or any(e is not None for e in self.encoded):
            pixels = pixels.clone() if pixels.data_ptr() == self.pixels.data_ptr() else pixels
            todo = [i for i, e in enumerate(self.encoded) if e is not None]
            for i, image in zip(todo, decode_on_device([self.encoded[i] for i in todo], device)):
                pixels[i] = image
            apply_to_batch(pixels, self.ops)
        pixels = pixels.permute(0, 3, 1, 2).contiguous()
        # ToTensor then Normalize, in their order and precision: the same floats on the CPU.
        mean = to_device(self.finish.mean, device).view(1, -1, 1, 1)
        std = to_device(self.finish.std, device).view(1, -1, 1, 1)
        images = pixels.float().div_(255).sub_(mean).div_(std)
        for image, erasures in zip(images, self.erasures):
            if erasures is not None:
                _erase(image, erasures, self.finish.erase_mode)
        return images


def _erase(image: torch.Tensor, erasures: Erasures, mode: str):
    """Fill the boxes as timm's RandomErasing does (mode 'pixel': per-pixel normal noise; 'rand': a
    normal colour per box; 'const': zeros), drawing from the generator state the reference had."""
    device = image.device
    cpu = torch.Generator()
    cpu.set_state(erasures.torch_state)
    if device.type == 'cpu':
        generator = cpu
    else:  # a device generator cannot take a CPU state: seed it from that state instead
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(2 ** 62, (1,), generator=cpu)))
    chan = image.shape[0]
    for top, left, h, w in erasures.boxes:
        if mode == 'pixel':
            fill = torch.empty((chan, h, w), device=device).normal_(generator=generator)
        elif mode == 'rand':
            fill = torch.empty((chan, 1, 1), device=device).normal_(generator=generator)
        else:
            fill = torch.zeros((chan, 1, 1), device=device)
        image[:, top:top + h, left:left + w] = fill


def draw_erasures(erasing: RandomErasing, chan: int, img_h: int, img_w: int) -> Optional[Erasures]:
    """The boxes timm's ``RandomErasing._erase`` would fill, drawn with the same calls to ``random``
    in the same order (its code, less the filling)."""
    if random.random() > erasing.probability:
        return None
    state = torch.get_rng_state()
    area = img_h * img_w
    count = erasing.min_count if erasing.min_count == erasing.max_count else \
        random.randint(erasing.min_count, erasing.max_count)
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = random.uniform(erasing.min_area, erasing.max_area) * area / count
            aspect_ratio = math.exp(random.uniform(*erasing.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img_w and h < img_h:
                top = random.randint(0, img_h - h)
                left = random.randint(0, img_w - w)
                boxes.append((top, left, h, w))
                break
    return Erasures(boxes, state)


class FastTrainTransform:
    """The training transform ``reference`` (timm's, see :func:`fast_train_transform`), taking an
    encoded image file (bytes) and returning a :class:`RawImage`; see the module docstring."""

    takes_encoded = True  # data.robust.SkipCorruptMixin hands it the file's bytes

    def __init__(self, crop: RandomResizedCropAndInterpolation, pil_steps: Sequence, finish: Finish,
                 erasing: Optional[RandomErasing], use_decode_jpeg: bool = True, use_draft: bool = True,
                 device_augment: bool = False, gpu_decode: bool = False):
        self.crop, self.finish, self.erasing = crop, finish, erasing
        self.pil_steps = list(pil_steps)
        # RandAugment last: its ops can wait for the device (a copy of it does).
        if (device_augment or gpu_decode) and self.pil_steps and isinstance(self.pil_steps[-1], RandAugment):
            self.pil_steps[-1] = StagedRandAugment(self.pil_steps[-1])
        # When every step can wait for the device (the flip and RandAugment, as in the release recipe),
        # the flip waits too and the image stays a tensor unless an op in the worker needs a PIL image;
        # decoding on the device needs that as well (with any other step the worker decodes).
        staged = [StagedFlip(s.p) if isinstance(s, T.RandomHorizontalFlip) else s for s in self.pil_steps]
        self.all_staged = (device_augment or gpu_decode) and \
            all(isinstance(s, (StagedFlip, StagedRandAugment)) for s in staged)
        if self.all_staged:
            self.pil_steps = staged
        self.gpu_decode = gpu_decode and self.all_staged
        self.use_decode_jpeg = use_decode_jpeg and decode_jpeg is not None
        self.use_draft = use_draft

    def __call__(self, data: bytes, where: str = '<bytes>') -> RawImage:
        img = self._crop_resize(data, where)
        for step in self.pil_steps:  # the reference's flip and RandAugment objects
            img = step(img)
        ops = []
        if isinstance(img, Staged):
            img, ops = img.image, [op for op, _ in img.pending]
        encoded = None
        if isinstance(img, EncodedJpeg):  # nothing in the worker needed its pixels
            encoded, pixels, (out_w, out_h) = img, None, img.size[::-1]
        elif isinstance(img, DecodedPixels):  # nor a PIL image
            pixels = img.pixels
            out_h, out_w = pixels.shape[:2]
        else:
            pixels = torch.from_numpy(np.array(img))  # H x W x 3, writable
            out_h, out_w = pixels.shape[:2]
        erasures = draw_erasures(self.erasing, 3, out_h, out_w) if self.erasing is not None else None
        return RawImage(pixels, erasures, self.finish, ops, encoded)

    def _crop_resize(self, data: bytes, where: str) -> Image.Image:
        header = _open_header(data, where)
        w, h = header.size
        orientation = _orientation(header)
        if orientation in _TRANSPOSED:
            w, h = h, w
        # timm's draws, on the upright size (get_params only reads the size of what it is given).
        top, left, crop_h, crop_w = self.crop.get_params(torch.empty((0, h, w)), self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_h, out_w = self.crop.size
        plain_jpeg = header.format == 'JPEG' and header.mode == 'RGB' and orientation == 1
        reduction = _reduction(crop_w, crop_h, out_w, out_h) if self.use_draft else 1
        if plain_jpeg and reduction > 1:
            return _draft_crop_resize(header, (left, top, crop_w, crop_h), reduction, (out_w, out_h),
                                      interpolation, where)
        if plain_jpeg and self.use_decode_jpeg and interpolation in _TORCH_FILTERS:
            encoded = EncodedJpeg(_byte_tensor(data), (left, top, crop_w, crop_h), (out_h, out_w), interpolation, where)
            # With DATA.GPU_DECODE the device decodes it, unless an op in the worker needs its pixels.
            if self.gpu_decode:
                return encoded
            if not self.all_staged:
                return encoded.decode()
            pixels = encoded.decode_pixels()
            return DecodedPixels(pixels) if isinstance(pixels, torch.Tensor) else pixels
        # The reference path itself (timm's crop calls this function).
        img = decode_image(io.BytesIO(data), where)
        return TF.resized_crop(img, top, left, crop_h, crop_w, [out_h, out_w], interpolation)


def _open_header(data: bytes, where: str) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # see data.robust.decode_image
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise CorruptImageError(where, 'not a known image format, or a damaged header') from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise CorruptImageError(where, str(e) or type(e).__name__) from None


def _reduction(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) that keeps the crop at least the output size."""
    return next((r for r in _REDUCTIONS if crop_w // r >= out_w and crop_h // r >= out_h), 1)


def _draft_crop_resize(header: Image.Image, box, reduction: int, size, interpolation, where) -> Image.Image:
    """Decode at 1/``reduction`` scale and resize the crop's box, scaled to match, from there."""
    left, top, crop_w, crop_h = box
    w, h = header.size
    try:
        # Pillow picks the largest scale whose image is at least the size asked for: asking for
        # floor(size / reduction) makes that exactly ``reduction`` (ceil could give half of it).
        header.draft('RGB', (w // reduction, h // reduction))
        header.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise CorruptImageError(where, str(e) or type(e).__name__) from None
    # libjpeg's reduction r (its reduced image is ceil(w / r) wide): reduced pixel i covers the
    # original pixels [i * r, (i + 1) * r), so positions scale by exactly 1 / r.
    r = next((r for r in (1, 2, 4, 8) if math.ceil(w / r) == header.size[0]), w / header.size[0])
    x0, y0, x1, y1 = left / r, top / r, (left + crop_w) / r, (top + crop_h) / r
    # Crop whole pixels around the box so the filter meets the crop's edge where the reference does.
    cx0, cy0 = math.floor(x0), math.floor(y0)
    cx1, cy1 = min(header.size[0], math.ceil(x1)), min(header.size[1], math.ceil(y1))
    region = header.crop((cx0, cy0, cx1, cy1))
    return region.resize(size, TF.pil_modes_mapping[interpolation], box=(x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0))


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class EncodedJpeg:
    """A plain 8-bit colour JPEG file (its bytes) and the crop to resize from it: decoded in the
    worker (``decode``) or, with DATA.GPU_DECODE, on the device (:func:`decode_on_device`). Stands in
    for the PIL image in data.device_augment.Staged until then."""
    data: torch.Tensor
    box: Tuple[int, int, int, int]  # left, top, width, height
    out: Tuple[int, int]  # height, width
    interpolation: T.InterpolationMode
    where: str
    mode = 'RGB'

    @property
    def size(self) -> Tuple[int, int]:  # (width, height) of the resized crop, as a PIL image's
        return self.out[1], self.out[0]

    def pin_memory(self) -> 'EncodedJpeg':
        return EncodedJpeg(self.data.pin_memory(), self.box, self.out, self.interpolation, self.where)

    def decode(self) -> Image.Image:
        """Decoded with libjpeg-turbo (torchvision) here, the crop resized with torch."""
        pixels = self.decode_pixels()
        return pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels.numpy())

    def decode_pixels(self):
        """As ``decode``, as an H x W x 3 uint8 tensor (a PIL image if the file was not what its
        header said)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)  # torchvision 0.29 points to torchcodec
                pixels = decode_jpeg(self.data)
        except RuntimeError as e:  # libjpeg's error, e.g. a truncated file
            raise CorruptImageError(self.where, str(e).rsplit(', ', 1)[-1]) from None
        if pixels.shape[0] != 3:  # not what the header said; let Pillow decide
            left, top, w, h = self.box
            img = decode_image(io.BytesIO(self.data.numpy().tobytes()), self.where)
            return TF.resized_crop(img, top, left, h, w, list(self.out), self.interpolation)
        return self.crop_resize(pixels)

    def crop_resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The crop of the decoded C x H x W image, resized: H x W x C uint8, on its device."""
        left, top, w, h = self.box
        crop = pixels[None, :, top:top + h, left:left + w]
        if crop.device.type == 'cpu':
            # decode_jpeg's C x H x W tensor is a view of H x W x C pixels; the crop, made contiguous
            # in that layout (channels last), takes torch's vectorised uint8 resize (several times
            # its planar one).
            crop = crop.contiguous(memory_format=torch.channels_last)
            resized = F.interpolate(crop, size=list(self.out), mode=self.interpolation.value, antialias=True)
        else:  # the antialiased resize takes floats there; rounded as the uint8 one rounds
            resized = F.interpolate(crop.float(), size=list(self.out), mode=self.interpolation.value, antialias=True)
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        return resized[0].permute(1, 2, 0)


class DecodedPixels:
    """The resized crop as an H x W x 3 uint8 tensor, standing in for the PIL image in
    data.device_augment.Staged until an op in the worker needs one (``decode``)."""
    mode = 'RGB'

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    @property
    def size(self) -> Tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def decode(self) -> Image.Image:
        return Image.fromarray(self.pixels.numpy())


def decode_on_device(files: Sequence[EncodedJpeg], device: torch.device) -> List[torch.Tensor]:
    """The resized crops (H x W x 3 uint8, on ``device``) of JPEG files left for the device to decode:
    one batched ``decode_jpeg`` call (nvJPEG on a GPU; libjpeg-turbo on the CPU, which gives exactly
    the worker's pixels)."""
    if not files:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        try:
            images = decode_jpeg([f.data for f in files], device=device)
        except RuntimeError:  # name the file: decode them one by one
            images = []
            for f in files:
                try:
                    images.append(decode_jpeg(f.data, device=device))
                except RuntimeError as e:
                    raise CorruptImageError(f.where, str(e).rsplit(', ', 1)[-1]) from None
    out = []
    for f, image in zip(files, images):
        if image.shape[0] != 3:
            raise CorruptImageError(f.where, f'decoded to {image.shape[0]} channels, the header said RGB')
        out.append(f.crop_resize(image))
    return out


def fast_train_transform(reference: T.Compose, device_augment: bool = False,
                         gpu_decode: bool = False) -> Optional[FastTrainTransform]:
    """The fast equivalent of timm's training transform ``reference``, or None when it is not of the
    shape handled here: random resized crop, PIL steps (flip, RandAugment, colour jitter, ...),
    ToTensor, Normalize, then optionally RandomErasing. ``device_augment``: leave RandAugment's
    ops (and the flip before it) to ``RawBatch.to(device)`` (worth it when that device is
    a GPU). ``gpu_decode``: leave the decoding of plain JPEGs to it as well (DATA.GPU_DECODE)."""
    steps = list(reference.transforms)
    if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
        return None
    to_tensor = next((i for i, s in enumerate(steps) if type(s).__name__ in ('ToTensor', 'MaybeToTensor')), None)
    if to_tensor is None or any(isinstance(s, ToNumpy) for s in steps):
        return None
    tail = steps[to_tensor + 1:]
    if not tail or not isinstance(tail[0], T.Normalize):
        return None
    erasing = tail[1] if len(tail) > 1 else None
    if len(tail) > 2 or (erasing is not None and not isinstance(erasing, RandomErasing)):
        return None
    if erasing is not None and erasing.num_splits > 1:
        return None
    normalize = tail[0]
    mean = tuple(float(v) for v in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(normalize.std).flatten())
    finish = Finish(mean, std, erasing.mode if erasing is not None else 'const')
    return FastTrainTransform(steps[0], steps[1:to_tensor], finish, erasing, device_augment=device_augment,
                              gpu_decode=gpu_decode)
