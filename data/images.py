"""What every decoded image becomes before the transforms: an upright 8-bit RGB image.

``Image.convert('RGB')`` alone, which torchvision's and timm's loaders use, gets three kinds of
legal image wrong:

- High bit depth. A 16-bit greyscale PNG or TIFF opens as mode ``I;16`` (16-bit PGM and 32-bit TIFF
  as ``I``, floating-point TIFF as ``F``), and ``convert`` clips the values to 0..255 instead of
  scaling them: a 16-bit photograph becomes white, a float image in [0, 1] black. Here they are
  scaled to 8 bits (see :func:`_to_8bit`). 16-bit colour PNGs already open as 8-bit RGB(A).
- Transparency (RGBA, LA, PA, a palette or a colour with a transparent entry). ``convert`` drops
  the alpha channel and keeps whatever colour the file stores under transparent pixels, which is
  often black and sometimes leftover content nobody sees. Here the image is composited onto
  white, i.e. the model sees what an image viewer or a web page shows.
- EXIF orientation. A phone photo taken upright is often stored sideways with an orientation tag
  that every viewer honours. ``convert`` keeps it sideways. Here the orientation is applied, so
  the model sees the photo the way the person who labelled it did. (This also changes the few
  ImageNet files that carry the tag: a negligible difference from the releases' loader, which
  did not apply it, and the right default for everyone's own photos.)

Everything else (L, 1, P, CMYK, YCbCr, LAB, ...) goes through ``convert('RGB')`` as usual.
"""
import warnings

import numpy as np
from PIL import ExifTags, Image

# EXIF orientation -> the transposition that makes the stored pixels upright (1: already upright).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any mode Pillow decodes) as an upright 8-bit RGB image; see the module docstring."""
    orientation = _orientation(img)
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or 'transparency' in img.info:
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', img.size, WHITE + (255,)), rgba)
    rgb = img.convert('RGB')
    return rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb


def upright_size(img: Image.Image) -> tuple:
    """(width, height) that :func:`to_rgb` will give, read from the header only."""
    width, height = img.size
    return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 to 8), or 1 when there is none or the EXIF block is unreadable:
    the pixels are fine either way, so a damaged EXIF block neither stops a run nor warns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # Pillow warns about corrupt EXIF data, once per file
            value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError):
        return 1
    return value if isinstance(value, int) else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits (modes I;16*, I, F) as mode L, scaled from its full
    scale to 0..255. The full scale is 65535 for the 16-bit modes. Modes I and F do not record
    their bit depth, so it is taken from the values: the first of 1 (F only), 255 and 65535 that
    holds them all, else the image's own maximum. Negative values and NaN become 0."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith('I;16'):
        full = 65535.0
    else:
        top = float(values.max(initial=0.0))
        scales = ((1.0,) if img.mode == 'F' else ()) + (255.0, 65535.0)
        full = next((s for s in scales if top <= s), top)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8))
