"""Odd but legal images and extreme augmentations: every one decodes to a sensible upright RGB image
and goes through the release training and evaluation transforms.

The images are made in the test from crops of scikit-learn's sample photos, saved in each mode and
format; the expected pixels come from the photo itself (lossless formats) or from Pillow's own
conversions, never from the code under test.
"""
import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from torchvision import transforms as T

import config as cfg
from data import build_transform
from data.images import to_rgb
from data.robust import RobustImageFolder, decode_image
from data.transforms import POSTERIZE_OPS, ResizeCenterCrop, release_posterize
from photos import random_crop, sample_photos

ROOT = Path(__file__).resolve().parents[1]
RELEASE_CFG = str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml')


def _crop(seed: int = 0, size=(96, 64)) -> np.ndarray:
    """An RGB photo crop, width x height = size."""
    name, pixels = sample_photos()[seed % 2]
    top, left = 120 + 7 * seed, 200 + 11 * seed
    return np.ascontiguousarray(pixels[top:top + size[1], left:left + size[0]])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    if fmt == 'JPEG':
        kw.setdefault('quality', 95)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (Pillow writes none with colour): color_type 0 grey, 2 RGB,
    4 grey + alpha, 6 RGBA; ``values`` uint16, (H, W) or (H, W, C)."""
    h, w = values.shape[:2]
    rows = b''.join(b'\x00' + values[y].astype('>u2').tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color_type, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def _decode(data: bytes, name: str = 'x', allow_warnings: bool = False) -> np.ndarray:
    """What the data sets read, as an array; no warnings unless allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore' if allow_warnings else 'error')
        img = decode_image(io.BytesIO(data), name)
    assert img.mode == 'RGB'
    return np.asarray(img)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + 255.0 * (1 - a)


RGB = _crop()
GREY = np.asarray(Image.fromarray(RGB).convert('L'))          # Pillow's own luma
ALPHA = np.tile(np.linspace(0, 255, RGB.shape[1]).round().astype(np.uint8), (RGB.shape[0], 1))


# ---------------------------------------------------------------------------------------------------
# Decoding: every mode as a sensible RGB image
# ---------------------------------------------------------------------------------------------------

def test_grey_palette_bilevel_and_colour_spaces_convert_as_pillow_does():
    grey = np.repeat(GREY[..., None], 3, axis=2)
    assert np.array_equal(_decode(_encode(Image.fromarray(GREY), 'PNG')), grey)
    assert np.abs(_decode(_encode(Image.fromarray(GREY), 'JPEG')).astype(int) - grey).mean() < 3
    palette = Image.fromarray(RGB).convert('P')
    assert np.array_equal(_decode(_encode(palette, 'PNG')), np.asarray(palette.convert('RGB')))
    assert np.array_equal(_decode(_encode(palette, 'GIF')), np.asarray(palette.convert('RGB')))
    bilevel = Image.fromarray(RGB).convert('1')
    for fmt in ('PNG', 'BMP'):
        out = _decode(_encode(bilevel, fmt))
        assert set(np.unique(out)) <= {0, 255} and np.array_equal(out[..., 0] > 0, np.asarray(bilevel))
    # CMYK (lossless TIFF and JPEG): Pillow's CMYK of an RGB image converts back to the same RGB.
    cmyk = Image.fromarray(RGB).convert('CMYK')
    assert np.array_equal(_decode(_encode(cmyk, 'TIFF')), RGB)
    assert np.abs(_decode(_encode(cmyk, 'JPEG')).astype(int) - RGB).mean() < 4
    out = _decode(_encode(Image.fromarray(RGB).convert('LAB'), 'TIFF'))
    assert np.abs(out.astype(int) - RGB).mean() < 3
    # YCbCr as decoded (Pillow 12 cannot read back its own YCbCr TIFF files, so no file here).
    assert np.abs(np.asarray(to_rgb(Image.fromarray(RGB).convert('YCbCr'))).astype(int) - RGB).mean() < 3


@pytest.mark.parametrize('fmt', ['PNG', 'WEBP'])
def test_transparency_is_composited_onto_white(fmt):
    rgba = np.dstack([RGB, ALPHA])
    out = _decode(_encode(Image.fromarray(rgba), fmt, **({'lossless': True} if fmt == 'WEBP' else {})))
    assert np.abs(out - _over_white(RGB, ALPHA)).max() <= 1
    assert (out[:, 0] == 255).all()  # the fully transparent column, whatever colour it stored


