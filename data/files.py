"""Opening input files without hanging on what is not a file, and pixel counts bounded before decoding.

``open()`` on a FIFO waits for a writer for ever, and on a character device such as /dev/zero or
/dev/urandom reads without end; a name with an image extension can be either. Every reader of user
files asks :func:`not_regular` first (one ``stat``) and refuses or skips the name; :func:`open_regular`
also opens with O_NONBLOCK and checks the opened file again, so a file replaced by a FIFO between the
two calls cannot block either.

A small compressed file can decode to billions of pixels (a 20000 x 20000 PNG of one colour is a few
hundred kilobytes). Pillow raises DecompressionBombError above twice ``Image.MAX_IMAGE_PIXELS``
(179 million pixels by default) when it opens an image; every reader here turns that error into a
one-line refusal naming the file. Pillow's check is a module global that libraries sometimes switch
off (``MAX_IMAGE_PIXELS = None``), so :func:`check_pixels` holds every image and label map to
:data:`MAX_PIXELS`, the same threshold, from the header before any pixel is decoded, whatever the
global says.
"""
import os
import stat
from typing import BinaryIO, Optional

from PIL import Image

# The largest image (width x height) read anywhere: Pillow's own error threshold (about 13400 x 13400,
# 0.5 GB as 8-bit RGB). No data set this code reads comes close; larger scans are better resized first.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)

_KINDS = (
    (stat.S_ISDIR, 'a folder'),
    (stat.S_ISFIFO, 'a FIFO (named pipe)'),
    (stat.S_ISSOCK, 'a socket'),
    (stat.S_ISCHR, 'a character device'),
    (stat.S_ISBLK, 'a block device'),
)


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ('a regular file', 'a FIFO (named pipe)', ...)."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return 'a regular file' if stat.S_ISREG(mode) else 'not a regular file'


def not_regular(path: str) -> Optional[str]:
    """None for a regular file (links followed); otherwise why it cannot be read as one: 'not found',
    'a broken symbolic link', 'a FIFO (named pipe)', 'a folder', ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return 'a broken symbolic link' if os.path.islink(path) else 'not found'
    except OSError as e:
        return e.strerror or str(e)
    return None if stat.S_ISREG(mode) else kind_of(mode)


def file_problem(path: str, what: str) -> Optional[str]:
    """A one-line reason why ``path`` cannot be read as ``what`` ('checkpoint', ...), or None."""
    problem = not_regular(path)
    if problem is None:
        return None
    return f'{what} not found: {path}' if problem == 'not found' else f'{path} is {problem}, not a {what} file'


def open_regular(path: str) -> BinaryIO:
    """``open(path, 'rb')`` for a regular file; OSError (with ``strerror`` saying why) for anything
    else, without blocking on a FIFO or a device."""
    problem = not_regular(path)
    if problem is not None:
        raise OSError(0, f'{problem}, not a regular file' if problem != 'not found' else 'file not found', path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced since the stat above
            raise OSError(0, f'{kind_of(mode)}, not a regular file', path)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def check_pixels(img: Image.Image, path: str, what: str = 'image') -> Optional[str]:
    """Why an opened (not yet decoded) image is too large to decode, or None."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        return (f'the {what} is {width}x{height} = {width * height / 1e6:.0f} million pixels, more than '
                f'the {MAX_PIXELS / 1e6:.0f} million read (data/files.py MAX_PIXELS); resize it')
    return None
