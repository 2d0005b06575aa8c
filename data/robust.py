"""Image folders whose damaged files either stop the run by name or are skipped and reported.

A scraped data set can hold truncated or non-image files. By default the first one met stops the run
with an error naming it; with ``skip_corrupt`` the file is passed over and recorded. The record
travels inside the batch (the collate function returns ``(images, targets, problems)``), because the
dataset runs in loader worker processes that cannot write to the main process's memory;
:class:`SkipReportingLoader` strips it again, raises or records in the main process, and is what the
training loop iterates over.
"""
import logging
import os
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder, find_classes

from errors import UserError
from utils import all_gather_objects, get_rank

from .files import check_pixels, open_regular
from .folders import find_images
from .images import to_rgb

logger = logging.getLogger('focalnet')

# (path, reason) for one unreadable file.
Problem = Tuple[str, str]


class DataError(UserError):
    """A data set that cannot be used as given; the message names the file, folder or value."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str, hint: str = ''):
        super().__init__(f'unreadable image {path}: {reason}{hint}')
        self.path, self.reason, self.hint = path, reason, hint

    def __reduce__(self):  # pickled across loader worker processes
        return type(self), (self.path, self.reason, self.hint)


def open_image(path: str) -> Image.Image:
    """Decode the whole file now (not lazily) so a truncated image fails here, naming the file. A
    FIFO or device with an image's name is refused without being opened (data/files.py)."""
    try:
        with open_regular(path) as f:
            return decode_image(f, path)
    except OSError as e:  # missing or unreadable file, or not a regular file
        raise CorruptImageError(path, e.strerror or str(e)) from None


def read_file(path: str) -> bytes:
    """The file's bytes, for a transform that decodes them itself (data.fast_transform)."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise CorruptImageError(path, e.strerror or str(e)) from None


def decode_image(file: BinaryIO, path: str) -> Image.Image:
    """An upright 8-bit RGB image from an open file (any mode, see data.images); ``path`` names it
    in the error."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some libraries set this module global, which makes PIL pad truncated files silently.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(file)
        too_large = check_pixels(img, path)
        if too_large:
            raise CorruptImageError(path, too_large)
        img.load()
        return to_rgb(img)
    except UnidentifiedImageError:
        raise CorruptImageError(path, 'not a known image format, or a damaged header') from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise CorruptImageError(path, reason) from None


class SkipCorruptMixin:
    """fetch / __getitem__ / __getitems__ for a data set with ``samples`` (a list of (name, target)),
    ``transform``, ``skip_corrupt``, ``refill`` and ``read_image(index)`` raising CorruptImageError.

    skip_corrupt: False stops at the first unreadable file; True skips it. refill: when skipping,
    put the next readable image (in index order) in its place so every batch keeps its size (mixup
    needs an even batch, distributed ranks the same number of steps); False drops the sample
    instead, which validation wants so that no image is counted twice.
    """
    skip_corrupt = False
    refill = True

    def read_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def read_encoded(self, index: int) -> Tuple[bytes, str]:
        """The image file's bytes and its name, for a transform that ``takes_encoded``."""
        raise NotImplementedError

    def _read_transformed(self, index: int):
        if getattr(self.transform, 'takes_encoded', False):
            # The transform decodes (only what it needs); it raises CorruptImageError as read_image does.
            return self.transform(*self.read_encoded(index))
        img = self.read_image(index)
        return self.transform(img) if self.transform is not None else img

    def fetch(self, index: int) -> Tuple[Optional[torch.Tensor], int, List[Problem]]:
        """(image or None, target, unreadable files met). None: the sample is to be dropped."""
        problems: List[Problem] = []
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            try:
                img = self._read_transformed(i)
            except CorruptImageError as e:
                problems.append((e.path, e.reason))
                if not (self.skip_corrupt and self.refill):
                    return None, self.samples[index][1], problems
                continue
            return img, self.samples[i][1], problems
        raise DataError(f'no readable image in the data set: all {n} files failed to decode, '
                        f'for example {problems[0][0]}: {problems[0][1]}')

    def __getitem__(self, index: int):
        img, target, problems = self.fetch(index)
        if img is None and not self.skip_corrupt:
            raise CorruptImageError(*problems[0])
        return img, target

    def __getitems__(self, indices: Sequence[int]) -> list:
        # The DataLoader's fetcher hands this list to the collate function unchanged.
        return [self.fetch(i) for i in indices]