def test_grey_alpha_and_palette_transparency():
    la = Image.fromarray(np.dstack([GREY, GREY, GREY, ALPHA])).convert('LA')
    out = _decode(_encode(la, 'PNG'))
    assert np.abs(out - _over_white(np.repeat(GREY[..., None], 3, 2), ALPHA)).max() <= 1
    # A palette whose index 0 is transparent: those pixels white, the rest their palette colour.
    palette = Image.fromarray(RGB).convert('P')
    indices = np.asarray(palette)
    assert (indices == 0).any() and (indices != 0).any()
    out = _decode(_encode(palette, 'PNG', transparency=0))
    assert (out[indices == 0] == 255).all()
    assert np.array_equal(out[indices != 0], np.asarray(palette.convert('RGB'))[indices != 0])
    # A grey and an RGB image with a transparent colour (PNG tRNS).
    out = _decode(_encode(Image.fromarray(GREY), 'PNG', transparency=int(GREY[0, 0])))
    assert (out[GREY == GREY[0, 0]] == 255).all() and np.array_equal(out[GREY != GREY[0, 0], 0], GREY[GREY != GREY[0, 0]])
    key = tuple(int(v) for v in RGB[0, 0])
    out = _decode(_encode(Image.fromarray(RGB), 'PNG', transparency=key))
    hit = (RGB == key).all(-1)
    assert (out[hit] == 255).all() and np.array_equal(out[~hit], RGB[~hit])


def test_16_bit_images_are_scaled_not_clipped():
    # Values v * 257 are 16-bit for v: they must come back as v (Pillow's convert gave 255).
    grey16 = GREY.astype(np.uint16) * 257
    expected = np.repeat(GREY[..., None], 3, axis=2)
    assert np.array_equal(_decode(_png16(grey16, 0)), expected)                   # mode I;16
    assert np.array_equal(_decode(_encode(Image.fromarray(grey16), 'TIFF')), expected)
    big_endian = Image.frombytes('I;16B', grey16.shape[::-1], grey16.astype('>u2').tobytes())
    assert np.array_equal(_decode(_encode(big_endian, 'TIFF')), expected)
    pgm = b'P5\n%d %d\n65535\n' % grey16.shape[::-1] + grey16.astype('>u2').tobytes()
    assert np.array_equal(_decode(pgm), expected)                                 # mode I
    # Any 16-bit value: rounded to the nearest 8-bit level.
    ramp = np.arange(0, 65536, 97, dtype=np.uint16)[:64 * 10].reshape(10, 64)
    assert np.array_equal(_decode(_png16(ramp, 0))[..., 1], np.rint(ramp / 257).astype(np.uint8))
    # 16-bit colour, with and without alpha: Pillow reads 8 bits of each.
    assert np.array_equal(_decode(_png16(RGB.astype(np.uint16) * 257, 2)), RGB)
    rgba16 = np.dstack([RGB, ALPHA]).astype(np.uint16) * 257
    assert np.abs(_decode(_png16(rgba16, 6)) - _over_white(RGB, ALPHA)).max() <= 1
    la16 = np.dstack([GREY, ALPHA]).astype(np.uint16) * 257
    assert np.abs(_decode(_png16(la16, 4)) - _over_white(expected, ALPHA)).max() <= 1


def test_32_bit_integer_and_float_images_are_scaled_from_their_range():
    expected = np.repeat(GREY[..., None], 3, axis=2)
    as_tiff = lambda array: _encode(Image.fromarray(array), 'TIFF')  # noqa: E731
    assert np.array_equal(_decode(as_tiff(GREY.astype(np.int32))), expected)                # 0..255
    assert np.array_equal(_decode(as_tiff(GREY.astype(np.int32) * 257)), expected)          # 16-bit range
    assert np.array_equal(_decode(as_tiff(GREY.astype(np.float32) / 255)), expected)        # 0..1
    assert np.array_equal(_decode(as_tiff(GREY.astype(np.float32))), expected)              # 0..255
    wide = GREY.astype(np.float32) * 1e6                                                    # its own max
    assert np.abs(_decode(as_tiff(wide))[..., 0].astype(int) - np.rint(GREY / GREY.max() * 255)).max() <= 1
    odd = (GREY.astype(np.float32) / 255)
    odd[0, :5] = [np.nan, -1.0, np.inf, -np.inf, 0.5]
    out = _decode(as_tiff(odd))
    assert list(out[0, :5, 0]) == [0, 0, 0, 0, 128] and np.array_equal(out[1:], expected[1:])


# Orientation tag -> how a camera stores an upright picture, and how a viewer turns it upright again
# (EXIF 2.3: 6 means "the 0th row is the visual right-hand side", so the stored image is the upright
# one turned 90 degrees anticlockwise).
_T = lambda a: np.transpose(a, (1, 0, 2))  # noqa: E731
STORED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
          5: _T, 6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(_T(a), 2), 8: lambda a: np.rot90(a, -1)}