class RobustImageFolder(SkipCorruptMixin, DatasetFolder):
    """An ImageFolder (``root/<class>/<image>``) that decodes eagerly and handles damaged files
    (see :class:`SkipCorruptMixin`).

    class_to_idx: the training set's mapping, for a validation folder: its classes must all be
        known to the training set, and keep the training set's indices.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, *, skip_corrupt: bool = False,
                 refill: bool = True, class_to_idx: Optional[Dict[str, int]] = None):
        if not os.path.isdir(root):
            raise DataError(f'data folder not found: {root} (expected one sub-folder of images per class)')
        try:
            classes, own = find_classes(root)
        except FileNotFoundError:
            raise DataError(f'no class folders in {root}; expected {root}/<class>/<image>') from None
        if class_to_idx is not None:
            unknown = sorted(set(classes) - set(class_to_idx))
            if unknown:
                more = f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''
                shown = ', '.join(unknown[:10]) + more
                raise DataError(f'{root} has {len(unknown)} class(es) the training set lacks: {shown}')
            own = {c: class_to_idx[c] for c in classes}
        # Each folder and file once, FIFOs and devices passed over (data/folders.py); a validation
        # folder may lack some classes; an empty data set is caught below.
        samples = find_images(root, own, IMG_EXTENSIONS)
        if not samples:
            raise DataError(f'no images ({", ".join(IMG_EXTENSIONS)}) found under {root}')
        # DatasetFolder.__init__ would scan the folder again; set what it would set.
        self.root, self.transform, self.target_transform = root, transform, None
        self.loader, self.extensions = open_image, IMG_EXTENSIONS
        self.classes = sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else classes
        self.class_to_idx = dict(class_to_idx) if class_to_idx else own
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.skip_corrupt, self.refill = skip_corrupt, refill

    def read_image(self, index: int) -> Image.Image:
        return open_image(self.samples[index][0])

    def read_encoded(self, index: int) -> Tuple[bytes, str]:
        path = self.samples[index][0]
        return read_file(path), path


def collate_with_problems(samples: list):
    """Collate fetched samples into (images, targets, problems), dropping samples without image.
    Plain (image, target) samples, from a data set without ``fetch``, have no problems."""
    samples = [s if len(s) == 3 else (*s, ()) for s in samples]
    kept = [(img, target) for img, target, _ in samples if img is not None]
    problems = tuple(p for _, _, ps in samples for p in ps)
    if not kept:
        return None, None, problems
    if hasattr(kept[0][0], 'erasures'):  # 8-bit images of data.fast_transform
        from .fast_transform import RawBatch  # here: that module imports this one
        images = RawBatch.collate([img for img, _ in kept])
        return images, default_collate([t for _, t in kept]), problems
    images, targets = default_collate(kept)
    return images, targets, problems


class SkipReportingLoader:
    """Iterates a loader built with :func:`collate_with_problems`, yielding (images, targets).

    Raises :class:`CorruptImageError` in the main process for the first unreadable file unless
    skip_corrupt; otherwise records it. ``take_skipped()`` returns the files skipped since the
    last call (once per occurrence); ``skipped`` maps every file skipped so far to its reason.
    Every other attribute (sampler, dataset, batch_size, len) is the wrapped loader's.
    """

    def __init__(self, loader: DataLoader, skip_corrupt: bool):
        self.loader, self.skip_corrupt = loader, skip_corrupt
        self.skipped: Dict[str, str] = {}
        self._recent: List[Problem] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        # Only called for attributes not found on self; guard against recursion before __init__.
        if name == 'loader':
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        for images, targets, problems in self.loader:
            if problems and not self.skip_corrupt:
                raise CorruptImageError(*problems[0], hint=' (set DATA.SKIP_CORRUPT True to skip such files)')
            for path, reason in problems:
                if path not in self.skipped:
                    logger.warning(f'skipping unreadable image {path}: {reason}')
                self.skipped[path] = reason
                self._recent.append((path, reason))
            if images is not None:
                yield images, targets

    def take_skipped(self) -> List[Problem]:
        recent, self._recent = self._recent, []
        return recent


def report_skipped(loaders: Sequence, where: str, out: str):
    """Log how many unreadable images the ``loaders`` of every process skipped since the last call,
    and which; each file is listed once, with its reason, in ``out``/skipped_images.txt. Every
    process calls this (it gathers)."""
    mine = [p for loader in loaders if isinstance(loader, SkipReportingLoader)
            for p in loader.take_skipped()]
    problems = [p for rank_list in all_gather_objects(mine) for p in rank_list]
    if not problems or get_rank() != 0:
        return
    path = os.path.join(out, 'skipped_images.txt')
    known = set()
    if os.path.isfile(path):
        with open(path) as f:
            known = {line.split('\t', 1)[0] for line in f}
    with open(path, 'a') as f:
        for file, reason in dict(problems).items():
            if file not in known:
                f.write(f'{file}\t{reason}\n')
                known.add(file)
    names = sorted({p for p, _ in problems})
    shown = ', '.join(names[:20]) + (f' and {len(names) - 20} more' if len(names) > 20 else '')
    logger.warning(f'{where}: skipped {len(problems)} unreadable image(s) ({len(known)} distinct so far): '
                   f'{shown} (all in {path})')