UPRIGHT = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: _T, 6: lambda a: np.rot90(a, -1), 7: lambda a: _T(np.rot90(a, -2)), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](RGB)))
    assert np.array_equal(UPRIGHT[orientation](np.asarray(stored)), RGB)
    # Lossless PNG and WebP carry EXIF too: the upright photo must come back exactly.
    assert np.array_equal(_decode(_encode(stored, 'PNG', exif=exif)), RGB)
    assert np.array_equal(_decode(_encode(stored, 'WEBP', exif=exif, lossless=True)), RGB)
    # JPEG: Pillow's decoding of the stored pixels, turned upright.
    jpeg = _encode(stored, 'JPEG', exif=exif)
    as_stored = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))
    assert np.array_equal(_decode(jpeg), UPRIGHT[orientation](as_stored))
    # TIFF holds the orientation in its own tags; Pillow applies it when loading.
    assert np.array_equal(_decode(_encode(stored, 'TIFF', tiffinfo={274: orientation})), RGB)


def test_damaged_exif_keeps_the_image():
    data = _encode(Image.fromarray(RGB), 'JPEG',
                   exif=b'Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\xff\xff')
    out = _decode(data, allow_warnings=True)  # Pillow warns when it opens the file; no error
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))


def test_tiny_thin_and_very_long_images():
    for size in [(1, 1), (1, 300), (300, 1), (3000, 2), (2, 3000)]:
        pixels = np.asarray(Image.fromarray(RGB).resize(size, Image.BILINEAR))
        assert np.array_equal(_decode(_encode(Image.fromarray(pixels), 'PNG')), pixels)


def _odd_images():
    """(file name, bytes) of every odd case above, for the data set and transform tests."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.fromarray(RGB)
    yield 'grey.jpg', _encode(photo.convert('L'), 'JPEG')
    yield 'palette.png', _encode(photo.convert('P'), 'PNG', transparency=0)
    yield 'cmyk.jpg', _encode(photo.convert('CMYK'), 'JPEG')
    yield 'rgba.png', _encode(Image.fromarray(np.dstack([RGB, ALPHA])), 'PNG')
    yield 'la.png', _encode(photo.convert('LA'), 'PNG')
    yield 'bilevel.png', _encode(photo.convert('1'), 'PNG')
    yield 'grey16.png', _png16(GREY.astype(np.uint16) * 257, 0)
    yield 'rgb16.png', _png16(RGB.astype(np.uint16) * 257, 2)
    yield 'int32.tif', _encode(Image.fromarray(GREY.astype(np.int32) * 257), 'TIFF')
    yield 'float.tif', _encode(Image.fromarray(GREY.astype(np.float32) / 255), 'TIFF')
    yield 'exif6.jpg', _encode(photo.transpose(Image.Transpose.ROTATE_90), 'JPEG', exif=exif)
    yield 'lab.tif', _encode(photo.convert('LAB'), 'TIFF')
    yield 'rgba.webp', _encode(Image.fromarray(np.dstack([RGB, ALPHA])), 'WEBP')
    yield 'pixel.png', _encode(photo.resize((1, 1)), 'PNG')
    yield 'column.png', _encode(photo.resize((1, 400)), 'PNG')
    yield 'row.jpg', _encode(photo.resize((4000, 3)), 'JPEG')
    yield 'tall.png', _encode(photo.resize((5, 6000)), 'PNG')


def test_odd_images_go_through_the_release_transforms(tmp_path, one_thread):
    for name, data in _odd_images():
        folder = tmp_path / 'train' / name.replace('.', '_')
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
    config = cfg.load_config(RELEASE_CFG)
    random.seed(0), np.random.seed(0)
    for is_train in (True, False):
        dataset = RobustImageFolder(str(tmp_path / 'train'), build_transform(is_train, config))
        assert len(dataset) == len(list(_odd_images()))
        for _ in range(10 if is_train else 1):
            for i in range(len(dataset)):
                image, _ = dataset[i]
                assert image.shape == (3, 224, 224) and torch.isfinite(image).all(), dataset.samples[i][0]


# ---------------------------------------------------------------------------------------------------
# The evaluation resize and crop
# ---------------------------------------------------------------------------------------------------

INTERPOLATIONS = [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR, T.InterpolationMode.LANCZOS,
                  T.InterpolationMode.HAMMING, T.InterpolationMode.BOX, T.InterpolationMode.NEAREST]


@pytest.mark.parametrize('mode', INTERPOLATIONS, ids=lambda m: m.value)
def test_evaluation_crop_is_torchvisions_resize_and_centre_crop(mode):
    rng = np.random.RandomState(0)
    photos = [random_crop(rng, sample_photos()[i % 2][1], (120, 500)) for i in range(40)]
    photos += [random_crop(rng, sample_photos()[i % 2][1], (1, 40)) for i in range(20)]
    photos += [Image.fromarray(RGB).resize(s) for s in [(1, 1), (16, 256), (4096, 256), (300, 20)]]
    for resize, crop in ((256, 224), (438, 384)):
        ours, plain = ResizeCenterCrop(resize, crop, mode), T.Compose([T.Resize(resize, mode), T.CenterCrop(crop)])
        for photo in photos:  # aspects up to 16:1 take torchvision's own path: identical
            assert np.array_equal(np.asarray(ours(photo)), np.asarray(plain(photo))), photo.size


@pytest.mark.parametrize('mode', INTERPOLATIONS[:2], ids=lambda m: m.value)
def test_evaluation_crop_of_very_long_images(mode):
    # Longer than 16:1: resampled from the kept part only, within two grey levels of the plain path.
    rng = np.random.RandomState(1)
    ours, plain = ResizeCenterCrop(256, 224, mode), T.Compose([T.Resize(256, mode), T.CenterCrop(224)])
    for i in range(12):
        long, short = rng.randint(700, 1500), rng.randint(1, 40)
        size = (long, short) if i % 2 else (short, long)
        photo = Image.fromarray(sample_photos()[i % 2][1]).resize(size, Image.BILINEAR)
        diff = np.abs(np.asarray(ours(photo)).astype(int) - np.asarray(plain(photo)).astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 1e-3, size
    # One pixel by 100000: the plain path would resample a 256 x 25,600,000 image (19 GB).
    column = Image.fromarray(np.repeat(RGB[:, :1], 1600, axis=0)[:100000])
    out = np.asarray(ours(column))
    assert out.shape == (224, 224, 3)
    # The middle of the column, spread across the width.
    middle = np.asarray(column)[49000:51000, 0].astype(int)
    assert out.min() >= middle.min() - 2 and out.max() <= middle.max() + 2


def test_unknown_interpolation_is_a_one_line_error():
    from errors import UserError
    with pytest.raises(UserError, match="DATA.INTERPOLATION must be one of bicubic, .*; got 'cubic'"):
        build_transform(False, cfg.load_config(None, ['DATA.INTERPOLATION', 'cubic']))


# ---------------------------------------------------------------------------------------------------
# Augmentations at their extreme magnitudes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(auto_augment.NAME_TO_OP))
def test_every_augmentation_op_at_extreme_magnitudes(name):
    # Every op timm's RandAugment, AutoAugment and AugMix can pick, at magnitude 0, the release mean
    # 9, the clip 10 that mstd0.5 reaches, and beyond with 'mmax' (a user's choice).
    rng = np.random.RandomState(2)
    images = [random_crop(rng, sample_photos()[i % 2][1], (120, 500)).resize((224, 224)) for i in range(6)]
    images += [Image.new('RGB', (224, 224)), Image.new('RGB', (224, 224), (255, 255, 255)),
               Image.new('RGB', (1, 1), (20, 200, 90)), Image.new('RGB', (32, 32), (128, 128, 128))]
    hparams = dict(translate_const=100, img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    random.seed(0)
    for magnitude in (0, 9, 10, 15, 30):
        op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                    hparams=dict(hparams, magnitude_max=max(10, magnitude)))
        if name in POSTERIZE_OPS:
            assert op.aug_fn is not release_posterize
            op.aug_fn = release_posterize  # what build_transform installs
        for image in images:
            with warnings.catch_warnings():
                warnings.simplefilter('error')
                out = op(image)
            assert out.mode == 'RGB' and out.size == image.size, (name, magnitude)


POLICIES = ['rand-m9-mstd0.5-inc1',          # the releases
            'rand-m9-mstd0.5', 'rand-m10-mstd101', 'rand-m10-mstd101-inc1', 'rand-m30-mmax30-mstd0.5-inc1',
            'rand-m9-n4-p1.0-mstd1-inc1', 'rand-m9-mstd0.5-tweights', 'rand-m9-mstd0.5-t3a',
            'original', 'originalr', 'v0', 'v0r', '3a', 'augmix-m5-w4-d2', 'augmix-m9-mstd0.5',
            'none']                          # colour jitter instead


@pytest.mark.parametrize('policy', POLICIES)
def test_augmentation_policies_on_photos(policy, photo_folder, one_thread):
    # 400 crops each, with random erasing on every image in each of its modes.
    files = sorted((photo_folder(3000) / 'train').rglob('*.jpg'))[:400]
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    for remode in ('pixel', 'const', 'rand'):
        config = cfg.load_config(RELEASE_CFG, ['DATA.IMG_SIZE', '64', 'AUG.AUTO_AUGMENT', policy,
                                               'AUG.REPROB', '1.0', 'AUG.REMODE', remode])
        transform = build_transform(True, config)
        for path in files[:len(files) // 3] if remode != 'pixel' else files:
            with Image.open(path) as image:
                out = transform(image.convert('RGB'))
            assert out.shape == (3, 64, 64) and torch.isfinite(out).all(), (policy, path)
